"""Data parallelism: which part of each model state one GPU holds, and the working buffers each engine adds.

Reference for the model states: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models" (SC'20), Figure 1 — per device, for Psi parameters, K bytes of optimizer state per
parameter and N devices: stage 0: (2 + 2 + K) Psi; stage 1: 2Psi + 2Psi + K Psi / N; stage 2:
2Psi + (2 + K) Psi / N; stage 3: (2 + 2 + K) Psi / N (seed 001 restates these).
Engines (--sharding):
  deepspeed  partition sizes, buffers and offload as deepspeed 0.19.8 runs them (sources cited inline)
  torch      DistributedDataParallel (stage 0) and ZeroRedundancyOptimizer (stage 1: whole parameters)
  fsdp       PyTorch FSDP2 fully_shard per decoder layer and on the root (stage 3: reshard after forward;
             stage 2: keep parameters unsharded from forward to backward)
  megatron   Megatron-LM's DDP (stage 0) and distributed optimizer (stage 1): memcalc.megatron
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from memcalc import expert_parallel, megatron
from memcalc.deepspeed_defaults import DEEPSPEED_VERSION_READ, overlap_comm
from memcalc.model import ROLE_EMBEDDING, ROLE_EXPERT, ParamTensor
from memcalc.precision import BYTES_PER_DTYPE, Dtype
from memcalc.spec import Offload, Sharding, TrainingSpec
from memcalc.units import BYTES_PER_FP32, BYTES_PER_GIB
from memcalc.vocab import (
    ALL_PHASES,
    BACKWARD_ONLY,
    CATEGORY_TEMPORARIES,
    FORWARD_BACKWARD,
    FORWARD_ONLY,
    STEP_ONLY,
    TERM_DDP_BUCKETS,
    TERM_FSDP_ALL_GATHER,
    TERM_FSDP_REDUCE_SCATTER,
    TERM_FSDP_SHARDED_GRADIENTS,
    TERM_FSDP_UNSHARDED,
    TERM_ZERO3_FP32_GRADS,
    TERM_ZERO3_GATHERED,
    TERM_ZERO3_GATHERED_GRADS,
    TERM_ZERO_OFFLOAD_GRAD_BUFFER,
    TERM_ZERO_REDUCE_BUCKET,
    Term,
)

# deepspeed/runtime/zero/stage_1_and_2.py: each param group is flattened with
# flatten_dense_tensors_aligned(..., self.nccl_start_alignment_factor * dp_size), where
# nccl_start_alignment_factor = 2 (4-byte alignment of 16-bit elements), then split into dp_size equal parts.
ZERO12_ALIGNMENT_FACTOR = 2
DS = f"deepspeed {DEEPSPEED_VERSION_READ}"
# torch/nn/parallel/distributed.py: DistributedDataParallel(bucket_cap_mb=25); the first bucket is 1 MiB.
DDP_BUCKET_CAP_BYTES = 25 * 2**20


@dataclass(frozen=True, eq=False, repr=False)
class RankHoldings:
    """What one GPU holds for each model state (element counts), and the engine's working buffers."""

    weight_numel: int  # parameters in the recipe's weight dtype on the GPU (all, or this rank's shard)
    grad_numel: int  # gradients of trainable parameters on the GPU (all, or this rank's partition)
    master_numel: int  # fp32 master copy of trainable parameters (when the recipe has one)
    optimizer_shapes: tuple[tuple[int, ...], ...]  # what the optimizer steps over on this rank
    effective_stage: int
    bytes_per_grad_override: int | None = None  # e.g. DeepSpeed ZeRO-3 keeps its gradient partition in fp32
    bytes_per_weight_override: int | None = None  # e.g. FSDP2 with a MixedPrecisionPolicy keeps fp32 shards
    fp32_grad_copy: bool = True  # the step casts 16-bit gradients to the master dtype (when there is one)
    optimizer_on_cpu: bool = False  # ZeRO-Offload: master, states and the step live in CPU RAM
    weights_on_cpu_numel: int = 0  # ZeRO-3 parameter offload: this rank's 16-bit shard in CPU RAM
    # Where the gradients term lives: "gpu" (held from backward to the step), "gpu-backward" (on the GPU during
    # backward only: ZeRO-1-Offload copies them to CPU RAM at its end) or "cpu" (ZeRO-3-Offload's partition).
    grads_held: str = "gpu"
    grads_source: str = ""  # why the gradients term is what it is, when an engine changes it
    buffers: tuple[Term, ...] = ()
    notes: tuple[str, ...] = field(default=())
    engine: str = "none"
    # FSDP2, during a layer's backward, beyond the buffers alive in forward: the next layer prefetched
    # (reshard_after_forward), the layer's unsharded gradients and their reduce-scatter copy in the reduce
    # dtype, and its sharded gradient (measured on gloo ranks and the fake process group).
    mid_backward_extra_bytes: int = 0
    # FSDP2, at the last layer's backward: the layer before it prefetched (reshard_after_forward) and the root unit's
    # unsharded gradients made by then (the head's and the final norm's; reduce-scattered at the end of backward)
    last_layer_extra_bytes: int = 0
    # --ep: a layer's experts unsharded while they run (and their all-gather output, efsdp > 1), and the excess of
    # the last experts' all-gather output over a layer's, kept from the forward's end into the backward's start
    experts_gathered_bytes: int = 0
    experts_kept_bytes: int = 0
    # with reshard_after_forward, inside a layer's forward: that layer's all-gather output, kept after the copy-out until
    # the next unit's (FSDPParamGroup.wait_for_unshard: AllGatherState in the forward)
    layer_all_gather_bytes: int = 0
    # FSDP2: the root unit's unsharded gradients (the head's and the final norm's), made by the head's backward and
    # reduce-scattered at the end of backward
    root_made_bytes: int = 0
    # --ep: at a layer's experts' reduce-scatter: its buffers, the layer before prefetched and the root's gradients
    experts_reduce_bytes: int = 0
    # FSDP2, late in backward (the first layer's turn): the sharded gradients not made yet (the first layer's units',
    # reduce-scattered after its backward, and the root's, at the end of backward); beside them the root's unsharded
    # gradients and, with reshard_after_forward, the next layer's all-gather output (prefetched) and the last
    # reduce-scatter's input, which FSDP2 keeps until the next reduce-scatter (measured at Llama-3-8B's second layer on
    # the fake process group, in the reduce dtype)
    late_unmade_grad_numel: int = 0
    late_extra_bytes: int = 0
    # --tp: elements of the token embedding's gradient beyond its shard (DTensor's embedding backward returns it whole),
    # counted in grad_numel; made by the embedding's backward, the last
    whole_embedding_grad_extra: int = 0
    late_second_layer: bool = False  # ... counted at the second layer's turn (its checkpointed input still kept)
    late_top_grad_numel: int = 0  # ... or at the second layer from the top: the sharded gradients made then (one layer's)
    # FSDP2 at the root's reduce-scatter, the end of backward: its unsharded gradients and their copy in the reduce
    # dtype beside every layer's sharded gradients (its own shards not made yet)
    root_reduce_bytes: int = 0
    root_shard_grad_numel: int = 0
    # ... under --tp, at the root's post-backward before it reshards: its unsharded parameters, the last reduce-scatter's
    # input (kept), its unsharded gradients and a copy of the largest (the head's) beside them
    root_reduce_tp_bytes: int = 0


def zero12_partition_numel(num_elements: int, num_gpus: int) -> int:
    """Elements per rank of one flat group under ZeRO-1/2 (DeepSpeed alignment padding included)."""
    alignment = ZERO12_ALIGNMENT_FACTOR * num_gpus
    padded = math.ceil(num_elements / alignment) * alignment
    return padded // num_gpus


def zero3_shard_numel(numel: int, num_gpus: int) -> int:
    """Elements per rank of one parameter under ZeRO-3.

    deepspeed/runtime/zero/partition_parameters.py partitions every parameter on its own:
    partition_size = ceil(ds_numel / world_size).
    """
    return math.ceil(numel / num_gpus)


def fsdp2_shard_numel(shape: tuple[int, ...], num_gpus: int, dim: int = 0) -> int:
    """Elements per rank of one parameter under FSDP2: dim ``dim`` (0 unless a shard_placement_fn says Shard(dim))
    split in ceil(size / N), padded (torch/distributed/fsdp/_fully_shard/_fsdp_param.py shards with torch.chunk on
    that dim and pads each rank's chunk to the same size)."""
    if not shape:
        return 1
    return math.ceil(shape[dim] / num_gpus) * math.prod(shape[:dim] + shape[dim + 1:])


def fsdp2_gathered_numel(shape: tuple[int, ...], num_gpus: int, dim: int = 0) -> int:
    """Elements of one parameter's unsharded storage under FSDP2: its all-gather output, every rank's padded shard
    (FSDPParam.init_all_gather_outputs allocates shard numel x world; the parameter is an as_strided view of it)."""
    return fsdp2_shard_numel(shape, num_gpus, dim) * num_gpus


def _units(tensors: Sequence[ParamTensor], size: Callable[[ParamTensor], int] | None = None) -> dict[str, int]:
    """ZeRO-3 gathers per module as it runs: a transformer block at a time, or a top-level tensor on its own (each
    tensor's elements, or ``size`` of it)."""
    units: dict[str, int] = {}
    for tensor in tensors:
        key = f"layer {tensor.layer}" if tensor.layer is not None else tensor.name
        units[key] = units.get(key, 0) + (size(tensor) if size else tensor.numel)
    return units


def _n(value: int) -> str:
    return f"{value:,}"


def rank_holdings(tensors: Sequence[ParamTensor], spec: TrainingSpec, master_dtype: Dtype | None,
                  architecture_known: bool, bytes_per_weight: int, bytes_per_grad: int) -> RankHoldings:
    """What one GPU holds under the engine the spec names.

    On one GPU an engine still runs as it does on many (DeepSpeed's ZeRO optimizer keeps its flat partition,
    reduce bucket and offload; FSDP2 its fp32 shards and unsharded copies), only with nothing to divide: the figures
    follow the engine, with a note. Plain training (stage 0, or the torch engine without DDP) holds everything once.
    """
    num_gpus, has_master = spec.num_gpus, master_dtype is not None
    if spec.sharding == Sharding.megatron:
        return _megatron(tensors, spec, has_master)
    if spec.sharding == Sharding.fsdp:
        holdings = _fsdp2(tensors, spec, has_master, bytes_per_weight)
    elif spec.sharding == Sharding.torch:
        if num_gpus == 1:
            return _replicated(tensors, has_master)
        return _torch_ddp(tensors, spec, has_master, bytes_per_grad)
    elif spec.zero_stage == 0 and num_gpus == 1:
        return _replicated(tensors, has_master)
    else:
        holdings = _deepspeed(tensors, spec, master_dtype, architecture_known, bytes_per_weight, bytes_per_grad)
    if num_gpus == 1:
        offload = f"; the offload to CPU RAM ({spec.offload.value}) applies" if spec.offload != Offload.none else ""
        note = (f"{holdings.engine} stage {spec.zero_stage} on 1 GPU divides nothing, but runs as it does on many "
                f"(its buffers and dtypes are counted){offload}")
        holdings = dataclasses.replace(holdings, notes=(*holdings.notes, note))
    return holdings


def _megatron(tensors: Sequence[ParamTensor], spec: TrainingSpec, has_master: bool) -> RankHoldings:
    """Megatron-LM's DDP (--zero 0) or distributed optimizer (--zero 1) over ``spec.num_gpus`` data-parallel ranks
    (memcalc.megatron): the weights and the fp32 main-gradient buffer whole, alive all step; the fp32 main parameters
    and Adam's states whole, or this rank's 1/dp range of the buffer."""
    dp, distributed = spec.num_gpus, spec.zero_stage == 1
    trainable = [t.numel for t in tensors if t.trainable]
    buffer = megatron.buffer_numel(trainable, dp, distributed)
    mine = math.ceil(buffer / dp) if distributed else sum(trainable)
    padding = buffer - sum(trainable)
    what = ("the distributed optimizer: fp32 main parameters and Adam's states for this rank's 1/dp range of the "
            f"buffer ({mine:,} elements)" if distributed else "an fp32 main copy of every parameter and Adam's states")
    notes = [megatron.NOTE, f"--engine megatron: {'bf16 weights, ' if has_master else ''}fp32 main gradients in one "
             f"buffer kept all step (zeroed, not freed, between steps); {what}"
             + (f"; the buffers' alignment padding {padding:,} elements (counted)" if padding else "")]
    return RankHoldings(
        weight_numel=sum(t.numel for t in tensors) + (padding if distributed else 0), grad_numel=buffer,
        master_numel=mine if has_master else 0, optimizer_shapes=((mine,),) if trainable else (),
        effective_stage=1 if distributed else 0, bytes_per_grad_override=BYTES_PER_FP32, fp32_grad_copy=False,
        grads_held="buffer", notes=tuple(notes), engine="megatron-distopt" if distributed else "megatron-ddp",
        grads_source=f"{megatron.SOURCE}: _ParamAndGradBuffer's grad_data, one fp32 buffer (main_grad views) "
                     "allocated once and zeroed between steps" + (" (its alignment padding included)" if padding
                                                                 else ""),
    )


def _replicated(tensors: Sequence[ParamTensor], has_master: bool) -> RankHoldings:
    trainable = [t for t in tensors if t.trainable]
    num_trainable = sum(t.numel for t in trainable)
    return RankHoldings(
        weight_numel=sum(t.numel for t in tensors), grad_numel=num_trainable,
        master_numel=num_trainable if has_master else 0, optimizer_shapes=tuple(t.shape for t in trainable),
        effective_stage=0,
    )


def zero3_sub_group_numels(partition_numels: Sequence[int], sub_group_size: int) -> list[int]:
    """Elements in each ZeRO-3 optimizer sub-group, from this rank's partition of each trainable parameter in
    parameter order (one optimizer param group).

    deepspeed 0.19.8 runtime/zero/stage3.py, DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups: the whole group
    when sub_group_size >= its partitioned total; otherwise parameters are added in order and a sub-group closes once
    it holds at least sub_group_size elements (so it may exceed it by up to one parameter), or at the last parameter.
    One param group is what deepspeed.initialize(model_parameters=model.parameters()) and HF Trainer with a config
    "optimizer" build; HF Trainer's own optimizer has two (with and without weight decay), split each on its own.
    """
    total = sum(partition_numels)
    if sub_group_size >= total:
        return [total] if partition_numels else []
    groups, current = [], 0
    for index, numel in enumerate(partition_numels):
        current += numel
        if current >= sub_group_size or index == len(partition_numels) - 1:
            groups.append(current)
            current = 0
    return groups


def _deepspeed(tensors: Sequence[ParamTensor], spec: TrainingSpec, master_dtype: Dtype | None, architecture_known: bool,
               bytes_per_weight: int, bytes_per_grad: int) -> RankHoldings:
    stage, num_gpus, buffers_cfg = spec.zero_stage, spec.num_gpus, spec.zero_buffers
    has_master = master_dtype is not None
    trainable = [t for t in tensors if t.trainable]
    num_all = sum(t.numel for t in tensors)
    num_trainable = sum(t.numel for t in trainable)
    notes: list[str] = []
    offload_optimizer = spec.offload in (Offload.optimizer, Offload.both)
    offload_params = spec.offload in (Offload.params, Offload.both)
    overlap = buffers_cfg.overlap_comm if buffers_cfg.overlap_comm is not None else overlap_comm(stage)
    buffers: list[Term] = []
    if stage == 0:
        base = _replicated(tensors, has_master)
        notes.append("ZeRO stage 0 with several GPUs is plain data parallelism: every GPU holds everything")
        return dataclasses.replace(base, notes=tuple(notes), engine="deepspeed")
    if stage in (1, 2):
        part = zero12_partition_numel(num_trainable, num_gpus)
        # stage_1_and_2.py __init__: contiguous_gradients = contiguous_gradients or cpu_offload.
        if buffers_cfg.contiguous_gradients or offload_optimizer:
            # stage_1_and_2.py setup_buckets(): torch.empty(reduce_bucket_size, dtype=model dtype) per
            # micro-step, doubled when overlap_comm; released after the step (_release_ipg_buffers).
            count = 2 if overlap else 1
            size = count * buffers_cfg.reduce_bucket_size * bytes_per_weight
            buffers.append(Term(
                name=TERM_ZERO_REDUCE_BUCKET, bytes=size,
                formula=f"{count} x reduce_bucket_size {_n(buffers_cfg.reduce_bucket_size)} x {bytes_per_weight} B",
                source=f"{DS} stage_1_and_2.py setup_buckets (contiguous_gradients, overlap_comm={overlap})",
                category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY,
            ))
        grad_numel, grads_held, grads_source = (part if stage == 2 else num_trainable), "gpu", ""
        if offload_optimizer:
            largest = max((t.numel for t in trainable), default=0)
            buffers.append(Term(
                name=TERM_ZERO_OFFLOAD_GRAD_BUFFER, bytes=largest * bytes_per_weight,
                formula=f"largest trainable parameter {_n(largest)} elements x {bytes_per_weight} B",
                source=f"{DS} stage_1_and_2.py __init__ (cpu_offload): temp_grad_buffer_for_gpu_offload, the "
                       "GPU staging buffer of gradient copies to CPU RAM, allocated once",
                category=CATEGORY_TEMPORARIES, phases=ALL_PHASES,
            ))
            if stage == 2:
                # copy_grads_in_partition (cpu_offload) copies each reduced gradient of this rank's partition
                # straight into the fp32 gradient of the CPU master: no 16-bit partition on the GPU.
                grad_numel = 0
                grads_source = (f"{DS} stage_1_and_2.py copy_grads_in_partition (cpu_offload): reduced gradients "
                                "go from the reduce bucket to the fp32 CPU partition; none are kept on the GPU")
            else:
                # Stage 1 keeps every p.grad through backward; the epilogue reduces them, copies this rank's part
                # to CPU RAM and sets p.grad = None (_clear_param_grad_only) before the step.
                grads_held = "gpu-backward"
                grads_source = (f"{DS} stage_1_and_2.py independent_gradient_partition_epilogue: with cpu_offload "
                                "every p.grad is reduced, copied to CPU RAM and cleared before the step")
        return RankHoldings(
            weight_numel=num_all, grad_numel=grad_numel,
            master_numel=part if has_master else 0, optimizer_shapes=((part,),) if num_trainable else (),
            effective_stage=stage, optimizer_on_cpu=offload_optimizer, buffers=tuple(buffers),
            grads_held=grads_held, grads_source=grads_source, notes=tuple(notes), engine="deepspeed",
        )
    # Stage 3: every tensor partitioned on its own, except those at or below
    # stage3_param_persistence_threshold elements, which stay whole on every rank (partition_parameters.py).
    threshold = buffers_cfg.stage3_param_persistence_threshold
    persistent = [t for t in tensors if t.numel <= threshold]
    shard_all = sum(t.numel if t.numel <= threshold else zero3_shard_numel(t.numel, num_gpus) for t in tensors)
    shard_trainable = sum(zero3_shard_numel(t.numel, num_gpus) for t in trainable)
    if persistent:
        notes.append(f"ZeRO-3 keeps {len(persistent)} tensors of <= {_n(threshold)} elements "
                     f"(stage3_param_persistence_threshold) whole on every GPU")
    units = _units(tensors)
    if architecture_known and units:
        unit_name, unit_numel = max(units.items(), key=lambda item: item[1])
        # Gathered while it runs: the module (bounded by stage3_max_live_parameters) plus the prefetch
        # bucket (stage3_prefetch_bucket_size) for the next modules (stage3.py / parameter_offload.py).
        live = min(unit_numel, buffers_cfg.stage3_max_live_parameters)
        prefetch = min(buffers_cfg.stage3_prefetch_bucket_size, max(0, num_all - live))
        buffers.append(Term(
            name=TERM_ZERO3_GATHERED, bytes=(live + prefetch) * bytes_per_weight,
            formula=f"largest module ({unit_name}) {_n(live)} + prefetch bucket {_n(prefetch)} params x {bytes_per_weight} B",
            source=f"{DS} ZeRO-3 all-gathers a module's parameters before it runs and prefetches up to "
                   "stage3_prefetch_bucket_size elements of the next ones",
            category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD,
        ))
        buffers.append(Term(
            name=TERM_ZERO3_GATHERED_GRADS, bytes=unit_numel * bytes_per_grad,
            formula=f"full gradients of {unit_name} before reduce-scatter: {_n(unit_numel)} x {bytes_per_grad} B",
            source=f"{DS} stage3.py reduces a module's gradients after its backward",
            category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY,
        ))
    else:
        notes.append("ZeRO-3 gathers one layer at a time; without an architecture (--params) the largest layer is "
                     "unknown, so the gathered working set is not counted")
    if buffers_cfg.stage3_max_reuse_distance > 0:
        # partitioned_param_coordinator.py __params_to_release: once the first step has traced the module order,
        # a module's gathered parameters are kept when they are used again within max_reuse_distance elements.
        kept = min(num_all, buffers_cfg.stage3_max_reuse_distance) * bytes_per_weight
        notes.append(f"not counted: from the second step ZeRO-3 keeps a module's gathered parameters when it runs again "
                     f"within stage3_max_reuse_distance {_n(buffers_cfg.stage3_max_reuse_distance)} parameters "
                     f"(the last layers and the head between forward and backward); up to {kept / BYTES_PER_GIB:,.2f} GiB "
                     "more per GPU; set it to 0 to release every module after use")
    if buffers_cfg.contiguous_gradients:
        # stage3.py __init__: bucket.buffer = torch.empty(reduce_bucket_size, dtype=...) for the whole run.
        buffers.append(Term(
            name=TERM_ZERO_REDUCE_BUCKET, bytes=buffers_cfg.reduce_bucket_size * bytes_per_weight,
            formula=f"reduce_bucket_size {_n(buffers_cfg.reduce_bucket_size)} x {bytes_per_weight} B",
            source=f"{DS} stage3.py: ipg bucket buffer allocated at initialisation (contiguous_gradients)",
            category=CATEGORY_TEMPORARIES, phases=ALL_PHASES,
        ))
    if not offload_optimizer:
        # stage3.py: gradients are reduce-scattered into grad_partitions_flat_buffer (grad_accum_dtype, by default
        # the model's 16-bit dtype: the gradients term). initialize_optimizer_states allocates gradient_buffer
        # (the largest sub-group, master dtype) once and, without offload, sets every .grad back to None at its end,
        # so it is gone before training. Each step, per sub-group, _prepare_fp32_grad_for_sub_group makes
        # flatten(its gradients).to(master_weights_and_grads_dtype) the master's .grad, freed after that sub-group's
        # step (_release_sub_group): the largest sub-group is alive at once, during the step only (the 16-bit flatten
        # copy lives only until the cast). With no master (fp32 or autocast weights) the flatten copy is the .grad.
        sub_groups = zero3_sub_group_numels([zero3_shard_numel(t.numel, num_gpus) for t in trainable],
                                            buffers_cfg.sub_group_size)
        largest = max(sub_groups, default=0)
        bytes_per_element = BYTES_PER_DTYPE[master_dtype] if master_dtype is not None else bytes_per_grad
        buffers.append(Term(
            name=TERM_ZERO3_FP32_GRADS, bytes=largest * bytes_per_element,
            formula=f"largest of {len(sub_groups)} optimizer sub-groups (sub_group_size "
                    f"{_n(buffers_cfg.sub_group_size)}): {_n(largest)} elements x {bytes_per_element} B",
            source=f"{DS} stage3.py _create_fp16_sub_groups, _prepare_fp32_grad_for_sub_group: one sub-group's "
                   "flat gradient in the master dtype, alive during its optimizer step",
            category=CATEGORY_TEMPORARIES, phases=STEP_ONLY,
        ))
    grads_source = ""
    if offload_optimizer:
        # stage3.py __init__: self.device = cpu with offload_optimizer, and grad_partitions_flat_buffer (16-bit
        # partitions of every gradient) is allocated there, pinned: reduce-scatter output goes to CPU RAM.
        grads_source = (f"{DS} stage3.py: with offload_optimizer, grad_partitions_flat_buffer (this rank's 16-bit "
                        "gradient partitions) lives in pinned CPU RAM")
    return RankHoldings(
        weight_numel=0 if offload_params else shard_all, grad_numel=shard_trainable,
        master_numel=shard_trainable if has_master else 0,
        optimizer_shapes=((shard_trainable,),) if shard_trainable else (), effective_stage=3,
        fp32_grad_copy=offload_optimizer,
        optimizer_on_cpu=offload_optimizer, weights_on_cpu_numel=shard_all if offload_params else 0,
        grads_held="cpu" if offload_optimizer else "gpu", grads_source=grads_source,
        buffers=tuple(buffers), notes=tuple(notes), engine="deepspeed",
    )


def zero_redundancy_partition(tensors: Sequence[ParamTensor], num_gpus: int) -> list[list[ParamTensor]]:
    """torch.distributed.optim.ZeroRedundancyOptimizer._partition_parameters: parameters sorted by size,
    largest first, each to the rank with the fewest elements so far (whole parameters, not elements)."""
    ranks: list[list[ParamTensor]] = [[] for _ in range(num_gpus)]
    sizes = [0] * num_gpus
    for tensor in sorted((t for t in tensors if t.trainable), key=lambda t: t.numel, reverse=True):
        rank = min(range(num_gpus), key=lambda r: sizes[r])
        ranks[rank].append(tensor)
        sizes[rank] += tensor.numel
    return ranks


ENGINE_FSDP2_PIPELINE = "fsdp2-pp"
FSDP2_MIXED_NOTE = ("--sharding fsdp with a bf16/fp16 recipe means fp32 sharded parameters with "
                    "MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=fp32): the weights are fp32 shards (they are "
                    "the master copy)")
PIPELINE_FSDP_SOURCE = ("torch/distributed/pipelining/stage.py: backward_maybe_with_nosync runs every micro-batch's "
                        "backward with set_requires_gradient_sync(False) and set_reshard_after_backward(False); "
                        "perform_reduce_grad reduce-scatters once, after the schedule's last backward")


def fsdp2_under_pipeline(tensors: Sequence[ParamTensor], spec: TrainingSpec, has_master: bool,
                         bytes_per_weight: int) -> RankHoldings:
    """FSDP2 over a pipeline stage's data-parallel ranks (``spec``: the data-parallel view, num_gpus = dp). The
    schedule unshards each unit at its first use and keeps it so to the schedule's end (no reshard after backward,
    and under torchtitan's default no reshard after forward either); the gradients accumulate unsharded, in the reduce
    dtype (FSDPParam.to_accumulated_grad_if_needed upcasts a unit's 16-bit gradients after its backward), until
    perform_reduce_grad reduce-scatters them. The step sees only shards. (The first micro-batch's forward all-gathers
    unit by unit, beside fewer activations than a later forward holds: not a peak, not counted.)"""
    num_gpus = spec.num_gpus
    trainable = [t for t in tensors if t.trainable]

    def ranks(t: ParamTensor) -> int:  # (--ep: each experts module sharded over the ranks holding the same experts)
        return expert_parallel.sharding_ranks(t, num_gpus, spec.ep, spec.ep_tp)

    split = spec.ep > 1

    def dim(t: ParamTensor) -> int:  # (--ep-shard-dim: the experts' FSDP2 placement)
        return spec.ep_shard_dim if split and t.role == ROLE_EXPERT else 0

    def shard(t: ParamTensor) -> int:
        return fsdp2_shard_numel(t.shape, ranks(t), dim(t))

    shard_all = sum(shard(t) for t in tensors)
    shard_trainable = sum(shard(t) for t in trainable)
    # Each unit unsharded is its all-gather output, every rank's padded shard: a tensor with fewer rows than the ranks
    # sharding it (transformers' fused experts, one row an expert; a small router) holds ranks x ceil(rows / ranks)
    # rows, its parameter a view of them (measured on gloo ranks: one expert a rank over 2 ranks, -2.74% before).
    # (--ep: each experts module is an FSDP2 unit of its own, transformers' apply_fully_sharded_data_parallelism)
    def gathered(t: ParamTensor) -> int:
        return fsdp2_gathered_numel(t.shape, ranks(t), dim(t))

    units = _units([t for t in tensors if not (split and t.role == ROLE_EXPERT)], gathered)
    units.update((f"{key} experts", n) for key, n in _units(
        [t for t in tensors if split and t.role == ROLE_EXPERT], gathered).items())
    largest_unit = max(units.values(), default=0)
    mixed = has_master
    bytes_per_reduced = BYTES_PER_FP32 if mixed else bytes_per_weight
    unsharded = sum(units.values())
    buffers = (
        Term(name=TERM_FSDP_UNSHARDED, bytes=unsharded * bytes_per_weight,
             formula=f"every unit of the stage unsharded: {_n(unsharded)} params x {bytes_per_weight} B",
             source=f"{PIPELINE_FSDP_SOURCE}: so each unit stays unsharded from its first use to the schedule's end",
             category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD),
        Term(name=TERM_FSDP_REDUCE_SCATTER, bytes=largest_unit * bytes_per_reduced,
             formula=f"the largest unit's reduce-scatter input {_n(largest_unit)} x {bytes_per_reduced} B (reduce "
                     "dtype)" + (", or in backward its 16-bit gradients before the upcast" if mixed else ""),
             source=f"{PIPELINE_FSDP_SOURCE}; FSDPParamGroup.post_backward: foreach_reduce copies a unit's gradients "
                    "into one reduce-scatter input",
             category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY),
        Term(name=TERM_FSDP_SHARDED_GRADIENTS, bytes=shard_trainable * bytes_per_reduced,
             formula=f"{_n(shard_trainable)} trainable params (this rank's shards) x {bytes_per_reduced} B",
             source=f"{PIPELINE_FSDP_SOURCE}: the reduce-scatter outputs, the gradients the step reads",
             category=CATEGORY_TEMPORARIES, phases=STEP_ONLY),
    )
    notes = [(f"FSDP2 under pipeline parallelism: each stage's units stay unsharded and its gradients accumulate "
              f"unsharded{' in fp32 (the reduce dtype)' if mixed else ''} through the schedule; reduce-scattered over "
              f"the {num_gpus} data-parallel ranks at its end ({PIPELINE_FSDP_SOURCE.split(':')[0]})")]
    if spec.zero_stage == 3:
        notes.append("--zero 3 (reshard_after_forward=True) on a pipeline stage: counted as --zero 2, every unit "
                     "unsharded through the schedule; after its first backward a unit stays so (set_reshard_after_"
                     "backward(False)), so only the forwards before it hold less: an upper bound, measured the same "
                     "where 1F1B runs forwards after the first backward, up to 8.4% above where every forward runs "
                     "before it (GPipe, or 1F1B with no more micro-batches than stages; gloo ranks)")
    if mixed:
        notes.append(FSDP2_MIXED_NOTE)
    return RankHoldings(
        weight_numel=shard_all, grad_numel=sum(t.numel for t in trainable), master_numel=0,
        optimizer_shapes=tuple((shard(t),) for t in trainable),
        effective_stage=spec.zero_stage, bytes_per_grad_override=BYTES_PER_FP32 if mixed else None,
        bytes_per_weight_override=BYTES_PER_FP32 if mixed else None, fp32_grad_copy=False, grads_held="gpu-backward",
        grads_source=f"every trainable parameter of the stage, unsharded, accumulated through the schedule "
                     f"({PIPELINE_FSDP_SOURCE.split(':')[0]})",
        buffers=buffers, notes=tuple(notes), engine=ENGINE_FSDP2_PIPELINE,
    )


def _torch_ddp(tensors: Sequence[ParamTensor], spec: TrainingSpec, has_master: bool, bytes_per_grad: int) -> RankHoldings:
    base = _replicated(tensors, has_master)
    # DistributedDataParallel copies gradients into flat communication buckets (gradient_as_bucket_view
    # defaults to False): a second copy of every gradient, allocated once and kept for the whole run
    # (measured on gloo ranks: tests/test_parallel.py).
    buckets = Term(
        name=TERM_DDP_BUCKETS, bytes=base.grad_numel * bytes_per_grad,
        formula=f"{_n(base.grad_numel)} gradients x {bytes_per_grad} B in {DDP_BUCKET_CAP_BYTES // 2**20} MiB buckets",
        source="torch/nn/parallel/distributed.py: Reducer buckets (gradient_as_bucket_view=False by default)",
        category=CATEGORY_TEMPORARIES, phases=ALL_PHASES,
    )
    if spec.zero_stage == 0:
        return dataclasses.replace(base, buffers=(buckets,), engine="torch-ddp")
    partition = zero_redundancy_partition(tensors, spec.num_gpus)
    loads = [sum(t.numel for t in rank) for rank in partition]
    busiest = max(range(spec.num_gpus), key=lambda r: loads[r])
    mine = partition[busiest]
    note = (f"ZeroRedundancyOptimizer shards whole parameters: rank loads {min(loads):,} to {max(loads):,} "
            f"elements; shown: the most loaded rank ({busiest})")
    return RankHoldings(
        weight_numel=base.weight_numel, grad_numel=base.grad_numel,
        master_numel=sum(t.numel for t in mine) if has_master else 0,
        optimizer_shapes=tuple(t.shape for t in mine), effective_stage=1,
        buffers=(buckets,), notes=(note,), engine="torch-zero1",
    )


def _fsdp2(tensors: Sequence[ParamTensor], spec: TrainingSpec, has_master: bool, bytes_per_weight: int) -> RankHoldings:
    num_gpus = spec.num_gpus
    reshard = spec.zero_stage == 3
    trainable = [t for t in tensors if t.trainable]

    def ranks(t: ParamTensor) -> int:  # (--ep: the experts over the ranks holding the same ones)
        return expert_parallel.sharding_ranks(t, num_gpus, spec.ep, spec.ep_tp)

    def dim(t: ParamTensor) -> int:  # (--ep-shard-dim: the experts' FSDP2 placement)
        return spec.ep_shard_dim if spec.ep > 1 and t.role == ROLE_EXPERT else 0

    def shard(t: ParamTensor) -> int:  # this rank's elements of ``t``
        return fsdp2_shard_numel(t.shape, ranks(t), dim(t))

    # A unit unsharded is its parameters' all-gather outputs, every rank's padded shard (FSDPParam.
    # init_all_gather_outputs, the parameter an as_strided view of it): a tensor whose sharded dimension does not divide
    # by the ranks holds a few padded rows more than its elements; with fewer experts per rank than the ranks sharding
    # them, those ranks' padded rows of one expert each (measured, a tiny Mixtral's forward 1.4% to 1.8% low before)
    def gathered(t: ParamTensor) -> int:
        return fsdp2_gathered_numel(t.shape, ranks(t), dim(t))

    shard_all = sum(shard(t) for t in tensors)
    shard_trainable = sum(shard(t) for t in trainable)
    experts = [t for t in tensors if t.role == ROLE_EXPERT] if spec.ep > 1 else []
    units = _units([t for t in tensors if not experts or t.role != ROLE_EXPERT], gathered)
    layer_units = {k: v for k, v in units.items() if k.startswith("layer ")}
    root_numel = sum(v for k, v in units.items() if not k.startswith("layer "))
    largest_layer = max(layer_units.values(), default=0)
    # --ep: each experts module is an FSDP2 unit of its own (transformers' apply_fully_sharded_data_parallelism), over
    # the efsdp ranks holding the same experts
    largest_experts = max(_units(experts).values(), default=0)
    efsdp = num_gpus * spec.ep_tp // spec.ep if experts else 1  # (--tp: the expert mesh spans its ranks)
    padded = _units(experts, gathered)
    # With a MixedPrecisionPolicy(param_dtype=16-bit, reduce_dtype=fp32) the sharded parameters are the
    # fp32 master: FSDP2 keeps them fp32, all-gathers 16-bit copies per unit, reduce-scatters fp32 grads.
    mixed = has_master
    bytes_per_gathered = bytes_per_weight
    buffers: list[Term] = []
    if reshard:
        unsharded = root_numel + largest_layer  # the root is not resharded after forward (FSDP2 heuristic)
        what = f"root (embeddings, final norm, head) {_n(root_numel)} + one layer {_n(largest_layer)}"
    else:
        # (--ep: the experts units too: fully_shard(reshard_after_forward=False) on each experts module)
        unsharded = sum(units.values()) + sum(padded.values())
        what = f"every unit stays unsharded from forward to backward: {_n(unsharded)}"
    buffers.append(Term(
        name=TERM_FSDP_UNSHARDED, bytes=unsharded * bytes_per_gathered,
        formula=f"{what} params x {bytes_per_gathered} B",
        source="torch FSDP2 fully_shard: all-gather output per unit; reshard_after_forward="
               f"{reshard} (the root module keeps its parameters through backward)",
        category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD,
    ))
    if not reshard:
        # Kept units plus the next unit's all-gather output, alive until its parameters are copied out
        # (measured: one layer's 16-bit parameters above the kept units at the forward's peak).
        buffers.append(Term(
            name=TERM_FSDP_ALL_GATHER, bytes=largest_layer * bytes_per_gathered,
            formula=f"all-gather output of the next layer {_n(largest_layer)} params x {bytes_per_gathered} B",
            source="torch FSDP2: foreach all-gather output, freed after the copy-out into the unsharded parameters",
            category=CATEGORY_TEMPORARIES, phases=FORWARD_ONLY,
        ))
    # --ep: the experts unsharded while they run; where several ranks hold the same ones (efsdp > 1) their all-gather
    # output too, kept after the copy-out until the next unit's all-gather (FSDPParamGroup.wait_for_unshard keeps it
    # in AllGatherState): from the last layer's experts, through the loss, to the last layer's backward (measured)
    # (the all-gather output is every rank's padded shard, as the unsharded experts are)
    kept_after_copy = max(padded.values(), default=0) if efsdp > 1 else 0
    # (without reshard after forward every experts unit is in the unsharded term already: only the kept all-gather
    # output is beside it)
    running_experts = max(padded.values(), default=0) if reshard else 0
    experts_gathered = (running_experts + kept_after_copy) * bytes_per_gathered
    experts_kept = max(0, kept_after_copy - largest_layer) * bytes_per_gathered
    largest_unit = max(largest_layer, largest_experts)
    bytes_per_reduced = BYTES_PER_FP32 if mixed else bytes_per_weight
    buffers.append(Term(
        name=TERM_FSDP_REDUCE_SCATTER, bytes=largest_unit * bytes_per_reduced,
        formula=f"unsharded gradients of the largest unit {_n(largest_unit)} x {bytes_per_reduced} B (reduce dtype)",
        source="torch FSDP2: a unit's unsharded gradients, cast to reduce_dtype, are the reduce-scatter input",
        category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY,
    ))
    prefetch = largest_layer * bytes_per_gathered if reshard else 0
    bytes_per_shard = BYTES_PER_FP32 if mixed else bytes_per_weight
    mid_backward = (prefetch + largest_unit * bytes_per_reduced + largest_unit * bytes_per_gathered
                    + math.ceil(largest_unit / num_gpus) * bytes_per_shard + running_experts * bytes_per_gathered)
    root_made = sum(t.numel for t in trainable if t.layer is None and t.role != ROLE_EMBEDDING)
    last_layer = prefetch + root_made * bytes_per_gathered + running_experts * bytes_per_gathered
    root_trainable = [t for t in trainable if t.layer is None]
    root_grads = sum(t.numel for t in root_trainable)
    root_reduce = root_grads * (bytes_per_gathered + bytes_per_reduced)
    root_reduce_tp = ((root_numel + root_grads + max((t.numel for t in root_trainable), default=0)) * bytes_per_gathered
                      + (largest_layer * bytes_per_reduced if reshard else 0))
    # Late in backward: the first layer's turn, or with reshard_after_forward and three or more layers the second's,
    # when the first is prefetched and the second's sharded gradients are not made yet either (measured: Llama-3-8B's
    # peak at its second layer); the larger of the two is counted.
    layers = sorted({t.layer for t in trainable if t.layer is not None})
    late_layers = set(layers[:2] if reshard and len(layers) > 2 else layers[:1])
    late_unmade = sum(shard(t) for t in trainable
                      if t.layer is None or t.layer in late_layers)
    late_prefetch = prefetch if len(late_layers) == 2 else 0
    # --ep: a layer's experts reduce their gradients over the efsdp ranks as their own unit, in the middle of the layer's
    # backward: the reduce-scatter input, its output and the output divided by the data-parallel size, in the reduce
    # dtype (transformers sets a divide factor, which FSDP2 applies apart from the collective; measured on gloo ranks)
    experts_reduce = 0
    if largest_experts:
        shard_rows = math.ceil(largest_experts / efsdp)
        experts_reduce = (prefetch + root_made * bytes_per_gathered
                          + (largest_experts + 2 * shard_rows) * bytes_per_reduced)
    notes = [f"FSDP2 {'reshards after forward (ZeRO-3-like)' if reshard else 'keeps parameters unsharded until backward (ZeRO-2-like)'}"]
    short = sorted((t for t in tensors if t.shape and t.shape[0] < ranks(t)), key=lambda t: -t.numel)
    even = sum(t.numel for t in tensors) // num_gpus
    if short and shard_all > 1.25 * even:
        # FSDP2 shards dim 0 and pads every rank's chunk to ceil(dim0 / ranks) rows: a tensor with fewer rows than
        # ranks (transformers' fused experts: one row per expert) costs a whole row on every rank
        notes.append(f"FSDP2 pads each rank's dim-0 shard to ceil(rows / ranks) rows: {len(short)} tensors have fewer "
                     f"rows than the ranks sharding them (e.g. {short[0].name} {tuple(short[0].shape)}), so this rank "
                     f"holds {_n(shard_all)} parameters, not {_n(even)}. fully_shard's default placement (Shard(0)) "
                     "is counted, as transformers applies it; torchtitan shards the experts on dim 1 instead "
                     "(shard_placement_fn), which memcalc does not model yet")
    if mixed:
        notes.append(f"{FSDP2_MIXED_NOTE}, gradients are reduced in fp32")
    return RankHoldings(
        weight_numel=shard_all, grad_numel=shard_trainable, master_numel=0,
        optimizer_shapes=tuple((shard(t),) for t in trainable),
        effective_stage=spec.zero_stage, bytes_per_grad_override=BYTES_PER_FP32 if mixed else None,
        bytes_per_weight_override=BYTES_PER_FP32 if mixed else None, fp32_grad_copy=False,
        buffers=tuple(buffers), notes=tuple(notes), engine="fsdp2", mid_backward_extra_bytes=mid_backward,
        last_layer_extra_bytes=last_layer, experts_gathered_bytes=experts_gathered, experts_kept_bytes=experts_kept,
        layer_all_gather_bytes=prefetch,
        root_made_bytes=root_made * bytes_per_gathered,
        experts_reduce_bytes=experts_reduce, late_unmade_grad_numel=late_unmade,
        root_reduce_bytes=root_reduce, root_reduce_tp_bytes=root_reduce_tp,
        root_shard_grad_numel=sum(shard(t) for t in root_trainable),
        late_second_layer=len(late_layers) == 2,
        late_top_grad_numel=(sum(shard(t) for t in trainable if t.layer == layers[-1])
                             if len(late_layers) == 2 else 0),
        late_extra_bytes=(late_prefetch + root_made * bytes_per_gathered
                          + (largest_layer * bytes_per_reduced if reshard else 0)),
    )
