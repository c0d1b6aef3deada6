"""BERT (models/bert/modeling_bert.py): an encoder with learned positions and token types; the head depends on
the class (masked LM, pre-training, classification, QA...)."""

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
from memcalc.families.saved import BYTES_PER_LAYER_NORM_STAT, Loss, Rule, Run, act_bytes, dropout_mask, head_note, parts
from memcalc.families.tensors import Params
from memcalc.model import ROLE_ATTENTION, ROLE_LM_HEAD, ROLE_MLP, ROLE_OTHER, ROLE_POSITION_EMBEDDING, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_bert.py (BertEmbeddings, BertSelfAttention sdpa/eager, "
          "BertSelfOutput, BertIntermediate, BertOutput, BertLMPredictionHead) and checked against the saved "
          "tensors of a CPU forward")
MODELLED_HEAD = "BertForMaskedLM"

_DEFAULTS = {  # models/bert/configuration_bert.py: BertConfig
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
    "tie_word_embeddings": True, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}  # fmt: skip

# class -> (pooler, head parts); models/bert/modeling_bert.py
_HEADS = {
    "BertForMaskedLM": (False, ("mlm",)),
    "BertModel": (True, ()),
    "BertForPreTraining": (True, ("mlm", "nsp")),
    "BertLMHeadModel": (False, ("mlm",)),
    "BertForSequenceClassification": (True, ("classifier",)),
    "BertForTokenClassification": (False, ("classifier",)),
    "BertForQuestionAnswering": (False, ("qa_outputs",)),
}


@dataclass(eq=False, repr=False, kw_only=True)
class BertArch(Arch):
    type_vocab_size: int


def resolve(raw: Mapping[str, Any], architecture: str) -> BertArch:
    f = Fields(raw, _DEFAULTS)
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, _ = f.heads(kv_key=None)
    return BertArch(
        model_type="bert", architecture=architecture, head=architecture, hidden_size=hidden,
        num_layers=f.dim("num_hidden_layers", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=f.head_dim(hidden, num_heads, key=None), intermediate_size=f.dim("intermediate_size", MAX_INTERMEDIATE),
        vocab_size=f.dim("vocab_size", MAX_VOCAB), tie_word_embeddings=f.flag("tie_word_embeddings"),
        num_labels=f.num_labels(), max_positions=f.dim("max_position_embeddings", MAX_POSITIONS),
        learned_positions=True, norm="layernorm", hidden_act=f.text("hidden_act", "gelu"),
        dropout=f.dropouts({"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),
        type_vocab_size=f.dim("type_vocab_size", MAX_VOCAB, low=0),
    )


def _layer(p: Params, e: str, i: int, hidden: int, inter: int, all_heads: int) -> None:
    """BertLayer: self-attention, its output dense + LayerNorm, intermediate, output."""
    for proj in ("query", "key", "value"):
        p.linear(f"{e}attention.self.{proj}", hidden, all_heads, ROLE_ATTENTION, i, bias=True)
    p.linear(f"{e}attention.output.dense", hidden, hidden, ROLE_ATTENTION, i, bias=True)
    p.norm(f"{e}attention.output.LayerNorm", hidden, i, bias=True)
    p.linear(f"{e}intermediate.dense", hidden, inter, ROLE_MLP, i, bias=True)
    p.linear(f"{e}output.dense", inter, hidden, ROLE_MLP, i, bias=True)
    p.norm(f"{e}output.LayerNorm", hidden, i, bias=True)


def _mlm_head(p: Params, a: BertArch) -> None:
    """BertLMPredictionHead: transform, output bias; decoder weight/bias tied unless tie_word_embeddings is false."""
    hidden, vocab = a.hidden_size, a.vocab_size
    p.add("cls.predictions.bias", (vocab,), ROLE_LM_HEAD, None)
    p.linear("cls.predictions.transform.dense", hidden, hidden, ROLE_LM_HEAD, None, bias=True)
    p.norm("cls.predictions.transform.LayerNorm", hidden, None, bias=True)
    if not a.tie_word_embeddings:
        p.linear("cls.predictions.decoder", hidden, vocab, ROLE_LM_HEAD, None, bias=True)


def inventory(a: BertArch) -> list[ParamTensor]:
    hidden, vocab = a.hidden_size, a.vocab_size
    pooler, head_parts = _HEADS[a.head]
    base, p = ("" if a.head == "BertModel" else "bert."), Params()
    p.embedding(f"{base}embeddings.word_embeddings", vocab, hidden)
    p.embedding(f"{base}embeddings.position_embeddings", a.max_positions, hidden, ROLE_POSITION_EMBEDDING)
    p.embedding(f"{base}embeddings.token_type_embeddings", a.type_vocab_size, hidden)
    p.norm(f"{base}embeddings.LayerNorm", hidden, None, bias=True)
    for i in range(a.num_layers):
        _layer(p, f"{base}encoder.layer.{i}.", i, hidden, a.intermediate_size, a.num_heads * a.head_dim)
    if pooler:
        p.linear(f"{base}pooler.dense", hidden, hidden, ROLE_OTHER, None, bias=True)
    if "mlm" in head_parts:
        _mlm_head(p, a)
    if "nsp" in head_parts:
        p.linear("cls.seq_relationship", hidden, 2, ROLE_OTHER, None, bias=True)
    for name in {"classifier", "qa_outputs"} & set(head_parts):
        p.linear(name, hidden, a.num_labels, ROLE_OTHER, None, bias=True)
    return p.tensors


def activations(a: BertArch, run: Run) -> Rule:
    """BertForMaskedLM, as the forward saves it on CUDA.

    Per BertLayer (r: residual bytes, fp32 under autocast; c compute bytes; CUDA LayerNorm stats 2 x 4 T):
      layer input as q/k/v read it   c T h (under autocast each of the three Linears saves its own cast: 3 c T h)
      attention (sdpa)               q, k, v (views of the Linear outputs) 3 c T h + output c T h (the dense layer
                                     reads it in place) + logsumexp 4 T a
      attention (eager)              contiguous copies of q, k^T, v for the matmuls 3 c T h, softmax output c b a s^2
                                     (CUDA autocast: softmax in fp32 then cast for the matmul: (4 + c) b a s^2),
                                     the output's contiguous copy c T h
      BertSelfOutput LayerNorm       input (dense + residual) r T h + stats
      BertIntermediate               its input c T h (the LayerNorm output, or its cast), GELU input and output 2 c T I
      BertOutput LayerNorm           input r T h + stats (its output is the next layer's input)
      dropout (CUDA masks)           after the attention output and the FFN output 2 T h; eager attention probs
                                     b a s^2 + the dropped probs c b a s^2 (sdpa's fused dropout keeps RNG state)
    Per model: input_ids, labels (int64; a real batch has both) and the gathered token_type_ids (8 s); the embedding
    LayerNorm (input r T h + stats; its dropout mask T h); the MLM head: its dense input c T h, GELU input c T h,
    LayerNorm input (c T h; CUDA autocast keeps the fp32 cast it normalises, 4 T h) + stats, decoder input c T h;
    nll_loss's total_weight scalar. Position ids are a slice of a registered buffer (model state, not counted).
    Loss: nn.CrossEntropyLoss on the logits as they are: log_softmax saves c T V (fp32 under CUDA autocast).
    """
    h, heads, intermediate = a.hidden_size, a.num_heads, a.intermediate_size
    b, s, tokens, c, r = run.b, run.s, run.tokens, run.c, run.residual
    stats = 2 * BYTES_PER_LAYER_NORM_STAT * tokens
    th = tokens * h
    hidden_dropout = a.dropout.get("hidden_dropout_prob", 0.0)
    qkv_input = (3 if run.autocast else 1) * c * th
    if run.eager:
        softmax = (BYTES_PER_FP32 + c) if run.autocast else c
        attention = 3 * c * th + softmax * b * heads * s * s + c * th
    else:
        attention = 4 * c * th + BYTES_PER_FP32 * tokens * heads
    layer_norms = 2 * (r * th + stats)
    ffn = c * th + act_bytes(a.hidden_act, c, tokens * intermediate)
    dropout = 2 * dropout_mask(hidden_dropout, th)
    if run.eager:
        dropout += dropout_mask(a.dropout.get("attention_probs_dropout_prob", 0.0), (1 + c) * b * heads * s * s)
    formula = (f"q/k/v input {qkv_input:,} + attention {attention:,} + layer norms {layer_norms:,} + FFN {ffn:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    head_norm_input = BYTES_PER_FP32 if run.autocast else c
    gelu_saved = act_bytes(a.hidden_act, c, th) - c * th  # without its output (the norm input)
    per_model = parts(
        ids=2 * BYTES_PER_INT64 * tokens + BYTES_PER_INT64 * s,
        embeddings=r * th + stats + dropout_mask(hidden_dropout, th),
        head=c * th + gelu_saved + head_norm_input * th + stats + c * th,
        loss_scalars=BYTES_PER_FP32 if run.autocast else c,  # nll_loss's total_weight
    )
    layer = parts(norms=layer_norms, attention=qkv_input + attention, mlp=ffn, dropout=dropout)
    log_softmax = BYTES_PER_FP32 if run.autocast else c
    loss = Loss(tokens, a.vocab_size, log_softmax, "transformers modeling_bert.BertForMaskedLM: nn.CrossEntropyLoss on "
                "the logits in the compute dtype (fp32 under CUDA autocast); log_softmax saves its output")
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * th * r,
                c * tokens * (intermediate + h), loss, head_note(a.architecture, MODELLED_HEAD))


FAMILIES = {"bert": Family("bert", {name: name for name in _HEADS}, resolve, inventory, activations,
                           lora_targets=("query", "value"), unmodelled_switches=("add_cross_attention",),
                           checkpoint_keeps_causal_mask=False)}
