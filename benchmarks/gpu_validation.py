"""GPU validation: the estimate and the caching-allocator replay against real steps on a CUDA GPU.

    python benchmarks/gpu_validation.py [--out docs/accuracy-gpu.md] [--budget 540] [--quick]

One prepared script for a lent GPU (issue 15): it finishes inside ``--budget`` seconds (default 9 minutes), runs
what it can in that time, most informative first, and writes what it measured with the device, driver, torch and
CUDA versions and the allocator settings. Each configuration runs ``--verify``'s CUDA step (memcalc.measure.cuda: a
warm-up step, then the measured step with torch.cuda's peak statistics read per phase and the garbage collector off)
and is put beside:
  - the estimate (memcalc's peak: live tensors) against ``requested_bytes.all.peak`` (the tensors' own bytes; target
    1%) and ``max_memory_allocated`` (blocks: rounding included);
  - the replay of the measured step's own allocations through memcalc.allocator against
    ``reserved_bytes.all.peak`` (target 5%), with ``num_alloc_retries`` and ``num_ooms``.
It also reads the CUDA context (device memory in use less what the allocator reserved, after the first kernel).

The configurations: presets at realistic sizes first (Llama-3.2-1B, Qwen2.5-0.5B, Llama-3-8B with LoRA and in full
with checkpointing), then the recipes issue 13 modelled from code a CPU cannot run for real (activation offloading's
CUDA streams; each decoder layer compiled by Inductor's Triton backend; torchao float8 Linear layers, compiled as
torchtitan runs them), then the CPU accuracy matrix's small models (benchmarks/accuracy.py), and last Liger's fused
linear cross-entropy (its patch of transformers' Llama classes lasts for the process). The compiled, float8 and Liger rows run the real libraries, so they are measured by the
allocator's statistics alone (no tracker, no replay). A configuration that fails (an OOM, a missing package) is a row
saying so; the script goes on.

On this workplace's lent GPU machine (torch and transformers are its own; torchao and Liger travel as wheels, fetched
here with ``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
torchao==0.18.0 liger-kernel`` into a folder .git/info/exclude ignores, carried as ``.whl``):

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu_validation.py --budget 470 --cli --out $OUT/accuracy-gpu.md --raw $OUT

(memcalc's estimate and a measured step were checked on CPU under transformers 5.17, that machine's release.)

Without a GPU, ``--device cpu`` runs the same bookkeeping on CPU tensors with torch.cuda's statistics faked (the test
suite does: tests/test_gpu_validation.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.accuracy import MODELS, matrix
from memcalc.api import model_input, model_of, run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

GIB = 2**30
DEFAULT_BUDGET_S = 540
OUT = Path(__file__).resolve().parent.parent / "docs" / "accuracy-gpu.md"
TARGET_ALLOCATED_PCT = 1.0
TARGET_RESERVED_PCT = 5.0


@dataclass(frozen=True)
class GpuCase:
    label: str
    model: str | dict  # a preset name, or a config (the CPU matrix's small models)
    spec: TrainingSpec
    # "" (--verify's CUDA step), or the real library the step runs: "compile" (layer.compile() on each decoder layer,
    # as torchtune's compile_model), "fp8" (torchao convert_to_float8_training, the output layer left out, then
    # compiled, as torchtitan), "liger" (apply_liger_kernel_to_llama's fused linear cross-entropy)
    library: str = ""


def cases(quick: bool = False) -> list[GpuCase]:
    found = [
        GpuCase("llama-3.2-1b bf16-pure b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024)),
        GpuCase("qwen2.5-0.5b amp-bf16 ckpt=full b8xs1024", "qwen2.5-0.5b",
                TrainingSpec(precision="amp-bf16", micro_batch_size=8, seq_len=1024, checkpointing="full")),
        GpuCase("llama-3-8b LoRA r16 bf16-pure b2xs2048", "llama-3-8b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=2048, lora_rank=16)),
        GpuCase("llama-3-8b bf16-pure fused ckpt=full b1xs1024", "llama-3-8b",
                TrainingSpec(precision="bf16-pure", optim_impl="fused", micro_batch_size=1, seq_len=1024,
                             checkpointing="full")),
        GpuCase("llama-3.2-1b bf16-pure expandable_segments b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024)),
    ]
    found.append(GpuCase("qwen2.5-0.5b amp-bf16 ckpt=full reentrant b8xs1024", "qwen2.5-0.5b",
                         TrainingSpec(precision="amp-bf16", micro_batch_size=8, seq_len=1024, checkpointing="full",
                                      checkpoint_reentrant=True)))
    found.append(GpuCase("llama-3.2-1b bf16-pure offload=torchtune ckpt=full b4xs1024", "llama-3.2-1b",
                         TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, checkpointing="full",
                                      activation_offload="torchtune")))
    found += [
        GpuCase("llama-3.2-1b bf16-pure compile (Triton) b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True), "compile"),
        GpuCase("llama-3.2-1b bf16-pure compile chunked:8 b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True,
                             loss="chunked:8"), "compile"),
        GpuCase("llama-3.2-1b bf16-pure compile ckpt=full b4xs2048", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=2048, compile=True,
                             checkpointing="full"), "compile"),
        GpuCase("llama-3.2-1b bf16-pure fp8 tensorwise compile b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True,
                             fp8="tensorwise"), "fp8"),
        GpuCase("llama-3.2-1b bf16-pure fp8 rowwise compile b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True,
                             fp8="rowwise"), "fp8"),
    ]
    found += [GpuCase(case.label, MODELS[case.family], case.spec()) for case in matrix(quick)]
    # last: Liger patches transformers' Llama classes for the rest of the process
    found.append(GpuCase("llama-3.2-1b bf16-pure Liger fused-linear b4xs1024", "llama-3.2-1b",
                         TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, loss="fused-linear"),
                         "liger"))
    return found


@dataclass
class Row:
    label: str
    estimate_bytes: int | None = None
    requested_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    replayed_reserved_bytes: int | None = None
    predicted_reserved_bytes: int | None = None  # --reserved: the estimate's own traced step replayed (presets only)
    retries: int | None = None
    ooms: int | None = None
    seconds: float = 0.0
    failure: str = ""
    estimate_phase: str = ""
    measured_phase: str = ""
    # torch.cuda.memory._snapshot() after the step: each segment's (total, allocated) bytes (the allocator's layout,
    # for checking memcalc.allocator offline), and the replay's own segment count at its reserved peak
    segments: list[tuple[int, int]] | None = None
    replayed_segments: int | None = None

    @staticmethod
    def pct(value: int | None, reference: int | None) -> float | None:
        if value is None or not reference:
            return None
        return 100 * (value - reference) / reference

    @property
    def allocated_error(self) -> float | None:
        return self.pct(self.estimate_bytes, self.requested_bytes)

    @property
    def reserved_error(self) -> float | None:
        return self.pct(self.replayed_reserved_bytes, self.reserved_bytes)

    @property
    def predicted_reserved_error(self) -> float | None:
        return self.pct(self.predicted_reserved_bytes, self.reserved_bytes)


def _config(case: GpuCase) -> tuple[ModelConfig, object]:
    if isinstance(case.model, str):
        model = model_input(case.model, None)
        assert model.config is not None
        return model.config, model
    config = ModelConfig(name=case.model["model_type"], raw=case.model, source="benchmarks/accuracy.py")
    return config, model_of(config)


def measure(case: GpuCase, device: str, events: dict[str, list] | None = None) -> Row:
    """One configuration on the GPU (or, with device "cpu", on CPU tensors under faked statistics). ``events``: where
    the measured step's allocation events are kept, by label (for replaying them offline)."""
    from memcalc.allocator import environment_cublas_workspace, parse_alloc_conf, replay, workspace_allocations
    from memcalc.measure.cuda import measure_cuda

    started = time.perf_counter()
    row = Row(case.label)
    conf = "expandable_segments:True" if "expandable_segments" in case.label else ""
    previous = os.environ.get("PYTORCH_ALLOC_CONF")
    try:
        config, model = _config(case)
        peak = run(model, case.spec).per_gpu.step_peak()
        row.estimate_bytes, row.estimate_phase = peak.bytes, peak.phase.value
        if conf:
            # (the allocator reads its settings once per process: a GPU run sets them with _set_allocator_settings)
            _set_allocator_settings(conf, device)
        if case.library:
            _measure_library(row, config, case, device)
            return row
        if isinstance(case.model, str):  # what a user sees with --reserved, before any GPU step
            row.predicted_reserved_bytes = run(model, case.spec, _gpu_target(device), allocator=parse_alloc_conf(conf),
                                               allocator_source="gpu_validation").per_gpu.reserved_peak_bytes
        measured = measure_cuda(config, case.spec, device=device)
        row.measured_phase = measured.measured_peak_phase
        row.segments = _segments(device)
        if events is not None and measured.allocation_events:
            events[case.label] = measured.allocation_events  # (list of (ALLOC or FREE, key, bytes))
        stats = measured.allocator_stats
        row.requested_bytes = stats.get("requested_bytes.all.peak")
        row.allocated_bytes = measured.measured_peak_bytes
        row.reserved_bytes = stats.get("reserved_bytes.all.peak", measured.reserved_peak_bytes)
        row.retries, row.ooms = stats.get("num_alloc_retries"), stats.get("num_ooms")
        if measured.allocation_events:
            # the card's cuBLAS workspaces go through the same allocator (memcalc.allocator.cublas_workspace_bytes)
            capability = measured.run.get("compute_capability")
            workspace = environment_cublas_workspace(str(capability) if capability else None)
            replayed = replay(measured.allocation_events, parse_alloc_conf(conf),
                              persistent=workspace_allocations(workspace))
            row.replayed_reserved_bytes, row.replayed_segments = replayed.reserved_peak_bytes, replayed.segments_peak
    except Exception as error:  # noqa: BLE001 (a row saying what failed; the script goes on)
        row.failure = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
    finally:
        if conf:
            _set_allocator_settings(previous or "", device)
        _release(device)
        row.seconds = time.perf_counter() - started
    return row


def _measure_library(row: Row, config: ModelConfig, case: GpuCase, device: str) -> None:
    """A step that runs a real GPU library: built as --verify builds it, the library applied, a warm-up step (the
    compilation), the peak statistics reset, then the measured step; read from the allocator's statistics only."""
    import dataclasses

    import torch

    from memcalc.measure import step
    from memcalc.measure.step import resolve_setup

    # compile with torchtune's chunked loss: its per-chunk cross-entropy compiled as well (compile_loss)
    chunked = case.library == "compile" and case.spec.loss.startswith("chunked")
    plain = dataclasses.replace(case.spec, compile=False, fp8="none", loss=case.spec.loss if chunked else "standard")
    setup = resolve_setup(plain, "sdpa", device)
    eager_entropy = step._chunk_cross_entropy
    if chunked:
        step._chunk_cross_entropy = torch.compile(eager_entropy)
    try:
        _run_library(row, config, case, device, setup)
    finally:
        step._chunk_cross_entropy = eager_entropy


def _run_library(row: Row, config: ModelConfig, case: GpuCase, device: str, setup) -> None:
    import torch

    from memcalc.measure import build
    from memcalc.measure.step import PhaseClock, Stepper, build_model, make_batch, one_step

    if case.library == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # (patches the class: before building)

        apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, cross_entropy=False)
    model = build_model(config, setup)
    if case.library == "fp8":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda _module, fqn: fqn != "lm_head")
    if case.library in ("compile", "fp8"):
        for layer in build.decoder_layers(model):
            layer.compile()
    stepper = Stepper(model, setup)
    batch, _notes = make_batch(model, setup)
    one_step(model, stepper, batch, setup, PhaseClock())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if device.startswith("cuda"):  # each phase's peaks (memory_stats() kept at each phase's end)
        from memcalc.measure.cuda import CudaPhaseClock

        clock = CudaPhaseClock(device)
        clock.install()
        try:
            one_step(model, stepper, batch, setup, clock)
            clock.finish()
        finally:
            clock.remove()
        stats = {**torch.cuda.memory_stats(), **clock.stats}
        row.measured_phase = max(clock.peaks.items(), key=lambda item: item[1])[0] if clock.peaks else ""
    else:
        one_step(model, stepper, batch, setup, PhaseClock())
        stats = torch.cuda.memory_stats()
    row.requested_bytes = stats.get("requested_bytes.all.peak")
    row.allocated_bytes = stats.get("allocated_bytes.all.peak")
    row.reserved_bytes = stats.get("reserved_bytes.all.peak")
    row.retries, row.ooms = stats.get("num_alloc_retries"), stats.get("num_ooms")
    row.segments = _segments(device)


def _gpu_target(device: str):
    """This GPU as --gpu would give it (its memory, its compute capability: the cuBLAS workspaces replayed)."""
    from memcalc.fit import GpuTarget

    if not device.startswith("cuda"):
        return None
    import torch

    props = torch.cuda.get_device_properties(device)
    return GpuTarget(name=props.name, memory_bytes=int(props.total_memory), source="this GPU",
                     compute_capability=f"{props.major}.{props.minor}")


def _segments(device: str) -> list[tuple[int, int]] | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return [(int(s["total_size"]), int(s["allocated_size"])) for s in torch.cuda.memory._snapshot()["segments"]]


def _set_allocator_settings(conf: str, device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.memory._set_allocator_settings(conf or "expandable_segments:False")


def _release(device: str) -> None:
    """Between configurations: nothing left cached, peaks reset (each row starts from an empty allocator)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(device: str) -> dict[str, str]:
    import torch

    from memcalc.measure.cuda import _device_name, _versions, cuda_context_bytes

    found = {"device": _device_name(device if device.startswith("cuda") else None), **_versions(),
             "transformers": _version_of("transformers"), "date": datetime.date.today().isoformat()}
    if device.startswith("cuda"):
        torch.ones(1, device=device).sum().item()  # the context exists once a kernel ran
    context = cuda_context_bytes(device if device.startswith("cuda") else None)
    found["cuda_context"] = "unknown" if context is None else f"{context:,} B ({context / 2**20:.0f} MiB)"
    return found


def _version_of(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


class CaseTimeout(Exception):
    """A configuration ran past its own time limit (a compilation that would spend the whole lease)."""


def _alarm(seconds: float):
    """SIGALRM raises CaseTimeout in the main thread after ``seconds`` (0: none); returns the cancel function."""
    import signal

    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        return lambda: None

    def fire(_signum, _frame):
        raise CaseTimeout(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return cancel


def validate(selected: list[GpuCase], device: str, budget_s: float, case_limit_s: float = 0,
             events: dict[str, list] | None = None,
             after_each: Callable[[dict[str, str], list[Row]], None] | None = None) -> tuple[dict[str, str], list[Row]]:
    """Each case in turn while the budget lasts (each within ``case_limit_s`` when given); ``after_each`` sees the
    rows so far (the script writes them, so a run cut short still leaves its table)."""
    started = time.perf_counter()
    env = environment(device)
    rows: list[Row] = []
    for case in selected:
        left = budget_s - (time.perf_counter() - started)
        if left <= 0:
            rows.append(Row(case.label, failure=f"not run: the {budget_s:.0f} s budget was spent"))
            continue
        cancel = _alarm(min(case_limit_s, left) if case_limit_s else 0)
        try:
            rows.append(measure(case, device, events))
        except CaseTimeout as error:  # (raised outside measure's own handler: between its steps)
            rows.append(Row(case.label, failure=f"CaseTimeout: {error}"))
            _release(device)
        finally:
            cancel()
        print(f"{rows[-1].label}: {rows[-1].seconds:.1f} s {rows[-1].failure}", file=sys.stderr, flush=True)
        if after_each is not None:
            after_each(env, rows)
    return env, rows


# The command line's --verify on the GPU (issue 15 item 3): a step that fits, and one that runs out of memory (one
# line and the does-not-fit exit code, never "internal error").
CLI_CHECKS = (
    ("verify=cuda, fits", ["llama-3.2-1b", "--precision", "bf16-pure", "-b", "4", "-s", "1024", "--verify=cuda"]),
    ("verify=cuda, out of memory", ["llama-3-8b", "--precision", "fp32", "-b", "16", "-s", "8192", "--verify=cuda"]),
)


@dataclass
class CliCheck:
    label: str
    argv: list[str]
    exit_code: int | None = None
    stdout_tail: str = ""
    stderr: str = ""
    seconds: float = 0.0


def cli_checks(limit_s: float = 180) -> list[CliCheck]:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    found = []
    for label, argv in CLI_CHECKS:
        check = CliCheck(label, argv)
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "memcalc", *argv], check=False, capture_output=True,
                                  text=True, timeout=limit_s, cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      filter(None, (str(root), os.environ.get("PYTHONPATH"))))})
            check.exit_code, check.stdout_tail, check.stderr = done.returncode, done.stdout[-3000:], done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            check.stderr = f"ran past its {limit_s:.0f} s limit"
        check.seconds = time.perf_counter() - started
        print(f"{label}: exit {check.exit_code}, {check.seconds:.1f} s", file=sys.stderr, flush=True)
        found.append(check)
    return found


def markdown(env: dict[str, str], rows: list[Row], checks: list[CliCheck] = ()) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.3f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.2f}%"

    lines = ["# Accuracy on a CUDA GPU (`python benchmarks/gpu_validation.py`)", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             ("Estimate: memcalc's peak (live tensors) against `requested_bytes.all.peak`; replay: the measured "
              "step's own allocations through memcalc.allocator against `reserved_bytes.all.peak`. In GiB."), "",
             ("| configuration | estimate | requested | error | phase (estimate / measured) | allocated | reserved | "
              "replayed reserved | error | --reserved | error | retries | OOMs | s | failure |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = f"{r.estimate_phase or '-'} / {r.measured_phase or '-'}"
        lines.append(f"| {r.label} | {gib(r.estimate_bytes)} | {gib(r.requested_bytes)} | {pct(r.allocated_error)} | "
                     f"{phases} | {gib(r.allocated_bytes)} | {gib(r.reserved_bytes)} | {gib(r.replayed_reserved_bytes)} | "
                     f"{pct(r.reserved_error)} | {gib(r.predicted_reserved_bytes)} | {pct(r.predicted_reserved_error)} | "
                     f"{'-' if r.retries is None else r.retries} | "
                     f"{'-' if r.ooms is None else r.ooms} | {r.seconds:.1f} | {r.failure} |")
    for name, errors, target in (
            ("estimate vs requested", [r.allocated_error for r in rows], TARGET_ALLOCATED_PCT),
            ("replayed vs measured reserved", [r.reserved_error for r in rows], TARGET_RESERVED_PCT),
            ("--reserved vs measured reserved", [r.predicted_reserved_error for r in rows], TARGET_RESERVED_PCT)):
        found = [abs(e) for e in errors if e is not None]
        if found:
            lines.append(f"\n{name}: {len(found)} rows, median |error| {statistics.median(found):.2f}%, worst "
                         f"{max(found):.2f}%, {sum(e <= target for e in found)} within the {target:g}% target")
    for check in checks:
        lines += ["", f"`memcalc {' '.join(check.argv)}` ({check.label}): exit {check.exit_code}, {check.seconds:.1f} s",
                  "", "```", (check.stdout_tail + check.stderr).strip(), "```"]
    return "\n".join(lines) + "\n"


def _write_raw(folder: Path, env: dict[str, str], rows: list[Row], checks: list[CliCheck],
               events: dict[str, list]) -> None:
    """rows.json (rewritten), and events.jsonl.gz: each measured case's allocations appended once, then dropped."""
    import gzip
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.json").write_text(json.dumps(
        {"env": env, "rows": [asdict(r) for r in rows], "cli": [asdict(c) for c in checks]}, indent=1))
    with gzip.open(folder / "events.jsonl.gz", "at") as handle:
        for label in list(events):
            handle.write(json.dumps({"label": label, "events": events.pop(label)}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds (default 540)")
    parser.add_argument("--case-limit", type=float, default=150, help="seconds one configuration may take (150)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the small-model matrix")
    parser.add_argument("--cli", action="store_true", help="also run the command line's --verify=cuda checks first")
    parser.add_argument("--raw", type=Path, help="a folder for rows.json and events.jsonl.gz (the measured steps' "
                        "allocations and the allocator's segments, for checking memcalc.allocator offline)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with torch.cuda faked (tests)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_validation: no CUDA GPU here (torch.cuda.is_available() is False); nothing was written",
              file=sys.stderr)
        return 1
    started = time.perf_counter()
    checks = cli_checks() if args.cli else []
    events: dict[str, list] = {}

    def write(env: dict[str, str], rows: list[Row]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(env, rows, checks), encoding="utf-8")
        if args.raw is not None:
            _write_raw(args.raw, env, rows, checks, events)

    budget = args.budget - (time.perf_counter() - started)
    env, rows = validate(cases(args.quick), args.device, budget, args.case_limit, events, write)
    write(env, rows)
    print(f"gpu_validation: {len(rows)} configurations, written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
