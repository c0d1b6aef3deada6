"""DeepSpeed configs as data: read one (DeepSpeed's defaults, the Hugging Face integration's "auto" rules), map it
onto TrainingSpec fields, and emit one for a TrainingSpec. Standard library only: DeepSpeed is never imported.

- ``read_deepspeed_config`` / ``parse_deepspeed_config``: a JSON config -> ``DeepSpeedSettings``, absent keys at
  DeepSpeed's defaults (``deepspeed_defaults``), "auto" resolved as HF's integration does (each assumption in
  ``notes``), one-line ``ConfigError``s for unknown keys and contradictions.
- ``spec_fields``: every TrainingSpec field the config decides; ``disagreements``: where a caller's choices differ.
- ``emit_deepspeed_config``: a config for a TrainingSpec that ``read_deepspeed_config`` reads back to the same spec.

DeepSpeed rules were read from the deepspeed 0.19.8 wheel (file and class or function named next to each); the
"auto" rules from transformers 5.24 (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig) and
accelerate 1.15 (accelerate/utils/dataclasses.py, DeepSpeedPlugin).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memcalc import deepspeed_defaults as defaults
from memcalc.datafile import read_json, shown
from memcalc.errors import ConfigError, UsageError
from memcalc.optimizers import OptimImpl, OptimizerName
from memcalc.precision import Dtype, PrecisionName

if TYPE_CHECKING:
    from memcalc.spec import TrainingSpec, ZeroBuffers

DEEPSPEED_VERSION_READ = defaults.DEEPSPEED_VERSION_READ

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
# Attribute names of DeepSpeedConfig that configs write as sections (LLaMA-Factory's
# examples/deepspeed/ds_z3_fp8_config.json): DeepSpeedConfig._initialize_params builds self.comms_config from
# "comms_logger" (deepspeed/comm/config.py DeepSpeedCommsConfig) and self.monitor_config from "tensorboard", "wandb",
# "csv_monitor" and "comet" (deepspeed/monitor/config.py get_monitor_config); neither key is read, and neither the
# comms logger nor the monitors hold GPU memory. Accepted with a note instead of refused as a misspelling.
UNREAD_LOGGING_KEYS = {"comms_config": "comms_logger", "monitor_config": "tensorboard, wandb, csv_monitor or comet"}
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
# deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer.__init__: nccl_start_alignment_factor = 2, and
# it asserts allgather_bucket_size % nccl_start_alignment_factor == 0.
ALLGATHER_ALIGNMENT = 2

MAX_ELEMENTS = 10**15  # a sanity bound on element counts, far past any real bucket


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What a DeepSpeed config says, with DeepSpeed's defaults filled in and every "auto" resolved.

    Sizes are element counts, as DeepSpeed's config uses them. ``notes`` names every value memcalc assumed.
    allgather_bucket_size is checked but not kept: it sizes no memory (see memcalc.spec.ZeroBuffers).
    """

    source: str
    zero_stage: int = defaults.ZERO_STAGE
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
    offload_optimizer_ratio: float = defaults.OFFLOAD_RATIO
    reduce_bucket_size: int = defaults.REDUCE_BUCKET_SIZE
    stage3_max_live_parameters: int = defaults.MAX_LIVE_PARAMETERS
    stage3_max_reuse_distance: int = defaults.MAX_REUSE_DISTANCE
    stage3_prefetch_bucket_size: int = defaults.PREFETCH_BUCKET_SIZE
    stage3_param_persistence_threshold: int = defaults.PARAM_PERSISTENCE_THRESHOLD
    sub_group_size: int = defaults.SUB_GROUP_SIZE
    contiguous_gradients: bool = defaults.CONTIGUOUS_GRADIENTS
    overlap_comm: bool = False
    bf16: bool = False
    fp16: bool = False
    bf16_master_weights_and_grads: bool = False
    bf16_optimizer_states: bool = False
    fp16_master_weights_and_grads: bool = False
    torch_autocast: str | None = None  # "bf16" / "fp16" when torch_autocast.enabled
    train_micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = defaults.GRADIENT_ACCUMULATION_STEPS
    train_batch_size: int | None = None
    optimizer_type: str | None = None  # as written ("AdamW"); None: the client (e.g. HF Trainer) brings one
    optimizer_params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs, so the dataclass stays hashable
    gradient_clipping: float = defaults.GRADIENT_CLIPPING
    notes: tuple[str, ...] = ()

    @property
    def optimizer_params_dict(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in self.optimizer_params}

    @property
    def offload(self) -> str:
        """In memcalc's offload vocabulary: none | optimizer | params | both."""
        return _OFFLOAD_OF[(self.offload_optimizer != "none", self.offload_param != "none")]

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


# memcalc's offload -> (zero_optimization.offload_optimizer.device, offload_param.device), as memcalc writes them;
# read back by whether each device is other than "none" (an nvme device offloads too).
OFFLOAD_DEVICES = {"none": ("none", "none"), "optimizer": ("cpu", "none"), "params": ("none", "cpu"),
                   "both": ("cpu", "cpu")}
_OFFLOAD_OF = {(optimizer != "none", param != "none"): mode for mode, (optimizer, param) in OFFLOAD_DEVICES.items()}


# -- Reading ------------------------------------------------------------------------------------------------------


def read_deepspeed_config(
    path: str | os.PathLike[str],
    *,
    hidden_size: int | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    offload: str | None = None,
    num_gpus: int | None = None,
) -> DeepSpeedSettings:
    """Read a DeepSpeed JSON config file (bounded and one-line on error: ``memcalc.datafile.read_json``).

    The keyword arguments are what the caller knows, used only to fill "auto" as the HF integration does:
    hidden_size: the model's hidden size (HF sizes buckets by it); micro_batch_size and gradient_accumulation_steps:
    HF's per_device_train_batch_size and gradient_accumulation_steps; precision: a memcalc recipe name when one was
    chosen (HF: args.bf16 / args.fp16; None means TrainingArguments' default, both False); zero_stage / offload
    (none | optimizer | params | both): accelerate's DeepSpeedPlugin fills stage and offload devices; num_gpus: to
    check train_batch_size = micro-batch x accumulation x GPUs as DeepSpeed does.
    """
    if not os.fsdecode(path).strip():
        raise UsageError("the DeepSpeed config path is empty; give the JSON file (ds_config.json)")
    source = shown(os.fsdecode(path))
    try:
        # deepspeed/runtime/config.py loads with dict_raise_error_on_duplicate_keys as well.
        data = read_json(Path(path), what="DeepSpeed config", object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as error:
        raise ConfigError(f"{source}: key {error.args[0]!r} appears twice; keep one") from None
    return parse_deepspeed_config(
        data, source=source, hidden_size=hidden_size, micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, precision=precision, zero_stage=zero_stage,
        offload=offload, num_gpus=num_gpus,
    )


def parse_deepspeed_config(
    data: Any,
    *,
    source: str = "DeepSpeed config",
    hidden_size: int | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    precision: str | None = None,
    zero_stage: int | None = None,
    offload: str | None = None,
    num_gpus: int | None = None,
) -> DeepSpeedSettings:
    """The same as ``read_deepspeed_config`` for a config already loaded (a dict, as HF Trainer also accepts)."""
    known = _Known(hidden_size, micro_batch_size, gradient_accumulation_steps,
                   PrecisionName(precision) if precision is not None else None, zero_stage, offload, num_gpus)
    return _Parser(source, known).parse(data)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _suggest(key: str, known: frozenset[str]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class _Known:
    """What the caller knows about the run, for "auto" values (see read_deepspeed_config)."""

    hidden_size: int | None
    micro_batch_size: int | None
    gradient_accumulation_steps: int | None
    precision: PrecisionName | None
    zero_stage: int | None
    offload: str | None
    num_gpus: int | None


class _Parser:
    def __init__(self, source: str, known: _Known) -> None:
        self.source = source
        self.known = known
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
                raise self.fail(f"unknown key {path}.{shown(key)}{_suggest(key, known)}; DeepSpeed "
                                f"{DEEPSPEED_VERSION_READ} rejects it: fix the spelling or remove it")

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        raise self.fail(f"{path} must be true or false, got {shown(repr(value))}")

    def integer(self, value: Any, path: str, default: int | None, minimum: int = 0) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())
        ):
            raise self.fail(f"{path} must be a whole number, got {shown(repr(value))}")
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
            raise self.fail(f"{path} must be a number, got {shown(repr(value))}")
        if value < 0:
            raise self.fail(f"{path} is negative ({value}); give 0 or more")
        return float(value)

    # -- the config ----------------------------------------------------------------------------------------------
    def parse(self, data: Any) -> DeepSpeedSettings:
        if not isinstance(data, dict):
            raise self.fail(f"a DeepSpeed config is a JSON object {{...}}, got {type(data).__name__}")
        self.top_level_keys(data)
        zero = self.zero_section(data)
        precision = self.precision_sections(data, zero["zero_stage"])
        batch = self.batch(data)
        optimizer_type, optimizer_params = self.optimizer(data)
        return DeepSpeedSettings(
            source=self.source, **zero, **precision, **batch, optimizer_type=optimizer_type,
            optimizer_params=optimizer_params, gradient_clipping=self.clipping(data), notes=tuple(self.notes),
        )

    def top_level_keys(self, data: Mapping[str, Any]) -> None:
        for key in data:
            if key in UNREAD_LOGGING_KEYS:
                self.notes.append(f"{key}: ignored (DeepSpeed does not read it, its sections are "
                                  f"{UNREAD_LOGGING_KEYS[key]}; logging holds no GPU memory memcalc counts)")
                continue
            if key not in TOP_LEVEL_KEYS and key not in REMOVED_TOP_LEVEL_KEYS:
                raise self.fail(f"unknown top-level key {shown(repr(key))}{_suggest(key, TOP_LEVEL_KEYS)}; DeepSpeed "
                                "would silently ignore it: fix the spelling or remove it")
        for key in sorted(REMOVED_TOP_LEVEL_KEYS & data.keys()):
            if key == "amp" and isinstance(data[key], dict) and data[key].get("enabled") is True:
                raise self.fail("amp.enabled is true: Apex AMP is removed from DeepSpeed and not modelled; use "
                                "\"bf16\" or \"fp16\" instead")
            self.notes.append(f"{key}: ignored (it does not change the memory memcalc counts; DeepSpeed "
                              f"{DEEPSPEED_VERSION_READ} removed it and rejects the key)")

    def clipping(self, data: Mapping[str, Any]) -> float:
        raw = data.get("gradient_clipping")
        if not _is_auto(raw):
            return self.number(raw, "gradient_clipping", defaults.GRADIENT_CLIPPING)
        self.assume("gradient_clipping", HF_DEFAULT_MAX_GRAD_NORM, "HF Trainer: args.max_grad_norm, default 1.0")
        return HF_DEFAULT_MAX_GRAD_NORM

    # -- zero_optimization ---------------------------------------------------------------------------------------
    def zero_section(self, data: Mapping[str, Any]) -> dict[str, Any]:
        zero = self.zero_dict(data)
        stage = self.stage(zero.get("stage"))
        offload = self.offloads(zero, stage)
        sizes = self.sizes(zero, stage)
        contiguous = self.boolean(zero.get("contiguous_gradients"), "zero_optimization.contiguous_gradients",
                                  defaults.CONTIGUOUS_GRADIENTS)
        overlap = self.boolean(zero.get("overlap_comm"), "zero_optimization.overlap_comm",
                               defaults.overlap_comm(stage))
        return {"zero_stage": stage, **offload, **sizes, "contiguous_gradients": contiguous, "overlap_comm": overlap}

    def zero_dict(self, data: Mapping[str, Any]) -> dict[str, Any]:
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
        for name in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters",
                     "max_reuse_distance"):
            if name in zero and f"stage3_{name}" in zero:
                raise self.fail(f"zero_optimization has both {name} and stage3_{name}, the same setting; keep one")
        return zero

    def stage(self, raw: Any) -> int:
        if _is_auto(raw):
            if self.known.zero_stage is None:
                raise self.fail("zero_optimization.stage is \"auto\" (accelerate fills it from its own config); "
                                "give the ZeRO stage (0-3) or a number in the file")
            self.assume("zero_optimization.stage", self.known.zero_stage, "accelerate DeepSpeedPlugin zero_stage")
            return self.known.zero_stage
        stage = self.integer(raw, "zero_optimization.stage", defaults.ZERO_STAGE)
        assert stage is not None
        if stage > 3:
            raise self.fail(f"zero_optimization.stage is {stage}; DeepSpeed has stages 0, 1, 2 and 3")
        return stage

    def offloads(self, zero: Mapping[str, Any], stage: int) -> dict[str, Any]:
        optimizer, ratio = self.offload_device(zero, "offload_optimizer", OFFLOAD_OPTIMIZER_KEYS, "cpu_offload")
        param, _ = self.offload_device(zero, "offload_param", OFFLOAD_PARAM_KEYS, "cpu_offload_param")
        if optimizer != "none" and stage == 0:
            raise self.fail(f"zero_optimization.offload_optimizer (device {optimizer}) needs ZeRO stage 1, 2 or 3 but "
                            "the stage is 0: set zero_optimization.stage or remove offload_optimizer")
        if param != "none" and stage != 3:
            raise self.fail(f"zero_optimization.offload_param (device {param}) only works with ZeRO stage 3 but the "
                            f"stage is {stage}: set zero_optimization.stage to 3 or remove offload_param")
        if ratio < 1.0 and stage != 3:
            # deepspeed/runtime/zero/config.py, offload_ratio_check.
            raise self.fail(f"zero_optimization.offload_optimizer.ratio is {ratio}; partial offload needs ZeRO "
                            "stage 3: set the ratio to 1.0 or the stage to 3")
        if ratio < 1.0:
            self.notes.append(f"offload_optimizer.ratio {ratio}: only that share of the optimizer states is "
                              "offloaded; memcalc treats the offload as whole")
        return {"offload_optimizer": optimizer, "offload_param": param, "offload_optimizer_ratio": ratio}

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
            return "cpu", defaults.OFFLOAD_RATIO
        device = self.device(section.get("device", "none"), key, path)
        ratio = (self.number(section.get("ratio"), f"{path}.ratio", defaults.OFFLOAD_RATIO)
                 if key == "offload_optimizer" else defaults.OFFLOAD_RATIO)
        if ratio > 1.0:
            raise self.fail(f"{path}.ratio is {ratio}; it is a share between 0 and 1")
        return device, ratio

    def device(self, raw: Any, key: str, path: str) -> str:
        if _is_auto(raw):
            wanted = ("optimizer", "both") if key == "offload_optimizer" else ("params", "both")
            device = "cpu" if self.known.offload in wanted else "none"
            self.assume(f"{path}.device", device, "accelerate DeepSpeedPlugin offload device")
            return device
        if not isinstance(raw, str) or raw.lower() not in defaults.OFFLOAD_DEVICES:
            raise self.fail(f"{path}.device is {shown(repr(raw))}; use \"none\", \"cpu\" or \"nvme\"")
        if raw.lower() == "nvme":
            self.notes.append(f"{path}.device is nvme: memcalc reports what leaves the GPU; NVMe swap buffers in CPU "
                              "RAM are not counted")
        return raw.lower()

    def sizes(self, zero: Mapping[str, Any], stage: int) -> dict[str, int]:
        """Bucket sizes and thresholds. "auto" follows HF's trainer_config_finalize, which fills the stage3_* ones
        only for ZeRO-3."""

        def get(key: str) -> Any:  # field name or its stage3_ alias
            return zero.get(key, zero.get(key.removeprefix("stage3_")))

        self.allgather_bucket(zero.get("allgather_bucket_size"), stage)
        return {
            "reduce_bucket_size": self.hf_sized(
                get("reduce_bucket_size"), "zero_optimization.reduce_bucket_size", defaults.REDUCE_BUCKET_SIZE,
                hf_reduce_bucket_size, "hidden_size * hidden_size", applies=True, minimum=1),  # Field(..., gt=0)
            "stage3_prefetch_bucket_size": self.hf_sized(
                get("stage3_prefetch_bucket_size"), "zero_optimization.stage3_prefetch_bucket_size",
                defaults.PREFETCH_BUCKET_SIZE, hf_stage3_prefetch_bucket_size, "int(0.9 * hidden_size * hidden_size)",
                applies=stage == 3),
            "stage3_param_persistence_threshold": self.hf_sized(
                get("stage3_param_persistence_threshold"), "zero_optimization.stage3_param_persistence_threshold",
                defaults.PARAM_PERSISTENCE_THRESHOLD, hf_stage3_param_persistence_threshold, "10 * hidden_size",
                applies=stage == 3),
            "stage3_max_live_parameters": self.plain_int(get("stage3_max_live_parameters"),
                                                         "stage3_max_live_parameters", defaults.MAX_LIVE_PARAMETERS),
            "stage3_max_reuse_distance": self.plain_int(get("stage3_max_reuse_distance"), "stage3_max_reuse_distance",
                                                        defaults.MAX_REUSE_DISTANCE),
            "sub_group_size": self.plain_int(zero.get("sub_group_size"), "sub_group_size", defaults.SUB_GROUP_SIZE),
        }

    def allgather_bucket(self, raw: Any, stage: int) -> None:
        """Checked as DeepSpeed checks it, then dropped: it sizes no memory (memcalc.spec.ZeroBuffers says why)."""
        size = self.plain_int(raw, "allgather_bucket_size", defaults.ALLGATHER_BUCKET_SIZE)
        if stage in (1, 2) and size % ALLGATHER_ALIGNMENT:
            raise self.fail(f"zero_optimization.allgather_bucket_size is {size:,}; DeepSpeed's ZeRO-1/2 asserts it "
                            f"is a multiple of {ALLGATHER_ALIGNMENT}: make it even")
        if raw is not None:
            self.notes.append("zero_optimization.allgather_bucket_size: allocates no memory (DeepSpeed all-gathers "
                              "the updated weights into their own 16-bit buffer), so it changes no figure")

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
        hidden = self.known.hidden_size
        if hidden is None:
            self.notes.append(f"{path} is \"auto\": the HF integration sets it to {rule_text}, but the model's "
                              f"hidden size is unknown here; assumed DeepSpeed's default {default:,}")
            return default
        result = rule(hidden)
        self.assume(path, result, f"HF integration: {rule_text}, hidden_size {hidden}")
        return result

    # -- bf16 / fp16 / torch_autocast ----------------------------------------------------------------------------
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
        masters = self.master_flags(bf16, fp16, bf16_key, stage, bf16_on, fp16_on)
        autocast = self.autocast(data, bf16_on or fp16_on)
        return {"bf16": bf16_on, "fp16": fp16_on, **masters, "torch_autocast": autocast}

    def master_flags(self, bf16: Mapping[str, Any], fp16: Mapping[str, Any], bf16_key: str, stage: int,
                     bf16_on: bool, fp16_on: bool) -> dict[str, bool]:
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
        return {"bf16_master_weights_and_grads": bf16_master, "bf16_optimizer_states": bf16_states,
                "fp16_master_weights_and_grads": fp16_master}

    def autocast(self, data: Mapping[str, Any], sixteen_bit: bool) -> str | None:
        autocast = self.section(data, "torch_autocast", "torch_autocast")
        if not self.boolean(autocast.get("enabled"), "torch_autocast.enabled", False):
            return None
        raw = autocast.get("dtype")
        if raw is None:
            dtype = "bf16"
            self.notes.append("torch_autocast.dtype not given: assumed bfloat16")
        elif isinstance(raw, str) and raw.lower() in AUTOCAST_DTYPES:
            dtype = AUTOCAST_DTYPES[raw.lower()]
        else:
            raise self.fail(f"torch_autocast.dtype is {shown(repr(raw))}; use \"bfloat16\" or \"float16\"")
        if sixteen_bit:
            self.notes.append("torch_autocast together with bf16/fp16: memcalc counts the bf16/fp16 recipe; "
                              "autocast's casts of already 16-bit weights add nothing")
            return None
        return dtype

    def enabled(self, value: Any, path: str, which: str) -> bool:
        if not _is_auto(value):
            return self.boolean(value, path, False)
        # trainer_config_process: fill_match("bf16.enabled", args.bf16 or args.bf16_full_eval) (fp16 alike).
        precision = self.known.precision
        if precision is None:
            self.assume(path, False, f"HF Trainer: args.{which}, default False; choose a precision to change it")
            return False
        result = precision.value in (which, f"{which}-pure", f"amp-{which}")
        self.assume(path, result, f"HF Trainer: args.{which} from precision {precision.value}")
        return result

    # -- batch sizes ---------------------------------------------------------------------------------------------
    def batch(self, data: Mapping[str, Any]) -> dict[str, Any]:
        accumulation = self.accumulation(data.get("gradient_accumulation_steps"))
        micro = self.micro_batch(data.get("train_micro_batch_size_per_gpu"))
        total_raw = data.get("train_batch_size")
        total = None if _is_auto(total_raw) else self.integer(total_raw, "train_batch_size", None, minimum=1)
        micro, accumulation, total = self.derive_batch(micro, accumulation, total)
        world = self.known.num_gpus
        if _is_auto(total_raw):
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

    def accumulation(self, raw: Any) -> int | None:
        if not _is_auto(raw):
            return self.integer(raw, "gradient_accumulation_steps", None, minimum=1)
        known = self.known.gradient_accumulation_steps
        value = known if known is not None else HF_DEFAULT_GRADIENT_ACCUMULATION_STEPS
        self.assume("gradient_accumulation_steps", value, "HF Trainer: args.gradient_accumulation_steps"
                    + (" from the run's gradient accumulation" if known is not None else ", default 1"))
        return value

    def micro_batch(self, raw: Any) -> int | None:
        if not _is_auto(raw):
            return self.integer(raw, "train_micro_batch_size_per_gpu", None, minimum=1)
        if self.known.micro_batch_size is not None:
            micro = self.known.micro_batch_size
            rule = "HF Trainer: args.per_device_train_batch_size from the run's micro-batch"
        else:
            from memcalc.spec import DEFAULT_MICRO_BATCH_SIZE

            micro = DEFAULT_MICRO_BATCH_SIZE
            rule = (f"memcalc's default; HF Trainer's per_device_train_batch_size default is "
                    f"{HF_DEFAULT_PER_DEVICE_TRAIN_BATCH_SIZE}: give the micro-batch size")
        self.assume("train_micro_batch_size_per_gpu", micro, rule)
        return micro

    def derive_batch(self, micro: int | None, accumulation: int | None,
                     total: int | None) -> tuple[int, int, int | None]:
        """deepspeed/runtime/config.py, DeepSpeedConfig._set_batch_related_parameters and _batch_assertion."""
        world = self.known.num_gpus
        if total is not None and micro is not None and accumulation is not None:
            if world is not None and total != micro * accumulation * world:
                raise self.fail(f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                                f"gradient_accumulation_steps {accumulation} x {world} GPUs; DeepSpeed refuses this: "
                                "fix one of them or the number of GPUs")
        elif total is not None and micro is not None:
            accumulation = self.derived_accumulation(total, micro)
        elif total is not None:
            micro = self.derived_micro(total, accumulation)
            accumulation = accumulation or defaults.GRADIENT_ACCUMULATION_STEPS
        elif micro is None:
            from memcalc.spec import DEFAULT_MICRO_BATCH_SIZE

            given = self.known.micro_batch_size is not None
            micro = self.known.micro_batch_size if given else DEFAULT_MICRO_BATCH_SIZE
            self.notes.append(f"neither train_micro_batch_size_per_gpu nor train_batch_size is set (DeepSpeed needs "
                              f"one): assumed a micro-batch of {micro} from "
                              f"{'the run' if given else 'memcalc default'}")
        return micro, accumulation or defaults.GRADIENT_ACCUMULATION_STEPS, total

    def derived_accumulation(self, total: int, micro: int) -> int:
        world = self.known.num_gpus
        if world is None:
            self.notes.append("gradient_accumulation_steps not set: DeepSpeed derives it from train_batch_size / "
                              "micro-batch / GPUs, and the number of GPUs is not known here; assumed 1")
            return defaults.GRADIENT_ACCUMULATION_STEPS
        accumulation = total // micro // world
        if accumulation < 1 or total != micro * accumulation * world:
            raise self.fail(f"train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu "
                            f"{micro} x {world} GPUs; fix one of them or the number of GPUs")
        self.notes.append(f"gradient_accumulation_steps derived as train_batch_size / micro-batch / GPUs = "
                          f"{accumulation} (DeepSpeed's rule)")
        return accumulation

    def derived_micro(self, total: int, accumulation: int | None) -> int:
        world = self.known.num_gpus
        steps = accumulation or defaults.GRADIENT_ACCUMULATION_STEPS
        rule = "train_batch_size / GPUs" + (" / gradient_accumulation_steps" if accumulation else "")
        if world is None:
            raise self.fail(f"train_micro_batch_size_per_gpu is missing and the number of GPUs is not given; "
                            f"DeepSpeed derives it as {rule}: give either")
        micro = total // world // steps
        if micro < 1 or total != micro * steps * world:
            raise self.fail(f"train_batch_size {total} is not divisible by {world} GPUs"
                            + (f" x gradient_accumulation_steps {accumulation}" if accumulation else "")
                            + "; fix one of them or the number of GPUs")
        self.notes.append(f"train_micro_batch_size_per_gpu derived as {rule} = {micro} (DeepSpeed's rule)")
        return micro

    # -- optimizer -----------------------------------------------------------------------------------------------
    def optimizer(self, data: Mapping[str, Any]) -> tuple[str | None, tuple[tuple[str, Any], ...]]:
        section = self.section(data, "optimizer", "optimizer")
        if not section:
            self.notes.append("no \"optimizer\" section: the client brings it (HF Trainer creates its --optim, "
                              "AdamW by default); the run's optimizer applies")
            return None, ()
        self.check_keys(section, OPTIMIZER_KEYS, "optimizer")
        kind = section.get("type")
        if not isinstance(kind, str) or not kind:
            raise self.fail("optimizer.type must name the optimizer, e.g. \"AdamW\"")
        resolved = self.optimizer_params(self.section(section, "params", "optimizer.params"))
        mapped = _memcalc_optimizer(kind, dict(resolved))
        if mapped is None:
            self.notes.append(f"optimizer.type {shown(repr(kind))} has no memcalc equivalent; the run's optimizer "
                              "applies")
        elif mapped[2]:
            self.notes.append(mapped[2])
        return kind, resolved

    def optimizer_params(self, params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        resolved: list[tuple[str, Any]] = []
        for key, value in params.items():
            if _is_auto(value):
                if key not in HF_OPTIMIZER_PARAM_DEFAULTS:
                    raise self.fail(f"optimizer.params.{shown(key)} is \"auto\", which the HF integration does not "
                                    "fill (it fills lr, betas, eps, weight_decay); give a value")
                value = HF_OPTIMIZER_PARAM_DEFAULTS[key]
                self.assume(f"optimizer.params.{key}", value, "HF TrainingArguments default")
            resolved.append((key, tuple(value) if isinstance(value, list) else value))
        return tuple(resolved)


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


# -- Settings -> TrainingSpec fields --------------------------------------------------------------------------


def zero_buffers(settings: DeepSpeedSettings) -> ZeroBuffers:
    """The ZeRO buffer sizes the engine reads (memcalc.parallel), from the config."""
    from memcalc.spec import ZeroBuffers

    return ZeroBuffers(
        reduce_bucket_size=settings.reduce_bucket_size,
        stage3_prefetch_bucket_size=settings.stage3_prefetch_bucket_size,
        stage3_max_live_parameters=settings.stage3_max_live_parameters,
        stage3_param_persistence_threshold=settings.stage3_param_persistence_threshold,
        stage3_max_reuse_distance=settings.stage3_max_reuse_distance,
        sub_group_size=settings.sub_group_size,
        contiguous_gradients=settings.contiguous_gradients,
        overlap_comm=settings.overlap_comm,
    )


def _master_dtypes(settings: DeepSpeedSettings) -> tuple[Dtype | None, Dtype | None]:
    """(master_dtype, state_dtype): None is the recipe's own (fp32 with bf16/fp16, none without a master)."""
    if settings.fp16_master_weights_and_grads:
        return Dtype.fp16, None
    if settings.bf16_master_weights_and_grads:
        # stage_1_and_2.py / stage3.py: the master partition is held in master_weights_and_grads_dtype (bf16).
        return Dtype.bf16, Dtype.bf16 if settings.bf16_optimizer_states else None
    return None, None


def spec_fields(settings: DeepSpeedSettings) -> dict[str, Any]:
    """Every TrainingSpec field the config decides, as ``TrainingSpec(**fields)`` / ``spec.replace(**fields)`` take
    them. The optimizer (and amsgrad) only when the config names one memcalc knows; otherwise the client brings it
    (HF Trainer's own optimizer) and the caller's choice stands."""
    from memcalc.spec import Offload, Sharding

    master, state = _master_dtypes(settings)
    fields: dict[str, Any] = {
        "zero_stage": settings.zero_stage,
        "precision": settings.precision,
        "master_dtype": master,
        "state_dtype": state,
        "micro_batch_size": settings.train_micro_batch_size_per_gpu,
        "grad_accum": settings.gradient_accumulation_steps,
        "offload": Offload(settings.offload),
        "sharding": Sharding.deepspeed,
        "zero_buffers": zero_buffers(settings),
    }
    kind = settings.optimizer_type
    params = settings.optimizer_params_dict
    mapped = _memcalc_optimizer(kind, params) if kind is not None else None
    if mapped is not None:
        fields["optimizer"], fields["amsgrad"] = mapped[0], mapped[1]
        fields["optim_impl"] = _optimizer_impl(mapped[0], params)
    return fields


def _optimizer_impl(optimizer: OptimizerName, params: Mapping[str, Any]) -> OptimImpl:
    """How DeepSpeed steps the optimizer it builds (runtime/engine.py): Adam/AdamW as FusedAdam (one CUDA kernel,
    in place: no step temporaries, memcalc's fused) unless params.torch_adam builds torch.optim.Adam(W) with
    params.foreach; Lion as FusedLion; SGD is torch.optim.SGD (foreach, torch's CUDA default)."""
    if optimizer in (OptimizerName.adamw, OptimizerName.adam) and params.get("torch_adam", False):
        return OptimImpl.forloop if params.get("foreach") is False else OptimImpl.foreach
    if optimizer in (OptimizerName.adamw, OptimizerName.adam, OptimizerName.lion):
        return OptimImpl.fused
    return OptimImpl.foreach


def disagreements(config_fields: Mapping[str, Any], chosen: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, chosen value, config's value) for each field the caller chose that the config sets otherwise.

    ``chosen`` holds only what was chosen on purpose; a list (several ZeRO stages to compare) agrees only when it is
    the config's single value.
    """
    found = []
    for name, mine in chosen.items():
        if name not in config_fields:
            continue
        theirs = config_fields[name]
        if isinstance(mine, (list, tuple)):
            agree = list(mine) == [theirs]
        else:
            agree = getattr(mine, "value", mine) == getattr(theirs, "value", theirs)
        if not agree:
            found.append((name, mine, theirs))
    return found


# -- Writing ------------------------------------------------------------------------------------------------------



def emit_deepspeed_config(spec: TrainingSpec, hidden_size: int | None = None) -> dict[str, Any]:
    """A DeepSpeed config (JSON-ready dict) for ``spec``: ZeRO stage, offload (CPU), precision, micro-batch,
    gradient accumulation, optimizer, buckets.

    Bucket sizes are ``emitted_buffers``: with ``hidden_size``, those left at DeepSpeed's defaults are the values HF's
    integration fills "auto" with for that hidden size (api.deepspeed_config estimates the run with them).
    Optimizers DeepSpeed cannot build from a config (Adafactor, 8-bit AdamW) get no "optimizer" section: the
    client (HF Trainer --optim) supplies them. Raises UsageError for recipes DeepSpeed has no switch for.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * spec.num_gpus,
        "gradient_clipping": defaults.GRADIENT_CLIPPING,
    }
    config.update(_emit_precision(spec))
    optimizer = _emit_optimizer(spec)
    if optimizer is not None:
        config["optimizer"] = optimizer
    config["zero_optimization"] = _emit_zero(spec, hidden_size)
    return config


def emitted_buffers(spec: TrainingSpec, hidden_size: int | None) -> ZeroBuffers:
    """The ZeRO buffers an emitted config writes: the spec's, except, with ``hidden_size``, those at DeepSpeed's
    defaults (no --deepspeed config set them), which become what HF's trainer_config_finalize fills "auto" with."""
    import dataclasses

    from memcalc.spec import ZeroBuffers

    buffers = spec.zero_buffers
    if not hidden_size:
        return buffers
    plain = ZeroBuffers()
    changes: dict[str, int] = {}
    if buffers.reduce_bucket_size == plain.reduce_bucket_size:
        changes["reduce_bucket_size"] = hf_reduce_bucket_size(hidden_size)
    if spec.zero_stage == 3:
        if buffers.stage3_prefetch_bucket_size == plain.stage3_prefetch_bucket_size:
            changes["stage3_prefetch_bucket_size"] = hf_stage3_prefetch_bucket_size(hidden_size)
        if buffers.stage3_param_persistence_threshold == plain.stage3_param_persistence_threshold:
            changes["stage3_param_persistence_threshold"] = hf_stage3_param_persistence_threshold(hidden_size)
    return dataclasses.replace(buffers, **changes)


def _emit_zero(spec: TrainingSpec, hidden_size: int | None) -> dict[str, Any]:
    stage, buffers = spec.zero_stage, emitted_buffers(spec, hidden_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero["contiguous_gradients"] = buffers.contiguous_gradients
        zero["overlap_comm"] = (buffers.overlap_comm if buffers.overlap_comm is not None
                                else defaults.overlap_comm(stage))
        zero["reduce_bucket_size"] = buffers.reduce_bucket_size
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = buffers.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = buffers.stage3_param_persistence_threshold
        zero["stage3_max_live_parameters"] = buffers.stage3_max_live_parameters
        zero["stage3_max_reuse_distance"] = buffers.stage3_max_reuse_distance
        zero["sub_group_size"] = buffers.sub_group_size
    optimizer_device, param_device = OFFLOAD_DEVICES[getattr(spec.offload, "value", spec.offload)]
    if optimizer_device != "none":
        zero["offload_optimizer"] = {"device": optimizer_device, "pin_memory": True}
    if param_device != "none":
        zero["offload_param"] = {"device": param_device, "pin_memory": True}
    return zero


def _emit_precision(spec: TrainingSpec) -> dict[str, Any]:
    precision = PrecisionName(spec.precision)
    if spec.grad_dtype is not None:
        raise UsageError("a gradient dtype override has no DeepSpeed switch: DeepSpeed keeps gradients in the "
                         "weights' dtype")
    if precision in (PrecisionName.bf16_pure, PrecisionName.fp16_pure):
        raise UsageError(f"DeepSpeed has no '{precision.value}' recipe (it always keeps a master copy); use "
                         "precision bf16 with bf16 master weights and states (bf16_master_weights_and_grads)")
    if precision in (PrecisionName.amp_bf16, PrecisionName.amp_fp16, PrecisionName.fp32):
        if spec.master_dtype is not None or spec.state_dtype is not None:
            raise UsageError("master/state dtype overrides have no DeepSpeed switch with this precision")
        section: dict[str, Any] = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
        if precision != PrecisionName.fp32:
            section["torch_autocast"] = {"enabled": True,
                                         "dtype": "bfloat16" if precision == PrecisionName.amp_bf16 else "float16"}
        return section
    if precision == PrecisionName.fp16:
        if spec.master_dtype is not None or spec.state_dtype is not None:
            raise UsageError("master/state dtype overrides with fp16 have no DeepSpeed switch "
                             "(fp16_master_weights_and_grads needs DeepSpeed's CPU Adam)")
        # loss_scale 0 = dynamic loss scaling (precision_config.py, DeepSpeedFP16Config).
        return {"bf16": {"enabled": False}, "fp16": {"enabled": True, "loss_scale": 0}}
    return {"bf16": _emit_bf16(spec), "fp16": {"enabled": False}}


def _emit_bf16(spec: TrainingSpec) -> dict[str, Any]:
    bf16: dict[str, Any] = {"enabled": True}
    master = Dtype(spec.master_dtype) if spec.master_dtype is not None else None
    state = Dtype(spec.state_dtype) if spec.state_dtype is not None else None
    if master not in (None, Dtype.fp32, Dtype.bf16) or state not in (None, Dtype.fp32, Dtype.bf16):
        raise UsageError("DeepSpeed's bf16 recipe keeps the master copy and optimizer states in fp32 or bf16")
    if master == Dtype.bf16 or state == Dtype.bf16:
        if spec.zero_stage == 0:
            raise UsageError("bf16 master weights/optimizer states need ZeRO stage 1, 2 or 3 in DeepSpeed")
        if state == Dtype.bf16 and master != Dtype.bf16:
            raise UsageError("DeepSpeed keeps bf16 optimizer states only with bf16 master weights: set the master "
                             "dtype to bf16 as well")
        bf16["bf16_master_weights_and_grads"] = True
        if state == Dtype.bf16:
            bf16["bf16_optimizer_states"] = True
    return bf16


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
