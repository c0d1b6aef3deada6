"""Expert parallelism (``--ep N``, ``--ep-load F``): what one rank holds when a MoE model's experts are split.

The layout is transformers' (distributed/expert_parallel.py, distributed/fsdp.py apply_fully_sharded_data_parallelism;
torchtitan's is the same): the ep ranks are data-parallel ranks; ``grouped_gemm`` (MoEParamShard) gives each of them
E / ep whole experts, both fused projections split on dim 0; FSDP2 shards every experts module over the efsdp =
data_parallel / ep ranks that hold the same experts, and every other unit over all the data-parallel ranks. In
training the tokens reach the experts by all-to-all (AllToAllEP, what ``ep_implementation="auto"`` runs when the
inputs need gradients): each rank sends its T x top-k (token, expert) pairs to the experts' owners and gets the
outputs back. How many pairs a rank receives is the router's choice: T x top-k on average, ``--ep-load`` times that
on the most loaded rank (at most ep times, every pair of the group sent to one rank).

Measured on gloo ranks (memcalc.measure.expert_parallel, with transformers' own styles on the real MoE class), the
estimate set to the pairs each rank received (``--ep-load`` from the recorded counts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from memcalc.errors import UsageError
from memcalc.model import ROLE_EXPERT, ParamTensor

# transformers' configs with a base_model_ep_plan (grouped_gemm on the fused experts, ep_dispatch_experts)
MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")
SOURCE = ("transformers distributed/expert_parallel.py (MoEParamShard: E / ep experts per rank; AllToAllEP: the routed "
          "pairs exchanged by all_to_all_single) and distributed/fsdp.py (the experts FSDP-sharded over "
          "the data_parallel x tp / ep ranks holding the same ones), measured on gloo ranks "
          "(memcalc.measure.expert_parallel)")


def check(described, ep: int) -> None:
    """One line for a model whose experts cannot be split as asked (UsageError, exit 2)."""
    if ep == 1:
        return
    if described is None:
        raise UsageError("{ep} splits a MoE model's experts: give a model name or config.json, not only {params}")
    experts = getattr(described.arch, "num_experts", 0)
    if not experts:
        raise UsageError(f"{{ep}} splits a mixture-of-experts model's experts; {described.model_type} is dense (no "
                         "experts): drop {ep}")
    if described.model_type not in MODEL_TYPES:
        raise UsageError(f"{{ep}} is modelled for transformers' expert-parallel plan ({', '.join(MODEL_TYPES)}); "
                         f"{described.model_type} has none: drop {{ep}}")
    if experts % ep:
        raise UsageError(f"{{ep}} {ep} does not divide the model's {experts} experts: each rank takes an equal share "
                         f"(transformers' MoEParamShard refuses it); use an {{ep}} that divides {experts}")


def shard(tensors: Sequence[ParamTensor], ep: int) -> list[ParamTensor]:
    """Each tensor as one expert-parallel rank holds it: the fused experts' first dimension split ep ways."""
    if ep == 1:
        return list(tensors)
    return [dataclasses.replace(t, shape=(t.shape[0] // ep, *t.shape[1:])) if t.role == ROLE_EXPERT else t
            for t in tensors]


def sharding_ranks(t: ParamTensor, data_parallel: int, ep: int, tp: int = 1) -> int:
    """The ranks FSDP2 shards ``t`` over: the experts over data_parallel x tp / ep (efsdp: with --tp the expert mesh
    spans the tensor-parallel ranks too), the rest over the data-parallel ranks."""
    return data_parallel * tp // ep if ep > 1 and t.role == ROLE_EXPERT else data_parallel


def sent_tokens(tokens: int, tp: int) -> int:
    """The tokens one rank dispatches: all of its micro-batch's, or with --tp its slice of the group's (AllToAllEP's
    Replicate -> Shard(0) over the tp mesh, torch.chunk's split: the first ranks ceil(T / tp))."""
    return math.ceil(tokens / tp)


def received_pairs(average: int, load: float) -> int:
    """(token, expert) pairs the most loaded rank's experts run per MoE layer: the average its group sends each rank
    (T x top-k) times --ep-load."""
    return math.ceil(average * load)


def note(ep: int, data_parallel: int, local_experts: int, average: int, load: float, shard_dim: int = 0,
         tp: int = 1) -> str:
    """``data_parallel``: the ranks the expert mesh spans (with --tp, data- x tensor-parallel: transformers' efsdp =
    fsdp x tp / ep); ``average``: the (token, expert) pairs the rank sends (with --tp its slice's: ``sent_tokens``)."""
    efsdp = data_parallel // ep
    padded = (f"; with {local_experts} expert(s) per layer over {efsdp} ranks, FSDP2's dim-0 shards are padded to a "
              "whole expert on every rank (transformers shards the expert dimension; torchtitan then shards dim 1: "
              "--ep-shard-dim 1): the experts are not sharded further, and a layer's unsharded experts are the "
              f"{efsdp} ranks' padded rows; in this layout tiny MoE models' ranks measured -0.07% to +2.4% without "
              "checkpointing and up to +14% with it (benchmarks/expert_parallel.py --layouts 4x2 --experts 2)"
              if local_experts < efsdp and not shard_dim
              else "")
    placement = (" on dim 1 (torchtitan's Shard(1) placement: torchtitan/models/llama4/infra/parallelize.py "
                 "apply_fsdp, when those ranks x ep exceed the experts)" if shard_dim else "")
    sliced = (f"; with --tp {tp} the expert-parallel groups span the tensor-parallel ranks, the experts whole "
              f"(never tensor-split), and each of a tensor-parallel group's ranks dispatches its 1/{tp} of the "
              "group's tokens and all-gathers the outputs (AllToAllEP with transformers' tp_mesh); against gloo ranks "
              "(tiny MoE models, --tp 2, 120 rank steps) -0.04% to +6.8% without checkpointing, -0.05% to +18.5% with "
              "it (the highest with random routing, which the flag's one load for every layer overstates)"
              if tp > 1 else "")
    return (f"expert parallelism: {ep} ranks split the experts, {local_experts} each, FSDP-sharded{placement} over "
            f"the {efsdp} rank(s) holding the same ones ({SOURCE}){padded}{sliced}; each MoE layer's experts run the "
            f"{received_pairs(average, load):,} (token, expert) pairs this rank receives: {average:,} on average "
            f"(T{f' / {tp}' if tp > 1 else ''} x top-k) x --ep-load "
            f"{load:g}. The routing decides it; a rank can receive up to {ep} times the average, so give --ep-load "
            "for an unbalanced router. On gloo ranks a rank's measured peak moves by up to 3% between runs (the "
            "all-to-all's buffers freed at varying moments; one run of a tiny Mixtral read 1.9% above the estimate): "
            "leave margin")
