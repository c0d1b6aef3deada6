"""DeepSeek-V2 (models/deepseek_v2/modeling_deepseek_v2.py): multi-head latent attention (MLA), then a dense MLP
(layers below first_k_dense_replace) or the MoE block (fused experts, an fp32 router, shared experts as one MLP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc.families.base import (
    MAX_EXPERTS,
    MAX_HEAD_DIM,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    Arch,
    Family,
    Fields,
)
from memcalc.families.llama import LLAMA_DEFAULTS, gated_mlp_transient, output_gradient
from memcalc.families.moe import (
    NOTE_MOE,
    aux_loss_layer_bytes,
    aux_loss_model_bytes,
    check_top_k,
    moe_formula,
    routed_experts,
)
from memcalc.families.saved import PART_CASTS, Loss, Rule, Run, final_hidden_held, parts, rms_norm_bytes
from memcalc.families.tensors import Params, decoder, decoder_heads, fused_experts, gated_mlp, pre_post_norms, router
from memcalc.model import ROLE_ATTENTION, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_deepseek_v2.py (DeepseekV2Attention MLA, DeepseekV2TopkRouter, "
          "DeepseekV2Moe) and integrations/moe.py; checked against a CPU forward (eager attention)")

_DEFAULTS = {  # models/deepseek_v2/configuration_deepseek_v2.py: DeepseekV2Config
    **LLAMA_DEFAULTS, "vocab_size": 102400, "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "moe_intermediate_size": 1407, "topk_method": "greedy", "norm_topk_prob": False,
    "output_router_logits": False,
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class DeepseekV2Arch(Arch):
    q_lora_rank: int | None  # None: a plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    mlp_bias: bool
    first_k_dense_replace: int
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    num_shared_experts: int
    group_limited: bool  # topk_method "group_limited_greedy"
    renormalise: bool
    output_router_logits: bool

    def sparse(self, layer: int) -> bool:
        """DeepseekV2DecoderLayer: dense below first_k_dense_replace, the MoE block from there on."""
        return layer >= self.first_k_dense_replace


def resolve(raw: Mapping[str, Any], architecture: str) -> DeepseekV2Arch:
    f = Fields(raw, _DEFAULTS, aliases={"num_experts": "n_routed_experts"})  # DeepseekV2Config.attribute_map
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, num_kv = f.heads()
    num_experts = f.dim("n_routed_experts", MAX_EXPERTS)
    # DeepseekV2Config's num_experts_per_tok defaults to None, which the router cannot run with; 2 is assumed.
    top_k = f.dim_or("num_experts_per_tok", 2, MAX_EXPERTS)
    check_top_k(num_experts, top_k)
    rope = f.dim("qk_rope_head_dim", MAX_HEAD_DIM)
    return DeepseekV2Arch(
        model_type="deepseek_v2", architecture=architecture, head=HEADS[architecture], hidden_size=hidden,
        num_layers=f.dim("num_hidden_layers", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_kv,
        head_dim=rope,  # DeepseekV2Config.__post_init__: head_dim = qk_rope_head_dim
        intermediate_size=f.dim("intermediate_size", MAX_INTERMEDIATE), vocab_size=f.dim("vocab_size", MAX_VOCAB),
        tie_word_embeddings=f.flag("tie_word_embeddings"), num_labels=f.num_labels(),
        max_positions=f.dim("max_position_embeddings", MAX_POSITIONS), hidden_act=f.text("hidden_act", "silu"),
        dropout=f.dropouts({"attention_dropout": 0.0}),
        q_lora_rank=f.dim("q_lora_rank", MAX_HIDDEN) if f.given("q_lora_rank") else None,
        kv_lora_rank=f.dim("kv_lora_rank", MAX_HIDDEN), qk_nope_head_dim=f.dim("qk_nope_head_dim", MAX_HEAD_DIM),
        qk_rope_head_dim=rope, v_head_dim=f.dim("v_head_dim", MAX_HEAD_DIM), attention_bias=f.flag("attention_bias"),
        mlp_bias=f.flag("mlp_bias"), first_k_dense_replace=f.dim("first_k_dense_replace", MAX_LAYERS, low=0),
        num_experts=num_experts, experts_per_token=top_k,
        expert_intermediate_size=f.dim("moe_intermediate_size", MAX_INTERMEDIATE),
        num_shared_experts=f.dim("n_shared_experts", MAX_EXPERTS, low=0),
        group_limited=f.text("topk_method", "greedy") == "group_limited_greedy",
        renormalise=f.flag("norm_topk_prob"), output_router_logits=f.flag("output_router_logits"),
    )


# ---------------------------------------------------------------- inventory


def _mla_attention(p: Params, prefix: str, i: int, a: DeepseekV2Arch) -> None:
    """DeepseekV2Attention: low-rank q (or a plain q_proj when q_lora_rank is null) and compressed kv."""
    hidden, bias = a.hidden_size, a.attention_bias
    q_out = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    if a.q_lora_rank is None:
        p.linear(f"{prefix}q_proj", hidden, q_out, ROLE_ATTENTION, i)
    else:
        p.linear(f"{prefix}q_a_proj", hidden, a.q_lora_rank, ROLE_ATTENTION, i, bias)
        p.norm(f"{prefix}q_a_layernorm", a.q_lora_rank, i)
        p.linear(f"{prefix}q_b_proj", a.q_lora_rank, q_out, ROLE_ATTENTION, i)
    p.linear(f"{prefix}kv_a_proj_with_mqa", hidden, a.kv_lora_rank + a.qk_rope_head_dim, ROLE_ATTENTION, i, bias)
    p.norm(f"{prefix}kv_a_layernorm", a.kv_lora_rank, i)
    p.linear(f"{prefix}kv_b_proj", a.kv_lora_rank, a.num_heads * (a.qk_nope_head_dim + a.v_head_dim),
             ROLE_ATTENTION, i)
    p.linear(f"{prefix}o_proj", a.num_heads * a.v_head_dim, hidden, ROLE_ATTENTION, i, bias)


def inventory(a: DeepseekV2Arch) -> list[ParamTensor]:
    hidden = a.hidden_size

    def block(p: Params, prefix: str, i: int) -> None:
        _mla_attention(p, f"{prefix}self_attn.", i, a)
        m = f"{prefix}mlp."
        if not a.sparse(i):
            gated_mlp(p, m, i, hidden, a.intermediate_size, a.mlp_bias)
        else:  # DeepseekV2Moe: fused experts, router (kept in fp32 by transformers), shared experts as one MLP
            fused_experts(p, m, i, a.num_experts, hidden, a.expert_intermediate_size)
            router(p, m, i, a.num_experts, hidden)
            gated_mlp(p, f"{m}shared_experts.", i, hidden, a.expert_intermediate_size * a.num_shared_experts,
                      a.mlp_bias)
        pre_post_norms(p, prefix, i, hidden)

    return decoder(a.head, hidden, a.vocab_size, a.num_layers, a.tie_word_embeddings, a.num_labels, block)


# ---------------------------------------------------------------- activations


def _mlp(a: DeepseekV2Arch, layer: int, run: Run) -> tuple[dict[str, int], str]:
    """A dense DeepseekV2MLP (as LlamaMLP: 4 c T I, two casts under autocast) or the MoE block.

    DeepseekV2TopkRouter: F.linear(x.type(fp32)) saves an fp32 copy of a 16-bit input (4 T h; under autocast the
    Linear casts instead, counted with the casts), group_limited_greedy a bool mask over the scores (T E); no
    renormalisation unless norm_topk_prob; the routed experts as memcalc.families.moe.routed_experts (routing
    weights in fp32); DeepseekV2MLP shared experts 4 c T (n_shared x I), added unweighted.
    """
    tokens, c, h = run.tokens, run.c, a.hidden_size
    if not a.sparse(layer):
        casts = 2 * c * tokens * h if run.autocast else 0
        mlp = 4 * c * tokens * a.intermediate_size
        return parts(mlp=mlp, casts=casts), f"MLP {mlp:,}{f' + MLP input casts {casts:,}' if casts else ''}"
    router_bytes, experts = routed_experts(run, h, a.num_experts, a.experts_per_token, a.expert_intermediate_size,
                                           a.renormalise, BYTES_PER_FP32)
    router_bytes += BYTES_PER_FP32 * tokens * h if c != BYTES_PER_FP32 and not run.autocast else 0
    router_bytes += tokens * a.num_experts if a.group_limited else 0
    casts = c * tokens * h if run.autocast else 0  # the router's F.linear casts the fp32 norm output
    shared = 4 * c * tokens * a.expert_intermediate_size * a.num_shared_experts
    if run.autocast and shared:
        casts += 2 * c * tokens * h
    aux = aux_loss_layer_bytes(a.output_router_logits, run, a.num_experts)
    formula = moe_formula(router_bytes, experts, a.experts_per_token, a.num_experts, shared, casts, aux)
    return parts(mlp=router_bytes + experts + shared + aux, casts=casts), formula


def activations(a: DeepseekV2Arch, run: Run) -> Rule:
    """MLA per layer (a heads, qk = qk_nope + qk_rope, v = v_head_dim, ranks r_q and r_kv):
      input RMSNorm and post-attention RMSNorm as Llama's; q_a_layernorm over r_q and kv_a_layernorm over r_kv the
      same way ((4 + 2c) T r + 4 T; under autocast their 16-bit input gives the same bytes, the next Linear's cast
      standing for the output); without q_lora_rank q_proj reads the input norm directly.
      Rotary (apply_rotary_emb: complex multiply) saves only freqs_cis (per model, complex64: 4 s qk_rope).
      query_states (torch.cat) and key_states (new_empty + copy_) c T a qk each.
      eager: v's contiguous copy for the matmul c T a v, softmax in fp32 4 b a s^2 and its c copy, the output's
      contiguous copy c T a v.
      sdpa: the head dims differ (qk != v), so CUDA runs memory-efficient attention: it saves q, k, v (a view of
      kv_b_proj's output: its whole storage c T a (qk_nope + v)), the output c T a v and o_proj's contiguous copy of
      it (the output follows v's strided layout) and logsumexp 4 b a s (rows padded to 32). The CPU takes its flash
      kernel where qk == v (benchmarks/accuracy.py measures that) and the math kernel otherwise, which memcalc's traces
      and measured CPU steps avoid by padding v to qk through the flash kernel (cuda_semantics.sdpa_narrow_v): for
      DeepSeek's proportions (qk_nope = v = 2 qk_rope) that keeps these bytes exactly.
      Under autocast q_a_proj (or q_proj) and kv_a_proj_with_mqa save their own casts of the fp32 norm output.
    """
    h, heads = a.hidden_size, a.num_heads
    nope, rope, v, kv_rank = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    qk = nope + rope
    b, s, tokens, c, autocast = run.b, run.s, run.tokens, run.c, run.autocast
    norms = 2 * rms_norm_bytes(False, tokens, h, c, autocast)
    ranks = [kv_rank] + ([a.q_lora_rank] if a.q_lora_rank else [])
    lora_norms = sum(rms_norm_bytes(False, tokens, rank, c, False) for rank in ranks)
    if c == BYTES_PER_FP32 and not autocast:
        # kv_a_layernorm's input is a strided split of kv_a_proj_with_mqa's output: in fp32 .to(fp32) keeps the view,
        # so pow and mul save that whole output (r_kv + qk_rope wide) rather than a contiguous fp32 copy.
        lora_norms += BYTES_PER_FP32 * tokens * rope
    qk_states = 2 * c * tokens * heads * qk
    if run.eager:
        probs = (BYTES_PER_FP32 + (c if c != BYTES_PER_FP32 else 0)) * b * heads * s * s
        attention = qk_states + 2 * c * tokens * heads * v + probs
    else:
        # (sdpa's output is not laid out (b, s, a, v) and o_proj saves a contiguous copy of it, as Phi-3's fused qkv
        # makes it: + c T a v, measured on the CPU (was -1.3% to -1.7%). On the CPU the flash kernel's output follows q's
        # layout, (b, a, s, qk) here (torch.cat), and the padded v's output is sliced (cuda_semantics.sdpa_narrow_v).
        # CUDA's memory-efficient kernel lays its output out (b, s, a, v) (torch/_meta_registrations.py
        # meta__scaled_dot_product_efficient_attention), so by torch's code no copy is made there: counted until a GPU
        # step says otherwise, on the safe side.)
        attention = (qk_states + c * tokens * heads * (nope + v) + 2 * c * tokens * heads * v
                     + BYTES_PER_FP32 * b * heads * (-(-s // 32) * 32))
    casts = 2 * c * tokens * h if autocast else 0
    attention_part = parts(norms=norms + lora_norms, attention=attention, casts=casts)
    layers, mlps, kinds = [], {}, {}
    for i in range(a.num_layers):
        sparse = a.sparse(i)
        if sparse not in kinds:
            mlp, mlps[sparse] = _mlp(a, i, run)
            merged = dict(attention_part)
            for key, value in mlp.items():
                merged[key] = merged.get(key, 0) + value
            kinds[sparse] = merged
        layers.append(kinds[sparse])
    formula = (f"norms {norms:,} + q/kv low-rank norms {lora_norms:,} + MLA attention {attention:,}"
               f"{f' + autocast input casts {casts:,}' if casts else ''} + {' | '.join(mlps.values())}")
    per_model = parts(
        rotary=4 * s * rope, ids=2 * BYTES_PER_INT64 * tokens, loss_scalars=BYTES_PER_FP32,
        final_norm=rms_norm_bytes(False, tokens, h, c, autocast), head=c * tokens * h if autocast else 0,
        routing=aux_loss_model_bytes(a.output_router_logits, a.num_experts),
    )
    released_at_scores = held_at_scores = 0
    if run.eager:
        # At softmax's backward (eager_attention_forward's, as Llama's): released by then what the layer made after
        # its attention (the post-attention RMSNorm's saves with the MLP's input, under autocast the first layer's
        # dense MLP input casts; o_proj's input copy) and what the second matmul saved (the probabilities' c copy, v's
        # contiguous copy); waiting, v's gradient and the residual stream's (measured: DeepSeek-V2 eager checkpointed
        # CPU steps peak there, at the dense first layer's turn).
        made_after = (rms_norm_bytes(False, tokens, h, c, autocast) + c * tokens * heads * v
                      + (_mlp(a, 0, run)[0].get(PART_CASTS, 0) if autocast else 0))
        released_at_scores = made_after + (c * b * heads * s * s if c != BYTES_PER_FP32 else 0) + c * tokens * heads * v
        held_at_scores = c * tokens * heads * v + run.residual * tokens * h
    rule = Rule(layers, formula, per_model, SOURCE, a.num_layers * tokens * h * run.residual,
                gated_mlp_transient(run, a.intermediate_size, h), Loss(tokens, a.vocab_size, BYTES_PER_FP32),
                [NOTE_MOE], held=final_hidden_held(run, h), released_at_scores=released_at_scores,
                held_at_scores=held_at_scores)
    top = a.num_layers - 1
    if a.sparse(top) and run.ep == 1:
        opening = _restore_backward(a, run)
        # (the first layer's late turn opens a MoE block's backward only where that layer is sparse)
        rule.opening_transient = opening if a.sparse(0) else 0
        rule.last_opening_transient = opening
    elif a.sparse(top) and run.checkpointing:
        rule.notes.append("--ep: what a checkpointed MoE layer's backward opens with (its routed experts' restore and "
                          "its shared expert's gradients, deepseek_v2._restore_backward) is not counted under expert "
                          "parallelism, whose restore runs through the all-to-all: low by up to about three fp32 "
                          "tokens x hidden tensors, late in backward")
    return rule


def _restore_backward(a: DeepseekV2Arch, run: Run) -> int:
    """Rule.opening_transient of a DeepSeek-V2 MoE layer: its backward at the routed experts' restore.

    DeepseekV2Moe.forward adds shared_experts(residuals) after the routed experts, so autograd (ready nodes by
    sequence number, the latest first) runs the shared expert's backward first: its weight gradients made (3 h I_s, I_s
    = n_shared x moe_intermediate_size; in the weights' dtype), its input gradient (r T h: the residual stream's dtype,
    autocast's casts' backward cast gate_proj's and up_proj's to fp32 before their sum) waiting for the routed
    experts', and its saves released (4 c T I_s; the MoE input c T h saved by gate_proj and up_proj alone when 16-bit
    without autocast, as the router saves its own fp32 copy; under autocast gate_proj's and up_proj's input casts,
    2 c T h, and its weights' casts, c 3 h I_s).
    Then the routed experts' (integrations/moe.py grouped_mm_experts_forward, the end: weighted_out[inv_perm], view
    and sum over top-k, .to(input dtype)): the sum's backward expands the cast-back fp32 gradient to (T, k, h) and the
    view's backward makes it contiguous (clone, r S h), then index's backward (aten index_backward: new_zeros and an
    index_put of it, r S h each), with r fp32 (the routing weights are DeepseekV2TopkRouter's fp32 softmax, so
    weighted_out is fp32 whatever e). Beside them the layer's output gradient (r T h, Rule.output_gradient).
    Measured: tests/test_verify_step.py's TINY_MLA checkpointed (bf16-pure, 2 x 128) peaks at that index_put with
    exactly these tensors beside the recomputed layer (memcalc's tracker, its live storages at the peak by op); the
    rule read -10.94% there without them (docs/accuracy.md, "DeepSeek-V2's checkpointed MoE layer").
    """
    tokens, c, h = run.tokens, run.c, a.hidden_size
    shared = a.expert_intermediate_size * a.num_shared_experts
    grad_bytes = BYTES_PER_FP32 if run.autocast else c  # the weights' dtype (amp-*: fp32 weights)
    shared_gradients = grad_bytes * (3 * h * shared + ((2 * shared + h) if a.mlp_bias else 0))
    released = 4 * c * tokens * shared
    if run.autocast:  # (and the shared expert's weight casts, saved by its Linears alone)
        released += 2 * c * tokens * h + c * (3 * h * shared)
    elif c != BYTES_PER_FP32:
        released += c * tokens * h
    if run.checkpointing and run.residual == BYTES_PER_FP32:
        # The recomputed input norm's .to(float32) of an fp32 residual stream (autocast, fp32) is the layer's kept input
        # itself, which pow and mul save: counted with the kept inputs, not again in the recomputed layer (measured at
        # this moment: amp-bf16 +4.3% without it). Only here: the dense first layer's late turn, measured in fp32 at
        # hidden 128, needs those bytes (-1.5% with them off there as Rule.recompute_saves_input).
        released += run.residual * tokens * h
    pairs_h = tokens * a.experts_per_token * h
    return (3 * BYTES_PER_FP32 * pairs_h + shared_gradients + run.residual * tokens * h - released
            + output_gradient(run, h))


HEADS = decoder_heads("DeepseekV2")
FAMILIES = {"deepseek_v2": Family("deepseek_v2", HEADS, resolve, inventory, activations)}
