"""memcalc: how much GPU memory a training run takes, term by term, and whether it fits.

    import memcalc
    report = memcalc.estimate("llama-3-8b", precision="bf16", optim="adamw", gpu="h100-80gb")
    report.per_gpu.peak_bytes, report.per_gpu.peak_phase, report.fit.fits

``estimate``, ``compare``, ``verify``, ``layouts`` (the layout planner) and ``presets`` are ``memcalc.api``'s; the errors are ``memcalc.errors``'s.
They load on first use, so that ``import memcalc`` (and the command line) stays light; the estimate path
imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "estimate": "memcalc.api", "compare": "memcalc.api", "verify": "memcalc.api", "presets": "memcalc.api",
    "layouts": "memcalc.api",
    "Request": "memcalc.request", "Report": "memcalc.report",
    "MemcalcError": "memcalc.errors", "UsageError": "memcalc.errors", "ModelNotFoundError": "memcalc.errors",
    "ConfigError": "memcalc.errors", "UnsupportedModelError": "memcalc.errors",
    "MissingDependencyError": "memcalc.errors", "OutputError": "memcalc.errors",
}
__all__ = [
    "ConfigError", "MemcalcError", "MissingDependencyError", "ModelNotFoundError", "OutputError", "Report", "Request",
    "UnsupportedModelError", "UsageError", "__version__", "compare", "estimate", "layouts", "presets", "verify",
]

if TYPE_CHECKING:
    from memcalc.api import compare, estimate, layouts, presets, verify
    from memcalc.errors import (
        ConfigError,
        MemcalcError,
        MissingDependencyError,
        ModelNotFoundError,
        OutputError,
        UnsupportedModelError,
        UsageError,
    )
    from memcalc.report import Report
    from memcalc.request import Request


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memcalc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
