"""The load: the model's weights arriving on the GPU and being prepared, before the first step.

Its peak is reported beside the step's (``per_gpu.load``) and becomes the run's peak when it is larger: a run whose
load does not fit dies before it trains. The host memory the load takes is reported too, per process and per node
(every process of a node loading the whole model is the classic host out-of-memory of a multi-GPU start).

Each path follows the code that runs it (transformers 5.24, bitsandbytes 0.50, PEFT 0.21, accelerate 1.16):

- **One process, DDP, DeepSpeed ZeRO-1/2** (``host-then-gpu``): ``PreTrainedModel.from_pretrained`` without a
  ``device_map`` builds the model on the meta device and materialises each checkpoint tensor on the host
  (``core_model_loading._materialize_copy``); HF Trainer (or ``deepspeed.initialize``) then moves it to the GPU
  tensor by tensor. The GPU holds the weights and nothing beside them; the host holds the whole model in the load
  dtype (the recipe's weight dtype) per process. The fp32 master copy and optimizer state are made after the load.
- **QLoRA** (``qlora``): with a bitsandbytes 4-bit config transformers loads one tensor at a time (no thread pool:
  ``convert_and_load_state_dict_in_model`` turns it off for on-the-fly quantization) onto the GPU in the 16-bit
  compute dtype; ``integrations/bitsandbytes.py`` ``Bnb4bitQuantize`` wraps it in ``Params4bit``, whose
  ``_quantize`` runs ``functional.quantize_4bit``: the packed codes and an fp32 absmax per 64 elements, then (double
  quantization) ``absmax - offset`` quantized again by ``quantize_blockwise`` before the fp32 absmax is freed. Then
  PEFT's ``prepare_model_for_kbit_training`` (``utils/other.py``) casts every other 16-bit parameter to fp32 one at a
  time (``param.data = param.data.to(torch.float32)``): the 16-bit tensor and its fp32 copy exist together. The
  host holds one checkpoint tensor at a time.
- **torchtune's QLoRA** (``torchtune-qlora``, ``--qlora-quantizer torchao``): ``recipes/lora_finetune_single_device.py``
  ``_setup_model`` builds the model under the GPU as the default device, each ``LoRALinear(quantize_base=True)``
  quantizing its new 16-bit weight with torchao's ``to_nf4``, then ``load_state_dict`` copies the checkpoint in
  (torchtune's checkpointer holds it whole on the host): NF4Tensor's ``copy_`` moves each tensor to the GPU and
  quantizes it again. The largest moment is the largest weight's ``to_nf4`` (``torchao_to_nf4_peak``) beside the
  whole model.
- **DeepSpeed ZeRO-3** (``zero3``): transformers builds the model under ``deepspeed.zero.Init`` (each parameter
  partitioned as it is made) and ``integrations/deepspeed.py`` ``_load_state_dict_into_zero3_model`` loads module
  by module inside ``GatheredParameters(module.named_parameters(recurse=False), modifier_rank=0)``: the module's own
  parameters gathered whole on every rank beside the partitions. Rank 0 reads each checkpoint shard file on the host
  (its size is the checkpoint's: not counted).
- **FSDP2 through accelerate** (``fsdp2``, HF Trainer's FSDP with ``fsdp_version: 2``): every process loads the
  model on the host (``cpu_ram_efficient_loading`` is off by default); ``utils/fsdp_utils.py``
  ``fsdp2_prepare_model`` casts the trainable parameters to fp32 on the host under mixed precision, then calls
  ``fully_shard`` bottom-up (each decoder layer, the input embedding, then the final norm with the head), and
  ``fully_shard`` moves each unit's parameters whole to the GPU before it shards them (``_move_states_to_device``,
  then ``FSDPParam._init_sharded_param``'s padded shard). The unit's whole parameters and every shard made so far
  exist together.
- **Tensor, pipeline, context or expert parallelism** (``sharded``): torchtitan builds the model on the meta device,
  materialises each rank's shards on the GPU (``to_empty``) and reads the checkpoint into them with
  ``torch.distributed.checkpoint``; transformers' ``tp_plan`` loading shards each tensor before moving it. The GPU
  holds the rank's weights; host buffers are the reader's (not counted).

The QLoRA and the one-process paths are measured by ``memcalc.measure.load`` (real transformers, bitsandbytes and
PEFT loads, tests/test_load.py), the FSDP2 path's device side by torch's own fully_shard on the fake process group
at full size (``measure_fsdp2``); the ZeRO-3 path (DeepSpeed is not installed here) and the sharded paths are modelled
from the code above and say so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from memcalc.model import (
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ParamTensor,
    head_tied_to_embedding,
    token_embedding,
)
from memcalc.parallel import fsdp2_shard_numel
from memcalc.report import LoadPhase
from memcalc.spec import Sharding, TrainingSpec
from memcalc.trainable import (
    NF4_BLOCKSIZE,
    TORCHAO_NF4_CHUNK,
    TrainableSubset,
    nf4_bytes,
)
from memcalc.units import BYTES_PER_FP32
from memcalc.vocab import (
    EXTRA_LOAD_CONVERSION,
    EXTRA_LOAD_GATHERED,
    EXTRA_LOAD_IN_FLIGHT,
    EXTRA_LOAD_QUANTIZE,
    EXTRA_LOAD_TORCHAO_NF4,
    EXTRA_LOAD_UNIT,
    EXTRA_LOAD_UPCAST,
    TERM_WEIGHTS,
)

PATH_HOST_THEN_GPU = "host-then-gpu"
PATH_QLORA = "qlora"
PATH_TORCHTUNE_QLORA = "torchtune-qlora"
PATH_ZERO3 = "zero3"
PATH_FSDP2 = "fsdp2"
PATH_SHARDED = "sharded"
MEASURED = "measured on CPU loads of the real libraries (memcalc.measure.load, tests/test_load.py)"
MEASURED_FSDP2 = ("fully_shard's shards measured on the fake process group (memcalc.measure.load.measure_fsdp2); the "
                  "host side modelled")
MODELLED = "modelled from the code, not measured"
MODELLED_TORCHAO = ("modelled from torchtune's and torchao's code; to_nf4's moment measured on CPU tensors "
                    "(tests/test_qlora_torchao.py), and load_state_dict's peak on an H200 (docs/accuracy.md)")
# bitsandbytes functional.quantize_blockwise: create_dynamic_map()'s 256 fp32 entries, made on the device at the first
# double quantization and kept (name2qmap["dynamic"])
DYNAMIC_MAP_BYTES = 256 * BYTES_PER_FP32
# transformers conversion_mapping.py: model types whose checkpoints hold one tensor per expert, merged on load into
# the fused gate_up_proj / down_proj parameters (DeepSeek-V2 maps to qwen2_moe's converters)
MERGED_EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")


def dot_natural_key(name: str) -> list[tuple[int, int | str]]:
    """The order transformers loads checkpoint tensors in (core_model_loading.dot_natural_key): names split on
    dots, numbers before words and compared as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


@dataclass(frozen=True)
class _Moment:
    bytes: int
    moment: str
    breakdown: dict[str, int]


def _largest(moments: Sequence[_Moment]) -> _Moment:
    return max(moments, key=lambda m: m.bytes)


def _upcasts(state: int, tensors: Sequence[ParamTensor], names: frozenset[str] | set[str],
             bytes_16: int) -> list[_Moment]:
    """``param.data = param.data.to(torch.float32)`` over ``tensors`` in parameter order, from ``state`` bytes: at each
    cast the 16-bit tensor and its fp32 copy exist together."""
    moments = []
    for t in tensors:
        if t.name not in names or bytes_16 >= BYTES_PER_FP32:
            continue
        old, new = t.numel * bytes_16, t.numel * BYTES_PER_FP32
        moments.append(_Moment(state + new, f"{t.name} cast to fp32",
                               {TERM_WEIGHTS: state - old + new, EXTRA_LOAD_UPCAST: old}))
        state += new - old
    return moments


@functools.lru_cache(maxsize=64)
def _load_order(names: tuple[str, ...], fused: tuple[bool, ...], model_type: str | None) -> tuple[int, ...]:
    """The parameters' indices in transformers' load order (cached: the fit search and the planner estimate the same
    model many times)."""
    return tuple(sorted(range(len(names)), key=lambda i: _checkpoint_order(names[i], fused[i], model_type)))


def _checkpoint_order(name: str, fused: bool, model_type: str | None) -> list[tuple[int, int | str]]:
    """Where a parameter comes in transformers' load: at its (first) checkpoint tensor's place in the checkpoint's
    order. A fused MoE parameter is made when its first expert's tensor comes (conversion_mapping.py: Mixtral's
    block_sparse_moe.experts.N.w1/w3 -> gate_up_proj, w2 -> down_proj; qwen2_moe's experts.N.gate_proj/up_proj and
    down_proj)."""
    if not fused and model_type != "mixtral":
        return dot_natural_key(name)
    if model_type == "mixtral":
        name = (name.replace(".mlp.", ".block_sparse_moe.").replace("experts.gate_up_proj", "experts.0.w1.weight")
                .replace("experts.down_proj", "experts.0.w2.weight"))
    elif model_type in MERGED_EXPERTS:
        name = (name.replace("experts.gate_up_proj", "experts.0.gate_proj.weight")
                .replace("experts.down_proj", "experts.0.down_proj.weight"))
    return dot_natural_key(name)


def _fused_experts(t: ParamTensor) -> bool:
    """A MoE layer's experts as one 3-D parameter (transformers' gate_up_proj / down_proj)."""
    return t.role == ROLE_EXPERT and len(t.shape) == 3


def _converted(t: ParamTensor, model_type: str | None) -> int:
    """How many copies of a parameter exist at once while transformers builds it from the checkpoint's tensors: 2 for
    fused MoE experts (conversion_mapping.py: MergeModulelist stacks each list of per-expert tensors, which are then
    freed, so the per-expert tensors and the stack, or for gate_up_proj the two stacks and Concatenate's output,
    measured); 1 otherwise (the copy in the load dtype is the parameter)."""
    return 2 if model_type in MERGED_EXPERTS and _fused_experts(t) else 1


def _arrivals(base: Sequence[ParamTensor], subset: TrainableSubset, bytes_per_element: int,
              model_type: str | None, conv1d: bool) -> tuple[list[_Moment], int]:
    """transformers' load, one parameter at a time in checkpoint order (dot_natural_key), each arriving in
    ``bytes_per_element``; QLoRA's quantized weights quantized on arrival. The moments, and the bytes at the end."""
    double = subset.double_quant
    moments, loaded, made_map = [], 0, False
    order = _load_order(tuple(t.name for t in base), tuple(_fused_experts(t) for t in base), model_type)
    for t in (base[i] for i in order):
        value = t.numel * bytes_per_element
        if t.name in subset.quantized:
            if double and not made_map:
                loaded, made_map = loaded + DYNAMIC_MAP_BYTES, True
            stored = nf4_bytes(t.numel, double)
            blocks = math.ceil(t.numel / NF4_BLOCKSIZE)
            # double quantization: the fp32 absmax and absmax - offset beside what is kept, until quantize_blockwise
            # returns; without it the fp32 absmax is what is kept. A Conv1D weight arrives transposed, and
            # Params4bit._quantize's .contiguous() copies it.
            scratch = 2 * blocks * BYTES_PER_FP32 if double else 0
            in_flight = value * (2 if conv1d else 1)
            moments.append(_Moment(loaded + in_flight + stored + scratch, f"quantizing {t.name}",
                                   {TERM_WEIGHTS: loaded, EXTRA_LOAD_IN_FLIGHT: in_flight,
                                    EXTRA_LOAD_QUANTIZE: stored + scratch}))
            loaded += stored
            continue
        copies = _converted(t, model_type)
        parts = {TERM_WEIGHTS: loaded + value}
        if copies > 1:
            parts[EXTRA_LOAD_CONVERSION] = (copies - 1) * value
        moments.append(_Moment(loaded + copies * value, f"loading {t.name}", parts))
        loaded += value
    return moments, loaded


def _qlora(base: Sequence[ParamTensor], subset: TrainableSubset, bytes_16: int, model_type: str | None,
           conv1d: bool) -> _Moment:
    """transformers' sync load with bitsandbytes' on-the-fly quantization, then PEFT's upcast (module docstring)."""
    moments, loaded = _arrivals(base, subset, bytes_16, model_type, conv1d)
    moments += _upcasts(loaded, base, subset.upcast, bytes_16)
    return _largest(moments)


def torchao_to_nf4_peak(numel: int) -> int:
    """The bytes live at the largest moment of torchao's ``to_nf4`` of a bf16 tensor, that tensor included (torchao
    0.18 quantization/quantize_/workflows/nf4/nf4_tensor.py ``NF4Tensor.from_tensor``): the input (2 B per element);
    what ``double_quantize_scalers`` keeps (an int8 scaler per 64-element block, a bf16 factor per 256 blocks, the
    bf16 mean) and the 16-entry bf16 code; then in ``convert_to_norm_float_weight`` the bf16 absmax per block, the
    input scaled by it (bf16), the uint8 code indices, and inside the loop over chunks of ``TORCHAO_NF4_CHUNK``
    elements ``quantize_tensor_nearest``'s difference from each of the 16 codes and its absolute value (bf16: 2 x 32 B
    per element of the chunk)."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    kept = nf4_bytes(numel, torchao=True) - math.ceil(numel / 2)  # (all the NF4Tensor holds but its codes, not yet made)
    return 2 * numel + kept + 2 * blocks + 2 * numel + numel + 2 * 2 * 16 * min(numel, TORCHAO_NF4_CHUNK)


def _torchtune_qlora(base: Sequence[ParamTensor], subset: TrainableSubset, weights_bytes: int) -> _Moment:
    """torchtune's build and load (module docstring): the largest weight quantized again by load_state_dict beside
    the whole model (its old NF4 included), the largest moment of both passes."""
    largest = max((t for t in base if t.name in subset.quantized), key=lambda t: t.numel)
    at_work = torchao_to_nf4_peak(largest.numel)
    arrived = 2 * largest.numel
    return _Moment(weights_bytes + at_work, f"quantizing {largest.name} again as the checkpoint is copied in",
                   {TERM_WEIGHTS: weights_bytes, EXTRA_LOAD_IN_FLIGHT: arrived, EXTRA_LOAD_TORCHAO_NF4: at_work - arrived})


def _fsdp2_bytes(t: ParamTensor, upcast: bool, bytes_per_weight: int) -> int:
    """Bytes per element FSDP2 holds of a tensor through accelerate: fp32 for a trainable one under mixed precision
    (cast on the host before fully_shard), else the load dtype's."""
    return BYTES_PER_FP32 if upcast and t.trainable else bytes_per_weight


def fsdp2_units(tensors: Sequence[ParamTensor]) -> list[list[ParamTensor]]:
    """accelerate's fully_shard order: each decoder layer, the input embedding (untied), then the final norm with
    the head (and a tied embedding). The root's other parameters (GPT-2's position table) are counted with the last
    unit; accelerate shards them just after it, with the root."""
    layers: dict[int, list[ParamTensor]] = {}
    embedding: list[ParamTensor] = []
    tail: list[ParamTensor] = []
    tied = head_tied_to_embedding(tensors)
    for t in tensors:
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(t)
        elif t.role == ROLE_EMBEDDING and not tied:
            embedding.append(t)
        else:
            tail.append(t)
    return [layers[k] for k in sorted(layers)] + [unit for unit in (embedding, tail) if unit]


def _fsdp2(tensors: Sequence[ParamTensor], spec: TrainingSpec, upcast: bool, bytes_per_weight: int) -> _Moment:
    def size(t: ParamTensor) -> int:
        return _fsdp2_bytes(t, upcast, bytes_per_weight)

    moments, shards = [], 0
    for unit in fsdp2_units(tensors):
        whole = sum(t.numel * size(t) for t in unit)
        shards += sum(fsdp2_shard_numel(t.shape, spec.shard_group) * size(t) for t in unit)
        layer = unit[0].layer
        name = f"layer {layer}" if layer is not None else ", ".join(dict.fromkeys(t.module for t in unit))
        moments.append(_Moment(shards + whole, f"fully_shard of {name}",
                               {TERM_WEIGHTS: shards, EXTRA_LOAD_UNIT: whole}))
    return _largest(moments)


def _fsdp2_broadcast(tensors: Sequence[ParamTensor], spec: TrainingSpec, upcast: bool,
                     bytes_per_weight: int) -> _Moment:
    """accelerate's fsdp2_load_full_state_dict (cpu_ram_efficient_loading): the model sharded on the meta device, then
    parameter by parameter in state-dict order each rank makes the whole tensor on the GPU (the main process copies it
    in, the others receive it by broadcast), keeps its shard (distribute_tensor) and drops the whole one when the next
    is made: the previous whole tensor beside the next for a moment. A head tied to the embedding is a state-dict
    entry of its own, the last: the embedding sent whole once more, and its shard kept until accelerate ties the
    weights again."""
    def size(t: ParamTensor) -> int:
        return _fsdp2_bytes(t, upcast, bytes_per_weight)

    order = list(tensors)
    if head_tied_to_embedding(tensors) and (embedding := token_embedding(tensors)) is not None:
        order.append(dataclasses.replace(embedding, name="lm_head.weight (tied)"))
    moments, shards, previous = [], 0, 0
    for t in order:
        whole = t.numel * size(t)
        shard = fsdp2_shard_numel(t.shape, spec.shard_group) * size(t)
        # distribute_tensor scatters padded chunks where dim 0 does not divide evenly: the padded one beside the shard
        padded = shard if t.shape and t.shape[0] % spec.shard_group else 0
        moments.append(_Moment(shards + previous + whole, f"{t.name} broadcast whole",
                               {TERM_WEIGHTS: shards, EXTRA_LOAD_UNIT: previous + whole}))
        moments.append(_Moment(shards + whole + shard + padded, f"{t.name} broadcast whole",
                               {TERM_WEIGHTS: shards + shard, EXTRA_LOAD_UNIT: whole + padded}))
        shards, previous = shards + shard, whole
    return _largest(moments)


def _largest_module(tensors: Sequence[ParamTensor]) -> tuple[str, int]:
    modules: dict[str, int] = {}
    for t in tensors:
        modules[t.module] = modules.get(t.module, 0) + t.numel
    return max(modules.items(), key=lambda item: item[1])


def path_of(spec: TrainingSpec) -> str:
    if spec.tp > 1 or spec.pp > 1 or spec.cp > 1 or spec.ep > 1:
        return PATH_SHARDED
    if spec.sharding == Sharding.fsdp:
        return PATH_FSDP2
    if spec.sharding == Sharding.deepspeed and spec.zero_stage == 3:
        return PATH_ZERO3
    if spec.qlora:
        return PATH_TORCHTUNE_QLORA if spec.qlora_quantizer.value == "torchao" else PATH_QLORA
    return PATH_HOST_THEN_GPU


def estimate(base: Sequence[ParamTensor], subset: TrainableSubset, spec: TrainingSpec, weights_bytes: int,
             bytes_per_weight: int, bytes_16: int, upcast_fsdp2: bool, architecture_known: bool,
             model_type: str | None = None, conv1d: bool = False) -> LoadPhase:
    """The load's GPU peak on this rank and its host memory. ``base``: the model's tensors as the checkpoint holds
    them (no LoRA adapters); ``subset``: what the step trains (adapters, quantized and upcast names);
    ``weights_bytes``: the step's weights term on this rank; ``bytes_per_weight``: the recipe's weight dtype's size
    (what from_pretrained loads in); ``bytes_16``: the 16-bit compute dtype's size (QLoRA
    loads in it); ``upcast_fsdp2``: FSDP2 keeps fp32 shards of the trainable parameters (mixed precision);
    ``model_type`` (its checkpoint conversions) and ``conv1d`` (GPT-2's transposed weights)."""
    path = path_of(spec)
    per_node = spec.gpus_per_node
    largest_tensor = max((t.numel for t in base), default=0)
    unmodelled = ""
    if spec.qlora and path not in (PATH_QLORA, PATH_TORCHTUNE_QLORA):
        unmodelled = ("; QLoRA's quantizing load under this sharding is not modelled: what arrives whole is counted "
                      "unquantized, the rest as the step's weights")
    if not architecture_known and path in (PATH_ZERO3, PATH_FSDP2):
        path, unmodelled = PATH_SHARDED, "; without an architecture its modules are unknown: counted as the weights"

    def phase(top: _Moment, host: int, description: str, accuracy: str, processes: int = per_node) -> LoadPhase:
        """``processes``: how many of a node's processes hold ``host`` bytes."""
        return LoadPhase(path=path, peak_bytes=top.bytes, moment=top.moment, breakdown=top.breakdown,
                         host_bytes=host, host_bytes_per_node=host * processes, description=description + unmodelled,
                         accuracy=accuracy)

    weights_only = _Moment(weights_bytes, "the weights on the GPU", {TERM_WEIGHTS: weights_bytes})
    if path == PATH_QLORA:
        return phase(_qlora(base, subset, bytes_16, model_type, conv1d), largest_tensor * bytes_16,
                     "transformers from_pretrained with a bitsandbytes 4-bit config: one checkpoint tensor at a time "
                     "onto the GPU in 16-bit, each Linear weight quantized there (Params4bit._quantize, "
                     "functional.quantize_4bit)"
                     + (", then PEFT's prepare_model_for_kbit_training casts the other 16-bit parameters to fp32"
                        if subset.upcast else "") + "; the host holds one checkpoint tensor at a time (torchtune's "
                     "QLoRA: --qlora-quantizer torchao)", MEASURED)
    if path == PATH_TORCHTUNE_QLORA:
        return phase(_torchtune_qlora(base, subset, weights_bytes), sum(t.numel for t in base) * bytes_16,
                     "torchtune's QLoRA (recipes/lora_finetune_single_device.py _setup_model): the model built on the "
                     "GPU, each quantized weight made in 16-bit and turned into torchao's NF4Tensor (to_nf4) as its "
                     "layer is built, then load_state_dict moves each checkpoint tensor to the GPU and quantizes it "
                     "again (NF4Tensor.copy_); torchtune's checkpointer holds the whole checkpoint on the host. "
                     "to_nf4 as torchao 0.2 on runs it (in chunks of 2^20 elements; torchao 0.1 compared whole "
                     "tensors with the 16 codes, 64 B more per element)", MODELLED_TORCHAO)
    if path == PATH_FSDP2:
        tensors = subset.tensors
        trainable = [t for t in tensors if t.trainable]
        host = sum(t.numel * _fsdp2_bytes(t, upcast_fsdp2, bytes_per_weight) for t in base)
        if upcast_fsdp2 and bytes_per_weight < BYTES_PER_FP32 and trainable:
            host += trainable[-1].numel * bytes_per_weight  # the last cast: its 16-bit tensor beside its fp32 copy
        if spec.cpu_ram_efficient_loading and not spec.qlora:
            # (the main process's host memory: on the others the model is on the meta device)
            return phase(_fsdp2_broadcast(tensors, spec, upcast_fsdp2, bytes_per_weight), host,
                         "accelerate's fsdp2_prepare_model with cpu_ram_efficient_loading: only the main process loads "
                         "the model on the host" + (" and casts its trainable parameters to fp32 there" if upcast_fsdp2
                                                    else "")
                         + "; the model is sharded on the meta device, then fsdp2_load_full_state_dict sends each "
                           "parameter whole to every rank's GPU, which keeps its shard", MEASURED_FSDP2, processes=1)
        return phase(_fsdp2(tensors, spec, upcast_fsdp2, bytes_per_weight), host,
                     "accelerate's fsdp2_prepare_model (HF Trainer, fsdp_version 2, cpu_ram_efficient_loading off): "
                     "every process loads the model on the host"
                     + (", casts its trainable parameters to fp32 there" if upcast_fsdp2 else "")
                     + ", then fully_shard moves each unit whole to the GPU and shards it (with "
                       "--cpu-ram-efficient-loading only the main process holds the model on the host)",
                     MEASURED_FSDP2)
    if path == PATH_ZERO3:
        module, numel = _largest_module(base)
        gathered = numel * bytes_per_weight
        return phase(_Moment(weights_bytes + gathered, f"loading {module}, gathered",
                             {TERM_WEIGHTS: weights_bytes, EXTRA_LOAD_GATHERED: gathered}), 0,
                     "transformers under deepspeed.zero.Init: each parameter partitioned as it is made, then loaded "
                     "module by module inside GatheredParameters (the module's own parameters whole on every rank); "
                     "rank 0 reads each checkpoint shard file on the host (not counted)", MODELLED)
    if path == PATH_SHARDED:
        return phase(weights_only, 0,
                     "torchtitan: the model built on the meta device, each rank's shards made on the GPU and the "
                     "checkpoint read into them (torch.distributed.checkpoint); the reader's host buffers are not "
                     "counted", MODELLED)
    host = sum(t.numel for t in base) * bytes_per_weight
    merged = model_type in MERGED_EXPERTS
    # (without merged experts every arrival is the parameter itself: the weights are the largest moment)
    arrivals = _arrivals(base, TrainableSubset(tuple(base)), bytes_per_weight, model_type, conv1d)[0] if merged else []
    return phase(_largest([weights_only, *arrivals]), host,
                 "transformers from_pretrained in the recipe's weight dtype: onto the host and then moved to the GPU "
                 "tensor by tensor (HF Trainer, deepspeed.initialize; the whole model on the host in every process, "
                 "as counted), or with a device_map onto the GPU one tensor at a time"
                 + (" (the per-expert checkpoint tensors merged there: counted)" if merged else
                    ": nothing beside the weights on the GPU either way")
                 + (". Sequential loading; transformers' default thread pool may read later experts ahead of the "
                    "merges (not counted)" if merged else ""), MEASURED)
