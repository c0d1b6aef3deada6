"""The training setup being estimated: a frozen dataclass validated on construction.

(Stdlib dataclasses rather than pydantic here: see memcalc/report.py on start-up cost.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from memcalc import deepspeed_defaults as ds_defaults
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


class Sharding(str, Enum):
    """Which engine shards model states across GPUs (--zero picks the stage)."""

    deepspeed = "deepspeed"  # DeepSpeed ZeRO 0-3
    fsdp = "fsdp"  # PyTorch FSDP2 fully_shard: --zero 3 reshards after forward, --zero 2 does not
    torch = "torch"  # PyTorch DDP (--zero 0) and ZeroRedundancyOptimizer (--zero 1)


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"  # ZeRO-Offload: fp32 master, optimizer states and step on the CPU
    params = "params"  # ZeRO-3: 16-bit parameter shards on the CPU
    both = "both"


@dataclass(frozen=True)
class ZeroBuffers:
    """DeepSpeed's buffer settings that size memory, in elements, with DeepSpeed's defaults
    (memcalc/deepspeed_defaults.py).

    allgather_bucket_size is not here: it allocates nothing. deepspeed/runtime/utils.py, all_gather_dp_groups
    (called by stage_1_and_2.py step) all-gathers straight into the existing 16-bit flat buffer with
    torch.distributed.all_gather_into_tensor (deepspeed/comm/torch.py picks it whenever torch has it, since 1.13);
    only its fallback for older torch reads the bucket size, to split the same buffer into views.
    """

    reduce_bucket_size: int = ds_defaults.REDUCE_BUCKET_SIZE
    stage3_prefetch_bucket_size: int = ds_defaults.PREFETCH_BUCKET_SIZE
    stage3_max_live_parameters: int = ds_defaults.MAX_LIVE_PARAMETERS
    stage3_param_persistence_threshold: int = ds_defaults.PARAM_PERSISTENCE_THRESHOLD
    stage3_max_reuse_distance: int = ds_defaults.MAX_REUSE_DISTANCE  # not modelled: the report says so
    sub_group_size: int = ds_defaults.SUB_GROUP_SIZE  # ZeRO-3 optimizer sub-groups (stage3.py)
    contiguous_gradients: bool = ds_defaults.CONTIGUOUS_GRADIENTS
    overlap_comm: bool | None = None  # None: DeepSpeed's default, True at stage 3 only


# TrainingSpec field -> the setting a user states it with (Request keyword; flag --the-setting), where they differ.
SETTING_OF_FIELD = {"zero_stage": "zero", "micro_batch_size": "batch_size", "optimizer": "optim", "attention": "attn",
                    "num_gpus": "gpus", "num_nodes": "nodes"}


def setting_of(field_name: str) -> str:
    return SETTING_OF_FIELD.get(field_name, field_name)


class Checkpointing(str, Enum):
    none = "none"
    full = "full"


class ActivationSource(str, Enum):
    """Where the activations come from: the family's hand rules, the model's own code traced under FakeTensorMode
    (torch and transformers needed), or auto: the rules where the family has them, else the trace."""

    auto = "auto"
    rules = "rules"
    trace = "trace"


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
    activations: ActivationSource = ActivationSource.auto
    zero_stage: int = 0
    num_gpus: int = 1
    num_nodes: int = 1
    sharding: Sharding = Sharding.deepspeed
    offload: Offload = Offload.none
    zero_buffers: ZeroBuffers = ZeroBuffers()
    # Trainable subsets (memcalc.trainable): LoRA adapters, QLoRA 4-bit base, frozen parts.
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] | None = None
    qlora: bool = False
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, enum in (("precision", PrecisionName), ("optimizer", OptimizerName), ("optim_impl", OptimImpl),
                           ("checkpointing", Checkpointing), ("attention", Attention), ("sharding", Sharding),
                           ("offload", Offload), ("activations", ActivationSource)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(member.value for member in enum)
                raise UsageError(f"{{{setting_of(name)}}} {value!r} is not one of {choices}") from None
        for name in ("master_dtype", "grad_dtype", "state_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, Dtype(value))
                except ValueError:
                    raise UsageError(f"{{{name}}} {value!r} is not one of fp32, bf16, fp16") from None
        _check_range("{batch_size}", self.micro_batch_size, 1, MAX_TOKENS)
        _check_range("{seq_len}", self.seq_len, 1, MAX_TOKENS)
        if self.micro_batch_size * self.seq_len > MAX_TOKENS:
            raise UsageError(f"{{batch_size}} x {{seq_len}} is above {MAX_TOKENS:.0e} tokens; check the numbers")
        _check_range("{grad_accum}", self.grad_accum, 1, 1_000_000)
        _check_range("{zero}", self.zero_stage, 0, 3)
        _check_range("{gpus}", self.num_gpus, 1, MAX_GPUS)
        _check_range("{nodes}", self.num_nodes, 1, MAX_GPUS)
        if self.num_gpus % self.num_nodes:
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{nodes}} {self.num_nodes}: every node runs "
                             "the same number of GPUs")
        if self.offload != Offload.none:
            if self.sharding != Sharding.deepspeed:
                raise UsageError("{offload} models DeepSpeed ZeRO-Offload: use it with {sharding} deepspeed")
            if self.zero_stage == 0:
                raise UsageError("{offload} needs ZeRO: add {zero} 1, 2 or 3 (parameter offload needs {zero} 3)")
            if self.offload in (Offload.params, Offload.both) and self.zero_stage != 3:
                raise UsageError("{offload} params/both offloads ZeRO-3 parameter shards: use {zero} 3")
        if self.sharding == Sharding.fsdp and self.zero_stage in (0, 1):
            raise UsageError("{sharding} fsdp shards parameters: {zero} 3 (reshard after forward) or {zero} 2 (keep them)")
        if self.sharding == Sharding.torch and self.zero_stage > 1:
            raise UsageError("{sharding} torch is DDP ({zero} 0) or ZeroRedundancyOptimizer ({zero} 1); "
                             "use {sharding} fsdp for stages 2-3")
        if self.lora_rank is not None:
            _check_range("{lora_rank}", self.lora_rank, 1, 65536)
        if self.adafactor_beta1 is not None and not 0.0 <= self.adafactor_beta1 < 1.0:
            raise UsageError(f"{{adafactor_beta1}} must be in [0, 1), got {self.adafactor_beta1}")
        if self.adafactor_beta1 is not None and self.optimizer != OptimizerName.adafactor:
            raise UsageError("{adafactor_beta1} only applies to {optim} adafactor")
        if self.amsgrad and self.optimizer not in (OptimizerName.adam, OptimizerName.adamw):
            raise UsageError("{amsgrad} only applies to {optim} adam or adamw")

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def replace(self, **changes) -> TrainingSpec:
        return dataclasses.replace(self, **changes)

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(
            name=self.optimizer, impl=self.optim_impl, amsgrad=self.amsgrad, adafactor_beta1=self.adafactor_beta1
        )


def _check_range(setting: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{setting} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{setting} must be between {low} and {high:,}, got {value}")
