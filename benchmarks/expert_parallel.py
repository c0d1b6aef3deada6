"""Expert-parallel ranks: memcalc's estimate of the most loaded rank against real gloo ranks.

    python benchmarks/expert_parallel.py [--routing worst,random] [--families mixtral,qwen3_moe]
                                         [--layouts 2x2,4x2,4x4] [--precision bf16-pure,amp-bf16,bf16]
                                         [--checkpointing none,full] [--experts N] [--shard-dim 1] [--zero 2] [--cp]
                                         [--tp 2 [--sp]]

Each row runs tests/tiny.py's MoE model (2 layers, 4 experts, top-2) on ``gpus`` gloo ranks with transformers' own
expert-parallel plan (grouped_gemm on the fused experts, ep_dispatch_experts with AllToAllEP) under FSDP2 (the experts
over the data_parallel / ep ranks holding the same ones, everything else over all of them: memcalc.measure.
expert_parallel), a warm-up and a measured AdamW step under memcalc's tensor tracker; every rank records the
(token, expert) pairs it received in each MoE layer. ``worst``: all weights zero (initializer_range 0), so every
router sends every pair to the same experts, on one rank (ep x the average); ``random``: the usual random init.
The estimate is memcalc's at the --ep-load the measured routing implies: the most loaded layer of the most loaded rank
over T x top-k (applied to every layer, as the flag is). Prints the markdown table of docs/accuracy.md's "Expert
parallelism" section.

``--tp N``: transformers' layout with tensor parallelism: the dense part over tp ranks (memcalc's plan), FSDP2 over the
gpus / tp data-parallel ranks, the experts' ep ranks spanning whole tp groups; each tp rank dispatches its slice of
the group's tokens (the load is over that slice's pairs). ``--sp``: sequence parallelism and loss parallelism too.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from memcalc.spec import TrainingSpec

BATCH, SEQ = 2, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routing", default="worst,random")
    parser.add_argument("--families", default="mixtral,qwen3_moe")
    parser.add_argument("--layouts", default="2x2,4x2,4x4", help="gpus x ep")
    parser.add_argument("--precision", default="bf16-pure,amp-bf16,bf16")
    parser.add_argument("--checkpointing", default="none,full")
    parser.add_argument("--zero", type=int, default=3, help="--zero 3 (reshard after forward) or 2 (not)")
    parser.add_argument("--cp", action="store_true", help="every data-parallel rank a context-parallel rank too (--cp "
                        "gpus / tp: sequences of 64 x cp positions, each rank running 64, torch's ring attention over "
                        "the data-parallel ranks)")
    parser.add_argument("--shard-dim", type=int, default=0, help="--ep-shard-dim: 0 transformers', 1 torchtitan's")
    parser.add_argument("--experts", type=int, help="experts per layer (tests/tiny.py's 4 unless given; 2 with "
                        "--layouts 4x2 puts one expert per rank over 2 FSDP2 ranks: dim-0 shards padded)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks inside each data-parallel rank")
    parser.add_argument("--sp", action="store_true", help="with --tp: sequence and loss parallelism")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from memcalc.api import run
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of
    from tests.tiny import tiny_raw

    print("| routing | model | gpus | ep | recipe | checkpointing | --ep-load | estimate | measured | error | "
          "phase (est. / meas.) | s |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|---|---:|")
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]
    for routing, family, (gpus, ep), precision, checkpointing in itertools.product(
            args.routing.split(","), args.families.split(","), layouts, args.precision.split(","),
            args.checkpointing.split(",")):
        raw = {**tiny_raw(family), **({"initializer_range": 0.0} if routing == "worst" else {})}
        if args.experts:
            raw["num_local_experts" if "num_local_experts" in raw else "num_experts"] = args.experts
        cp = gpus // args.tp if args.cp else 1  # (--cp: every data-parallel rank a context-parallel one)
        spec = TrainingSpec(precision=precision, micro_batch_size=BATCH, seq_len=SEQ * cp,
                            num_gpus=gpus, zero_stage=args.zero, cp=cp,
                            sharding="fsdp", ep=ep, checkpointing=checkpointing, ep_shard_dim=args.shard_dim,
                            tp=args.tp, sequence_parallel=args.sp, loss_parallel=args.sp)
        started = time.perf_counter()
        ranks = measure_distributed(raw, spec, engine="fsdp2", world_size=gpus, method="gloo",
                                    reshard_after_forward=args.zero == 3, sequence_parallel=args.sp,
                                    loss_parallel=args.sp)
        received = [max(m.run["distributed"]["ep_received_pairs"]) for m in ranks]
        sent = -(-BATCH * spec.local_seq_len // args.tp) * raw["num_experts_per_tok"]  # (a tp rank's slice)
        load = max(received) / sent
        busiest = max(ranks, key=lambda m: m.measured_peak_bytes)
        report = run(model_of(ModelConfig("tiny", raw, "benchmark")), spec.replace(ep_load=load))
        estimate = report.per_gpu
        error = 100 * (estimate.peak_bytes / busiest.measured_peak_bytes - 1)
        print(f"| {routing} | {family} | {gpus} | {ep} | {precision} | {checkpointing} | {load:.3f} | "
              f"{estimate.peak_bytes:,} | {busiest.measured_peak_bytes:,} | {error:+.2f}% | "
              f"{estimate.peak_phase.value} / {busiest.measured_peak_phase} | {time.perf_counter() - started:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
