"""Tensor-parallel ranks: memcalc's estimate of one rank against that rank measured, at full size.

    python benchmarks/tensor_parallel.py [--model llama-3-8b] [--layouts 2,4,8,8sp,8sp-lp] [--precision bf16-pure]
                                         [--seq-len 2048] [--batch 1] [--checkpointing none,full]

Each measurement builds the real transformers class under FakeTensorMode (no memory), applies PyTorch's parallel
styles with torchtitan's plan (memcalc.measure.tensor_parallel) on one rank of a fake process group, and runs a
warm-up and a measured AdamW step under memcalc's tensor tracker with CUDA's semantics. A layout is the group size,
``sp`` for sequence parallelism and ``lp`` for loss parallelism (``8sp-lp``). Prints the markdown table of
docs/accuracy.md's "Tensor parallelism" section.
"""

from __future__ import annotations

import argparse
import time

from memcalc.api import model_input, run
from memcalc.spec import TrainingSpec


def _layout(text: str) -> tuple[int, bool, bool]:
    size = int("".join(ch for ch in text.split("-")[0] if ch.isdigit()))
    return size, "sp" in text, text.endswith("lp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--layouts", default="2,4,8,8sp,8sp-lp")
    parser.add_argument("--precision", default="bf16-pure")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", default="none,full")
    parser.add_argument("--attention", default="sdpa")
    args = parser.parse_args()

    from memcalc.measure import cuda_semantics
    from memcalc.measure.distributed import measure_distributed

    model = model_input(args.model, None)
    raw = {**model.config.raw, "_name": args.model}
    print("| model | layout | recipe | checkpointing | estimate | measured | error | phase (est. / meas.) | s |")
    print("|---|---|---|---|---:|---:|---:|---|---:|")
    for layout in args.layouts.split(","):
        tp, sp, lp = _layout(layout)
        for checkpointing in args.checkpointing.split(","):
            spec = TrainingSpec(precision=args.precision, micro_batch_size=args.batch, seq_len=args.seq_len,
                                attention=args.attention, checkpointing=checkpointing, num_gpus=tp, tp=tp,
                                sequence_parallel=sp, loss_parallel=lp)
            estimate = run(model, spec).per_gpu
            started = time.perf_counter()
            with cuda_semantics.like_cuda():
                measured = measure_distributed(raw, spec, engine="tp", world_size=tp, method="fake",
                                               sequence_parallel=sp, loss_parallel=lp, like_cuda=True)[0]
            seconds = time.perf_counter() - started
            error = 100 * (estimate.peak_bytes - measured.measured_peak_bytes) / measured.measured_peak_bytes
            name = f"TP {tp}{' + SP' if sp else ''}{' + loss parallel' if lp else ''}"
            print(f"| {args.model} | {name} | {args.precision} {args.attention} b{args.batch} s{args.seq_len} | "
                  f"{checkpointing} | {estimate.peak_bytes / 2**30:.3f} GiB | "
                  f"{measured.measured_peak_bytes / 2**30:.3f} GiB | {error:+.2f}% | "
                  f"{estimate.peak_phase.value} / {measured.measured_peak_phase} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
