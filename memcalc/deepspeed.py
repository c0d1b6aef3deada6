"""DeepSpeed configs as data, and DeepSpeed's and accelerate's own memory figures as arithmetic.

Three things, standard library only (DeepSpeed and torch are never imported):

1. ``read_deepspeed_config`` / ``parse_deepspeed_config``: a DeepSpeed JSON config -> ``DeepSpeedSettings``,
   with DeepSpeed's defaults for absent keys, the Hugging Face integration's rules for ``"auto"`` values
   (each assumption recorded in ``notes``), and one-line ``ConfigError``s for unknown keys and contradictions.
   ``spec_overrides`` maps the settings onto ``TrainingSpec`` fields.
2. ``emit_deepspeed_config``: a DeepSpeed config for a ``TrainingSpec`` that ``read_deepspeed_config`` reads back.
3. ``deepspeed_zero2_estimate`` / ``deepspeed_zero3_estimate``: DeepSpeed's
   ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` to the byte, and
   ``compare_with_deepspeed`` / ``compare_with_accelerate``: term-by-term rows saying how and why memcalc differs.

Every DeepSpeed rule below was read from the deepspeed 0.19.8 sdist (file and class or function named next to it);
the "auto" rules from transformers 5.24 (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig) and
accelerate 1.15 (accelerate/utils/dataclasses.py, DeepSpeedPlugin).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from memcalc.errors import ConfigError, UsageError
from memcalc.optimizers import OptimizerName
from memcalc.precision import Dtype, PrecisionName

if TYPE_CHECKING:
    from memcalc.model import ParamTensor
    from memcalc.report import Report
    from memcalc.spec import TrainingSpec

DEEPSPEED_VERSION_READ = "0.19.8"

# -- DeepSpeed's defaults for absent keys ----------------------------------------------------------------------
# deepspeed/runtime/zero/config.py, class DeepSpeedZeroConfig (pydantic fields; pp_int(5e8) is int 500000000).
DS_DEFAULT_ZERO_STAGE = 0  # stage: ZeroStageEnum = 0
DS_DEFAULT_CONTIGUOUS_GRADIENTS = True  # contiguous_gradients: bool = True
DS_DEFAULT_REDUCE_BUCKET_SIZE = 500_000_000  # reduce_bucket_size = Field(pp_int(5e8), gt=0)
DS_DEFAULT_ALLGATHER_BUCKET_SIZE = 500_000_000  # allgather_bucket_size = Field(pp_int(5e8), ge=0)
DS_DEFAULT_PREFETCH_BUCKET_SIZE = 50_000_000  # prefetch_bucket_size (alias stage3_prefetch_bucket_size) = pp_int(5e7)
DS_DEFAULT_PARAM_PERSISTENCE_THRESHOLD = 100_000  # param_persistence_threshold (alias stage3_...) = pp_int(1e5)
DS_DEFAULT_MAX_LIVE_PARAMETERS = 1_000_000_000  # max_live_parameters (alias stage3_max_live_parameters) = pp_int(1e9)
DS_DEFAULT_MAX_REUSE_DISTANCE = 1_000_000_000  # max_reuse_distance (alias stage3_max_reuse_distance) = pp_int(1e9)
DS_DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # sub_group_size = Field(pp_int(1e9), ge=0)
# overlap_comm: Optional[bool] = None, then validator overlap_comm_valid sets it to (stage == 3).
# deepspeed/runtime/zero/offload_config.py: device: OffloadDeviceEnum = "none" (none | cpu | nvme); ratio = 1.0.
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# deepspeed/runtime/constants.py: GRADIENT_CLIPPING_DEFAULT = 1.0 (changed from 0.0 in older releases).
DS_DEFAULT_GRADIENT_CLIPPING = 1.0
# deepspeed/runtime/config.py, DeepSpeedConfig._set_batch_related_parameters: gradient_accumulation_steps is 1
# when only one of train_batch_size / train_micro_batch_size_per_gpu is given.
DS_DEFAULT_GRADIENT_ACCUMULATION_STEPS = 1

# -- The Hugging Face integration's "auto" rules ---------------------------------------------------------------
# transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig.trainer_config_process (values from
# TrainingArguments, whose defaults are in transformers/training_args.py) and trainer_config_finalize (hidden size).
HF_DEFAULT_PER_DEVICE_TRAIN_BATCH_SIZE = 8  # TrainingArguments.per_device_train_batch_size
HF_DEFAULT_GRADIENT_ACCUMULATION_STEPS = 1
HF_DEFAULT_MAX_GRAD_NORM = 1.0
HF_DEFAULT_LEARNING_RATE = 5e-5
HF_DEFAULT_ADAM_BETAS = (0.9, 0.999)
HF_DEFAULT_ADAM_EPSILON = 1e-8
HF_DEFAULT_WEIGHT_DECAY = 0.0
HF_OPTIMIZER_PARAM_DEFAULTS: dict[str, Any] = {
    "lr": HF_DEFAULT_LEARNING_RATE,  # args.learning_rate
    "betas": list(HF_DEFAULT_ADAM_BETAS),  # [args.adam_beta1, args.adam_beta2]
    "eps": HF_DEFAULT_ADAM_EPSILON,  # args.adam_epsilon
    "weight_decay": HF_DEFAULT_WEIGHT_DECAY,  # args.weight_decay
}


def hf_reduce_bucket_size(hidden_size: int) -> int:
    """trainer_config_finalize: fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)."""
    return hidden_size * hidden_size


def hf_stage3_prefetch_bucket_size(hidden_size: int) -> int:
    """trainer_config_finalize, ZeRO-3 only: int(0.9 * hidden_size * hidden_size)."""
    return int(0.9 * hidden_size * hidden_size)


def hf_stage3_param_persistence_threshold(hidden_size: int) -> int:
    """trainer_config_finalize, ZeRO-3 only: 10 * hidden_size."""
    return 10 * hidden_size


def hf_hidden_size(config: Mapping[str, Any] | None) -> int | None:
    """The hidden size the HF integration reads (trainer_config_finalize): hidden_size, else max(hidden_sizes),
    else the same two under text_config; None when none is there."""
    if not config:
        return None
    for section in (config, config.get("text_config") or {}):
        if isinstance(section.get("hidden_size"), int):
            return section["hidden_size"]
        sizes = section.get("hidden_sizes")
        if isinstance(sizes, list) and sizes and all(isinstance(s, int) for s in sizes):
            return max(sizes)
    return None


# -- Keys DeepSpeed knows -------------------------------------------------------------------------------------
# deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig: model_config extra="forbid" (config_utils.py,
# DeepSpeedConfigModel) and populate_by_name=True, so both field names and their stage3_* aliases are accepted
# and anything else is an error in DeepSpeed too.
ZERO_KEYS = frozenset({
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "compute_grad_norm", "load_from_fp32_weights",
    "elastic_checkpoint", "offload_param", "offload_optimizer", "zenflow", "sub_group_size", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "cpu_offload", "prefetch_bucket_size", "stage3_prefetch_bucket_size",
    "param_persistence_threshold", "stage3_param_persistence_threshold", "model_persistence_threshold",
    "stage3_model_persistence_threshold", "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance",
    "stage3_max_reuse_distance", "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
    "module_granularity_threshold", "stage3_module_granularity_threshold", "use_all_reduce_for_fetch_params",
    "stage3_use_all_reduce_for_fetch_params", "allgather_sequential", "stage3_allgather_sequential",
    "stage3_gather_fp16_weights_on_model_save", "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients",
    "parameter_alignment", "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "save_muon_momentum_buffer_in_memory", "leaf_module",
})
# deepspeed/runtime/config.py, _REMOVED_ZERO_CONFIG_KEYS: DeepSpeed 0.19.8 raises on these.
REMOVED_ZERO_KEYS = frozenset({"mics_shard_size", "mics_hierarchical_params_gather", "zeropp_loco_param"})
# deepspeed/runtime/zero/offload_config.py (extra="forbid" as well).
OFFLOAD_PARAM_KEYS = frozenset({"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory"})
OFFLOAD_OPTIMIZER_KEYS = frozenset({
    "device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write", "fast_init", "ratio",
    "super_offload", "cpuadam_cores_perc",
})
# deepspeed/runtime/precision_config.py, DeepSpeedBF16Config and DeepSpeedFP16Config (extra="forbid").
BF16_KEYS = frozenset({
    "enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads", "bf16_optimizer_states",
})
FP16_KEYS = frozenset({
    "enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
    "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads",
})
# Top-level sections and scalars DeepSpeedConfig._initialize_params reads (deepspeed/runtime/config.py and the
# constants it imports: runtime/constants.py, activation_checkpointing/config.py, profiling/constants.py,
# autotuning/constants.py, comm/constants.py, monitor/config.py, swap_tensor/constants.py, utils/config.py,
# datastates/config.py, data_pipeline/constants.py). DeepSpeed itself ignores other top-level keys silently;
# memcalc refuses them, because a misspelt section ("zero_optimisation") silently changes the run.
TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "managed_gradient_accumulation", "optimizer", "scheduler", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "torch_autocast", "gradient_clipping",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "disable_allgather", "dump_state", "disable_python_gc",
    "vocabulary_size", "wall_clock_breakdown", "memory_breakdown", "checkpoint", "data_types", "dataloader_drop_last",
    "use_data_before_expert_parallelism", "log_level", "fp16", "bf16", "bfloat16", "zero_optimization",
    "activation_checkpointing", "flops_profiler", "autotuning", "comms_logger", "tensorboard", "wandb", "csv_monitor",
    "comet", "aio", "timers", "hybrid_engine", "pipeline", "data_efficiency", "weight_quantization", "compile",
    "tensor_parallel", "expert_parallel", "sequence_parallel_size", "datastates_ckpt",
    # accelerate's DeepSpeedPlugin adds this one for fp8 through MS-AMP (accelerate/utils/dataclasses.py).
    "msamp",
})
# deepspeed/runtime/config.py, _REMOVED_TOP_LEVEL_CONFIG_KEYS: features removed in 0.19; DeepSpeed 0.19.8 raises on
# them, older releases accept them. None changes model-state memory except "amp" (Apex), handled apart.
REMOVED_TOP_LEVEL_KEYS = frozenset({
    "nebula", "compression_training", "amp", "quantize_training", "sparse_gradients", "eigenvalue",
    "sparse_attention", "elasticity", "graph_harvesting", "curriculum_learning", "progressive_layer_drop",
})
OPTIMIZER_KEYS = frozenset({"type", "params", "legacy_fusion"})  # runtime/constants.py: TYPE, OPTIMIZER_PARAMS, ...
AUTOCAST_DTYPES = {  # deepspeed/runtime/config.py, DtypeEnum values accepted for torch_autocast.dtype
    "torch.float16": "fp16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "torch.bfloat16": "bf16", "bf16": "bf16", "bfloat16": "bf16",
}

MAX_ELEMENTS = 10**15  # a sanity bound on element counts, far past any real bucket


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a DeepSpeed config says, with DeepSpeed's defaults filled in and every "auto" resolved.

    Sizes are element counts, as DeepSpeed's config uses them. ``notes`` names every value memcalc assumed.
    """

    source: str
    zero_stage: int = DS_DEFAULT_ZERO_STAGE
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    offload_optimizer_ratio: float = 1.0
    reduce_bucket_size: int = DS_DEFAULT_REDUCE_BUCKET_SIZE
    allgather_bucket_size: int = DS_DEFAULT_ALLGATHER_BUCKET_SIZE
    stage3_max_live_parameters: int = DS_DEFAULT_MAX_LIVE_PARAMETERS
    stage3_max_reuse_distance: int = DS_DEFAULT_MAX_REUSE_DISTANCE
    stage3_prefetch_bucket_size: int = DS_DEFAULT_PREFETCH_BUCKET_SIZE
    stage3_param_persistence_threshold: int = DS_DEFAULT_PARAM_PERSISTENCE_THRESHOLD
    sub_group_size: int = DS_DEFAULT_SUB_GROUP_SIZE
    contiguous_gradients: bool = DS_DEFAULT_CONTIGUOUS_GRADIENTS
    overlap_comm: bool = False
    bf16: bool = False
    fp16: bool = False
    bf16_master_weights_and_grads: bool = False
    bf16_optimizer_states: bool = False
    fp16_master_weights_and_grads: bool = False
    torch_autocast: str | None = None  # "bf16" / "fp16" when torch_autocast.enabled
    train_micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = DS_DEFAULT_GRADIENT_ACCUMULATION_STEPS
    train_batch_size: int | None = None
    optimizer_type: str | None = None  # as written ("AdamW"); None: the client (e.g. HF Trainer) brings one
    optimizer_params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs, so the dataclass stays hashable
    gradient_clipping: float = DS_DEFAULT_GRADIENT_CLIPPING
    notes: tuple[str, ...] = ()

    @property
    def optimizer_params_dict(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in self.optimizer_params}

    @property
    def offload(self) -> str:
        """In memcalc's --offload vocabulary: none | optimizer | params | both."""
        opt, par = self.offload_optimizer != "none", self.offload_param != "none"
        return {(False, False): "none", (True, False): "optimizer", (False, True): "params", (True, True): "both"}[
            (opt, par)
        ]

    @property
    def precision(self) -> PrecisionName:
        """memcalc's recipe: bf16/fp16 mixed precision with an fp32 master, torch.autocast, or fp32."""
        if self.bf16:
            return PrecisionName.bf16
        if self.fp16:
            return PrecisionName.fp16
        if self.torch_autocast == "bf16":
            return PrecisionName.amp_bf16
        if self.torch_autocast == "fp16":
            return PrecisionName.amp_fp16
        return PrecisionName.fp32


# -- Reading ------------------------------------------------------------------------------------------------------


def read_deepspeed_config(
    path: str | Path,
    *,
    hidden_size: int | None = None,
    micro_batch_size: int | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    offload: str | None = None,
    num_gpus: int | None = None,
) -> DeepSpeedSettings:
    """Read a DeepSpeed JSON config file. The keyword arguments are what the CLI knows, used only for "auto":

    hidden_size: the model's (``hf_hidden_size(config)``) for the bucket sizes the HF integration derives from it;
    micro_batch_size: --batch-size (HF: per_device_train_batch_size); precision: --precision when the user gave it
    (HF: args.bf16 / args.fp16; None means TrainingArguments' default, both False); zero_stage / offload: --zero /
    --offload (accelerate's DeepSpeedPlugin fills stage and offload devices); num_gpus: --gpus, to check
    train_batch_size = micro-batch x accumulation x GPUs as DeepSpeed does.
    """
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: DeepSpeed config not found; check the --deepspeed path") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a folder; --deepspeed needs the JSON file itself (ds_config.json)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot read the DeepSpeed config ({_one_line(error)})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as error:
        # deepspeed/runtime/config.py loads with dict_raise_error_on_duplicate_keys as well.
        raise ConfigError(f"{source}: key {error.args[0]!r} appears twice; keep one") from None
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{source}: not valid JSON at line {error.lineno} column {error.colno} ({error.msg}); "
            "memcalc reads strict JSON (no comments or trailing commas)"
        ) from None
    return parse_deepspeed_config(
        data, source=source, hidden_size=hidden_size, micro_batch_size=micro_batch_size, precision=precision,
        zero_stage=zero_stage, offload=offload, num_gpus=num_gpus,
    )


def parse_deepspeed_config(
    data: Any,
    *,
    source: str = "DeepSpeed config",
    hidden_size: int | None = None,
    micro_batch_size: int | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    offload: str | None = None,
    num_gpus: int | None = None,
) -> DeepSpeedSettings:
    """The same as ``read_deepspeed_config`` for a config already loaded (a dict, as HF Trainer also accepts)."""
    return _Parser(source, hidden_size, micro_batch_size, precision, zero_stage, offload, num_gpus).parse(data)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _suggest(key: str, known: frozenset[str]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser:
    def __init__(self, source: str, hidden_size: int | None, micro_batch_size: int | None, precision: str | None,
                 zero_stage: int | None, offload: str | None, num_gpus: int | None) -> None:
        self.source = source
        self.hidden_size = hidden_size
        self.micro_batch_size = micro_batch_size
        self.precision = PrecisionName(precision) if precision is not None else None
        self.zero_stage = zero_stage
        self.offload = offload
        self.num_gpus = num_gpus
        self.notes: list[str] = []

    # -- errors and notes ----------------------------------------------------------------------------------------
    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def assume(self, path: str, value: Any, rule: str) -> None:
        self.notes.append(f"{path} is \"auto\": assumed {value!r} ({rule})")

    # -- typed values --------------------------------------------------------------------------------------------
    def section(self, parent: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{path} must be a JSON object {{...}}, got {type(value).__name__}; see the DeepSpeed "
                            "config docs for its keys")
        return value

    def check_keys(self, section: Mapping[str, Any], known: frozenset[str], path: str) -> None:
        for key in section:
            if key not in known:
                raise self.fail(f"unknown key {path}.{key}{_suggest(key, known)}; DeepSpeed "
                                f"{DEEPSPEED_VERSION_READ} rejects it: fix the spelling or remove it")

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        raise self.fail(f"{path} must be true or false, got {value!r}")

    def integer(self, value: Any, path: str, default: int | None, minimum: int = 0) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())
        ):
            raise self.fail(f"{path} must be a whole number, got {value!r}")
        number = int(value)
        if number < 0:
            raise self.fail(f"{path} is negative ({number}); give a count of at least {minimum}")
        if number < minimum:
            raise self.fail(f"{path} is {number}; it must be at least {minimum}")
        if number > MAX_ELEMENTS:
            raise self.fail(f"{path} is {number:.3g}, beyond any real setting; check the number")
        return number

    def number(self, value: Any, path: str, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{path} must be a number, got {value!r}")
        if value < 0:
            raise self.fail(f"{path} is negative ({value}); give 0 or more")
        return float(value)

    # -- the config ----------------------------------------------------------------------------------------------
    def parse(self, data: Any) -> DeepSpeedSettings:
        if not isinstance(data, dict):
            raise self.fail(f"a DeepSpeed config is a JSON object {{...}}, got {type(data).__name__}")
        for key in data:
            if key not in TOP_LEVEL_KEYS and key not in REMOVED_TOP_LEVEL_KEYS:
                raise self.fail(f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}; DeepSpeed would "
                                "silently ignore it: fix the spelling or remove it")
        for key in sorted(REMOVED_TOP_LEVEL_KEYS & data.keys()):
            if key == "amp" and isinstance(data[key], dict) and data[key].get("enabled") is True:
                raise self.fail("amp.enabled is true: Apex AMP is removed from DeepSpeed and not modelled; use "
                                "\"bf16\" or \"fp16\" instead")
            self.notes.append(f"{key}: ignored (it does not change the memory memcalc counts; DeepSpeed "
                              f"{DEEPSPEED_VERSION_READ} removed it and rejects the key)")

        zero = self.zero_section(data)
        stage = zero["zero_stage"]
        precision = self.precision_sections(data, stage)
        batch = self.batch(data)
        optimizer_type, optimizer_params = self.optimizer(data)
        clipping_raw = data.get("gradient_clipping")
        if _is_auto(clipping_raw):
            clipping = HF_DEFAULT_MAX_GRAD_NORM
            self.assume("gradient_clipping", clipping, "HF Trainer: args.max_grad_norm, default 1.0")
        else:
            clipping = self.number(clipping_raw, "gradient_clipping", DS_DEFAULT_GRADIENT_CLIPPING)
        return DeepSpeedSettings(
            source=self.source, **zero, **precision, **batch, optimizer_type=optimizer_type,
            optimizer_params=optimizer_params, gradient_clipping=clipping, notes=tuple(self.notes),
        )

    def zero_section(self, data: Mapping[str, Any]) -> dict[str, Any]:
        raw = data.get("zero_optimization")
        if isinstance(raw, bool):
            # deepspeed/runtime/zero/config.py, read_zero_config_deprecated: true means stage 1.
            self.notes.append("zero_optimization: true is DeepSpeed's deprecated form of {\"stage\": 1}")
            raw = {"stage": 1 if raw else 0}
        zero = self.section({"zero_optimization": raw}, "zero_optimization", "zero_optimization")
        for key in zero:
            if key in REMOVED_ZERO_KEYS:
                raise self.fail(f"zero_optimization.{key} belongs to a feature DeepSpeed {DEEPSPEED_VERSION_READ} "
                                "removed (MiCS / LoCo); remove the key")
        self.check_keys(zero, ZERO_KEYS, "zero_optimization")
        for name, alias in (("prefetch_bucket_size", "stage3_prefetch_bucket_size"),
                            ("param_persistence_threshold", "stage3_param_persistence_threshold"),
                            ("max_live_parameters", "stage3_max_live_parameters"),
                            ("max_reuse_distance", "stage3_max_reuse_distance")):
            if name in zero and alias in zero:
                raise self.fail(f"zero_optimization has both {name} and {alias}, the same setting; keep one")

        def get(key: str) -> Any:
            for name in (key, key.removeprefix("stage3_")):
                if name in zero:
                    return zero[name]
            return None

        stage_raw = zero.get("stage")
        if _is_auto(stage_raw):
            if self.zero_stage is None:
                raise self.fail("zero_optimization.stage is \"auto\" (accelerate fills it from its own config); "
                                "give --zero 0-3 or a number in the file")
            stage = self.zero_stage
            self.assume("zero_optimization.stage", stage, "accelerate DeepSpeedPlugin zero_stage: --zero")
        else:
            stage = self.integer(stage_raw, "zero_optimization.stage", DS_DEFAULT_ZERO_STAGE)
            if stage > 3:
                raise self.fail(f"zero_optimization.stage is {stage}; DeepSpeed has stages 0, 1, 2 and 3")

        offload_optimizer, ratio = self.offload_device(zero, "offload_optimizer", OFFLOAD_OPTIMIZER_KEYS,
                                                       deprecated="cpu_offload")
        offload_param, _ = self.offload_device(zero, "offload_param", OFFLOAD_PARAM_KEYS,
                                               deprecated="cpu_offload_param")
        if offload_optimizer != "none" and stage == 0:
            raise self.fail(f"zero_optimization.offload_optimizer (device {offload_optimizer}) needs ZeRO stage 1, 2 "
                            "or 3 but the stage is 0: set zero_optimization.stage or remove offload_optimizer")
        if offload_param != "none" and stage != 3:
            raise self.fail(f"zero_optimization.offload_param (device {offload_param}) only works with ZeRO stage 3 "
                            f"but the stage is {stage}: set zero_optimization.stage to 3 or remove offload_param")
        if ratio < 1.0 and stage != 3:
            # deepspeed/runtime/zero/config.py, offload_ratio_check.
            raise self.fail(f"zero_optimization.offload_optimizer.ratio is {ratio}; partial offload needs ZeRO "
                            "stage 3: set the ratio to 1.0 or the stage to 3")
        if ratio < 1.0:
            self.notes.append(f"offload_optimizer.ratio {ratio}: only that share of the optimizer states is "
                              "offloaded; memcalc treats the offload as whole")

        # Bucket sizes. "auto" follows HF's trainer_config_finalize; it fills the stage3_* two only for ZeRO-3.
        reduce_bucket = self.hf_sized(get("reduce_bucket_size"), "zero_optimization.reduce_bucket_size",
                                      DS_DEFAULT_REDUCE_BUCKET_SIZE, hf_reduce_bucket_size, "hidden_size * hidden_size",
                                      applies=True, minimum=1)  # Field(..., gt=0)
        prefetch = self.hf_sized(get("stage3_prefetch_bucket_size"), "zero_optimization.stage3_prefetch_bucket_size",
                                 DS_DEFAULT_PREFETCH_BUCKET_SIZE, hf_stage3_prefetch_bucket_size,
                                 "int(0.9 * hidden_size * hidden_size)", applies=stage == 3)
        persistence = self.hf_sized(get("stage3_param_persistence_threshold"),
                                    "zero_optimization.stage3_param_persistence_threshold",
                                    DS_DEFAULT_PARAM_PERSISTENCE_THRESHOLD, hf_stage3_param_persistence_threshold,
                                    "10 * hidden_size", applies=stage == 3)
        values = {
            "allgather_bucket_size": self.plain_int(get("allgather_bucket_size"), "allgather_bucket_size",
                                                    DS_DEFAULT_ALLGATHER_BUCKET_SIZE),
            "stage3_max_live_parameters": self.plain_int(get("stage3_max_live_parameters"),
                                                         "stage3_max_live_parameters", DS_DEFAULT_MAX_LIVE_PARAMETERS),
            "stage3_max_reuse_distance": self.plain_int(get("stage3_max_reuse_distance"), "stage3_max_reuse_distance",
                                                        DS_DEFAULT_MAX_REUSE_DISTANCE),
            "sub_group_size": self.plain_int(zero.get("sub_group_size"), "sub_group_size", DS_DEFAULT_SUB_GROUP_SIZE),
        }
        contiguous = self.boolean(zero.get("contiguous_gradients"), "zero_optimization.contiguous_gradients",
                                  DS_DEFAULT_CONTIGUOUS_GRADIENTS)
        # overlap_comm_valid: None becomes (stage == ZeroStageEnum.weights).
        overlap = self.boolean(zero.get("overlap_comm"), "zero_optimization.overlap_comm", stage == 3)
        return {
            "zero_stage": stage, "offload_optimizer": offload_optimizer, "offload_param": offload_param,
            "offload_optimizer_ratio": ratio, "reduce_bucket_size": reduce_bucket,
            "stage3_prefetch_bucket_size": prefetch, "stage3_param_persistence_threshold": persistence,
            "contiguous_gradients": contiguous, "overlap_comm": overlap, **values,
        }

    def plain_int(self, value: Any, key: str, default: int) -> int:
        path = f"zero_optimization.{key}"
        if _is_auto(value):
            raise self.fail(f"{path} is \"auto\", which neither DeepSpeed nor the HF integration fills in; give a "
                            f"number (DeepSpeed's default is {default:,})")
        result = self.integer(value, path, default)
        assert result is not None
        return result

    def hf_sized(self, value: Any, path: str, default: int, rule, rule_text: str, applies: bool,
                 minimum: int = 0) -> int:
        if not _is_auto(value):
            result = self.integer(value, path, default, minimum=minimum)
            assert result is not None
            return result
        if not applies:
            # HF leaves it "auto" outside ZeRO-3, where DeepSpeed does not use it.
            self.notes.append(f"{path} is \"auto\": unused below ZeRO-3 (HF fills it only for stage 3); "
                              f"DeepSpeed's default {default:,} recorded")
            return default
        if self.hidden_size is None:
            self.notes.append(f"{path} is \"auto\": the HF integration sets it to {rule_text}, but the model's "
                              f"hidden size is unknown here; assumed DeepSpeed's default {default:,}")
            return default
        result = rule(self.hidden_size)
        self.assume(path, result, f"HF integration: {rule_text}, hidden_size {self.hidden_size}")
        return result

    def offload_device(self, zero: Mapping[str, Any], key: str, known: frozenset[str],
                       deprecated: str) -> tuple[str, float]:
        path = f"zero_optimization.{key}"
        section = self.section(zero, key, path)
        self.check_keys(section, known, path)
        if self.boolean(zero.get(deprecated), f"zero_optimization.{deprecated}", False):
            # DeepSpeedZeroConfig: cpu_offload / cpu_offload_param are deprecated spellings of device "cpu".
            if section:
                raise self.fail(f"zero_optimization has both {deprecated} (deprecated) and {key}; keep {key}")
            self.notes.append(f"zero_optimization.{deprecated}: true is the deprecated form of {key}.device \"cpu\"")
            return "cpu", 1.0
        device_raw = section.get("device", "none")
        if _is_auto(device_raw):
            wanted = {"optimizer": ("optimizer", "both"), "params": ("params", "both")}
            kind = "optimizer" if key == "offload_optimizer" else "params"
            device = "cpu" if self.offload in wanted[kind] else "none"
            self.assume(f"{path}.device", device, "accelerate DeepSpeedPlugin offload device: --offload")
        elif not isinstance(device_raw, str) or device_raw.lower() not in OFFLOAD_DEVICES:
            raise self.fail(f"{path}.device is {device_raw!r}; use \"none\", \"cpu\" or \"nvme\"")
        else:
            device = device_raw.lower()
        if device == "nvme":
            self.notes.append(f"{path}.device is nvme: memcalc reports what leaves the GPU; NVMe swap buffers in CPU "
                              "RAM are not counted")
        ratio = self.number(section.get("ratio"), f"{path}.ratio", 1.0) if key == "offload_optimizer" else 1.0
        if ratio > 1.0:
            raise self.fail(f"{path}.ratio is {ratio}; it is a share between 0 and 1")
        return device, ratio

    def precision_sections(self, data: Mapping[str, Any], stage: int) -> dict[str, Any]:
        if "bf16" in data and "bfloat16" in data:
            raise self.fail("both \"bf16\" and its old name \"bfloat16\" are present; keep \"bf16\"")
        bf16_key = "bfloat16" if "bfloat16" in data else "bf16"  # precision_config.py, get_bfloat16_config
        bf16 = self.section(data, bf16_key, bf16_key)
        fp16 = self.section(data, "fp16", "fp16")
        self.check_keys(bf16, BF16_KEYS, bf16_key)
        self.check_keys(fp16, FP16_KEYS, "fp16")
        bf16_on = self.enabled(bf16.get("enabled"), f"{bf16_key}.enabled", "bf16")
        fp16_on = self.enabled(fp16.get("enabled"), "fp16.enabled", "fp16")
        if bf16_on and fp16_on:
            # deepspeed/runtime/config.py, _initialize_params asserts the same.
            raise self.fail("bf16.enabled and fp16.enabled are both true; DeepSpeed refuses that: enable one")
        bf16_master = self.boolean(bf16.get("bf16_master_weights_and_grads"),
                                   f"{bf16_key}.bf16_master_weights_and_grads", False)
        bf16_states = self.boolean(bf16.get("bf16_optimizer_states"), f"{bf16_key}.bf16_optimizer_states", False)
        fp16_master = self.boolean(fp16.get("fp16_master_weights_and_grads"), "fp16.fp16_master_weights_and_grads",
                                   False)
        # deepspeed/runtime/config.py, _do_error_check.
        for flag, on in (("bf16.bf16_master_weights_and_grads", bf16_master),
                         ("bf16.bf16_optimizer_states", bf16_states),
                         ("fp16.fp16_master_weights_and_grads", fp16_master)):
            if on and stage == 0:
                raise self.fail(f"{flag} needs ZeRO stage 1, 2 or 3 but the stage is 0: set zero_optimization.stage "
                                "or remove the flag")
        if bf16_states and not bf16_master:
            raise self.fail("bf16.bf16_optimizer_states needs bf16.bf16_master_weights_and_grads: true; set both or "
                            "neither")
        if (bf16_master or bf16_states) and not bf16_on:
            raise self.fail("bf16 master weights or optimizer states are set but bf16.enabled is not true; enable "
                            "bf16 or remove them")
        if fp16_master and not fp16_on:
            raise self.fail("fp16.fp16_master_weights_and_grads is set but fp16.enabled is not true; enable fp16 or "
                            "remove it")
        if fp16_master:
            self.notes.append("fp16.fp16_master_weights_and_grads: DeepSpeed allows it with its CPU Adam only; "
                              "the master copy is counted in fp16")

        autocast = self.section(data, "torch_autocast", "torch_autocast")
        autocast_dtype = None
        if self.boolean(autocast.get("enabled"), "torch_autocast.enabled", False):
            raw = autocast.get("dtype")
            if raw is None:
                autocast_dtype = "bf16"
                self.notes.append("torch_autocast.dtype not given: assumed bfloat16")
            elif isinstance(raw, str) and raw.lower() in AUTOCAST_DTYPES:
                autocast_dtype = AUTOCAST_DTYPES[raw.lower()]
            else:
                raise self.fail(f"torch_autocast.dtype is {raw!r}; use \"bfloat16\" or \"float16\"")
            if bf16_on or fp16_on:
                self.notes.append("torch_autocast together with bf16/fp16: memcalc counts the bf16/fp16 recipe; "
                                  "autocast's casts of already 16-bit weights add nothing")
                autocast_dtype = None
        return {"bf16": bf16_on, "fp16": fp16_on, "bf16_master_weights_and_grads": bf16_master,
                "bf16_optimizer_states": bf16_states, "fp16_master_weights_and_grads": fp16_master,
                "torch_autocast": autocast_dtype}

    def enabled(self, value: Any, path: str, which: str) -> bool:
        if not _is_auto(value):
            return self.boolean(value, path, False)
        # trainer_config_process: fill_match("bf16.enabled", args.bf16 or args.bf16_full_eval) (fp16 alike).
        if self.precision is None:
            self.assume(path, False, f"HF Trainer: args.{which}, default False; pass --precision to choose")
            return False
        result = self.precision.value in (which, f"{which}-pure")
        if self.precision.value == f"amp-{which}":
            result = True
        self.assume(path, result, f"HF Trainer: args.{which} from --precision {self.precision.value}")
        return result

    def batch(self, data: Mapping[str, Any]) -> dict[str, Any]:
        micro_raw = data.get("train_micro_batch_size_per_gpu")
        accumulation_raw = data.get("gradient_accumulation_steps")
        total_raw = data.get("train_batch_size")
        if _is_auto(accumulation_raw):
            accumulation = HF_DEFAULT_GRADIENT_ACCUMULATION_STEPS
            self.assume("gradient_accumulation_steps", accumulation,
                        "HF Trainer: args.gradient_accumulation_steps, default 1")
        else:
            accumulation = self.integer(accumulation_raw, "gradient_accumulation_steps", None, minimum=1)
        if _is_auto(micro_raw):
            if self.micro_batch_size is not None:
                micro = self.micro_batch_size
                rule = "HF Trainer: args.per_device_train_batch_size from --batch-size"
            else:
                from memcalc.spec import DEFAULT_MICRO_BATCH_SIZE

                micro = DEFAULT_MICRO_BATCH_SIZE
                rule = (f"memcalc's default; HF Trainer's per_device_train_batch_size default is "
                        f"{HF_DEFAULT_PER_DEVICE_TRAIN_BATCH_SIZE}: pass --batch-size")
            self.assume("train_micro_batch_size_per_gpu", micro, rule)
        else:
            micro = self.integer(micro_raw, "train_micro_batch_size_per_gpu", None, minimum=1)
        total_auto = _is_auto(total_raw)
        total = None if total_auto else self.integer(total_raw, "train_batch_size", None, minimum=1)

        world = self.num_gpus
        # deepspeed/runtime/config.py, DeepSpeedConfig._set_batch_related_parameters and _batch_assertion.
        if micro is not None and accumulation is not None and total is not None:
            if world is not None and total != micro * accumulation * world:
                raise self.fail(f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                                f"gradient_accumulation_steps {accumulation} x {world} GPUs; DeepSpeed refuses this: "
                                "fix one of them or --gpus")
        elif total is not None and micro is not None:
            if world is not None:
                accumulation = total // micro // world
                if accumulation < 1 or total != micro * accumulation * world:
                    raise self.fail(f"train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu "
                                    f"{micro} x {world} GPUs; fix one of them or --gpus")
                self.notes.append(f"gradient_accumulation_steps derived as train_batch_size / micro-batch / GPUs = "
                                  f"{accumulation} (DeepSpeed's rule)")
            else:
                self.notes.append("gradient_accumulation_steps not set: DeepSpeed derives it from train_batch_size / "
                                  "micro-batch / GPUs, and the number of GPUs is not known here; assumed 1")
        elif total is not None and accumulation is not None:
            if world is None:
                raise self.fail("train_micro_batch_size_per_gpu is missing and --gpus is not given; DeepSpeed "
                                "derives it as train_batch_size / GPUs / gradient_accumulation_steps: give either")
            micro = total // world // accumulation
            if micro < 1 or total != micro * accumulation * world:
                raise self.fail(f"train_batch_size {total} is not divisible by {world} GPUs x "
                                f"gradient_accumulation_steps {accumulation}; fix one of them or --gpus")
            self.notes.append(f"train_micro_batch_size_per_gpu derived as train_batch_size / GPUs / "
                              f"gradient_accumulation_steps = {micro} (DeepSpeed's rule)")
        elif total is not None:
            if world is None:
                raise self.fail("train_micro_batch_size_per_gpu is missing and --gpus is not given; DeepSpeed "
                                "derives it as train_batch_size / GPUs: give either")
            accumulation, micro = 1, total // world
            if micro < 1 or total != micro * world:
                raise self.fail(f"train_batch_size {total} is not divisible by {world} GPUs; fix it or --gpus")
            self.notes.append(f"train_micro_batch_size_per_gpu derived as train_batch_size / GPUs = {micro} "
                              "(DeepSpeed's rule)")
        elif micro is None:
            from memcalc.spec import DEFAULT_MICRO_BATCH_SIZE

            micro = self.micro_batch_size if self.micro_batch_size is not None else DEFAULT_MICRO_BATCH_SIZE
            self.notes.append(f"neither train_micro_batch_size_per_gpu nor train_batch_size is set (DeepSpeed needs "
                              f"one): assumed a micro-batch of {micro} from "
                              f"{'--batch-size' if self.micro_batch_size is not None else 'memcalc default'}")
        if accumulation is None:
            accumulation = DS_DEFAULT_GRADIENT_ACCUMULATION_STEPS
        if total_auto:
            # trainer_config_process: world_size * per_device_train_batch_size * gradient_accumulation_steps.
            if world is not None:
                total = world * micro * accumulation
                self.assume("train_batch_size", total, "HF Trainer: GPUs x micro-batch x accumulation")
            else:
                self.notes.append("train_batch_size is \"auto\": HF sets it to GPUs x micro-batch x accumulation; "
                                  "the number of GPUs is not known here")
        elif total is None and world is not None:
            total = micro * accumulation * world
        return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
                "train_batch_size": total}

    def optimizer(self, data: Mapping[str, Any]) -> tuple[str | None, tuple[tuple[str, Any], ...]]:
        section = self.section(data, "optimizer", "optimizer")
        if not section:
            self.notes.append("no \"optimizer\" section: the client brings it (HF Trainer creates its --optim, "
                              "AdamW by default); memcalc's --optim applies")
            return None, ()
        self.check_keys(section, OPTIMIZER_KEYS, "optimizer")
        kind = section.get("type")
        if not isinstance(kind, str) or not kind:
            raise self.fail("optimizer.type must name the optimizer, e.g. \"AdamW\"")
        params = self.section(section, "params", "optimizer.params")
        resolved: list[tuple[str, Any]] = []
        for key, value in params.items():
            if _is_auto(value):
                if key not in HF_OPTIMIZER_PARAM_DEFAULTS:
                    raise self.fail(f"optimizer.params.{key} is \"auto\", which the HF integration does not fill "
                                    "(it fills lr, betas, eps, weight_decay); give a value")
                value = HF_OPTIMIZER_PARAM_DEFAULTS[key]
                self.assume(f"optimizer.params.{key}", value, "HF TrainingArguments default")
            resolved.append((key, tuple(value) if isinstance(value, list) else value))
        mapped = _memcalc_optimizer(kind, dict(resolved))
        if mapped is None:
            self.notes.append(f"optimizer.type {kind!r} has no memcalc equivalent; memcalc's --optim applies")
        elif mapped[2]:
            self.notes.append(mapped[2])
        return kind, tuple(resolved)


def _memcalc_optimizer(kind: str, params: Mapping[str, Any]) -> tuple[OptimizerName, bool, str] | None:
    """(memcalc optimizer, amsgrad, note) for a DeepSpeed optimizer.type, or None.

    deepspeed/runtime/engine.py, DeepSpeedEngine._configure_basic_optimizer: adam/adamw/lamb/lion/adagrad (any case)
    are DeepSpeed's own; "Adam" runs AdamW unless params.adam_w_mode is false; any other name is looked up as
    torch.optim.<type>.
    """
    lower = kind.lower()
    amsgrad = bool(params.get("amsgrad", False))
    if lower == "adamw" or (lower == "adam" and params.get("adam_w_mode", True)):
        return OptimizerName.adamw, amsgrad, ""
    if lower == "adam":
        return OptimizerName.adam, amsgrad, ""
    if lower == "lion":
        return OptimizerName.lion, False, ""
    if lower == "lamb":
        return OptimizerName.adamw, False, ("optimizer.type Lamb: counted like AdamW (FusedLamb keeps exp_avg and "
                                            "exp_avg_sq per parameter)")
    if kind == "SGD":
        momentum = params.get("momentum", 0)
        return (OptimizerName.sgd_momentum if momentum else OptimizerName.sgd), False, ""
    return None


def spec_overrides(settings: DeepSpeedSettings) -> dict[str, Any]:
    """The TrainingSpec fields the config decides, as ``spec.replace(**overrides)`` takes them.

    Always zero_stage, precision and micro_batch_size; optimizer (and amsgrad) when the config names one memcalc
    knows; master_dtype / state_dtype for DeepSpeed's bf16/fp16 master-weight flags. Offload is not a TrainingSpec
    field today: read ``settings.offload``.
    """
    from memcalc.spec import TrainingSpec

    overrides: dict[str, Any] = {
        "zero_stage": settings.zero_stage,
        "precision": settings.precision,
        "micro_batch_size": settings.train_micro_batch_size_per_gpu,
    }
    if settings.bf16_master_weights_and_grads:
        # stage_1_and_2.py: the master partition is cloned in master_weights_and_grads_dtype (bf16 here).
        overrides["master_dtype"] = Dtype.bf16
    if settings.bf16_optimizer_states:
        overrides["state_dtype"] = Dtype.bf16
    if settings.fp16_master_weights_and_grads:
        overrides["master_dtype"] = Dtype.fp16
    if settings.optimizer_type is not None:
        mapped = _memcalc_optimizer(settings.optimizer_type, settings.optimizer_params_dict)
        if mapped is not None:
            overrides["optimizer"] = mapped[0]
            overrides["amsgrad"] = mapped[1]
    known = {f.name for f in dataclasses.fields(TrainingSpec)}
    return {key: value for key, value in overrides.items() if key in known}


# -- Writing ------------------------------------------------------------------------------------------------------

_EMIT_OFFLOAD = {"none": ("none", "none"), "optimizer": ("cpu", "none"), "params": ("none", "cpu"),
                 "both": ("cpu", "cpu")}


def emit_deepspeed_config(spec: TrainingSpec, hidden_size: int | None = None, *, offload: str | None = None,
                          gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """A DeepSpeed config (JSON-ready dict) for ``spec``: ZeRO stage, precision, micro-batch, optimizer, buckets.

    Bucket sizes are DeepSpeed's defaults, or with ``hidden_size`` the values HF's integration derives from it.
    ``offload`` (none | optimizer | params | both; CPU) defaults to ``spec.offload`` when TrainingSpec has one.
    Optimizers DeepSpeed cannot build from a config (Adafactor, 8-bit AdamW) get no "optimizer" section: the
    client (HF Trainer --optim) supplies them. Raises UsageError for recipes DeepSpeed has no switch for.
    """
    if offload is None:
        offload = spec.offload.value
    offload = getattr(offload, "value", offload)
    if offload not in _EMIT_OFFLOAD:
        raise UsageError(f"--offload {offload!r} is not one of none, optimizer, params, both")
    if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
        raise UsageError(f"gradient accumulation steps must be a whole number >= 1, got {gradient_accumulation_steps}")
    stage = spec.zero_stage
    optimizer_device, param_device = _EMIT_OFFLOAD[offload]
    if optimizer_device != "none" and stage == 0:
        raise UsageError("--offload needs --zero 1, 2 or 3")
    if param_device != "none" and stage != 3:
        raise UsageError("--offload params/both needs --zero 3 (DeepSpeed offloads parameters only at stage 3)")

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": spec.micro_batch_size * gradient_accumulation_steps * spec.num_gpus,
        "gradient_clipping": DS_DEFAULT_GRADIENT_CLIPPING,
    }
    config.update(_emit_precision(spec))
    optimizer = _emit_optimizer(spec)
    if optimizer is not None:
        config["optimizer"] = optimizer

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero["contiguous_gradients"] = DS_DEFAULT_CONTIGUOUS_GRADIENTS
        zero["overlap_comm"] = stage == 3  # DeepSpeed's own default (overlap_comm_valid)
        zero["reduce_bucket_size"] = (hf_reduce_bucket_size(hidden_size) if hidden_size
                                      else DS_DEFAULT_REDUCE_BUCKET_SIZE)
    if stage in (1, 2):
        zero["allgather_bucket_size"] = DS_DEFAULT_ALLGATHER_BUCKET_SIZE
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = (hf_stage3_prefetch_bucket_size(hidden_size) if hidden_size
                                               else DS_DEFAULT_PREFETCH_BUCKET_SIZE)
        zero["stage3_param_persistence_threshold"] = (hf_stage3_param_persistence_threshold(hidden_size)
                                                      if hidden_size else DS_DEFAULT_PARAM_PERSISTENCE_THRESHOLD)
        zero["stage3_max_live_parameters"] = DS_DEFAULT_MAX_LIVE_PARAMETERS
        zero["stage3_max_reuse_distance"] = DS_DEFAULT_MAX_REUSE_DISTANCE
        zero["sub_group_size"] = DS_DEFAULT_SUB_GROUP_SIZE
    if optimizer_device != "none":
        zero["offload_optimizer"] = {"device": optimizer_device, "pin_memory": True}
    if param_device != "none":
        zero["offload_param"] = {"device": param_device, "pin_memory": True}
    config["zero_optimization"] = zero
    return config


def _emit_precision(spec: TrainingSpec) -> dict[str, Any]:
    precision = PrecisionName(spec.precision)
    if spec.grad_dtype is not None:
        raise UsageError("--grad-dtype has no DeepSpeed switch: DeepSpeed keeps gradients in the weights' dtype")
    if precision in (PrecisionName.bf16_pure, PrecisionName.fp16_pure):
        raise UsageError(f"DeepSpeed has no '{precision.value}' recipe (it always keeps a master copy); use "
                         "--precision bf16 --master-dtype bf16 --state-dtype bf16 (bf16_master_weights_and_grads)")
    if precision in (PrecisionName.amp_bf16, PrecisionName.amp_fp16, PrecisionName.fp32):
        if spec.master_dtype is not None or spec.state_dtype is not None:
            raise UsageError("--master-dtype/--state-dtype have no DeepSpeed switch with this --precision")
        section: dict[str, Any] = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
        if precision != PrecisionName.fp32:
            section["torch_autocast"] = {"enabled": True,
                                         "dtype": "bfloat16" if precision == PrecisionName.amp_bf16 else "float16"}
        return section
    if precision == PrecisionName.fp16:
        if spec.master_dtype is not None or spec.state_dtype is not None:
            raise UsageError("--master-dtype/--state-dtype with --precision fp16 have no DeepSpeed switch "
                             "(fp16_master_weights_and_grads needs DeepSpeed's CPU Adam)")
        # loss_scale 0 = dynamic loss scaling (precision_config.py, DeepSpeedFP16Config).
        return {"bf16": {"enabled": False}, "fp16": {"enabled": True, "loss_scale": 0}}
    bf16: dict[str, Any] = {"enabled": True}
    master = Dtype(spec.master_dtype) if spec.master_dtype is not None else None
    state = Dtype(spec.state_dtype) if spec.state_dtype is not None else None
    if master not in (None, Dtype.fp32, Dtype.bf16) or state not in (None, Dtype.fp32, Dtype.bf16):
        raise UsageError("DeepSpeed's bf16 recipe keeps the master copy and optimizer states in fp32 or bf16")
    if master == Dtype.bf16 or state == Dtype.bf16:
        if spec.zero_stage == 0:
            raise UsageError("bf16 master weights/optimizer states need --zero 1, 2 or 3 in DeepSpeed")
        if state == Dtype.bf16 and master != Dtype.bf16:
            raise UsageError("DeepSpeed keeps bf16 optimizer states only with bf16 master weights: add "
                             "--master-dtype bf16")
        bf16["bf16_master_weights_and_grads"] = True
        if state == Dtype.bf16:
            bf16["bf16_optimizer_states"] = True
    return {"bf16": bf16, "fp16": {"enabled": False}}


def _emit_optimizer(spec: TrainingSpec) -> dict[str, Any] | None:
    name = OptimizerName(spec.optimizer)
    params: dict[str, Any] = {"lr": HF_DEFAULT_LEARNING_RATE, "weight_decay": HF_DEFAULT_WEIGHT_DECAY}
    if name in (OptimizerName.adamw, OptimizerName.adam):
        params.update({"betas": list(HF_DEFAULT_ADAM_BETAS), "eps": HF_DEFAULT_ADAM_EPSILON})
        kind = "AdamW" if name == OptimizerName.adamw else "Adam"
        if name == OptimizerName.adam:
            params["adam_w_mode"] = False  # DeepSpeed's "Adam" is AdamW unless told otherwise
        if spec.amsgrad:
            # FusedAdam has no amsgrad; torch_adam makes DeepSpeed build torch.optim.Adam(W) (engine.py).
            params.update({"torch_adam": True, "amsgrad": True})
        return {"type": kind, "params": params}
    if name == OptimizerName.lion:
        return {"type": "Lion", "params": {**params, "betas": [0.9, 0.99]}}
    if name in (OptimizerName.sgd, OptimizerName.sgd_momentum):
        return {"type": "SGD", "params": {**params, "momentum": 0.9 if name == OptimizerName.sgd_momentum else 0.0}}
    return None  # adafactor, adamw-8bit: no DeepSpeed config name; HF Trainer passes its own optimizer


# -- DeepSpeed's own estimators, reproduced ----------------------------------------------------------------------


def deepspeed_zero2_estimate(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                             cpu_offload: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """(cpu_bytes, gpu_bytes) exactly as deepspeed/runtime/zero/stage_1_and_2.py,
    estimate_zero2_model_states_mem_needs computes them (same defaults, same float operations, same int()).

    GPU: 2 B of 16-bit params per parameter, plus 18 B/param partitioned over all GPUs (DeepSpeed's comment:
    2 16-bit grads + 4 fp32 grads + 4 fp32 params + 8 Adam momentum and variance); with offload, 2 B only.
    CPU (per node): with offload total_params * max(4 * total_gpus, 16) * factor, else
    total_params * 4 * num_gpus_per_node * factor. The buffer factor applies to the CPU figure only.
    """
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                             num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                             zero_init: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """(cpu_bytes, gpu_bytes) exactly as deepspeed/runtime/zero/stage3.py, estimate_zero3_model_states_mem_needs
    computes them (DeepSpeed also returns largest_layer_memory = 4 * largest_layer_params as a third value).

    GPU: 4 B/param of the largest layer, plus 18 B/param partitioned over all GPUs (no offload), 2 B/param
    partitioned (optimizer offloaded), or nothing more (optimizer and params offloaded). CPU (per node), with
    gpus_factor = 1 / num_nodes: offload both: 18 B/param x gpus_factor, optimizer only: 16, each x factor (without
    zero_init the larger of that and 4 x num_gpus_per_node); no offload: the largest layer (zero_init) or the
    whole model at 4 B x num_gpus_per_node x factor. cpu_offload_params is ignored when cpu_offload is False, as
    in DeepSpeed.
    """
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        # Offloading the optimizer moves 16 B/param to the CPU; the 16-bit parameters too, 18 B/param.
        cpu_bytes_per_param = 18 if cpu_offload_params else 16
        gpu_mem = largest_layer_memory + (0 if cpu_offload_params else int(2 * total_params / total_gpus))
        if zero_init:
            cpu_mem = total_params * cpu_bytes_per_param * gpus_factor * additional_buffer_factor
        else:
            cpu_mem = (total_params * max(4 * num_gpus_per_node, cpu_bytes_per_param * gpus_factor)
                       * additional_buffer_factor)
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def _module_name(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else ""


def deepspeed_param_counts(tensors: Sequence[ParamTensor]) -> tuple[int, int]:
    """(total_params, largest_layer_params) as deepspeed/runtime/zero/stage3.py, model_to_params counts them on a
    live model: every parameter once, and the largest sum of one module's own parameters (parameters(recurse=False):
    an nn.Linear's weight and bias, an nn.Embedding, a norm), not a transformer block. memcalc's inventory names
    each tensor as named_parameters() does, so the module is the name without its last part. A tied LM head shares
    the embedding's weight, so its module's count equals the embedding's and the maximum is unchanged.
    """
    modules: dict[str, int] = {}
    for tensor in tensors:
        module = _module_name(tensor.name)
        modules[module] = modules.get(module, 0) + tensor.numel
    return sum(t.numel for t in tensors), max(modules.values(), default=0)


class ComparisonRow(NamedTuple):
    """One line of a compatibility view. tool_bytes is the other tool's figure (DeepSpeed's, accelerate's);
    None where one side has no such term."""

    term: str
    memcalc_bytes: int | None
    tool_bytes: int | None
    why: str


def _memcalc_term(report: Report, *names: str) -> int | None:
    found = [t.bytes for t in report.per_gpu.terms if t.name in names]
    return sum(found) if found else None


def compare_with_deepspeed(
    report: Report,
    *,
    num_nodes: int = 1,
    num_gpus_per_node: int | None = None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    largest_layer_params: int | None = None,
    total_params: int | None = None,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> list[ComparisonRow]:
    """memcalc's per-GPU terms next to DeepSpeed's estimate_zero2/3_model_states_mem_needs, term by term.

    DeepSpeed's estimators take a parameter count, not a config: ZeRO-1 and 2 use the ZeRO-2 one, ZeRO-3 the
    ZeRO-3 one (also given the largest layer: pass ``deepspeed_param_counts(tensors)[1]``). Its GPU figure is the
    sum of the per-term rows; the split follows the ZeRO-2 source comment (2 16-bit params + 18 / GPUs = 2 16-bit
    grads + 4 fp32 grads + 4 fp32 params + 8 Adam); the ZeRO-3 function has no comment, and its 18 B/param / GPUs
    (with 16 and 18 B/param on the CPU under offload) reads as 2 16-bit params + 4 + 4 + 8, with no 16-bit gradient
    shard. Rows are rounded one by one; the total rows are DeepSpeed's own int().
    """
    from memcalc.vocab import (
        TERM_ACTIVATIONS,
        TERM_GRADIENTS,
        TERM_LOSS_BUFFERS,
        TERM_MASTER,
        TERM_MASTER_GRAD_COPY,
        TERM_OPTIMIZER_STATES,
        TERM_WEIGHTS,
        TERM_ZERO3_FP32_GRADS,
        TERM_ZERO3_GATHERED,
        TERM_ZERO3_GATHERED_GRADS,
    )

    training = report.training
    stage = training.zero_stage
    if stage == 0:
        raise UsageError("--compare-with deepspeed compares ZeRO figures: add --zero 1, 2 or 3")
    num_gpus = training.num_gpus
    if num_nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {num_nodes}")
    if num_gpus_per_node is None:
        if num_gpus % num_nodes:
            raise UsageError(f"--gpus {num_gpus} is not divisible by --nodes {num_nodes}")
        num_gpus_per_node = num_gpus // num_nodes
    if num_gpus_per_node * num_nodes != num_gpus:
        raise UsageError(f"--gpus {num_gpus} != --nodes {num_nodes} x --gpus-per-node {num_gpus_per_node}")
    if offload_params and stage != 3:
        raise UsageError("offloading parameters needs --zero 3")
    P = report.model.num_params if total_params is None else total_params
    N = num_gpus
    notes_common = []
    if report.model.num_trainable_params != report.model.num_params:
        notes_common.append(f"DeepSpeed's estimator treats all {P:,} params as trained; memcalc trains "
                            f"{report.model.num_trainable_params:,}")
    recipe_mixed16 = training.weight_dtype in ("bf16", "fp16") and training.master_dtype == "fp32"
    if not recipe_mixed16:
        notes_common.append(f"DeepSpeed's estimator always assumes 16-bit weights with an fp32 master; memcalc's "
                            f"recipe here is {training.precision} ({training.weight_dtype} weights, master "
                            f"{training.master_dtype or 'none'})")
    common = ("; " + "; ".join(notes_common)) if notes_common else ""

    def share(bytes_per_param: int) -> int:
        return round(bytes_per_param * P / N)

    rows: list[ComparisonRow] = []
    if stage in (1, 2):
        cpu, gpu = deepspeed_zero2_estimate(P, num_gpus_per_node, num_nodes, offload_optimizer,
                                            additional_buffer_factor)
        source = "deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs"
        where = "on the CPU (offload_optimizer)" if offload_optimizer else None
        rows.append(ComparisonRow(
            "16-bit weights", _memcalc_term(report, TERM_WEIGHTS), 2 * P,
            "both hold every parameter's 16-bit copy on each GPU at ZeRO-1/2 (DeepSpeed: 2 B x all params)" + common))
        grads_why = ("DeepSpeed's ZeRO-2 formula partitions 16-bit gradients (2 B/param / GPUs); "
                     + ("ZeRO-1 does not partition them, so memcalc holds them whole"
                        if stage == 1 else "memcalc partitions the trainable params' gradients with DeepSpeed's "
                        "alignment padding"))
        ds_grads = 0 if where else share(2)
        if where:
            grads_why = ("with offload DeepSpeed counts no gradient bytes on the GPU (its formula keeps only the "
                         "16-bit params there); memcalc counts " + ("whole" if stage == 1 else "partitioned")
                         + " 16-bit gradients")
        rows.append(ComparisonRow("16-bit gradients", _memcalc_term(report, TERM_GRADIENTS), ds_grads,
                                  grads_why + common))
        rows.extend(_state_rows(report, share, where, TERM_MASTER_GRAD_COPY, TERM_MASTER, TERM_OPTIMIZER_STATES,
                                training.optimizer))
        ds_gathered = None
    else:
        if largest_layer_params is None:
            largest_layer_params = 0
            notes_common.append("largest layer unknown (no per-tensor inventory): DeepSpeed's 4 B x largest layer "
                                "term counted as 0")
            common = "; " + "; ".join(notes_common)
        L = largest_layer_params
        cpu, gpu = deepspeed_zero3_estimate(P, L, num_gpus_per_node, num_nodes, offload_optimizer, offload_params,
                                            zero_init, additional_buffer_factor)
        source = "deepspeed/runtime/zero/stage3.py estimate_zero3_model_states_mem_needs"
        params_off = offload_optimizer and offload_params
        if offload_params and not offload_optimizer:
            notes_common.append("DeepSpeed's formula ignores offload_params without offload_optimizer "
                                "(cpu_offload_params is read only under cpu_offload)")
            common = "; " + "; ".join(notes_common)
        where = "on the CPU (offload_optimizer)" if offload_optimizer else None
        rows.append(ComparisonRow(
            "16-bit weights (shard)", _memcalc_term(report, TERM_WEIGHTS), 0 if params_off else share(2),
            ("DeepSpeed offloads the 16-bit parameter shards to the CPU (offload_param) and counts none on the GPU"
             if params_off else "both shard the 16-bit weights over all GPUs (DeepSpeed: 2 B/param / GPUs; memcalc "
             "rounds each tensor up to a multiple of the GPU count)") + common))
        rows.append(ComparisonRow(
            "16-bit gradients (shard)", _memcalc_term(report, TERM_GRADIENTS), 0,
            "DeepSpeed's ZeRO-3 formula has no 16-bit gradient shard: its 18 B/param / GPUs is 2 16-bit params + "
            "4 fp32 grads + 4 fp32 params + 8 Adam (its offload variants move 16 and 18 B/param to the CPU, the "
            "same split); memcalc counts the rank's reduce-scattered 16-bit gradient shard, 2 B/param / GPUs" + common))
        rows.extend(_state_rows(report, share, where,
                                TERM_MASTER_GRAD_COPY if where else TERM_ZERO3_FP32_GRADS, TERM_MASTER,
                                TERM_OPTIMIZER_STATES, training.optimizer))
        ds_gathered = 4 * L
        rows.append(ComparisonRow(
            "gathered layer (params + grads)", _memcalc_term(report, TERM_ZERO3_GATHERED, TERM_ZERO3_GATHERED_GRADS),
            ds_gathered,
            f"DeepSpeed adds 4 B x the largest layer ({L:,} params), its largest single module's own parameters "
            "(model_to_params, recurse=False: usually the embedding or LM head); memcalc gathers the largest unit "
            "fetched at once (a whole transformer block, or a top-level tensor such as the embedding) and counts its "
            "16-bit params, and its grads during backward only"))

    rows.append(ComparisonRow(
        "activations", _memcalc_term(report, TERM_ACTIVATIONS, TERM_LOSS_BUFFERS), 0,
        "DeepSpeed's estimator covers model states only: no activations, logits or loss buffers"))
    matched = {TERM_WEIGHTS, TERM_GRADIENTS, TERM_MASTER_GRAD_COPY, TERM_MASTER, TERM_OPTIMIZER_STATES,
               TERM_ZERO3_GATHERED, TERM_ZERO3_GATHERED_GRADS, TERM_ZERO3_FP32_GRADS, TERM_ACTIVATIONS,
               TERM_LOSS_BUFFERS}
    others = [t for t in report.per_gpu.terms if t.name not in matched]
    if others:
        rows.append(ComparisonRow(
            "other working memory", sum(t.bytes for t in others), 0,
            f"not in DeepSpeed's estimator: {', '.join(t.name for t in others)}"))
    states_gpu = gpu - (ds_gathered or 0)
    rows.append(ComparisonRow(
        "GPU model states", report.per_gpu.model_states_bytes, states_gpu,
        "memcalc: weights + master + gradients + optimizer states; DeepSpeed: its formula without the gathered "
        "layer, which also counts the fp32 gradient partition memcalc treats as an optimizer-step temporary"))
    rows.append(ComparisonRow(
        "GPU total (memcalc: peak)", report.per_gpu.peak_bytes, gpu,
        f"{source}(total_params={P:,}, num_gpus_per_node={num_gpus_per_node}, num_nodes={num_nodes}, "
        f"offload optimizer={offload_optimizer}{f', params={offload_params}' if stage == 3 else ''}): model states "
        f"{'and the largest layer ' if stage == 3 else ''}all live at once, no activations or temporaries and no "
        "buffer factor; memcalc's peak is the largest phase of the step"))
    rows.append(ComparisonRow(
        "CPU RAM per node", None, cpu, _cpu_why(stage, offload_optimizer, offload_params, zero_init,
                                                additional_buffer_factor, num_gpus_per_node, num_nodes)))
    return rows


def _state_rows(report: Report, share, where: str | None, term_grad32: str, term_master: str, term_states: str,
                optimizer: str) -> list[ComparisonRow]:
    from memcalc.vocab import TERM_ZERO3_FP32_GRADS

    offloaded = (f"DeepSpeed counts it {where}, none on the GPU; " if where else "")
    adam = optimizer in ("adamw", "adam")
    return [
        ComparisonRow(
            "fp32 gradients", _memcalc_term(report, term_grad32), 0 if where else share(4),
            offloaded + ("both keep a persistent fp32 gradient buffer (stage3.py initialize_optimizer_states: "
                         "gradient_buffer, which memcalc sizes to the largest optimizer sub-group, at most "
                         "sub_group_size = 1e9 elements)" if term_grad32 == TERM_ZERO3_FP32_GRADS else
                         "DeepSpeed counts a persistent fp32 gradient partition (4 B/param / GPUs); memcalc counts "
                         "the fp32 cast of the rank's gradient partition as a temporary of the optimizer step "
                         "(stage_1_and_2.py step())")),
        ComparisonRow(
            "fp32 master weights", _memcalc_term(report, term_master), 0 if where else share(4),
            offloaded + "both: 4 B x params / GPUs for the fp32 master partition"),
        ComparisonRow(
            "optimizer states", _memcalc_term(report, term_states), 0 if where else share(8),
            offloaded + ("both: Adam exp_avg + exp_avg_sq, 8 B x params / GPUs" if adam else
                         f"DeepSpeed's 8 B/param assumes Adam; memcalc counts {optimizer}")),
    ]


def _cpu_why(stage: int, offload_optimizer: bool, offload_params: bool, zero_init: bool, factor: float,
             gpus_per_node: int, nodes: int) -> str:
    tail = f"; x {factor} buffer factor (CPU figure only); memcalc does not count CPU RAM here"
    if stage in (1, 2):
        if offload_optimizer:
            return ("DeepSpeed: params x max(4 B x all GPUs, 16 B) - 16 B = fp32 grads 4 + master 4 + Adam 8 held "
                    "in CPU RAM, or each GPU's process loading an fp32 copy (note: all GPUs, not per node)" + tail)
        return (f"DeepSpeed: params x 4 B x {gpus_per_node} GPUs per node, each process loading the fp32 model into "
                "CPU RAM before moving it to its GPU" + tail)
    per_node = f" / {nodes} nodes" if nodes > 1 else ""
    if offload_optimizer:
        size = 18 if offload_params else 16
        what = ("16-bit params 2 + fp32 grads 4 + master 4 + Adam 8" if offload_params
                else "fp32 grads 4 + master 4 + Adam 8")
        init = ("" if zero_init else f", or 4 B x {gpus_per_node} GPUs per node if larger (no zero.Init: each "
                "process loads the fp32 model)")
        return f"DeepSpeed: params x {size} B ({what}){per_node}{init}" + tail
    if zero_init:
        return (f"DeepSpeed: largest layer x 4 B x {gpus_per_node} GPUs per node (zero.Init builds the model layer "
                "by layer, partitioned)" + tail)
    return (f"DeepSpeed: params x 4 B x {gpus_per_node} GPUs per node (no zero.Init: each process loads the model)"
            + tail)


# -- accelerate estimate-memory ----------------------------------------------------------------------------------


def accelerate_training_usage(model_bytes: int, mixed_precision: str) -> dict[str, int]:
    """accelerate/commands/estimate.py, estimate_training_usage: component sizes for batch size 1.

    model_bytes is the fp32 size of the model (estimate-memory builds it with torch_dtype=torch.float32).
    "float32": model 1x, gradients 1x, optimizer 2x, step 4x; "float16"/"bfloat16": model 1x (fp32), gradients
    1.5x (fp32 + fp16 copy), optimizer 2x, step 2x; anything else (int8, int4): -1 ("N/A").
    """
    sizes = {"model": -1, "optimizer": -1, "gradients": -1, "step": -1}
    fp32_size = model_bytes
    fp16_size = model_bytes // 2
    if mixed_precision == "float32":
        sizes.update(model=fp32_size, gradients=fp32_size, optimizer=fp32_size * 2, step=fp32_size * 4)
    elif mixed_precision in ("float16", "bfloat16", "fp8"):  # fp8 without an MS-AMP config counts as 16-bit
        sizes.update(model=fp32_size, gradients=fp32_size + fp16_size, optimizer=fp32_size * 2)
        sizes["step"] = sizes["optimizer"]
    return sizes


def accelerate_training_figure(num_params: int, dtype: str = "float32") -> int:
    """The "Training using Adam" column of ``accelerate estimate-memory`` (accelerate/commands/estimate.py,
    estimate_command): max() of the components, not their sum. 16 B/param for float32 (4x the fp32 model),
    8 B/param for float16 (the optimizer states alone); -1 for int8/int4 ("N/A")."""
    return max(accelerate_training_usage(4 * num_params, dtype).values())


def accelerate_counted_params(tensors: Sequence[ParamTensor]) -> int:
    """The parameters ``accelerate estimate-memory`` counts: it builds AutoModel (the base model, no LM head) for a
    transformers model without a custom auto_map (estimate.py, create_empty_model). accelerate also counts buffers
    (calculate_maximum_sizes: rotary inv_freq, 512 B for Llama-3-8B); they are left out here."""
    from memcalc.model import ROLE_LM_HEAD

    return sum(t.numel for t in tensors if t.role != ROLE_LM_HEAD)


def compare_with_accelerate(report: Report, accelerate_params: int | None = None) -> list[ComparisonRow]:
    """memcalc next to ``accelerate estimate-memory``'s training figure (its "float32" row for fp32/autocast
    recipes, its "float16" row for 16-bit ones), component by component. accelerate_params: what it counts
    (``accelerate_counted_params(tensors)``); defaults to memcalc's parameter count."""
    from memcalc.vocab import (
        TERM_GRADIENTS,
        TERM_MASTER,
        TERM_MASTER_GRAD_COPY,
        TERM_OPTIMIZER_STATES,
        TERM_WEIGHTS,
    )

    training = report.training
    counted = report.model.num_params if accelerate_params is None else accelerate_params
    dtype = "float16" if training.weight_dtype in ("bf16", "fp16") else "float32"
    sizes = accelerate_training_usage(4 * counted, dtype)
    figure = max(sizes.values())
    scope = []
    if accelerate_params is not None and accelerate_params != report.model.num_params:
        scope.append(f"accelerate builds AutoModel (no LM head): {counted:,} of memcalc's "
                     f"{report.model.num_params:,} params")
    if training.num_gpus > 1:
        scope.append(f"accelerate assumes one device; memcalc's figures are per GPU of {training.num_gpus}"
                     f"{f' with ZeRO-{training.zero_stage}' if training.zero_stage else ''}")
    tail = ("; " + "; ".join(scope)) if scope else ""
    step_phase = next((p.bytes for p in report.per_gpu.phases if p.phase.value == "optimizer_step"), None)
    if dtype == "float32":
        rows = [
            ComparisonRow("model", _memcalc_term(report, TERM_WEIGHTS), sizes["model"],
                          "accelerate: fp32 model, 4 B/param" + tail),
            ComparisonRow("gradients", _memcalc_term(report, TERM_GRADIENTS), sizes["gradients"],
                          "accelerate: one fp32 gradient per param" + tail),
            ComparisonRow("optimizer", _memcalc_term(report, TERM_OPTIMIZER_STATES), sizes["optimizer"],
                          "accelerate: Adam's two fp32 states, 8 B/param" + tail),
            ComparisonRow("step", step_phase, sizes["step"],
                          "accelerate: 'step' = 4x the model (16 B/param); memcalc: the optimizer-step phase total"
                          + tail),
        ]
    else:
        rows = [
            ComparisonRow("model", _memcalc_term(report, TERM_WEIGHTS, TERM_MASTER), sizes["model"],
                          "accelerate: 4 B/param (fp32 weights; it names fp16 + fp32 copies but counts 4 B); memcalc: "
                          "16-bit weights + fp32 master" + tail),
            ComparisonRow("gradients", _memcalc_term(report, TERM_GRADIENTS, TERM_MASTER_GRAD_COPY),
                          sizes["gradients"],
                          "accelerate: 1.5x the fp32 model (fp32 + fp16 gradient, 6 B/param); memcalc: 16-bit "
                          "gradients + the fp32 copy of the optimizer step" + tail),
            ComparisonRow("optimizer", _memcalc_term(report, TERM_OPTIMIZER_STATES), sizes["optimizer"],
                          "accelerate: Adam's two fp32 states, 8 B/param" + tail),
            ComparisonRow("step", step_phase, sizes["step"],
                          "accelerate: 'step' = the optimizer size again; memcalc: the optimizer-step phase total"
                          + tail),
        ]
    rows.append(ComparisonRow(
        "training figure (memcalc: peak)", report.per_gpu.peak_bytes, figure,
        f"accelerate estimate-memory's 'Training using Adam' ({dtype} row) is the LARGEST of its components, not "
        "their sum, for batch size 1 and without activations; memcalc's peak sums what is alive in the largest "
        "phase" + tail))
    return rows
