"""Scale a config down until a real step of it fits the machine that measures it (no torch here).

The keys below are the names families' configs use for depth and width (memcalc.families reads them resolved;
this writes a smaller config of the same family, keeping each key's own name).

Same family and structure, fewer layers first (2), then narrower (hidden size, MLP width and head counts
halved together, so head_dim and the GQA ratio stay), then a smaller vocabulary. The estimate that is
checked is then the estimate of the scaled config, and the output says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "d_ff", "ffn_dim",
              "moe_intermediate_size", "num_attention_heads", "n_head", "num_heads", "num_key_value_heads")
MIN_LAYERS = 2
MIN_HIDDEN = 64
MIN_VOCAB = 1024
MAX_HALVINGS = 24


def _hidden(raw: dict[str, Any]) -> int:
    return int(next((raw[k] for k in ("hidden_size", "n_embd", "d_model") if raw.get(k)), 0))


def _halve_width(raw: dict[str, Any]) -> dict[str, Any]:
    scaled = dict(raw)
    for key in WIDTH_KEYS:
        if isinstance(scaled.get(key), int) and scaled[key] > 1:
            scaled[key] = max(1, scaled[key] // 2)
    return scaled  # an explicit head_dim is kept; otherwise hidden / heads is unchanged (both halved)


def scale_to_fit(raw: dict[str, Any], peak_bytes: Callable[[dict[str, Any]], int], budget_bytes: int
                 ) -> tuple[dict[str, Any], list[str]]:
    """A config whose estimated peak is within ``budget_bytes``, and the changes made (empty: unchanged)."""
    if peak_bytes(raw) <= budget_bytes:
        return raw, []
    scaled, changes = dict(raw), []
    for key in LAYER_KEYS:
        if isinstance(scaled.get(key), int) and scaled[key] > MIN_LAYERS:
            changes.append(f"{key} {scaled[key]} -> {MIN_LAYERS}")
            scaled[key] = MIN_LAYERS
    halvings = 0
    while peak_bytes(scaled) > budget_bytes and _hidden(scaled) // 2 >= MIN_HIDDEN and halvings < MAX_HALVINGS:
        scaled, halvings = _halve_width(scaled), halvings + 1
    if halvings:
        changes.append(f"width (hidden size, MLP, heads) / {2 ** halvings}: hidden {_hidden(raw)} -> {_hidden(scaled)}")
    vocab = scaled.get("vocab_size")
    while isinstance(vocab, int) and peak_bytes(scaled) > budget_bytes and vocab // 2 >= MIN_VOCAB:
        vocab //= 2
        scaled["vocab_size"] = vocab
    if scaled.get("vocab_size") != raw.get("vocab_size"):
        changes.append(f"vocab_size {raw.get('vocab_size')} -> {scaled.get('vocab_size')}")
    return scaled, changes
