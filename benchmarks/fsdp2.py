"""FSDP2 ranks at full size: memcalc's estimate of one rank against that rank traced on the fake process group.

    python benchmarks/fsdp2.py [--cases 0,1,...]

Each row builds the real transformers class under FakeTensorMode (no memory), wraps it as memcalc's FSDP2 engine does
(fully_shard on every decoder layer, then the root; ZeRO-3 = reshard_after_forward, ZeRO-2 = not), and runs a warm-up
and a measured AdamW step as rank 0 of a fake process group, with CUDA's semantics, under memcalc's tensor tracker
(memcalc.measure.distributed, method "fake"). Batch 1, 2,048 tokens. Prints the markdown table of docs/accuracy.md's
"FSDP2 ranks at full size" section.
"""

from __future__ import annotations

import argparse
import time

from memcalc.spec import TrainingSpec

# (model, recipe, attention, checkpointing, gpus, ZeRO stage[, tensor-parallel ranks: FSDP2 over the dp dimension of a
# (dp, tp) mesh, torchtitan's plan with sequence and loss parallelism])
CASES = [
    ("llama-3-8b", "bf16-pure", "sdpa", "none", 8, 3),
    ("llama-3-8b", "bf16", "sdpa", "none", 8, 3),
    ("llama-3-8b", "amp-bf16", "eager", "none", 8, 3),
    ("llama-3-8b", "bf16-pure", "sdpa", "full", 8, 3),
    ("llama-3-8b", "bf16", "sdpa", "full", 8, 3),
    ("llama-3-8b", "amp-bf16", "sdpa", "full", 8, 3),
    ("llama-3-8b", "bf16-pure", "eager", "full", 8, 3),
    ("llama-3-8b", "bf16", "eager", "full", 8, 3),
    ("llama-3-8b", "amp-bf16", "eager", "full", 8, 3),
    ("llama-3-8b", "bf16-pure", "sdpa", "full", 4, 2),
    ("llama-3-8b", "bf16", "sdpa", "full", 4, 2),
    ("phi-3-mini", "bf16-pure", "sdpa", "full", 8, 3),
    ("phi-3-mini", "bf16-pure", "eager", "full", 8, 3),
    ("opt-1.3b", "bf16-pure", "eager", "full", 8, 3),
    ("qwen2.5-7b", "bf16", "sdpa", "full", 4, 3),
    ("gemma-2-9b", "bf16-pure", "eager", "full", 8, 3),
    ("llama-3-8b", "bf16", "sdpa", "none", 16, 3, 2),
    ("llama-3-8b", "bf16", "sdpa", "full", 16, 3, 2),
    ("llama-3-8b", "bf16-pure", "sdpa", "full", 16, 3, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    args = parser.parse_args()

    from memcalc.measure import _as_config, cuda_semantics, estimate_for
    from memcalc.measure.distributed import measure_distributed
    from memcalc.resolve import model_input

    print("| model | recipe | attention | checkpointing | gpus | ZeRO | tp | estimate | measured | error | "
          "phase (est. / meas.) | s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for index in (int(n) for n in args.cases.split(",")):
        model, precision, attention, checkpointing, gpus, stage, *tp = CASES[index]
        tp = tp[0] if tp else 1
        raw = {**model_input(model, None).config.raw, "_name": model}
        spec = TrainingSpec(precision=precision, attention=attention, checkpointing=checkpointing, seq_len=2048,
                            micro_batch_size=1, num_gpus=gpus, zero_stage=stage, sharding="fsdp", tp=tp,
                            sequence_parallel=tp > 1, loss_parallel=tp > 1)
        estimate = estimate_for(_as_config(raw), spec).per_gpu
        started = time.perf_counter()
        with cuda_semantics.like_cuda():
            measured = measure_distributed(raw, spec, engine="fsdp2", world_size=gpus, method="fake", like_cuda=True,
                                           reshard_after_forward=stage == 3, sequence_parallel=tp > 1,
                                           loss_parallel=tp > 1)[0]
        error = 100 * (estimate.peak_bytes / measured.measured_peak_bytes - 1)
        print(f"| {model} | {precision} | {attention} | {checkpointing} | {gpus} | {stage} | {tp} | "
              f"{estimate.peak_bytes / 2**30:.3f} GiB | {measured.measured_peak_bytes / 2**30:.3f} GiB | {error:+.2f}% | "
              f"{estimate.peak_phase.value} / {measured.measured_peak_phase} | {time.perf_counter() - started:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
