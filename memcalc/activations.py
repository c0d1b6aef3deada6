"""Activations saved for backward, and the logits/loss buffers.

For Llama-style decoders (llama, mistral, qwen2/3, gemma*, phi3, mixtral, qwen*_moe) the per-layer bytes
are derived below from what transformers' modeling code saves for backward (modeling_llama.py:
LlamaRMSNorm, LlamaAttention + sdpa/eager attention, LlamaMLP; loss/loss_utils.py ForCausalLMLoss).
Other families use Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", eq. 2): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, without the 5as/h score term for fused
attention. Neither is yet checked against a measured step; a later issue measures and refines them.

Notation: T = micro_batch * seq_len tokens, h hidden, I intermediate, a heads, g kv heads, d head_dim,
V vocab, c bytes of the compute dtype. Per Llama-style layer, non-checkpointed, sdpa attention (checked
tensor by tensor with torch.autograd.graph.saved_tensors_hooks on tiny models, tests/test_activations.py):
  each RMSNorm     fp32 copy of its input 4Th, rsqrt 4T, normalized input in c (cTh), output in c (cTh)
                   (Gemma keeps the fp32 normalized product instead: see _norm_bytes)
  q, k, v          rotary outputs and v as sdpa saves them: cT(a*d) + 2 cT(g*d)
  attention        sdpa output cT(a*d) (o_proj reads it in place: it is laid out (b, s, a, d)) + logsumexp 4Ta;
                   eager: q, k, v for all a heads 3 cT(a*d), fp32 softmax 4 b a s^2, probs c b a s^2, o_proj copy
  MLP (gated)      gate out, act out, up out, product: 4 cTI (MoE: top-k experts per token)
  autocast         each Linear saves its own cast of an fp32 input: 5 cTh (q, k, v, gate, up)
Per model: rotary cos and sin 2*s*d (fp32 under autocast, else c), token ids and labels 2 x 8T, the final
norm, and under autocast the lm_head input cast cTh.
Causal-LM loss (loss_utils.ForCausalLMLoss, HF Trainer drops the logits before backward): log_softmax
saves its fp32 output (4TV) until backward. During the loss, the c logits and their fp32 upcast exist too
((c + 4)TV, forward transient); at the start of backward two fp32 TxV gradients coexist (8TV).
Checkpointing full (HF gradient_checkpointing_enable): each layer keeps only its input (cTh, fp32 under
autocast); one layer's activations are recomputed at a time during backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memcalc.precision import DTYPE_BYTES, Recipe
from memcalc.report import TERM_ACTIVATIONS, TERM_LOSS_BUFFERS, Phase, Term
from memcalc.spec import Attention, Checkpointing

if TYPE_CHECKING:
    from memcalc.engine import ModelInput
    from memcalc.spec import TrainingSpec

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
               "qwen2_moe", "qwen3_moe")
GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")
FOUR_NORMS = ("gemma2", "gemma3_text")  # pre/post attention and pre/post feed-forward norms
QK_NORMS = ("qwen3", "qwen3_moe", "gemma3_text")
FP32_BYTES = 4
SOURCE_LLAMA = ("derived from transformers modeling_llama.py (RMSNorm, attention, MLP) and "
                "loss_utils.ForCausalLMLoss; equal to the saved tensors of a CPU forward (sdpa) in the tests")
SOURCE_GPT2 = ("derived from transformers modeling_gpt2.py (LayerNorm, Conv1D, sdpa/eager attention, NewGELU) "
               "and checked against the saved tensors of a CPU forward in the tests")
SOURCE_KORTHIKANTI = "Korthikanti et al. 2022, eq. 2 (GPT-style layer, 16-bit); first approximation"


@dataclass
class ActivationEstimate:
    terms: list[Term] = field(default_factory=list)
    forward_transient_extra_bytes: int = 0
    backward_start_extra_bytes: int = 0
    recompute_bytes: int = 0  # checkpointing: one layer's activations, rebuilt during backward
    # Late in backward (the first layer's turn): that layer's activations and its gradient transients
    # (the MLP intermediate's and the residual's gradients, c*T*(I + h)) beside nearly every gradient.
    last_layer_bytes: int = 0
    layer_backward_transient_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    if "hidden_size" not in raw and isinstance(raw.get("text_config"), dict):
        return {**raw["text_config"], "model_type": raw["text_config"].get("model_type", raw.get("model_type"))}
    return raw


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


def estimate(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> ActivationEstimate:
    result = ActivationEstimate()
    if model.config is None:
        result.notes.append("activations need an architecture: with --params only, the peak excludes them")
        return result
    raw = _text_config(model.config.raw)
    model_type = str(raw.get("model_type", ""))
    c = DTYPE_BYTES[recipe.compute_dtype]
    b, s = spec.micro_batch_size, spec.seq_len
    tokens = b * s
    h = int(_first(raw, "hidden_size", "n_embd", "d_model", default=0))
    num_layers = int(_first(raw, "num_hidden_layers", "n_layer", "num_layers", default=0))
    a = int(_first(raw, "num_attention_heads", "n_head", "num_heads", default=1))
    vocab = int(_first(raw, "vocab_size", default=0))
    if not h or not num_layers:
        result.notes.append(f"activations not modelled for model_type '{model_type}' (no hidden size / layers found)")
        return result

    model_level = 0
    if model_type in LLAMA_STYLE:
        eager = spec.attention == Attention.eager
        per_layer, formula = _llama_layer_bytes(raw, model_type, tokens, b, s, h, a, c, recipe.autocast, eager)
        source = SOURCE_LLAMA
        d = int(_first(raw, "head_dim", default=h // a))
        rotary = 2 * s * d * (FP32_BYTES if recipe.autocast else c)
        ids = 2 * 8 * tokens  # int64 input_ids (embedding) and shifted labels (nll_loss)
        # 0-dim tensors: the loss divisor (fixed_cross_entropy) in fp32; Gemma's embedding scale in c.
        embed_scale = (FP32_BYTES if recipe.autocast else c) if model_type in GEMMA_NORMS else 0
        scalars = FP32_BYTES + embed_scale
        final_norm = _norm_bytes(model_type, tokens, h, c, recipe.autocast) + (c * tokens * h if recipe.autocast else 0)
        model_level = rotary + ids + scalars + final_norm
    elif model_type == "gpt2":
        per_layer, formula, model_level = _gpt2_bytes(raw, tokens, b, s, h, a, c, recipe.autocast,
                                                      spec.attention == Attention.eager)
        source = SOURCE_GPT2
    else:
        # Korthikanti eq. 2 counts 16-bit activations; fused attention (sdpa default) drops 5as/h.
        per_layer = tokens * h * 34 * c // 2
        formula = f"s*b*h*34 (x c/2) = {tokens:,} x {h:,} x 34 x {c}/2"
        source = SOURCE_KORTHIKANTI
        result.notes.append(f"activations for model_type '{model_type}' use Korthikanti's GPT formula: an "
                            "approximation, not derived from its transformers code")

    residual_bytes = FP32_BYTES if recipe.autocast else c
    if model_type in LLAMA_STYLE or model_type == "gpt2":
        result.last_layer_bytes = per_layer
        intermediate = int(_first(raw, "intermediate_size", "n_inner", default=None) or 4 * h)
        result.layer_backward_transient_bytes = c * tokens * (intermediate + h)
    if spec.checkpointing == Checkpointing.full:
        kept = num_layers * tokens * h * residual_bytes
        total = kept + model_level
        result.recompute_bytes = per_layer
        formula = (f"{num_layers} layer inputs x {tokens:,} x {h:,} x {residual_bytes} B + per model {model_level:,} B; "
                   f"during backward one layer is recomputed at a time ({per_layer:,} B: {formula})")
    else:
        total = num_layers * per_layer + model_level
        formula = f"{num_layers} layers x {per_layer:,} B per layer ({formula}) + per model {model_level:,} B"
    result.terms.append(Term(
        name=TERM_ACTIVATIONS, bytes=total, formula=formula, source=source, category="activations",
        phases=[Phase.forward, Phase.backward],
    ))
    if vocab:
        result.terms.append(Term(
            name=TERM_LOSS_BUFFERS, bytes=tokens * vocab * FP32_BYTES,
            formula=f"fp32 log_softmax output {tokens:,} x {vocab:,} x 4 B (saved until backward); during the loss "
                    f"also the logits and their fp32 upcast ({tokens * vocab * (c + (FP32_BYTES if c != FP32_BYTES else 0)):,} B), at the start "
                    f"of backward two fp32 gradients ({2 * tokens * vocab * FP32_BYTES:,} B)",
            source="transformers loss_utils.ForCausalLMLoss: logits.float() then cross_entropy; log_softmax saves its "
                   "output. HF Trainer drops the model output (and its logits) before backward",
            category="activations", phases=[Phase.forward, Phase.backward],
        ))
        # logits.float() of fp32 logits is the same tensor: no upcast copy in fp32.
        upcast = FP32_BYTES if c != FP32_BYTES else 0
        result.forward_transient_extra_bytes = tokens * vocab * (c + upcast)
        result.backward_start_extra_bytes = 2 * tokens * vocab * FP32_BYTES
    if model_type in LLAMA_STYLE:
        if spec.attention != Attention.eager:
            result.notes.append("attention: sdpa/flash kernels keep no s^2 scores (--attn eager keeps them)")
        if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
            result.notes.append("MoE activations count top-k experts per token; routing buffers are not modelled yet")
    return result


def _llama_layer_bytes(raw: dict[str, Any], model_type: str, tokens: int, b: int, s: int, h: int, a: int, c: int,
                       autocast: bool, eager: bool) -> tuple[int, str]:
    g = int(_first(raw, "num_key_value_heads", default=a))
    d = int(_first(raw, "head_dim", default=h // a))
    intermediate = int(_first(raw, "intermediate_size", default=4 * h))
    experts_per_token = int(_first(raw, "num_experts_per_tok", default=1))
    if model_type in ("qwen2_moe", "qwen3_moe") and raw.get("moe_intermediate_size"):
        intermediate = int(raw["moe_intermediate_size"])
    num_norms = 4 if model_type in FOUR_NORMS else 2
    norms = num_norms * _norm_bytes(model_type, tokens, h, c, autocast)
    casts = 0
    if autocast:
        # Each Linear under autocast saves its own low-precision cast of an fp32 input: q, k, v (phi3: one
        # fused qkv_proj) and gate, up (phi3: gate_up_proj). o_proj and down_proj get 16-bit inputs already.
        num_casts = 2 if model_type == "phi3" else 5
        casts = num_casts * c * tokens * h
    qkv = c * tokens * (a * d + 2 * g * d)  # q_embed, k_embed, v as sdpa saves them
    o_proj_copy = 0
    if model_type == "phi3" and not eager:
        # Phi3Attention slices q, k, v out of one fused qkv_proj output; with v a strided view, sdpa's
        # output is not laid out (b, s, a, d) and o_proj saves a contiguous copy of it (measured on the
        # CPU, tests/test_activations.py; not yet checked on CUDA).
        o_proj_copy = c * tokens * a * d
    # Qwen3/Gemma3 per-head q/k RMSNorm: fp32 copy of the input, rsqrt, normalized in c.
    qk_norm = (4 + c) * tokens * (a + g) * d + FP32_BYTES * tokens * (a + g) if model_type in QK_NORMS else 0
    attention = c * tokens * a * d + FP32_BYTES * tokens * a  # sdpa output (o_proj reads it in place) + logsumexp
    if eager:
        # modeling_llama.eager_attention_forward: repeat_kv materialises k and v for every head; the two
        # matmuls save q, k (a heads), probs in c and v (a heads); softmax(dtype=fp32) saves its fp32
        # output (4 b a s^2) and .to(c) the probs (c b a s^2); o_proj saves a contiguous copy of the
        # (b, a, s, d) output.
        qkv = 3 * c * tokens * a * d
        probs_copy = c if c != FP32_BYTES else 0  # .to(fp32) of an fp32 softmax is the same tensor
        attention = c * tokens * a * d + (FP32_BYTES + probs_copy) * b * a * s * s
    mlp = 4 * c * tokens * intermediate * experts_per_token
    per_layer = norms + casts + qkv + qk_norm + attention + o_proj_copy + mlp
    formula = (f"norms {norms:,}{f' + autocast input casts {casts:,}' if casts else ''} + q/k/v {qkv:,}"
               f"{f' + q/k norms {qk_norm:,}' if qk_norm else ''} + attention {attention:,}"
               f"{f' + o_proj input copy {o_proj_copy:,}' if o_proj_copy else ''} + MLP {mlp:,}")
    return per_layer, formula


# CUDA's native_layer_norm keeps mean and rstd in fp32 (opmath) whatever the input dtype; the CPU kernel keeps
# them in the input dtype (a CPU/GPU difference the tests account for).
LAYER_NORM_STAT_BYTES = FP32_BYTES
# Activation functions transformers computes with several saved elementwise ops (NewGELUActivation:
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))): the input, tanh, 1 + tanh and the product are saved.
PYTHON_GELUS = ("gelu_new",)


def _gpt2_bytes(raw: dict[str, Any], tokens: int, b: int, s: int, h: int, a: int, c: int, autocast: bool,
                eager: bool) -> tuple[int, str, int]:
    """GPT-2 per layer and per model.

    Per layer: two LayerNorms (input cTh + mean and rstd), their outputs as Conv1D inputs (cTh each),
    attention (sdpa: the c_attn output 3cTh that q, k, v view, k and v copies in the KV cache when
    use_cache is on, output cTh (c_proj reads it in place), logsumexp 4Ta; eager: q, k, v cTh each, softmax output c*b*a*s^2, c_proj input copy cTh), and the
    MLP: c_fc output, NewGELU's tanh, 1 + tanh and product, c_proj input (5 cTI; a fused gelu keeps 2 cTI).
    """
    intermediate = int(_first(raw, "n_inner", default=None) or 4 * h)
    d = h // a
    residual = FP32_BYTES if autocast else c
    layer_norm = residual * tokens * h + 2 * LAYER_NORM_STAT_BYTES * tokens
    linear_inputs = 2 * c * tokens * h  # ln outputs (or, under autocast, their casts) read by c_attn and c_fc
    if eager:
        attention = 3 * c * tokens * h + c * b * a * s * s + c * tokens * h
    else:
        # With config.use_cache (GPT2Config default True; HF Trainer leaves it on) DynamicLayer.update
        # torch.cat's k and v into the cache, and sdpa saves those copies beside the c_attn output.
        cache_copies = 2 * c * tokens * h if raw.get("use_cache", True) else 0
        attention = cache_copies + 3 * c * tokens * h + c * tokens * h + FP32_BYTES * tokens * a
    activation = str(raw.get("activation_function", "gelu_new"))
    mlp = (5 if activation in PYTHON_GELUS else 2) * c * tokens * intermediate
    # Dropout as CUDA stores it (GPT2Config defaults 0.1): native_dropout keeps a 1-byte bool mask. The
    # residual dropouts after attention and MLP keep T*h each; sdpa's fused dropout keeps only RNG state;
    # eager attention dropout keeps a b*a*s^2 mask and its output in c (saved by the second matmul).
    dropout = 0
    if float(raw.get("resid_pdrop", 0.1)) > 0:
        dropout += 2 * tokens * h
    if eager and float(raw.get("attn_pdrop", 0.1)) > 0:
        dropout += (1 + c) * b * a * s * s
    per_layer = 2 * layer_norm + linear_inputs + attention + mlp + dropout
    formula = (f"layer norms {2 * layer_norm:,} + Conv1D inputs {linear_inputs:,} + attention {attention:,} + "
               f"MLP {mlp:,}{f' + dropout masks {dropout:,}' if dropout else ''}")
    ids = 8 * tokens + 8 * s + 8 * tokens  # input_ids, position_ids, shifted labels (int64)
    model_level = ids + FP32_BYTES + layer_norm + c * tokens * h  # + loss divisor, ln_f, lm_head input
    if float(raw.get("embd_pdrop", 0.1)) > 0:
        model_level += tokens * h  # embedding dropout mask
    del d
    return per_layer, formula, model_level


def _norm_bytes(model_type: str, tokens: int, h: int, c: int, autocast: bool) -> int:
    """Bytes one RMSNorm saves for backward (modeling_llama.LlamaRMSNorm / modeling_gemma.GemmaRMSNorm).

    Llama: x.to(fp32) (4Th; pow and mul save it), rsqrt (4T), the normalized input cast back to the input
    dtype (cTh, saved by the weight multiply) and the output (cTh, saved by the next Linear).
    Gemma: x.float(), rsqrt, the fp32 normalized product (weight multiply in fp32), (1 + weight) in fp32
    (4h) and the output in c. Under autocast the input is fp32, the normalized product stays fp32 and the
    fp32 output is not saved (each Linear saves its own cast instead).
    """
    gemma = model_type in GEMMA_NORMS
    extra = FP32_BYTES * h if gemma else 0
    if autocast:
        return 8 * tokens * h + FP32_BYTES * tokens + extra
    if gemma:
        return (8 + c) * tokens * h + FP32_BYTES * tokens + extra
    return (4 + 2 * c) * tokens * h + FP32_BYTES * tokens
