"""What memcalc derived by running transformers' code (a traced forward, a meta-device inventory), kept as JSON in
the user's cache directory so that a repeat reads a file and imports neither torch nor transformers.

An entry's key is a hash of everything its content depends on: the config's content (memcalc's own "_" metadata
left out, transformers' own "_" fields kept), the settings given, and the versions of torch and transformers (read from the installed packages'
metadata, without importing them). A bad or missing entry is computed again; one that cannot be written costs a
recomputation next time, nothing else. Standard library only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CACHE_ENV = "MEMCALC_CACHE_DIR"


@functools.cache
def version_of(name: str) -> str:
    """An installed package's version, from its metadata ('' when it is absent); read once per process (every cache
    key asks, and the metadata lookup walks the installed packages)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def versions() -> dict[str, str]:
    """torch's and transformers' versions, from their installed metadata ('' when one is absent)."""
    return {name: version_of(name) for name in ("torch", "transformers")}


def cache_dir() -> Path:
    """$MEMCALC_CACHE_DIR, else $XDG_CACHE_HOME/memcalc, else ~/.cache/memcalc."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "memcalc")
    return Path(base)


def key_of(raw: Mapping[str, Any], fmt: int, **settings: Any) -> str:
    """The key of an entry derived from ``raw`` with ``settings``, in format ``fmt`` of its kind."""
    from memcalc.measure.build import TRANSFORMERS_UNDERSCORE_FIELDS  # (a constant: no torch)

    config = {k: v for k, v in raw.items() if not k.startswith("_") or k in TRANSFORMERS_UNDERSCORE_FIELDS}
    payload = json.dumps({"config": config, "settings": settings, "versions": versions(), "format": fmt},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def read(kind: str, key: str) -> dict[str, Any] | None:
    """The entry, or None when it is absent or unreadable."""
    try:
        data = json.loads((cache_dir() / kind / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_as(kind: str, key: str, fmt: int, parse: Callable[[dict[str, Any]], T]) -> T | None:
    """The entry of format ``fmt`` parsed, or None when it is absent, of another format or of another shape."""
    data = read(kind, key)
    if data is None or data.get("format") != fmt:
        return None
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError):
        return None


def write(kind: str, key: str, data: Mapping[str, Any]) -> None:
    """Write the entry atomically (a temporary file renamed), or nothing when the folder is not writable."""
    folder = cache_dir() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{key}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(data), encoding="utf-8")
        temporary.replace(folder / f"{key}.json")
    except OSError:
        pass
