"""``--verify`` on a CUDA GPU: the caching allocator's own peak over a steady-state step.

The step is the CPU tracker's (same model build, recipe, optimizer implementation, inputs), on the GPU:
warm-up step, ``torch.cuda.reset_peak_memory_stats()``, the measured step. At each phase boundary (forward,
backward, the optimizer step, opened also by the global optimizer step pre-hook) the peak of the phase just
ended is read with ``max_memory_allocated()`` and the peak statistics are reset, so each phase gets its own
peak and the step's peak is the largest of them. ``max_memory_reserved()`` and the CUDA context
(device memory in use minus what the allocator reserved, from ``mem_get_info``) are reported apart. The tensor
tracker runs alongside and gives the composition of the peak by term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from memcalc.errors import OutOfMemoryError, UsageError
from memcalc.measure import tracker as trk
from memcalc.measure.measurement import Measurement
from memcalc.measure.step import PhaseClock, Progress, execute, to_measurement
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

# torch.cuda.memory_stats() keys read over the measured step (the peaks per phase, the largest kept): the tensors'
# own bytes (requested), blocks in use or waiting on another stream (active), blocks handed out (allocated: 512-byte
# rounding and unsplit remainders), segments held (reserved); and the allocator's counters
PEAK_STATS = ("requested_bytes.all.peak", "active_bytes.all.peak", "allocated_bytes.all.peak",
              "reserved_bytes.all.peak")
COUNTERS = ("num_alloc_retries", "num_ooms")


class CudaPhaseClock(PhaseClock):
    """Per-phase allocator peaks: reset the peak at each phase start, read it at the phase end."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.current: str | None = None
        self.peaks: dict[str, int] = {}
        self.reserved_peak = 0
        self.stats: dict[str, int] = {}  # memory_stats() peaks over the phases, counters at the end
        self.phase_start_allocated: dict[str, int] = {}
        self._hook = None

    def install(self) -> None:
        self._hook = register_optimizer_step_pre_hook(lambda _opt, _args, _kwargs: self.enter(trk.OPTIMIZER_STEP))

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _close(self) -> None:
        if self.current is None:
            return
        torch.cuda.synchronize(self.device)
        peak = int(torch.cuda.max_memory_allocated(self.device))
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        self.reserved_peak = max(self.reserved_peak, int(torch.cuda.max_memory_reserved(self.device)))
        stats = torch.cuda.memory_stats(self.device)
        for key in PEAK_STATS:
            if key in stats:
                self.stats[key] = max(self.stats.get(key, 0), int(stats[key]))
        for key in COUNTERS:
            if key in stats:
                self.stats[key] = int(stats[key])

    def enter(self, phase: str) -> None:
        if phase == self.current:
            return
        self._close()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.current = phase
        self.phase_start_allocated.setdefault(phase, int(torch.cuda.memory_allocated(self.device)))

    def finish(self) -> None:
        self._close()
        self.current = None


def cuda_context_bytes(device: torch.device | str | None = None) -> int | None:
    """Device memory in use that the caching allocator did not reserve (the CUDA context, cuBLAS handles, other
    processes). None where it cannot be read."""
    try:
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(total - free) - int(torch.cuda.memory_reserved(device)))
    except (RuntimeError, AttributeError, AssertionError):
        return None


def measure_cuda(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, attn_implementation: str = "sdpa",
                 progress: Progress | None = None, device: str = "cuda") -> Measurement:
    if not torch.cuda.is_available():
        raise UsageError("{verify}=cuda needs a CUDA GPU (torch.cuda.is_available() is False); use {verify} or "
                         "{verify}=trace")
    clock = CudaPhaseClock(device if device.startswith("cuda") else None)

    def before_measured_step() -> None:
        torch.cuda.synchronize(clock.device)
        torch.cuda.reset_peak_memory_stats(clock.device)
        clock.install()

    import gc

    collecting = gc.isenabled()
    gc.disable()  # no collection pass frees (or delays freeing) tensors inside the measured step
    try:
        result = execute(model_config, spec, device=device, attn_implementation=attn_implementation, clock=clock,
                         progress=progress, before_measured_step=before_measured_step, allocation_events=True)
    except torch.cuda.OutOfMemoryError as error:
        first = " ".join(str(error).split(". GPU")[0].split())  # "CUDA out of memory. Tried to allocate X"
        raise OutOfMemoryError(f"verify: the step ran out of GPU memory ({first}): it does not fit this GPU as "
                               "configured; the estimate above says by how much") from None
    finally:
        clock.remove()
        if collecting:
            gc.enable()
    measurement = to_measurement("cuda", result)
    versions = _versions()
    # the card's cuBLAS workspaces (one per handle: this thread's and autograd's device thread's), allocated by the
    # caching allocator in the warm-up step and kept: inside every allocated peak, not a tensor the estimate counts
    # (the fit counts them apart: memcalc.allocator.cublas_workspace_bytes)
    from memcalc.allocator import CUBLAS_HANDLES_PER_STEP, step_workspace_bytes

    workspaces = step_workspace_bytes(versions.get("compute_capability"))
    peaks = {name: max(0, value - workspaces) for name, value in clock.peaks.items()}
    phase, peak = max(peaks.items(), key=lambda item: item[1]) if peaks else (trk.FORWARD, 0)
    measurement.measured_peak_bytes = peak
    measurement.measured_peak_phase = phase
    measurement.per_phase_peak_bytes = peaks
    measurement.reserved_peak_bytes = clock.reserved_peak
    measurement.cuda_context_bytes = cuda_context_bytes(clock.device)
    measurement.baseline_bytes = clock.phase_start_allocated.get(trk.FORWARD, measurement.baseline_bytes)
    measurement.run["device_name"] = _device_name(clock.device)
    measurement.run.update(versions)
    measurement.allocator_stats = dict(clock.stats)
    measurement.differences_from_gpu = []
    measurement.notes.append(
        "measured_peak_bytes is torch.cuda.max_memory_allocated() (allocator blocks: 512-byte rounding) less the "
        + (f"card's {CUBLAS_HANDLES_PER_STEP} cuBLAS workspaces "
           f"({workspaces:,} B, kept by the allocator, counted by the fit apart)" if workspaces else
           "cuBLAS workspaces (none known for this card: kept in)")
        + "; per_term_bytes is the tensor tracker's composition of its own peak (tracker_peak_bytes)")
    return measurement


def _versions() -> dict[str, str]:
    """What the reserved figures depend on: torch and its CUDA runtime, the driver, the allocator's settings."""
    from memcalc.allocator import environment_alloc_conf

    found = {"torch": torch.__version__, "cuda_runtime": str(torch.version.cuda),
             "alloc_conf": environment_alloc_conf()[0]}
    try:
        major, minor = torch.cuda.get_device_capability()
        found["compute_capability"] = f"{major}.{minor}"
    except (RuntimeError, AssertionError, AttributeError):
        pass
    found["driver"] = _driver_version()
    return found


def _driver_version() -> str:
    """The NVIDIA driver's release as nvidia-smi reports it (torch exposes only the CUDA driver API's version, and
    not in every release); "unknown" without nvidia-smi."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], check=False,
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else "unknown"


def _device_name(device) -> str:
    try:
        return str(torch.cuda.get_device_name(device))
    except (RuntimeError, AssertionError, AttributeError):
        return "unknown"
