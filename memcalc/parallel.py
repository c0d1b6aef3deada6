"""Data parallelism with ZeRO stages 1-3: which part of each model state one GPU holds.

Reference: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(SC'20), Figure 1 — per device, for Psi parameters, K bytes of optimizer state per parameter and N devices:
stage 0: (2 + 2 + K) Psi; stage 1: 2Psi + 2Psi + K Psi / N; stage 2: 2Psi + (2 + K) Psi / N;
stage 3: (2 + 2 + K) Psi / N (seed 001 restates these). Partition sizes follow DeepSpeed (below).
This module is a first approximation of the engines' working buffers (buckets, prefetch): the
gathered-layer working set of stage 3 is named, the bucket sizes are not yet (a later issue).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from memcalc.model import ParamTensor

# deepspeed/runtime/zero/stage_1_and_2.py: each param group is flattened with
# flatten_dense_tensors_aligned(..., self.nccl_start_alignment_factor * dp_size), where
# nccl_start_alignment_factor = 2 (4-byte alignment of 16-bit elements), then split into dp_size equal parts.
ZERO12_ALIGNMENT_FACTOR = 2


@dataclass(frozen=True)
class RankHoldings:
    """Element counts one GPU holds for each model state, and the tensors its optimizer updates."""

    weight_numel: int  # parameters in the weight dtype (all of them, or this rank's shard)
    grad_numel: int  # gradients of trainable parameters (all, or this rank's partition)
    master_numel: int  # fp32 master copy of trainable parameters (when the recipe has one)
    optimizer_shapes: tuple[tuple[int, ...], ...]  # what the optimizer steps over on this rank
    gathered_unit_numel: int  # ZeRO-3: parameters of the largest unit gathered at once (else 0)
    gathered_unit_name: str  # which unit that is
    effective_stage: int
    notes: tuple[str, ...] = field(default=())


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


def _units(tensors: Sequence[ParamTensor]) -> dict[str, int]:
    """ZeRO-3 gathers per module as it runs: a transformer block at a time, or a top-level tensor on its own."""
    units: dict[str, int] = {}
    for tensor in tensors:
        key = f"layer {tensor.layer}" if tensor.layer is not None else tensor.name
        units[key] = units.get(key, 0) + tensor.numel
    return units


def rank_holdings(
    tensors: Sequence[ParamTensor], zero_stage: int, num_gpus: int, has_master: bool, architecture_known: bool
) -> RankHoldings:
    trainable = [t for t in tensors if t.trainable]
    num_all = sum(t.numel for t in tensors)
    num_trainable = sum(t.numel for t in trainable)
    notes: list[str] = []
    stage = zero_stage
    if zero_stage > 0 and num_gpus == 1:
        notes.append(f"ZeRO stage {zero_stage} on 1 GPU partitions nothing: the figures equal stage 0")
        stage = 0

    if stage == 0:
        return RankHoldings(
            weight_numel=num_all,
            grad_numel=num_trainable,
            master_numel=num_trainable if has_master else 0,
            optimizer_shapes=tuple(t.shape for t in trainable),
            gathered_unit_numel=0,
            gathered_unit_name="",
            effective_stage=0,
            notes=tuple(notes),
        )
    if stage in (1, 2):
        # One flat group assumed (HF Trainer's separate no-decay group for norms/biases adds < 1 alignment pad).
        part = zero12_partition_numel(num_trainable, num_gpus)
        return RankHoldings(
            weight_numel=num_all,
            grad_numel=part if stage == 2 else num_trainable,
            master_numel=part if has_master else 0,
            optimizer_shapes=((part,),) if num_trainable else (),
            gathered_unit_numel=0,
            gathered_unit_name="",
            effective_stage=stage,
            notes=tuple(notes),
        )
    # Stage 3: every tensor sharded on its own; the optimizer steps over this rank's flat fp32 partition.
    shard_all = sum(zero3_shard_numel(t.numel, num_gpus) for t in tensors)
    shard_trainable = sum(zero3_shard_numel(t.numel, num_gpus) for t in trainable)
    units = _units(tensors)
    unit_name, unit_numel = max(units.items(), key=lambda item: item[1]) if units else ("", 0)
    if not architecture_known:
        notes.append(
            "ZeRO-3 gathers one layer at a time; without an architecture (--params) the largest layer is "
            "unknown, so the gathered working set is not counted"
        )
        unit_name, unit_numel = "", 0
    return RankHoldings(
        weight_numel=shard_all,
        grad_numel=shard_trainable,
        master_numel=shard_trainable if has_master else 0,
        optimizer_shapes=((shard_trainable,),) if shard_trainable else (),
        gathered_unit_numel=unit_numel,
        gathered_unit_name=unit_name,
        effective_stage=3,
        notes=tuple(notes),
    )
