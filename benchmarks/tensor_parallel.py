"""Tensor-parallel ranks: memcalc's estimate of one rank against that rank measured, at full size.

    python benchmarks/tensor_parallel.py [--model llama-3-8b] [--layouts 2,4,8,8sp,8sp-lp] [--precision bf16-pure]
                                         [--seq-len 2048] [--batch 1] [--checkpointing none,full] [--dp N]
    python benchmarks/tensor_parallel.py --families mixtral,qwen3_moe,qwen2_moe [--layouts 2,2sp-lp] [--dp 2]
                                         [--precision bf16-pure,amp-bf16,fp32] [--gloo]

Each measurement builds the real transformers class under FakeTensorMode (no memory), applies PyTorch's parallel
styles with torchtitan's plan (memcalc.measure.tensor_parallel) on one rank of a fake process group, and runs a
warm-up and a measured AdamW step under memcalc's tensor tracker with CUDA's semantics. A layout is the group size,
``sp`` for sequence parallelism and ``lp`` for loss parallelism (``8sp-lp``). Prints the markdown table of
docs/accuracy.md's "Tensor parallelism" section.

``--dp N`` puts FSDP2 (``--zero 3``) over N tensor-parallel groups, as torchtitan composes them (rank 0 of the
dp x tp fake group). ``--families``: tests/tiny.py's small configs of those model types instead (batch 2 x 256),
each recipe of ``--precision`` and each checkpointing; ``--gloo`` runs every rank as a gloo process (real values)
and reports the busiest.
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
    parser.add_argument("--layouts", help="default 2,4,8,8sp,8sp-lp; with --families (2 kv heads) 2,2sp,2sp-lp")
    parser.add_argument("--precision", default="bf16-pure")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", default="none,full")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--families", help="tests/tiny.py's configs of these model types (comma-separated)")
    parser.add_argument("--dp", type=int, default=1,
                        help="FSDP2 (--zero 3) over this many tensor-parallel groups")
    parser.add_argument("--gloo", action="store_true", help="with --families: real gloo ranks, the busiest reported")
    args = parser.parse_args()
    if args.families:
        args.layouts = args.layouts or "2,2sp,2sp-lp"
        _families(args)
        return
    args.layouts = args.layouts or "2,4,8,8sp,8sp-lp"

    from memcalc.measure import cuda_semantics
    from memcalc.measure.distributed import measure_distributed

    model = model_input(args.model, None)
    raw = {**model.config.raw, "_name": args.model}
    print("| model | layout | recipe | checkpointing | estimate | measured | error | phase (est. / meas.) | s |")
    print("|---|---|---|---|---:|---:|---:|---|---:|")
    for layout in args.layouts.split(","):
        tp, sp, lp = _layout(layout)
        for checkpointing in args.checkpointing.split(","):
            fsdp = {"sharding": "fsdp", "zero_stage": 3} if args.dp > 1 else {}
            spec = TrainingSpec(precision=args.precision, micro_batch_size=args.batch, seq_len=args.seq_len,
                                attention=args.attention, checkpointing=checkpointing, num_gpus=tp * args.dp, tp=tp,
                                sequence_parallel=sp, loss_parallel=lp, **fsdp)
            estimate = run(model, spec).per_gpu
            started = time.perf_counter()
            with cuda_semantics.like_cuda():
                measured = measure_distributed(raw, spec, engine="fsdp2" if args.dp > 1 else "tp",
                                               world_size=tp * args.dp, method="fake", sequence_parallel=sp,
                                               loss_parallel=lp, like_cuda=True)[0]
            seconds = time.perf_counter() - started
            error = 100 * (estimate.peak_bytes - measured.measured_peak_bytes) / measured.measured_peak_bytes
            name = (f"{f'dp {args.dp} x ' if args.dp > 1 else ''}TP {tp}{' + SP' if sp else ''}"
                    f"{' + loss parallel' if lp else ''}")
            print(f"| {args.model} | {name} | {args.precision} {args.attention} b{args.batch} s{args.seq_len} | "
                  f"{checkpointing} | {estimate.peak_bytes / 2**30:.3f} GiB | "
                  f"{measured.measured_peak_bytes / 2**30:.3f} GiB | {error:+.2f}% | "
                  f"{estimate.peak_phase.value} / {measured.measured_peak_phase} | {seconds:.0f} |", flush=True)


def _families(args: argparse.Namespace) -> None:
    import itertools
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (for tests/tiny.py)
    from memcalc.api import model_of
    from memcalc.measure import cuda_semantics
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from tests.tiny import tiny_raw

    print("| model | layout | recipe | checkpointing | estimate | measured | error | phase (est. / meas.) | states "
          "| s |")
    print("|---|---|---|---|---:|---:|---:|---|---|---:|")
    for family, layout, precision, checkpointing in itertools.product(
            args.families.split(","), args.layouts.split(","), args.precision.split(","),
            args.checkpointing.split(",")):
        tp, sp, lp = _layout(layout)
        fsdp = {"sharding": "fsdp", "zero_stage": 3} if args.dp > 1 else {}
        spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=256, attention=args.attention,
                            checkpointing=checkpointing, num_gpus=tp * args.dp, tp=tp, sequence_parallel=sp,
                            loss_parallel=lp, **fsdp)
        raw = tiny_raw(family)
        report = run(model_of(ModelConfig("tiny", raw, "benchmark")), spec)
        started = time.perf_counter()
        engine = "fsdp2" if args.dp > 1 else "tp"
        options = {"engine": engine, "world_size": tp * args.dp, "sequence_parallel": sp, "loss_parallel": lp}
        if args.gloo:
            ranks = measure_distributed({**raw, "_name": "tiny"}, spec, method="gloo", **options)
        else:
            with cuda_semantics.like_cuda():
                ranks = measure_distributed({**raw, "_name": "tiny"}, spec, method="fake", like_cuda=True, **options)
        measured = max(ranks, key=lambda m: m.measured_peak_bytes)
        seconds = time.perf_counter() - started
        terms = {t.name: t.bytes for t in report.per_gpu.terms}
        exact = all(terms[n] == measured.model_state_bytes[n] for n in ("weights", "gradients", "optimizer_states"))
        peak = report.per_gpu.peak_bytes
        error = 100 * (peak - measured.measured_peak_bytes) / measured.measured_peak_bytes
        name = (f"{f'dp {args.dp} x ' if args.dp > 1 else ''}TP {tp}{' + SP' if sp else ''}"
                f"{' + loss parallel' if lp else ''}{' (gloo)' if args.gloo else ''}")
        print(f"| {family} | {name} | {precision} {args.attention} b2 s256 | {checkpointing} | {peak:,} | "
              f"{measured.measured_peak_bytes:,} | {error:+.2f}% | {report.per_gpu.peak_phase.value} / "
              f"{measured.measured_peak_phase} | {'exact' if exact else 'differ'} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
