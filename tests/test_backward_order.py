"""The order in which a decoder layer's backward makes its weight gradients, as the engine reads it from the inventory:
at the attention's backward the output projection's gradient exists (its backward runs first), the q, k and v
projections' do not. A fused projection (GPT-2's c_attn, Falcon's query_key_value, Phi-3's qkv_proj) is larger than
the output projection, so the output cannot be told by its size (found by the traced step: Falcon's checkpointed eager
steps read up to +5.5% while the fused projection was taken for the output). No torch needed."""

from __future__ import annotations

import pytest

from memcalc.api import model_input
from memcalc.engine import _attention_casts, _first_layer_pending, _made_before_last

# (preset, the first layer's q/k/v projection modules as transformers names them)
QKV = [("gpt2", ("attn.c_attn",)), ("falcon-7b", ("self_attention.query_key_value",)),
       ("phi-3-mini", ("self_attn.qkv_proj",)), ("bloom-560m", ("self_attention.query_key_value",)),
       ("llama-3-8b", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]


def _qkv(tensors, layer: int, modules: tuple[str, ...], weights_only: bool = False) -> int:
    return sum(t.numel for t in tensors if t.layer == layer and t.trainable
               and any(f".{module}." in t.name for module in modules) and (t.is_linear_weight or not weights_only))


@pytest.mark.parametrize(("preset", "modules"), QKV, ids=lambda v: v if isinstance(v, str) else "")
def test_the_attention_s_backward_has_not_made_q_k_v_gradients(preset, modules):
    tensors = model_input(preset, None).tensors
    last = max(t.layer for t in tensors if t.layer is not None)
    layer_total = sum(t.numel for t in tensors if t.layer == last and t.trainable)
    input_norm = min(t.numel for t in tensors if t.layer == last and t.role == "norm")
    _, pending_at_attention, _, _ = _first_layer_pending(tensors)
    assert pending_at_attention == _qkv(tensors, 0, modules)
    # the last layer's made by then: all of it but q, k, v and the input norm's weight
    assert _made_before_last(tensors)[1] == layer_total - _qkv(tensors, last, modules) - input_norm
    # the autocast casts its attention's backward holds: q's, k's and v's (Linear weights)
    _, held = _attention_casts(tensors)
    assert held == _qkv(tensors, 0, modules, weights_only=True)
