"""Tensor parallelism (``--tp N``, ``--sp``, ``--loss-parallel``): what one rank of a tensor-parallel group holds.

The plan is torchtitan's for Llama (torchtitan models/llama3 sharding: ``tok_embeddings`` rowwise, ``wq``/``wk``/
``wv``/``w1``/``w3`` colwise, ``wo``/``w2`` rowwise, ``output`` colwise, norms replicated or SequenceParallel), on
transformers' module names, as PyTorch's parallel styles split the tensors (torch/distributed/tensor/parallel/
style.py): ``ColwiseParallel`` shards a Linear's weight and bias on dim 0 (its output features), ``RowwiseParallel``
a Linear's weight on dim 1 (its input features; the bias stays whole) and an Embedding's weight on dim 0 (the
vocabulary). DTensor splits a dimension as ``torch.chunk`` does: rank 0 holds ``ceil(n / tp)`` rows, the most
loaded rank, which is the one reported.

MoE decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) take torchtitan's plan for MoE blocks without expert parallelism
(torchtitan models/llama4/infra/parallelize.py ``apply_moe_ep_tp`` with TensorParallel on the experts): every rank
routes all the block's tokens (the router replicated), runs its share of every expert's features (``gate_up_proj``
split on dim 1, ``down_proj`` on dim 2) and of the shared expert's (colwise gate and up, rowwise down), and the block's
output is the ranks' partial sums, all-reduced (reduce-scattered along the sequence with ``--sp``).

Measured (``memcalc.measure.tensor_parallel``: ``parallelize_module`` with these styles on the real transformers
class, one rank of a fake process group under FakeTensorMode), and not in any formula people quote:
- the token embedding's gradient is whole on every rank: DTensor's sharding strategy for the embedding's backward
  returns a Replicate gradient of the full V x h table, while the weight and its optimizer states are split;
- without loss parallelism the head's output is all-gathered: the full logits exist on every rank beside its own
  split of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.families.base import CAUSAL_LM
from memcalc.model import ROLE_EMBEDDING, ROLE_EXPERT, ROLE_LM_HEAD, ParamTensor

# Model types whose decoder layers have the Llama layout (separate q/k/v/o and gate/up/down projections), which the
# plan addresses by name; Phi-3's fused qkv_proj and gate_up_proj and the LayerNorm families not yet.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# MoE decoders of the Llama layout: attention and dense MLPs as above, the experts split as torchtitan's
# TensorParallel splits GroupedExperts (memcalc.measure.tensor_parallel)
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")
SOURCE = ("torchtitan's tensor-parallel plan for Llama (embedding and o/down rowwise, q/k/v/gate/up and the head "
          "colwise, norms replicated or SequenceParallel) in PyTorch's parallel styles (torch/distributed/tensor/"
          "parallel/style.py), measured with parallelize_module on the transformers class (memcalc.measure."
          "tensor_parallel)")
MOE_NOTE = ("tensor parallelism on the MoE blocks: torchtitan's plan without expert parallelism (apply_moe_ep_tp, "
            "TensorParallel on the experts): every rank routes all the block's tokens and runs its 1/tp of every "
            "expert's features; measured with these styles on the transformers class, the rank's states to the byte")


def check(described, tp: int, megatron: bool = False, ep: int = 1) -> None:
    """One line for a model the plan cannot split as asked (UsageError, exit 2) or does not cover (exit 5).
    ``ep`` > 1: the experts stay whole (expert parallelism splits them), so their widths need not divide."""
    if tp == 1:
        return
    if described is None:
        raise UsageError("{tp} splits the model's layers by name: give a model name or config.json, not only {params}")
    arch = described.arch
    if described.model_type not in MODEL_TYPES + MOE_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{{tp}} is modelled for decoders of the Llama layout ({', '.join(MODEL_TYPES + MOE_MODEL_TYPES)}); "
            f"{described.model_type} is not yet: drop {{tp}}")
    if megatron and described.model_type in MOE_MODEL_TYPES:
        raise UnsupportedModelError("{engine} megatron with {tp} on a MoE model: Megatron's MoE layer (its token "
                                    "dispatcher, expert tensor parallelism) is not modelled; drop {engine} megatron "
                                    "for torchtitan's plan, or drop {tp}")
    if arch.head != CAUSAL_LM:
        raise UnsupportedModelError(f"{{tp}} is modelled for causal language models; {arch.architecture} has another "
                                    "head: drop {tp}")
    if arch.tie_word_embeddings:
        raise UnsupportedModelError(
            "{tp} with a head tied to the input embeddings is not modelled (the plan splits the embedding rowwise "
            f"and the head colwise, one tensor): {arch.architecture or described.model_type} ties them; drop {{tp}}")
    for what, count in (("attention heads", arch.num_heads), ("key/value heads", arch.num_kv_heads),
                        *_mlp_widths(arch, experts=ep == 1)):
        if count % tp:
            raise UsageError(f"{{tp}} {tp} does not divide the model's {count:,} {what}: each rank takes an equal "
                             f"share; use a {{tp}} that divides {count:,}")


def _mlp_widths(arch, experts: bool) -> list[tuple[str, int]]:
    """The MLP widths a rank takes an equal share of: the dense MLP's, and a MoE model's experts' (unless ``experts``
    is False: left whole for expert parallelism) and shared expert's (a dense width no layer uses is not asked to
    divide)."""
    if arch.model_type not in MOE_MODEL_TYPES:
        return [("MLP features (intermediate_size)", arch.intermediate_size)]
    widths = [("experts' features", arch.expert_intermediate_size)] if experts else []
    if arch.shared_expert_intermediate_size:
        widths.append(("shared expert's features (shared_expert_intermediate_size)",
                       arch.shared_expert_intermediate_size))
    if arch.model_type != "mixtral" and not all(arch.sparse(i) for i in range(arch.num_layers)):
        widths.append(("dense layers' MLP features (intermediate_size)", arch.intermediate_size))
    return widths


def split_rows(n: int, tp: int) -> int:
    """Rows of an ``n``-row dimension on the most loaded rank (torch.chunk: rank 0 gets ceil(n / tp))."""
    return math.ceil(n / tp)


def local_shape(t: ParamTensor, tp: int) -> tuple[int, ...]:
    """The shape of ``t``'s shard on the most loaded rank of a ``tp``-way group."""
    if tp == 1 or not t.shape:
        return t.shape
    module = t.module.rsplit(".", 1)[-1]
    if module in COLWISE or t.role == ROLE_LM_HEAD or (t.role == ROLE_EMBEDDING and len(t.shape) == 2):
        return (split_rows(t.shape[0], tp), *t.shape[1:])
    if module in ROWWISE and len(t.shape) == 2:
        return (t.shape[0], split_rows(t.shape[1], tp))
    if t.role == ROLE_EXPERT:  # (E, 2 I, h) gate_up_proj on its features, (E, h, I) down_proj on its inputs
        if t.name.endswith("gate_up_proj"):
            return (t.shape[0], split_rows(t.shape[1], tp), t.shape[2])
        return (*t.shape[:2], split_rows(t.shape[2], tp))
    return t.shape  # norms and the row-parallel biases: whole on every rank


def shard(tensors: Sequence[ParamTensor], tp: int, experts: bool = True) -> list[ParamTensor]:
    """Each tensor as one rank holds it (``experts`` False: the experts whole, as --ep with --tp leaves them for the
    expert-parallel split: transformers' experts are never tensor-sharded with expert parallelism)."""
    if tp == 1:
        return list(tensors)
    return [dataclasses.replace(t, shape=local_shape(t, tp)) if experts or t.role != ROLE_EXPERT else t
            for t in tensors]


def whole_gradient_extra(full: Sequence[ParamTensor], tp: int) -> int:
    """Elements of gradient a rank holds beyond its shards: the token embedding's, whole (DTensor's embedding
    backward gives a Replicate gradient; measured, memcalc.measure.tensor_parallel)."""
    if tp == 1:
        return 0
    embedding = next((t for t in full if t.role == ROLE_EMBEDDING and len(t.shape) == 2 and t.trainable), None)
    if embedding is None:
        return 0
    return embedding.numel - math.prod(local_shape(embedding, tp))
