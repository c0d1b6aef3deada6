"""--checkpointing selective-op: torchtitan's per-op selective activation checkpointing, applied to a transformers
model's decoder layers, so a step (measured or traced) keeps what torchtitan's keeps.

The policy follows torchtitan's ``SelectiveAC`` (torchtitan/distributed/activation_checkpoint.py, ``_wrap_block`` and
its ``wrapped_policy``, main of 2026-08; the same rule as the earlier ``_apply_op_sac`` / ``_custom_policy``):

- every decoder layer runs under non-reentrant checkpointing with the SAC contexts of
  ``torch.utils.checkpoint.create_selective_checkpoint_contexts``;
- the outputs of the ops in the save set are kept from the forward (MUST_SAVE), everything else is recomputed;
- the save set is the partitioner's compute-intensive ops (``torch._functorch.partitioners.get_default_op_list``:
  mm, addmm, bmm, the flash / memory-efficient attention ops, ...) and torchtitan's additions (the other sdpa
  kernels, ``max``, ``linear``, ``topk``, flex attention, the reduce-scatter and all-to-all collectives);
- of ``mm`` and ``linear`` only every other call in a layer's forward is saved: the count starts at 1 in each
  checkpointed call, and even counts are recomputed;
- an mm whose weight shape matches a Linear named by ``force_recompute_mm_shapes_by_fqns`` is recomputed and not
  counted. torchtitan's default names its own router, ``moe.router.gate``, which no transformers module name
  contains: nothing is forced here (``FORCE_RECOMPUTE_NOTE``).

One CPU stand-in (cuda_semantics runs sdpa on the CPU's flash kernel where CUDA runs its flash kernel): the CPU's
``_scaled_dot_product_flash_attention_for_cpu`` is saved as CUDA's ``_scaled_dot_product_flash_attention`` is. Its
outputs are the same attention output and fp32 log-sum-exp; CUDA's adds the RNG seed and offset (16 B a layer).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

SOURCE = ("torchtitan distributed/activation_checkpoint.py SelectiveAC._wrap_block (every other mm recomputed; "
          "compute-intensive ops, sdpa and collectives saved); torch.utils.checkpoint "
          "create_selective_checkpoint_contexts")
FORCE_RECOMPUTE_NOTE = ("torchtitan's force_recompute_mm_shapes_by_fqns default (moe.router.gate) names none of "
                        "transformers' modules: router matmuls are counted as any other mm")


def _ops(*names: str) -> set[Any]:
    """The op overloads named "namespace.op.overload" that this torch registers (others are skipped, as torchtitan's
    _resolve_ops skips ops a build lacks)."""
    found = set()
    for name in names:
        namespace, op, overload = name.split(".")
        try:
            found.add(getattr(getattr(getattr(torch.ops, namespace), op), overload))
        except (AttributeError, RuntimeError):
            continue
    return found


@functools.cache
def save_ops() -> frozenset[Any]:
    from torch._functorch.partitioners import get_default_op_list

    ops = {packet.default for packet in get_default_op_list().compute_intensive_ops}
    ops |= _ops("aten._scaled_dot_product_cudnn_attention.default", "aten._scaled_dot_product_attention_math.default",
                "aten._scaled_dot_product_fused_attention_overrideable.default", "aten.max.default",
                "aten.linear.default", "aten.topk.default",
                "_c10d_functional.reduce_scatter_tensor.default", "_c10d_functional.all_to_all_single.default",
                # the CPU stand-in for CUDA's flash kernel (module docstring)
                "aten._scaled_dot_product_flash_attention_for_cpu.default")
    ops.add(torch._higher_order_ops.flex_attention)
    return frozenset(ops)


@functools.cache
def _mm_ops() -> frozenset[Any]:
    return frozenset(_ops("aten.mm.default", "aten.linear.default"))


def _policy() -> Any:
    """One checkpointed call's policy: its own mm counts, forward and recompute apart (torchtitan's meta)."""
    counts = {False: 0, True: 0}
    saved, mms = save_ops(), _mm_ops()

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if func in mms:
            counts[ctx.is_recompute] += 1
        if func in saved and not (func in mms and counts[ctx.is_recompute] % 2 == 0):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def context_fn() -> tuple[Any, Any]:
    """The ``context_fn`` of ``torch.utils.checkpoint.checkpoint``: a fresh policy for each checkpointed call."""
    return create_selective_checkpoint_contexts(_policy())


CHECKPOINT_KWARGS = {"use_reentrant": False, "context_fn": context_fn}
