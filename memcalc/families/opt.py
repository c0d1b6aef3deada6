"""OPT (models/opt/modeling_opt.py): learned positions (offset by 2), LayerNorms, ReLU MLP, biases."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc.families.base import (
    BASE,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    Arch,
    Family,
    Fields,
)
from memcalc.families.saved import (
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
)
from memcalc.families.tensors import Params, decoder_heads, simple_head
from memcalc.model import ROLE_ATTENTION, ROLE_MLP, ROLE_OTHER, ROLE_POSITION_EMBEDDING, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = "derived from transformers modeling_opt.py (OPTDecoderLayer, OPTAttention); checked against a CPU forward"
# OPTLearnedPositionalEmbedding: position ids are offset by 2, so the table has max_position_embeddings + 2 rows.
POSITION_OFFSET = 2

_DEFAULTS = {  # models/opt/configuration_opt.py: OPTConfig
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072, "num_attention_heads": 12,
    "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None, "enable_bias": True, "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True, "activation_function": "relu", "dropout": 0.1, "attention_dropout": 0.0,
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class OptArch(Arch):
    word_embed_proj_dim: int
    layer_norm_before: bool
    final_layer_norm: bool  # OPTDecoder.final_layer_norm exists (it holds tensors only with affine norms)
    bias: bool
    affine_norms: bool


def resolve(raw: Mapping[str, Any], architecture: str) -> OptArch:
    f = Fields(raw, _DEFAULTS)
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, _ = f.heads(kv_key=None)
    before = f.flag("do_layer_norm_before", True)
    affine = f.flag("layer_norm_elementwise_affine", True)
    return OptArch(
        model_type="opt", architecture=architecture, head=HEADS[architecture], hidden_size=hidden,
        num_layers=f.dim("num_hidden_layers", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=f.head_dim(hidden, num_heads, key=None), intermediate_size=f.dim("ffn_dim", MAX_INTERMEDIATE),
        vocab_size=f.dim("vocab_size", MAX_VOCAB), tie_word_embeddings=f.flag("tie_word_embeddings"),
        num_labels=f.num_labels(), max_positions=f.dim("max_position_embeddings", MAX_POSITIONS),
        learned_positions=True, norm="layernorm", hidden_act=f.text("activation_function", "relu"),
        dropout=f.dropouts({"dropout": 0.1, "attention_dropout": 0.0}),
        word_embed_proj_dim=f.dim_or("word_embed_proj_dim", hidden, MAX_HIDDEN), layer_norm_before=before,
        final_layer_norm=before and not f.flag("_remove_final_layer_norm"),
        bias=f.flag("enable_bias", True), affine_norms=affine,
    )


def _layer(p: Params, d: str, i: int, a: OptArch) -> None:
    """OPTDecoderLayer; LayerNorms hold no tensors when layer_norm_elementwise_affine is false."""
    hidden = a.hidden_size
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        p.linear(f"{d}self_attn.{proj}", hidden, hidden, ROLE_ATTENTION, i, a.bias)
    if a.affine_norms:
        p.norm(f"{d}self_attn_layer_norm", hidden, i, bias=True)
    p.linear(f"{d}fc1", hidden, a.intermediate_size, ROLE_MLP, i, a.bias)
    p.linear(f"{d}fc2", a.intermediate_size, hidden, ROLE_MLP, i, a.bias)
    if a.affine_norms:
        p.norm(f"{d}final_layer_norm", hidden, i, bias=True)


def inventory(a: OptArch) -> list[ParamTensor]:  # OPTDecoder
    hidden, vocab, proj_dim = a.hidden_size, a.vocab_size, a.word_embed_proj_dim
    base, p = ("decoder." if a.head == BASE else "model.decoder."), Params()
    p.embedding(f"{base}embed_tokens", vocab, proj_dim)
    p.embedding(f"{base}embed_positions", a.max_positions + POSITION_OFFSET, hidden, ROLE_POSITION_EMBEDDING)
    if proj_dim != hidden:  # OPT-350m: embeddings narrower than the blocks
        p.linear(f"{base}project_out", hidden, proj_dim, ROLE_OTHER, None)
        p.linear(f"{base}project_in", proj_dim, hidden, ROLE_OTHER, None)
    if a.final_layer_norm and a.affine_norms:
        p.norm(f"{base}final_layer_norm", hidden, None, bias=True)
    for i in range(a.num_layers):
        _layer(p, f"{base}layers.{i}.", i, a)
    simple_head(p, a.head, a.tie_word_embeddings, proj_dim, vocab, a.num_labels)
    return p.tensors


def activations(a: OptArch, run: Run) -> Rule:
    """OPTForCausalLM; pre-LayerNorm (do_layer_norm_before, every size but 350m) or post-LayerNorm (350m).

    Per OPTDecoderLayer: self_attn_layer_norm and final_layer_norm (input r T h + stats each), their outputs as
    q/k/v and fc1 read them (c T h; under autocast one cast per Linear); attention: sdpa saves q (q_proj output x
    scaling, a new tensor), k and v (views of their projections) and the output (out_proj reads it in place):
    4 c T h + logsumexp 4 T a; eager: contiguous copies of q, k^T, v and of the output 4 c T h, softmax(fp32) and
    its c copy (4 + c) b a s^2; fc1's ReLU result, which fc2 saves too (c T I). Dropout (CUDA masks): after the
    attention and after fc2 (2 T h); eager attention_dropout b a s^2 (saved.fp32_softmax_dropout).
    Post-LayerNorm (OPTDecoderLayer.forward with do_layer_norm_before false) saves the same per layer: q/k/v read
    the layer's input, each LayerNorm saves its input and statistics and fc1 reads self_attn_layer_norm's output;
    the next layer's q/k/v read final_layer_norm's output. The decoder then has no final LayerNorm.
    Per model: input_ids, position ids (b x s, from the attention mask's cumsum) and shifted labels (3 x 8 T),
    the decoder's final LayerNorm (pre-LayerNorm, unless _remove_final_layer_norm), project_in's and project_out's
    inputs (c T (p + h), word_embed_proj_dim p != hidden_size), the lm_head input (c T p), the loss divisor.
    """
    h, heads, ffn = a.hidden_size, a.num_heads, a.intermediate_size
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * heads * s * s
    norms = 2 * layer_norm(run, th) + linear_input(run, th, 3) + linear_input(run, th, 1)
    attention = 4 * c * th + (eager_probs(run, scores, True) if run.eager else BYTES_PER_FP32 * tokens * heads)
    mlp = act_bytes(a.hidden_act, c, tokens * ffn)
    dropout = 2 * dropout_mask(a.dropout.get("dropout", 0.0), th)
    if run.eager:
        dropout += fp32_softmax_dropout(a.dropout.get("attention_dropout", 0.0), run, scores)
    formula = (f"layer norms and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    # With word_embed_proj_dim != hidden_size (350m) project_in saves the embeddings (c T p) and project_out the
    # decoder's output (c T h); the lm_head then reads project_out's output (c T p).
    projected = a.word_embed_proj_dim != h
    proj = tokens * a.word_embed_proj_dim
    per_model = parts(ids=3 * BYTES_PER_INT64 * tokens, loss_scalars=BYTES_PER_FP32,
                      final_norm=layer_norm(run, th) if a.final_layer_norm else 0,
                      projections=c * (proj + th) if projected else 0, head=c * proj)
    notes: list[str] = []
    layer = parts(norms=norms, attention=attention, mlp=mlp, dropout=dropout)
    # The layer's output gradient waits for the skip connection through its MLP's backward (r T h).
    output_gradient = run.residual * th
    released_at_scores = held_at_scores = 0
    if run.eager and a.layer_norm_before:
        # Eager attention's softmax backward (memcalc.activations), after the MLP's: released by then final_layer_norm's
        # saves, fc1's input, the dropout masks after attention and fc2, out_proj's input copy, the probabilities'
        # c copy and v (the second matmul's); waiting, v's gradient and the residual stream's (measured: OPT
        # checkpointed eager CPU steps peak there).
        probs_copy = c * scores if c != BYTES_PER_FP32 else 0
        released_at_scores = (layer_norm(run, th) + linear_input(run, th, 1) + dropout + 2 * c * th + probs_copy)
        held_at_scores = c * th + run.residual * th
    # Pre-LayerNorm: self_attn_layer_norm saves the layer's input itself: under checkpointing, its kept input.
    saves_input = run.residual * th if run.checkpointing and a.layer_norm_before else 0
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * th * run.residual,
                c * tokens * (ffn + h) + output_gradient, Loss(tokens, a.vocab_size, BYTES_PER_FP32), notes,
                held=0 if a.word_embed_proj_dim != h else final_hidden_held(run, h),  # project_out's output: saved
                released_at_scores=released_at_scores, held_at_scores=held_at_scores,
                recompute_saves_input=saves_input, output_gradient=output_gradient)


HEADS = decoder_heads("OPT")
FAMILIES = {"opt": Family("opt", HEADS, resolve, inventory, activations, lora_targets=("q_proj", "v_proj"))}
