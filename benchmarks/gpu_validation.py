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
    python3 benchmarks/gpu_validation.py --budget 470 --cli --nccl --placement --out $OUT/accuracy-gpu.md --raw $OUT

(memcalc's estimate and a measured step were checked on CPU under transformers 5.17, that machine's release.)

Options for a second look (harness 3): ``--parts`` picks the groups (``families``: the CPU families matrix's
quarter, each estimate as a user gets it, opt-in), ``--only`` the labels containing a text, ``--history`` records
named configurations' measured steps with the allocator's history (what was live at the peak and at the end by
allocating stack, and the allocations no tracked tensor owns), ``--context`` reads the CUDA context in fresh processes
as a process goes on, ``--nccl`` one-rank NCCL communicators' device memory (against memcalc.nccl's part made at
init), ``--placement`` where cudaMalloc puts each new segment (memcalc.allocator places each below the last);
``--rerender ... --with-run DIR`` adds another kept run's rows as a section, its estimates as that run computed
them. The second H200 session's runs (benchmarks/gpu-runs/2026-12-04-h200-b, -c) used them. The one replay still
off by more than 0.5% at full size, the fp16 GradScaler row's (+2.18%: the GPU held fewer 20 to 64 MiB segments than
the replay), is settled by its allocator history, segments' addresses included:

    python3 benchmarks/gpu_validation.py --only GradScaler --history "llama-3.2-1b amp-fp16 GradScaler b4xs1024" \
        --history-from-build --out $OUT/accuracy-gpu.md --raw $OUT

Without a GPU, ``--device cpu`` runs the same bookkeeping on CPU tensors with torch.cuda's statistics faked (the test
suite does: tests/test_gpu_validation.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.accuracy import FAMILY_CONFIGS, MODELS, family_matrix, matrix
from memcalc.allocator import (
    CUBLAS_HANDLES_PER_STEP,
    CUBLASLT_WORKSPACE,
    ReplayResult,
    parse_alloc_conf,
    replay,
    workspace_allocations,
)
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


# The groups of configurations, in the order they run; "families" (the CPU families matrix's quarter, about 100 small
# steps, each hand-ruled or traced estimate as a user gets it) only when asked for.
PARTS = ("presets", "matrix", "families", "compile", "fp8", "liger")
DEFAULT_PARTS = tuple(part for part in PARTS if part != "families")


def cases(quick: bool = False, parts: tuple[str, ...] = DEFAULT_PARTS) -> list[GpuCase]:
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
    # paths the first H200 run left unmeasured (harness 3): fp16 with a GradScaler, eager attention at a preset's
    # size, TRL's offloading around the whole step, and checkpoints' inputs in host memory (save_on_cpu)
    found += [
        GpuCase("llama-3.2-1b amp-fp16 GradScaler b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="amp-fp16", micro_batch_size=4, seq_len=1024)),
        GpuCase("llama-3.2-1b bf16-pure attn=eager b2xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=1024, attention="eager")),
        GpuCase("llama-3.2-1b bf16-pure attn=eager ckpt=full b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, attention="eager",
                             checkpointing="full")),
        # (at 8192 tokens softmax's backward is the step's peak: CUDA's temporary there is one 8 GiB fp32 s^2 tensor)
        GpuCase("llama-3.2-1b bf16-pure attn=eager ckpt=full b1xs8192", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=1, seq_len=8192, attention="eager",
                             checkpointing="full")),
        # (16,384 tokens, the loss chunked so that logits do not dominate: the flash kernel's backward allocates 258
        # MiB a layer of its own, named by memcalc and not counted; the backward phase's measured peak says whether a
        # moment inside it is ever the phase's peak)
        GpuCase("llama-3.2-1b bf16-pure chunked:8 ckpt=full b1xs16384", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=1, seq_len=16384, checkpointing="full",
                             loss="chunked:8")),
        GpuCase("llama-3.2-1b bf16-pure offload=trl b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, activation_offload="trl")),
        GpuCase("llama-3.2-1b bf16-pure offload=checkpoints ckpt=full b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, checkpointing="full",
                             activation_offload="checkpoints")),
    ]
    if "presets" not in parts:
        found = []
    # the small models before the compiled steps: what Inductor and Triton keep for the process (compiled graphs,
    # autotuning) would otherwise sit in the allocator's segments under their small steps
    if "matrix" in parts:
        found += [GpuCase(case.label, MODELS[case.family], case.spec()) for case in matrix(quick)]
    if "families" in parts:  # the CPU families matrix's cells (a quarter of them), its estimate as a user gets it
        # (labelled apart from the matrix's: both have a "llama ... b2xs256", with different configs)
        found += [GpuCase(f"family {case.label}", FAMILY_CONFIGS[case.family], case.spec())
                  for case in family_matrix(quick=True)]
    compiled = [
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
    found += [case for case in compiled if case.library in parts]
    # last: Liger patches transformers' Llama classes for the rest of the process
    if "liger" in parts:
        found.append(GpuCase("llama-3.2-1b bf16-pure Liger fused-linear b4xs1024", "llama-3.2-1b",
                             TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024,
                                          loss="fused-linear"), "liger"))
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
    # the card's cuBLAS workspaces, one per handle that runs a matmul (the forward's thread and autograd's device
    # thread: memcalc.allocator.CUBLAS_HANDLES_PER_STEP): allocated by the caching allocator and kept, so inside
    # requested_bytes; not a tensor, so not in the estimate's peak. The estimate is compared with requested less these.
    workspace_bytes: int = 0
    # what the allocator held when the case began (after the previous case's release): left by earlier cases
    reserved_at_start_bytes: int | None = None
    allocated_at_start_bytes: int | None = None
    retries: int | None = None
    ooms: int | None = None
    seconds: float = 0.0
    failure: str = ""
    estimate_phase: str = ""
    measured_phase: str = ""
    # each phase's peak: the estimate's, and the measured step's allocated peak less the workspaces (--verify's clock,
    # memcalc.measure.cuda): whether a moment the estimate does not model is ever a phase's peak
    estimate_phase_bytes: dict[str, int] | None = None
    measured_phase_bytes: dict[str, int] | None = None
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
    def left_by_earlier_bytes(self) -> int:
        """Allocated when the case began beyond the workspaces: tensors earlier cases left (inside requested_bytes)."""
        return max(0, (self.allocated_at_start_bytes or 0) - self.workspace_bytes)

    @property
    def allocated_error(self) -> float | None:
        if self.estimate_bytes is None:
            return None
        return self.pct(self.estimate_bytes + self.workspace_bytes + self.left_by_earlier_bytes, self.requested_bytes)

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
    from memcalc.allocator import environment_cublas_workspace, step_workspace_bytes
    from memcalc.measure.cuda import measure_cuda

    started = time.perf_counter()
    row = Row(case.label)
    conf = _alloc_conf(case.label)
    previous = os.environ.get("PYTORCH_ALLOC_CONF")
    try:
        config, model = _config(case)
        per_gpu = run(model, case.spec).per_gpu
        peak = per_gpu.step_peak()
        row.estimate_bytes, row.estimate_phase = peak.bytes, peak.phase.value
        row.estimate_phase_bytes = {p.phase.value: p.bytes for p in per_gpu.phases if p.phase.value != "load"}
        row.workspace_bytes = step_workspace_bytes(_capability(device))
        row.reserved_at_start_bytes, row.allocated_at_start_bytes = _held(device)
        if conf:
            # (the allocator reads its settings once per process: a GPU run sets them with _set_allocator_settings)
            _set_allocator_settings(conf, device)
        if case.library:
            with _history(device, case.label):
                _measure_library(row, config, case, device)
            return row
        if isinstance(case.model, str):  # what a user sees with --reserved, before any GPU step
            row.predicted_reserved_bytes = run(model, case.spec, _gpu_target(device), allocator=parse_alloc_conf(conf),
                                               allocator_source="gpu_validation").per_gpu.reserved_peak_bytes
        with _history(device, case.label):
            measured = measure_cuda(config, case.spec, device=device, attn_implementation=_attention(case.spec))
        row.measured_phase = measured.measured_peak_phase
        row.measured_phase_bytes = dict(measured.per_phase_peak_bytes)
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
            workspace = environment_cublas_workspace(str(capability) if capability else _capability(device))
            _replay_row(row, measured.allocation_events, workspace)
    except Exception as error:  # noqa: BLE001 (a row saying what failed; the script goes on)
        row.failure = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
    finally:
        if conf:
            _set_allocator_settings(previous or "", device)
        _release(device)
        row.seconds = time.perf_counter() - started
    return row


def _alloc_conf(label: str) -> str:
    """The allocator settings a configuration runs under (the one expandable-segments row's; the default else)."""
    return "expandable_segments:True" if "expandable_segments" in label else ""


def replay_measured(events: list, label: str, workspace_per_handle: int | None, held_bytes: int = 0,
                    segments_below: bool = True) -> ReplayResult:
    """A measured step's tracked allocations through memcalc.allocator, under the row's allocator settings, after what
    the process held when the row began: the card's cuBLAS workspaces (one per handle) and ``held_bytes`` beyond them,
    the 1 MiB cuBLASLt workspaces an earlier row's biased Linear left on its threads (memcalc.allocator.
    CUBLASLT_WORKSPACE; measured on the H200: benchmarks/gpu-runs/2026-12-04-h200-c). The table's "replayed
    reserved"."""
    persistent = workspace_allocations(workspace_per_handle) + [CUBLASLT_WORKSPACE] * (held_bytes // CUBLASLT_WORKSPACE)
    return replay(events, parse_alloc_conf(_alloc_conf(label)), persistent=persistent, segments_below=segments_below)


def held_beyond_workspaces(allocated_at_start: int | None, workspace_bytes: int | None) -> int:
    """What a row's process held allocated when it began beyond the cuBLAS workspaces (0 where not recorded)."""
    return max(0, (allocated_at_start or 0) - (workspace_bytes or 0))


def _replay_row(row: Row, events: list, workspace_per_handle: int | None) -> None:
    held = held_beyond_workspaces(row.allocated_at_start_bytes, row.workspace_bytes)
    replayed = replay_measured(events, row.label, workspace_per_handle, held)
    row.replayed_reserved_bytes, row.replayed_segments = replayed.reserved_peak_bytes, replayed.segments_peak


# Labels whose measured step is recorded by torch.cuda.memory._record_memory_history (--history): each becomes what
# was live at the step's own peak and at its end, by the Python stack that allocated it (history_summary), for the
# bytes an estimate cannot name. Filled in place with the summaries.
HISTORY: dict[str, dict] = {}
# --history-from-build: the recording starts when the configuration does (its build and warm-up step too), not at
# the measured step
HISTORY_FROM_BUILD: list[bool] = [False]


@contextlib.contextmanager
def _history(device: str, label: str):
    """For a label in HISTORY, records the allocator's history from the measured step's start (memcalc.measure.cuda's
    first reset_peak_memory_stats, after the warm-up step) to its end, and puts its summary in HISTORY[label]."""
    if label not in HISTORY or not device.startswith("cuda"):
        yield
        return
    import torch

    reset = torch.cuda.reset_peak_memory_stats
    started: list[int] = []

    def record() -> None:
        torch.cuda.synchronize()
        started.append(torch.cuda.memory_allocated())
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")

    def reset_and_record(*args, **kwargs):
        if not started:
            record()
        return reset(*args, **kwargs)

    if HISTORY_FROM_BUILD[0]:
        record()

    # the device addresses of the storages the tracker books in the measured step: the trace's allocations at other
    # addresses are ones no tensor the tracker saw owns (a kernel's own workspace, a library's buffer)
    from memcalc.measure import tracker as trk

    add, booked = trk.MemoryTracker._add, set()

    def add_and_note(self, storage, category):
        if started:
            booked.add(storage.data_ptr())
        return add(self, storage, category)

    torch.cuda.reset_peak_memory_stats = reset_and_record
    trk.MemoryTracker._add = add_and_note
    try:
        yield
        if started:
            HISTORY[label] = history_summary(torch.cuda.memory._snapshot(), started[0], booked=booked)
    finally:
        torch.cuda.reset_peak_memory_stats = reset
        trk.MemoryTracker._add = add
        if started:
            torch.cuda.memory._record_memory_history(enabled=None)


# Frames every allocation under the tracker passes through: left out of the stacks summarised
_DISPATCH_FRAMES = ("torch/_ops.py", "torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py",
                    "memcalc/measure/tracker.py")


def _frames(event: dict, depth: int = 6) -> str:
    """The allocating Python stack, innermost first, paths from site-packages (or the repository) on, without the
    dispatch machinery's frames (the tracker's, dynamo's wrappers)."""
    out = []
    for frame in event.get("frames", []):
        if len(out) == depth:
            break
        name = str(frame.get("filename", "?"))
        if any(part in name for part in _DISPATCH_FRAMES) or frame.get("name") == "__torch_dispatch__":
            continue
        for marker, kept in (("site-packages/", ""), ("dist-packages/", ""), ("/memcalc/", "memcalc/"),
                             ("/benchmarks/", "benchmarks/")):
            if marker in name:
                name = kept + name.split(marker, 1)[1]
                break
        out.append(f"{name}:{frame.get('line', '?')} {frame.get('name', '?')}")
    return " < ".join(out)


def history_summary(snapshot: dict, allocated_at_start: int, top: int = 40, whole_up_to: int = 3000,
                    booked: set[int] | None = None, large: int = 2**30) -> dict:
    """From torch.cuda.memory._snapshot()'s device trace (alloc and free_completed events with their stacks): the
    allocated bytes at the trace's own peak and at its end, and the blocks allocated inside the trace and live at each,
    grouped by stack (the blocks live before the trace are counted, not named). A trace of at most ``whole_up_to``
    events is kept whole too ("trace": action, block address, bytes, stack), to align with the tracker's events.
    ``booked``: the device addresses of the storages the tracker booked; the allocations at other addresses are
    summed by stack ("unbooked"). Every event of at least ``large`` bytes, segments' own included ("large": action,
    address, bytes, whether the tracker booked it, stack), shows where a step's large blocks and segments came from."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace
              if e.get("action") in ("alloc", "free_completed")]
    current = peak = allocated_at_start
    peak_index = -1
    for index, event in enumerate(events):
        current += event["size"] if event["action"] == "alloc" else -event["size"]
        if current > peak:
            peak, peak_index = current, index
    end = current

    def live(until: int) -> list[dict]:
        alive: dict[int, dict] = {}
        for event in events[:until + 1]:
            if event["action"] == "alloc":
                alive[event["addr"]] = event
            else:
                alive.pop(event["addr"], None)
        groups: dict[str, list[int]] = {}
        for event in alive.values():
            group = groups.setdefault(_frames(event), [0, 0])
            group[0] += event["size"]
            group[1] += 1
        ranked = sorted(groups.items(), key=lambda item: -item[1][0])
        return [{"bytes": size, "blocks": count, "stack": stack} for stack, (size, count) in ranked[:top]]

    unbooked: dict[str, list[int]] = {}
    for event in events if booked is not None else ():
        if event["action"] == "alloc" and event["addr"] not in booked:
            group = unbooked.setdefault(_frames(event), [0, 0])
            group[0] += event["size"]
            group[1] += 1
    around = [{"action": e["action"], "bytes": e["size"], "stack": _frames(e)}
              for e in events[max(0, peak_index - 3):peak_index + 2]] if peak_index >= 0 else []
    return {"allocated_at_start": allocated_at_start, "peak_allocated": peak, "end_allocated": end,
            "events": len(events), "around_peak": around, "live_at_peak": live(peak_index),
            "live_at_end": live(len(events) - 1), "peak_index": peak_index,
            "unbooked": [{"bytes": size, "allocations": count, "stack": stack} for stack, (size, count) in
                         sorted(unbooked.items(), key=lambda item: -item[1][0])[:top]],
            "trace": [(e["action"], e["addr"], e["size"], _frames(e, 3)) for e in events]
            if len(events) <= whole_up_to else [],
            "large": [(e.get("action"), e.get("addr"), e.get("size"), booked is None or e.get("addr") in booked,
                       _frames(e, 3)) for trace in snapshot.get("device_traces", []) for e in trace
                      if e.get("size", 0) >= large]}


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

        # only the fused loss, what --loss fused-linear models (the function's defaults also swap in Liger's RoPE,
        # RMSNorm and SwiGLU kernels, which save less than transformers' modules)
        apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, cross_entropy=False, rope=False, rms_norm=False,
                                    swiglu=False)
    model = build_model(config, setup)
    if case.library in ("compile", "fp8") and getattr(model, "config", None) is not None:
        # as memcalc.measure.step.build_model does under --compile: no KV cache object through the compiled layers
        # (with one, each layer's cache guard recompiles the shared forward until dynamo's recompile limit)
        model.config.use_cache = False
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


def _attention(spec: TrainingSpec) -> str:
    """transformers' attn_implementation for the spec's kernel (as --verify picks it)."""
    from memcalc.measure import ATTN_IMPLEMENTATIONS

    return ATTN_IMPLEMENTATIONS[spec.attention.value]


def _capability(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def _held(device: str) -> tuple[int | None, int | None]:
    """(reserved, allocated) bytes the allocator holds now."""
    if not device.startswith("cuda"):
        return None, None
    import torch

    return int(torch.cuda.memory_reserved(device)), int(torch.cuda.memory_allocated(device))


def _gpu_target(device: str):
    """This GPU as --gpu would give it (its memory, its compute capability: the cuBLAS workspaces replayed)."""
    from memcalc.fit import GpuTarget

    if not device.startswith("cuda"):
        return None
    import torch

    props = torch.cuda.get_device_properties(device)
    return GpuTarget(name=props.name, memory_bytes=int(props.total_memory), source="this GPU",
                     compute_capability=_capability(device))


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

    if "torch._dynamo" in sys.modules:  # compiled graphs (and what they hold) belong to one configuration
        torch._dynamo.reset()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(device: str) -> dict[str, str]:
    import torch

    from memcalc.measure.cuda import _device_name, _versions, cuda_context_bytes

    found = {"device": _device_name(device if device.startswith("cuda") else None), **_versions(),
             "transformers": _version_of("transformers"), "date": datetime.date.today().isoformat(),
             "harness": HARNESS}
    if device.startswith("cuda"):
        torch.ones(1, device=device).sum().item()  # the context exists once a kernel ran
    context = cuda_context_bytes(device if device.startswith("cuda") else None)
    if device.startswith("cuda"):
        # the two cuBLAS workspaces (this thread's handle, and autograd's device thread's in the backward) allocated
        # now, into an empty cache: each its own segment for the rest of the process, as the replay places them.
        # Allocated first inside a case instead, one can be carved from a block an earlier case freed (best fit),
        # pinning that whole segment under every later case's reserved memory.
        weight = torch.ones(64, 64, device=device, requires_grad=True)
        (weight @ weight).sum().backward()
        torch.cuda.synchronize()
        del weight
        _release(device)
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
# line and the does-not-fit exit code, 6, never "internal error"). The second runs with the caching allocator capped
# at a fraction of the card (torch.cuda.set_per_process_memory_fraction, before memcalc starts): its estimate fits the
# card, so --verify neither refuses nor scales it down, and the real step runs out of the capped memory.
CLI_CHECKS = (
    ("verify=cuda, fits", ["llama-3.2-1b", "--precision", "bf16-pure", "-b", "4", "-s", "1024", "--verify=cuda"]),
    ("verify=cuda, out of memory (allocator capped at 8% of the card)",
     ["llama-3.2-1b", "--precision", "bf16-pure", "-b", "4", "-s", "1024", "--verify=cuda"], 0.08),
)
_CAPPED = ("import sys, torch; torch.cuda.set_per_process_memory_fraction({fraction}); from memcalc.cli import main; "
           "sys.argv[0] = 'memcalc'; sys.exit(main())")


@dataclass
class CliCheck:
    label: str
    argv: list[str]
    memory_fraction: float | None = None
    exit_code: int | None = None
    stdout_tail: str = ""
    stderr: str = ""
    seconds: float = 0.0


def cli_checks(limit_s: float = 180) -> list[CliCheck]:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    found = []
    for label, argv, *fraction in CLI_CHECKS:
        check = CliCheck(label, argv, fraction[0] if fraction else None)
        command = (["-c", _CAPPED.format(fraction=check.memory_fraction)] if check.memory_fraction is not None
                   else ["-m", "memcalc"])
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, *command, *argv], check=False, capture_output=True,
                                  text=True, timeout=limit_s, cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      filter(None, (str(root), os.environ.get("PYTHONPATH"))))})
            check.exit_code, check.stdout_tail, check.stderr = done.returncode, done.stdout[-3000:], done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            check.stderr = f"ran past its {limit_s:.0f} s limit"
        check.seconds = time.perf_counter() - started
        print(f"{label}: exit {check.exit_code}, {check.seconds:.1f} s", file=sys.stderr, flush=True)
        found.append(check)
    return found


# The CUDA context as the process goes on (--context): read in a fresh process after its first kernel, after a bf16
# matmul's forward and backward (cuBLAS and its handle for autograd's thread), and after a training step of the CPU
# matrix's small Llama (sdpa, fused AdamW): with lazy module loading (CUDA 11.7+'s default) each kernel's module is
# loaded when first launched, so the context grows; CUDA_MODULE_LOADING=EAGER loads them all at once.
_CONTEXT = """
import json, sys, torch
from memcalc.measure.cuda import cuda_context_bytes, measure_cuda
from memcalc.spec import TrainingSpec
from benchmarks.accuracy import MODELS
found = {}
torch.ones(1, device="cuda").sum().item()
found["first kernel"] = cuda_context_bytes("cuda")
weight = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
(weight @ weight).float().sum().backward(); torch.cuda.synchronize(); del weight
found["bf16 matmul forward and backward"] = cuda_context_bytes("cuda")
spec = TrainingSpec(precision="bf16-pure", optim_impl="fused", micro_batch_size=2, seq_len=256)
measure_cuda(MODELS["llama"], spec, device="cuda")
found["small Llama training step (sdpa, fused AdamW)"] = cuda_context_bytes("cuda")
print(json.dumps(found))
"""
CONTEXT_LOADINGS = ("LAZY", "EAGER")


def context_readings(limit_s: float = 120) -> dict[str, dict[str, int | str]]:
    """The CUDA context per CUDA_MODULE_LOADING, each in a fresh process (a reading that failed says why)."""
    return _fresh_readings(_CONTEXT, {loading: {"CUDA_MODULE_LOADING": loading} for loading in CONTEXT_LOADINGS},
                           "context", limit_s)


def _fresh_readings(script: str, settings: dict[str, dict[str, str]], what: str,
                    limit_s: float) -> dict[str, dict[str, int | str]]:
    """``script`` in a fresh process per setting (environment variables added), its last line's JSON each; a reading
    that failed says why."""
    import json
    import subprocess

    root = Path(__file__).resolve().parent.parent
    found: dict[str, dict[str, int | str]] = {}
    for name, added in settings.items():
        env = {**os.environ, **added,
               "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))}
        try:
            done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                                  timeout=limit_s, cwd=root, env=env)
            lines = done.stdout.strip().splitlines()
            found[name] = (json.loads(lines[-1]) if done.returncode == 0 and lines else
                           {"failure": f"exit {done.returncode}: {' '.join(done.stderr.split())[-300:]}"})
        except subprocess.TimeoutExpired:
            found[name] = {"failure": f"ran past its {limit_s:.0f} s limit"}
        print(f"{what} {name}: {found[name]}", file=sys.stderr, flush=True)
    return found


def context_markdown(readings: dict[str, dict[str, int | str]]) -> list[str]:
    if not readings:
        return []
    moments = [m for reading in readings.values() for m in reading if m != "failure"]
    moments = list(dict.fromkeys(moments))
    lines = ["", ("CUDA context (device memory in use less the allocator's reserved), each in a fresh process, by "
                  "`CUDA_MODULE_LOADING`:"), "", "| " + " | ".join(["loading", *moments, "failure"]) + " |",
             "|---|" + "---|" * (len(moments) + 1)]
    for loading, reading in readings.items():
        cells = [f"{reading[m]:,} B ({reading[m] / 2**20:.0f} MiB)" if isinstance(reading.get(m), int) else "-"
                 for m in moments]
        lines.append(f"| {loading} | " + " | ".join(cells) + f" | {reading.get('failure', '')} |")
    return lines


# NCCL's communicators on one GPU (--nccl): a communicator of one rank connects nothing, so what it holds is the part
# NCCL makes at init (memcalc.nccl: 3 allocations of 2 MiB per channel, 2 for the device communicator). Read in a fresh
# process as device memory in use (cudaMemGetInfo) less the allocator's reserved: after the first kernel, after the
# default group's communicator (made at once: init_process_group with device_id) and an all-reduce on it (NCCL's
# kernels load into the context here too), then after each of two more one-rank groups and an all-reduce on each
# (their deltas are a communicator's alone). Once as NCCL chooses, once with NCCL_MAX_NCHANNELS=1.
_NCCL = """
import json, os, torch, torch.distributed as dist
from memcalc.measure.cuda import cuda_context_bytes
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29531")
found = {}
torch.ones(1, device="cuda").sum().item()
found["first kernel"] = cuda_context_bytes("cuda")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
x = torch.ones(1, device="cuda"); dist.all_reduce(x); torch.cuda.synchronize()
found["default group and an all-reduce"] = cuda_context_bytes("cuda")
for n in (1, 2):
    group = dist.new_group([0]); dist.all_reduce(x, group=group); torch.cuda.synchronize()
    found[f"one-rank group {n} and an all-reduce"] = cuda_context_bytes("cuda")
version = torch.cuda.nccl.version()
found["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
dist.destroy_process_group()
print(json.dumps(found))
"""
NCCL_SETTINGS = {"as NCCL chooses": {}, "NCCL_MAX_NCHANNELS=1": {"NCCL_MAX_NCHANNELS": "1"}}


def nccl_readings(limit_s: float = 120) -> dict[str, dict[str, int | str]]:
    """Device memory beside the allocator's as one-rank NCCL communicators are made, per NCCL_SETTINGS, each in a
    fresh process (a reading that failed says why)."""
    return _fresh_readings(_NCCL, NCCL_SETTINGS, "nccl", limit_s)


def nccl_markdown(readings: dict[str, dict[str, int | str]]) -> list[str]:
    """Each one-rank group's delta beside memcalc.nccl's part made at init: 64 channels (NCCL's MAXCHANNELS, what
    published one-rank readings imply) as NCCL chooses, one with NCCL_MAX_NCHANNELS=1."""
    if not readings:
        return []
    from memcalc import nccl

    one_rank = nccl.Channels(64, 64, 0, False, False, "a one-rank communicator: MAXCHANNELS")
    lines = ["", ("NCCL on one GPU (`--nccl`): device memory beside the allocator's as one-rank communicators are made "
                  "(each group's delta is that communicator's), against memcalc.nccl's part made at init:"), "",
             ("| setting | NCCL | first kernel | default group | group 1 (delta) | group 2 (delta) | memcalc | error | "
              "failure |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, reading in readings.items():
        predicted = nccl.Layout(one_rank, nccl.Environment.read(NCCL_SETTINGS.get(name, {}))).fixed(nvls=False)
        values = [reading.get(k) for k in ("first kernel", "default group and an all-reduce",
                                           "one-rank group 1 and an all-reduce", "one-rank group 2 and an all-reduce")]
        deltas = [b - a if isinstance(a, int) and isinstance(b, int) else None for a, b in itertools.pairwise(values)]
        measured = deltas[2] if deltas[2] is not None else deltas[1]
        error = f"{(predicted - measured) / measured * 100:+.1f}%" if measured else "-"

        def mib(value: int | None) -> str:
            return "-" if value is None else f"{value / 2**20:,.0f} MiB"

        lines.append(f"| {name} | {reading.get('nccl', '-')} | {mib(values[0])} | {mib(values[1])} | "
                     f"{mib(deltas[1])} | {mib(deltas[2])} | {mib(predicted)} | {error} | "
                     f"{reading.get('failure', '')} |")
    return lines


# Where cudaMalloc puts each new segment (--placement): memcalc.allocator places each below the earlier ones, as an
# H200's snapshots implied (their segments, listed by address, had the newest lowest: benchmarks/segment_order.py);
# the allocator breaks best-fit ties by address, so this decides which of two cached blocks of one size is reused.
# Read in a fresh process: tensors kept alive, each request too large for any cached block, so each opens a segment
# (large-pool requests of 12 MiB and more, exact-sized; 4 MiB requests, five to a 20 MiB segment; 1 MiB requests, two
# to a 2 MiB small-pool segment), their addresses in the order made.
_PLACEMENT = """
import json, torch
torch.ones(1, device="cuda").sum().item()
found, kept = {}, []
for name, size, count in (("large", None, 0), ("20 MiB segments", 4 << 20, 15), ("2 MiB segments", 1 << 20, 6)):
    sizes = [12 << 20, 64 << 20, 1 << 30, 256 << 20, 2 << 30] if size is None else [size] * count
    made = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
    found[name] = [t.data_ptr() for t in made]
    kept += made  # (all kept alive: no freed block takes a later request)
print(json.dumps(found))
"""


def placement_readings(limit_s: float = 60) -> dict[str, dict[str, list[int] | str]]:
    """The addresses of tensors that each open a segment, in the order made (--placement), in a fresh process."""
    return _fresh_readings(_PLACEMENT, {"default": {}}, "placement", limit_s)


def placement_markdown(readings: dict[str, dict]) -> list[str]:
    """Whether each new segment lay below the earlier ones (memcalc.allocator's placement), per pool: a segment's first
    tensor is the one whose address is not within the previous segment's span."""
    if not readings:
        return []
    lines = ["", ("Segment placement (`--placement`): the addresses of tensors that each open a segment, in the order "
                  "made; memcalc.allocator places each new segment below the earlier ones:"), "",
             "| pool | segments | each below the last | addresses (hex, in the order made) | failure |",
             "|---|---:|---|---|---|"]
    for name, reading in readings.items():
        if "failure" in reading:
            lines.append(f"| {name} | - | - | - | {reading['failure']} |")
            continue
        for pool, addresses in reading.items():
            span = 20 << 20 if pool.startswith("20") else 2 << 20 if pool.startswith("2 MiB") else 0
            starts = [a for i, a in enumerate(addresses) if i == 0 or not 0 <= a - addresses[i - 1] < span]
            below = all(b < a for a, b in itertools.pairwise(starts))
            lines.append(f"| {pool} | {len(starts)} | {'yes' if below else 'no'} | "
                         f"{', '.join(hex(a) for a in addresses)} | |")
    return lines


TITLE = "# Accuracy on a CUDA GPU (`python benchmarks/gpu_validation.py`)"


def markdown(env: dict[str, str], rows: list[Row], checks: list[CliCheck] = (),
             contexts: dict[str, dict[str, int | str]] | None = None, title: str = TITLE,
             nccl: dict[str, dict[str, int | str]] | None = None, note: str = "",
             placement: dict[str, dict] | None = None) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.3f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.2f}%"

    lines = [title, "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "", *([note, ""] if note else []),
             ("Estimate: memcalc's peak (live tensors) plus the card's cuBLAS workspaces (ws: one per handle, "
              "`memcalc.allocator`) and what earlier configurations left allocated (held at start, beyond the "
              "workspaces) against `requested_bytes.all.peak`; replay: the measured step's own allocations "
              "through memcalc.allocator against `reserved_bytes.all.peak`; held at start: reserved / allocated when "
              "the configuration began. In GiB."), "",
             ("| configuration | estimate | ws | requested | error | phase (estimate / measured) | allocated | "
              "reserved | replayed reserved | error | --reserved | error | held at start | retries | OOMs | s | "
              "failure |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = f"{r.estimate_phase or '-'} / {r.measured_phase or '-'}"
        held = f"{gib(r.reserved_at_start_bytes)} / {gib(r.allocated_at_start_bytes)}"
        lines.append(f"| {r.label} | {gib(r.estimate_bytes)} | {gib(r.workspace_bytes)} | {gib(r.requested_bytes)} | "
                     f"{pct(r.allocated_error)} | "
                     f"{phases} | {gib(r.allocated_bytes)} | {gib(r.reserved_bytes)} | {gib(r.replayed_reserved_bytes)} | "
                     f"{pct(r.reserved_error)} | {gib(r.predicted_reserved_bytes)} | {pct(r.predicted_reserved_error)} | "
                     f"{held} | "
                     f"{'-' if r.retries is None else r.retries} | "
                     f"{'-' if r.ooms is None else r.ooms} | {r.seconds:.1f} | {r.failure} |")
    for name, errors, target in (
            ("estimate + workspaces (+ left by earlier) vs requested", [r.allocated_error for r in rows],
             TARGET_ALLOCATED_PCT),
            ("replayed vs measured reserved", [r.reserved_error for r in rows], TARGET_RESERVED_PCT),
            ("--reserved vs measured reserved", [r.predicted_reserved_error for r in rows], TARGET_RESERVED_PCT)):
        found = [abs(e) for e in errors if e is not None]
        if found:
            lines.append(f"\n{name}: {len(found)} rows, median |error| {statistics.median(found):.2f}%, worst "
                         f"{max(found):.2f}%, {sum(e <= target for e in found)} within the {target:g}% target")
    phased = [r for r in rows if r.estimate_phase_bytes and r.measured_phase_bytes]
    if phased:
        lines += ["", "Each phase's peak, estimate / measured (GiB, the measured less the workspaces):", "",
                  "| configuration | forward | backward | optimizer step |", "|---|---|---|---|"]
        for r in phased:
            cells = [f"{gib(r.estimate_phase_bytes.get(p))} / {gib(r.measured_phase_bytes.get(p))} "
                     f"({pct(Row.pct(r.estimate_phase_bytes.get(p), r.measured_phase_bytes.get(p)))})"
                     for p in ("forward", "backward", "optimizer_step")]
            lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    lines += context_markdown(contexts or {})
    lines += nccl_markdown(nccl or {})
    lines += placement_markdown(placement or {})
    for check in checks:
        capped = ("" if check.memory_fraction is None else
                  f" (run as `python -c \"{_CAPPED.format(fraction=check.memory_fraction)}\"` with these arguments)")
        lines += ["", (f"`memcalc {' '.join(check.argv)}`{capped} ({check.label}): exit {check.exit_code}, "
                       f"{check.seconds:.1f} s"),
                  "", "```", (check.stdout_tail + check.stderr).strip(), "```"]
    return "\n".join(lines) + "\n"


def _write_raw(folder: Path, env: dict[str, str], rows: list[Row], checks: list[CliCheck],
               events: dict[str, list], contexts: dict | None = None, nccl: dict | None = None,
               placement: dict | None = None) -> None:
    """rows.json (rewritten; with the CUDA context readings and the recorded histories' summaries), and
    events.jsonl.gz: each measured case's allocations appended once, then dropped."""
    import gzip
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.json").write_text(json.dumps(
        {"env": env, "rows": [asdict(r) for r in rows], "cli": [asdict(c) for c in checks],
         "context": contexts or {}, "nccl": nccl or {}, "placement": placement or {},
         "history": {k: v for k, v in HISTORY.items() if v}},
        indent=1))
    with gzip.open(folder / "events.jsonl.gz", "at") as handle:
        for label in list(events):
            handle.write(json.dumps({"label": label, "events": events.pop(label)}) + "\n")


# Rows a run measured with a harness fault since fixed: what the step ran instead of what the label says (a GPU run
# from before the fix, re-rendered with --rerender, shows them as failures, not as errors of the estimate).
# Keyed by the run's "harness" (written into its env since the fix; the 2026-12-04 H200 run has none).
HARNESS = "3"
HARNESS_FAULTS = {
    None: {" eager ": "ran sdpa, not eager: the harness passed no attn_implementation to the step (fixed after "
                               "this run; eager on CUDA is unmeasured)",
                   " Liger ": "ran Liger's RoPE, RMSNorm and SwiGLU kernels too (apply_liger_kernel_to_llama's "
                              "defaults; fixed after this run): measured 12.202 GiB against the loss-only estimate's "
                              "14.137, the other kernels' savings, not the fused loss's"},
}


RERENDERED = ("Re-rendered without a GPU (--rerender): the measured columns are the run's; \"replayed reserved\" is "
              "this memcalc.allocator's replay of each measured step's allocations as the run kept them, and "
              "\"--reserved\" its replay of the row's trace where one is kept beside the run (trace-events.json.gz), "
              "else the run's.")


def _kept_events(folder: Path) -> dict[str, list]:
    """A run's events.jsonl.gz: each measured row's tracked allocations, by label (the last kept of a label)."""
    import gzip
    import json

    path = folder / "events.jsonl.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as handle:
        return {data["label"]: [tuple(e) for e in data["events"]] for data in map(json.loads, handle)}


def kept_traces(folder: Path) -> dict[str, list]:
    """A row's trace as --reserved makes it, where one is kept beside the run (trace-events.json.gz, written by
    benchmarks/replay_vs_gpu_sequence.py --save), by label."""
    import gzip
    import json

    path = folder / "trace-events.json.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as handle:
        data = json.load(handle)
    return {data["label"]: [tuple(e) for e in data["events"]]}


def rerender(folder: Path, cli_folder: Path | None = None, recompute: bool = True, replays: bool = True
             ) -> tuple[dict[str, str], list[Row], list[CliCheck], dict[str, dict]]:
    """A run's rows.json again, with each --verify row's estimate recomputed by this memcalc (the estimate needs no
    GPU; the measured columns are the run's own); the compiled, float8 and Liger rows keep theirs (their estimate
    traces compiled layers for minutes). ``cli_folder``: the command-line checks from another run's rows.json.
    ``recompute`` False: every row keeps the estimate the run computed (on the GPU machine, under its transformers:
    what a traced family's estimate and a version-dependent rule, Falcon's, depend on). ``replays``: each row's
    "replayed reserved" is this memcalc.allocator's replay of the measured step's allocations, where the run kept
    them (events.jsonl.gz), not the run's, and "--reserved" this memcalc's replay of the row's trace where one is kept
    beside the run (trace-events.json.gz); elsewhere "--reserved" stays the run's."""
    import json

    data = json.loads((folder / "rows.json").read_text())
    env, by_label = data["env"], ({case.label: case for case in cases(parts=PARTS)} if recompute else {})
    faults = HARNESS_FAULTS.get(env.get("harness"), {})
    events, traces = (_kept_events(folder), kept_traces(folder)) if replays else ({}, {})
    rows = []
    for fields in data["rows"]:
        row = Row(**{k: (v if k != "segments" or v is None else [tuple(x) for x in v]) for k, v in fields.items()})
        case = by_label.get(row.label)
        fault = next((why for key, why in faults.items() if key in row.label), "")
        per_handle = (row.workspace_bytes or 0) // CUBLAS_HANDLES_PER_STEP or None
        if row.label in events and row.replayed_reserved_bytes is not None:  # (replayed by this memcalc.allocator)
            _replay_row(row, events[row.label], per_handle)
        if row.label in traces and row.predicted_reserved_bytes is not None:
            row.predicted_reserved_bytes = replay_measured(traces[row.label], row.label, per_handle,
                                                           held_beyond_workspaces(row.allocated_at_start_bytes,
                                                                                  row.workspace_bytes)
                                                           ).reserved_peak_bytes
        if fault:
            row.failure, row.estimate_bytes, row.replayed_reserved_bytes = fault, None, None
        elif case is not None and not case.library and row.estimate_bytes is not None:
            _unused, model = _config(case)
            peak = run(model, case.spec).per_gpu.step_peak()
            row.estimate_bytes, row.estimate_phase = peak.bytes, peak.phase.value
        rows.append(row)
    checks = [CliCheck(**c) for c in json.loads(((cli_folder or folder) / "rows.json").read_text()).get("cli", [])]
    return env, rows, checks, data.get("context", {})


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
    parser.add_argument("--rerender", type=Path, metavar="DIR", help="no GPU: write --out again from a run's "
                        "rows.json in DIR, each --verify row's estimate recomputed by this memcalc")
    parser.add_argument("--cli-from", type=Path, metavar="DIR", help="with --rerender: the command-line checks from "
                        "another run's rows.json")
    parser.add_argument("--with-run", type=Path, action="append", default=[], metavar="DIR", help="with --rerender: "
                        "another run's rows as a section of their own, each estimate as that run computed it")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"which configurations, in this order: "
                        f"{', '.join(PARTS)} (default: all but families)")
    parser.add_argument("--history", default="", metavar="LABEL[;LABEL]", help="record these configurations' "
                        "measured steps with torch.cuda.memory._record_memory_history; with --raw, what was live at "
                        "the peak and at the end by allocating stack goes into rows.json")
    parser.add_argument("--history-from-build", action="store_true", help="--history records from the "
                        "configuration's build on (its warm-up step too), not from the measured step")
    parser.add_argument("--only", default="", metavar="TEXT[;TEXT]", help="of those, only the configurations whose "
                        "label contains one of these")
    parser.add_argument("--context", action="store_true", help="also read the CUDA context in fresh processes, "
                        "lazy and eager module loading, as a process goes on")
    parser.add_argument("--placement", action="store_true", help="also read where cudaMalloc puts each new segment "
                        "(tensors that each open one, their addresses in the order made), in a fresh process")
    parser.add_argument("--nccl", action="store_true", help="also read one-rank NCCL communicators' device memory in "
                        "fresh processes, as NCCL chooses and with NCCL_MAX_NCHANNELS=1")
    args = parser.parse_args(argv)
    parts = tuple(part.strip() for part in args.parts.split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        print(f"gpu_validation: unknown --parts {', '.join(unknown)}; known: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.rerender is not None:
        env, rows, checks, contexts = rerender(args.rerender, args.cli_from)
        import json

        kept = json.loads((args.rerender / "rows.json").read_text()).get("nccl", {})
        text = markdown(env, rows, checks, contexts, nccl=kept, note=RERENDERED)
        for folder in args.with_run:
            env, more, _checks, contexts = rerender(folder, recompute=False)
            text += "\n" + markdown(env, more, [], contexts, note=RERENDERED, title=(
                f"## {folder.name}: the estimates as that run computed them (on the GPU machine, transformers "
                f"{env.get('transformers', '?')})"))
            rows += more
        args.out.write_text(text, encoding="utf-8")
        print(f"gpu_validation: {len(rows)} rows from {args.rerender}, written to {args.out}", file=sys.stderr)
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_validation: no CUDA GPU here (torch.cuda.is_available() is False); nothing was written",
              file=sys.stderr)
        return 1
    started = time.perf_counter()
    checks = cli_checks() if args.cli else []
    contexts = context_readings() if args.context and args.device.startswith("cuda") else {}
    communicators = nccl_readings() if args.nccl and args.device.startswith("cuda") else {}
    placement = placement_readings() if args.placement and args.device.startswith("cuda") else {}
    events: dict[str, list] = {}
    HISTORY.update({label.strip(): {} for label in args.history.split(";") if label.strip()})
    HISTORY_FROM_BUILD[0] = args.history_from_build

    def write(env: dict[str, str], rows: list[Row]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(env, rows, checks, contexts, nccl=communicators, placement=placement),
                            encoding="utf-8")
        if args.raw is not None:
            _write_raw(args.raw, env, rows, checks, events, contexts, communicators, placement)

    budget = args.budget - (time.perf_counter() - started)
    wanted = [text.strip() for text in args.only.split(";") if text.strip()]
    selected = [case for case in cases(args.quick, parts) if not wanted or any(text in case.label for text in wanted)]
    env, rows = validate(selected, args.device, budget, args.case_limit, events, write)
    if args.device.startswith("cuda"):  # the context once every configuration's kernels were loaded
        from memcalc.measure.cuda import cuda_context_bytes

        context = cuda_context_bytes(args.device)
        env["cuda_context_after_run"] = "unknown" if context is None else f"{context:,} B ({context / 2**20:.0f} MiB)"
    write(env, rows)
    print(f"gpu_validation: {len(rows)} configurations, written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
