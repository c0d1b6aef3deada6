"""What a verification measured. Plain data (no torch): the CLI and JSON rendering read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from memcalc.vocab import METHOD_CPU_TRACKER, METHOD_CUDA, METHOD_TRACE, METHODS  # noqa: F401 (measure's names)


@dataclass
class Measurement:
    """One measured steady-state training step (after a warm-up step that created the optimizer state).

    Bytes are integers. ``per_term_bytes`` is the composition of live memory at the measured peak, keyed by
    the estimator's term names where one corresponds (``weights``, ``master_weights``, ``gradients``,
    ``optimizer_states``, ``autocast_weight_copies``, ``activations``, ``logits_and_loss``, ``fp32_grad_copy``,
    ``optimizer_temporaries``) plus ``backward_temporaries`` and ``other`` (inputs, buffers, host-side step
    counters). ``term_bytes`` is the figure each estimator term (a size, not a moment) is compared with: model
    states by identity (``model_state_bytes``: parameters, p.grad after backward, optimizer.state, master
    copies); activations, logits/loss buffers and autocast copies as left alive at the end of the forward
    (``forward_end_bytes``, the composition when backward began); temporaries at their largest over the step
    (``term_max_bytes``, which also holds each category's largest size including forward transients).
    """

    method: str
    measured_peak_bytes: int
    measured_peak_phase: str
    per_phase_peak_bytes: dict[str, int]
    per_term_bytes: dict[str, int]
    term_bytes: dict[str, int] = field(default_factory=dict)
    term_max_bytes: dict[str, int] = field(default_factory=dict)
    forward_end_bytes: dict[str, int] = field(default_factory=dict)
    model_state_bytes: dict[str, int] = field(default_factory=dict)
    optimizer_state_breakdown: dict[str, int] = field(default_factory=dict)
    differences_from_gpu: list[str] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)  # what ran: model class, recipe, optimizer, kernel, ...
    baseline_bytes: int = 0  # live when the measured step began (weights, states, master, inputs)
    tracker_peak_bytes: int | None = None  # the tensor tracker's own peak (differs from a CUDA allocator peak)
    reserved_peak_bytes: int | None = None  # cuda: max_memory_reserved()
    cuda_context_bytes: int | None = None  # cuda: device used minus reserved, where it could be read
    elapsed_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # cuda: torch.cuda.memory_stats() over the measured step (requested/active/allocated/reserved peaks, retries, OOMs)
    allocator_stats: dict[str, int] = field(default_factory=dict)
    # Every device storage's allocation and free from the model's load through the measured step, in order
    # (memcalc.allocator events), for the caching-allocator replay beside the measurement; not in to_dict
    allocation_events: list[tuple[int, int, int]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("allocation_events")
        return data
