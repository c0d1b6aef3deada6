"""Llama and its copies: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3.

Inventory: models/<type>/modeling_<type>.py, <Type>ForCausalLM (embed_tokens, layers of attention + gated MLP
+ RMSNorms, norm, lm_head unless tied). Activations (transformers 5.24, CUDA dtypes), per layer, sdpa attention:
  each RMSNorm     fp32 copy of its input 4Th, rsqrt 4T, normalized input in c (cTh), output in c (cTh)
                   (Gemma keeps the fp32 normalized product instead: saved.rms_norm_bytes)
  q, k, v          rotary outputs and v as sdpa saves them: cT(a*d) + 2 cT(g*d)
  attention        sdpa output cT(a*d) (o_proj reads it in place: it is laid out (b, s, a, d)) + logsumexp 4Ta;
                   eager: q, k, v for all a heads 3 cT(a*d), fp32 softmax 4 b a s^2, probs c b a s^2, o_proj copy
  MLP (gated)      gate out, act out, up out, product: 4 cTI (MoE blocks: memcalc.families.moe)
  autocast         each Linear saves its own cast of an fp32 input: 5 cTh (q, k, v, gate, up)
Per model: rotary cos and sin 2*s*d (fp32 under autocast, else c), token ids and labels 2 x 8T, the loss divisor,
the final norm, and under autocast the lm_head input cast cTh. Checked against the saved tensors of CPU forwards,
to the byte, in tests/test_activations.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from memcalc.families.saved import (
    FLASH_PADDED_NOTE,
    PART_CASTS,
    Loss,
    Rule,
    Run,
    final_hidden_held,
    fp32_softmax_dropout,
    loss_vocab,
    norm_own_bytes,
    parts,
    unsaved_cache_copies,
)
from memcalc.families.tensors import Params, decoder, decoder_heads, gated_mlp, gqa_attention, pre_post_norms
from memcalc.model import ROLE_ATTENTION, ROLE_MLP, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers modeling_llama.py (RMSNorm, attention, MLP) and loss_utils.ForCausalLMLoss; "
          "equal to the saved tensors of a CPU forward (sdpa) in the tests")
NOTE_SDPA = "attention: sdpa/flash kernels keep no s^2 scores (--attn eager keeps them)"

LLAMA_DEFAULTS = {  # models/llama/configuration_llama.py: LlamaConfig
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_dropout": 0.0,
}  # fmt: skip
MISTRAL_DEFAULTS = {  # models/mistral/configuration_mistral.py: MistralConfig (num_key_value_heads=8)
    **LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
}  # fmt: skip
QWEN2_DEFAULTS = {  # models/qwen2/configuration_qwen2.py: Qwen2Config
    **LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
}  # fmt: skip
_QWEN3 = {**QWEN2_DEFAULTS, "head_dim": 128}  # models/qwen3/configuration_qwen3.py: Qwen3Config
_GEMMA = {  # models/gemma/configuration_gemma.py: GemmaConfig
    **LLAMA_DEFAULTS, "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "tie_word_embeddings": True,
    "max_position_embeddings": 8192, "hidden_act": "gelu_pytorch_tanh",
}  # fmt: skip
_GEMMA2 = {  # models/gemma2/configuration_gemma2.py: Gemma2Config
    **_GEMMA, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "sliding_window": 4096,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
}  # fmt: skip
_GEMMA3_TEXT = {  # models/gemma3/configuration_gemma3.py: Gemma3TextConfig
    **_GEMMA2, "vocab_size": 262208, "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "max_position_embeddings": 131072,
}  # fmt: skip
_PHI3 = {  # models/phi3/configuration_phi3.py: Phi3Config
    **LLAMA_DEFAULTS, "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
    "max_position_embeddings": 4096,
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class LlamaArch(Arch):
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head q_norm / k_norm (Qwen3, Gemma3)
    sandwich: bool = False  # pre/post attention and pre/post feed-forward norms (Gemma2, Gemma3)
    fused_qkv: bool = False  # Phi3: one qkv_proj and one gate_up_proj
    sliding: tuple[bool, ...] = ()  # per layer: attends through the sliding window
    use_cache: bool = True  # config.use_cache (training forwards build a DynamicCache unless it is False)

    @property
    def layer_slides(self) -> list[bool]:
        """Per decoder layer, whether it attends through the sliding window (``sliding``, False past its end)."""
        return [i < len(self.sliding) and self.sliding[i] for i in range(self.num_layers)]

    @property
    def gemma_norm(self) -> bool:
        return self.norm == "gemma_rmsnorm"

    @property
    def num_norms(self) -> int:
        return 4 if self.sandwich else 2


@dataclass(eq=False, repr=False)
class Variant:
    """How one Llama copy differs: its config class defaults, where its attention biases come from (a config key
    or a constant; o_proj follows q/k/v when ``o_bias`` is None), its norms."""

    defaults: Mapping[str, Any]
    qkv_bias: str | bool
    o_bias: bool | None
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich: bool = False
    gemma: bool = False
    fused: bool = False
    sdpa: bool = True  # the modeling file's _supports_sdpa


VARIANTS = {
    # models/llama/modeling_llama.py: attention_bias on q/k/v/o, mlp_bias on the MLP.
    "llama": Variant(LLAMA_DEFAULTS, "attention_bias", None, mlp_bias=True),
    # models/mistral/modeling_mistral.py: MistralAttention has no biases.
    "mistral": Variant(MISTRAL_DEFAULTS, False, False),
    # models/qwen2/modeling_qwen2.py: Qwen2Attention, q/k/v always biased, o_proj never.
    "qwen2": Variant(QWEN2_DEFAULTS, True, False),
    # models/qwen3/modeling_qwen3.py: Qwen3Attention, attention_bias on all four, per-head q_norm/k_norm.
    "qwen3": Variant(_QWEN3, "attention_bias", None, qk_norm=True),
    # models/gemma/modeling_gemma.py: GemmaForCausalLM (tied by default; embedding scaled, same shape).
    "gemma": Variant(_GEMMA, "attention_bias", None, gemma=True),
    # models/gemma2/modeling_gemma2.py: Gemma2DecoderLayer adds pre/post feed-forward norms;
    # Gemma2PreTrainedModel._supports_sdpa = False ("sdpa does not support softcapping").
    "gemma2": Variant(_GEMMA2, "attention_bias", None, sandwich=True, gemma=True, sdpa=False),
    # models/gemma3/modeling_gemma3.py: Gemma3ForCausalLM = Gemma2 layout + q_norm/k_norm.
    "gemma3_text": Variant(_GEMMA3_TEXT, "attention_bias", None, qk_norm=True, sandwich=True, gemma=True),
    # models/phi3/modeling_phi3.py: fused qkv_proj and gate_up_proj, no biases.
    "phi3": Variant(_PHI3, False, False, fused=True),
}


# Configs whose sliding_window applies only with use_sliding_window (their __post_init__ drops it otherwise).
_USE_SLIDING_WINDOW = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe"})
# Model types whose layers follow config.layer_types ("sliding_attention" | "full_attention"), and the default
# pattern their config builds: layer index, layer count, max_window_layers -> sliding.
_LAYER_TYPES: dict[str, Callable[[int, int, int], bool]] = {
    "qwen2": lambda i, n, m: i >= m,  # configuration_qwen2.py __post_init__
    "qwen3": lambda i, n, m: i >= m,
    "qwen2_moe": lambda i, n, m: bool((i + 1) % 2) and i < m,  # configuration_qwen2_moe.py
    "gemma2": lambda i, n, m: bool((i + 1) % 2),  # configuration_gemma2.py
    "gemma3_text": lambda i, n, m: bool((i + 1) % 6),  # configuration_gemma3.py, sliding_window_pattern 6
}


# Model types whose modeling code applies config.sliding_window in every layer (create_sliding_window_causal_mask).
_WINDOW_IN_EVERY_LAYER = frozenset({"mistral", "mixtral", "phi3", "qwen3_moe"})


def optional_window(f: Fields, model_type: str) -> int | None:
    """The sliding window attention uses, where the family has one (the Qwen types only with use_sliding_window);
    None for model types whose code ignores the key (Llama, Gemma)."""
    if model_type not in _WINDOW_IN_EVERY_LAYER and model_type not in _LAYER_TYPES:
        return None
    if model_type in _USE_SLIDING_WINDOW and not f.flag("use_sliding_window"):
        return None
    return f.dim("sliding_window", MAX_POSITIONS) if f.given("sliding_window") else None


def sliding_layers(f: Fields, model_type: str, num_layers: int, window: int | None) -> tuple[bool, ...]:
    """Which layers attend through the sliding window: the config's layer_types where the family reads them, else
    the pattern its config class builds; Mistral, Mixtral, Phi-3 and Qwen3-MoE use the window in every layer."""
    if window is None:
        return (False,) * num_layers
    pattern = _LAYER_TYPES.get(model_type)
    if pattern is None:  # _WINDOW_IN_EVERY_LAYER
        return (True,) * num_layers
    given = f.raw.get("layer_types")
    if isinstance(given, list) and len(given) == num_layers and all(isinstance(t, str) for t in given):
        return tuple(t == "sliding_attention" for t in given)
    max_window = f.dim("max_window_layers", MAX_LAYERS, low=0) if f.given("max_window_layers") else 28
    return tuple(pattern(i, num_layers, max_window) for i in range(num_layers))


def resolve_fields(f: Fields, model_type: str, architecture: str, head: str, variant: Variant,
                   cls: type[LlamaArch] = LlamaArch, **more: Any) -> LlamaArch:
    """A LlamaArch (or a subclass, given its own fields in ``more``) from the fields read with the family's
    defaults; the MoE families reuse it."""
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, num_kv = f.heads()
    qkv_bias = f.flag(variant.qkv_bias) if isinstance(variant.qkv_bias, str) else variant.qkv_bias
    num_layers = f.dim("num_hidden_layers", MAX_LAYERS)
    window = optional_window(f, model_type)
    return cls(
        model_type=model_type, architecture=architecture, head=head, hidden_size=hidden,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv,
        head_dim=f.head_dim(hidden, num_heads, variant.defaults.get("head_dim")),
        intermediate_size=f.dim("intermediate_size", MAX_INTERMEDIATE), vocab_size=f.dim("vocab_size", MAX_VOCAB),
        tie_word_embeddings=f.flag("tie_word_embeddings"), num_labels=f.num_labels(),
        max_positions=f.dim("max_position_embeddings", MAX_POSITIONS) if f.given("max_position_embeddings") else None,
        norm="gemma_rmsnorm" if variant.gemma else "rmsnorm",
        hidden_act=f.text("hidden_activation") or f.text("hidden_act", "silu"),
        sliding_window=window, sliding=sliding_layers(f, model_type, num_layers, window),
        attn_logit_softcapping=f.number("attn_logit_softcapping"),
        final_logit_softcapping=f.number("final_logit_softcapping"),
        dropout=f.dropouts({"attention_dropout": 0.0}),
        qkv_bias=qkv_bias, o_bias=qkv_bias if variant.o_bias is None else variant.o_bias,
        mlp_bias=variant.mlp_bias and f.flag("mlp_bias"), qk_norm=variant.qk_norm, sandwich=variant.sandwich,
        fused_qkv=variant.fused, supports_sdpa=variant.sdpa,
        use_cache=f.flag("use_cache", True), **more,
    )


def _resolver(model_type: str) -> Callable[[Mapping[str, Any], str], LlamaArch]:
    variant = VARIANTS[model_type]

    def resolve(raw: Mapping[str, Any], architecture: str) -> LlamaArch:
        return resolve_fields(Fields(raw, variant.defaults), model_type, architecture, HEADS[model_type][architecture],
                              variant)

    return resolve


# ---------------------------------------------------------------- inventory


def attention_tensors(p: Params, prefix: str, i: int, a: LlamaArch) -> None:
    """The attention of one layer: q/k/v/o (Phi3: fused qkv_proj)."""
    if a.fused_qkv:
        p.linear(f"{prefix}self_attn.o_proj", a.num_heads * a.head_dim, a.hidden_size, ROLE_ATTENTION, i)
        qkv_out = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
        p.linear(f"{prefix}self_attn.qkv_proj", a.hidden_size, qkv_out, ROLE_ATTENTION, i)
        return
    gqa_attention(p, f"{prefix}self_attn.", i, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                  a.qkv_bias, a.o_bias, a.qk_norm)


def inventory(a: LlamaArch) -> list[ParamTensor]:
    def block(p: Params, prefix: str, i: int) -> None:
        attention_tensors(p, prefix, i, a)
        if a.fused_qkv:
            p.linear(f"{prefix}mlp.gate_up_proj", a.hidden_size, 2 * a.intermediate_size, ROLE_MLP, i)
            p.linear(f"{prefix}mlp.down_proj", a.intermediate_size, a.hidden_size, ROLE_MLP, i)
        else:
            gated_mlp(p, f"{prefix}mlp.", i, a.hidden_size, a.intermediate_size, a.mlp_bias)
        pre_post_norms(p, prefix, i, a.hidden_size, a.sandwich)

    return decoder(a.head, a.hidden_size, a.vocab_size, a.num_layers, a.tie_word_embeddings, a.num_labels, block)


# ---------------------------------------------------------------- activations

MlpBytes = Callable[[LlamaArch, int, Run], tuple[dict[str, int], str]]


def dense_mlp(a: LlamaArch, layer: int, run: Run) -> tuple[dict[str, int], str]:
    """LlamaMLP: gate out, act out, up out, product: 4 cTI; under autocast gate_proj and up_proj (Phi3: one
    gate_up_proj) each save their own cast of the fp32 input."""
    casts = (1 if a.fused_qkv else 2) * run.c * run.tokens * a.hidden_size if run.autocast else 0
    mlp = 4 * run.c * run.tokens * (a.intermediate_size // run.tp)  # (--tp: this rank's features)
    return parts(mlp=mlp, casts=casts), f"MLP {mlp:,}{f' + MLP input casts {casts:,}' if casts else ''}"


def attention_parts(a: LlamaArch, run: Run, masked: bool = False) -> tuple[dict[str, int], str]:
    """Bytes one Llama-style layer's norms and attention save, by part, and their formula. ``masked``: sdpa gets
    an explicit mask (a sliding window shorter than the sequence)."""
    tokens, b, s, c, autocast = run.tokens, run.b, run.s, run.c, run.autocast
    # (sdpa on CUDA's math path counts as eager, but a masked layer's call takes the memory-efficient kernel)
    eager = run.eager and not (run.sdpa_math and masked)
    # --tp: this rank's heads (ColwiseParallel q/k/v); the norms see the whole sequence, or their split of it (--sp)
    h, heads, g, d = a.hidden_size, a.num_heads // run.tp, a.num_kv_heads // run.tp, a.head_dim
    # Each RMSNorm's own saves, and the c output the next Linear saves (not under autocast: each Linear saves its
    # own cast of the fp32 output). The post-attention and post-feed-forward norms (Gemma2/3) feed the residual add,
    # which saves nothing: only the two pre-norms' outputs are saved (measured, tests/test_activations.py). With
    # sequence parallelism a norm runs on its split of the sequence and the Linear saves the all-gathered output.
    norms = a.num_norms * norm_own_bytes(a.gemma_norm, run, h) + 2 * (0 if autocast else c * tokens * h)
    qkv = c * tokens * (heads * d + 2 * g * d)  # q_embed, k_embed, v as sdpa saves them
    o_proj_copy = 0
    if run.cp > 1:
        # --cp: on every rank but the last, a partial step of the ring (load balancing) rebuilds the merged output with
        # torch.cat (_partial_update), laid out (b, a, s, d): transformers' transpose(1, 2).contiguous() copies it and
        # o_proj saves the copy beside the output sdpa saved (measured: rank 0 holds one such tensor per layer more
        # than rank cp - 1; rank 0 is reported)
        o_proj_copy = c * tokens * heads * d
    if a.fused_qkv and not eager:
        # Phi3Attention slices q, k, v out of one fused qkv_proj output; with v a strided view, sdpa's
        # output is not laid out (b, s, a, d) and o_proj saves a contiguous copy of it (measured on the
        # CPU, tests/test_activations.py; not yet checked on CUDA).
        o_proj_copy = c * tokens * heads * d
    # Per-head q/k RMSNorm. Qwen3 (LlamaRMSNorm): fp32 copy of the input, rsqrt, normalized in c. Gemma3
    # (Gemma3RMSNorm): x.float() and the fp32 normalized product (8 B whatever c), rsqrt, and (1 + weight) in fp32
    # for each of the two norms (measured, tests/test_activations.py).
    rows = tokens * (heads + g)
    if not a.qk_norm:
        qk_norm = 0
    elif a.gemma_norm:
        qk_norm = 2 * BYTES_PER_FP32 * rows * d + BYTES_PER_FP32 * rows + 2 * BYTES_PER_FP32 * d
    else:
        qk_norm = (4 + c) * rows * d + BYTES_PER_FP32 * rows
    attention = c * tokens * heads * d + BYTES_PER_FP32 * tokens * heads  # sdpa output (o_proj reads it in place) + lse
    if eager:
        # modeling_llama.eager_attention_forward: repeat_kv materialises k and v for every head; the two
        # matmuls save q, k (a heads), probs in c and v (a heads); softmax(dtype=fp32) saves its fp32
        # output (4 b a s^2) and .to(c) the probs (c b a s^2); o_proj saves a contiguous copy of the
        # (b, a, s, d) output.
        qkv = 3 * c * tokens * heads * d
        probs_copy = c if c != BYTES_PER_FP32 else 0  # .to(fp32) of an fp32 softmax is the same tensor
        attention = c * tokens * heads * d + (BYTES_PER_FP32 + probs_copy) * b * heads * s * s
        if a.attn_logit_softcapping is not None:
            # modeling_gemma2.eager_attention_forward: scores / softcap, tanh, * softcap; tanh saves its output
            # (in the scores' dtype: autocast leaves tanh alone), the scalar divide and multiply save nothing.
            attention += c * b * heads * s * s
        # nn.functional.dropout(attn_weights, p=attention_dropout) in training: CUDA's native_dropout mask.
        attention += fp32_softmax_dropout(a.dropout.get("attention_dropout", 0.0), run, b * heads * s * s)
    v_view = 0
    # Phi3Attention: q, k and v are slices of one fused qkv_proj output. Without a cache (use_cache=False, or
    # gradient checkpointing, which turns it off in training) the v that attention saves is that slice, a view
    # that keeps the whole qkv output alive: (a + g) d more than v itself. With a cache, DynamicCache.update hands
    # attention its own copy. Eager attention saves repeat_kv's copy instead unless there is one kv head per head.
    if a.fused_qkv and (not a.use_cache or run.checkpointing) and (heads == g or not (eager or masked)):
        v_view = c * tokens * (heads + g) * d
    mask = 0
    if not eager and (masked or run.repeat_kv):
        # k and v expanded to every query head before sdpa, which saves the expanded copies instead of k and v:
        # integrations/sdpa_attention.py takes repeat_kv when use_gqa_in_sdpa is False (with an explicit mask), and
        # --repeat-kv is torchtune's MultiHeadAttention.forward (expand, then flatten). (Eager attention's qkv above
        # counts its own repeat.)
        qkv += 2 * c * tokens * (heads - g) * d
    if masked:
        # torch's sdpa converts the boolean mask to a float bias in the query dtype and keeps it for backward (on
        # CUDA the memory-efficient kernel, its attn_bias). Measured on the CPU (tests/test_activations.py); on CUDA
        # the kernel's log-sum-exp is padded to 32 rows.
        mask = c * b * s * s
    # Under autocast each Linear saves its own low-precision cast of an fp32 input: q, k, v (phi3: one fused
    # qkv_proj); the MLP's are counted with it. o_proj and down_proj get 16-bit inputs already.
    casts = (1 if a.fused_qkv else 3) * c * tokens * h if autocast else 0
    formula = (f"norms {norms:,}{f' + autocast input casts {casts:,}' if casts else ''} + "
               f"q/k/v {qkv:,}{f' + q/k norms {qk_norm:,}' if qk_norm else ''} + attention {attention:,}"
               f"{f' + sliding-window mask {mask:,}' if mask else ''}"
               f"{f' + fused qkv kept by the v view {v_view:,}' if v_view else ''}"
               f"{f' + o_proj input copy {o_proj_copy:,}' if o_proj_copy else ''}")
    return parts(norms=norms, casts=casts, attention=qkv + qk_norm + attention + mask + o_proj_copy + v_view), formula


def _merge(*dicts: Mapping[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def llama_rule(a: LlamaArch, run: Run, mlp_bytes: MlpBytes = dense_mlp, model_extra: int = 0,
               source: str = SOURCE, notes: tuple[str, ...] = ()) -> Rule:
    """Llama-style decoders: per layer the attention part and the MLP (``mlp_bytes``: dense or MoE); per model
    rotary, ids, the loss divisor, the final norm and, under autocast, the head input's cast."""
    tokens, c, h = run.tokens, run.c, a.hidden_size
    sdpa = (not run.eager or run.sdpa_math) and not run.flash  # (sdpa: a mask takes its masked path)
    window_applies = sdpa and a.sliding_window is not None and a.sliding_window < run.s
    sliding = a.layer_slides
    # --padded: masking_utils.create_causal_mask (and create_sliding_window_causal_mask) cannot leave a padded batch's
    # mask to sdpa's is_causal (sdpa_mask's allow_is_causal_skip wants no padding): every layer's sdpa gets the 4-D
    # boolean mask (b, 1, s, s), and takes the masked path a sliding window gives (attention_parts). Eager attention
    # has a 4-D mask whether padded or not; flash_attention_2 unpads instead (not modelled: the note below).
    padded = run.padded and sdpa
    masks = [padded or (window_applies and slide) for slide in sliding]
    kinds = {masked: attention_parts(a, run, masked) for masked in set(masks)}
    layers, cache, first = [], {}, ""
    for i in range(a.num_layers):
        masked = masks[i]
        attention, attention_formula = kinds[masked]
        mlp, mlp_formula = mlp_bytes(a, i, run)
        key = (masked, tuple(mlp.items()))
        if key not in cache:  # one dict per distinct layer kind
            cache[key] = _merge(attention, mlp)
        layers.append(cache[key])
        if i == 0:
            first = f"{attention_formula} + {mlp_formula}"
    per_model = parts(
        rotary=2 * run.s * a.head_dim * (BYTES_PER_FP32 if run.autocast else c),
        # int64 input_ids (embedding) and shifted labels (nll_loss); a padded batch's attention_mask and labels (the
        # padding collators' -100 at the padding: a tensor apart from input_ids) beside them
        ids=(4 if run.padded else 2) * BYTES_PER_INT64 * tokens,
        # A 0-dim tensor: the loss divisor (fixed_cross_entropy) in fp32. (Gemma's embedding scale is a registered
        # buffer in the weights' dtype, model state like the rotary inv_freq: not an activation.)
        loss_scalars=BYTES_PER_FP32,
        final_norm=norm_own_bytes(a.gemma_norm, run, h) + (0 if run.autocast else c * tokens * h),
        head=c * tokens * h if run.autocast else 0,
        routing=model_extra,
        # Gemma2ForCausalLM.forward: logits / final_logit_softcapping, tanh, * final_logit_softcapping; tanh saves
        # its output, (b, s, vocab) in the logits' dtype.
        logit_softcap=c * tokens * loss_vocab(a.vocab_size, run) if a.final_logit_softcapping is not None else 0,
    )
    held = held_through_loss(a, run, masks)
    # Made after attention: the MLP-side norms (and Gemma2/3's post-attention norm, whose backward comes before
    # attention's), the MLP's input (under autocast its Linears' casts, the MLP's casts part), o_proj's input copy.
    first_mlp, _ = mlp_bytes(a, 0, run)
    mlp_input = first_mlp.get(PART_CASTS, 0) if run.autocast else c * tokens * h
    made_after = ((a.num_norms - 1) * norm_own_bytes(a.gemma_norm, run, h) + mlp_input
                  + c * tokens * (a.num_heads // run.tp) * a.head_dim)
    after_attention = made_after if run.cp > 1 else 0
    # The input norm's .to(float32) / .float() of an fp32 residual stream (autocast, fp32) is the input itself, which
    # the norm saves: under checkpointing, the layer's kept input.
    saves_input = run.residual * run.sequence_tokens * h if run.checkpointing and run.residual == BYTES_PER_FP32 else 0
    released_at_scores = held_at_scores = 0
    if run.eager:
        # eager_attention_forward's backward: matmul(probs, v)'s backward releases the 16-bit probabilities (a copy of
        # softmax's fp32 output unless c is fp32) and v (repeated to every head) before softmax's backward, its
        # largest moment (memcalc.activations: the fp32 scores' gradients). Waiting there: v's gradient (every head;
        # repeat_kv's backward comes after softmax's) and the residual stream's, which the skip connection hands to
        # the layer's input (measured: Llama eager checkpointed CPU steps, benchmarks/accuracy.py).
        heads_d = c * tokens * (a.num_heads // run.tp) * a.head_dim
        probs_copy = c * run.b * (a.num_heads // run.tp) * run.s * run.s if c != BYTES_PER_FP32 else 0
        released_at_scores = made_after + probs_copy + heads_d
        held_at_scores = heads_d + run.residual * run.sequence_tokens * h  # (--sp: the residual stream's split)
    rule_notes = [] if run.eager else [NOTE_SDPA]
    if window_applies:
        count = sum(1 for flag in a.sliding if flag)
        rule_notes.append(
            f"sliding window {a.sliding_window:,} < seq {run.s:,}: in {count} of {a.num_layers} layers sdpa gets an "
            "explicit mask, so k and v are repeated to every head and the mask is kept as a float bias (counted; "
            "measured on the CPU)")
    if padded:
        rule_notes.append("rows padded (--padded): every layer's sdpa gets the batch's padding mask, so k and v are "
                          "repeated to every head and the mask is kept as a float bias (counted)")
    elif run.padded and run.flash:
        rule_notes.append(FLASH_PADDED_NOTE)
    # the boolean masks (b, 1, s, s) a padded batch gives: one per kind of layer (full, sliding) in the stack
    mask_kinds = 2 if any(sliding) and not all(sliding) else 1
    return Rule(layers, first, per_model, source, a.num_layers * run.sequence_tokens * h * run.residual,
                gated_mlp_transient(run, a.intermediate_size // run.tp, h) + output_gradient(run, h),
                Loss(tokens, loss_vocab(a.vocab_size, run), BYTES_PER_FP32), [*rule_notes, *notes], held=held,
                after_attention=after_attention, released_at_scores=released_at_scores,
                held_at_scores=held_at_scores,
                opening_transient=max(sandwich_norm_transient(a, run), recompute_end_transient(run, h)),
                # (less the MLP's input and the norm's normalised input, which its weight multiply's backward released)
                mid_norm_transient=(norm_backward_transient(a, run) - mlp_input
                                    - (BYTES_PER_FP32 if a.gemma_norm else run.residual) * run.sequence_tokens * h),
                released_at_mlp=norm_own_bytes(a.gemma_norm, run, h) if a.sandwich else 0,
                recompute_saves_input=saves_input, output_gradient=output_gradient(run, h),
                # checkpointed layers' arguments: masking_utils.sdpa_mask's boolean sliding-window mask (1, 1, s, s),
                # and the model's position_ids (cache_position.unsqueeze(0): int64 s, every layer's keyword argument)
                # (padded: (b, 1, s, s) per kind of layer)
                checkpoint_arguments=((mask_kinds * run.b * run.s * run.s if padded else
                                       run.s * run.s if window_applies else 0) + BYTES_PER_INT64 * run.s
                                      if run.checkpointing else 0),
                # eager: a stack of sliding and full layers gets both kinds' masks (the model's causal_mask_mapping,
                # create_causal_mask and create_sliding_window_causal_mask), each a 4-D additive mask every layer of its
                # kind holds (found by the traced step: Gemma-2/3 eager checkpointed read -0.2% to -0.6% with one)
                eager_masks=mask_kinds)


def norm_backward_transient(a: LlamaArch, run: Run) -> int:
    """An RMSNorm's backward in fp32 through autograd (LlamaRMSNorm.forward / Gemma's _norm) peaks in pow's backward:
    the gradient of x from the normalising product waits beside mean's backward output, x ** 1, 2 x ** 1 and their
    product with the gradient (5 x 4 T h), and the residual stream's gradient waits for the skip connection (r T h).
    Measured: Gemma-3 and Qwen3 checkpointed CPU steps peak there (small hidden sizes, where it outgrows the MLP's)."""
    return (5 * BYTES_PER_FP32 + run.residual) * run.sequence_tokens * a.hidden_size


def sandwich_norm_transient(a: LlamaArch, run: Run) -> int:
    """Rule.opening_transient: Gemma2/3's layer backward begins with post_feedforward_layernorm's, every activation of the
    layer alive and none of its gradients made: that norm's backward (norm_backward_transient) less the normalised input
    its (1 + weight) multiply saved in fp32, released by that multiply's backward, its first (measured: Gemma-3
    checkpointed CPU steps). 0 without sandwich norms (a Llama layer's backward begins with down_proj's)."""
    return norm_backward_transient(a, run) - BYTES_PER_FP32 * run.sequence_tokens * a.hidden_size if a.sandwich else 0


def recompute_end_transient(run: Run, hidden: int) -> int:
    """Rule.opening_transient of a checkpointed layer under tensor parallelism or autocast: the end of its
    recomputation (down_proj's saves, where the checkpoint stops recomputing), every activation of the layer alive, none
    of its gradients made, and beside them what no op saves: the layer's output gradient waiting (r T h); under autocast
    the MLP's input, the fp32 norm output whose 16-bit casts gate_proj and up_proj save, held by LlamaMLP.forward (with
    --sp the all-gathered copy, r T h over the whole sequence); with --sp also the norm's own split output, held by the
    decoder layer while the MLP runs (r T h / tp), and the output gradient all-gathered for the down projection's
    backward (RowwiseParallel's reduce-scatter, its backward an all-gather: c T h). Measured on the fake process group
    (tests/tiny.py's Llama, TP 2, --sp, amp-bf16, checkpointed: the rank peaked there, 5.65% above the MLP backward's
    moment). 0 unless checkpointed with --sp or autocast."""
    if not run.checkpointing or not (run.sp or run.autocast):
        return 0
    waiting = output_gradient(run, hidden)
    mlp_input = run.residual * run.tokens * hidden if run.autocast else 0
    split = (run.residual * run.sequence_tokens + run.c * run.tokens) * hidden if run.sp else 0
    return waiting + mlp_input + split


def output_gradient(run: Run, hidden: int) -> int:
    """The gradient of a layer's output, held through its MLP's backward: the residual add hands the same tensor to the
    skip connection, whose sum waits for the post-attention norm's backward (r T h; measured: Llama checkpointed fp32
    CPU steps peak in the first layer's MLP backward with it alive, benchmarks/accuracy.py)."""
    return run.residual * run.sequence_tokens * hidden


def gated_mlp_transient(run: Run, intermediate: int, hidden: int) -> int:
    """A gated MLP's backward transients (Rule.transient): down_proj's input gradient and the hidden state's, then
    the product act(gate) * up's backward makes both factors' gradients at once (c T I each): the larger, found by
    the traced step and measured (benchmarks/accuracy.py: checkpointed fp32 sdpa Llama-family steps were 1.4% to
    1.9% low with c T (I + h))."""
    return run.c * run.tokens * max(intermediate + hidden, 2 * intermediate)


def held_through_loss(a: LlamaArch, run: Run, masks: list[bool]) -> int:
    """Bytes the model's outputs keep alive through the loss that no op saves (Rule.held), found by the traced step
    (memcalc/measure/timeline.py) and read from the code:
    - use_cache (the config's default; checkpointing turns it off): LlamaModel.forward builds a DynamicCache and
      returns it; the copies of k and v it makes that attention does not save are held (saved.unsaved_cache_copies).
    - autocast: the final norm's fp32 output is the outputs' last_hidden_state; lm_head saves its cast
      (saved.final_hidden_held)."""
    held = final_hidden_held(run, a.hidden_size) * run.sequence_tokens // run.tokens
    if run.sp and not run.autocast:
        # --sp: the final norm's output (this rank's split of the sequence) is last_hidden_state, a tensor apart from
        # the all-gathered copy lm_head saves (without --sp they are one tensor, counted as the head's input)
        held += run.c * run.sequence_tokens * a.hidden_size
    if a.use_cache and not run.checkpointing:
        for masked in masks:
            held += unsaved_cache_copies(run, a.num_heads // run.tp, a.num_kv_heads // run.tp, a.head_dim,
                                         run.eager or masked)
    return held


def activations(a: LlamaArch, run: Run) -> Rule:
    return llama_rule(a, run)


HEADS = {
    "llama": decoder_heads("Llama"),
    "mistral": decoder_heads("Mistral"),
    "qwen2": decoder_heads("Qwen2"),
    "qwen3": decoder_heads("Qwen3"),
    "gemma": decoder_heads("Gemma"),
    "gemma2": decoder_heads("Gemma2"),
    "gemma3_text": decoder_heads("Gemma3", "Gemma3TextModel", "Gemma3TextForSequenceClassification"),
    "phi3": decoder_heads("Phi3"),
}
# PEFT's default targets; phi3 is not in PEFT's table: its fused qkv_proj is the analogue of q_proj/v_proj.
_LORA = {"phi3": ("qkv_proj",)}

FAMILIES = {
    model_type: Family(model_type, HEADS[model_type], _resolver(model_type), inventory, activations,
                       lora_targets=_LORA.get(model_type, ("q_proj", "v_proj")), counts_repeat_kv=True,
                       counts_padding=True)
    for model_type in VARIANTS
}
