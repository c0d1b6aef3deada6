"""Preset discovery: model configs (``presets/models/*.json``) and GPU specs (``presets/gpus.json``).

Presets are data in the Hugging Face ``config.json`` vocabulary plus ``_source`` (the upstream config they
copy) and ``_aliases`` (names users type). A preset and a user's own config go through one parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from memcalc.errors import ConfigError, UsageError
from memcalc.units import BYTES_PER_MIB


def presets_dir() -> Path:
    """The presets folder: packaged inside the wheel as ``memcalc/_presets``, or the repository's ``presets/``."""
    packaged = Path(__file__).resolve().parent / "_presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "presets"


def normalize_name(name: str) -> str:
    """Lookup key: case-insensitive, ``_`` and spaces read as ``-``."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def read_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON object from a file, as data (never executed)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}; check the path and its permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object (a config.json), not a {type(data).__name__}")
    return data


@lru_cache(maxsize=1)
def model_preset_files() -> dict[str, Path]:
    """Preset name -> file, for every ``presets/models/*.json``."""
    folder = presets_dir() / "models"
    return {path.stem: path for path in sorted(folder.glob("*.json"))}


@lru_cache(maxsize=1)
def _model_alias_index() -> dict[str, str]:
    """Normalized name or alias -> preset name."""
    index: dict[str, str] = {}
    for name, path in model_preset_files().items():
        index[normalize_name(name)] = name
        for alias in read_json_object(path).get("_aliases", []):
            index.setdefault(normalize_name(alias), name)
    return index


def find_model_preset(name: str) -> str | None:
    """The preset a user-typed name or alias refers to, or None.

    A preset's own name is found from its file name alone; only aliases need every preset read (a few ms
    of the start-up budget).
    """
    key = normalize_name(name)
    if (presets_dir() / "models" / f"{key}.json").is_file():
        return key
    return _model_alias_index().get(key)


def load_model_preset(preset_name: str) -> dict[str, Any]:
    return read_json_object(model_preset_files()[preset_name])


def suggest(name: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Closest candidates to a mistyped name."""
    import difflib  # only on the error path

    key = normalize_name(name)
    by_key = {normalize_name(c): c for c in candidates}
    matches = difflib.get_close_matches(key, list(by_key), n=limit, cutoff=0.5)
    if not matches:  # prefix / substring fallback: "llama" -> llama-2-7b, ...
        matches = [k for k in by_key if key and (k.startswith(key) or key in k)][:limit]
    return [by_key[m] for m in matches]


@dataclass(frozen=True, eq=False, repr=False)
class GpuSpec:
    name: str
    display: str
    nominal: str
    memory_bytes: int
    source: str
    aliases: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def gpu_presets() -> tuple[GpuSpec, ...]:
    data = read_json_object(presets_dir() / "gpus.json")
    return tuple(
        GpuSpec(
            name=entry["name"],
            display=entry["display"],
            nominal=entry["nominal"],
            memory_bytes=int(entry["memory_mib"]) * BYTES_PER_MIB,
            source=entry["_source"],
            aliases=tuple(entry.get("aliases", ())),
        )
        for entry in data["gpus"]
    )


def find_gpu(name: str) -> GpuSpec:
    key = normalize_name(name)
    for gpu in gpu_presets():
        if key == normalize_name(gpu.name) or key in {normalize_name(a) for a in gpu.aliases}:
            return gpu
    names = [gpu.name for gpu in gpu_presets()]
    hint = suggest(name, names)
    did_you_mean = f"did you mean {', '.join(hint)}? " if hint else ""
    raise UsageError(
        f"unknown GPU '{name}'; {did_you_mean}see 'memcalc presets' for the list, or give --gpu-memory 80GiB"
    )
