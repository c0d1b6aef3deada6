"""A tensor-lifetime tracker: live bytes, the running peak and its composition, per phase of a training step.

``MemoryTracker`` is a ``TorchDispatchMode``. Every op that runs under it is inspected after it ran: each
output whose storage the tracker has not seen is registered (its ``nbytes``, a category, the phase) and a
weak reference to the storage's Python object (which PyTorch keeps alive exactly as long as the C++ storage)
subtracts it again when the storage is freed. Views and in-place results share a registered storage and
are not counted twice. It works the same for real CPU/CUDA tensors and for ``FakeTensor`` s, whose storages
report the bytes they would have.

Categories (the estimator's term names where one corresponds):
  weights, master_weights, gradients, optimizer_states       by identity (parameters, p.grad after
                                                              accumulation, optimizer.state tensors)
  autocast_weight_copies   a forward-phase cast (_to_copy) of a parameter storage
  activations              created in the forward, before the output head
  logits_and_loss          created in the forward from the output head on (logits, loss buffers)
  backward_temporaries     created in the backward and not a gradient (includes recomputed activations)
  fp32_grad_copy           fp32 gradients of master weights (mixed precision with an fp32 master)
  optimizer_temporaries    created in the optimizer step and not optimizer state
  other                    inputs, buffers, host-side step counters, anything before the step started
Phases: ``forward`` from ``start()`` until the first op inside an autograd graph task
(``torch._C._current_graph_task_id() != -1``), then ``backward`` until the optimizer step, which the global
optimizer step hooks (or an explicit ``mark("optimizer_step")``) open.

Not seen: memory a kernel allocates for itself and frees before returning (a scratch buffer inside one op)
and allocations outside PyTorch ops. The test compares the peak with the CPU allocator's own record.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memcalc.allocator import ALLOC, FREE

WEIGHTS = "weights"
MASTER = "master_weights"
GRADIENTS = "gradients"
OPTIMIZER_STATES = "optimizer_states"
AUTOCAST_COPIES = "autocast_weight_copies"
ACTIVATIONS = "activations"
LOGITS_AND_LOSS = "logits_and_loss"
BACKWARD_TEMPORARIES = "backward_temporaries"
FP32_GRAD_COPY = "fp32_grad_copy"
OPTIMIZER_TEMPORARIES = "optimizer_temporaries"
OTHER = "other"
HOST = "host_activations"  # saved activations offloaded to host memory: counted apart, never in live bytes
CATEGORIES = (WEIGHTS, MASTER, GRADIENTS, OPTIMIZER_STATES, AUTOCAST_COPIES, ACTIVATIONS, LOGITS_AND_LOSS,
              BACKWARD_TEMPORARIES, FP32_GRAD_COPY, OPTIMIZER_TEMPORARIES, OTHER)
SETUP = "setup"
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER_STEP = "optimizer_step"
PHASES = (FORWARD, BACKWARD, OPTIMIZER_STEP)

_aten = torch.ops.aten
# Ops whose output is a tensor PyTorch made outside the dispatcher (torch.tensor(...) literals): their storage
# is new even though it is also the op's input.
_LIFT_OPS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
_CAST_OPS = {_aten._to_copy.default}
# The autograd graph task running on this thread (-1 outside backward).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


@dataclass
class Snapshot:
    """Live bytes by category at one moment (``seq`` orders moments)."""

    seq: int
    phase: str
    total_bytes: int
    by_category: dict[str, int]


@dataclass
class _Record:
    key: int
    nbytes: int
    category: str
    seq: int
    ref: Any = field(repr=False, default=None)


def _storage_of(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (NotImplementedError, RuntimeError, TypeError):  # sparse, nested, opaque tensors
        return None


class MemoryTracker(TorchDispatchMode):
    """Tracks live tensor-storage bytes, by category and phase, over one training step (one ``with`` per
    tracker: leaving it removes the hooks it installed).

    Usage::

        tracker = MemoryTracker()
        tracker.register(model.parameters(), "weights")        # what exists before the step
        tracker.watch_gradients(model.parameters())
        with tracker:                                          # enter: the step starts (forward)
            loss = model(x).loss; loss.backward(); opt.step()
        tracker.peak_bytes, tracker.peak_phase, tracker.peak.by_category
    """

    def __init__(self, record_timeline: bool = False) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._records: dict[int, _Record] = {}
        self.by_category: dict[str, int] = {c: 0 for c in CATEGORIES}
        self.live_bytes = 0
        self.baseline_bytes = 0
        self.peak: Snapshot = Snapshot(0, SETUP, 0, dict(self.by_category))
        self.phase_peaks: dict[str, Snapshot] = {}
        self.phase_entries: dict[str, Snapshot] = {}  # composition when each phase began
        self.category_max: dict[str, int] = {c: 0 for c in CATEGORIES}
        self.record_timeline = record_timeline
        self.timeline: list[Snapshot] = []
        self._seq = 0
        self._phase = SETUP
        self._in_loss = False
        self._handles: list[Any] = []
        self._state_owners: list[tuple[Any, bool]] = []  # (optimizer, fused): state tensors are optimizer state
        self._host_depth = 0  # inside host(): new storages are host memory (activation offloading's copies)
        self.host_bytes = 0
        self.host_peak_bytes = 0
        # When a list: every device storage's allocation and free, in order, as memcalc.allocator.replay takes them
        # ((ALLOC, key, nbytes) and (FREE, key, 0)); a resize is a free and a new allocation.
        self.events: list[tuple[int, int, int]] | None = None

    # -- phases ------------------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        if self._phase == FORWARD and _graph_task_id() != -1:
            self._set_phase(BACKWARD)  # sticky: the rest of the step until the optimizer step is "backward"
        return self._phase

    def mark(self, phase: str) -> None:
        """Set the phase explicitly (e.g. before a master-weight step's gradient cast)."""
        if phase not in PHASES and phase != SETUP:
            raise ValueError(f"unknown phase {phase!r}")
        self._set_phase(phase)

    def _set_phase(self, phase: str) -> None:
        with self._lock:
            if phase == self._phase:
                return
            self._phase = phase
            if phase != FORWARD:
                self._in_loss = False
            if phase in PHASES:
                snap = self._snapshot()
                self.phase_entries.setdefault(phase, snap)
                best = self.phase_peaks.get(phase)
                if best is None or snap.total_bytes > best.total_bytes:
                    self.phase_peaks[phase] = self._snapshot()

    def start(self) -> None:
        """The measured step begins: everything live now is the baseline; the phase is forward."""
        with self._lock:
            self.baseline_bytes = self.live_bytes
            self.peak = self._snapshot()
            self.phase_peaks = {}
            self.phase_entries = {}
            self.category_max = dict(self.by_category)
            self.timeline = []
            self._phase = SETUP
            self._set_phase(FORWARD)

    def __enter__(self):
        self.start()
        self._handles.append(register_optimizer_step_pre_hook(self._optimizer_pre_hook))
        self._handles.append(register_optimizer_step_post_hook(self._optimizer_post_hook))
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self.remove_hooks()
        return result

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _optimizer_pre_hook(self, optimizer, args, kwargs) -> None:
        if _graph_task_id() != -1:
            return  # a step inside backward (an optimizer per parameter, stepped in its gradient hook) is backward
        self._set_phase(OPTIMIZER_STEP)  # sticky until the step ends

    def _optimizer_post_hook(self, optimizer, args, kwargs) -> None:
        for owner, fused in self._state_owners:
            if owner is optimizer:
                self.register_optimizer_state(optimizer, fused)

    def loss_region(self, module: torch.nn.Module) -> None:
        """Count what is created from this module's forward on (the output head) as logits_and_loss."""

        def pre_hook(_module, _args):
            if self.phase == FORWARD:
                self._in_loss = True

        self._handles.append(module.register_forward_pre_hook(pre_hook))

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created inside are host memory (an offloaded activation's copy): counted in ``host_bytes``, apart
        from the device's live bytes."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    # -- identity --------------------------------------------------------------------------------------------
    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count these tensors' storages as live (if new) and as ``category``."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._classify(t, category)

    def watch_gradients(self, params: Iterable[torch.nn.Parameter], category: str = GRADIENTS) -> None:
        """Reclassify each p.grad as a gradient the moment autograd has accumulated it."""
        for p in params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    lambda param, c=category: self._classify(param.grad, c) if param.grad is not None else None))

    def watch_optimizer(self, optimizer: Any, fused: bool) -> None:
        """Count this optimizer's state tensors as optimizer state now and after each of its steps."""
        self._state_owners.append((optimizer, fused))
        self.register_optimizer_state(optimizer, fused)

    def register_optimizer_state(self, optimizer: Any, fused: bool) -> None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    # torch.optim keeps "step" on the host unless fused/capturable: not GPU memory.
                    self._classify(value, OTHER if key == "step" and not fused else OPTIMIZER_STATES)

    def _classify(self, t: torch.Tensor, category: str) -> None:
        storage = _storage_of(t)
        if storage is None:
            return
        with self._lock:
            rec = self._records.get(id(storage))
            if rec is None:
                self._add(storage, category)
            elif rec.category != category:
                self._move(rec, category)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _snapshot(self) -> Snapshot:
        return Snapshot(self._seq, self._phase, self.live_bytes, dict(self.by_category))

    def _add(self, storage, category: str) -> None:
        nbytes = int(storage.nbytes())
        key = id(storage)
        self._seq += 1
        rec = _Record(key, nbytes, category, self._seq)
        rec.ref = weakref.ref(storage, lambda _ref, k=key: self._free(k))
        self._records[key] = rec
        if self.events is not None and category != HOST:
            self.events.append((ALLOC, key, nbytes))
        self._change(category, nbytes)

    def _free(self, key: int) -> None:
        with self._lock:
            rec = self._records.pop(key, None)
            if rec is not None:
                self._seq += 1
                if self.events is not None and rec.category != HOST:
                    self.events.append((FREE, rec.key, 0))
                self._change(rec.category, -rec.nbytes)

    def _resize(self, rec: _Record, nbytes: int) -> None:
        self._seq += 1
        delta = nbytes - rec.nbytes
        rec.nbytes = nbytes
        if self.events is not None and rec.category != HOST:
            self.events += [(FREE, rec.key, 0), (ALLOC, rec.key, nbytes)]
        self._change(rec.category, delta)

    def _kept_snapshots(self) -> tuple[Snapshot, ...]:
        """The snapshots kept as results, which a relabelled storage relabels too."""
        return (self.peak, *self.phase_peaks.values(), *self.phase_entries.values())

    def _move(self, rec: _Record, category: str) -> None:
        """Relabel a live storage. Snapshots taken while it was alive are relabelled too, so a peak's
        composition names a gradient a gradient even if the peak came between its allocation and its
        accumulation into p.grad."""
        old = rec.category
        rec.category = category
        self.by_category[old] -= rec.nbytes
        self.by_category[category] += rec.nbytes
        self.category_max[category] = max(self.category_max[category], self.by_category[category])
        for snap in self._kept_snapshots():
            if snap.seq >= rec.seq and snap.by_category.get(old, 0) >= rec.nbytes:
                snap.by_category[old] -= rec.nbytes
                snap.by_category[category] = snap.by_category.get(category, 0) + rec.nbytes
        if self.record_timeline:
            self.timeline.append(self._snapshot())

    def _change(self, category: str, delta: int) -> None:
        if category == HOST:
            self.host_bytes += delta
            self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)
            return
        # The phase first: an allocation that opens the backward (an FSDP2 all-gather's storage resized on another
        # thread, say) is the backward's, not part of what the forward left (phase_entries), whichever op comes first.
        phase = self.phase if delta > 0 else self._phase
        self.by_category[category] += delta
        self.live_bytes += delta
        if delta <= 0:
            if self.record_timeline:
                self.timeline.append(self._snapshot())
            return
        self.category_max[category] = max(self.category_max[category], self.by_category[category])
        if self.live_bytes > self.peak.total_bytes:
            self.peak = self._snapshot()
        if phase in PHASES:
            best = self.phase_peaks.get(phase)
            if best is None or self.live_bytes > best.total_bytes:
                self.phase_peaks[phase] = self._snapshot()
        if self.record_timeline:
            self.timeline.append(self._snapshot())

    def _category_for_new(self, func, args, kwargs) -> str:
        if self._host_depth:
            return HOST
        phase = self.phase
        if phase == OPTIMIZER_STEP:
            return OPTIMIZER_TEMPORARIES
        if phase == BACKWARD:
            return BACKWARD_TEMPORARIES
        if phase == FORWARD:
            if func in _CAST_OPS and args and isinstance(args[0], torch.Tensor):
                source = _storage_of(args[0])
                rec = self._records.get(id(source)) if source is not None else None
                if rec is not None and rec.category in (WEIGHTS, MASTER):
                    return AUTOCAST_COPIES
            return LOGITS_AND_LOSS if self._in_loss else ACTIVATIONS
        return OTHER

    # -- the dispatch hook -----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return out
        with self._lock:
            inputs: set[int] | None = None
            for t in outputs:
                if self._not_memory(t):
                    continue
                storage = _storage_of(t)
                if storage is None:
                    continue
                rec = self._records.get(id(storage))
                if rec is not None:
                    nbytes = int(storage.nbytes())
                    if nbytes != rec.nbytes:  # resize_ / out= grew or shrank it
                        self._resize(rec, nbytes)
                    continue
                if func not in _LIFT_OPS:
                    if inputs is None:
                        flat = tree_flatten((args, kwargs))[0]
                        inputs = {id(s) for s in (_storage_of(a) for a in flat if isinstance(a, torch.Tensor))
                                  if s is not None}
                    if id(storage) in inputs:
                        continue  # a view or in-place result of a tensor that existed before tracking
                self._add(storage, self._category_for_new(func, args, kwargs))
        return out

    def _not_memory(self, t: torch.Tensor) -> bool:
        """An op output that holds no memory of its own (a subclass may say so: a wrapper around another tensor)."""
        return False

    # -- results ----------------------------------------------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        return self.peak.total_bytes

    @property
    def peak_phase(self) -> str:
        return self.peak.phase

    def phase_peak_bytes(self) -> dict[str, int]:
        return {p: s.total_bytes for p, s in self.phase_peaks.items()}


def active() -> MemoryTracker | None:
    """The innermost MemoryTracker among the active dispatch modes, if any."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return next((mode for mode in reversed(_get_current_dispatch_mode_stack()) if isinstance(mode, MemoryTracker)),
                None)


def allocator_profiler():
    """A torch.profiler that records the CPU allocator's own allocations and frees (the tracker's cross-check)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def allocator_peak_and_end(prof) -> tuple[int, int]:
    """Peak and final change of the CPU allocator's live bytes over the profiled span, from its allocation and
    free records in time order (every thread: gloo's own tensors too)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live
