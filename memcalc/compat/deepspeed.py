"""DeepSpeed's own model-state estimators, reproduced to the byte, and memcalc's terms beside them.

deepspeed 0.19.8: deepspeed/runtime/zero/stage_1_and_2.py, estimate_zero2_model_states_mem_needs, and
deepspeed/runtime/zero/stage3.py, estimate_zero3_model_states_mem_needs and model_to_params. Plain arithmetic on
parameter counts; DeepSpeed is never imported (tests/fixtures/peer_figures.json holds what its code returned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memcalc.compat import ComparisonRow, memcalc_term_bytes
from memcalc.errors import UsageError
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

if TYPE_CHECKING:
    from memcalc.model import ParamTensor
    from memcalc.report import Report

ZERO2_SOURCE = "deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs"
ZERO3_SOURCE = "deepspeed/runtime/zero/stage3.py estimate_zero3_model_states_mem_needs"
# Both estimators' default: additional_buffer_factor=1.5 (applied to the CPU figure only).
DEFAULT_BUFFER_FACTOR = 1.5


def deepspeed_zero2_estimate(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                             cpu_offload: bool = True,
                             additional_buffer_factor: float = DEFAULT_BUFFER_FACTOR) -> tuple[int, int]:
    """(cpu_bytes, gpu_bytes) exactly as estimate_zero2_model_states_mem_needs computes them (same defaults, same
    float operations, same int()).

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
                             zero_init: bool = True,
                             additional_buffer_factor: float = DEFAULT_BUFFER_FACTOR) -> tuple[int, int]:
    """(cpu_bytes, gpu_bytes) exactly as estimate_zero3_model_states_mem_needs computes them (DeepSpeed also returns
    largest_layer_memory = 4 * largest_layer_params as a third value).

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
    if not cpu_offload:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        counted = largest_layer_params if zero_init else total_params
        return int(counted * 4 * num_gpus_per_node * additional_buffer_factor), int(gpu_mem)
    # Offloading the optimizer moves 16 B/param to the CPU; the 16-bit parameters too, 18 B/param.
    cpu_bytes_per_param = 18 if cpu_offload_params else 16
    gpu_mem = largest_layer_memory + (0 if cpu_offload_params else int(2 * total_params / total_gpus))
    if zero_init:
        cpu_mem = total_params * cpu_bytes_per_param * gpus_factor * additional_buffer_factor
    else:
        cpu_mem = (total_params * max(4 * num_gpus_per_node, cpu_bytes_per_param * gpus_factor)
                   * additional_buffer_factor)
    return int(cpu_mem), int(gpu_mem)


def deepspeed_param_counts(tensors: Sequence[ParamTensor]) -> tuple[int, int]:
    """(total_params, largest_layer_params) as stage3.py, model_to_params counts them on a live model: every
    parameter once, and the largest sum of one module's own parameters (parameters(recurse=False): an nn.Linear's
    weight and bias, an nn.Embedding, a norm), not a transformer block. memcalc's inventory names each tensor as
    named_parameters() does, so the module is the name without its last part. A tied LM head shares the embedding's
    weight, so its module's count equals the embedding's and the maximum is unchanged.
    """
    modules: dict[str, int] = {}
    for tensor in tensors:
        module = tensor.module
        modules[module] = modules.get(module, 0) + tensor.numel
    return sum(t.numel for t in tensors), max(modules.values(), default=0)


@dataclass(frozen=True)
class _Layout:
    """What DeepSpeed's estimator is asked, and the notes that apply to every row."""

    num_params: int
    num_gpus: int
    num_gpus_per_node: int
    num_nodes: int
    offload_optimizer: bool
    offload_params: bool
    common: str  # "; ..." notes appended to each row's why, or ""

    def share(self, bytes_per_param: int) -> int:
        """bytes_per_param x params / GPUs, rounded (one row of DeepSpeed's partitioned figure)."""
        return round(bytes_per_param * self.num_params / self.num_gpus)

    @property
    def where(self) -> str | None:
        return "on the CPU (offload_optimizer)" if self.offload_optimizer else None


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
    additional_buffer_factor: float = DEFAULT_BUFFER_FACTOR,
) -> list[ComparisonRow]:
    """memcalc's per-GPU terms next to DeepSpeed's estimate_zero2/3_model_states_mem_needs, term by term.

    DeepSpeed's estimators take a parameter count, not a config: ZeRO-1 and 2 use the ZeRO-2 one, ZeRO-3 the
    ZeRO-3 one (also given the largest layer: pass ``deepspeed_param_counts(tensors)[1]``). Its GPU figure is the
    sum of the per-term rows; the split follows the ZeRO-2 source comment (2 16-bit params + 18 / GPUs = 2 16-bit
    grads + 4 fp32 grads + 4 fp32 params + 8 Adam); the ZeRO-3 function has no comment, and its 18 B/param / GPUs
    (with 16 and 18 B/param on the CPU under offload) reads as 2 16-bit params + 4 + 4 + 8, with no 16-bit gradient
    shard. Rows are rounded one by one; the total rows are DeepSpeed's own int().
    """
    stage = report.training.zero_stage
    layout = _layout(report, num_nodes, num_gpus_per_node, offload_optimizer, offload_params, total_params)
    if stage in (1, 2):
        cpu, gpu = deepspeed_zero2_estimate(layout.num_params, layout.num_gpus_per_node, num_nodes,
                                            offload_optimizer, additional_buffer_factor)
        rows, gathered = _zero12_rows(report, layout), 0
    else:
        if largest_layer_params is None:
            layout = _with_note(layout, "largest layer unknown (no per-tensor inventory): DeepSpeed's 4 B x largest "
                                        "layer term counted as 0")
        largest = largest_layer_params or 0
        cpu, gpu = deepspeed_zero3_estimate(layout.num_params, largest, layout.num_gpus_per_node, num_nodes,
                                            offload_optimizer, offload_params, zero_init, additional_buffer_factor)
        rows, gathered = _zero3_rows(report, layout, largest), 4 * largest
    rows.extend(_tail_rows(report, layout, cpu, gpu, gathered, zero_init, additional_buffer_factor))
    return rows


def _layout(report: Report, num_nodes: int, num_gpus_per_node: int | None, offload_optimizer: bool,
            offload_params: bool, total_params: int | None) -> _Layout:
    training = report.training
    if training.zero_stage == 0:
        raise UsageError("comparing with DeepSpeed's estimator needs a ZeRO stage: 1, 2 or 3")
    num_gpus = training.num_gpus
    if num_nodes < 1:
        raise UsageError(f"the number of nodes must be at least 1, got {num_nodes}")
    if num_gpus_per_node is None:
        if num_gpus % num_nodes:
            raise UsageError(f"{num_gpus} GPUs are not divisible by {num_nodes} nodes")
        num_gpus_per_node = num_gpus // num_nodes
    if num_gpus_per_node * num_nodes != num_gpus:
        raise UsageError(f"{num_gpus} GPUs != {num_nodes} nodes x {num_gpus_per_node} GPUs per node")
    if offload_params and training.zero_stage != 3:
        raise UsageError("offloading parameters needs ZeRO stage 3")
    count = report.model.num_params if total_params is None else total_params
    layout = _Layout(count, num_gpus, num_gpus_per_node, num_nodes, offload_optimizer, offload_params, "")
    if report.model.num_trainable_params != report.model.num_params:
        layout = _with_note(layout, f"DeepSpeed's estimator treats all {count:,} params as trained; memcalc trains "
                                    f"{report.model.num_trainable_params:,}")
    if not (training.weight_dtype in ("bf16", "fp16") and training.master_dtype == "fp32"):
        layout = _with_note(layout, f"DeepSpeed's estimator always assumes 16-bit weights with an fp32 master; "
                                    f"memcalc's recipe here is {training.precision} ({training.weight_dtype} weights, "
                                    f"master {training.master_dtype or 'none'})")
    if offload_params and not offload_optimizer and training.zero_stage == 3:
        layout = _with_note(layout, "DeepSpeed's formula ignores offload_params without offload_optimizer "
                                    "(cpu_offload_params is read only under cpu_offload)")
    return layout


def _with_note(layout: _Layout, note: str) -> _Layout:
    return replace(layout, common=f"{layout.common}; {note}")


def _zero12_rows(report: Report, layout: _Layout) -> list[ComparisonRow]:
    stage, p, common = report.training.zero_stage, layout.num_params, layout.common
    rows = [ComparisonRow(
        "16-bit weights", memcalc_term_bytes(report, TERM_WEIGHTS), 2 * p,
        "both hold every parameter's 16-bit copy on each GPU at ZeRO-1/2 (DeepSpeed: 2 B x all params)" + common)]
    if layout.where:
        grads_why = ("with offload DeepSpeed's formula counts no gradient bytes on the GPU (only the 16-bit params); "
                     + ("memcalc counts the whole 16-bit gradients ZeRO-1 keeps through backward (the epilogue copies "
                        "this rank's part to CPU RAM and frees them before the step)" if stage == 1 else
                        "memcalc agrees: ZeRO-2-Offload copies each reduced gradient to the fp32 CPU partition "
                        "(copy_grads_in_partition) and keeps no 16-bit partition"))
    else:
        grads_why = ("DeepSpeed's ZeRO-2 formula partitions 16-bit gradients (2 B/param / GPUs); "
                     + ("ZeRO-1 does not partition them, so memcalc holds them whole" if stage == 1 else
                        "memcalc partitions the trainable params' gradients with DeepSpeed's alignment padding"))
    rows.append(ComparisonRow("16-bit gradients", memcalc_term_bytes(report, TERM_GRADIENTS),
                              0 if layout.where else layout.share(2), grads_why + common))
    rows.extend(_state_rows(report, layout, TERM_MASTER_GRAD_COPY))
    return rows


def _zero3_rows(report: Report, layout: _Layout, largest: int) -> list[ComparisonRow]:
    params_off = layout.offload_optimizer and layout.offload_params
    common = layout.common
    rows = [
        ComparisonRow(
            "16-bit weights (shard)", memcalc_term_bytes(report, TERM_WEIGHTS), 0 if params_off else layout.share(2),
            ("DeepSpeed offloads the 16-bit parameter shards to the CPU (offload_param) and counts none on the GPU"
             if params_off else "both shard the 16-bit weights over all GPUs (DeepSpeed: 2 B/param / GPUs; memcalc "
             "rounds each tensor up to a multiple of the GPU count)") + common),
        ComparisonRow(
            "16-bit gradients (shard)", memcalc_term_bytes(report, TERM_GRADIENTS), 0,
            "DeepSpeed's ZeRO-3 formula has no 16-bit gradient shard: its 18 B/param / GPUs is 2 16-bit params + "
            "4 fp32 grads + 4 fp32 params + 8 Adam (its offload variants move 16 and 18 B/param to the CPU, the "
            "same split); memcalc counts the rank's reduce-scattered 16-bit gradient shard, 2 B/param / GPUs"
            + (", in CPU RAM under offload_optimizer (grad_partitions_flat_buffer), so 0 here" if layout.where else "")
            + common),
    ]
    rows.extend(_state_rows(report, layout, TERM_MASTER_GRAD_COPY if layout.where else TERM_ZERO3_FP32_GRADS))
    rows.append(ComparisonRow(
        "gathered layer (params + grads)",
        memcalc_term_bytes(report, TERM_ZERO3_GATHERED, TERM_ZERO3_GATHERED_GRADS), 4 * largest,
        f"DeepSpeed adds 4 B x the largest layer ({largest:,} params), its largest single module's own parameters "
        "(model_to_params, recurse=False: usually the embedding or LM head); memcalc gathers the largest unit "
        "fetched at once (a whole transformer block, or a top-level tensor such as the embedding) and counts its "
        "16-bit params, and its grads during backward only"))
    return rows


# Why memcalc's fp32 gradient differs from DeepSpeed's estimator, by the memcalc term that holds it.
_FP32_GRADS_WHY = {
    TERM_ZERO3_FP32_GRADS: (
        "DeepSpeed's estimator counts a persistent fp32 gradient partition (4 B/param / GPUs); its ZeRO-3 optimizer "
        "casts one sub-group's gradients to fp32 at a time, during the step only (stage3.py "
        "_prepare_fp32_grad_for_sub_group; sub-groups of at least sub_group_size elements, _create_fp16_sub_groups): "
        "memcalc counts the largest sub-group"),
    TERM_MASTER_GRAD_COPY: (
        "DeepSpeed counts a persistent fp32 gradient partition (4 B/param / GPUs); memcalc counts the fp32 cast of "
        "the rank's gradient partition as a temporary of the optimizer step (stage_1_and_2.py step())"),
}


def _state_rows(report: Report, layout: _Layout, term_grad32: str) -> list[ComparisonRow]:
    where, share = layout.where, layout.share
    offloaded = f"DeepSpeed counts it {where}, none on the GPU; " if where else ""
    optimizer = report.training.optimizer
    return [
        ComparisonRow("fp32 gradients", memcalc_term_bytes(report, term_grad32), 0 if where else share(4),
                      offloaded + _FP32_GRADS_WHY[term_grad32]),
        ComparisonRow("fp32 master weights", memcalc_term_bytes(report, TERM_MASTER), 0 if where else share(4),
                      offloaded + "both: 4 B x params / GPUs for the fp32 master partition"),
        ComparisonRow("optimizer states", memcalc_term_bytes(report, TERM_OPTIMIZER_STATES), 0 if where else share(8),
                      offloaded + ("both: Adam exp_avg + exp_avg_sq, 8 B x params / GPUs"
                                   if optimizer in ("adamw", "adam") else
                                   f"DeepSpeed's 8 B/param assumes Adam; memcalc counts {optimizer}")),
    ]


_MATCHED_TERMS = frozenset({
    TERM_WEIGHTS, TERM_GRADIENTS, TERM_MASTER_GRAD_COPY, TERM_MASTER, TERM_OPTIMIZER_STATES, TERM_ZERO3_GATHERED,
    TERM_ZERO3_GATHERED_GRADS, TERM_ZERO3_FP32_GRADS, TERM_ACTIVATIONS, TERM_LOSS_BUFFERS,
})


def _tail_rows(report: Report, layout: _Layout, cpu: int, gpu: int, gathered: int, zero_init: bool,
               factor: float) -> list[ComparisonRow]:
    stage = report.training.zero_stage
    rows = [ComparisonRow(
        "activations", memcalc_term_bytes(report, TERM_ACTIVATIONS, TERM_LOSS_BUFFERS), 0,
        "DeepSpeed's estimator covers model states only: no activations, logits or loss buffers")]
    others = [t for t in report.per_gpu.terms if t.name not in _MATCHED_TERMS and not t.in_cpu_ram]
    if others:
        rows.append(ComparisonRow("other working memory", sum(t.bytes for t in others), 0,
                                  f"not in DeepSpeed's estimator: {', '.join(t.name for t in others)}"))
    source = ZERO3_SOURCE if stage == 3 else ZERO2_SOURCE
    params_flag = f", params={layout.offload_params}" if stage == 3 else ""
    rows.append(ComparisonRow(
        "GPU model states", report.per_gpu.model_states_bytes, gpu - gathered,
        "memcalc: weights + master + gradients + optimizer states; DeepSpeed: its formula without the gathered "
        "layer, which also counts the fp32 gradient partition memcalc treats as an optimizer-step temporary"))
    rows.append(ComparisonRow(
        "GPU total (memcalc: peak)", report.per_gpu.peak_bytes, gpu,
        f"{source}(total_params={layout.num_params:,}, num_gpus_per_node={layout.num_gpus_per_node}, "
        f"num_nodes={layout.num_nodes}, offload optimizer={layout.offload_optimizer}{params_flag}): model states "
        f"{'and the largest layer ' if stage == 3 else ''}all live at once, no activations or temporaries and no "
        "buffer factor; memcalc's peak is the largest phase of the step"))
    memcalc_cpu = report.totals.cpu_offload_bytes_per_node if report.training.offload != "none" else None
    rows.append(ComparisonRow("CPU RAM per node", memcalc_cpu, cpu, _cpu_why(stage, layout, zero_init, factor)))
    return rows


def _cpu_why(stage: int, layout: _Layout, zero_init: bool, factor: float) -> str:
    tail = (f"; x {factor} buffer factor (CPU figure only); memcalc counts what offload keeps in (pinned) CPU RAM, "
            "not each process's own loading of the model (when its run offloads)" if layout.where else
            f"; x {factor} buffer factor (CPU figure only); without offload memcalc counts no CPU RAM")
    per_node_gpus = layout.num_gpus_per_node
    if stage in (1, 2):
        if layout.offload_optimizer:
            return ("DeepSpeed: params x max(4 B x all GPUs, 16 B) - 16 B = fp32 grads 4 + master 4 + Adam 8 held "
                    "in CPU RAM, or each GPU's process loading an fp32 copy (note: all GPUs, not per node)" + tail)
        return (f"DeepSpeed: params x 4 B x {per_node_gpus} GPUs per node, each process loading the fp32 model into "
                "CPU RAM before moving it to its GPU" + tail)
    per_node = f" / {layout.num_nodes} nodes" if layout.num_nodes > 1 else ""
    if layout.offload_optimizer:
        size = 18 if layout.offload_params else 16
        what = ("16-bit params 2 + fp32 grads 4 + master 4 + Adam 8" if layout.offload_params
                else "fp32 grads 4 + master 4 + Adam 8")
        init = ("" if zero_init else f", or 4 B x {per_node_gpus} GPUs per node if larger (no zero.Init: each "
                "process loads the fp32 model)")
        return f"DeepSpeed: params x {size} B ({what}){per_node}{init}" + tail
    if zero_init:
        return (f"DeepSpeed: largest layer x 4 B x {per_node_gpus} GPUs per node (zero.Init builds the model layer "
                "by layer, partitioned)" + tail)
    return (f"DeepSpeed: params x 4 B x {per_node_gpus} GPUs per node (no zero.Init: each process loads the model)"
            + tail)

