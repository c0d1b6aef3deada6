"""Activations saved for backward, and the logits/loss buffers: a first approximation.

For Llama-style decoders (llama, mistral, qwen2/3, gemma*, phi3, mixtral, qwen*_moe) the per-layer bytes
are derived below from what transformers' modeling code saves for backward (modeling_llama.py:
LlamaRMSNorm, LlamaAttention + sdpa/eager attention, LlamaMLP; loss/loss_utils.py ForCausalLMLoss).
Other families use Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", eq. 2): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, without the 5as/h score term for fused
attention. Neither is yet checked against a measured step; a later issue measures and refines them.

Notation: T = micro_batch * seq_len tokens, h hidden, I intermediate, a heads, g kv heads, d head_dim,
V vocab, c bytes of the compute dtype. Per Llama-style layer, non-checkpointed:
  each RMSNorm     fp32 copy of its input (4Th) + normalized input in c (cTh) + output in c (cTh)
                   (Gemma's norm keeps the fp32 normalized product instead: 4Th + 4Th + cTh)
  q, k, v          rotary outputs saved by attention: cT(a*d) + 2 cT(g*d)   (sdpa with enable_gqa)
  attention        sdpa/flash: output cT(a*d) + logsumexp 4T*a; eager: repeat_kv'd k, v, fp32 softmax
                   4*b*a*s^2 and its c copy c*b*a*s^2
  o_proj input     transposed contiguous copy cT(a*d)
  MLP (gated)      gate out, act out, up out, product: 4 cTI (MoE: top-k experts per token)
Causal-LM head: logits in c (cTV, returned to the caller) + log_softmax output in fp32 (4TV) after
forward; at the start of backward two fp32 TxV gradient buffers coexist (8TV).
Checkpointing full (HF gradient_checkpointing_enable): each layer keeps only its input (cTh); one layer's
activations are recomputed at a time during backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memcalc.precision import DTYPE_BYTES, Recipe
from memcalc.report import TERM_ACTIVATIONS, TERM_LOSS_BUFFERS, Phase, Term
from memcalc.spec import Checkpointing

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
                "loss_utils.ForCausalLMLoss; first approximation, not yet measured")
SOURCE_KORTHIKANTI = "Korthikanti et al. 2022, eq. 2 (GPT-style layer, 16-bit); first approximation"


@dataclass
class ActivationEstimate:
    terms: list[Term] = field(default_factory=list)
    backward_start_extra_bytes: int = 0
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

    if model_type in LLAMA_STYLE:
        per_layer, formula = _llama_layer_bytes(raw, model_type, tokens, b, s, h, a, c, recipe.autocast)
        source = SOURCE_LLAMA
    else:
        # Korthikanti eq. 2 counts 16-bit activations; fused attention (sdpa default) drops 5as/h.
        per_layer = tokens * h * 34 * c // 2
        formula = f"s*b*h*34 (x c/2) = {tokens:,} x {h:,} x 34 x {c}/2"
        source = SOURCE_KORTHIKANTI
        result.notes.append(f"activations for model_type '{model_type}' use Korthikanti's GPT formula (approximate)")

    if spec.checkpointing == Checkpointing.full:
        kept = num_layers * tokens * h * c
        total = kept + per_layer
        formula = f"{num_layers} layer inputs x {tokens:,} x {h:,} x {c} B + one recomputed layer ({per_layer:,} B: {formula})"
    else:
        total = num_layers * per_layer
        formula = f"{num_layers} layers x {per_layer:,} B per layer ({formula})"
    result.terms.append(Term(
        name=TERM_ACTIVATIONS, bytes=total, formula=formula, source=source, category="activations",
        phases=[Phase.forward, Phase.backward],
    ))
    if vocab:
        after_forward = tokens * vocab * (c + FP32_BYTES)
        result.terms.append(Term(
            name=TERM_LOSS_BUFFERS, bytes=after_forward,
            formula=f"logits {tokens:,} x {vocab:,} x {c} B + fp32 log_softmax {tokens:,} x {vocab:,} x 4 B",
            source="transformers loss_utils.ForCausalLMLoss: logits.float() then cross_entropy (log_softmax saves "
                   "its fp32 output); the model output keeps the logits",
            category="activations", phases=[Phase.forward, Phase.backward],
        ))
        result.backward_start_extra_bytes = 2 * tokens * vocab * FP32_BYTES
    if spec.micro_batch_size * spec.seq_len > 0:
        result.notes.append("activations are a first approximation (derived, not yet measured against a real step)")
    return result


def _llama_layer_bytes(raw: dict[str, Any], model_type: str, tokens: int, b: int, s: int, h: int, a: int, c: int,
                       autocast: bool) -> tuple[int, str]:
    g = int(_first(raw, "num_key_value_heads", default=a))
    d = int(_first(raw, "head_dim", default=h // a))
    intermediate = int(_first(raw, "intermediate_size", default=4 * h))
    experts_per_token = int(_first(raw, "num_experts_per_tok", default=1))
    if model_type in ("qwen2_moe", "qwen3_moe") and raw.get("moe_intermediate_size"):
        intermediate = int(raw["moe_intermediate_size"])
    num_norms = 4 if model_type in FOUR_NORMS else 2
    # Under autocast the residual stream and norms stay fp32; each Linear saves its own cast of its input.
    norm_bytes = (8 + c) if model_type in GEMMA_NORMS else (4 + 2 * c)
    if autocast:
        norm_bytes = 4 + 4 + 3 * c  # fp32 input, fp32 normalized, then q/k/v (or gate/up) casts in c
    norms = num_norms * tokens * h * norm_bytes
    qkv = c * tokens * (a * d + 2 * g * d)
    qk_norm = tokens * (a * d + g * d) * (4 + 2 * c) if model_type in QK_NORMS else 0
    attention = c * tokens * a * d + FP32_BYTES * tokens * a  # sdpa output + logsumexp
    o_proj_in = c * tokens * a * d
    mlp = 4 * c * tokens * intermediate * experts_per_token
    per_layer = norms + qkv + qk_norm + attention + o_proj_in + mlp
    formula = (f"norms {norms:,} + q/k/v {qkv:,}{f' + q/k norms {qk_norm:,}' if qk_norm else ''} + "
               f"attention {attention:,} + o_proj input {o_proj_in:,} + MLP {mlp:,}")
    return per_layer, formula
