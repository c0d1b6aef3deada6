"""Units: the only definitions of GiB and GB, and parsing of user-typed sizes and counts.

GiB = 2**30 bytes (binary, what nvidia-smi's "MiB" and PyTorch's allocator use);
GB  = 10**9 bytes (decimal, what the seeds and vendors' datasheets use).
7e9 params x 4 B = 28.00 GB = 26.08 GiB (seed 000 shows both).
"""

from __future__ import annotations

import math
import re

from memcalc.errors import UsageError

BYTES_PER_KIB = 2**10
BYTES_PER_MIB = 2**20
BYTES_PER_GIB = 2**30
BYTES_PER_TIB = 2**40
BYTES_PER_KB = 10**3
BYTES_PER_MB = 10**6
BYTES_PER_GB = 10**9
BYTES_PER_TB = 10**12

# Element sizes as torch reports them (torch.finfo(dtype).bits // 8, torch.iinfo(torch.int64).bits // 8).
BYTES_PER_FP32 = 4
BYTES_PER_16BIT = 2
BYTES_PER_INT64 = 8

# Display units for --units: name -> bytes per unit.
DISPLAY_UNITS: dict[str, int] = {"gib": BYTES_PER_GIB, "gb": BYTES_PER_GB, "mib": BYTES_PER_MIB, "mb": BYTES_PER_MB}
UNIT_LABELS: dict[str, str] = {"gib": "GiB", "gb": "GB", "mib": "MiB", "mb": "MB"}

_SIZE_SUFFIXES: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": BYTES_PER_KIB,
    "mib": BYTES_PER_MIB,
    "gib": BYTES_PER_GIB,
    "tib": BYTES_PER_TIB,
    "kb": BYTES_PER_KB,
    "mb": BYTES_PER_MB,
    "gb": BYTES_PER_GB,
    "tb": BYTES_PER_TB,
}

_COUNT_SUFFIXES: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}

_NUMBER_WITH_SUFFIX = re.compile(r"^\s*([0-9][0-9_,]*\.?[0-9]*(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

# Nothing that trains on GPUs today is near this; it keeps arithmetic and rendering sane.
MAX_NUM_PARAMS = 10**15
MAX_SIZE_BYTES = 2**60


def _split_number(text: str, what: str, example: str) -> tuple[float, str, str]:
    if text.strip().startswith("-"):
        raise UsageError(f"{what} must be positive, got {text!r}; write it like {example}")
    match = _NUMBER_WITH_SUFFIX.match(text)
    if not match:
        raise UsageError(f"{what} {text!r} is not a number; write it like {example}")
    digits, suffix = match.group(1).replace("_", "").replace(",", ""), match.group(2).lower()
    try:
        value = float(digits)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number; write it like {example}") from None
    return value, suffix, digits


def _parse_scaled(text: str, what: str, example: str, suffixes: dict[str, int], limit: int, kind: str) -> int:
    value, suffix, _ = _split_number(text, what, example)
    if suffix not in suffixes:
        names = "K, M, B or T (e.g. 7B)" if kind == "count" else "GiB, GB, MiB or MB"
        raise UsageError(f"{what} {text!r} has an unknown {'suffix' if kind == 'count' else 'unit'} {suffix!r}; use {names}")
    scaled = value * suffixes[suffix]
    if not math.isfinite(scaled) or scaled <= 0:
        raise UsageError(f"{what} must be a positive {kind}, got {text!r}")
    if scaled > limit:
        raise UsageError(f"{what} {text!r} is larger than {limit:.0e}; check the number")
    whole = round(scaled)
    if whole < 1:  # '0.4' or '1e-9': positive, but no whole parameter or byte (0 would report 0 bytes, exit 0)
        unit = "parameters" if kind == "count" else "bytes"
        raise UsageError(f"{what} {text!r} is less than one {unit[:-1]} (it rounds to 0 {unit}); check the number")
    return whole


def parse_count(text: str, what: str = "{params}") -> int:
    """Parse a parameter count: ``7e9``, ``7B``, ``6.74B``, ``8030261248``, ``125M``."""
    return _parse_scaled(text, what, "7e9, 7B, 6.74B or 8030261248", _COUNT_SUFFIXES, MAX_NUM_PARAMS, "count")


def parse_size(text: str, what: str = "{gpu_memory}") -> int:
    """Parse a memory size into bytes: ``80GiB``, ``80GB``, ``24 GiB``, ``81559MiB``, ``85899345920``."""
    return _parse_scaled(text, what, "80GiB, 80GB or 81559MiB", _SIZE_SUFFIXES, MAX_SIZE_BYTES, "size")


def format_value(num_bytes: int, unit: str = "gib", digits: int = 2) -> str:
    """Integer bytes as a number in a display unit, for a column whose header names the unit: ``26.08``."""
    return f"{num_bytes / DISPLAY_UNITS[unit]:,.{digits}f}"


def format_bytes(num_bytes: int, unit: str = "gib", digits: int = 2) -> str:
    """Render integer bytes in a display unit, with the unit named: ``26.08 GiB``."""
    return f"{format_value(num_bytes, unit, digits)} {UNIT_LABELS[unit]}"


def format_count(count: int) -> str:
    """Human count: 8,030,261,248 -> ``8.03B``."""
    for divisor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            return f"{count / divisor:.2f}{suffix}"
    return str(count)
