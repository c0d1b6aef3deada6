"""The training setup being estimated: a frozen dataclass validated on construction.

(Stdlib dataclasses rather than pydantic here: see memcalc/report.py on start-up cost.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from memcalc.errors import UsageError
from memcalc.optimizers import OptimImpl, OptimizerName, OptimizerSettings
from memcalc.precision import Dtype, PrecisionName

DEFAULT_MICRO_BATCH_SIZE = 1
DEFAULT_SEQ_LEN = 2048
MAX_TOKENS = 10**9  # micro-batch x sequence: far past any run, small enough to keep arithmetic instant
MAX_GPUS = 10**6


class Attention(str, Enum):
    """attn_implementation: sdpa is what transformers picks by default; flash = flash_attention_2."""

    sdpa = "sdpa"
    eager = "eager"
    flash = "flash"


class Checkpointing(str, Enum):
    none = "none"
    full = "full"


@dataclass(frozen=True)
class TrainingSpec:
    """Everything about the run except the model. Defaults are printed with every report."""

    precision: PrecisionName = PrecisionName.bf16
    master_dtype: Dtype | None = None
    grad_dtype: Dtype | None = None
    state_dtype: Dtype | None = None
    optimizer: OptimizerName = OptimizerName.adamw
    optim_impl: OptimImpl = OptimImpl.foreach
    amsgrad: bool = False
    adafactor_beta1: float | None = None
    micro_batch_size: int = DEFAULT_MICRO_BATCH_SIZE
    seq_len: int = DEFAULT_SEQ_LEN
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpointing: Checkpointing = Checkpointing.none
    attention: Attention = Attention.sdpa
    zero_stage: int = 0
    num_gpus: int = 1
    # Trainable subsets (memcalc.trainable): LoRA adapters, QLoRA 4-bit base, frozen parts.
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] | None = None
    qlora: bool = False
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, enum in (("precision", PrecisionName), ("optimizer", OptimizerName), ("optim_impl", OptimImpl),
                           ("checkpointing", Checkpointing), ("attention", Attention)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(member.value for member in enum)
                raise UsageError(f"--{name.replace('_', '-')} {value!r} is not one of {choices}") from None
        for name in ("master_dtype", "grad_dtype", "state_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, Dtype(value))
                except ValueError:
                    raise UsageError(f"--{name.replace('_', '-')} {value!r} is not one of fp32, bf16, fp16") from None
        _check_range("--batch-size", self.micro_batch_size, 1, MAX_TOKENS)
        _check_range("--seq-len", self.seq_len, 1, MAX_TOKENS)
        if self.micro_batch_size * self.seq_len > MAX_TOKENS:
            raise UsageError(f"--batch-size x --seq-len is above {MAX_TOKENS:.0e} tokens; check the numbers")
        _check_range("--grad-accum", self.grad_accum, 1, 1_000_000)
        _check_range("--zero", self.zero_stage, 0, 3)
        _check_range("--gpus", self.num_gpus, 1, MAX_GPUS)
        if self.lora_rank is not None:
            _check_range("--lora-rank", self.lora_rank, 1, 65536)
        if self.adafactor_beta1 is not None and not 0.0 <= self.adafactor_beta1 < 1.0:
            raise UsageError(f"--adafactor-beta1 must be in [0, 1), got {self.adafactor_beta1}")
        if self.adafactor_beta1 is not None and self.optimizer != OptimizerName.adafactor:
            raise UsageError("--adafactor-beta1 only applies to --optim adafactor")
        if self.amsgrad and self.optimizer not in (OptimizerName.adam, OptimizerName.adamw):
            raise UsageError("--amsgrad only applies to --optim adam or adamw")

    def replace(self, **changes) -> TrainingSpec:
        return dataclasses.replace(self, **changes)

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(
            name=self.optimizer, impl=self.optim_impl, amsgrad=self.amsgrad, adafactor_beta1=self.adafactor_beta1
        )


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{flag} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high:,}, got {value}")
