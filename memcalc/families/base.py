"""What every family module is made of: the resolved config (``Arch``), the reader that resolves it, the limits
every dimension is held to, and the ``Family`` record the registry hands out.

A family module reads a ``config.json`` dict once, through ``Fields``: the transformers config class's defaults,
then the file's values, then the class's ``attribute_map`` aliases (``n_embd`` is ``hidden_size`` for GPT-2).
Everything downstream (the inventory, the activation rules, LoRA, DeepSpeed's "auto" buckets, verify's scaling)
reads the resolved ``Arch``, never the dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memcalc.datafile import shown
from memcalc.errors import ConfigError

if TYPE_CHECKING:
    from memcalc.families.saved import Rule, Run
    from memcalc.model import ParamTensor

# Head kinds: what sits around the base model in the class named by ``architectures[0]``.
CAUSAL_LM = "causal_lm"
BASE = "base"
SEQ_CLS = "seq_cls"

# Bounds on config values: far past every published model (the largest: hidden 18,432 (Nemotron-4 340B), 126
# layers (Llama-3.1-405B), 262,208 vocabulary entries (Gemma 3), 10M positions (Llama 4 Scout), 384 experts
# (Kimi K2)), near enough that arithmetic, rendering and a per-layer inventory stay instant.
MAX_HIDDEN = 2**17
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_INTERMEDIATE = 2**20
MAX_VOCAB = 2**23
MAX_POSITIONS = 2**27
MAX_EXPERTS = 4096
MAX_LABELS = 2**20


@dataclass(eq=False, repr=False, kw_only=True)
class Arch:
    """A model's config as its transformers class resolves it. Family modules subclass it with their own fields.

    head_dim: the per-head width q/k use; intermediate_size: the dense MLP width (0 where a family has none);
    max_positions: positions the model was built for (None when the config does not bound them);
    learned_positions: position embeddings are a trained table, so a longer sequence cannot run at all;
    dropout: the non-zero dropout probabilities, by config key; supports_sdpa: the class has an sdpa path.
    """

    model_type: str
    architecture: str
    head: str  # what the family's builder is told: a head kind above, or the class name itself (BERT, T5)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_labels: int = 2  # sequence-classification heads
    max_positions: int | None = None
    learned_positions: bool = False
    norm: str = "rmsnorm"  # rmsnorm | gemma_rmsnorm | layernorm | t5_layernorm
    hidden_act: str = "silu"
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    dropout: Mapping[str, float] = field(default_factory=dict)
    # PreTrainedModel._supports_sdpa of the model class: where False (Gemma2: sdpa cannot softcap), transformers runs
    # eager attention unless flash_attention_2 is asked for.
    supports_sdpa: bool = True
    # An encoder-decoder whose rule reads the decoder's own length (Run.decoder_s, --decoder-seq-len): T5.
    encoder_decoder: bool = False


@dataclass(eq=False, repr=False)
class Family:
    """Everything memcalc knows about one model_type.

    heads: transformers class name -> what ``inventory`` is told (the first is used when config.json names none);
    resolve: (config dict, class name) -> Arch; inventory: Arch -> the exact parameter tensors;
    activations: (Arch, Run) -> what the forward saves for backward; lora_targets: PEFT's default target modules
    (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), None when PEFT has none;
    conv1d: the matmul weights are transformers' Conv1D, stored (in, out).
    """

    model_type: str
    heads: Mapping[str, str]
    resolve: Callable[[Mapping[str, Any], str], Arch]
    inventory: Callable[[Arch], list[ParamTensor]] | None  # None: the generic family (transformers builds it)
    activations: Callable[[Arch, Run], Rule]
    lora_targets: tuple[str, ...] | None = None
    conv1d: bool = False
    # Config switches that add tensors the inventory does not list; such configs go to the transformers build.
    unmodelled_switches: tuple[str, ...] = ()
    # Under checkpointing, eager attention's 4-D causal mask is an argument every layer keeps (decoders built on
    # masking_utils.create_causal_mask); BERT has no mask without padding and T5 counts its own with its biases.
    checkpoint_keeps_causal_mask: bool = True
    # Whether the activations rule counts --repeat-kv (k and v repeated to every query head before sdpa).
    counts_repeat_kv: bool = False
    # Whether the activations rule counts --padded (every layer's sdpa given the batch's padding mask).
    counts_padding: bool = False
    # Whether the rules follow more than one transformers release (a rewrite of the family's code): the estimate then
    # reads the installed release (Run.transformers).
    release_dependent: bool = False


def _shown(value: Any) -> str:
    return shown(repr(value), 60)


class Fields:
    """Config values as the transformers config class sees them: its defaults, then config.json.

    ``aliases`` maps a key transformers also accepts to the field it sets (the class's ``attribute_map``, or a
    key its ``__post_init__`` pops); such a key wins over the field, as there.
    """

    def __init__(self, raw: Mapping[str, Any], defaults: Mapping[str, Any],
                 aliases: Mapping[str, str] | None = None) -> None:
        self.raw = raw
        self.c: dict[str, Any] = {**defaults, **raw}
        for alias, field_name in (aliases or {}).items():
            if raw.get(alias) is not None:
                self.c[field_name] = raw[alias]

    def given(self, key: str) -> bool:
        return self.c.get(key) is not None

    def dim(self, key: str, high: int, low: int = 1) -> int:
        """A whole number between ``low`` and ``high``; anything else is a ConfigError naming the field."""
        value = self.c.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"config field {key!r} must be a whole number from {low} to {high:,}, got "
                              f"{_shown(value)}; check the config")
        return value

    def dim_or(self, key: str, default: int, high: int, low: int = 1) -> int:
        """``getattr(config, key, None) or default``: a missing or null key falls back."""
        return self.dim(key, high, low) if self.c.get(key) is not None else default

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.c.get(key)
        if value is None:
            return default
        if isinstance(value, int):  # JSON true/false, and 0/1 as some configs write them
            return bool(value)
        raise ConfigError(f"config field {key!r} must be true or false, got {_shown(value)}")

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.c.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"config field {key!r} must be a number, got {_shown(value)}")
        return float(value)

    def probability(self, key: str, default: float = 0.0) -> float:
        value = self.number(key, default)
        assert value is not None
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config field {key!r} is a probability between 0 and 1, got {_shown(value)}")
        return value

    def text(self, key: str, default: str = "") -> str:
        value = self.c.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(f"config field {key!r} must be a string, got {_shown(value)}")
        return value

    def int_list(self, key: str, high: int) -> tuple[int, ...]:
        value = self.c.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config field {key!r} must be a list of whole numbers, got {_shown(value)}")
        if any(not 0 <= v <= high for v in value):
            raise ConfigError(f"config field {key!r} holds a value outside 0..{high:,}; check the config")
        return tuple(value)

    def dropouts(self, defaults: Mapping[str, float]) -> dict[str, float]:
        """The dropout probabilities the family's modules read, with their class defaults, non-zero ones only."""
        found = {}
        for key, default in defaults.items():
            value = self.probability(key, default)
            if value > 0:
                found[key] = value
        return found

    def heads(self, heads_key: str = "num_attention_heads", kv_key: str | None = "num_key_value_heads"
              ) -> tuple[int, int]:
        """(query heads, key/value heads); the key/value heads must divide the query heads (repeat_kv)."""
        num_heads = self.dim(heads_key, MAX_HEADS)
        num_kv = self.dim_or(kv_key, num_heads, MAX_HEADS) if kv_key else num_heads
        if num_heads % num_kv:
            raise ConfigError(f"config field {kv_key!r} ({num_kv}) must divide {heads_key!r} ({num_heads}): "
                              "each key/value head serves a whole group of query heads")
        return num_heads, num_kv

    def head_dim(self, hidden: int, num_heads: int, default: int | None = None, key: str | None = "head_dim") -> int:
        """``head_dim`` when given, else the class's default (hidden_size // num_attention_heads); families without
        the field (``key`` None) always split the hidden size."""
        fallback = hidden // num_heads if default is None else default
        value = self.dim_or(key, fallback, MAX_HEAD_DIM, low=0) if key else fallback
        if value == 0:
            raise ConfigError(f"head_dim is 0 (hidden_size {hidden} / {num_heads} heads); check the config")
        return value

    def num_labels(self) -> int:
        """PreTrainedConfig: ``num_labels`` if given, else ``len(id2label)``, else 2."""
        if self.c.get("num_labels") is not None:
            return self.dim("num_labels", MAX_LABELS)
        if isinstance(self.c.get("id2label"), dict):
            return len(self.c["id2label"])
        return 2
