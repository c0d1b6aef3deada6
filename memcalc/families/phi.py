"""Phi-1/1.5/2 (models/phi/modeling_phi.py): a parallel block, one LayerNorm read by attention and MLP, partial
rotary, biases everywhere, a biased lm_head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc.families.base import (
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    Arch,
    Family,
    Fields,
)
from memcalc.families.llama import LLAMA_DEFAULTS
from memcalc.families.saved import (
    PYTHON_GELUS,
    Loss,
    Rule,
    Run,
    act_bytes,
    dropout_mask,
    eager_probs,
    final_hidden_held,
    fp32_softmax_dropout,
    layer_norm,
    linear_input,
    parts,
    unsaved_cache_copies,
)
from memcalc.families.tensors import Params, decoder, decoder_heads
from memcalc.model import ROLE_ATTENTION, ROLE_MLP, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_phi.py (PhiDecoderLayer, PhiAttention, NewGELU); checked against a "
          "CPU forward")

_DEFAULTS = {  # models/phi/configuration_phi.py: PhiConfig
    **LLAMA_DEFAULTS, "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "qk_layernorm": False, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5, "resid_pdrop": 0.0,
    "embd_pdrop": 0.0, "attention_dropout": 0.0,
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class PhiArch(Arch):
    qk_layernorm: bool
    rotary_dim: int  # partial rotary: int(head_dim x partial_rotary_factor)
    use_cache: bool = True  # config.use_cache: training forwards build a DynamicCache unless it is False


def resolve(raw: Mapping[str, Any], architecture: str) -> PhiArch:
    f = Fields(raw, _DEFAULTS)
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, num_kv = f.heads()
    factor = f.probability("partial_rotary_factor", 0.5)
    return PhiArch(
        model_type="phi", architecture=architecture, head=HEADS[architecture], hidden_size=hidden,
        num_layers=f.dim("num_hidden_layers", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_kv,
        head_dim=f.head_dim(hidden, num_heads), intermediate_size=f.dim("intermediate_size", MAX_INTERMEDIATE),
        vocab_size=f.dim("vocab_size", MAX_VOCAB), tie_word_embeddings=f.flag("tie_word_embeddings"),
        num_labels=f.num_labels(), max_positions=f.dim("max_position_embeddings", MAX_POSITIONS), norm="layernorm",
        hidden_act=f.text("hidden_act", "gelu_new"),
        dropout=f.dropouts({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}),
        qk_layernorm=f.flag("qk_layernorm"), rotary_dim=int(hidden // num_heads * factor),
        use_cache=f.flag("use_cache", True),
    )


def inventory(a: PhiArch) -> list[ParamTensor]:  # parallel block, LayerNorms, biases
    hidden, inter, head_dim = a.hidden_size, a.intermediate_size, a.head_dim

    def block(p: Params, prefix: str, i: int) -> None:
        att = f"{prefix}self_attn."
        p.linear(f"{att}q_proj", hidden, a.num_heads * head_dim, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{att}k_proj", hidden, a.num_kv_heads * head_dim, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{att}v_proj", hidden, a.num_kv_heads * head_dim, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{att}dense", a.num_heads * head_dim, hidden, ROLE_ATTENTION, i, bias=True)
        if a.qk_layernorm:  # sized hidden_size // num_attention_heads, not head_dim
            p.norm(f"{att}q_layernorm", hidden // a.num_heads, i, bias=True)
            p.norm(f"{att}k_layernorm", hidden // a.num_heads, i, bias=True)
        p.linear(f"{prefix}mlp.fc1", hidden, inter, ROLE_MLP, i, bias=True)
        p.linear(f"{prefix}mlp.fc2", inter, hidden, ROLE_MLP, i, bias=True)
        p.norm(f"{prefix}input_layernorm", hidden, i, bias=True)

    return decoder(a.head, hidden, a.vocab_size, a.num_layers, a.tie_word_embeddings, a.num_labels, block,
                   norm="final_layernorm", phi=True)


def activations(a: PhiArch, run: Run) -> Rule:
    """Per PhiDecoderLayer: input_layernorm (input r T h + stats) and its output as q, k, v and fc1 read it (c T h;
    under autocast four casts); partial rotary: q and k are torch.cat((rotated, pass)) results (c T h each, laid
    out (b, a, s, d)), v a view of v_proj's output (c T h); sdpa saves q, k, v and its output, whose (b, a, s, d)
    layout (it follows q's) makes the dense layer save a contiguous copy: 5 c T h + logsumexp 4 T a; eager: q and
    k as they are, v's contiguous copy, softmax(fp32) and its c copy, the output's copy (4 c T h + (4 + c) b a s^2).
    MLP: NewGELUActivation (gelu_new) saves input, tanh, 1 + tanh and 0.5 x, fc2 the output (5 c T I); under
    CUDA autocast pow runs in fp32, so the fp32 cast of the input, tanh and 1 + tanh are fp32, 0.5 x in c and fc2 a
    c cast of the fp32 output ((12 + 2c) T I). Dropout (CUDA masks): resid_pdrop after attention and MLP (2 T h),
    embd_pdrop T h per model, attention_dropout (eager) b a s^2 (saved.fp32_softmax_dropout).
    Per model: rotary cos and sin 2 s rot (fp32 under autocast), final_layernorm and the lm_head input, input_ids and
    shifted labels, the loss divisor. qk_layernorm: per-head LayerNorms of q and k (their inputs and statistics).
    """
    h, heads, inter = a.hidden_size, a.num_heads, a.intermediate_size
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, ti, scores = tokens * h, tokens * inter, b * heads * s * s
    norms = layer_norm(run, th) + linear_input(run, th, 4)
    attention = 4 * c * th + (eager_probs(run, scores, True) if run.eager else c * th + BYTES_PER_FP32 * tokens * heads)
    if a.qk_layernorm:
        # PhiAttention.forward: q_layernorm(q) and k_layernorm(k) per head: each saves its input (the projection's
        # output; under CUDA autocast layer_norm runs in fp32, so its fp32 cast) and fp32 mean and rstd per row.
        norm_input = BYTES_PER_FP32 if run.autocast else c
        q_width, kv_width = heads * a.head_dim, a.num_kv_heads * a.head_dim
        attention += norm_input * tokens * (q_width + kv_width) + 2 * BYTES_PER_FP32 * tokens * (heads + a.num_kv_heads)
    mlp = (12 + 2 * c) * ti if run.autocast and a.hidden_act in PYTHON_GELUS else act_bytes(a.hidden_act, c, ti)
    dropout = 2 * dropout_mask(a.dropout.get("resid_pdrop", 0.0), th)
    if run.eager:
        dropout += fp32_softmax_dropout(a.dropout.get("attention_dropout", 0.0), run, scores)
    formula = (f"layer norm and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    per_model = parts(
        rotary=2 * s * a.rotary_dim * (BYTES_PER_FP32 if run.autocast else c), ids=2 * BYTES_PER_INT64 * tokens,
        loss_scalars=BYTES_PER_FP32, final_norm=layer_norm(run, th), head=c * th,
        dropout=dropout_mask(a.dropout.get("embd_pdrop", 0.0), th),
    )
    layer = parts(norms=norms, attention=attention, mlp=mlp, dropout=dropout)
    # Held through the loss (Rule.held): the fp32 final hidden state under autocast, and with a cache the
    # DynamicCache's copies attention does not save (k is the cat of the rotated and passed parts: fp32 under
    # autocast, as Llama's rotated k).
    held = final_hidden_held(run, h)
    if a.use_cache and not run.checkpointing:
        held += a.num_layers * unsaved_cache_copies(run, heads, a.num_kv_heads, a.head_dim, run.eager)
    # A layer's backward transients at its MLP: fc2's input gradient and the hidden state's, and in NewGELU's python
    # ops (gelu_new) the gradient of the product being made beside them (fp32 under autocast, whose pow runs in
    # fp32, where fc2's input gradient is also cast to fp32); found by the traced step (memcalc/measure/timeline.py:
    # checkpointed steps were 2.6% to 4.1% low without them).
    gelu_grad = (BYTES_PER_FP32 if run.autocast else c) * ti if a.hidden_act in PYTHON_GELUS else 0
    if run.autocast and gelu_grad:  # (as GPT-2's: fc2's input gradient is cast to fp32 too, the gelu output was)
        gelu_grad += BYTES_PER_FP32 * ti
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * th * run.residual,
                c * tokens * (inter + h) + gelu_grad, Loss(tokens, a.vocab_size, BYTES_PER_FP32), held=held)


HEADS = decoder_heads("Phi")
FAMILIES = {"phi": Family("phi", HEADS, resolve, inventory, activations,
                          lora_targets=("q_proj", "v_proj", "fc1", "fc2"))}
