"""Shared test helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from memcalc.cli import main

REPO = Path(__file__).resolve().parent.parent
PRESETS_MODELS = REPO / "presets" / "models"


@pytest.fixture(autouse=True, scope="session")
def _trace_cache(tmp_path_factory):
    """Traced activations are cached in a folder of the test session, never in the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEMCALC_CACHE_DIR", str(tmp_path_factory.mktemp("memcalc-cache")))
    yield
    patch.undo()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys, monkeypatch) -> Callable[..., CliResult]:
    """Run the console-script entry point in-process: exit code, stdout and stderr apart."""
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.delenv("MEMCALC_DEBUG", raising=False)

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory statistics faked (tests/fake_cuda.py); skipped without torch."""
    pytest.importorskip("torch")
    from tests.fake_cuda import patch_cuda

    return patch_cuda(monkeypatch)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def in_ci() -> bool:
    return bool(os.environ.get("CI"))
