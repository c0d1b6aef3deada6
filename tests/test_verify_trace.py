"""--verify=trace: the full-size Llama-3-8B step under FakeTensorMode, through the tracker."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memcalc.api import model_input, run
from memcalc.measure import compare, run_verify
from memcalc.spec import TrainingSpec

LLAMA_3_8B_PARAMS = 8_030_261_248
SPEC = TrainingSpec(precision="bf16-pure", optimizer="adamw", optim_impl="foreach", micro_batch_size=1, seq_len=2048)


def traced_llama_3_8b(config, spec: TrainingSpec):
    """The full-size Llama-3-8B bf16-pure step traced once per test run (this file and tests/test_accuracy.py check
    it), whichever xdist worker asks first."""
    from tests.conftest import shared_measurement

    assert spec == SPEC, spec
    return shared_measurement("test_verify_trace-llama-3-8b-bf16-pure-foreach-2048",
                              lambda: run_verify(config, spec, "trace"))


@pytest.mark.slow
def test_llama_3_8b_bf16_pure_traced_at_full_size():
    model = model_input("llama-3-8b", None)
    spec = SPEC
    started = time.perf_counter()
    measured = traced_llama_3_8b(model.config, spec)
    elapsed = time.perf_counter() - started
    report = run(model, spec)

    assert measured.method == "trace"
    assert measured.run["num_params"] == LLAMA_3_8B_PARAMS
    assert measured.run["weight_dtype"] == "bfloat16"
    # Model states: exact, and what bf16-pure AdamW means (2 + 2 + 2x2 bytes per parameter).
    for term in ("weights", "gradients", "optimizer_states"):
        assert measured.model_state_bytes[term] == report.term(term).bytes
    assert measured.model_state_bytes["weights"] == 2 * LLAMA_3_8B_PARAMS
    assert measured.model_state_bytes["optimizer_states"] == 4 * LLAMA_3_8B_PARAMS
    # The GPU's attention path: SDPA flash kernel, is_causal, no math fallback, no explicit mask.
    assert not any("math kernel" in d for d in measured.differences_from_gpu)
    assert set(measured.per_phase_peak_bytes) == {"forward", "backward", "optimizer_step"}

    gib = 2**30
    rows = compare(report, measured)
    print(f"\nLlama-3-8B bf16-pure seq 2048 traced in {elapsed:.1f} s: estimated peak "
          f"{report.per_gpu.peak_bytes / gib:.3f} GiB ({report.per_gpu.peak_phase.value}), measured "
          f"{measured.measured_peak_bytes / gib:.3f} GiB ({measured.measured_peak_phase})")
    for row in rows:
        measured_gib = "-" if row.measured_bytes is None else f"{row.measured_bytes / gib:9.3f}"
        print(f"  {row.term:24} {row.estimate_bytes / gib:9.3f} {measured_gib:>9} GiB  {row.error_pct}%")
