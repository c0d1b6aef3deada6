"""The trace-derived estimate against full-depth traces of the whole step: the table behind docs/accuracy.md's
"Traced activations" section.

    python benchmarks/traced.py

For each model and run: the estimate with --activations trace (and the rules, or for a family without hand
rules the approximation they replace), with the fused AdamW step (no temporaries: the peak is in forward or
backward, where the activations are), beside --verify=trace's measurement of the whole training step at full size
(FakeTensorMode: no memory), phase by phase; then the estimate's time cold (a fresh cache) and from the cache,
as whole processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memcalc.api import model_of, run
from memcalc.measure.trace import measure_trace
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

HERE = Path(__file__).resolve().parent
OLMO2 = HERE / "configs" / "olmo-2-1124-7b.json"
LLAMA3 = HERE.parent / "presets" / "models" / "llama-3-8b.json"
RUNS = [(recipe, checkpointing) for checkpointing in ("none", "full") for recipe in ("bf16-pure", "amp-bf16")]
PHASES = ("forward", "backward", "optimizer_step")


def _pct(estimate: int, measured: int) -> str:
    return f"{100 * (estimate - measured) / measured:+.2f}%"


def main() -> None:
    rows = []
    for name, path, seq in (("OLMo-2-7B (no hand rules)", OLMO2, 4096), ("Llama-3-8B", LLAMA3, 2048)):
        raw = json.loads(path.read_text())
        model = model_of(ModelConfig(name, raw, str(path)))
        for recipe, checkpointing in RUNS:
            # The fused optimizer step keeps no temporaries, so the peak is where the activations are.
            spec = TrainingSpec(precision=recipe, seq_len=seq, checkpointing=checkpointing, optim_impl="fused",
                                activations="trace")
            traced = run(model, spec).per_gpu
            approx = run(model, spec.replace(activations="rules")).per_gpu
            measured = measure_trace(raw, spec)
            phases = {p.phase.value: p.bytes for p in traced.phases}
            errors = [_pct(phases[ph], measured.per_phase_peak_bytes[ph]) for ph in PHASES]
            rows.append((name, recipe, checkpointing, _pct(traced.peak_bytes, measured.measured_peak_bytes),
                         f"{traced.peak_phase.value} / {measured.measured_peak_phase}", *errors,
                         _pct(approx.peak_bytes, measured.measured_peak_bytes)))
    print("| model | recipe | checkpointing | peak (trace) | peak phase (estimate / measured) | forward | "
          "backward | optimizer step | peak (rules or approximation) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MEMCALC_CACHE_DIR": cache}
        command = [sys.executable, "-m", "memcalc", str(OLMO2), "--seq-len", "4096", "--json"]
        for label in ("cold (fresh cache)", "from the cache"):
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            print(f"\nOLMo-2-7B estimate, whole process, {label}: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
