"""GPT-2 (models/gpt2/modeling_gpt2.py): learned positions, LayerNorms, transformers' Conv1D projections.

Config: GPT2Config calls the hidden size ``n_embd`` (attribute_map: hidden_size), layers ``n_layer``, heads
``n_head``, positions ``n_positions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc.families.base import (
    BASE,
    CAUSAL_LM,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    SEQ_CLS,
    Arch,
    Family,
    Fields,
)
from memcalc.families.saved import BYTES_PER_LAYER_NORM_STAT, PYTHON_GELUS, Loss, Rule, Run, final_hidden_held, parts
from memcalc.families.tensors import Params, simple_head
from memcalc.model import ROLE_ATTENTION, ROLE_MLP, ROLE_POSITION_EMBEDDING, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_gpt2.py (LayerNorm, Conv1D, sdpa/eager attention, NewGELU) "
          "and checked against the saved tensors of a CPU forward in the tests")

_DEFAULTS = {  # models/gpt2/configuration_gpt2.py: GPT2Config
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "tie_word_embeddings": True, "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1,
    "attn_pdrop": 0.1, "use_cache": True, "reorder_and_upcast_attn": False,
}  # fmt: skip
_ALIASES = {  # GPT2Config.attribute_map
    "hidden_size": "n_embd", "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class Gpt2Arch(Arch):
    use_cache: bool
    reorder_and_upcast_attn: bool  # eager attention in fp32 (GPT2Attention._upcast_and_reordered_attn)


def resolve(raw: Mapping[str, Any], architecture: str) -> Gpt2Arch:
    f = Fields(raw, _DEFAULTS, _ALIASES)
    hidden = f.dim("n_embd", MAX_HIDDEN)
    num_heads, _ = f.heads("n_head", None)
    return Gpt2Arch(
        model_type="gpt2", architecture=architecture, head=HEADS[architecture], hidden_size=hidden,
        num_layers=f.dim("n_layer", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=f.head_dim(hidden, num_heads, key=None),
        intermediate_size=f.dim_or("n_inner", 4 * hidden, MAX_INTERMEDIATE), vocab_size=f.dim("vocab_size", MAX_VOCAB),
        tie_word_embeddings=f.flag("tie_word_embeddings"), num_labels=f.num_labels(),
        max_positions=f.dim("n_positions", MAX_POSITIONS), learned_positions=True, norm="layernorm",
        hidden_act=f.text("activation_function", "gelu_new"),
        dropout=f.dropouts({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}),
        use_cache=f.flag("use_cache", True), reorder_and_upcast_attn=f.flag("reorder_and_upcast_attn"),
    )


def inventory(a: Gpt2Arch) -> list[ParamTensor]:  # GPT2LMHeadModel (Conv1D)
    hidden, vocab, inner = a.hidden_size, a.vocab_size, a.intermediate_size
    base, p = ("" if a.head == BASE else "transformer."), Params()
    p.embedding(f"{base}wte", vocab, hidden)
    p.embedding(f"{base}wpe", a.max_positions, hidden, ROLE_POSITION_EMBEDDING)
    for i in range(a.num_layers):
        h = f"{base}h.{i}."
        p.norm(f"{h}ln_1", hidden, i, bias=True)
        p.conv1d(f"{h}attn.c_attn", hidden, 3 * hidden, ROLE_ATTENTION, i)
        p.conv1d(f"{h}attn.c_proj", hidden, hidden, ROLE_ATTENTION, i)
        p.norm(f"{h}ln_2", hidden, i, bias=True)
        p.conv1d(f"{h}mlp.c_fc", hidden, inner, ROLE_MLP, i)
        p.conv1d(f"{h}mlp.c_proj", inner, hidden, ROLE_MLP, i)
    p.norm(f"{base}ln_f", hidden, None, bias=True)
    simple_head(p, a.head, a.tie_word_embeddings, hidden, vocab, a.num_labels)
    return p.tensors


def activations(a: Gpt2Arch, run: Run) -> Rule:
    """GPT-2 per layer and per model.

    Per layer: two LayerNorms (input cTh + mean and rstd), their outputs as Conv1D inputs (cTh each),
    attention (sdpa: the c_attn output 3cTh that q, k, v view, k and v copies in the KV cache when
    use_cache is on, output cTh (c_proj reads it in place), logsumexp 4Ta; eager: q, k, v cTh each, softmax output
    c*b*a*s^2, c_proj input copy cTh; reorder_and_upcast_attn: q and k in fp32, the softmax in fp32 and its c copy),
    and the MLP: c_fc output, NewGELU's tanh, 1 + tanh and product, c_proj input
    (5 cTI; a fused gelu keeps 2 cTI).
    """
    h, heads, intermediate = a.hidden_size, a.num_heads, a.intermediate_size
    tokens, b, s, c, autocast, eager = run.tokens, run.b, run.s, run.c, run.autocast, run.eager
    residual = BYTES_PER_FP32 if autocast else c
    layer_norm = residual * tokens * h + 2 * BYTES_PER_LAYER_NORM_STAT * tokens
    linear_inputs = 2 * c * tokens * h  # ln outputs (or, under autocast, their casts) read by c_attn and c_fc
    reordered = eager and a.reorder_and_upcast_attn
    # Eager attention's softmax runs in fp32 under autocast (the fp32 causal mask makes the scores fp32) and on the
    # reordered path; then .type(c) keeps a c copy for the second matmul (none when c is fp32 already).
    fp32_probs = autocast or reordered
    probs_copy = fp32_probs and c != BYTES_PER_FP32
    if reordered:
        # GPT2Attention._upcast_and_reordered_attn: baddbmm of q.float() and k.float() with autocast off saves both
        # in fp32 (2 x 4 T h), the fp32 softmax output and its c copy, v (c T h), c_proj's input copy c T h.
        attention = (2 * BYTES_PER_FP32 + 2 * c) * tokens * h + (BYTES_PER_FP32 + (c if probs_copy else 0)) * b * heads * s * s
    elif eager:
        probs = (BYTES_PER_FP32 + c) if autocast else c
        attention = 3 * c * tokens * h + probs * b * heads * s * s + c * tokens * h
    else:
        # With config.use_cache (GPT2Config default True; HF Trainer leaves it on) DynamicLayer.update
        # torch.cat's k and v into the cache, and sdpa saves those copies beside the c_attn output.
        # (Gradient checkpointing turns the cache off in training.)
        cache_copies = 2 * c * tokens * h if a.use_cache and not run.checkpointing else 0
        attention = cache_copies + 3 * c * tokens * h + c * tokens * h + BYTES_PER_FP32 * tokens * heads
    mlp = (5 if a.hidden_act in PYTHON_GELUS else 2) * c * tokens * intermediate
    if autocast and a.hidden_act in PYTHON_GELUS:
        # CUDA autocast runs NewGELU's pow in fp32: the fp32 cast of the input, tanh and 1 + tanh are fp32, 0.5 x
        # stays in c and c_proj saves a c cast of the fp32 output (as the phi family; CPU autocast keeps pow in bf16).
        mlp = (12 + 2 * c) * tokens * intermediate
    # Dropout as CUDA stores it (GPT2Config defaults 0.1): native_dropout keeps a 1-byte bool mask. The
    # residual dropouts after attention and MLP keep T*h each; sdpa's fused dropout keeps only RNG state;
    # eager attention dropout keeps a b*a*s^2 mask and its output in c (saved by the second matmul).
    dropout = 0
    if "resid_pdrop" in a.dropout:
        dropout += 2 * tokens * h
    if eager and "attn_pdrop" in a.dropout:
        dropout += (1 if probs_copy else 1 + c) * b * heads * s * s  # the dropped probs replace the c copy
    layer = parts(norms=2 * layer_norm + linear_inputs, attention=attention, mlp=mlp, dropout=dropout)
    formula = (f"layer norms {2 * layer_norm:,} + Conv1D inputs {linear_inputs:,} + attention {attention:,} + "
               f"MLP {mlp:,}{f' + dropout masks {dropout:,}' if dropout else ''}")
    per_model = parts(
        ids=BYTES_PER_INT64 * (2 * tokens + s),  # input_ids, position_ids, shifted labels (int64)
        loss_scalars=BYTES_PER_FP32, final_norm=layer_norm, head=c * tokens * h,
        dropout=tokens * h if "embd_pdrop" in a.dropout else 0,  # embedding dropout mask
    )
    # A layer's backward transients, found by the traced step (memcalc/measure/timeline.py): c_proj's input gradient
    # and the hidden state's (in the residual's dtype); NewGELU's backward (python ops) keeps two of its products'
    # gradients at once (fp32 under autocast, whose pow runs in fp32), and under autocast c_proj's input gradient is
    # also cast to fp32 (the gelu output was).
    gelu_grads = 2 * (BYTES_PER_FP32 if autocast else c) * tokens * intermediate if a.hidden_act in PYTHON_GELUS else 0
    transient = c * tokens * intermediate + residual * tokens * h + gelu_grads
    if autocast:
        transient += BYTES_PER_FP32 * tokens * intermediate
        if run.checkpointing and a.hidden_act in PYTHON_GELUS:
            # (a recomputed layer's: its 16-bit gradient is gone once cast, and the product's peak comes before the
            # cast of its 16-bit half's gradient; measured: GPT-2 checkpointed amp-bf16 steps, sdpa and eager)
            transient -= c * tokens * intermediate
    released_at_scores = held_at_scores = 0
    if eager and not reordered:
        # eager_attention_forward's backward at softmax's (its largest moment): released by then what the layer made
        # after attention (ln_2's saves, c_fc's input, c_proj's input copy, the dropout masks, the dropped
        # probabilities) and what the second matmul saved (the probabilities' c copy under autocast, v); waiting, v's
        # gradient and the residual stream's. softmax runs in the scores' dtype (fp32 under autocast: the fp32 mask
        # makes them fp32): its gradient and output are 2 x that per score (measured: GPT-2 checkpointed eager CPU
        # steps).
        released_at_scores = (layer_norm + c * tokens * h + c * tokens * h + dropout
                              + (c * b * heads * s * s if probs_copy else 0) + c * tokens * h)
        held_at_scores = c * tokens * h + residual * tokens * h
    # Checkpointed, by then c_proj's backward has released its input (the gelu's product, or its cast under autocast),
    # which the MLP part counts (measured: GPT-2 checkpointed CPU steps peak inside NewGELU's backward). (Without
    # checkpointing the traced step, with CUDA's semantics, still holds it there at the first layer's turn: kept, as
    # BLOOM's; at the last layer's it has released it, and the MLP's residual dropout mask before it.)
    released_at_last_mlp = ((c * tokens * intermediate if a.hidden_act in PYTHON_GELUS else 0)
                            + (tokens * h if "resid_pdrop" in a.dropout else 0))
    released_at_mlp = c * tokens * intermediate if a.hidden_act in PYTHON_GELUS and run.checkpointing else 0
    # ln_1 saves the layer's input itself (LayerNorm keeps its input whatever the dtype): under checkpointing, the
    # layer's kept input, counted once.
    saves_input = residual * tokens * h if run.checkpointing else 0
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * tokens * h * run.residual,
                transient, Loss(tokens, a.vocab_size, BYTES_PER_FP32),
                held=final_hidden_held(run, h), released_at_mlp=released_at_mlp,
                released_at_last_mlp=released_at_last_mlp, recompute_saves_input=saves_input,
                output_gradient=residual * tokens * h, released_at_scores=released_at_scores,
                held_at_scores=held_at_scores,
                # (softmax's: its gradient in and out and CUDA's temporary, in the scores' dtype; attention dropout's
                # backward, just before: its gradient in and out in c, beside its 1-byte mask)
                scores_backward_bytes=max(3 * residual, 2 * c + 1 if "attn_pdrop" in a.dropout else 0))


HEADS = {"GPT2LMHeadModel": CAUSAL_LM, "GPT2Model": BASE, "GPT2ForSequenceClassification": SEQ_CLS}
FAMILIES = {"gpt2": Family("gpt2", HEADS, resolve, inventory, activations, lora_targets=("c_attn",), conv1d=True,
                           unmodelled_switches=("add_cross_attention",))}
