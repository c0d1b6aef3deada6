"""BLOOM (models/bloom/modeling_bloom.py): ALiBi (no position tensors), LayerNorms, fused query_key_value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memcalc.families.base import BASE, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB, Arch, Family, Fields
from memcalc.families.saved import (
    Loss,
    Rule,
    Run,
    dropout_mask,
    eager_probs,
    final_hidden_held,
    fp32_softmax_dropout,
    layer_norm,
    linear_input,
    parts,
)
from memcalc.families.tensors import Params, decoder_heads, simple_head
from memcalc.model import ROLE_ATTENTION, ROLE_MLP, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_bloom.py (BloomBlock, BloomAttention, BloomGelu); checked against "
          "a CPU forward")

_DEFAULTS = {  # models/bloom/configuration_bloom.py: BloomConfig
    "vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8, "tie_word_embeddings": True,
    "hidden_dropout": 0.0, "attention_dropout": 0.0,
}  # fmt: skip
# BloomConfig.attribute_map, and n_embed, which its __post_init__ pops into hidden_size
_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"}


def resolve(raw: Mapping[str, Any], architecture: str) -> Arch:
    f = Fields(raw, _DEFAULTS, _ALIASES)
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, _ = f.heads("n_head", None)
    return Arch(
        model_type="bloom", architecture=architecture, head=HEADS[architecture], hidden_size=hidden,
        num_layers=f.dim("n_layer", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=f.head_dim(hidden, num_heads, key=None), intermediate_size=4 * hidden,  # BloomMLP: 4 x hidden
        vocab_size=f.dim("vocab_size", MAX_VOCAB), tie_word_embeddings=f.flag("tie_word_embeddings"),
        num_labels=f.num_labels(), norm="layernorm", hidden_act="bloom_gelu",
        dropout=f.dropouts({"hidden_dropout": 0.0, "attention_dropout": 0.0}),
        supports_sdpa=False,  # BloomPreTrainedModel sets no _supports_sdpa: transformers runs eager attention
    )


def inventory(a: Arch) -> list[ParamTensor]:  # BloomForCausalLM
    hidden, vocab = a.hidden_size, a.vocab_size
    base, p = ("" if a.head == BASE else "transformer."), Params()
    p.embedding(f"{base}word_embeddings", vocab, hidden)
    p.norm(f"{base}word_embeddings_layernorm", hidden, None, bias=True)
    for i in range(a.num_layers):
        h = f"{base}h.{i}."
        p.norm(f"{h}input_layernorm", hidden, i, bias=True)
        p.linear(f"{h}self_attention.query_key_value", hidden, 3 * hidden, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{h}self_attention.dense", hidden, hidden, ROLE_ATTENTION, i, bias=True)
        p.norm(f"{h}post_attention_layernorm", hidden, i, bias=True)
        p.linear(f"{h}mlp.dense_h_to_4h", hidden, 4 * hidden, ROLE_MLP, i, bias=True)
        p.linear(f"{h}mlp.dense_4h_to_h", 4 * hidden, hidden, ROLE_MLP, i, bias=True)
    p.norm(f"{base}ln_f", hidden, None, bias=True)
    simple_head(p, a.head, a.tie_word_embeddings, hidden, vocab, a.num_labels)
    return p.tensors


def activations(a: Arch, run: Run) -> Rule:
    """BloomForCausalLM. transformers has no sdpa path for BLOOM: attention is always eager.

    Per BloomBlock: input_layernorm and post_attention_layernorm (input r T h + stats each) and their outputs as
    query_key_value and dense_h_to_4h read them (c T h each); attention: alibi.baddbmm saves contiguous copies of
    q and k^T, softmax(fp32) and its c copy (4 + c) b a s^2, the matmul a copy of v, dense a copy of the merged
    heads (4 c T h); BloomGelu (a custom autograd Function) saves its input, dense_4h_to_h the output (2 c T 4h).
    Dropout (CUDA masks): dropout_add after attention and MLP (2 T h), attention_dropout b a s^2
    (saved.fp32_softmax_dropout).
    Per model: word_embeddings_layernorm (input r T h + stats; its output is layer 0's input), ln_f and the lm_head
    input, input_ids and shifted labels, the loss divisor. The alibi bias needs no gradient: not saved.
    """
    h, heads = a.hidden_size, a.num_heads
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * heads * s * s
    norms = 2 * layer_norm(run, th) + 2 * linear_input(run, th, 1)
    attention = 4 * c * th + eager_probs(run, scores, True)
    mlp = 2 * c * tokens * 4 * h
    dropout = (2 * dropout_mask(a.dropout.get("hidden_dropout", 0.0), th)
               + fp32_softmax_dropout(a.dropout.get("attention_dropout", 0.0), run, scores))
    formula = (f"layer norms and Linear inputs {norms:,} + attention (eager) {attention:,} + MLP {mlp:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    per_model = parts(ids=2 * BYTES_PER_INT64 * tokens, loss_scalars=BYTES_PER_FP32, embeddings=layer_norm(run, th),
                      final_norm=layer_norm(run, th), head=c * th)
    layer = parts(norms=norms, attention=attention, mlp=mlp, dropout=dropout)
    # A layer's backward transients: dense_4h_to_h's input gradient, then GeLUFunction.backward (modeling_bloom.py
    # bloom_gelu_back) makes tanh_out, 1 - tanh_out^2 and three products at once, each T x 4h, beside the hidden
    # state's gradient (the residual stream's dtype: fp32 under autocast): 6 c T 4h + r T h, found by the traced step
    # (memcalc/measure/timeline.py).
    # Checkpointed (measured: BLOOM checkpointed CPU steps peak in GeLUFunction.backward): by then dense_4h_to_h's
    # backward has released its input, the GeLU's output (c T 4h), and input_layernorm saves the layer's kept input
    # itself. (Without checkpointing the traced step, with CUDA's semantics, still holds the GeLU's output there at the
    # first layer's turn, kept; at the last layer's it has released it, and the MLP's dropout_add mask before it.)
    # At softmax's backward (its largest moment, CUDA's temporary beside its gradients): released by then what the
    # block made after its attention (post_attention_layernorm's input and statistics, dense_h_to_4h's input, the
    # attention dropout_add's mask, dense's copy of the merged heads) and what the second bmm saved (the
    # probabilities' c copy, v's copy); waiting, v's gradient and the residual stream's (measured: BLOOM eager
    # checkpointed CPU steps).
    made_after = (layer_norm(run, th) + linear_input(run, th, 1) + c * th
                  + dropout_mask(a.dropout.get("hidden_dropout", 0.0), th))
    probs_copy = c * scores if c != BYTES_PER_FP32 else 0
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * th * run.residual,
                6 * c * tokens * 4 * h + run.residual * th, Loss(tokens, a.vocab_size, BYTES_PER_FP32), [],
                released_at_scores=made_after + probs_copy + c * th, held_at_scores=c * th + run.residual * th,
                held=final_hidden_held(run, h), released_at_mlp=c * tokens * 4 * h if run.checkpointing else 0,
                released_at_last_mlp=c * tokens * 4 * h + dropout_mask(a.dropout.get("hidden_dropout", 0.0), th),
                recompute_saves_input=run.residual * th if run.checkpointing else 0)


HEADS = decoder_heads("Bloom")
FAMILIES = {"bloom": Family("bloom", HEADS, resolve, inventory, activations, lora_targets=("query_key_value",))}
