"""Fallback inventory: build the transformers model class on the meta device and read its parameters.

Only for configs ``memcalc.inventory`` has no pure-Python builder for. torch and transformers are
imported inside the functions, so importing this module costs nothing. Nothing is downloaded, no
memory is allocated (meta tensors), and remote code is never run: the class must ship with transformers.
Names, shapes and ``is_linear_weight`` are exact; ``layer`` and ``role`` are read from the names.
"""

from __future__ import annotations

import re
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

# Keys starting with "_" are memcalc metadata (_source, _aliases, ...), except these transformers fields.
_TRANSFORMERS_UNDERSCORE_FIELDS = frozenset({"_remove_final_layer_norm"})  # OPTConfig

_BLOCK_INDEX = re.compile(r"^(.*?)\.(\d+)\.")  # first "<stack>.<N>." in a name: the block list and index


def transformers_kwargs(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model_type, the other config.json keys) as ``AutoConfig.for_model`` takes them."""
    fields = {k: v for k, v in raw.items() if not k.startswith("_") or k in _TRANSFORMERS_UNDERSCORE_FIELDS}
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigError("config has no model_type; add the model_type of its transformers config class")
    return str(model_type), fields


def _model_class(transformers: Any, model_type: str, architecture: str | None) -> Any:
    """The class named by ``architecture`` if transformers has it, else its causal-LM or base class."""
    from transformers.models.auto import modeling_auto

    name = architecture if architecture and hasattr(transformers, architecture) else None
    name = name or modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    name = name or modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no model class for {model_type!r}")
    return getattr(transformers, name)


def _untie_output_embeddings(model: Any, raw: dict[str, Any]) -> None:
    """Untie lm_head where config.json says ``tie_word_embeddings: false`` but the class ties anyway.

    T5Config forces tie_word_embeddings=True, so a model built from a config ties lm_head to the
    embeddings; from_pretrained unties it again when the checkpoint holds a separate lm_head
    (t5-v1_1, flan-t5). We follow from_pretrained: that is the model that trains.
    """
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if raw.get("tie_word_embeddings") is False and out is not None and inp is not None and out.weight is inp.weight:
        out.weight = torch.nn.Parameter(torch.empty_like(out.weight))


def build_meta_model(raw: dict[str, Any], architecture: str | None = None) -> Any:
    """The transformers model for ``raw`` (a config.json dict), built on the meta device."""
    import torch
    import transformers

    model_type, fields = transformers_kwargs(raw)
    first = (raw.get("architectures") or [None])[0]
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **fields)
        except ValueError as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "Unrecognized model identifier" in message:
                version = transformers.__version__
                raise UnsupportedModelError(f"transformers {version} does not know model_type {model_type!r}") from exc
            raise ConfigError(f"transformers rejects this {model_type} config: {message}") from exc
        cls = _model_class(transformers, model_type, architecture or first)
        with torch.device("meta"):
            model = cls(hf_config)
    finally:
        transformers.logging.set_verbosity(previous)
    _untie_output_embeddings(model, raw)
    return model


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


def role_of(name: str, module: Any, layer: int | None) -> str:
    """Best-effort role from the parameter's name and the class of the module that owns it."""
    import torch

    parts, cls_name = name.split(".")[:-1], type(module).__name__.lower()
    if "norm" in cls_name:
        return ROLE_NORM
    if isinstance(module, torch.nn.Embedding):
        if "relative_attention" in name:
            return ROLE_OTHER
        positional = "position" in name or (parts and parts[-1] == "wpe")
        return ROLE_POSITION_EMBEDDING if positional else ROLE_EMBEDDING
    if "experts" in parts:
        return ROLE_EXPERT
    if "router" in cls_name or (parts and parts[-1] in ("gate", "router", "shared_expert_gate")):
        return ROLE_ROUTER
    if any(p.startswith("shared_expert") for p in parts):
        return ROLE_MLP
    if any("attn" in p.lower() or "attention" in p.lower() for p in parts):
        return ROLE_ATTENTION
    if layer is not None:
        return ROLE_MLP
    if "lm_head" in parts or name.startswith("cls.predictions"):
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
        tensors.append(ParamTensor(name, tuple(param.shape), layer, role_of(name, module, layer), linear))
    return tensors


def build_inventory_from_transformers(config: ModelConfig) -> list[ParamTensor]:
    """The inventory of any model transformers ships, read from a meta-device build of its class."""
    return param_tensors(build_meta_model(config.raw))
