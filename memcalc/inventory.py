"""Exact per-tensor parameter inventory from a Hugging Face ``config.json``, in pure Python.

``build_inventory(config)`` lists the tensors that ``model.named_parameters()`` of the transformers
(5.24) class gives, with the same names and shapes: tied weights appear once, under the name PyTorch
keeps (the embedding). Each family is one small builder that follows the transformers modeling file
cited beside it, reading config keys with the defaults its config class uses when a key is absent.

A model_type without a builder goes to ``memcalc.inventory_meta`` (transformers on the meta device)
when torch and transformers are installed, and is refused otherwise. This module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memcalc.errors import ConfigError, UnsupportedModelError
from memcalc.model import (
    ROLE_ATTENTION,
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ROLE_LM_HEAD,
    ROLE_MLP,
    ROLE_NORM,
    ROLE_OTHER,
    ROLE_POSITION_EMBEDDING,
    ROLE_ROUTER,
    ModelConfig,
    ParamTensor,
)

# Head kinds: what sits around the base model in the class named by ``architectures[0]``.
CAUSAL_LM = "causal_lm"
BASE = "base"
SEQ_CLS = "seq_cls"

# Legacy class names still found in config.json files, and the transformers class they mean now.
_ARCHITECTURE_ALIASES = {
    "T5WithLMHeadModel": "T5ForConditionalGeneration",
    "RWForCausalLM": "FalconForCausalLM",
}


# Config switches that add tensors no builder here lists; such configs go to the fallback.
_UNMODELLED_SWITCHES = {"bert": ("add_cross_attention",), "gpt2": ("add_cross_attention",)}


# ---------------------------------------------------------------- reading config.json


def _fields(raw: dict[str, Any], defaults: dict[str, Any], aliases: dict[str, str] | None = None) -> dict:
    """Config values as the transformers config class sees them: its defaults, then config.json.

    ``aliases`` maps a key transformers also accepts to the field it sets (the class's
    ``attribute_map``, or a key its ``__post_init__`` pops); such a key wins over the field, as there.
    """
    c = {**defaults, **raw}
    for alias, field_name in (aliases or {}).items():
        if raw.get(alias) is not None:
            c[field_name] = raw[alias]
    return c


def _dim(c: dict, key: str) -> int:
    value = c.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _or_default(c: dict, key: str, default: int) -> int:
    """``getattr(config, key, None) or default``: a missing or null key falls back."""
    return _dim(c, key) if c.get(key) is not None else default


def _num_labels(c: dict) -> int:
    """PreTrainedConfig: ``num_labels`` if given, else ``len(id2label)``, else 2."""
    if c.get("num_labels") is not None:
        return _dim(c, "num_labels")
    if isinstance(c.get("id2label"), dict):
        return len(c["id2label"])
    return 2


# ---------------------------------------------------------------- collecting tensors


class _Params:
    """Collects ParamTensors in the order a builder adds them."""

    def __init__(self) -> None:
        self.tensors: list[ParamTensor] = []

    def add(self, name: str, shape: tuple[int, ...], role: str, layer: int | None, linear: bool = False) -> None:
        self.tensors.append(ParamTensor(name, tuple(shape), layer, role, is_linear_weight=linear))

    def linear(self, name: str, n_in: int, n_out: int, role: str, layer: int | None, bias: bool = False) -> None:
        """nn.Linear(n_in, n_out): weight (n_out, n_in), optional bias (n_out,)."""
        self.add(f"{name}.weight", (n_out, n_in), role, layer, linear=True)
        if bias:
            self.add(f"{name}.bias", (n_out,), role, layer)

    def conv1d(self, name: str, n_in: int, n_out: int, role: str, layer: int | None) -> None:
        """transformers' Conv1D (GPT-2): weight stored (n_in, n_out), always a bias. A matmul weight."""
        self.add(f"{name}.weight", (n_in, n_out), role, layer, linear=True)
        self.add(f"{name}.bias", (n_out,), role, layer)

    def norm(self, name: str, dim: int, layer: int | None, bias: bool = False) -> None:
        self.add(f"{name}.weight", (dim,), ROLE_NORM, layer)
        if bias:
            self.add(f"{name}.bias", (dim,), ROLE_NORM, layer)

    def embedding(self, name: str, num: int, dim: int, role: str = ROLE_EMBEDDING, layer: int | None = None) -> None:
        self.add(f"{name}.weight", (num, dim), role, layer)


# ---------------------------------------------------------------- shared pieces


def _gated_mlp(p: _Params, prefix: str, i: int, hidden: int, inter: int, bias: bool = False) -> None:
    """gate_proj / up_proj / down_proj (LlamaMLP and its copies)."""
    p.linear(f"{prefix}gate_proj", hidden, inter, ROLE_MLP, i, bias)
    p.linear(f"{prefix}up_proj", hidden, inter, ROLE_MLP, i, bias)
    p.linear(f"{prefix}down_proj", inter, hidden, ROLE_MLP, i, bias)


def _router(p: _Params, prefix: str, i: int, num_experts: int, hidden: int) -> None:
    """*TopKRouter: a bare (num_experts, hidden) Parameter used with F.linear, not an nn.Linear."""
    p.add(f"{prefix}gate.weight", (num_experts, hidden), ROLE_ROUTER, i)


def _fused_experts(p: _Params, prefix: str, i: int, num_experts: int, hidden: int, inter: int) -> None:
    """*Experts (transformers 5): all experts in two 3-D Parameters, gate and up fused."""
    p.add(f"{prefix}experts.gate_up_proj", (num_experts, 2 * inter, hidden), ROLE_EXPERT, i)
    p.add(f"{prefix}experts.down_proj", (num_experts, hidden, inter), ROLE_EXPERT, i)


def _gqa_attention(
    p: _Params, prefix: str, i: int, c: dict, head_dim: int, qkv_bias: bool, o_bias: bool, qk_norm: bool = False
) -> None:
    """q/k/v/o projections (LlamaAttention and its copies), optional per-head q_norm / k_norm."""
    hidden, num_heads, num_kv_heads = _dim(c, "hidden_size"), _dim(c, "num_attention_heads"), _kv_heads(c)
    p.linear(f"{prefix}q_proj", hidden, num_heads * head_dim, ROLE_ATTENTION, i, qkv_bias)
    p.linear(f"{prefix}k_proj", hidden, num_kv_heads * head_dim, ROLE_ATTENTION, i, qkv_bias)
    p.linear(f"{prefix}v_proj", hidden, num_kv_heads * head_dim, ROLE_ATTENTION, i, qkv_bias)
    p.linear(f"{prefix}o_proj", num_heads * head_dim, hidden, ROLE_ATTENTION, i, o_bias)
    if qk_norm:
        p.norm(f"{prefix}q_norm", head_dim, i)
        p.norm(f"{prefix}k_norm", head_dim, i)


def _kv_heads(c: dict) -> int:
    return _or_default(c, "num_key_value_heads", _dim(c, "num_attention_heads"))


def _head_dim(c: dict, default: int | None = None) -> int:
    """``head_dim`` when given, else the class's default (hidden_size // num_attention_heads)."""
    fallback = _dim(c, "hidden_size") // max(_dim(c, "num_attention_heads"), 1) if default is None else default
    return _or_default(c, "head_dim", fallback)


Block = Callable[[_Params, str, int], None]


def _decoder(c: dict, head: str, block: Block, norm: str = "norm", phi: bool = False) -> list[ParamTensor]:
    """A decoder-only model in the Llama layout: model.embed_tokens, model.layers.N, model.<norm>, lm_head.

    ``phi``: the final norm is a LayerNorm with a bias, and lm_head has a bias (PhiForCausalLM).
    """
    p = _Params()
    base = "" if head == BASE else "model."
    hidden, vocab = _dim(c, "hidden_size"), _dim(c, "vocab_size")
    p.embedding(f"{base}embed_tokens", vocab, hidden)
    for i in range(_dim(c, "num_hidden_layers")):
        block(p, f"{base}layers.{i}.", i)
    p.norm(f"{base}{norm}", hidden, None, bias=phi)
    if head == CAUSAL_LM and not c["tie_word_embeddings"]:
        p.linear("lm_head", hidden, vocab, ROLE_LM_HEAD, None, bias=phi)
    elif head == CAUSAL_LM and phi:  # tied weight, own bias
        p.add("lm_head.bias", (vocab,), ROLE_LM_HEAD, None)
    elif head == SEQ_CLS:  # GenericForSequenceClassification
        p.linear("score", hidden, _num_labels(c), ROLE_OTHER, None)
    return p.tensors


def _decoder_heads(prefix: str, base_name: str | None = None, seq_cls_name: str | None = None) -> dict[str, str]:
    return {
        f"{prefix}ForCausalLM": CAUSAL_LM,
        base_name or f"{prefix}Model": BASE,
        seq_cls_name or f"{prefix}ForSequenceClassification": SEQ_CLS,
    }


# ---------------------------------------------------------------- Llama-like families

_LLAMA = {  # models/llama/configuration_llama.py: LlamaConfig
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
}  # fmt: skip


def _llama(raw: dict, head: str) -> list[ParamTensor]:  # models/llama/modeling_llama.py: LlamaForCausalLM
    c = _fields(raw, _LLAMA)
    hidden, inter, head_dim = _dim(c, "hidden_size"), _dim(c, "intermediate_size"), _head_dim(c)
    bias = bool(c["attention_bias"])

    def block(p: _Params, prefix: str, i: int) -> None:
        _gqa_attention(p, f"{prefix}self_attn.", i, c, head_dim, bias, bias)
        _gated_mlp(p, f"{prefix}mlp.", i, hidden, inter, bool(c["mlp_bias"]))
        _pre_post_norms(p, prefix, i, hidden)

    return _decoder(c, head, block)


def _pre_post_norms(p: _Params, prefix: str, i: int, hidden: int, sandwich: bool = False) -> None:
    p.norm(f"{prefix}input_layernorm", hidden, i)
    p.norm(f"{prefix}post_attention_layernorm", hidden, i)
    if sandwich:  # Gemma2/Gemma3DecoderLayer
        p.norm(f"{prefix}pre_feedforward_layernorm", hidden, i)
        p.norm(f"{prefix}post_feedforward_layernorm", hidden, i)


def _llama_like(
    defaults: dict, qkv_bias_key: str | bool, o_bias: bool | None, qk_norm: bool = False, sandwich: bool = False
) -> Callable[[dict, str], list[ParamTensor]]:
    """A builder for a Llama copy: attention biases from ``qkv_bias_key`` (a config key or a constant);
    the o_proj bias follows the q/k/v bias when ``o_bias`` is None; optional qk norms and sandwich norms."""

    def build(raw: dict, head: str) -> list[ParamTensor]:
        c = _fields(raw, defaults)
        hidden, inter = _dim(c, "hidden_size"), _dim(c, "intermediate_size")
        head_dim = _head_dim(c, defaults.get("head_dim"))
        qkv_bias = bool(c[qkv_bias_key]) if isinstance(qkv_bias_key, str) else qkv_bias_key
        out_bias = qkv_bias if o_bias is None else o_bias

        def block(p: _Params, prefix: str, i: int) -> None:
            _gqa_attention(p, f"{prefix}self_attn.", i, c, head_dim, qkv_bias, out_bias, qk_norm)
            _gated_mlp(p, f"{prefix}mlp.", i, hidden, inter)
            _pre_post_norms(p, prefix, i, hidden, sandwich)

        return _decoder(c, head, block)

    return build


_MISTRAL = {  # models/mistral/configuration_mistral.py: MistralConfig (num_key_value_heads=8)
    **_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8,
}  # fmt: skip
_QWEN2 = {  # models/qwen2/configuration_qwen2.py: Qwen2Config
    **_LLAMA, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
}  # fmt: skip
_QWEN3 = {**_QWEN2, "head_dim": 128}  # models/qwen3/configuration_qwen3.py: Qwen3Config
_GEMMA = {  # models/gemma/configuration_gemma.py: GemmaConfig
    **_LLAMA, "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "tie_word_embeddings": True,
}  # fmt: skip
_GEMMA2 = {  # models/gemma2/configuration_gemma2.py: Gemma2Config
    **_GEMMA, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4,
}  # fmt: skip
_GEMMA3_TEXT = {**_GEMMA2, "vocab_size": 262208}  # models/gemma3/configuration_gemma3.py: Gemma3TextConfig

# models/mistral/modeling_mistral.py: MistralAttention has no biases.
_mistral = _llama_like(_MISTRAL, qkv_bias_key=False, o_bias=False)
# models/qwen2/modeling_qwen2.py: Qwen2Attention, q/k/v always biased, o_proj never.
_qwen2 = _llama_like(_QWEN2, qkv_bias_key=True, o_bias=False)
# models/qwen3/modeling_qwen3.py: Qwen3Attention, attention_bias on all four, per-head q_norm/k_norm.
_qwen3 = _llama_like(_QWEN3, qkv_bias_key="attention_bias", o_bias=None, qk_norm=True)
# models/gemma/modeling_gemma.py: GemmaForCausalLM (tied by default; embedding scaled, same shape).
_gemma = _llama_like(_GEMMA, qkv_bias_key="attention_bias", o_bias=None)
# models/gemma2/modeling_gemma2.py: Gemma2DecoderLayer adds pre/post feed-forward norms.
_gemma2 = _llama_like(_GEMMA2, qkv_bias_key="attention_bias", o_bias=None, sandwich=True)
# models/gemma3/modeling_gemma3.py: Gemma3ForCausalLM = Gemma2 layout + q_norm/k_norm.
_gemma3_text = _llama_like(_GEMMA3_TEXT, qkv_bias_key="attention_bias", o_bias=None, qk_norm=True, sandwich=True)


_PHI3 = {  # models/phi3/configuration_phi3.py: Phi3Config
    **_LLAMA, "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
}  # fmt: skip


def _phi3(raw: dict, head: str) -> list[ParamTensor]:  # models/phi3/modeling_phi3.py: fused qkv_proj, gate_up_proj
    c = _fields(raw, _PHI3)
    hidden, inter, head_dim = _dim(c, "hidden_size"), _dim(c, "intermediate_size"), _head_dim(c)
    num_heads, num_kv_heads = _dim(c, "num_attention_heads"), _kv_heads(c)

    def block(p: _Params, prefix: str, i: int) -> None:
        p.linear(f"{prefix}self_attn.o_proj", num_heads * head_dim, hidden, ROLE_ATTENTION, i)
        p.linear(f"{prefix}self_attn.qkv_proj", hidden, (num_heads + 2 * num_kv_heads) * head_dim, ROLE_ATTENTION, i)
        p.linear(f"{prefix}mlp.gate_up_proj", hidden, 2 * inter, ROLE_MLP, i)
        p.linear(f"{prefix}mlp.down_proj", inter, hidden, ROLE_MLP, i)
        _pre_post_norms(p, prefix, i, hidden)

    return _decoder(c, head, block)


_PHI = {  # models/phi/configuration_phi.py: PhiConfig
    **_LLAMA, "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "qk_layernorm": False,
}  # fmt: skip


def _phi(raw: dict, head: str) -> list[ParamTensor]:  # models/phi/modeling_phi.py: parallel block, LayerNorms, biases
    c = _fields(raw, _PHI)
    hidden, inter, head_dim = _dim(c, "hidden_size"), _dim(c, "intermediate_size"), _head_dim(c)
    num_heads, num_kv_heads = _dim(c, "num_attention_heads"), _kv_heads(c)

    def block(p: _Params, prefix: str, i: int) -> None:
        a = f"{prefix}self_attn."
        p.linear(f"{a}q_proj", hidden, num_heads * head_dim, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{a}k_proj", hidden, num_kv_heads * head_dim, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{a}v_proj", hidden, num_kv_heads * head_dim, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{a}dense", num_heads * head_dim, hidden, ROLE_ATTENTION, i, bias=True)
        if c["qk_layernorm"]:  # sized hidden_size // num_attention_heads, not head_dim
            p.norm(f"{a}q_layernorm", hidden // num_heads, i, bias=True)
            p.norm(f"{a}k_layernorm", hidden // num_heads, i, bias=True)
        p.linear(f"{prefix}mlp.fc1", hidden, inter, ROLE_MLP, i, bias=True)
        p.linear(f"{prefix}mlp.fc2", inter, hidden, ROLE_MLP, i, bias=True)
        p.norm(f"{prefix}input_layernorm", hidden, i, bias=True)

    return _decoder(c, head, block, norm="final_layernorm", phi=True)


# ---------------------------------------------------------------- mixture of experts

_MIXTRAL = {**_MISTRAL, "num_local_experts": 8}  # models/mixtral/configuration_mixtral.py: MixtralConfig


def _mixtral(raw: dict, head: str) -> list[ParamTensor]:  # models/mixtral/modeling_mixtral.py: MixtralSparseMoeBlock
    c = _fields(raw, _MIXTRAL, aliases={"num_experts": "num_local_experts"})
    hidden, inter, head_dim = _dim(c, "hidden_size"), _dim(c, "intermediate_size"), _head_dim(c)
    num_experts = _dim(c, "num_local_experts")

    def block(p: _Params, prefix: str, i: int) -> None:
        _gqa_attention(p, f"{prefix}self_attn.", i, c, head_dim, False, False)
        _router(p, f"{prefix}mlp.", i, num_experts, hidden)
        _fused_experts(p, f"{prefix}mlp.", i, num_experts, hidden, inter)
        _pre_post_norms(p, prefix, i, hidden)

    return _decoder(c, head, block)


_QWEN2_MOE = {  # models/qwen2_moe/configuration_qwen2_moe.py: Qwen2MoeConfig
    **_QWEN2, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "mlp_only_layers": None, "qkv_bias": True,
}  # fmt: skip
_QWEN3_MOE = {  # models/qwen3_moe/configuration_qwen3_moe.py: Qwen3MoeConfig (no head_dim field)
    **_QWEN2_MOE, "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
    "moe_intermediate_size": 768, "num_experts": 128,
}  # fmt: skip


def _is_sparse(c: dict, i: int) -> bool:
    """Qwen2Moe/Qwen3MoeDecoderLayer: which layers get the sparse MoE block."""
    only_dense = c.get("mlp_only_layers") or []
    return i not in only_dense and _dim(c, "num_experts") > 0 and (i + 1) % _dim(c, "decoder_sparse_step") == 0


def _qwen_moe(shared_expert: bool, qk_norm: bool) -> Callable[[dict, str], list[ParamTensor]]:
    defaults = _QWEN2_MOE if shared_expert else _QWEN3_MOE

    def build(raw: dict, head: str) -> list[ParamTensor]:
        c = _fields(raw, defaults, aliases={"num_local_experts": "num_experts"})
        hidden, head_dim, num_experts = _dim(c, "hidden_size"), _head_dim(c), _dim(c, "num_experts")
        qkv_bias = bool(c["qkv_bias"] if shared_expert else c["attention_bias"])

        def block(p: _Params, prefix: str, i: int) -> None:
            o_bias = False if shared_expert else qkv_bias
            _gqa_attention(p, f"{prefix}self_attn.", i, c, head_dim, qkv_bias, o_bias, qk_norm)
            m = f"{prefix}mlp."
            if not _is_sparse(c, i):
                _gated_mlp(p, m, i, hidden, _dim(c, "intermediate_size"))
            else:
                _router(p, m, i, num_experts, hidden)
                _fused_experts(p, m, i, num_experts, hidden, _dim(c, "moe_intermediate_size"))
            if shared_expert and _is_sparse(c, i):  # an always-on dense MLP (ROLE_MLP) and its sigmoid gate
                _gated_mlp(p, f"{m}shared_expert.", i, hidden, _dim(c, "shared_expert_intermediate_size"))
                p.linear(f"{m}shared_expert_gate", hidden, 1, ROLE_ROUTER, i)
            _pre_post_norms(p, prefix, i, hidden)

        return _decoder(c, head, block)

    return build


# models/qwen2_moe/modeling_qwen2_moe.py: Qwen2MoeSparseMoeBlock (router, fused experts, shared expert + gate)
_qwen2_moe = _qwen_moe(shared_expert=True, qk_norm=False)
# models/qwen3_moe/modeling_qwen3_moe.py: Qwen3MoeSparseMoeBlock (router, fused experts), q_norm/k_norm
_qwen3_moe = _qwen_moe(shared_expert=False, qk_norm=True)


_DEEPSEEK_V2 = {  # models/deepseek_v2/configuration_deepseek_v2.py: DeepseekV2Config
    **_LLAMA, "vocab_size": 102400, "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "moe_intermediate_size": 1407,
}  # fmt: skip


def _mla_attention(p: _Params, prefix: str, i: int, c: dict) -> None:
    """DeepseekV2Attention: low-rank q (or a plain q_proj when q_lora_rank is null) and compressed kv."""
    hidden, num_heads, bias = _dim(c, "hidden_size"), _dim(c, "num_attention_heads"), bool(c["attention_bias"])
    rope, nope = _dim(c, "qk_rope_head_dim"), _dim(c, "qk_nope_head_dim")
    v_dim, kv_rank = _dim(c, "v_head_dim"), _dim(c, "kv_lora_rank")
    q_out = num_heads * (nope + rope)
    if c.get("q_lora_rank") is None:
        p.linear(f"{prefix}q_proj", hidden, q_out, ROLE_ATTENTION, i)
    else:
        q_rank = _dim(c, "q_lora_rank")
        p.linear(f"{prefix}q_a_proj", hidden, q_rank, ROLE_ATTENTION, i, bias)
        p.norm(f"{prefix}q_a_layernorm", q_rank, i)
        p.linear(f"{prefix}q_b_proj", q_rank, q_out, ROLE_ATTENTION, i)
    p.linear(f"{prefix}kv_a_proj_with_mqa", hidden, kv_rank + rope, ROLE_ATTENTION, i, bias)
    p.norm(f"{prefix}kv_a_layernorm", kv_rank, i)
    p.linear(f"{prefix}kv_b_proj", kv_rank, num_heads * (nope + v_dim), ROLE_ATTENTION, i)
    p.linear(f"{prefix}o_proj", num_heads * v_dim, hidden, ROLE_ATTENTION, i, bias)


def _deepseek_v2(raw: dict, head: str) -> list[ParamTensor]:  # models/deepseek_v2/modeling_deepseek_v2.py
    c = _fields(raw, _DEEPSEEK_V2, aliases={"num_experts": "n_routed_experts"})
    hidden, mlp_bias = _dim(c, "hidden_size"), bool(c["mlp_bias"])
    num_experts, moe_inter = _dim(c, "n_routed_experts"), _dim(c, "moe_intermediate_size")

    def block(p: _Params, prefix: str, i: int) -> None:
        _mla_attention(p, f"{prefix}self_attn.", i, c)
        m = f"{prefix}mlp."
        if i < _dim(c, "first_k_dense_replace"):  # DeepseekV2DecoderLayer: dense MLP below first_k_dense_replace
            _gated_mlp(p, m, i, hidden, _dim(c, "intermediate_size"), mlp_bias)
        else:  # DeepseekV2Moe: fused experts, router (kept in fp32 by transformers), shared experts as one MLP
            _fused_experts(p, m, i, num_experts, hidden, moe_inter)
            _router(p, m, i, num_experts, hidden)
            _gated_mlp(p, f"{m}shared_experts.", i, hidden, moe_inter * _dim(c, "n_shared_experts"), mlp_bias)
        _pre_post_norms(p, prefix, i, hidden)

    return _decoder(c, head, block)


# ---------------------------------------------------------------- GPT-2, BLOOM, Falcon, OPT

_GPT2 = {  # models/gpt2/configuration_gpt2.py: GPT2Config
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "tie_word_embeddings": True,
}  # fmt: skip
_GPT2_ALIASES = {  # GPT2Config.attribute_map
    "hidden_size": "n_embd", "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
}  # fmt: skip


def _gpt2(raw: dict, head: str) -> list[ParamTensor]:  # models/gpt2/modeling_gpt2.py: GPT2LMHeadModel (Conv1D)
    c = _fields(raw, _GPT2, _GPT2_ALIASES)
    hidden, vocab = _dim(c, "n_embd"), _dim(c, "vocab_size")
    inner = _or_default(c, "n_inner", 4 * hidden)
    base, p = ("" if head == BASE else "transformer."), _Params()
    p.embedding(f"{base}wte", vocab, hidden)
    p.embedding(f"{base}wpe", _dim(c, "n_positions"), hidden, ROLE_POSITION_EMBEDDING)
    for i in range(_dim(c, "n_layer")):
        h = f"{base}h.{i}."
        p.norm(f"{h}ln_1", hidden, i, bias=True)
        p.conv1d(f"{h}attn.c_attn", hidden, 3 * hidden, ROLE_ATTENTION, i)
        p.conv1d(f"{h}attn.c_proj", hidden, hidden, ROLE_ATTENTION, i)
        p.norm(f"{h}ln_2", hidden, i, bias=True)
        p.conv1d(f"{h}mlp.c_fc", hidden, inner, ROLE_MLP, i)
        p.conv1d(f"{h}mlp.c_proj", inner, hidden, ROLE_MLP, i)
    p.norm(f"{base}ln_f", hidden, None, bias=True)
    _simple_head(p, c, head, hidden, vocab)
    return p.tensors


def _simple_head(p: _Params, c: dict, head: str, hidden: int, vocab: int) -> None:
    """lm_head unless tied, or a bias-free ``score`` for sequence classification."""
    if head == CAUSAL_LM and not c["tie_word_embeddings"]:
        p.linear("lm_head", hidden, vocab, ROLE_LM_HEAD, None)
    elif head == SEQ_CLS:
        p.linear("score", hidden, _num_labels(c), ROLE_OTHER, None)


_BLOOM = {  # models/bloom/configuration_bloom.py: BloomConfig
    "vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8, "tie_word_embeddings": True,
}  # fmt: skip
# BloomConfig.attribute_map, and n_embed, which its __post_init__ pops into hidden_size
_BLOOM_ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"}


def _bloom(raw: dict, head: str) -> list[ParamTensor]:  # models/bloom/modeling_bloom.py: BloomForCausalLM
    c = _fields(raw, _BLOOM, _BLOOM_ALIASES)
    hidden, vocab = _dim(c, "hidden_size"), _dim(c, "vocab_size")
    base, p = ("" if head == BASE else "transformer."), _Params()
    p.embedding(f"{base}word_embeddings", vocab, hidden)
    p.norm(f"{base}word_embeddings_layernorm", hidden, None, bias=True)
    for i in range(_dim(c, "n_layer")):
        h = f"{base}h.{i}."
        p.norm(f"{h}input_layernorm", hidden, i, bias=True)
        p.linear(f"{h}self_attention.query_key_value", hidden, 3 * hidden, ROLE_ATTENTION, i, bias=True)
        p.linear(f"{h}self_attention.dense", hidden, hidden, ROLE_ATTENTION, i, bias=True)
        p.norm(f"{h}post_attention_layernorm", hidden, i, bias=True)
        p.linear(f"{h}mlp.dense_h_to_4h", hidden, 4 * hidden, ROLE_MLP, i, bias=True)
        p.linear(f"{h}mlp.dense_4h_to_h", 4 * hidden, hidden, ROLE_MLP, i, bias=True)
    p.norm(f"{base}ln_f", hidden, None, bias=True)
    _simple_head(p, c, head, hidden, vocab)
    return p.tensors


_FALCON = {  # models/falcon/configuration_falcon.py: FalconConfig
    "vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
    "num_ln_in_parallel_attn": None, "num_kv_heads": None, "new_decoder_architecture": False,
    "multi_query": True, "parallel_attn": True, "bias": False, "ffn_hidden_size": None, "tie_word_embeddings": True,
}  # fmt: skip


def _falcon_qkv_out(c: dict, hidden: int) -> int:
    """FalconAttention: fused query_key_value width for the three layouts."""
    num_heads = _dim(c, "num_attention_heads")
    head_dim = hidden // num_heads
    if c["new_decoder_architecture"]:
        return (2 * _or_default(c, "num_kv_heads", num_heads) + num_heads) * head_dim
    return hidden + 2 * head_dim if c["multi_query"] else 3 * hidden


def _falcon_norms(p: _Params, h: str, i: int, c: dict, hidden: int) -> None:
    """FalconDecoderLayer: two norms for sequential blocks, ln_attn/ln_mlp for new_decoder_architecture."""
    num_ln = c.get("num_ln_in_parallel_attn")
    if num_ln is None and c["new_decoder_architecture"]:
        num_ln = 2
    if not c["parallel_attn"]:
        p.norm(f"{h}post_attention_layernorm", hidden, i, bias=True)
        p.norm(f"{h}input_layernorm", hidden, i, bias=True)
    elif num_ln == 2:
        p.norm(f"{h}ln_attn", hidden, i, bias=True)
        p.norm(f"{h}ln_mlp", hidden, i, bias=True)
    else:
        p.norm(f"{h}input_layernorm", hidden, i, bias=True)


def _falcon(raw: dict, head: str) -> list[ParamTensor]:  # models/falcon/modeling_falcon.py: FalconForCausalLM
    c = _fields(raw, _FALCON, {"n_embed": "hidden_size"})
    hidden, vocab, bias = _dim(c, "hidden_size"), _dim(c, "vocab_size"), bool(c["bias"])
    ffn = _or_default(c, "ffn_hidden_size", 4 * hidden)
    base, p = ("" if head == BASE else "transformer."), _Params()
    p.embedding(f"{base}word_embeddings", vocab, hidden)
    for i in range(_dim(c, "num_hidden_layers")):
        h = f"{base}h.{i}."
        p.linear(f"{h}self_attention.query_key_value", hidden, _falcon_qkv_out(c, hidden), ROLE_ATTENTION, i, bias)
        p.linear(f"{h}self_attention.dense", hidden, hidden, ROLE_ATTENTION, i, bias)
        p.linear(f"{h}mlp.dense_h_to_4h", hidden, ffn, ROLE_MLP, i, bias)
        p.linear(f"{h}mlp.dense_4h_to_h", ffn, hidden, ROLE_MLP, i, bias)
        _falcon_norms(p, h, i, c, hidden)
    p.norm(f"{base}ln_f", hidden, None, bias=True)
    _simple_head(p, c, head, hidden, vocab)
    return p.tensors


_OPT = {  # models/opt/configuration_opt.py: OPTConfig
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
    "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None, "enable_bias": True, "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True,
}  # fmt: skip


def _opt_layer(p: _Params, d: str, i: int, c: dict, hidden: int) -> None:
    """OPTDecoderLayer; LayerNorms hold no tensors when layer_norm_elementwise_affine is false."""
    bias, affine = bool(c["enable_bias"]), bool(c["layer_norm_elementwise_affine"])
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        p.linear(f"{d}self_attn.{proj}", hidden, hidden, ROLE_ATTENTION, i, bias)
    if affine:
        p.norm(f"{d}self_attn_layer_norm", hidden, i, bias=True)
    p.linear(f"{d}fc1", hidden, _dim(c, "ffn_dim"), ROLE_MLP, i, bias)
    p.linear(f"{d}fc2", _dim(c, "ffn_dim"), hidden, ROLE_MLP, i, bias)
    if affine:
        p.norm(f"{d}final_layer_norm", hidden, i, bias=True)


def _opt(raw: dict, head: str) -> list[ParamTensor]:  # models/opt/modeling_opt.py: OPTDecoder
    c = _fields(raw, _OPT)
    hidden, vocab = _dim(c, "hidden_size"), _dim(c, "vocab_size")
    proj_dim = _or_default(c, "word_embed_proj_dim", hidden)
    base, p = ("decoder." if head == BASE else "model.decoder."), _Params()
    p.embedding(f"{base}embed_tokens", vocab, proj_dim)
    p.embedding(f"{base}embed_positions", _dim(c, "max_position_embeddings") + 2, hidden, ROLE_POSITION_EMBEDDING)
    if proj_dim != hidden:  # OPT-350m: embeddings narrower than the blocks
        p.linear(f"{base}project_out", hidden, proj_dim, ROLE_OTHER, None)
        p.linear(f"{base}project_in", proj_dim, hidden, ROLE_OTHER, None)
    if c["do_layer_norm_before"] and not c["_remove_final_layer_norm"] and c["layer_norm_elementwise_affine"]:
        p.norm(f"{base}final_layer_norm", hidden, None, bias=True)
    for i in range(_dim(c, "num_hidden_layers")):
        _opt_layer(p, f"{base}layers.{i}.", i, c, hidden)
    _simple_head(p, c, head, proj_dim, vocab)
    return p.tensors


# ---------------------------------------------------------------- BERT

_BERT = {  # models/bert/configuration_bert.py: BertConfig
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
    "tie_word_embeddings": True,
}  # fmt: skip

# class -> (pooler, head parts); models/bert/modeling_bert.py
_BERT_HEADS = {
    "BertForMaskedLM": (False, ("mlm",)),
    "BertModel": (True, ()),
    "BertForPreTraining": (True, ("mlm", "nsp")),
    "BertLMHeadModel": (False, ("mlm",)),
    "BertForSequenceClassification": (True, ("classifier",)),
    "BertForTokenClassification": (False, ("classifier",)),
    "BertForQuestionAnswering": (False, ("qa_outputs",)),
}


def _bert_layer(p: _Params, e: str, i: int, hidden: int, inter: int, all_heads: int) -> None:
    """BertLayer: self-attention, its output dense + LayerNorm, intermediate, output."""
    for proj in ("query", "key", "value"):
        p.linear(f"{e}attention.self.{proj}", hidden, all_heads, ROLE_ATTENTION, i, bias=True)
    p.linear(f"{e}attention.output.dense", hidden, hidden, ROLE_ATTENTION, i, bias=True)
    p.norm(f"{e}attention.output.LayerNorm", hidden, i, bias=True)
    p.linear(f"{e}intermediate.dense", hidden, inter, ROLE_MLP, i, bias=True)
    p.linear(f"{e}output.dense", inter, hidden, ROLE_MLP, i, bias=True)
    p.norm(f"{e}output.LayerNorm", hidden, i, bias=True)


def _bert_mlm_head(p: _Params, c: dict, hidden: int, vocab: int) -> None:
    """BertLMPredictionHead: transform, output bias; decoder weight/bias tied unless tie_word_embeddings is false."""
    p.add("cls.predictions.bias", (vocab,), ROLE_LM_HEAD, None)
    p.linear("cls.predictions.transform.dense", hidden, hidden, ROLE_LM_HEAD, None, bias=True)
    p.norm("cls.predictions.transform.LayerNorm", hidden, None, bias=True)
    if not c["tie_word_embeddings"]:
        p.linear("cls.predictions.decoder", hidden, vocab, ROLE_LM_HEAD, None, bias=True)


def _bert(raw: dict, head_class: str) -> list[ParamTensor]:  # models/bert/modeling_bert.py
    c = _fields(raw, _BERT)
    hidden, vocab, inter = _dim(c, "hidden_size"), _dim(c, "vocab_size"), _dim(c, "intermediate_size")
    num_heads = _dim(c, "num_attention_heads")
    pooler, parts = _BERT_HEADS[head_class]
    base, p = ("" if head_class == "BertModel" else "bert."), _Params()
    p.embedding(f"{base}embeddings.word_embeddings", vocab, hidden)
    num_positions = _dim(c, "max_position_embeddings")
    p.embedding(f"{base}embeddings.position_embeddings", num_positions, hidden, ROLE_POSITION_EMBEDDING)
    p.embedding(f"{base}embeddings.token_type_embeddings", _dim(c, "type_vocab_size"), hidden)
    p.norm(f"{base}embeddings.LayerNorm", hidden, None, bias=True)
    for i in range(_dim(c, "num_hidden_layers")):
        _bert_layer(p, f"{base}encoder.layer.{i}.", i, hidden, inter, num_heads * (hidden // num_heads))
    if pooler:
        p.linear(f"{base}pooler.dense", hidden, hidden, ROLE_OTHER, None, bias=True)
    if "mlm" in parts:
        _bert_mlm_head(p, c, hidden, vocab)
    if "nsp" in parts:
        p.linear("cls.seq_relationship", hidden, 2, ROLE_OTHER, None, bias=True)
    for name in {"classifier", "qa_outputs"} & set(parts):
        p.linear(name, hidden, _num_labels(c), ROLE_OTHER, None, bias=True)
    return p.tensors


# ---------------------------------------------------------------- T5

_T5 = {  # models/t5/configuration_t5.py: T5Config
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": None,
    "num_heads": 8, "relative_attention_num_buckets": 32, "feed_forward_proj": "relu",
}  # fmt: skip
_T5_ALIASES = {  # T5Config.attribute_map
    "hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers", "head_dim": "d_kv",
}  # fmt: skip


def _t5_attention(p: _Params, a: str, i: int, c: dict, relative_bias: bool) -> None:
    """T5Attention: q/k/v/o without biases; the first block of a stack owns the relative position bias."""
    d_model, inner = _dim(c, "d_model"), _dim(c, "num_heads") * _dim(c, "d_kv")
    for proj in "qkv":
        p.linear(f"{a}{proj}", d_model, inner, ROLE_ATTENTION, i)
    p.linear(f"{a}o", inner, d_model, ROLE_ATTENTION, i)
    if relative_bias:
        buckets = _dim(c, "relative_attention_num_buckets")
        p.embedding(f"{a}relative_attention_bias", buckets, _dim(c, "num_heads"), ROLE_OTHER, i)


def _t5_stack(p: _Params, stack: str, c: dict, num_blocks: int, first_layer: int) -> None:
    """T5Stack: blocks numbered from ``first_layer`` so encoder and decoder blocks get distinct indices."""
    d_model, d_ff = _dim(c, "d_model"), _dim(c, "d_ff")
    gated = str(c["feed_forward_proj"]).split("-")[0] == "gated"
    decoder = stack == "decoder"
    for b in range(num_blocks):
        i, blk = first_layer + b, f"{stack}.block.{b}.layer."
        _t5_attention(p, f"{blk}0.SelfAttention.", i, c, relative_bias=b == 0)
        p.norm(f"{blk}0.layer_norm", d_model, i)
        if decoder:
            _t5_attention(p, f"{blk}1.EncDecAttention.", i, c, relative_bias=False)
            p.norm(f"{blk}1.layer_norm", d_model, i)
        ff = f"{blk}{2 if decoder else 1}."
        for wi in ("wi_0", "wi_1") if gated else ("wi",):
            p.linear(f"{ff}DenseReluDense.{wi}", d_model, d_ff, ROLE_MLP, i)
        p.linear(f"{ff}DenseReluDense.wo", d_ff, d_model, ROLE_MLP, i)
        p.norm(f"{ff}layer_norm", d_model, i)
    p.norm(f"{stack}.final_layer_norm", d_model, None)


def _t5(raw: dict, head_class: str) -> list[ParamTensor]:  # models/t5/modeling_t5.py: T5ForConditionalGeneration
    c = _fields(raw, _T5, _T5_ALIASES)
    d_model, vocab, num_encoder_layers = _dim(c, "d_model"), _dim(c, "vocab_size"), _dim(c, "num_layers")
    p = _Params()
    p.embedding("shared", vocab, d_model)  # encoder/decoder embed_tokens are tied to it
    _t5_stack(p, "encoder", c, num_encoder_layers, 0)
    if head_class != "T5EncoderModel":
        _t5_stack(p, "decoder", c, _or_default(c, "num_decoder_layers", num_encoder_layers), num_encoder_layers)
    # T5Config forces tie_word_embeddings=True, so a model built from the config ties lm_head to
    # `shared`; from_pretrained unties it when the checkpoint holds its own lm_head, which is what
    # configs with "tie_word_embeddings": false (t5-v1_1, flan-t5) have. We count what trains.
    if head_class == "T5ForConditionalGeneration" and raw.get("tie_word_embeddings") is False:
        p.linear("lm_head", d_model, vocab, ROLE_LM_HEAD, None)
    return p.tensors


# ---------------------------------------------------------------- registry


@dataclass(frozen=True, eq=False, repr=False)
class _Family:
    build: Callable[[dict, str], list[ParamTensor]]
    heads: dict[str, str]  # transformers class name -> what the builder is told; the first is the default


def _named_heads(*names: str) -> dict[str, str]:
    """Families whose builder takes the class name itself (BERT, T5)."""
    return {name: name for name in names}


_REGISTRY: dict[str, _Family] = {
    "bert": _Family(_bert, _named_heads(*_BERT_HEADS)),
    "bloom": _Family(_bloom, _decoder_heads("Bloom")),
    "deepseek_v2": _Family(_deepseek_v2, _decoder_heads("DeepseekV2")),
    "falcon": _Family(_falcon, _decoder_heads("Falcon")),
    "gemma": _Family(_gemma, _decoder_heads("Gemma")),
    "gemma2": _Family(_gemma2, _decoder_heads("Gemma2")),
    "gemma3_text": _Family(
        _gemma3_text, _decoder_heads("Gemma3", "Gemma3TextModel", "Gemma3TextForSequenceClassification")
    ),
    "gpt2": _Family(_gpt2, {"GPT2LMHeadModel": CAUSAL_LM, "GPT2Model": BASE, "GPT2ForSequenceClassification": SEQ_CLS}),
    "llama": _Family(_llama, _decoder_heads("Llama")),
    "mistral": _Family(_mistral, _decoder_heads("Mistral")),
    "mixtral": _Family(_mixtral, _decoder_heads("Mixtral")),
    "opt": _Family(_opt, _decoder_heads("OPT")),
    "phi": _Family(_phi, _decoder_heads("Phi")),
    "phi3": _Family(_phi3, _decoder_heads("Phi3")),
    "qwen2": _Family(_qwen2, _decoder_heads("Qwen2")),
    "qwen2_moe": _Family(_qwen2_moe, _decoder_heads("Qwen2Moe")),
    "qwen3": _Family(_qwen3, _decoder_heads("Qwen3")),
    "qwen3_moe": _Family(_qwen3_moe, _decoder_heads("Qwen3Moe")),
    "t5": _Family(_t5, _named_heads("T5ForConditionalGeneration", "T5Model", "T5EncoderModel")),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_REGISTRY))
# model_type -> the transformers classes its builder follows; the first is used when config.json names none.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {t: tuple(_REGISTRY[t].heads) for t in SUPPORTED_MODEL_TYPES}


# ---------------------------------------------------------------- what to build, and building it


@dataclass(frozen=True, eq=False, repr=False)
class InventoryTarget:
    """What the inventory follows for a config.

    model_type / architecture: the transformers config type and model class name.
    raw: the config dict read (the ``text_config`` of a multimodal config).
    notes: one line each, for the report (e.g. "text tower only").
    modelled: whether a pure-Python builder covers it; if not, ``reason`` says why.
    """

    model_type: str
    architecture: str | None
    raw: dict[str, Any]
    notes: tuple[str, ...]
    modelled: bool
    reason: str = ""


def _first_architecture(raw: dict[str, Any]) -> str | None:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return _ARCHITECTURE_ALIASES.get(archs[0], archs[0])
    return None


def inventory_target(config: ModelConfig) -> InventoryTarget:
    """Which config dict, model_type and transformers class the inventory of ``config`` follows."""
    raw, notes = config.raw, []
    model_type = str(raw.get("model_type", ""))
    text = raw.get("text_config")
    if model_type not in _REGISTRY and isinstance(text, dict):
        text_type = str(text.get("model_type") or f"{model_type}_text")
        if text_type in _REGISTRY:
            notes.append(
                f"'{model_type}' config: counting its text_config ({text_type}) only; "
                "vision/audio towers and projectors are not included"
            )
            raw, model_type = text, text_type
    family = _REGISTRY.get(model_type)
    if family is None:
        reason = f"model_type {model_type!r} has no pure-Python inventory"
        return InventoryTarget(model_type, _first_architecture(raw), raw, tuple(notes), False, reason)
    arch = _first_architecture(raw) or next(iter(family.heads))
    if arch not in family.heads:
        reason = f"architecture {arch!r} is not modelled for {model_type} (modelled: {', '.join(family.heads)})"
        return InventoryTarget(model_type, arch, raw, tuple(notes), False, reason)
    for switch in _UNMODELLED_SWITCHES.get(model_type, ()):
        if raw.get(switch):
            return InventoryTarget(
                model_type, arch, raw, tuple(notes), False, f"{model_type} with {switch} is not modelled"
            )
    return InventoryTarget(model_type, arch, raw, tuple(notes), True)


def inventory_notes(config: ModelConfig) -> list[str]:
    """Lines to show with an inventory: what was counted when it is not simply the named class."""
    target = inventory_target(config)
    notes = list(target.notes)
    if not target.modelled:
        notes.append(f"{target.reason}; built with transformers on the meta device")
    return notes


def fallback_available() -> bool:
    """True when torch and transformers can be imported (checked without importing them)."""
    import importlib.util  # only for model types without a pure-Python inventory

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def build_inventory(config: ModelConfig) -> list[ParamTensor]:
    """Every parameter tensor of the model ``config`` describes, as transformers 5.24 names and shapes it."""
    target = inventory_target(config)
    if not target.model_type:
        raise ConfigError('config has no model_type; add the model_type of its transformers config (e.g. "llama")')
    if target.modelled:
        family = _REGISTRY[target.model_type]
        return family.build(target.raw, family.heads[target.architecture])
    if not fallback_available():
        raise UnsupportedModelError(
            f"{target.reason}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}; "
            "installing the torch extra (torch + transformers) enables the meta-device fallback"
        )
    from memcalc.inventory_meta import build_inventory_from_transformers

    return build_inventory_from_transformers(ModelConfig(config.name, target.raw, config.source, config.aliases))
