"""Does the per-GPU peak fit a GPU, with what headroom, and which cheap changes would make it fit.

usable = GPU memory (nvidia-smi total) - CUDA context - allocator reserve; each is a named term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memcalc.optimizers import OptimImpl, OptimizerName
from memcalc.report import Fit, FitSuggestion, Report
from memcalc.spec import Checkpointing, TrainingSpec
from memcalc.units import BYTES_PER_MIB

# The CUDA context (driver, kernels, cuBLAS/cuDNN handles) is outside PyTorch's allocator. With lazy
# module loading (CUDA >= 11.7) it is about 300 MB (pytorch/pytorch#107667, ptrblck); 512 MiB leaves room
# for library handles and workspaces. An assumption, printed with every verdict; override --cuda-context.
DEFAULT_CUDA_CONTEXT_BYTES = 512 * BYTES_PER_MIB
# Memory the caching allocator reserves but cannot hand out (fragmentation, block rounding): reserved
# minus allocated at the peak. An assumption of 5% of the GPU, printed; override with --reserve-fraction.
DEFAULT_ALLOCATOR_RESERVE_FRACTION = 0.05

# GPU counts tried when suggesting ZeRO-3 over more GPUs.
SUGGESTED_GPU_COUNTS = (2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True, eq=False, repr=False)
class GpuTarget:
    name: str
    memory_bytes: int
    source: str
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    reserve_fraction: float = DEFAULT_ALLOCATOR_RESERVE_FRACTION

    @property
    def reserve_bytes(self) -> int:
        return round(self.memory_bytes * self.reserve_fraction)

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.cuda_context_bytes - self.reserve_bytes


def _candidate_changes(spec: TrainingSpec, architecture_known: bool) -> list[tuple[str, dict]]:
    """Changes in the order a user would try them: cheapest in effort and speed first."""
    changes: list[tuple[str, dict]] = []
    if spec.optimizer in (OptimizerName.adamw, OptimizerName.adam, OptimizerName.lion) and spec.optim_impl != OptimImpl.fused:
        changes.append(("--optim-impl fused", {"optim_impl": OptimImpl.fused}))
    if architecture_known and spec.checkpointing == Checkpointing.none:
        changes.append(("--checkpointing full", {"checkpointing": Checkpointing.full}))
    if spec.micro_batch_size > 1:
        changes.append(("--batch-size 1", {"micro_batch_size": 1}))
    if spec.num_gpus > 1:
        for stage in range(spec.zero_stage + 1, 4):
            changes.append((f"--zero {stage}", {"zero_stage": stage}))
    if spec.precision.value in ("bf16", "fp16"):  # drop the fp32 master copy
        changes.append((f"--precision {spec.precision.value}-pure", {"precision": f"{spec.precision.value}-pure"}))
    if spec.optimizer != OptimizerName.adamw_8bit:
        changes.append(("--optim adamw-8bit", {"optimizer": OptimizerName.adamw_8bit}))
    if spec.optimizer != OptimizerName.adafactor:
        changes.append(("--optim adafactor", {"optimizer": OptimizerName.adafactor}))
    if architecture_known and not spec.lora_rank:
        changes.append(("--lora-rank 16", {"lora_rank": 16}))
        changes.append(("--lora-rank 16 --qlora", {"lora_rank": 16, "qlora": True}))
    for num_gpus in SUGGESTED_GPU_COUNTS:
        if num_gpus > spec.num_gpus:
            changes.append((f"--zero 3 --gpus {num_gpus}", {"zero_stage": 3, "num_gpus": num_gpus}))
    return changes


def _plain(changes: dict) -> dict:
    """JSON-ready spec changes (enums as their values)."""
    return {key: getattr(value, "value", value) for key, value in changes.items()}


def _greedy_combination(
    spec: TrainingSpec, architecture_known: bool, gpu: GpuTarget, rerun: Callable[[TrainingSpec], Report]
) -> FitSuggestion | None:
    """Stack single-GPU changes in the order above, keeping each one that lowers the peak, until it fits."""
    current, peak, labels, changes = spec, rerun(spec).per_gpu.peak_bytes, [], {}
    for label, update in _candidate_changes(spec, architecture_known):
        if "num_gpus" in update or "lora_rank" in update or "zero_stage" in update:
            continue
        if "optimizer" in update and any(lbl.startswith("--optim ") for lbl in labels):
            continue  # one optimizer at a time
        changed = current.replace(**update)
        changed_peak = rerun(changed).per_gpu.peak_bytes
        if changed_peak < peak:
            current, peak, labels, changes = changed, changed_peak, [*labels, label], {**changes, **update}
            if peak <= gpu.usable_bytes:
                return FitSuggestion(change=" ".join(labels), peak_bytes=peak, fits=True, spec_changes=_plain(changes))
    return None


# Searches stop here: far past any micro-batch or sequence a GPU holds today.
MAX_SEARCH = 1 << 24


def largest_fitting(
    spec: TrainingSpec, field_name: str, gpu: GpuTarget, rerun: Callable[[TrainingSpec], Report]
) -> tuple[int, int]:
    """The largest value of ``field_name`` (micro_batch_size or seq_len) whose peak fits, and that peak.

    The peak grows with both, so a doubling search then a bisection needs about 2 log2(answer) estimates.
    Returns (0, peak at 1) when even 1 does not fit.
    """
    def peak(value: int) -> int:
        return rerun(spec.replace(**{field_name: value})).per_gpu.peak_bytes

    first = peak(1)
    if first > gpu.usable_bytes:
        return 0, first
    low, low_peak, high = 1, first, 2
    while high <= MAX_SEARCH and (high_peak := peak(high)) <= gpu.usable_bytes:
        low, low_peak, high = high, high_peak, high * 2
    high = min(high, MAX_SEARCH + 1)
    while high - low > 1:  # invariant: low fits, high does not
        middle = (low + high) // 2
        middle_peak = peak(middle)
        if middle_peak <= gpu.usable_bytes:
            low, low_peak = middle, middle_peak
        else:
            high = middle
    return low, low_peak


def check_fit(
    report: Report, spec: TrainingSpec, gpu: GpuTarget, rerun: Callable[[TrainingSpec], Report],
    solve_batch: bool = False, solve_seq_len: bool = False,
) -> Fit:
    """The verdict for ``report``; ``rerun`` re-estimates a changed spec for the suggestions."""
    peak = report.per_gpu.peak_bytes
    fits = peak <= gpu.usable_bytes
    suggestions: list[FitSuggestion] = []
    if not fits:
        tried_more_gpus = False
        for label, update in _candidate_changes(spec, report.model.architecture_known):
            if "num_gpus" in update and tried_more_gpus:
                continue
            changed = spec.replace(**update)
            changed_peak = rerun(changed).per_gpu.peak_bytes
            ok = changed_peak <= gpu.usable_bytes
            if "num_gpus" in update:
                if not ok:
                    continue
                tried_more_gpus = True  # report only the smallest GPU count that fits
            suggestions.append(FitSuggestion(change=label, peak_bytes=changed_peak, fits=ok, spec_changes=_plain(update)))
        if not any(s.fits for s in suggestions if "--lora" not in s.change and "--gpus" not in s.change):
            combined = _greedy_combination(spec, report.model.architecture_known, gpu, rerun)
            if combined is not None:
                suggestions.append(combined)
        suggestions.sort(key=lambda s: not s.fits)  # fitting changes first, otherwise in the order above
    solved: dict[str, int | None] = {}
    if solve_batch:
        solved["max_micro_batch_size"], solved["max_micro_batch_peak_bytes"] = largest_fitting(spec, "micro_batch_size", gpu, rerun)
    if solve_seq_len:
        solved["max_seq_len"], solved["max_seq_len_peak_bytes"] = largest_fitting(spec, "seq_len", gpu, rerun)
    return Fit(
        **solved,
        gpu=gpu.name, gpu_memory_bytes=gpu.memory_bytes, gpu_memory_source=gpu.source,
        cuda_context_bytes=gpu.cuda_context_bytes, allocator_reserve_bytes=gpu.reserve_bytes,
        usable_bytes=gpu.usable_bytes, peak_bytes=peak, headroom_bytes=gpu.usable_bytes - peak, fits=fits,
        suggestions=suggestions,
    )
