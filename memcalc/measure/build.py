"""One way from a ``config.json`` dict to a transformers config and model, for everything that builds one: the
meta-device inventory of unmodelled families, ``--verify``'s steps, the trace-derived checks and the scripts.

Configs are data: the model class is looked up only among the classes transformers' auto mappings list for the
config's model_type (a config naming ``set_seed`` or ``Trainer`` is refused), never through remote code, and
nothing is downloaded (random weights). torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from memcalc.datafile import shown
from memcalc.errors import ConfigError, UnsupportedModelError

# Loggers that speak when transformers' model modules import torchao (as they do when it is installed): torchao's
# list of the CUDA kernels a CPU build lacks, torch's pytree a deprecation torchao triggers. Raised to ERROR where
# the user left them unset, before anything here imports transformers; nothing memcalc reports comes through them.
IMPORT_TIME_LOGGERS = ("torchao", "torch.utils._pytree")
for _name in IMPORT_TIME_LOGGERS:
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)

# Keys starting with "_" are memcalc metadata (_source, _aliases, ...), except these transformers fields.
TRANSFORMERS_UNDERSCORE_FIELDS = frozenset({"_remove_final_layer_norm"})  # OPTConfig


def config_fields(raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model_type, the other config.json keys) as ``AutoConfig.for_model`` takes them."""
    fields = {k: v for k, v in raw.items() if not k.startswith("_") or k in TRANSFORMERS_UNDERSCORE_FIELDS}
    model_type = fields.pop("model_type", None)
    if not model_type or not isinstance(model_type, str):
        raise ConfigError("config has no model_type; add the model_type of its transformers config class")
    return model_type, fields


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings (unused keys, defaults) and progress bars (a load's) off while memcalc builds from a
    config."""
    import transformers

    previous = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        if bars:
            transformers.logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_logger(name: str, level: int) -> Iterator[None]:
    """The logger ``name`` (and those under it) raised to ``level`` while the block runs."""
    import logging

    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def quiet_fake_tensor_log():
    """FakeTensorMode logs a failing op (a storage too large to address, say) at ERROR before raising; the caller
    reports the failure in one line, so the log stays quiet."""
    import logging

    return quiet_logger("torch._subclasses.fake_tensor", logging.CRITICAL)


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers: the ModuleList holding the most parameters."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def quiet_bitsandbytes():
    """bitsandbytes (imported by peft) logs a warning at import when its optional CPU kernels package is absent
    (backends/cpu/ops.py): not the user's business, so its loggers stay at ERROR while it loads."""
    import logging

    return quiet_logger("bitsandbytes", logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(exc).__name__


def hf_config(raw: Mapping[str, Any]) -> Any:
    """The transformers config for a config.json dict."""
    import transformers

    model_type, fields = config_fields(raw)
    if model_type not in transformers.CONFIG_MAPPING:
        raise UnsupportedModelError(f"transformers {transformers.__version__} does not know model_type "
                                    f"{model_type!r}; memcalc never runs a model's remote code")
    with quiet_transformers():
        try:
            return transformers.AutoConfig.for_model(model_type, **fields)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"transformers rejects this {model_type} config: {_first_line(exc)}") from None


def classes_of(config: Any) -> dict[str, type]:
    """Every model class transformers' auto mappings give for this config's type (causal LM first, then the base
    model, then the rest), by class name. Classes come from the mappings themselves, never from a name looked up
    in ``transformers``: a config's ``architectures`` can only pick among them."""
    return dict(_classes_of_type(type(config)))


@functools.cache
def _classes_of_type(config_type: type) -> dict[str, type]:
    """classes_of, by the config's class: the auto mappings look a class up by a search of every config class they
    know (some forty mappings, each some hundreds of classes), which a trace's build asked for several times."""
    from transformers.models.auto import modeling_auto

    keys = ["MODEL_FOR_CAUSAL_LM_MAPPING", "MODEL_MAPPING"]
    keys += sorted(key for key in vars(modeling_auto) if key.startswith("MODEL_") and key.endswith("_MAPPING"))
    found: dict[str, type] = {}
    for key in keys:
        mapping = vars(modeling_auto).get(key)
        if not hasattr(mapping, "_model_mapping"):
            continue
        try:
            value = mapping[config_type]
        except (KeyError, ValueError, ImportError, AttributeError):
            continue  # this kind of head does not exist for the model type
        for cls in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(cls, type):
                found.setdefault(cls.__name__, cls)
    return found


def model_class(config: Any, architecture: str | None = None) -> type:
    """The class named by ``architecture`` (the config's ``architectures[0]`` when not given), which must be one of
    the model classes of the config's model_type; without a name, its causal-LM class (else its base class)."""
    import transformers

    model_type = config.model_type
    allowed = classes_of(config)
    names = list(getattr(config, "architectures", None) or [])
    name = architecture or (names[0] if names else None)
    if not allowed:
        raise UnsupportedModelError(f"transformers {transformers.__version__} has no model class for {model_type!r}")
    if name is None:
        return next(iter(allowed.values()))
    if name not in allowed:
        named = name if len(name) <= 60 and name.isidentifier() else shown(repr(name), 60)
        raise ConfigError(f"architectures[0] {named} is not a transformers model class of model_type {model_type!r} "
                          f"(its classes: {', '.join(list(allowed)[:4])}); fix the config's architectures")
    return allowed[name]


def sdpa_supported(raw: Mapping[str, Any], architecture: str | None = None) -> bool:
    """Whether transformers' class for this config has an sdpa path (``PreTrainedModel._supports_sdpa``; where it
    is False, as for gpt-oss, asking for sdpa is an error and training runs eager attention)."""
    return bool(getattr(model_class(hf_config(raw), architecture), "_supports_sdpa", True))


def _untie_output_embeddings(model: Any, raw: Mapping[str, Any]) -> None:
    """Untie lm_head where config.json says ``tie_word_embeddings: false`` but the class ties anyway.

    T5Config forces tie_word_embeddings=True, so a model built from a config ties lm_head to the
    embeddings; from_pretrained unties it again when the checkpoint holds a separate lm_head
    (t5-v1_1, flan-t5). We follow from_pretrained: that is the model that trains.
    """
    import torch

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if raw.get("tie_word_embeddings") is False and out is not None and inp is not None and out.weight is inp.weight:
        out.weight = torch.nn.Parameter(torch.empty_like(out.weight))


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


SDPA_REPEAT_KV = "sdpa-repeat-kv"  # --repeat-kv: sdpa with k and v first repeated to every query head


def _register_sdpa_repeat_kv() -> None:
    """transformers' sdpa attention taking its repeat_kv path (integrations/sdpa_attention.py: when
    use_gqa_in_sdpa is False, k and v are expanded to every query head and made contiguous before sdpa, which saves
    them), registered as an attention implementation of its own: what torchtune's MultiHeadAttention.forward does
    (``k.unsqueeze(2).expand(...).flatten(1, 2)``), and transformers before sdpa's enable_gqa."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations import sdpa_attention
    from transformers.masking_utils import sdpa_mask

    def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
        use_gqa = sdpa_attention.use_gqa_in_sdpa
        sdpa_attention.use_gqa_in_sdpa = lambda *_args, **_kwargs: False
        try:
            return sdpa_attention.sdpa_attention_forward(module, *args, **kwargs)
        finally:
            sdpa_attention.use_gqa_in_sdpa = use_gqa

    AttentionInterface.register(SDPA_REPEAT_KV, forward)
    AttentionMaskInterface.register(SDPA_REPEAT_KV, sdpa_mask)


def build_model(raw: Mapping[str, Any], architecture: str | None = None, *, dtype: Any = None,
                attn_implementation: str | None = None, meta: bool = False, device: str | None = None) -> Any:
    """The transformers model for ``raw`` with random weights: on the meta device (``meta``: no memory), on
    ``device`` (a GPU: initialised there, no host copy), or as tensors of the current mode (real CPU tensors, or fake
    ones under a FakeTensorMode). ``dtype``: the weights' dtype, also set as the default dtype while building so
    nothing is created in fp32 and cast afterwards."""
    import torch

    config = hf_config(raw)
    cls = model_class(config, architecture)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
        if attn_implementation == SDPA_REPEAT_KV:
            _register_sdpa_repeat_kv()
    if dtype is not None:
        kwargs["dtype"] = dtype
    place = torch.device("meta") if meta else torch.device(device) if device else contextlib.nullcontext()
    with quiet_transformers(), default_dtype(dtype or torch.get_default_dtype()), place:
        try:
            model = cls._from_config(config, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, AttributeError) as exc:
            raise ConfigError(f"transformers cannot build {cls.__name__} from this config: {_first_line(exc)}") from None
    _untie_output_embeddings(model, raw)
    return model


def build_meta_model(raw: Mapping[str, Any], architecture: str | None = None) -> Any:
    """The model for ``raw`` on the meta device: shapes and dtypes, no memory."""
    return build_model(raw, architecture, meta=True)
