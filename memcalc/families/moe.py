"""Mixture-of-experts decoders in the Llama layout: mixtral, qwen2_moe, qwen3_moe; and the expert block DeepSeek-V2
shares with them.

Inventory: models/mixtral/modeling_mixtral.py MixtralSparseMoeBlock (router, fused experts);
models/qwen2_moe/modeling_qwen2_moe.py Qwen2MoeSparseMoeBlock (router, fused experts, shared expert + its gate);
models/qwen3_moe/modeling_qwen3_moe.py Qwen3MoeSparseMoeBlock (router, fused experts), with q_norm/k_norm.
Activations: the attention part is Llama's (memcalc.families.llama); the MoE block is ``routed_experts``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc import expert_parallel
from memcalc.errors import ConfigError
from memcalc.families.base import MAX_EXPERTS, MAX_INTERMEDIATE, MAX_LAYERS, Family, Fields
from memcalc.families.llama import (
    MISTRAL_DEFAULTS,
    QWEN2_DEFAULTS,
    SOURCE,
    LlamaArch,
    Variant,
    attention_tensors,
    dense_mlp,
    llama_rule,
    output_gradient,
    resolve_fields,
)
from memcalc.families.saved import Rule, Run, parts
from memcalc.families.tensors import Params, decoder, decoder_heads, fused_experts, gated_mlp, pre_post_norms, router
from memcalc.model import ROLE_ROUTER, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE_MOE = ("MoE blocks from modeling_mixtral.py / modeling_qwen*_moe.py routers and integrations/moe.py "
              "grouped_mm_experts_forward; tokens per expert summed over experts as T x num_experts_per_tok")
NOTE_MOE = ("MoE activations: how many tokens each expert gets depends on the routing; their total, T x "
            "num_experts_per_tok token-expert pairs, does not, so the sum over experts is exact")

_MIXTRAL = {**MISTRAL_DEFAULTS, "num_local_experts": 8, "num_experts_per_tok": 2}  # MixtralConfig
_QWEN2_MOE = {  # models/qwen2_moe/configuration_qwen2_moe.py: Qwen2MoeConfig
    **QWEN2_DEFAULTS, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "mlp_only_layers": None,
    "qkv_bias": True, "norm_topk_prob": False, "output_router_logits": False,
}  # fmt: skip
_QWEN3_MOE = {  # models/qwen3_moe/configuration_qwen3_moe.py: Qwen3MoeConfig (no head_dim field)
    **_QWEN2_MOE, "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
}  # fmt: skip

_VARIANTS = {
    # MixtralAttention has no biases.
    "mixtral": Variant(_MIXTRAL, False, False),
    # Qwen2MoeAttention: q/k/v biased by config.qkv_bias, o_proj never.
    "qwen2_moe": Variant(_QWEN2_MOE, "qkv_bias", False),
    # Qwen3MoeAttention: attention_bias on all four, per-head q_norm/k_norm.
    "qwen3_moe": Variant(_QWEN3_MOE, "attention_bias", None, qk_norm=True),
}
# The key transformers also accepts for the expert count (attribute_map / the other families' name).
_EXPERT_ALIASES = {"mixtral": {"num_experts": "num_local_experts"}, "qwen2_moe": {"num_local_experts": "num_experts"},
                   "qwen3_moe": {"num_local_experts": "num_experts"}}
_EXPERT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts"}


@dataclass(eq=False, repr=False, kw_only=True)
class MoeArch(LlamaArch):
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int  # each expert's MLP width
    shared_expert_intermediate_size: int = 0  # Qwen2Moe's always-on shared expert (0: none)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    renormalise: bool = False  # top-k routing weights divided by their sum (Mixtral always; Qwen: norm_topk_prob)
    output_router_logits: bool = False

    def sparse(self, layer: int) -> bool:
        """Which layers get the MoE block: every Mixtral layer; Qwen2Moe/Qwen3MoeDecoderLayer: not in
        mlp_only_layers and (layer + 1) % decoder_sparse_step == 0."""
        if self.model_type == "mixtral":
            return True
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


def check_top_k(num_experts: int, top_k: int) -> None:
    if num_experts and top_k > num_experts:
        raise ConfigError(f"num_experts_per_tok {top_k} is larger than the {num_experts} experts; check the config")


def _resolver(model_type: str):
    variant = _VARIANTS[model_type]

    def resolve(raw: Mapping[str, Any], architecture: str) -> MoeArch:
        f = Fields(raw, variant.defaults, _EXPERT_ALIASES[model_type])
        mixtral = model_type == "mixtral"
        num_experts = f.dim(_EXPERT_KEY[model_type], MAX_EXPERTS, low=1 if mixtral else 0)
        top_k = f.dim("num_experts_per_tok", MAX_EXPERTS)
        check_top_k(num_experts, top_k)
        return resolve_fields(
            f, model_type, architecture, HEADS[model_type][architecture], variant, cls=MoeArch,
            num_experts=num_experts, experts_per_token=top_k,
            expert_intermediate_size=f.dim("intermediate_size" if mixtral else "moe_intermediate_size",
                                           MAX_INTERMEDIATE),
            shared_expert_intermediate_size=(f.dim("shared_expert_intermediate_size", MAX_INTERMEDIATE)
                                             if model_type == "qwen2_moe" else 0),
            decoder_sparse_step=1 if mixtral else f.dim("decoder_sparse_step", MAX_LAYERS),
            mlp_only_layers=() if mixtral else f.int_list("mlp_only_layers", MAX_LAYERS),
            renormalise=mixtral or f.flag("norm_topk_prob"), output_router_logits=f.flag("output_router_logits"),
        )

    return resolve


def inventory(a: MoeArch) -> list[ParamTensor]:
    h = a.hidden_size

    def block(p: Params, prefix: str, i: int) -> None:
        attention_tensors(p, prefix, i, a)
        m = f"{prefix}mlp."
        if not a.sparse(i):
            gated_mlp(p, m, i, h, a.intermediate_size)
        else:
            router(p, m, i, a.num_experts, h)
            fused_experts(p, m, i, a.num_experts, h, a.expert_intermediate_size)
            if a.shared_expert_intermediate_size:  # an always-on dense MLP (ROLE_MLP) and its sigmoid gate
                gated_mlp(p, f"{m}shared_expert.", i, h, a.shared_expert_intermediate_size)
                p.linear(f"{m}shared_expert_gate", h, 1, ROLE_ROUTER, i)
        pre_post_norms(p, prefix, i, h)

    return decoder(a.head, h, a.vocab_size, a.num_layers, a.tie_word_embeddings, a.num_labels, block)


def routed_experts(run: Run, h: int, num_experts: int, top_k: int, intermediate: int, renormalise: bool,
                   weights_bytes: int) -> tuple[int, int]:
    """(router bytes, experts bytes) of one routed MoE block.

    Router (MixtralTopKRouter / Qwen*MoeTopKRouter): F.linear on the post-attention norm output (saved by the
    norm's count), softmax in fp32 saves its output (4 T E), topk saves its int64 indices (8 T k); when the
    top-k weights are renormalised (Mixtral always, Qwen with norm_topk_prob) the in-place division keeps
    the weights before division and their sum (4 T k + 4 T).
    Experts (integrations/moe.py grouped_mm_experts_forward, transformers' default experts_implementation;
    F.grouped_mm on CUDA SM80+, and on the CPU with torch 2.13): S = T k token-expert pairs. Three int64
    permutations (the gather of the tokens, of their weights, the restoring gather: 3 x 8 S), the int32 group
    offsets (4 E), the gathered tokens (e S h, the up projection's input), the gate_up output (2 e S I: silu
    and the product read its halves), silu's output and the product (e S I each, the product is the down
    projection's input), the down output (e S h, multiplied by the routing weights) and the gathered routing
    weights (S, ``weights_bytes``: fp32 for Mixtral and DeepSeek, the router logits' dtype c for Qwen).
    grouped_mm has no autocast rule: under amp-* the experts run in the fp32 of the norm output and the weights
    (e = 4), else e = c. (experts_implementation="eager", the per-expert loop, saves the same per pair but int64
    token indices instead of the permutations.) The split of S over the experts depends on the routing; the total
    S = T k is exact, so the bytes are. With expert parallelism, ``expert_parallel_experts``.
    """
    tokens = run.tokens
    pairs = tokens * top_k
    e = BYTES_PER_FP32 if run.autocast else run.c
    router_bytes = BYTES_PER_FP32 * tokens * num_experts + BYTES_PER_INT64 * pairs
    if renormalise:
        router_bytes += BYTES_PER_FP32 * pairs + BYTES_PER_FP32 * tokens
    if run.ep > 1:
        return router_bytes, expert_parallel_experts(run, h, num_experts, top_k, intermediate)
    experts = (3 * BYTES_PER_INT64 * pairs + 4 * num_experts + e * pairs * (2 * h + 4 * intermediate)
               + weights_bytes * pairs)
    return router_bytes, experts


def sent_pairs(run: Run, top_k: int) -> int:
    """(token, expert) pairs one expert-parallel rank sends per MoE layer: its tokens', or with --tp its slice's."""
    return expert_parallel.sent_tokens(run.tokens, run.tp) * top_k


def received_pairs(run: Run, top_k: int) -> int:
    """(token, expert) pairs one expert-parallel rank's experts run per MoE layer (memcalc.expert_parallel)."""
    return expert_parallel.received_pairs(sent_pairs(run, top_k), run.ep_load)


def expert_parallel_experts(run: Run, h: int, num_experts: int, top_k: int, intermediate: int) -> int:
    """The experts' saved bytes on an expert-parallel rank (transformers distributed/expert_parallel.py AllToAllEP).

    Sending (``_dispatch_tokens``): the rank's S = T k pairs sorted by expert (argsort, int64 S) and gathered by
    ``order // k`` (int64 S, saved by the gather); the rows go to the experts' ranks by all_to_all_single. The
    experts (grouped_mm_experts_forward on this rank's E / ep experts) run the R pairs the rank received, top-1 with
    unit weights: ``perm // 1`` (int64 R), the gathered rows (e R h), the sentinel mask of ``_is_expert_parallel``
    (bool R, saved by its masked_fills), the masked gate_up output (2 e R I), silu's output and the product (e R I
    each), the gathered unit weights (e R, saved by the product with the down output, which is not saved: the
    weights need no gradient), the restoring permutation (int64 R) and the offsets (int32, E / ep). Combining
    (``_combine_tokens``): the outputs back by all_to_all_single, put in the sender's order and multiplied by the
    routing weights, which saves the (S, h) rows (e). R is ``received_pairs``.
    """
    pairs = sent_pairs(run, top_k)
    e = BYTES_PER_FP32 if run.autocast else run.c
    received = received_pairs(run, top_k)
    sending = 2 * BYTES_PER_INT64 * pairs + e * pairs * h
    running = received * (2 * BYTES_PER_INT64 + 1 + e * (h + 4 * intermediate) + e) + 4 * (num_experts // run.ep)
    return sending + running


def aux_loss_layer_bytes(output_router_logits: bool, run: Run, num_experts: int) -> int:
    """output_router_logits (load_balancing_loss_func): per MoE layer softmax(router_logits) saves its output, in
    the logits' dtype c (CUDA autocast runs softmax in fp32)."""
    return (BYTES_PER_FP32 if run.autocast else run.c) * run.tokens * num_experts if output_router_logits else 0


def aux_loss_model_bytes(output_router_logits: bool, num_experts: int) -> int:
    """load_balancing_loss_func's final product saves tokens_per_expert (fp32, E)."""
    return BYTES_PER_FP32 * num_experts if output_router_logits else 0


def moe_formula(router_bytes: int, experts: int, top_k: int, num_experts: int, shared: int, casts: int,
                aux: int) -> str:
    return (f"MoE router {router_bytes:,} + experts ({top_k} of {num_experts} per token) {experts:,}"
            f"{f' + shared expert {shared:,}' if shared else ''}"
            f"{f' + autocast input casts {casts:,}' if casts else ''}"
            f"{f' + aux-loss softmax {aux:,}' if aux else ''}")


def _weights_bytes(a: MoeArch, run: Run) -> int:
    """The routing weights' dtype: fp32 for Mixtral (MixtralTopKRouter's softmax), the router logits' c for Qwen."""
    return BYTES_PER_FP32 if a.model_type == "mixtral" else run.c


def _split_block_input(run: Run, h: int) -> int:
    """--sp: the post-attention norm's output, this rank's split of the sequence, is the MoE block's argument, held by
    the decoder layer's frame while the block runs on the all-gathered copy (measured on gloo ranks: a recomputed
    block's restore under --ep --tp, 12,288 B low without it)."""
    return run.residual * run.sequence_tokens * h if run.sp else 0


def _expert_width(a: MoeArch, run: Run) -> int:
    """Each expert's features on this rank: 1/tp of them under --tp (torchtitan's TensorParallel on the experts),
    all of them with --ep too (transformers' experts are never tensor-split under expert parallelism)."""
    return a.expert_intermediate_size // (run.tp if run.ep == 1 else 1)


def _mlp(a: MoeArch, layer: int, run: Run) -> tuple[dict[str, int], str]:
    """A layer's MLP: the dense LlamaMLP, or the MoE block. Qwen2Moe's shared expert (Qwen2MoeMLP on every
    token): 4 c T I_shared as LlamaMLP, its output c T h and the sigmoid gate c T (both saved by the product)."""
    if not a.sparse(layer):
        return dense_mlp(a, layer, run)
    tokens, c, h = run.tokens, run.c, a.hidden_size
    weights_bytes = _weights_bytes(a, run)
    router_bytes, experts = routed_experts(run, h, a.num_experts, a.experts_per_token, _expert_width(a, run),
                                           a.renormalise, weights_bytes)
    casts = c * tokens * h if run.autocast else 0  # the router's F.linear casts the fp32 norm output
    shared = 0
    if a.shared_expert_intermediate_size:
        shared = 4 * c * tokens * (a.shared_expert_intermediate_size // run.tp) + c * tokens * h + c * tokens
        if run.autocast:
            casts += 3 * c * tokens * h  # shared_expert.gate_proj, up_proj and shared_expert_gate
    aux = aux_loss_layer_bytes(a.output_router_logits, run, a.num_experts)
    formula = moe_formula(router_bytes, experts, a.experts_per_token, a.num_experts, shared, casts, aux)
    return parts(mlp=router_bytes + experts + shared + aux, casts=casts), formula


def activations(a: MoeArch, run: Run) -> Rule:
    rule = llama_rule(a, run, _mlp, aux_loss_model_bytes(a.output_router_logits, a.num_experts),
                      f"{SOURCE}; {SOURCE_MOE}", (NOTE_MOE,))
    # The experts' backward at the product's (act(gate) * up): its gradient from the down projection's backward and both
    # factors' at once, 3 e S I over the S = T x top-k routed rows (R received ones with --ep), with the product and
    # the down projection's output released by then (e S (I + h)); beside the shared expert's (both factors', c T I
    # each) and the layer's output gradient (measured: Mixtral's checkpointed CPU steps peak there, the experts'
    # down_proj gradient made).
    e = BYTES_PER_FP32 if run.autocast else run.c  # (grouped_mm runs in fp32 under autocast: routed_experts)
    pairs = run.tokens * a.experts_per_token
    rows = received_pairs(run, a.experts_per_token) if run.ep > 1 else pairs
    routed = (e * rows * (2 * _expert_width(a, run) - a.hidden_size)
              + 2 * run.c * run.tokens * (a.shared_expert_intermediate_size // run.tp))
    rule.transient = max(rule.transient, routed + output_gradient(run, a.hidden_size))
    if any(a.sparse(i) for i in range(a.num_layers)):
        # The expert outputs times their routing weights are in the promoted dtype r: fp32 for Mixtral (fp32 weights)
        # whatever e, else e (Qwen's weights are in the router logits' dtype).
        weights = _weights_bytes(a, run)
        r = max(e, weights)
        sh = pairs * a.hidden_size
        cast = e * sh if r != e else 0  # the gradient cast back to the expert outputs' dtype
        if run.ep > 1:
            # (--tp: the rank sends, gets back, weights and sums its slice's pairs only: S its slice's, the sum's T h
            # its slice's; the cast below is of the outputs all-gathered over tp, all T tokens)
            sh = sent_pairs(run, a.experts_per_token) * a.hidden_size
            cast = e * sh if r != e else 0
            # AllToAllEP._combine_tokens multiplies the (T, k, h) rows it got back by the routing weights and sums over
            # k; ep_forward casts the sum to the input's dtype. Its backward opens with the product's two gradients
            # (r S h each), the cast's (r T h) and the rows' cast (measured on gloo ranks at the last layer's backward);
            # counted beside them, the forward's last all-to-all's input and output (e (R + S) h), which its work held
            # into the backward in 1 of 5 gloo runs (the collective releases them when it completes, on its own thread)
            rule.opening_transient = (2 * r * sh + r * run.tokens * a.hidden_size + cast
                                      + e * (rows * a.hidden_size + sh) + output_gradient(run, a.hidden_size))
            # Its forward at its largest (measured on gloo ranks, beside everything the block saved and the residual
            # stream), the larger of: the experts putting their R rows back in order (grouped_mm_experts_forward's
            # restore: the rows received, the masked down output, its product with the unit weights and the restored
            # rows, e R h each; the sort's values and indices and the received expert ids, int64 R each, the weights
            # e R), or the sum over k (AllToAllEP.__call__'s locals: the product r S h and the sum r T h, the outputs
            # received back e S h, the rows received and the experts' output e R h each, the received expert ids and
            # weights (8 + e) R, the router's logits c T E)
            sliced = expert_parallel.sent_tokens(run.tokens, run.tp)
            th = sliced * a.hidden_size
            rh = rows * a.hidden_size
            restoring = 4 * e * rh + (3 * BYTES_PER_INT64 + e) * rows
            summing = ((e + r) * sh + r * th + 2 * e * rh + (BYTES_PER_INT64 + e) * rows
                       + run.c * run.tokens * a.num_experts)
            # (--tp: the rank's slices of the block's input, its top-k indices and weights, Replicate -> Shard(0) local
            # copies, alive through the experts; measured on gloo ranks at a recomputed block's restore)
            slices = (e * th + (BYTES_PER_INT64 + weights) * sliced * a.experts_per_token) if run.tp > 1 else 0
            rule.forward_transient = max(restoring, summing) + slices + _split_block_input(run, a.hidden_size)
            return rule
        # Its backward begins with the restore's (grouped_mm_experts_forward: weighted_out[inv_perm], then view and sum
        # over top-k): the zero (S, h) buffer of the index's backward and its index_put output, the product's two
        # gradients, in r, and the cast of the outputs' one to e, before any of the block's gradients (measured: a
        # recomputed Qwen3-MoE layer under autocast, tests/test_context_parallel.py, and Mixtral under FSDP2 peak there).
        rule.opening_transient = 3 * r * sh + cast + output_gradient(run, a.hidden_size)
        if a.shared_expert_intermediate_size:
            # Qwen2Moe's shared expert is applied last (sigmoid(shared_expert_gate(x)) * shared_expert(x)), so its
            # product's and its gate's backward come first: the gate's input gradient (r T h) and the shared output's
            # (c T h) wait beside the restore's backward, the product's saved factors (c T h, c T) and, under autocast,
            # the gate's input cast (c T h) are released (measured, Qwen2-MoE CPU steps)
            th = run.tokens * a.hidden_size
            rule.opening_transient += (run.residual * th - run.c * run.tokens
                                       - (run.c * th if run.autocast else 0))
        # The block's forward ends by putting the weighted expert outputs back in token order (grouped_mm_experts_
        # forward): the weighted (S, h) rows and the buffer they are put into (S = T x top-k, in r) beside everything
        # the block saved (measured: a recomputed Qwen3-MoE layer under autocast peaks there, 2% to 4% above the rules'
        # moments at 1,024 to 2,048 tokens).
        rule.forward_transient = 2 * r * sh + _split_block_input(run, a.hidden_size)
    return rule


HEADS = {"mixtral": decoder_heads("Mixtral"), "qwen2_moe": decoder_heads("Qwen2Moe"),
         "qwen3_moe": decoder_heads("Qwen3Moe")}
# PEFT's table has mixtral; qwen2_moe and qwen3_moe are not in it (users pass targets).
_LORA = {"mixtral": ("q_proj", "v_proj")}

FAMILIES = {
    model_type: Family(model_type, HEADS[model_type], _resolver(model_type), inventory, activations,
                       lora_targets=_LORA.get(model_type), counts_repeat_kv=True, counts_padding=True)
    for model_type in _VARIANTS
}
