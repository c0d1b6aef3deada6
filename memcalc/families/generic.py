"""The generic family: any model type transformers ships that no family module models by hand.

Tensors: the transformers class built on the meta device (memcalc.measure.build, torch and transformers imported
there), names and shapes exact, ``layer`` and ``role`` read from the names. Activations: Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", eq. 2), s*b*h*34 bytes per layer in 16-bit
(no 5as/h score term for fused attention), flagged as an approximation in the notes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from memcalc.families.base import (
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    Arch,
    Family,
    Fields,
)
from memcalc.families.saved import Loss, Rule, Run
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
from memcalc.units import BYTES_PER_FP32

SOURCE_KORTHIKANTI = "Korthikanti et al. 2022, eq. 2 (GPT-style layer, 16-bit); first approximation"

# The names config.json files use for the common dimensions, in the order transformers' classes prefer them.
_KEYS = {
    "hidden": ("hidden_size", "n_embd", "n_embed", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "positions": ("max_position_embeddings", "n_positions"),
}


def _first_key(raw: Mapping[str, Any], kind: str) -> str | None:
    return next((key for key in _KEYS[kind] if raw.get(key) is not None), None)


def resolve_any(raw: Mapping[str, Any], model_type: str, architecture: str | None) -> Arch:
    """The common dimensions of a config no family module reads, from the names configs commonly use; 0 where
    the config has none (the activations are then not modelled, and the report says so)."""
    f = Fields(raw, {})

    def dim(kind: str, high: int) -> int:
        key = _first_key(raw, kind)
        return f.dim(key, high) if key else 0

    hidden, num_heads = dim("hidden", MAX_HIDDEN), dim("heads", MAX_HEADS)
    return Arch(
        model_type=model_type, architecture=architecture or "", head="", hidden_size=hidden,
        num_layers=dim("layers", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_heads,
        head_dim=hidden // num_heads if num_heads else 0, intermediate_size=dim("intermediate", MAX_INTERMEDIATE),
        vocab_size=f.dim("vocab_size", MAX_VOCAB) if f.given("vocab_size") else 0,
        tie_word_embeddings=f.flag("tie_word_embeddings"),
        max_positions=dim("positions", MAX_POSITIONS) or None,
    )


INVENTORY_CACHE_FORMAT = 1


def meta_inventory(config: ModelConfig | Mapping[str, Any], architecture: str | None = None) -> list[ParamTensor]:
    """The inventory of any model transformers ships, read from a meta-device build of its class (cached: a repeat
    reads the tensors from the cache and imports neither torch nor transformers)."""
    from memcalc import cache

    raw = config.raw if isinstance(config, ModelConfig) else config
    key = cache.key_of(raw, INVENTORY_CACHE_FORMAT, architecture=architecture)
    data = cache.read("inventories", key)
    if data is not None and data.get("format") == INVENTORY_CACHE_FORMAT:
        try:
            return [ParamTensor(name, tuple(shape), layer, role, linear)
                    for name, shape, layer, role, linear in data["tensors"]]
        except (KeyError, TypeError, ValueError):
            pass  # an entry of another shape: build again
    from memcalc.measure.build import build_meta_model

    tensors = param_tensors(build_meta_model(raw, architecture))
    cache.write("inventories", key, {"format": INVENTORY_CACHE_FORMAT, "tensors": [
        [t.name, list(t.shape), t.layer, t.role, t.is_linear_weight] for t in tensors]})
    return tensors


def activations(a: Arch, run: Run) -> Rule:
    # Korthikanti eq. 2 counts 16-bit activations; fused attention (sdpa default) drops 5as/h.
    per_layer = run.tokens * a.hidden_size * 34 * run.c // 2
    note = (f"activations for model_type '{a.model_type}' use Korthikanti's GPT formula: an approximation, not "
            "derived from its transformers code")
    formula = f"s*b*h*34 (x c/2) = {run.tokens:,} x {a.hidden_size:,} x 34 x {run.c}/2"
    return Rule([{"layer (Korthikanti eq. 2)": per_layer}] * a.num_layers, formula, {},
                SOURCE_KORTHIKANTI, a.num_layers * run.tokens * a.hidden_size * run.residual, 0,
                Loss(run.tokens, a.vocab_size, BYTES_PER_FP32), [note])


# No inventory of its own: meta_inventory builds the class named by the config (Described.inventory).
FAMILY = Family("generic", {}, lambda raw, architecture: resolve_any(raw, "", architecture), None, activations)


# ---------------------------------------------------------------- roles and layers from parameter names

_BLOCK_INDEX = re.compile(r"^(.*?)\.(\d+)\.")  # first "<stack>.<N>." in a name: the block list and index


def _layer_offsets(names: list[str]) -> dict[str, int]:
    """Per block list, the index of its first block, counting lists in order (encoder, then decoder)."""
    sizes: dict[str, int] = {}
    for name in names:
        if match := _BLOCK_INDEX.match(name):
            stack, index = match.group(1), int(match.group(2))
            sizes[stack] = max(sizes.get(stack, 0), index + 1)
    offsets, total = {}, 0
    for stack, size in sizes.items():
        offsets[stack], total = total, total + size
    return offsets


def layer_of(name: str, offsets: dict[str, int]) -> int | None:
    match = _BLOCK_INDEX.match(name)
    return offsets[match.group(1)] + int(match.group(2)) if match else None


def role_of(name: str, module_class: str, is_embedding: bool, layer: int | None) -> str:
    """Best-effort role from the parameter's name and the class name of the module that owns it."""
    parts_ = name.split(".")[:-1]
    cls_name = module_class.lower()
    if "norm" in cls_name:
        return ROLE_NORM
    if is_embedding:
        if "relative_attention" in name:
            return ROLE_OTHER
        positional = "position" in name or (parts_ and parts_[-1] == "wpe")
        return ROLE_POSITION_EMBEDDING if positional else ROLE_EMBEDDING
    if "experts" in parts_:
        return ROLE_EXPERT
    if "router" in cls_name or (parts_ and parts_[-1] in ("gate", "router", "shared_expert_gate")):
        return ROLE_ROUTER
    if any(p.startswith("shared_expert") for p in parts_):
        return ROLE_MLP
    if any("attn" in p.lower() or "attention" in p.lower() for p in parts_):
        return ROLE_ATTENTION
    if layer is not None:
        return ROLE_MLP
    if "lm_head" in parts_ or name.startswith("cls.predictions"):
        return ROLE_LM_HEAD
    return ROLE_OTHER


def param_tensors(model: Any) -> list[ParamTensor]:
    """ParamTensors for ``model.named_parameters()`` (tied weights once, as PyTorch dedups them)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    named = list(model.named_parameters())
    offsets = _layer_offsets([name for name, _ in named])
    tensors = []
    for name, param in named:
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        linear = leaf == "weight" and param.dim() == 2 and isinstance(module, (torch.nn.Linear, Conv1D))
        layer = layer_of(name, offsets)
        role = role_of(name, type(module).__name__, isinstance(module, torch.nn.Embedding), layer)
        tensors.append(ParamTensor(name, tuple(param.shape), layer, role, linear))
    return tensors
