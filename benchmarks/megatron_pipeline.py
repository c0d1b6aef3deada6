"""Megatron-LM's 1F1B pipeline schedule (``--engine megatron --pp``): memcalc's estimate of each stage against that
stage run by megatron-core's own schedule on real gloo ranks.

    pip install megatron-core==0.16.1     # (not in the extras: this script and one test use it)
    python benchmarks/megatron_pipeline.py            # the grid below
    python benchmarks/megatron_pipeline.py --quick    # one cell per stage count

megatron-core's ``forward_backward_pipelining_without_interleaving`` and ``P2PCommunicator`` run the stages of a small
Llama (hidden 256, intermediate 512, 8 heads, 4 kv heads, vocabulary 1024; two decoder layers per stage, Megatron's
even split), micro-batches of 2 x 128 tokens, one gloo rank per stage, with the settings Megatron's trainer gives them
(memcalc.measure.megatron_pipeline). Each rank's model states are the recipe's under torch's optimizer (Megatron's DDP
buffers and optimizer need CUDA), so the estimate compared is the same spec with the schedule set to Megatron's
(``pp_runtime="megatron"``): what is measured is the schedule's part, exactly the part ``--engine megatron --pp`` adds
to Megatron's model states (memcalc.megatron, read from its code). fused AdamW. About 12 minutes on two cores.
"""

from __future__ import annotations

import argparse
import itertools

from memcalc.api import run
from memcalc.model import ModelConfig
from memcalc.resolve import model_of
from memcalc.spec import TrainingSpec

SMALL_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
               "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
               "max_position_embeddings": 1024, "pad_token_id": 0}

# (stages, micro-batches): fewer micro-batches than stages (Megatron allows it), as many, and more
LAYOUTS = ((2, 1), (2, 2), (2, 4), (3, 2), (3, 5), (4, 4), (4, 6))
RECIPES = ("bf16", "fp32", "amp-bf16", "bf16-pure")
CHECKPOINTING = ("none", "full")


def spec_for(pp: int, microbatches: int, precision: str, checkpointing: str) -> TrainingSpec:
    return TrainingSpec(precision=precision, optim_impl="fused", micro_batch_size=2, seq_len=128,
                        checkpointing=checkpointing, num_gpus=pp, pp=pp, microbatches=microbatches,
                        pp_runtime="megatron")


def measure(pp: int, microbatches: int, precision: str, checkpointing: str) -> list[tuple]:
    """One row per stage: (stage, estimate, its phase, measured, its phase, error %)."""
    from memcalc.measure.distributed import measure_distributed

    raw = {**SMALL_LLAMA, "num_hidden_layers": 2 * pp}
    spec = spec_for(pp, microbatches, precision, checkpointing)
    model = model_of(ModelConfig("small-llama", raw, "benchmarks/megatron_pipeline.py"))
    rows = []
    for measured in measure_distributed({**raw, "_name": "small-llama"}, spec, engine="pp", world_size=pp,
                                        method="gloo"):
        stage = measured.run["distributed"]["stage"]
        report = run(model, spec.replace(pp_stage=stage))
        peak, phase = report.per_gpu.peak_bytes, report.per_gpu.peak_phase.value
        error = 100 * (peak - measured.measured_peak_bytes) / measured.measured_peak_bytes
        rows.append((stage, peak, phase, measured.measured_peak_bytes, measured.measured_peak_phase, error))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16, no checkpointing, one cell per stage count")
    args = parser.parse_args()
    from memcalc.measure import megatron_pipeline

    if not megatron_pipeline.available():
        raise SystemExit("megatron-core is not installed: pip install megatron-core==0.16.1")
    cells = ([(2, 4, "bf16", "none"), (3, 5, "bf16", "none"), (4, 6, "bf16", "none")] if args.quick else
             [(pp, m, precision, ckpt) for (pp, m), precision, ckpt in itertools.product(LAYOUTS, RECIPES,
                                                                                           CHECKPOINTING)
              if precision in ("bf16", "fp32") or (pp, m) in ((2, 4), (3, 5))])
    print("| stages | micro-batches | recipe | checkpointing | stage | estimate B | phase | measured B | phase | error |")
    print("|---:|---:|---|---|---:|---:|---|---:|---|---:|")
    errors = []
    for pp, m, precision, ckpt in cells:
        for stage, peak, phase, measured, measured_phase, error in measure(pp, m, precision, ckpt):
            errors.append(error)
            print(f"| {pp} | {m} | {precision} | {ckpt} | {stage} | {peak:,} | {phase} | {measured:,} | "
                  f"{measured_phase} | {error:+.2f}% |", flush=True)
    print(f"\n{len(errors)} stage steps: {min(errors):+.2f}% to {max(errors):+.2f}%")


if __name__ == "__main__":
    main()
