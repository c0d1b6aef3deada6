"""Building an exact parameter inventory: the collector, and the layouts several families share.

A family's ``inventory(arch)`` lists the tensors ``model.named_parameters()`` of its transformers (5.24) class
gives, with the same names and shapes: tied weights appear once, under the name PyTorch keeps (the embedding).
"""

from __future__ import annotations

from collections.abc import Callable

from memcalc.families.base import BASE, CAUSAL_LM, SEQ_CLS
from memcalc.model import (
    ROLE_ATTENTION,
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ROLE_LM_HEAD,
    ROLE_MLP,
    ROLE_NORM,
    ROLE_OTHER,
    ROLE_ROUTER,
    ParamTensor,
)


class Params:
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


def gated_mlp(p: Params, prefix: str, i: int, hidden: int, inter: int, bias: bool = False) -> None:
    """gate_proj / up_proj / down_proj (LlamaMLP and its copies)."""
    p.linear(f"{prefix}gate_proj", hidden, inter, ROLE_MLP, i, bias)
    p.linear(f"{prefix}up_proj", hidden, inter, ROLE_MLP, i, bias)
    p.linear(f"{prefix}down_proj", inter, hidden, ROLE_MLP, i, bias)


def router(p: Params, prefix: str, i: int, num_experts: int, hidden: int) -> None:
    """*TopKRouter: a bare (num_experts, hidden) Parameter used with F.linear, not an nn.Linear."""
    p.add(f"{prefix}gate.weight", (num_experts, hidden), ROLE_ROUTER, i)


def fused_experts(p: Params, prefix: str, i: int, num_experts: int, hidden: int, inter: int) -> None:
    """*Experts (transformers 5): all experts in two 3-D Parameters, gate and up fused."""
    p.add(f"{prefix}experts.gate_up_proj", (num_experts, 2 * inter, hidden), ROLE_EXPERT, i)
    p.add(f"{prefix}experts.down_proj", (num_experts, hidden, inter), ROLE_EXPERT, i)


def gqa_attention(p: Params, prefix: str, i: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  qkv_bias: bool, o_bias: bool, qk_norm: bool = False) -> None:
    """q/k/v/o projections (LlamaAttention and its copies), optional per-head q_norm / k_norm."""
    p.linear(f"{prefix}q_proj", hidden, num_heads * head_dim, ROLE_ATTENTION, i, qkv_bias)
    p.linear(f"{prefix}k_proj", hidden, num_kv_heads * head_dim, ROLE_ATTENTION, i, qkv_bias)
    p.linear(f"{prefix}v_proj", hidden, num_kv_heads * head_dim, ROLE_ATTENTION, i, qkv_bias)
    p.linear(f"{prefix}o_proj", num_heads * head_dim, hidden, ROLE_ATTENTION, i, o_bias)
    if qk_norm:
        p.norm(f"{prefix}q_norm", head_dim, i)
        p.norm(f"{prefix}k_norm", head_dim, i)


def pre_post_norms(p: Params, prefix: str, i: int, hidden: int, sandwich: bool = False) -> None:
    p.norm(f"{prefix}input_layernorm", hidden, i)
    p.norm(f"{prefix}post_attention_layernorm", hidden, i)
    if sandwich:  # Gemma2/Gemma3DecoderLayer
        p.norm(f"{prefix}pre_feedforward_layernorm", hidden, i)
        p.norm(f"{prefix}post_feedforward_layernorm", hidden, i)


Block = Callable[[Params, str, int], None]


def decoder(head: str, hidden: int, vocab: int, num_layers: int, tied: bool, num_labels: int, block: Block,
            norm: str = "norm", phi: bool = False) -> list[ParamTensor]:
    """A decoder-only model in the Llama layout: model.embed_tokens, model.layers.N, model.<norm>, lm_head.

    ``phi``: the final norm is a LayerNorm with a bias, and lm_head has a bias (PhiForCausalLM).
    """
    p = Params()
    base = "" if head == BASE else "model."
    p.embedding(f"{base}embed_tokens", vocab, hidden)
    for i in range(num_layers):
        block(p, f"{base}layers.{i}.", i)
    p.norm(f"{base}{norm}", hidden, None, bias=phi)
    if head == CAUSAL_LM and not tied:
        p.linear("lm_head", hidden, vocab, ROLE_LM_HEAD, None, bias=phi)
    elif head == CAUSAL_LM and phi:  # tied weight, own bias
        p.add("lm_head.bias", (vocab,), ROLE_LM_HEAD, None)
    elif head == SEQ_CLS:  # GenericForSequenceClassification
        p.linear("score", hidden, num_labels, ROLE_OTHER, None)
    return p.tensors


def decoder_heads(prefix: str, base_name: str | None = None, seq_cls_name: str | None = None) -> dict[str, str]:
    return {
        f"{prefix}ForCausalLM": CAUSAL_LM,
        base_name or f"{prefix}Model": BASE,
        seq_cls_name or f"{prefix}ForSequenceClassification": SEQ_CLS,
    }


def simple_head(p: Params, head: str, tied: bool, hidden: int, vocab: int, num_labels: int) -> None:
    """lm_head unless tied, or a bias-free ``score`` for sequence classification."""
    if head == CAUSAL_LM and not tied:
        p.linear("lm_head", hidden, vocab, ROLE_LM_HEAD, None)
    elif head == SEQ_CLS:
        p.linear("score", hidden, num_labels, ROLE_OTHER, None)
