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
from memcalc.families.saved import BYTES_PER_LAYER_NORM_STAT, Loss, Rule, Run, act_bytes, dropout_mask, parts
from memcalc.families.tensors import Params
from memcalc.model import ROLE_ATTENTION, ROLE_LM_HEAD, ROLE_MLP, ROLE_OTHER, ROLE_POSITION_EMBEDDING, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_bert.py (BertEmbeddings, BertSelfAttention sdpa/eager, "
          "BertSelfOutput, BertIntermediate, BertOutput, BertLMPredictionHead) and checked against the saved "
          "tensors of a CPU forward")

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
    classifier_dropout: float  # classification heads: classifier_dropout, else hidden_dropout_prob


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
        dropout=f.dropouts({"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "classifier_dropout": 0.0}),
        type_vocab_size=f.dim("type_vocab_size", MAX_VOCAB, low=0),
        classifier_dropout=f.probability("classifier_dropout", f.probability("hidden_dropout_prob", 0.1)),
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
    """The BERT class ``architectures`` names, as its forward saves it on CUDA.

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
    Per model: input_ids (int64) and the gathered token_type_ids (8 s); the embedding LayerNorm (input r T h + stats;
    its dropout mask T h). Position ids are a slice of a registered buffer (model state, not counted). Then the
    head (``_head``), its labels and its loss.
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
    head = _head(a, run)
    per_model = parts(
        ids=BYTES_PER_INT64 * (tokens + s) + head.ids,
        embeddings=r * th + stats + dropout_mask(hidden_dropout, th),
        head=head.saved,
        loss_scalars=head.loss_scalars,
    )
    layer = parts(norms=layer_norms, attention=qkv_input + attention, mlp=ffn, dropout=dropout)
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * th * r,
                c * tokens * (intermediate + h), head.loss, head.notes)


@dataclass(eq=False, repr=False)
class _Head:
    saved: int  # what the head's modules save
    ids: int  # the int64 labels (or positions) the loss saves
    loss_scalars: int  # nll_loss's total_weight, one per cross-entropy
    loss: Loss | None
    notes: list[str]


def _head(a: BertArch, run: Run) -> _Head:
    """What the head of ``a.head`` saves (models/bert/modeling_bert.py), after the last BertLayer's output O (c T h;
    under autocast the fp32 output, of which each reader saves its own c cast):

      BertForMaskedLM            BertLMPredictionHead: its dense input O, GELU input c T h, LayerNorm input (c T h;
      BertForPreTraining         CUDA autocast keeps the fp32 cast it normalises, 4 T h) + stats, decoder input c T h;
      BertLMHeadModel            labels (8 T). Loss: nn.CrossEntropyLoss on the c logits, log_softmax saves T x V
                                 (fp32 under CUDA autocast). BertLMHeadModel: self.loss_function, ForCausalLMLoss
                                 (logits.float(): fp32 log_softmax; its shifted labels are a new int64 tensor).
                                 BertForPreTraining adds the pooler and the next-sentence loss: 2 x b, its labels 8 b.
      pooler (BertPooler)        hidden[:, 0] into dense: a view that keeps O whole (under autocast its c cast, b h);
                                 tanh saves its output c b h (the classifier's input)
      BertForSequenceClassification  pooler; dropout(classifier_dropout, else hidden_dropout_prob): mask b h and the
                                 dropped c b h the classifier saves; loss over b x num_labels; labels 8 b
      BertForTokenClassification the classifier's input O (after dropout: mask T h, the dropped output in its place);
                                 loss over T x num_labels; labels 8 T
      BertForQuestionAnswering   qa_outputs' input O; start and end logits, split, made contiguous: two
                                 cross-entropies over b x s (log_softmax of each), the clamped positions 2 x 8 b
      BertModel                  the pooler; no loss (a head of the caller's trains it: not counted, and said)
    Every cross-entropy's log_softmax is saved in the logits' dtype (fp32 under CUDA autocast) with its nll_loss's
    total_weight scalar. Sequence classification with num_labels 1 (MSE) or multi-label (BCE) saves b x num_labels
    likewise, float labels in place of the int64 ones."""
    h, b, s, tokens, c, th = a.hidden_size, run.b, run.s, run.tokens, run.c, run.tokens * a.hidden_size
    loss_bytes = BYTES_PER_FP32 if run.autocast else c  # log_softmax and total_weight
    output = c * th  # the last layer's output as the head's first Linear saves it
    pooler = (c * b * h if run.autocast else output) + c * b * h  # dense input, tanh output
    source = (f"transformers modeling_bert.{a.head}: nn.CrossEntropyLoss on the logits in the compute dtype (fp32 "
              "under CUDA autocast); log_softmax saves its output")
    if a.head in ("BertForMaskedLM", "BertForPreTraining", "BertLMHeadModel"):
        head_norm_input = BYTES_PER_FP32 if run.autocast else c
        gelu_saved = act_bytes(a.hidden_act, c, th) - c * th  # without its output (the norm input)
        stats = 2 * BYTES_PER_LAYER_NORM_STAT * tokens
        saved = output + gelu_saved + head_norm_input * th + stats + c * th
        if a.head == "BertLMHeadModel":
            return _Head(saved, BYTES_PER_INT64 * tokens, BYTES_PER_FP32, Loss(tokens, a.vocab_size, BYTES_PER_FP32), [])
        loss = Loss(tokens, a.vocab_size, loss_bytes, source)
        if a.head == "BertForMaskedLM":
            return _Head(saved, BYTES_PER_INT64 * tokens, loss_bytes, loss, [])
        # the pooler's dense reads a view of the output the MLM head saves already: only its autocast cast is new
        pooler_new = pooler - (0 if run.autocast else output)
        nsp = 2 * b * loss_bytes
        return _Head(saved + pooler_new + nsp, BYTES_PER_INT64 * (tokens + b), 2 * loss_bytes, loss, [])
    if a.head == "BertForSequenceClassification":
        dropped = dropout_mask(a.classifier_dropout, b * h) + (c * b * h if a.classifier_dropout > 0 else 0)
        return _Head(pooler + dropped, BYTES_PER_INT64 * b, loss_bytes, Loss(b, a.num_labels, loss_bytes, source), [])
    if a.head == "BertForTokenClassification":
        return _Head(output + dropout_mask(a.classifier_dropout, th), BYTES_PER_INT64 * tokens, loss_bytes,
                     Loss(tokens, a.num_labels, loss_bytes, source), [])
    if a.head == "BertForQuestionAnswering":
        # two cross-entropies over (b, s): one Loss of 2 b rows of s positions
        return _Head(output, 2 * BYTES_PER_INT64 * b, 2 * loss_bytes, Loss(2 * b, s, loss_bytes, source), [])
    note = f"{a.head} has no head and no loss: the activations and loss of the head that trains it are not counted"
    return _Head(pooler, 0, 0, None, [note])


FAMILIES = {"bert": Family("bert", {name: name for name in _HEADS}, resolve, inventory, activations,
                           lora_targets=("query", "value"), unmodelled_switches=("add_cross_attention",),
                           checkpoint_keeps_causal_mask=False)}
