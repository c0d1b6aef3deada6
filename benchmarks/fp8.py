"""--fp8 on one process: the step traced with torchao's float8 layers against a real CPU step of the same layers.

    python benchmarks/fp8.py [--families llama,qwen2,...]

torchao's Float8Linear (torchtitan's converter: Linear layers whose dims are multiples of 16, the output layer left
bf16) runs on the CPU (torch._scaled_mm) and under FakeTensorMode. Each row runs a warm-up and a measured step of a
tiny config of the family (tests/tiny.py) under memcalc's tracker (``--verify``'s cpu-tracker) and puts its forward and
backward peaks beside the estimate's (the step traced op by op with the same layers). Batch 2 x 128 tokens, AdamW.
Prints the markdown table of docs/accuracy.md's float8 section.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from tiny import tiny_raw

from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "qwen3_moe"]
PRECISIONS = ["bf16-pure", "bf16", "amp-bf16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()

    from memcalc.measure import estimate_for, run_verify

    print("| family | recipe | checkpointing | float8 | forward | backward |")
    print("|---|---|---|---|---:|---:|")
    errors = []
    for family in args.families.split(","):
        config = ModelConfig(family, tiny_raw(family), "tiny")
        for precision in PRECISIONS:
            for checkpointing in ("none", "full"):
                for recipe in ("tensorwise", "rowwise"):
                    spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=128,
                                        checkpointing=checkpointing, fp8=recipe)
                    measured = run_verify(config, spec, "cpu-tracker")
                    report = estimate_for(config, spec)
                    cells = []
                    for phase in report.per_gpu.phases[:2]:
                        real = measured.per_phase_peak_bytes[phase.phase.value]
                        errors.append(100 * (phase.bytes - real) / real)
                        cells.append(f"{errors[-1]:+.3f}%")
                    print(f"| {family} | {precision} | {checkpointing} | {recipe} | {' | '.join(cells)} |", flush=True)
    print(f"\n{len(errors)} phases: {min(errors):+.3f}% to {max(errors):+.3f}%, median |error| "
          f"{sorted(abs(e) for e in errors)[len(errors) // 2]:.3f}%")


if __name__ == "__main__":
    main()
