"""One module per model family, found by ``model_type``; the only place that reads a config's keys.

``describe(config)`` answers what memcalc knows about a ``config.json``: which dict it follows (the
``text_config`` of a multimodal config), the transformers class, the family (a hand-modelled one, or the generic
family: transformers on the meta device for the tensors, Korthikanti's formula for activations), and the
resolved ``Arch``. A family module is imported only when its model type is asked for.

To add a family: a module here with ``FAMILIES = {model_type: Family(...)}``, an entry in ``_MODULES``, a preset
and its test (tests/test_inventory_exact.py, tests/test_activations.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memcalc.errors import INSTALL_TORCH, ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from memcalc.families.base import Arch, Family
    from memcalc.model import ModelConfig, ParamTensor

# model_type -> module of memcalc.families holding its Family.
_MODULES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama",
    "gemma3_text": "llama", "phi3": "llama", "mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe",
    "deepseek_v2": "deepseek_v2", "gpt2": "gpt2", "opt": "opt", "bloom": "bloom", "phi": "phi", "falcon": "falcon",
    "bert": "bert", "t5": "t5",
}  # fmt: skip
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_MODULES))

# Legacy class names still found in config.json files, and the transformers class they mean now.
_ARCHITECTURE_ALIASES = {
    "T5WithLMHeadModel": "T5ForConditionalGeneration",
    "RWForCausalLM": "FalconForCausalLM",
}


def family(model_type: str) -> Family | None:
    """The hand-modelled family of ``model_type``, importing its module; None when there is none."""
    module = _MODULES.get(model_type)
    if module is None:
        return None
    return importlib.import_module(f"memcalc.families.{module}").FAMILIES[model_type]


@dataclass(eq=False, repr=False)
class Described:
    """What memcalc knows about one config.

    model_type / architecture: the transformers config type and model class followed; raw: the config dict read
    (the ``text_config`` of a multimodal config); family: the hand-modelled family of the model type, or the
    generic family when there is none (``derived`` False: activations from Korthikanti's formula); arch: the
    resolved config; modelled_inventory: the family lists this class's tensors itself (else transformers builds it
    on the meta device, ``reason`` says why); notes: one line each for the report.
    """

    model_type: str
    architecture: str | None
    raw: Mapping[str, Any]
    family: Family
    arch: Arch
    derived: bool
    modelled_inventory: bool
    notes: tuple[str, ...] = ()
    reason: str = ""
    declared_type: str = ""  # the config's own model_type ("gemma3" for a config whose text_config is followed)

    def inventory(self) -> list[ParamTensor]:
        """Every parameter tensor, as transformers 5.24 names and shapes it: the family's own list, or (torch and
        transformers installed) the class built on the meta device; without them an UnsupportedModelError."""
        if self.modelled_inventory:
            assert self.family.inventory is not None
            return self.family.inventory(self.arch)
        if not fallback_available():
            raise UnsupportedModelError(
                f"{self.reason}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}; installing torch and "
                f"transformers ({INSTALL_TORCH}) enables the meta-device fallback")
        from memcalc.families.generic import meta_inventory

        return meta_inventory(self.raw, self.architecture)

    def inventory_notes(self) -> list[str]:
        """Lines to show with an inventory: what was counted when it is not simply the named class."""
        notes = list(self.notes)
        if not self.modelled_inventory:
            notes.append(f"{self.reason}; built with transformers on the meta device")
        return notes


def fallback_available() -> bool:
    """True when torch and transformers can be imported (checked without importing them)."""
    import importlib.util  # only for model types without a pure-Python inventory

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def _first_architecture(raw: Mapping[str, Any]) -> str | None:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return _ARCHITECTURE_ALIASES.get(archs[0], archs[0])
    return None


def _model_type(raw: Mapping[str, Any]) -> str:
    value = raw.get("model_type")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f'config field "model_type" must be a string, got {type(value).__name__}')
    return value or ""


def describe(config: ModelConfig) -> Described:
    """Which dict, model_type, class and family the estimate of ``config`` follows, and its resolved Arch."""
    raw, notes = config.raw, []
    model_type = declared = _model_type(raw)
    text = raw.get("text_config")
    if family(model_type) is None and isinstance(text, dict):
        text_type = _model_type(text) or f"{model_type}_text"
        if family(text_type) is not None:
            notes.append(f"'{model_type}' config: counting its text_config ({text_type}) only; "
                         "vision/audio towers and projectors are not included")
            raw, model_type = text, text_type
    if not model_type:
        raise ConfigError('config has no "model_type"; memcalc reads Hugging Face config.json files: add the '
                          'model_type of its transformers config (e.g. "llama"), or give a parameter count')
    found = family(model_type)
    architecture = _first_architecture(raw)
    if found is None:
        from memcalc.families import generic

        return Described(model_type, architecture, raw, generic.FAMILY, generic.resolve_any(raw, model_type, architecture),
                         derived=False, modelled_inventory=False, notes=tuple(notes),
                         reason=f"model_type {model_type!r} has no pure-Python inventory", declared_type=declared)
    default = next(iter(found.heads))
    architecture = architecture or default
    reason = ""
    if architecture not in found.heads:
        reason = f"architecture {architecture!r} is not modelled for {model_type} (modelled: {', '.join(found.heads)})"
    elif switch := next((s for s in found.unmodelled_switches if raw.get(s)), None):
        reason = f"{model_type} with {switch} is not modelled"
    arch = found.resolve(raw, architecture if architecture in found.heads else default)
    if arch.architecture != architecture:  # an unmodelled class of the family: its rules, its class name
        arch = dataclasses.replace(arch, architecture=architecture)
    return Described(model_type, architecture, raw, found, arch, derived=True, modelled_inventory=not reason,
                     notes=tuple(notes), reason=reason, declared_type=declared)


def inventory(config: ModelConfig) -> list[ParamTensor]:
    """Every parameter tensor of the model ``config`` describes (``describe(config).inventory()``)."""
    return describe(config).inventory()
