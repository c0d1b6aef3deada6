"""The catalog of presets: model configs (``presets/models/*.json``) and GPU specs (``presets/gpus.json``).

Presets are data in the Hugging Face ``config.json`` vocabulary plus ``_source`` (the upstream config they
copy) and ``_aliases`` (names users type); a preset of a model type without hand rules also states ``_num_params``
(its meta-device count, checked by tests/test_inventory_exact.py) so that listing presets needs no torch. A preset
and a user's own config go through one parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from memcalc.datafile import read_json_object, shown
from memcalc.errors import ConfigError, UsageError
from memcalc.units import BYTES_PER_MIB

__all__ = [
    "GpuSpec", "find_gpu", "find_model_preset", "gpu_alias_note", "gpu_presets", "load_model_preset",
    "model_preset_files", "normalize_name", "presets_dir", "suggest",
]


def presets_dir() -> Path:
    """The presets folder: packaged inside the wheel as ``memcalc/_presets``, or the repository's ``presets/``."""
    packaged = Path(__file__).resolve().parent / "_presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "presets"


def normalize_name(name: str) -> str:
    """Lookup key: case-insensitive, ``_`` and spaces read as ``-``."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


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
        for alias in read_json_object(path, "model preset").get("_aliases", []):
            index.setdefault(normalize_name(alias), name)
    return index


def find_model_preset(name: str) -> str | None:
    """The preset a user-typed name or alias refers to, or None.

    A preset's own name is found from its file name alone; only aliases need every preset read (a few ms
    of the start-up budget).
    """
    key = normalize_name(name)
    if key in model_preset_files():  # a folder listing, never a path built from user text
        return key
    return _model_alias_index().get(key)


def load_model_preset(preset_name: str) -> dict[str, Any]:
    return read_json_object(model_preset_files()[preset_name], "model preset")


def suggest(name: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Closest candidates to a mistyped name."""
    import difflib  # only on the error path

    key = normalize_name(name)
    by_key = {normalize_name(c): c for c in candidates}
    matches = difflib.get_close_matches(key, list(by_key), n=limit, cutoff=0.5)
    if not matches:  # prefix / substring fallback: "llama" -> llama-2-7b, ...
        matches = [k for k in by_key if key and (k.startswith(key) or key in k)][:limit]
    return [by_key[m] for m in matches]


@dataclass(eq=False, repr=False)
class GpuSpec:
    name: str
    display: str
    nominal: str
    memory_bytes: int
    source: str
    aliases: tuple[str, ...] = ()
    compute_capability: str | None = None  # "9.0"; a ROCm gfx target for AMD cards
    interconnect: str | None = None  # how one node's cards are joined: nvswitch, nvlink, pcie, xgmi (memcalc.nccl)
    sms: int | None = None  # streaming multiprocessors (NVIDIA cards): the CUDA context's per-thread part (memcalc.fit)

    def lookup_keys(self) -> frozenset[str]:
        """Every lookup key this card answers to: its name and its aliases, normalized."""
        return frozenset(normalize_name(n) for n in (self.name, *self.aliases))


@lru_cache(maxsize=1)
def gpu_presets() -> tuple[GpuSpec, ...]:
    path = presets_dir() / "gpus.json"
    data = read_json_object(path, "GPU preset file")
    try:
        gpus = tuple(
            GpuSpec(
                name=entry["name"],
                display=entry["display"],
                nominal=entry["nominal"],
                memory_bytes=int(entry["memory_mib"]) * BYTES_PER_MIB,
                source=entry["_source"],
                aliases=tuple(entry.get("aliases", ())),
                compute_capability=entry.get("compute_capability"),
                interconnect=entry.get("interconnect"),
                sms=int(entry["sms"]) if entry.get("sms") is not None else None,
            )
            for entry in data["gpus"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{shown(path)} has a malformed GPU entry ({type(exc).__name__}: {shown(exc)}); "
                          "reinstall memcalc") from None
    return gpus


def find_gpu(name: str) -> GpuSpec:
    """The GPU a user-typed name or alias refers to (case, ``_`` and spaces ignored)."""
    key = normalize_name(name)
    if not key:
        raise UsageError("the GPU name is empty; see 'memcalc presets' for the list, or give {gpu_memory} 80GiB")
    for gpu in gpu_presets():
        if key in gpu.lookup_keys():
            return gpu
    names = [gpu.name for gpu in gpu_presets()]
    hint = suggest(name, names)
    did_you_mean = f"did you mean {', '.join(hint)}? " if hint else ""
    raise UsageError(
        f"unknown GPU '{shown(name)}'; {did_you_mean}see 'memcalc presets' for the list, or give {{gpu_memory}} 80GiB"
    )


def gpu_alias_note(name: str) -> str | None:
    """One sentence when ``name`` is an alias that several cards could answer to, naming the card it picked
    and the others; None when the name is exact or unambiguous.

    A typed name is ambiguous when it is an alias (not the card's own name) and it is the first word of
    another card's name or alias with a different memory size: ``a100`` is both ``a100-40gb`` and
    ``a100-80gb``. Cards of the same size (``h100`` SXM and PCIe) do not change the answer, so no note.
    """
    key = normalize_name(name)
    if not key:
        return None
    picked = next((gpu for gpu in gpu_presets() if key in gpu.lookup_keys()), None)
    if picked is None or key == normalize_name(picked.name):
        return None
    others = [
        gpu for gpu in gpu_presets()
        if gpu is not picked and gpu.memory_bytes != picked.memory_bytes
        and any(k.startswith(f"{key}-") for k in gpu.lookup_keys())
    ]
    if not others:
        return None
    rest = "; ".join(f"the {_capacity(gpu)} card is {gpu.name}" for gpu in others)
    return f"'{shown(name)}' is the {picked.display} ({picked.name}); {rest}"


def _capacity(gpu: GpuSpec) -> str:
    """'80 GB' from the datasheet capacity ``nominal`` ("80 GB HBM2e")."""
    return " ".join(gpu.nominal.split()[:2])


@dataclass(eq=False, repr=False)
class ModelPreset:
    name: str
    model_type: str
    num_params: int
    aliases: tuple[str, ...]
    source: str


@dataclass(eq=False, repr=False)
class Presets:
    """The model presets (exact parameter counts from their inventories) and the GPU presets."""

    models: list[ModelPreset]
    gpus: list[GpuSpec]
