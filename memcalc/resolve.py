"""MODEL argument -> ModelConfig: a preset name or alias, a config.json path, a model folder, or a hub id.

Configs are data: read with the standard library, never through ``trust_remote_code``. Hub ids fetch
``config.json`` only (never weights) through huggingface_hub, imported lazily, with a short timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

from memcalc.errors import ConfigError, ModelNotFoundError
from memcalc.model import ModelConfig
from memcalc.presets import find_model_preset, load_model_preset, model_preset_files, read_json_object, suggest

# Seconds to wait for the hub before giving up (huggingface_hub's own default etag timeout is 10 s).
HUB_TIMEOUT_SECONDS = 10


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or text.startswith((".", "/", "~")) or os.sep in text and Path(text).exists()


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.endswith(".json")


def resolve_model(reference: str) -> ModelConfig:
    """Resolve what the user typed. Order: existing path, preset (and its aliases), hub id."""
    path = Path(reference).expanduser()
    if path.exists():
        return _from_path(path, reference)
    preset = find_model_preset(reference)
    if preset is not None:
        raw = load_model_preset(preset)
        return ModelConfig(
            name=preset, raw=raw, source=str(raw.get("_source", f"preset {preset}")),
            aliases=tuple(raw.get("_aliases", ())),
        )
    if _looks_like_path(reference):
        raise ModelNotFoundError(f"no such file or folder: {reference}; give a config.json path or a preset name")
    if _looks_like_hub_id(reference):
        return _from_hub(reference)
    hint = suggest(reference, list(model_preset_files()))
    did_you_mean = f"did you mean {', '.join(hint)}? " if hint else ""
    raise ModelNotFoundError(
        f"unknown model '{reference}'; {did_you_mean}run 'memcalc presets' for the list, "
        "or give a config.json path or --params 7B"
    )


def _from_path(path: Path, reference: str) -> ModelConfig:
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{path} has no config.json; point MODEL at the config file or the model folder holding it")
        path = config_path
    raw = read_json_object(path)
    _check_config(raw, path)
    return ModelConfig(name=reference, raw=raw, source=str(path))


def _check_config(raw: dict, where: object) -> None:
    if "model_type" not in raw and "text_config" not in raw:
        raise ConfigError(
            f"{where} has no 'model_type'; memcalc reads Hugging Face config.json files (or use --params 7B)"
        )


def _from_hub(repo_id: str) -> ModelConfig:
    """Fetch only config.json of a hub repo (honours HF_HUB_OFFLINE and the local HF cache)."""
    try:
        import huggingface_hub  # lazy: only hub ids need it
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ModelNotFoundError(
            f"'{repo_id}' looks like a hub id but huggingface_hub is not installed; "
            "pip install huggingface_hub, or use a preset name or a local config.json"
        ) from None
    try:
        local = huggingface_hub.hf_hub_download(repo_id, "config.json", etag_timeout=HUB_TIMEOUT_SECONDS)
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise ModelNotFoundError(
            f"hub repo '{repo_id}' has no config.json or does not exist (or is gated); "
            "check the id, or download config.json and pass its path"
        ) from None
    except Exception as exc:  # offline, timeout, DNS: one line, never a traceback
        reason = type(exc).__name__
        raise ModelNotFoundError(
            f"could not fetch config.json of '{repo_id}' from the hub ({reason}); "
            "you may be offline: use a preset name (memcalc presets) or a local config.json path"
        ) from None
    raw = read_json_object(Path(local))
    _check_config(raw, repo_id)
    return ModelConfig(name=repo_id, raw=raw, source=f"{repo_id} config.json (hub)")
