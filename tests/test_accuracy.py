"""The accuracy matrix (benchmarks/accuracy.py) run against the tolerance the activation issue sets.

Median absolute error of the peak <= 0.01%, worst <= 0.05%, and the peak phase right in every configuration,
over the CPU-tracked matrix (every third of its 36 configurations, three families). Rows whose CPU
run differs from a GPU run by construction (CPU autocast) are reported but not held to the tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy

# What is achieved (measured 2026-12-02 on this CPU: median 0.005%, worst 0.032%), with a small margin.
MEDIAN_TOLERANCE_PCT = 0.01
WORST_TOLERANCE_PCT = 0.05
# Full-size Llama-3-8B traces: 0.00% without checkpointing and with it (-0.00%, 516 bytes, measured 2026-12-03; +0.35%
# before the checkpointed backward's moments of the any-architecture issue were modelled).
TRACE_TOLERANCE_PCT = {("bf16-pure", "none", 2048): 0.01, ("amp-bf16", "full", 8192): 0.01}


def test_cpu_tracked_matrix_within_tolerance():
    # every third configuration (the suite's time; all 36 run in `python benchmarks/accuracy.py --part recipes`)
    cases = accuracy.matrix()[::3]
    assert len(cases) >= 12 and len({c.family for c in cases}) >= 3
    results = [accuracy.measure_case(case) for case in cases]
    print("\n" + accuracy.table(results))
    median, worst, phase_misses = accuracy.summary(results)
    print(f"median {median:.3f}%  worst {worst:.3f}%  phase misses {phase_misses}")
    assert median <= MEDIAN_TOLERANCE_PCT
    assert worst <= WORST_TOLERANCE_PCT
    assert phase_misses == 0


@pytest.mark.parametrize(("precision", "checkpointing", "seq_len", "impl"),
                         [("bf16-pure", "none", 2048, "foreach"), ("amp-bf16", "full", 8192, "fused")])
def test_traced_llama3_8b_within_tolerance(precision, checkpointing, seq_len, impl):
    """Full-size Llama-3-8B under FakeTensorMode (a few seconds each): peak within what is achieved, phase right. (The
    bf16-pure trace is the one tests/test_verify_trace.py checks term by term, measured once for both.)"""
    from tests.test_verify_trace import traced_llama_3_8b

    shared = traced_llama_3_8b if (precision, checkpointing, seq_len, impl) == ("bf16-pure", "none", 2048, "foreach") \
        else None
    result = accuracy.trace_llama3(seq_len, precision, checkpointing, impl=impl, measure=shared)
    print(f"{result.label}: estimate {result.estimated:,} measured {result.measured:,} ({result.error_pct:+.2f}%)")
    assert abs(result.error_pct) <= TRACE_TOLERANCE_PCT[(precision, checkpointing, seq_len)]
    assert result.phase_estimated == result.phase_measured
