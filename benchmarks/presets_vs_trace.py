"""The hand rules against the traced step on real presets: each phase's peak, the rules' (`--activations rules`)
against the trace's (`--activations trace`: the model's own forward and backward op by op, memcalc/measure/timeline.py,
with CUDA's semantics), at a realistic shape.

    python benchmarks/presets_vs_trace.py [--presets a,b] [--seq-len 2048] [--batch 2] [--checkpointing none,full]

SGD without momentum keeps the optimizer step small, so the peak is where the activations are.
"""

from __future__ import annotations

import argparse

from memcalc.api import model_input, run
from memcalc.spec import TrainingSpec

PRESETS = ("phi-3-mini", "mistral-7b", "qwen2.5-7b", "llama-3-8b", "falcon-7b", "gpt2-xl", "opt-1.3b",
           "mixtral-8x7b", "deepseek-v2-lite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--checkpointing", default="none,full")
    args = parser.parse_args()
    print("| preset | recipe | attention | checkpointing | peak | forward | backward | moment (rules / trace) |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for name in args.presets.split(","):
        model = model_input(name, None)
        for recipe in ("bf16-pure", "amp-bf16"):
            for attention in ("sdpa", "eager"):
                for checkpointing in args.checkpointing.split(","):
                    settings = {"precision": recipe, "checkpointing": checkpointing, "seq_len": args.seq_len,
                                "micro_batch_size": args.batch, "attention": attention, "optimizer": "sgd"}
                    rules = run(model, TrainingSpec(**settings, activations="rules")).per_gpu
                    trace = run(model, TrainingSpec(**settings, activations="trace")).per_gpu
                    by_rules = {p.phase: p for p in rules.phases}
                    by_trace = {p.phase: p for p in trace.phases}

                    def pct(a: int, b: int) -> str:
                        return f"{100 * (a - b) / b:+.2f}%"

                    phases = [pct(by_rules[p].bytes, by_trace[p].bytes) for p in by_trace if p.value != "optimizer_step"]
                    peak = by_trace[trace.peak_phase]
                    print(f"| {name} | {recipe} | {attention} | {checkpointing} | {pct(rules.peak_bytes, trace.peak_bytes)} "
                          f"| {' | '.join(phases)} | {by_rules[rules.peak_phase].moment} / {peak.moment} |", flush=True)


if __name__ == "__main__":
    main()
