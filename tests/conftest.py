"""Shared test helpers."""

from __future__ import annotations

import gc
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from memcalc.cli import main

# One intra-op thread per test process (set before torch is first imported): the suite runs two xdist workers on the
# machine's two cores, and torch's default of a thread per core in each worker oversubscribes them (OpenMP's waiting
# threads spin). The gloo ranks set the same (memcalc.measure.distributed). What a step allocates does not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
PRESETS_MODELS = REPO / "presets" / "models"
# A folder of this test run that every xdist worker sees (shared_measurement)
SHARED_ENV = "MEMCALC_TEST_SHARED_DIR"
T = TypeVar("T")


@pytest.fixture(autouse=True, scope="session")
def _trace_cache(tmp_path_factory):
    """Traced activations are cached in a folder of the test run, never in the user's cache. The run's workers share
    it (memcalc.cache writes each entry whole, by a rename), so a trace two workers' tests need is made once."""
    patch = pytest.MonkeyPatch()
    # Under xdist each worker's base folder is one of the run's (pytest-N/popen-gwK): their parent is the run's own.
    run_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_dir = run_dir.parent
    (run_dir / "memcalc-cache").mkdir(exist_ok=True)
    patch.setenv("MEMCALC_CACHE_DIR", str(run_dir / "memcalc-cache"))
    patch.setenv(SHARED_ENV, str(run_dir))
    yield
    patch.undo()


def shared_measurement(key: str, make: Callable[[], T]) -> T:
    """``make()`` once per test run, whichever xdist worker asks first; the others wait for it and read its result
    (pickled). For a measurement several tests check, so that splitting those tests over the workers (pytest-xdist
    hands out tests, not files) does not measure it once per worker; ``-n 0`` measures it once as before."""
    from filelock import FileLock  # (a dependency of torch, which every such measurement needs)

    path = Path(os.environ[SHARED_ENV]) / "shared-measurements" / f"{key}.pickle"
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = make()
        path.write_bytes(pickle.dumps(value))
        return value


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


def pytest_collection_finish(session) -> None:
    """The cyclic collector, for a test run: once the tests are collected, torch and transformers are imported (where
    installed: every worker needs them for its first trace anyway) and what exists then moves to the collector's
    permanent generation (``gc.freeze``). A worker holding torch and transformers has some millions of objects, which
    each full collection (Python's own, and the tests' ``gc.collect()``) walked again: a seventh of a tracing test's
    time went to the collector. What the tests make is collected as before, and as often. (Running the collector a
    tenth as often, gc.set_threshold(10_000, 20, 20), made the Qwen2-MoE cell of tests/test_tensor_parallel_moe.py's
    gloo ranks fail 3 times in 12: which rank peaks highest changed. Without it, 16 of 16 passed.)"""
    import importlib.util

    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    gc.freeze()


def load_log(raw: dict, spec, nf4: bool = False, upcast: bool = False):
    """The tracker's log of what exists before a traced step (memcalc.measure.step._register_existing: the weights'
    build and load, then the rest), for ``raw`` under ``spec``: (events, how many are the weights' build and load,
    the model built)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memcalc.measure import build
    from memcalc.measure import step as measured
    from memcalc.measure import tracker as trk

    setup = measured.resolve_setup(spec, traced=True)
    with FakeTensorMode(allow_non_fake_inputs=True), build.quiet_fake_tensor_log():
        model = measured.build_model(raw, setup)
        batch, _ = measured.make_batch(model, setup)
        log = trk.MemoryTracker()
        log.events = []
        loaded = measured._register_existing(log, model, measured.Stepper(model, setup), batch, nf4=nf4, upcast=upcast)
    return log.events, loaded, model
