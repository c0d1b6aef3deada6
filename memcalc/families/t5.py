"""T5 (models/t5/modeling_t5.py): an encoder-decoder with relative position biases, RMS-style T5LayerNorm, a ReLU
or gated feed-forward, the embedding shared by both stacks (and by lm_head unless the config unties it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc.families.base import (
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
from memcalc.families.saved import (
    PART_ATTENTION,
    PART_CASTS,
    PART_DROPOUT,
    PART_MLP,
    PART_NORMS,
    Loss,
    Rule,
    Run,
    act_bytes,
    head_note,
    parts,
)
from memcalc.families.tensors import Params
from memcalc.model import ROLE_ATTENTION, ROLE_LM_HEAD, ROLE_MLP, ROLE_OTHER, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_t5.py (T5LayerNorm, T5Attention eager/sdpa with the relative position "
          "bias, T5DenseActDense / T5DenseGatedActDense, both stacks) and checked against a CPU forward (eager)")
MODELLED_HEAD = "T5ForConditionalGeneration"

_DEFAULTS = {  # models/t5/configuration_t5.py: T5Config
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": None,
    "num_heads": 8, "relative_attention_num_buckets": 32, "feed_forward_proj": "relu", "dropout_rate": 0.1,
}  # fmt: skip
_ALIASES = {  # T5Config.attribute_map
    "hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers", "head_dim": "d_kv",
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class T5Arch(Arch):
    encoder_layers: int
    decoder_layers: int
    relative_buckets: int
    gated: bool  # T5DenseGatedActDense (feed_forward_proj "gated-...")


def resolve(raw: Mapping[str, Any], architecture: str) -> T5Arch:
    f = Fields(raw, _DEFAULTS, _ALIASES)
    encoder_layers = f.dim("num_layers", MAX_LAYERS)
    decoder_layers = f.dim_or("num_decoder_layers", encoder_layers, MAX_LAYERS)
    num_heads, _ = f.heads("num_heads", None)
    projection = f.text("feed_forward_proj", "relu")
    act = projection.split("-")[-1]
    act = "gelu_new" if projection == "gated-gelu" else act  # T5Config: "gated-gelu" means gelu_new
    return T5Arch(
        model_type="t5", architecture=architecture, head=architecture, hidden_size=f.dim("d_model", MAX_HIDDEN),
        num_layers=encoder_layers + decoder_layers, num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=f.dim("d_kv", MAX_HEAD_DIM), intermediate_size=f.dim("d_ff", MAX_INTERMEDIATE),
        vocab_size=f.dim("vocab_size", MAX_VOCAB),
        # T5Config forces tie_word_embeddings=True, so a model built from the config ties lm_head to `shared`;
        # from_pretrained unties it when the checkpoint holds its own lm_head, which is what configs with
        # "tie_word_embeddings": false (t5-v1_1, flan-t5) have. We count what trains.
        tie_word_embeddings=raw.get("tie_word_embeddings") is not False,
        norm="t5_layernorm", hidden_act=act, dropout=f.dropouts({"dropout_rate": 0.1}),
        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        relative_buckets=f.dim("relative_attention_num_buckets", MAX_POSITIONS),
        gated=projection.split("-")[0] == "gated", encoder_decoder=architecture != "T5EncoderModel",
    )


def _attention(p: Params, prefix: str, i: int, a: T5Arch, relative_bias: bool) -> None:
    """T5Attention: q/k/v/o without biases; the first block of a stack owns the relative position bias."""
    inner = a.num_heads * a.head_dim
    for proj in "qkv":
        p.linear(f"{prefix}{proj}", a.hidden_size, inner, ROLE_ATTENTION, i)
    p.linear(f"{prefix}o", inner, a.hidden_size, ROLE_ATTENTION, i)
    if relative_bias:
        p.embedding(f"{prefix}relative_attention_bias", a.relative_buckets, a.num_heads, ROLE_OTHER, i)


def _stack(p: Params, stack: str, a: T5Arch, num_blocks: int, first_layer: int) -> None:
    """T5Stack: blocks numbered from ``first_layer`` so encoder and decoder blocks get distinct indices."""
    d_model, d_ff = a.hidden_size, a.intermediate_size
    decoder = stack == "decoder"
    for b in range(num_blocks):
        i, blk = first_layer + b, f"{stack}.block.{b}.layer."
        _attention(p, f"{blk}0.SelfAttention.", i, a, relative_bias=b == 0)
        p.norm(f"{blk}0.layer_norm", d_model, i)
        if decoder:
            _attention(p, f"{blk}1.EncDecAttention.", i, a, relative_bias=False)
            p.norm(f"{blk}1.layer_norm", d_model, i)
        ff = f"{blk}{2 if decoder else 1}."
        for wi in ("wi_0", "wi_1") if a.gated else ("wi",):
            p.linear(f"{ff}DenseReluDense.{wi}", d_model, d_ff, ROLE_MLP, i)
        p.linear(f"{ff}DenseReluDense.wo", d_ff, d_model, ROLE_MLP, i)
        p.norm(f"{ff}layer_norm", d_model, i)
    p.norm(f"{stack}.final_layer_norm", d_model, None)


def inventory(a: T5Arch) -> list[ParamTensor]:  # T5ForConditionalGeneration, T5Model, T5EncoderModel
    p = Params()
    p.embedding("shared", a.vocab_size, a.hidden_size)  # encoder/decoder embed_tokens are tied to it
    _stack(p, "encoder", a, a.encoder_layers, 0)
    if a.head != "T5EncoderModel":
        _stack(p, "decoder", a, a.decoder_layers, a.encoder_layers)
    if a.head == MODELLED_HEAD and not a.tie_word_embeddings:
        p.linear("lm_head", a.hidden_size, a.vocab_size, ROLE_LM_HEAD, None)
    return p.tensors


def activations(a: T5Arch, run: Run) -> Rule:
    """T5ForConditionalGeneration. The encoder reads seq_len tokens (s_e, T_e = b s_e), the decoder its input, the labels
    shifted right (T5ForConditionalGeneration._shift_right): decoder_seq_len tokens (s_d, T_d = b s_d; --decoder-seq-len,
    default seq_len). Self-attention is s_e x s_e in the encoder, s_d x s_d in the decoder; cross-attention is s_d
    queries over s_e encoder positions, and its keys and values are each decoder layer's projections of the encoder
    output (T_e).

    T5LayerNorm: x.to(fp32).pow(2) saves the fp32 copy (4 T h, the input itself when it is fp32), x * rsqrt saves
    the input (c T h) and rsqrt (4 T), weight * normalized.to(c) saves the normalized (c T h), the next Linear the
    output (c T h): (4 + 3c) T h + 4 T in 16 bit, 3 c T h + 4 T in fp32. Under autocast the stream is fp32: 8 T h + 4 T,
    and every Linear saves its own cast of the fp32 output.
    Attention (inner = heads x d_kv): eager: contiguous copies of q, k^T, v for the matmuls (c inner: q's rows are the
    queries', k's and v's the keys'), softmax output c b a s_q s_k (under autocast the fp32 relative bias makes the
    scores and softmax fp32, then the matmul saves a c cast: (4 + c) b a s_q s_k), the output's contiguous copy
    (c T_q inner). sdpa: a float mask (the relative position bias) rules out flash attention; CUDA's
    memory-efficient kernel saves q, k, v and the output, logsumexp (4 b a s_q, rows padded to 32) and the bias it
    adds (c a s^2: each self-attention layer's contiguous copy of its stack's bias, each decoder layer's causal
    where(); the cross-attention's zero bias, c a s_d s_e, is one tensor shared by all layers).
    Feed-forward (T5DenseActDense / T5DenseGatedActDense): relu saves its result, which wo saves too (c T I); gated:
    the activation's saved tensors and output, wi_1's output, the product (wo's input). Under autocast the
    activation output is cast back to fp32 (to wo's weight dtype) and wo saves its own c cast; each decoder layer's
    cross-attention k and v save their own casts of the encoder output (2 c T_e h).
    Per model: input_ids (8 T_e), decoder_input_ids and labels (2 x 8 T_d), the relative-position buckets of each
    stack (8 s_e^2 + 8 s_d^2), both final norms (the decoder's output, scaled by d_model^-0.5 when
    scale_decoder_outputs, is the lm_head input), nll_loss's total_weight. Loss: nn.CrossEntropyLoss on the c logits
    (T_d x vocab; fp32 under CUDA autocast).
    Dropout (CUDA masks, 1 byte): embedding and final dropouts of both stacks 2 T_e h + 2 T_d h; per layer each
    sub-layer's output dropout (T h) and the feed-forward's inner dropout (T I; relu's dropped output is saved besides
    its result); eager attention dropout b a s_q s_k per attention (+ the dropped probs in c, outside autocast).
    """
    h, heads, d_kv, ff = a.hidden_size, a.num_heads, a.head_dim, a.intermediate_size
    inner = heads * d_kv
    b, c, autocast = run.b, run.c, run.autocast
    s_e, s_d = run.s, run.decoder_len
    t_e, t_d = b * s_e, b * s_d
    dropout = "dropout_rate" in a.dropout

    def norm(tokens: int) -> int:
        if autocast:
            return 8 * tokens * h + BYTES_PER_FP32 * tokens
        return ((BYTES_PER_FP32 if c != BYTES_PER_FP32 else 0) + 3 * c) * tokens * h + BYTES_PER_FP32 * tokens

    def lse(queries: int) -> int:
        return BYTES_PER_FP32 * b * heads * (-(-queries // 32) * 32)

    def attention_dropout(queries: int, keys: int) -> int:
        return b * heads * queries * keys * (1 if autocast else 1 + c) if dropout and run.eager else 0

    # q and the output have the queries' rows, k and v the keys'
    def projections(t_q: int, t_k: int) -> int:
        return 2 * c * inner * (t_q + t_k)

    softmax = ((BYTES_PER_FP32 + c) if autocast else c) if run.eager else 0
    if run.eager:
        # Cross-attention adds a zero bias in c: under CUDA autocast softmax runs in fp32 all the same.
        encoder_attention = projections(t_e, t_e) + softmax * b * heads * s_e * s_e
        self_attention = projections(t_d, t_d) + softmax * b * heads * s_d * s_d
        cross_attention = projections(t_d, t_e) + softmax * b * heads * s_d * s_e
        decoder_where = 0
    else:
        encoder_attention = projections(t_e, t_e) + lse(s_e) + c * heads * s_e * s_e
        self_attention = projections(t_d, t_d) + lse(s_d) + c * heads * s_d * s_d
        cross_attention = projections(t_d, t_e) + lse(s_d)
        # The decoder's where(causal, bias, min) also saves its boolean condition (s_d^2).
        decoder_where = s_d * s_d
    encoder_probs_dropout = attention_dropout(s_e, s_e)
    decoder_probs_dropout = attention_dropout(s_d, s_d) + attention_dropout(s_d, s_e)

    def feed_forward(tokens: int) -> tuple[int, int]:
        """(saved bytes, of which dropout masks) of one feed-forward over ``tokens``."""
        ti, th = tokens * ff, tokens * h
        if a.gated:
            # act(wi_0 out) saves what the activation saves; the product saves act out and wi_1 out; wo its input.
            saved = act_bytes(a.hidden_act, c, ti) - c * ti + 3 * c * ti  # without the activation's output
        else:
            saved = act_bytes(a.hidden_act, c, ti) + (c * ti if autocast else 0)  # relu result (+ wo's cast)
        masks = 0
        if dropout:
            masks = ti + 2 * th  # inner mask, sub-layer output masks (attention and feed-forward)
            if not a.gated and not autocast:
                masks += c * ti  # relu's dropped output, saved by wo beside relu's result
        return saved + masks, masks

    encoder_ff, encoder_ff_masks = feed_forward(t_e)
    decoder_ff, decoder_ff_masks = feed_forward(t_d)
    wi_casts = 2 if a.gated else 1
    enc_casts = (3 + wi_casts) * c * t_e * h if autocast else 0
    # self q, k, v and cross q over the decoder's tokens, cross k and v over the encoder output
    dec_casts = ((4 + wi_casts) * c * t_d * h + 2 * c * t_e * h) if autocast else 0
    cross_mask = t_d * h if dropout else 0
    encoder_parts = {PART_NORMS: 2 * norm(t_e), PART_ATTENTION: encoder_attention, PART_MLP: encoder_ff - encoder_ff_masks,
                     PART_CASTS: enc_casts, PART_DROPOUT: encoder_ff_masks + encoder_probs_dropout}
    decoder_parts = {PART_NORMS: 3 * norm(t_d), PART_ATTENTION: self_attention + cross_attention + decoder_where,
                     PART_MLP: decoder_ff - decoder_ff_masks, PART_CASTS: dec_casts,
                     PART_DROPOUT: decoder_ff_masks + decoder_probs_dropout + cross_mask}
    encoder_parts = {k: v for k, v in encoder_parts.items() if v}
    decoder_parts = {k: v for k, v in decoder_parts.items() if v}
    encoder_layer, decoder_layer = sum(encoder_parts.values()), sum(decoder_parts.values())
    formula = (f"encoder layer: norms {2 * norm(t_e):,} + attention {encoder_attention + encoder_probs_dropout:,} + "
               f"feed-forward {encoder_ff:,}{f' + casts {enc_casts:,}' if enc_casts else ''} = {encoder_layer:,}; "
               f"decoder layer: norms {3 * norm(t_d):,} + self-attention "
               f"{self_attention + decoder_where + attention_dropout(s_d, s_d):,} + cross-attention "
               f"{cross_attention + attention_dropout(s_d, s_e):,} + feed-forward {decoder_ff:,}"
               f"{f' + casts {dec_casts:,}' if dec_casts else ''}{f' + cross dropout mask {cross_mask:,}' if dropout else ''}"
               f" = {decoder_layer:,}")
    shared_cross_bias = 0 if run.eager else c * heads * s_d * s_e
    buckets = BYTES_PER_INT64 * (s_e * s_e + s_d * s_d)
    per_model = parts(
        ids=BYTES_PER_INT64 * (t_e + 2 * t_d) + buckets,
        final_norm=norm(t_e) + norm(t_d), head=c * t_d * h if autocast else 0,
        loss_scalars=BYTES_PER_FP32 if autocast else c,
        attention=shared_cross_bias, dropout=2 * (t_e + t_d) * h if dropout else 0,
    )
    loss = Loss(t_d, a.vocab_size, BYTES_PER_FP32 if autocast else c,
                "transformers modeling_t5.T5ForConditionalGeneration: nn.CrossEntropyLoss on the decoder logits in "
                "the compute dtype (fp32 under CUDA autocast); log_softmax saves its output")
    residual = BYTES_PER_FP32 if autocast else c
    # Checkpointing (non-reentrant): each T5Block keeps its tensor arguments. Besides the layer inputs those are the
    # position biases the first block of each stack computes and hands to the others: the encoder's and the
    # decoder's relative bias (fp32 under autocast: an fp32 embedding) and the cross-attention's zero bias (c; it
    # requires grad under checkpointing), and, with eager attention, the decoder's 4-D causal mask (b s_d^2, in the
    # embeddings' dtype). The bucket indices are computed inside the first blocks: recomputed, not kept.
    bias_bytes = BYTES_PER_FP32 if autocast else c
    encoder_bias, decoder_bias = bias_bytes * heads * s_e * s_e, bias_bytes * heads * s_d * s_d
    zero_bias = c * heads * s_d * s_e
    causal_mask = bias_bytes * b * s_d * s_d if run.eager else 0
    kept = ((a.encoder_layers * t_e + a.decoder_layers * t_d) * h * residual + encoder_bias + decoder_bias + zero_bias
            + causal_mask - buckets)
    # The first block of each stack recomputes the most: it rebuilds its biases beside the kept ones, while the
    # gradients of the biases every block of its stack reads accumulate (the decoder's two, the encoder's one).
    recompute = max(decoder_layer + 2 * (decoder_bias + zero_bias), encoder_layer + 2 * encoder_bias)
    notes = head_note(a.architecture, MODELLED_HEAD)
    if s_d != s_e:
        notes.append(f"decoder sequence {s_d:,} tokens, encoder {s_e:,}: self-attention s_d^2 in the decoder, "
                     "cross-attention s_d x s_e, the loss over the decoder's tokens")
    layers = [encoder_parts] * a.encoder_layers + [decoder_parts] * a.decoder_layers
    return Rule(layers, formula, per_model, SOURCE, kept, c * t_e * (ff + h), loss, notes, recompute=recompute)


_HEADS = {name: name for name in ("T5ForConditionalGeneration", "T5Model", "T5EncoderModel")}
FAMILIES = {"t5": Family("t5", _HEADS, resolve, inventory, activations, lora_targets=("q", "v"),
                         checkpoint_keeps_causal_mask=False)}
