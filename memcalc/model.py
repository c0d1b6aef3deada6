"""What the estimator knows about a model: its config (HF ``config.json`` vocabulary) and its tensors.

``ParamTensor`` is one parameter tensor as PyTorch would hold it; its shape is exact, so bytes
computed from it match ``tensor.numel() * tensor.element_size()`` to the byte.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Roles a parameter tensor plays. Used by LoRA targeting, autocast copies and ZeRO-3 gathering.
ROLE_EMBEDDING = "embedding"  # token embeddings (nn.Embedding); not cast by autocast
ROLE_POSITION_EMBEDDING = "position_embedding"  # learned absolute positions (gpt2, bert, opt)
ROLE_ATTENTION = "attention"  # q/k/v/o projections (nn.Linear weights and biases)
ROLE_MLP = "mlp"  # dense MLP projections
ROLE_EXPERT = "expert"  # MoE expert projections
ROLE_ROUTER = "router"  # MoE gate / router
ROLE_NORM = "norm"  # LayerNorm / RMSNorm weights and biases
ROLE_LM_HEAD = "lm_head"  # output projection when not tied to the embeddings
ROLE_OTHER = "other"  # poolers, relative-position biases, classifier heads, ...
ROLE_LORA = "lora"  # LoRA adapter matrices (added by memcalc.lora)


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor.

    name: the name ``model.named_parameters()`` gives it in transformers (tied weights appear once).
    shape: exact shape.
    layer: index of the transformer block it belongs to, or None (embeddings, final norm, head).
    role: one of the ROLE_* constants.
    is_linear_weight: True for the 2-D weight of an nn.Linear (what autocast casts and LoRA wraps).
    trainable: False for frozen tensors (LoRA base, --freeze).
    """

    name: str
    shape: tuple[int, ...]
    layer: int | None
    role: str
    is_linear_weight: bool = False
    trainable: bool = True

    @property
    def module(self) -> str:
        """The module that owns it, as named_modules() names it: the name without its last part."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @functools.cached_property
    def numel(self) -> int:
        # (cached: an estimate reads it a few thousand times, once per tensor in each term, and the fit solvers
        # run hundreds of estimates)
        return math.prod(self.shape)


def token_embedding(tensors: Sequence[ParamTensor]) -> ParamTensor | None:
    """The input token embedding: the first 2-D embedding tensor (position embeddings have their own role)."""
    return next((t for t in tensors if t.role == ROLE_EMBEDDING and len(t.shape) == 2), None)


def head_tied_to_embedding(tensors: Sequence[ParamTensor]) -> bool:
    """True when the output head reuses the token embedding's weight (named_parameters lists it once).

    An untied head is a vocabulary-sized Linear of its own; a head-side Linear of another size (BERT's MLM
    transform) does not count.
    """
    embedding = token_embedding(tensors)
    if embedding is None:
        return False
    vocab = embedding.shape[0]
    return not any(t.role == ROLE_LM_HEAD and t.is_linear_weight and t.shape[0] == vocab for t in tensors)


@dataclass(frozen=True, eq=False, repr=False)
class ModelConfig:
    """A model's config as data (never code): the raw ``config.json`` dict and where it came from."""

    name: str  # what the user typed, resolved (preset name, path, or hub id)
    raw: dict[str, Any]
    source: str  # provenance: preset _source, file path, or hub id
    aliases: tuple[str, ...] = field(default=())

