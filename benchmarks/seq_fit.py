"""--max-seq-len with traced activations: the search on lengths fitted from three traces (measure.derive
fitted_sequences, confirmed by real traces at the answer) against the search that traces every length it probes.

    python benchmarks/seq_fit.py [MODEL] [--gpu h100-80gb] [--attn sdpa|eager]

Each search runs in its own fresh cache folder; printed: the answer, its peak, the real traces made and the time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc import api
from memcalc.measure import derive


def search(model: str, gpu: str, attention: str, fitted: bool) -> tuple[object, int, float]:
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MEMCALC_CACHE_DIR"] = folder
        original = derive.fitted_sequences
        if not fitted:
            derive.fitted_sequences = contextlib.nullcontext  # every probed length traced
        try:
            start = time.perf_counter()
            report = api.estimate(model, precision="bf16-pure", optim="sgd", gpu=gpu, attn=attention,
                                  max_seq_len=True)
            seconds = time.perf_counter() - start
        finally:
            derive.fitted_sequences = original
        traces = len(list((Path(folder) / "traces").glob("*.json")))
    return report.fit, traces, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="olmo-2-7b")
    parser.add_argument("--gpu", default="h100-80gb")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    args = parser.parse_args()
    results = {}
    for fitted in (True, False):
        fit, traces, seconds = search(args.model, args.gpu, args.attn, fitted)
        results[fitted] = fit.max_seq_len
        label = "fitted, confirmed" if fitted else "every length traced"
        print(f"{label:20s} max seq len {fit.max_seq_len:,} (peak {fit.max_seq_len_peak_bytes:,} B), "
              f"{traces} traces, {seconds:.1f} s")
    print("same answer" if results[True] == results[False] else "ANSWERS DIFFER")


if __name__ == "__main__":
    main()
