"""What a caller asks, in plain values, and its resolution into the engine's inputs.

A ``Request`` holds a model reference and a training setup as a user states them (strings, numbers, lists; the
keywords of ``memcalc.estimate``, and the CLI's flags). ``Request.plan()`` validates them, applies the defaults
and any DeepSpeed config, resolves the model, and returns a ``Plan``: the ModelInput, one TrainingSpec per ZeRO
stage asked, the GPU target, and which defaults were used. The CLI builds a Request from argv; notebooks get one
through ``memcalc.estimate``. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memcalc.errors import UsageError, printable
from memcalc.spec import DEFAULT_MICRO_BATCH_SIZE, DEFAULT_SEQ_LEN, Sharding, setting_of

if TYPE_CHECKING:
    from memcalc.allocator import AllocatorConfig
    from memcalc.fit import GpuTarget
    from memcalc.resolve import ModelInput
    from memcalc.spec import TrainingSpec

# FSDP2's fully_shard default (reshard_after_forward=True) is memcalc's stage 3.
FSDP_DEFAULT_STAGE = 3
FSDP_PIPELINE_STAGE = 2


@dataclass(kw_only=True, eq=False, repr=False)
class Request:
    """A model and a training setup as a user states them. Field names are ``memcalc.estimate``'s keywords.

    model: a preset name or alias, a config.json path or folder, or a hub id; params: a parameter count (7e9, "7B")
    that replaces the model's. zero: a stage 0-3, or several to compare. lora_targets and freeze: module or group
    names, as a list or comma-separated. gpu / gpu_memory: the GPU to check the fit against (a preset name, or a
    size such as "80GiB"). chosen: which fields the caller set on purpose (None: those that differ from their
    defaults); it decides what is reported as a default and what a DeepSpeed config may not contradict.
    from_config / from_format: a trainer's config file (HF TrainingArguments JSON, TRL, axolotl, torchtune,
    LLaMA-Factory; memcalc.configs.trainers) whose settings count as chosen; a chosen setting it contradicts is an error.
    """

    model: str | None = None
    params: int | str | None = None
    precision: str = "bf16"
    master_dtype: str | None = None
    grad_dtype: str | None = None
    state_dtype: str | None = None
    optim: str = "adamw"
    optim_impl: str = "foreach"
    amsgrad: bool = False
    optim_in_backward: bool = False
    checkpoint_reentrant: bool = False
    activation_offload: str = "none"
    adafactor_beta1: float | None = None
    optim_rank: int | None = None
    batch_size: int = DEFAULT_MICRO_BATCH_SIZE
    seq_len: int = DEFAULT_SEQ_LEN
    decoder_seq_len: int | None = None
    grad_accum: int = 1
    checkpointing: str = "none"
    loss: str = "standard"
    attn: str = "sdpa"
    activations: str = "auto"
    zero: int | str | Sequence[int] = 0
    gpus: int = 1
    nodes: int = 1
    gpus_per_node: int | None = None
    sharding: str = "deepspeed"
    engine: str = "torch"
    fsdp: bool = False
    cpu_ram_efficient_loading: bool = False
    offload: str = "none"
    deepspeed: str | os.PathLike[str] | None = None
    from_config: str | os.PathLike[str] | None = None
    from_format: str | None = None
    lora_rank: int | None = None
    lora_dtype: str | None = None  # the adapters' dtype on the base: a spelling of the recipe (_LORA_DTYPE_RECIPES)
    lora_dropout: float = 0.0
    dora: bool = False
    lora_modules_to_save: str | Sequence[str] | None = None
    lora_targets: str | Sequence[str] | None = None
    qlora: bool = False
    qlora_upcast: bool = True
    qlora_scope: str = "all-linear"
    qlora_double_quant: bool = True
    qlora_lm_head: bool = False
    qlora_quantizer: str = "bitsandbytes"
    plan_schedules: str | Sequence[str] | None = None  # --plan: the pipeline schedules it searches (1f1b default)
    compile: bool = False
    repeat_kv: bool = False
    padded: bool = False
    fp8: str = "none"
    tp: int = 1
    sp: bool = False
    loss_parallel: bool = False
    pp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int | None = None
    pp_virtual: int | None = None
    pp_layers: str | Sequence[int] | None = None
    cp: int = 1
    ep: int = 1
    ep_load: float = 1.0
    ep_shard_dim: int = 0
    dp_replicate: int | str = 1  # HSDP replicas of the data-parallel ranks; "nodes": one per node (FSDP1 HYBRID_SHARD)
    dp_shard: int | None = None  # HSDP given by its shard group instead: the replicas are the rest of the ranks
    freeze: str | Sequence[str] = ()
    gpu: str | None = None
    gpu_memory: int | str | None = None
    cuda_context: int | str | None = None
    nccl_channels: str | None = None  # "COLL,NVLS,P2P,PER_PEER", as NCCL_DEBUG=INFO prints them (memcalc.nccl)
    reserve_fraction: float | None = None
    reserved: bool = False
    alloc_conf: str | None = None
    max_batch: bool = False
    max_seq_len: bool = False
    chosen: frozenset[str] | None = None

    def is_chosen(self, name: str) -> bool:
        if self.chosen is not None:
            return name in self.chosen
        return getattr(self, name) != _DEFAULTS[name]

    def plan(self) -> Plan:
        """Validate, resolve the model, apply a DeepSpeed config: the engine's inputs. Raises MemcalcErrors."""
        return _plan(self)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Request)}

# The settings whose defaults shape the answer, and how the report names a default that was used.
SHOWN_DEFAULTS = ("precision", "optim", "optim_impl", "batch_size", "seq_len", "checkpointing", "attn", "gpus",
                  "zero")


@dataclass(eq=False, repr=False)
class Plan:
    """A request resolved: the model, one TrainingSpec per ZeRO stage asked, the GPU target (or None), the
    defaults used (``--flag value`` labels, as the report lists them), notes for the report, and whether the
    precision was chosen (else the fit verdict also gives HF Trainer's recipe)."""

    model: ModelInput
    specs: tuple[TrainingSpec, ...]
    gpu: GpuTarget | None
    defaults_used: tuple[str, ...]
    notes: tuple[str, ...]
    precision_chosen: bool
    solve_batch: bool
    solve_seq_len: bool
    config_path: str | None = None  # the DeepSpeed config the plan was read from (as shown to the user)
    config_fields: frozenset[str] = frozenset()  # the TrainingSpec fields it sets
    # --reserved: the caching allocator's settings to replay the step with (None: reserved memory not predicted)
    allocator: AllocatorConfig | None = None
    allocator_source: str = ""  # where the settings came from: --alloc-conf, an environment variable, or default
    plan_schedules: tuple[str, ...] = ()  # --plan-schedules: the pipeline schedules the planner searches


# The pipeline schedules the planner can search (--plan-schedules): 1F1B, and interleaved 1F1B with 2 stages a rank
PLAN_SCHEDULES = ("1f1b", "interleaved-1f1b")


def _plan_schedules(request: Request) -> tuple[str, ...]:
    given = _names(request.plan_schedules)
    for name in given:
        if name not in PLAN_SCHEDULES:
            raise UsageError(f"{{plan_schedules}} {name!r}: {{plan}} searches {' and '.join(PLAN_SCHEDULES)} (other "
                             "schedules are estimated for a layout you give: {pp_schedule})")
    return tuple(dict.fromkeys(given))


def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(part).strip() for part in parts if str(part).strip())


def _layer_counts(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """--pp-layers "8,9,8,7": one whole number of layers per stage."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    counts = []
    for part in parts:
        text = str(part).strip()
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"{{pp_layers}} {value!r}: give each stage's layer count, whole numbers >= 1 separated by "
                             "commas (e.g. 8,9,8,7)")
        counts.append(int(text))
    return tuple(counts)


def _stages(value: int | str | Sequence[int]) -> list[int]:
    parts = str(value).split(",") if isinstance(value, (int, str)) else [str(v) for v in value]
    stages: list[int] = []
    for part in parts:
        part = part.strip()
        if part not in ("0", "1", "2", "3"):
            raise UsageError(f"{{zero}} {value!r}: each stage must be 0, 1, 2 or 3 (one stage, or several to compare)")
        if int(part) not in stages:
            stages.append(int(part))
    return stages


def _not_empty(request: Request, *names: str) -> None:
    for name in names:
        value = getattr(request, name)
        if isinstance(value, (str, os.PathLike)) and not os.fspath(value).strip():
            raise UsageError(f"{{{name}}} is empty; give a value or leave it out")


# Request fields by the kind of value they take: text (names), switches, lists of names. Checked before anything
# reads them.
_TEXT = ("model", "precision", "master_dtype", "grad_dtype", "state_dtype", "optim", "optim_impl", "checkpointing", "loss",
         "attn", "activations", "sharding", "engine", "offload", "activation_offload", "qlora_scope", "qlora_quantizer", "fp8", "gpu", "from_format",
         "alloc_conf", "pp_schedule", "lora_dtype")
_SWITCHES = ("amsgrad", "optim_in_backward", "checkpoint_reentrant", "fsdp", "cpu_ram_efficient_loading", "qlora", "qlora_upcast", "qlora_double_quant", "qlora_lm_head", "dora",
             "compile", "repeat_kv", "padded", "max_batch", "max_seq_len", "reserved", "sp", "loss_parallel")
_NAME_LISTS = ("lora_targets", "freeze", "lora_modules_to_save", "plan_schedules")


def _check_types(request: Request) -> None:
    """A value of the wrong kind (a number where a name goes, a number where a switch goes) is a UsageError naming
    the setting, never an AttributeError from deep inside."""
    for name in _TEXT:
        value = getattr(request, name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{{{name}}} must be text, got {type(value).__name__} {value!r}")
    if request.deepspeed is not None and not isinstance(request.deepspeed, (str, os.PathLike)):
        raise UsageError(f"{{deepspeed}} must be a path, got {type(request.deepspeed).__name__}")
    for name in _SWITCHES:
        if not isinstance(getattr(request, name), bool):
            raise UsageError(f"{{{name}}} is a switch: True or False, got {getattr(request, name)!r}")
    for name in _NAME_LISTS:
        value = getattr(request, name)
        items = [value] if isinstance(value, str) else value
        if value is not None and (not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items)):
            raise UsageError(f"{{{name}}} takes names, as a list or comma-separated text, got {value!r}")
        if request.is_chosen(name) and value is not None and not _names(value):
            raise UsageError(f"{{{name}}} names nothing; name at least one, or leave it out")


def _check_simple(request: Request) -> None:
    _check_types(request)
    _not_empty(request, "gpu", "gpu_memory", "cuda_context", "nccl_channels", "deepspeed", "params",
               "alloc_conf")  # (a model: resolve)
    if request.reserve_fraction is not None and (request.reserved or request.alloc_conf is not None):
        raise UsageError("{reserve_fraction} assumes the allocator's reserve and {reserved} predicts it: give one")
    if request.gpu is not None and request.gpu_memory is not None:
        raise UsageError("give either {gpu} NAME or {gpu_memory} SIZE, not both")
    no_gpu = request.gpu is None and request.gpu_memory is None
    if (request.max_batch or request.max_seq_len) and no_gpu:
        raise UsageError("{max_batch} and {max_seq_len} solve for a GPU: add {gpu} NAME or {gpu_memory} SIZE")
    for name in ("cuda_context", "nccl_channels", "reserve_fraction"):
        if getattr(request, name) is not None and no_gpu:
            raise UsageError(f"{{{name}}} is an assumption of the fit check: add {{gpu}} NAME or {{gpu_memory}} SIZE")
    if request.reserve_fraction is not None:
        fraction = request.reserve_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
                or not 0.0 <= fraction <= 0.9:
            raise UsageError(f"{{reserve_fraction}} must be a number from 0 to 0.9, got {fraction!r}")
    if request.model is None and request.params is None:
        raise UsageError("give a {model} (preset name, config.json path) or {params} 7B; see 'memcalc presets'")


# --lora-dtype on the base --precision gives: memcalc's recipe of the pair. A mixed recipe (bf16, fp16) is a 16-bit
# base with fp32 trainable parameters, as PEFT's autocast_adapter_dtype casts LoRA adapters to fp32 (tuners_utils.py
# cast_adapter_dtype); a pure one (bf16-pure, fp16-pure) keeps them in the base's dtype, as torchtune does.
_LORA_DTYPE_RECIPES = {
    ("bf16", "fp32"): "bf16", ("bf16-pure", "fp32"): "bf16", ("bf16", "bf16"): "bf16-pure",
    ("bf16-pure", "bf16"): "bf16-pure", ("fp16", "fp32"): "fp16", ("fp16-pure", "fp32"): "fp16",
    ("fp16", "fp16"): "fp16-pure", ("fp16-pure", "fp16"): "fp16-pure", ("fp32", "fp32"): "fp32",
    ("amp-bf16", "fp32"): "amp-bf16", ("amp-fp16", "fp32"): "amp-fp16",
}


def _lora_precision(request: Request) -> str:
    if request.lora_dtype is None:
        return request.precision
    if request.lora_rank is None:
        raise UsageError("{lora_dtype} is the LoRA adapters' dtype: add {lora_rank} R")
    recipe = _LORA_DTYPE_RECIPES.get((request.precision, request.lora_dtype))
    if recipe is None:
        pairs = ", ".join(f"{dtype} on {base}" for base, dtype in _LORA_DTYPE_RECIPES)
        raise UsageError(f"{{lora_dtype}} {request.lora_dtype} on a {{precision}} {request.precision} base is not "
                         f"modelled; use one of: {pairs}")
    return recipe


def _freeze(request: Request) -> tuple[str, ...]:
    from memcalc.trainable import FREEZE_GROUPS

    groups = _names(request.freeze)
    for group in groups:
        if group not in FREEZE_GROUPS:
            raise UsageError(f"{{freeze}} {group!r} is not one of {', '.join(FREEZE_GROUPS)}")
    return groups


def _num_params(request: Request) -> int | None:
    from memcalc.units import parse_count

    if request.params is None:
        return None
    if isinstance(request.params, bool):
        raise UsageError(f"{{params}} must be a parameter count, got {request.params!r}")
    return parse_count(str(request.params), "{params}")


def _gpus_and_nodes(request: Request) -> tuple[int, int]:
    """(GPUs, nodes): --gpus as given, or --nodes x --gpus-per-node; with --gpus and --gpus-per-node alone, the nodes
    they make."""
    if request.gpus_per_node is None:
        return request.gpus, request.nodes
    if request.is_chosen("gpus") and not request.is_chosen("nodes"):
        nodes, rest = divmod(request.gpus, request.gpus_per_node)
        if rest or not nodes:
            raise UsageError(f"{{gpus}} {request.gpus} is not a whole number of nodes of {{gpus_per_node}} "
                             f"{request.gpus_per_node}; give a multiple of it")
        return request.gpus, nodes
    total = request.nodes * request.gpus_per_node
    if request.is_chosen("gpus") and request.gpus != total:
        raise UsageError(f"{{gpus}} {request.gpus} is not {{nodes}} {request.nodes} x {{gpus_per_node}} "
                         f"{request.gpus_per_node}; give two of the three")
    return total, request.nodes


def _sharding(request: Request) -> str:
    if request.engine not in ENGINES:
        raise UsageError(f"{{engine}} {request.engine!r} is not one of {', '.join(ENGINES)}")
    if request.engine == Sharding.megatron.value:
        if request.fsdp or request.sharding not in (Sharding.deepspeed.value, Sharding.megatron.value):
            raise UsageError("{engine} megatron shards with Megatron's own DDP ({zero} 0) or distributed optimizer "
                             "({zero} 1): drop {fsdp} or {sharding}")
        return Sharding.megatron.value
    if not request.fsdp:
        return request.sharding
    if request.sharding != Sharding.fsdp.value and (request.is_chosen("sharding")
                                                    or request.sharding != Sharding.deepspeed.value):
        raise UsageError("{fsdp} is {sharding} fsdp: drop one of them")
    return Sharding.fsdp.value


def _dp_replicate(request: Request) -> int:
    """--dp-replicate R, or "nodes": one replica per node, each node's GPUs one shard group (FSDP1's HYBRID_SHARD:
    torch/distributed/fsdp/_init_utils.py _init_intra_and_inter_node_groups shards within a node); or --dp-shard S:
    the replicas are the data-parallel ranks over S (torchtune's ParallelDims and axolotl's _get_parallel_config_kwargs
    give the rest of the world to the dimension left open)."""
    value = request.dp_replicate
    gpus_given, nodes = _gpus_and_nodes(request)
    if isinstance(value, str) and value.strip().lower() == "nodes":
        value = nodes
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{{dp_replicate}} takes a whole number of replicas, or nodes (one per node), got {value!r}")
    shard = request.dp_shard
    if shard is None:
        return value
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 1:
        raise UsageError(f"{{dp_shard}} takes the whole number of ranks each replica shards over, got {shard!r}")
    sizes = (gpus_given, request.tp, request.pp, request.cp)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
        return value  # (the spec's own checks name the bad setting)
    gpus, tp, pp, cp = sizes
    if gpus % (tp * pp * cp * shard):
        raise UsageError(f"{{dp_shard}} {shard}: {{gpus}} {gpus} is not divisible by {{tp}} x {{pp}} x {{cp}} x "
                         f"{{dp_shard}} = {tp * pp * cp * shard}: the data-parallel ranks form replicas of {shard}")
    replicas = gpus // (tp * pp * cp * shard)
    if request.is_chosen("dp_replicate") and value != replicas:
        raise UsageError(f"{{dp_replicate}} {value} with {{dp_shard}} {shard} on {{gpus}} {gpus} (tp {tp}, pp {pp}, cp "
                         f"{cp}) leaves {replicas} replicas; give one of {{dp_replicate}} and {{dp_shard}}")
    return replicas


# --engine: torch (PyTorch's and DeepSpeed's engines, as --sharding picks) or megatron (--sharding megatron)
ENGINES = ("torch", "megatron")


def _plan(request: Request) -> Plan:
    from memcalc.resolve import model_input

    trainer_notes: list[str] = []
    if request.from_config is not None or request.from_format is not None:
        request, trainer_notes = _trainer_config(request)
    _check_simple(request)
    freeze = _freeze(request)
    gpus, nodes = _gpus_and_nodes(request)
    sharding = _sharding(request)
    stages = _stages(request.zero)
    if sharding == Sharding.fsdp.value and not request.is_chosen("zero"):
        # torchtitan's apply_fsdp, reshard_after_forward_policy "default": no reshard after forward under pipeline
        # parallelism (each micro-batch would all-gather again), so ZeRO-2-like there
        stages = [FSDP_PIPELINE_STAGE if isinstance(request.pp, int) and request.pp > 1 else FSDP_DEFAULT_STAGE]
    fields: dict[str, Any] = {
        "precision": _lora_precision(request), "master_dtype": request.master_dtype, "grad_dtype": request.grad_dtype,
        "state_dtype": request.state_dtype, "optimizer": request.optim,
        # (Megatron steps with TransformerEngine's or apex's FusedAdam: megatron/core/optimizer/__init__.py)
        "optim_impl": ("fused" if sharding == Sharding.megatron.value and not request.is_chosen("optim_impl")
                       else request.optim_impl),
        "amsgrad": request.amsgrad, "adafactor_beta1": request.adafactor_beta1, "optim_rank": request.optim_rank,
        "optim_in_backward": request.optim_in_backward, "activation_offload": request.activation_offload,
        "micro_batch_size": request.batch_size,
        "seq_len": request.seq_len, "decoder_seq_len": request.decoder_seq_len, "grad_accum": request.grad_accum,
        "checkpointing": request.checkpointing, "checkpoint_reentrant": request.checkpoint_reentrant,
        "loss": request.loss,
        "attention": request.attn, "activations": request.activations, "num_gpus": gpus, "num_nodes": nodes, "sharding": sharding,
        "offload": request.offload, "lora_rank": request.lora_rank, "lora_dropout": request.lora_dropout, "dora": request.dora,
        "lora_modules_to_save": tuple(_names(request.lora_modules_to_save) or ()),
        "lora_targets": _names(request.lora_targets) or None, "qlora": request.qlora,
        # (torchtune, whose QLoRA torchao's quantizer is, keeps the rest in the model's dtype: unless upcast is asked)
        "qlora_upcast": request.qlora_upcast and (request.qlora_quantizer != "torchao"
                                                  or request.is_chosen("qlora_upcast")),
        "qlora_scope": request.qlora_scope,
        "qlora_double_quant": request.qlora_double_quant, "qlora_lm_head": request.qlora_lm_head,
        "qlora_quantizer": request.qlora_quantizer, "freeze": freeze,
        "compile": request.compile, "repeat_kv": request.repeat_kv, "padded": request.padded, "fp8": request.fp8,
        "cpu_ram_efficient_loading": request.cpu_ram_efficient_loading,
        "tp": request.tp, "sequence_parallel": request.sp, "loss_parallel": request.loss_parallel,
        "pp": request.pp, "pp_schedule": request.pp_schedule, "microbatches": request.microbatches,
        "pp_virtual": request.pp_virtual,
        "pp_layers": _layer_counts(request.pp_layers), "cp": request.cp, "ep": request.ep,
        "ep_load": request.ep_load, "ep_shard_dim": request.ep_shard_dim,
        "dp_replicate": _dp_replicate(request),
    }
    model = model_input(request.model, _num_params(request))
    notes: list[str] = list(trainer_notes)
    from_config: set[str] = set()
    config_fields: dict[str, Any] = {}
    if request.deepspeed is not None:
        config_fields, config_notes = _deepspeed_fields(request, model, fields, stages)
        fields.update(config_fields)
        from_config = {setting_of(name) for name in config_fields}
        stages = [fields.pop("zero_stage")]
        notes.extend(config_notes)
    from memcalc.spec import TrainingSpec

    max_positions = model.arch.max_positions if model.arch is not None else None
    if max_positions and not request.is_chosen("seq_len") and fields["seq_len"] > max_positions:
        # The default sequence is longer than the model was built for: take the model's maximum instead.
        notes.append(f"seq_len {max_positions:,}: the model's max_position_embeddings, below memcalc's default "
                     f"{fields['seq_len']:,}")
        fields["seq_len"] = max_positions
    specs = tuple(TrainingSpec(**fields, zero_stage=stage) for stage in stages)
    _decoder_length(model, specs[0])
    notes.extend(_positions(model, specs[0]))
    gpu, gpu_note = _gpu_target(request)
    if gpu_note:
        notes.append(gpu_note)
    allocator, allocator_source = _allocator(request, model, specs)
    effective = {"precision": specs[0].precision.value, "optim": specs[0].optimizer.value,
                 "optim_impl": specs[0].optim_impl.value, "batch_size": specs[0].micro_batch_size,
                 "seq_len": specs[0].seq_len, "checkpointing": specs[0].checkpointing_label,
                 "attn": specs[0].attention.value, "gpus": specs[0].num_gpus,
                 "zero": ",".join(str(s.zero_stage) for s in specs)}
    chosen = {name for name in SHOWN_DEFAULTS if request.is_chosen(name) or name in from_config}
    if request.is_chosen("gpus_per_node"):
        chosen.add("gpus")  # --nodes x --gpus-per-node says how many GPUs
    defaults_used = tuple(f"--{name.replace('_', '-')} {effective[name]}" for name in SHOWN_DEFAULTS
                          if name not in chosen)
    return Plan(model=model, specs=specs, gpu=gpu, defaults_used=defaults_used, notes=tuple(notes),
                precision_chosen=request.is_chosen("precision") or "precision" in from_config,
                solve_batch=request.max_batch, solve_seq_len=request.max_seq_len,
                config_path=_shown(request.deepspeed) if request.deepspeed is not None else None,
                config_fields=frozenset(config_fields), allocator=allocator, allocator_source=allocator_source,
                plan_schedules=_plan_schedules(request))


def _allocator(request: Request, model: ModelInput, specs: Sequence[TrainingSpec]
               ) -> tuple[AllocatorConfig | None, str]:
    """--reserved (or --alloc-conf): the allocator settings to replay with, from --alloc-conf, else the environment
    (PYTORCH_ALLOC_CONF, then the older PYTORCH_CUDA_ALLOC_CONF, as PyTorch reads them), else the defaults."""
    if not request.reserved and request.alloc_conf is None:
        return None, ""
    from memcalc.allocator import AllocConfError, environment_alloc_conf, parse_alloc_conf

    if model.config is None or not model.architecture_known:
        raise UsageError("{reserved} replays the model's own step: give a {model} (preset name or config.json), "
                         "not {params}")
    from memcalc.measure.reserved import is_ddp

    split = next((name for spec in specs for name, size in (("tp", spec.tp), ("pp", spec.pp), ("cp", spec.cp),
                                                            ("ep", spec.ep)) if size > 1), None)
    if split is not None:
        raise UsageError(f"{{reserved}} with {{{split}}}: the replayed step is one process's whole model, not a "
                         f"{split}-split rank's; drop {{reserved}} (the fit then assumes a reserve fraction)")
    if any(spec.zero_stage or (spec.num_gpus > 1 and not is_ddp(spec)) for spec in specs):
        raise UsageError("{reserved} replays one process's step, or a DDP rank ({sharding} torch, {zero} 0); "
                         "ZeRO/FSDP ranks are not replayed yet: drop {reserved} (the fit then assumes a reserve "
                         "fraction)")
    if request.alloc_conf is not None:
        text, source = request.alloc_conf, "--alloc-conf"
    else:
        text, source = environment_alloc_conf()
    try:
        return parse_alloc_conf(text), source
    except AllocConfError as error:
        where = "{alloc_conf}" if source == "--alloc-conf" else f"the environment's {source}"
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UsageError(f"{where} '{printable(shown)}': {error}") from None


def _trainer_config(request: Request) -> tuple[Request, list[str]]:
    """--from FILE: the trainer config's settings join the chosen ones (memcalc.configs.trainers.merge refuses a
    chosen setting it contradicts); the request that results, and the notes that say what was read."""
    from memcalc.configs.trainers import merge, read_trainer_config

    if request.from_config is None:
        raise UsageError("{from_format} says how to read {from_config} FILE: add it, or drop {from_format}")
    if not isinstance(request.from_config, (str, os.PathLike)):
        raise UsageError(f"{{from_config}} must be a path, got {type(request.from_config).__name__}")
    _check_types(request)
    config = read_trainer_config(request.from_config, request.from_format)
    chosen = {name: getattr(request, name) for name in _DEFAULTS
              if name not in ("chosen", "from_config", "from_format") and request.is_chosen(name)}
    settings, notes = merge(config, chosen, _checkpoint_dtype)
    names = frozenset(chosen) | frozenset(settings)
    return dataclasses.replace(request, **settings, from_config=None, from_format=None, chosen=names), notes


def _checkpoint_dtype(reference: str) -> str | None:
    """The dtype a model's config.json records (torch_dtype or dtype), for a trainer that loads the checkpoint's."""
    from memcalc.configs.trainers import config_dtype
    from memcalc.resolve import resolve_model

    return config_dtype(resolve_model(reference).raw)


def _shown(path: str | os.PathLike[str]) -> str:
    from memcalc.datafile import shown

    return shown(os.fspath(path))


def _deepspeed_fields(request: Request, model: ModelInput, fields: dict[str, Any],
                      stages: list[int]) -> tuple[dict[str, Any], list[str]]:
    """A DeepSpeed config decides every field ``spec_fields`` names (stage, precision and master dtypes,
    micro-batch, accumulation, optimizer, offload, sharding, ZeRO buffers); a setting the caller chose that says
    otherwise is an error, never a silent override."""
    from memcalc.configs.deepspeed import disagreements, read_deepspeed_config, spec_fields
    from memcalc.datafile import shown

    if request.fsdp or fields["sharding"] != Sharding.deepspeed.value:
        setting = "{fsdp}" if request.fsdp else f"{{sharding}} {fields['sharding']}"
        raise UsageError(f"{setting} contradicts {{deepspeed}} (a DeepSpeed config runs DeepSpeed ZeRO); drop one")
    chosen = {spec_name: fields[spec_name] if spec_name != "zero_stage" else stages
              for spec_name in ("zero_stage", "precision", "master_dtype", "state_dtype", "micro_batch_size",
                                "grad_accum", "optimizer", "amsgrad", "optim_impl", "offload")
              if (request.is_chosen(setting_of(spec_name))
                  and fields.get(spec_name, stages) is not None)}
    path = os.fspath(request.deepspeed)
    settings = read_deepspeed_config(
        path, hidden_size=model.hidden_size, micro_batch_size=chosen.get("micro_batch_size"),
        gradient_accumulation_steps=chosen.get("grad_accum"), precision=chosen.get("precision"),
        zero_stage=stages[0] if "zero_stage" in chosen and len(stages) == 1 else None,
        offload=chosen.get("offload"), num_gpus=fields["num_gpus"],
    )
    config_fields = spec_fields(settings)
    # The config leaves the master and state dtypes to its recipe (None): compare a chosen dtype with what that
    # recipe keeps (fp32 for bf16 with a master), not with None.
    from memcalc.precision import get_recipe

    recipe = get_recipe(config_fields["precision"], config_fields["master_dtype"], None, config_fields["state_dtype"])
    compared = {**config_fields, "master_dtype": recipe.master_dtype, "state_dtype": recipe.state_dtype}
    for name, mine, theirs in disagreements(compared, chosen)[:1]:
        def text(value: Any) -> str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return "the recipe's default" if value is None else str(getattr(value, "value", value))

        setting = setting_of(name)
        raise UsageError(f"{{{setting}}} {text(mine)} contradicts {shown(path)}, which sets {name} {text(theirs)}; "
                         "drop the setting or edit the config")
    return dict(config_fields), [f"read {shown(path)}: ZeRO stage {settings.zero_stage}, offload {settings.offload}",
                                 *settings.notes]


def _positions(model: ModelInput, spec: TrainingSpec) -> list[str]:
    """A sequence longer than the positions the model was built for: an error where positions are a learned
    table (no embedding exists for them), a note where they are computed (rotary: the run works, quality is the
    user's call)."""
    arch = model.arch
    if arch is None or not arch.max_positions or spec.seq_len <= arch.max_positions:
        return []
    if arch.learned_positions:
        raise UsageError(f"{{seq_len}} {spec.seq_len:,} is longer than the {arch.max_positions:,} positions "
                         f"{model.name} learned (its position embeddings have {arch.max_positions:,} rows); use "
                         f"{{seq_len}} {arch.max_positions:,} or less")
    return [(f"seq_len {spec.seq_len:,} is above the model's max_position_embeddings {arch.max_positions:,}: the "
             "positions are computed (rotary), so the step runs, but the model was not trained that long")]


def _decoder_length(model: ModelInput, spec: TrainingSpec) -> None:
    """--decoder-seq-len is refused for a model whose estimate has no decoder length of its own: one sequence, or
    an encoder-decoder only the trace or an approximation counts (both with the encoder's length)."""
    arch = model.arch
    if spec.decoder_seq_len is None or (arch is not None and arch.encoder_decoder):
        return
    if arch is None:
        raise UsageError("{decoder_seq_len} is the decoder's length of an encoder-decoder model (T5): give its "
                         "{model}, or drop {decoder_seq_len}")
    config = model.config.raw if model.config is not None else {}
    if config.get("is_encoder_decoder") is True:
        raise UsageError(f"{{decoder_seq_len}}: memcalc models a decoder length of its own for T5 only; {model.name} "
                         f"({model.model_type}) is estimated with {{seq_len}} for both stacks: drop {{decoder_seq_len}}")
    raise UsageError(f"{{decoder_seq_len}} is the decoder's length of an encoder-decoder model (T5); {model.name} "
                     "reads one sequence ({seq_len}): drop {decoder_seq_len}")


def _gpu_target(request: Request) -> tuple[GpuTarget | None, str | None]:
    if request.gpu is None and request.gpu_memory is None:
        return None, None
    from memcalc.catalog import find_gpu, gpu_alias_note
    from memcalc.fit import DEFAULT_ALLOCATOR_RESERVE_FRACTION, GpuTarget, cuda_context_for
    from memcalc.nccl import Environment, given_channels
    from memcalc.units import parse_size

    def size(value: int | str, name: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= 0:
                raise UsageError(f"{{{name}}} must be a positive number of bytes, got {value}")
            return value
        parsed = parse_size(str(value), f"{{{name}}}")
        # (a bare number is bytes: '80' or '512' under a MiB meant GiB or MiB, and would leave no usable memory)
        if str(value).strip().replace("_", "").isdigit() and parsed < 2**20:
            raise UsageError(f"{{{name}}} {value!r} has no unit, so it is {parsed:,} bytes; give one "
                             f"(e.g. {'80GiB' if name == 'gpu_memory' else '512MiB'})")
        return parsed

    given = size(request.cuda_context, "cuda_context") if request.cuda_context is not None else None
    loading = os.environ.get("CUDA_MODULE_LOADING")
    context, context_source = (given, "given (--cuda-context)") if given is not None else \
        cuda_context_for(None, None, loading)
    reserve = request.reserve_fraction if request.reserve_fraction is not None else DEFAULT_ALLOCATOR_RESERVE_FRACTION
    note = None
    if request.gpu is not None:
        spec = find_gpu(request.gpu)
        if given is None:
            context, context_source = cuda_context_for(spec.compute_capability, spec.sms, loading)
        target = GpuTarget(spec.name, spec.memory_bytes, spec.source, context, reserve,
                           compute_capability=spec.compute_capability, cuda_context_source=context_source,
                           interconnect=spec.interconnect, nccl_env=Environment.read())
        note = gpu_alias_note(request.gpu)
    else:
        assert request.gpu_memory is not None
        shown_size = str(request.gpu_memory)
        target = GpuTarget(f"{shown_size} GPU", size(request.gpu_memory, "gpu_memory"), "given size", context,
                           reserve, cuda_context_source=context_source, nccl_env=Environment.read())
    if request.nccl_channels is not None:
        target = dataclasses.replace(target, nccl_channels=given_channels(request.nccl_channels))
    if target.usable_bytes <= 0:
        raise UsageError("the CUDA context, the cuBLAS workspaces and the allocator reserve leave no usable memory; "
                         "check {gpu_memory} and {cuda_context}")
    return target, note
