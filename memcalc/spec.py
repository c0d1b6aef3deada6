"""The training setup being estimated, as validated pydantic inputs."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from memcalc.optimizers import OptimImpl, OptimizerName, OptimizerSettings
from memcalc.precision import Dtype, PrecisionName

DEFAULT_MICRO_BATCH_SIZE = 1
DEFAULT_SEQ_LEN = 2048


class Checkpointing(str, Enum):
    none = "none"
    full = "full"


class TrainingSpec(BaseModel):
    """Everything about the run except the model. Defaults are printed with every report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: PrecisionName = PrecisionName.bf16
    master_dtype: Dtype | None = None
    grad_dtype: Dtype | None = None
    state_dtype: Dtype | None = None
    optimizer: OptimizerName = OptimizerName.adamw
    optim_impl: OptimImpl = OptimImpl.foreach
    amsgrad: bool = False
    adafactor_beta1: float | None = Field(default=None, ge=0.0, lt=1.0)
    micro_batch_size: int = Field(default=DEFAULT_MICRO_BATCH_SIZE, ge=1, le=1_000_000)
    seq_len: int = Field(default=DEFAULT_SEQ_LEN, ge=1, le=100_000_000)
    checkpointing: Checkpointing = Checkpointing.none
    zero_stage: int = Field(default=0, ge=0, le=3)
    num_gpus: int = Field(default=1, ge=1, le=1_000_000)
    # Trainable subsets (see memcalc.trainable): LoRA adapters, QLoRA 4-bit base, frozen parts.
    lora_rank: int | None = Field(default=None, ge=1, le=65536)
    lora_targets: tuple[str, ...] | None = None
    qlora: bool = False
    freeze: tuple[str, ...] = ()

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(
            name=self.optimizer, impl=self.optim_impl, amsgrad=self.amsgrad, adafactor_beta1=self.adafactor_beta1
        )
