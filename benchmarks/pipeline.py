"""Pipeline stages: memcalc's estimate of each stage against that stage measured on real gloo ranks.

    python benchmarks/pipeline.py                      # the small Llama on gloo ranks (the table below)
    python benchmarks/pipeline.py --model llama-3-8b   # a preset at full size, each stage on the fake process group
    python benchmarks/pipeline.py --model llama-3-8b --precision amp-bf16 --pp 4 --microbatches 8
    python benchmarks/pipeline.py --interleaved        # interleaved 1F1B: each rank's stages on gloo ranks
    python benchmarks/pipeline.py --interleaved --zero-bubble   # the same grid, ScheduleInterleavedZeroBubble
    python benchmarks/pipeline.py --fsdp               # 2 stages x 2 FSDP2 data-parallel ranks, beside 2 stages alone
    python benchmarks/pipeline.py --interleaved --fsdp # interleaved 1F1B, each rank's stages FSDP2-sharded
    python benchmarks/pipeline.py --interleaved --zero-bubble --fsdp  # the same for zero-bubble (its modelled recipes)
    python benchmarks/pipeline.py --cp                 # 2 stages x 2 context-parallel ranks (FSDP2 over them)
    python benchmarks/pipeline.py --tp 2               # 2 stages x 2 tensor-parallel ranks (a (pp, tp) mesh)
    python benchmarks/pipeline.py --moe                # a small Mixtral's stages
    python benchmarks/pipeline.py --moe --ep           # ... each stage's experts split over 2 of its FSDP2 ranks
    python benchmarks/pipeline.py --moe --families     # Qwen3-MoE and Qwen2-MoE stages, alone and with --ep
    python benchmarks/pipeline.py --moe --padded       # each stage's experts over 2 FSDP2 ranks: padded, dim 0, dim 1

A small Llama (hidden 256, intermediate 512, 8 heads, 4 kv heads, vocabulary 1024; 4 layers on 2 stages, 6 on 3),
micro-batches of 2 x 256 tokens, cut into stages by torchtitan's split and run by
torch.distributed.pipelining (memcalc.measure.pipeline: PipelineStage, ScheduleGPipe / Schedule1F1B, one gloo rank
per stage, AdamW), under memcalc's tensor tracker: one row per stage. About 2 minutes on two cores.

With --interleaved, ScheduleInterleaved1F1B on the small Llama with 6 or 10 layers: 2 or 3 ranks of 2 or 3 stages
each (torchtitan's looped split), one row per rank. About 4 minutes.

With --fsdp, each of 2 stages FSDP2-sharded over 2 data-parallel ranks (a (pp, dp) mesh of 4 gloo ranks, torchtitan's
apply_fsdp on each stage), micro-batches of 2 x 128 tokens, with the same cell without data parallelism beside it:
what FSDP2 adds to the pipeline's error. About 8 minutes. With --interleaved --fsdp, the same for ScheduleInterleaved1F1B:
2 (or 3) ranks of 2 to 5 stages each, every rank over 2 FSDP2 data-parallel ranks. About 12 minutes. With
--zero-bubble too, ScheduleInterleavedZeroBubble's cells the estimate models (--zero 2; fp32, bf16-pure, amp-bf16).

With --cp, each stage's 2 data-parallel ranks are context-parallel ranks too (torchtitan's layout: FSDP2 over them,
torch's ring attention in place of sdpa over them, each running 256 of a micro-batch's 512 positions), with the same
cell without context parallelism (FSDP2 over 2 ranks at 256 positions) beside it. About 6 minutes.

With --tp N, each of 2 stages runs on N tensor-parallel ranks: the small Llama split by memcalc.measure.tensor_parallel's
plan (torchtitan's, without --sp or --loss-parallel), then cut into stages, 1F1B or GPipe over the pp dimension of a
(pp, tp) mesh of 2 x N gloo ranks; one row per stage (its tensor-parallel ranks measure the same). About 2 minutes.

With --model, the preset at full size (bf16-pure unless --precision, micro-batches of 1 x 2048) on the fake process
group under FakeTensorMode: each stage alone, given the shapes it sends and receives; its sends complete at once,
where gloo's (and NCCL's) hold the sent tensor until waited on (on the small Llama the fake group's stage peaks were
up to 2.5% below gloo's).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from memcalc.api import run
from memcalc.model import ModelConfig
from memcalc.resolve import model_of
from memcalc.spec import TrainingSpec

SMALL_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
               "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
               "max_position_embeddings": 1024, "pad_token_id": 0}

# (--moe: the small Llama's attention with Mixtral's MoE block, 4 experts of intermediate 256, top-2)
SMALL_MIXTRAL = {**SMALL_LLAMA, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                 "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a preset at full size, on the fake process group")
    parser.add_argument("--interleaved", action="store_true", help="interleaved 1F1B on gloo ranks")
    parser.add_argument("--zero-bubble", action="store_true",
                        help="with --interleaved: ScheduleInterleavedZeroBubble instead (without checkpointing)")
    parser.add_argument("--fsdp", action="store_true", help="stages under FSDP2 over 2 data-parallel ranks each")
    parser.add_argument("--cp", action="store_true", help="stages over 2 context-parallel (and FSDP2) ranks each")
    parser.add_argument("--tp", type=int, default=1, help="stages over this many tensor-parallel ranks each")
    parser.add_argument("--moe", action="store_true", help="a small Mixtral's stages on gloo ranks")
    parser.add_argument("--ep", action="store_true", help="with --moe: each stage's experts split over 2 of its "
                        "FSDP2 data-parallel ranks (expert parallelism)")
    parser.add_argument("--padded", action="store_true", help="with --moe --ep: 8 ranks (2 stages x 2 efsdp x 2 ep), "
                        "tests/tiny.py's Mixtral with 2 experts (one a rank, dim-0 shards padded) and 4 (dim 0, dim 1)")
    parser.add_argument("--families", action="store_true", help="with --moe: tests/tiny.py's Qwen3-MoE and Qwen2-MoE "
                        "(shared expert) on stages, alone and with --ep")
    parser.add_argument("--precision", default="bf16-pure", help="with --model: the recipe (default bf16-pure)")
    parser.add_argument("--pp", default="2,4", help="with --model: the stage counts (default 2,4)")
    parser.add_argument("--microbatches", type=int, help="with --model: micro-batches per step (default: --pp)")
    args = parser.parse_args()
    from memcalc.measure.distributed import measure_distributed

    if args.model:
        return preset(args.model, measure_distributed, args.precision, [int(n) for n in args.pp.split(",")],
                      args.microbatches)
    if args.moe:
        if args.families:
            return moe_families(measure_distributed)
        if args.padded:
            return moe_ep_sharding(measure_distributed)
        return moe_ep(measure_distributed) if args.ep else moe(measure_distributed)
    if args.cp:
        return context_parallel(measure_distributed)
    if args.tp > 1:
        return tensor_parallel(measure_distributed, args.tp)
    if args.fsdp:
        return fsdp(measure_distributed, args.interleaved, args.zero_bubble)
    if args.interleaved:
        return interleaved(measure_distributed, "zero-bubble" if args.zero_bubble else "interleaved-1f1b")

    rows = []
    print("| stages | schedule | micro-batches | recipe | checkpointing | stage | estimate | measured | error |")
    print("|---:|---|---:|---|---|---:|---:|---:|---:|")
    for (pp, layers), schedule, extra, precision, checkpointing in itertools.product(
            ((2, 4), (3, 6)), ("1f1b", "gpipe"), (0, 2), ("fp32", "bf16-pure", "amp-bf16"), ("none", "full")):
        if pp == 3 and precision == "bf16-pure":
            continue
        raw = {**SMALL_LLAMA, "num_hidden_layers": layers}
        microbatches = pp + extra
        spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=256, checkpointing=checkpointing,
                            num_gpus=pp, pp=pp, pp_schedule=schedule, microbatches=microbatches)
        for stage, estimate, peak, error, _ in _on_gloo(measure_distributed, raw, spec):
            rows.append((checkpointing, error))
            print(f"| {pp} | {schedule} | {microbatches} | {precision} | {checkpointing} | {stage} | "
                  f"{estimate / 2**20:.2f} MiB | {peak / 2**20:.2f} MiB | {error:+.2f}% |", flush=True)
    for checkpointing in ("none", "full"):
        errors = [e for c, e in rows if c == checkpointing]
        print(f"\ncheckpointing {checkpointing}: {len(errors)} stage steps, median |error| "
              f"{statistics.median(abs(e) for e in errors):.2f}%, from {min(errors):+.2f}% to {max(errors):+.2f}%")


def fsdp(measure_distributed, interleaved: bool, zero_bubble: bool = False) -> None:
    print(f"| {'ranks x stages | layers' if interleaved else 'schedule'} | micro-batches | recipe | checkpointing | --zero | "
          f"{'rank' if interleaved else 'stage'} | estimate | measured | error | phase (est / measured) | error without "
          "FSDP2 |")
    print(f"|---|{'---:|' if interleaved else ''}---:|---|---|---:|---:|---:|---:|---:|---|---:|")
    errors = []
    cells = ((("1f1b", 2, 4), 2, "bf16", "none", 2), (("1f1b", 2, 4), 4, "bf16", "full", 2),
             (("gpipe", 2, 4), 2, "bf16", "none", 2), (("1f1b", 2, 4), 4, "bf16-pure", "none", 2),
             (("gpipe", 2, 4), 3, "bf16-pure", "full", 2), (("1f1b", 2, 4), 2, "fp32", "full", 2),
             (("1f1b", 2, 4), 4, "amp-bf16", "full", 2), (("1f1b", 2, 4), 4, "bf16", "full", 3),
             (("gpipe", 2, 4), 2, "fp32", "none", 3))
    if interleaved:  # ((pp, virtual, layers), ...)
        cells = (((2, 2, 6), 2, "bf16", "none", 2), ((2, 2, 6), 4, "bf16", "none", 2),
                 ((2, 2, 6), 4, "bf16", "full", 2), ((2, 2, 6), 4, "fp32", "none", 2),
                 ((2, 2, 6), 2, "bf16-pure", "full", 2), ((2, 2, 6), 4, "amp-bf16", "full", 2),
                 ((2, 3, 10), 4, "bf16", "none", 2), ((2, 3, 10), 4, "fp32", "full", 2),
                 ((2, 2, 6), 4, "bf16", "none", 3), ((3, 2, 10), 3, "bf16", "none", 2),
                 # more than three stages a rank: the runtime's FSDP2 window (pipeline.unsharded_window)
                 ((2, 4, 14), 4, "bf16", "none", 2), ((2, 4, 14), 4, "bf16-pure", "full", 2),
                 ((2, 4, 14), 8, "fp32", "none", 2), ((2, 5, 18), 4, "bf16", "none", 2),
                 ((2, 4, 14), 4, "amp-bf16", "full", 2), ((2, 4, 14), 4, "bf16", "none", 3),
                 ((3, 4, 26), 3, "bf16", "none", 2))
    if zero_bubble:  # (the recipes whose gradients are made in FSDP2's reduce dtype, --zero 2: the modelled ones)
        cells = (((2, 2, 6), 4, "bf16-pure", "none", 2), ((2, 2, 6), 4, "fp32", "none", 2),
                 ((2, 2, 6), 4, "amp-bf16", "none", 2), ((2, 2, 6), 2, "bf16-pure", "none", 2),
                 ((2, 3, 10), 4, "bf16-pure", "none", 2), ((2, 3, 10), 4, "amp-bf16", "none", 2),
                 ((3, 2, 10), 3, "fp32", "none", 2), ((2, 4, 14), 4, "bf16-pure", "none", 2))
    for layout, microbatches, precision, checkpointing, zero in cells:
        if interleaved:
            pp, virtual, layers = layout
            schedule = "zero-bubble" if zero_bubble else "interleaved-1f1b"
            shape = {"pp_virtual": virtual}
        else:
            (schedule, pp, layers), shape = layout, {}
        raw = {**SMALL_LLAMA, "num_hidden_layers": layers}
        spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=128, checkpointing=checkpointing,
                            num_gpus=2 * pp, pp=pp, pp_schedule=schedule, microbatches=microbatches, sharding="fsdp",
                            zero_stage=zero, **shape)
        alone = {stage: error for stage, _, _, error, _ in _on_gloo(
            measure_distributed, raw, spec.replace(num_gpus=pp, sharding="deepspeed", zero_stage=0))}
        for stage, estimate, peak, error, phases in _on_gloo(measure_distributed, raw, spec):
            errors.append(error)
            first = f"{pp} x {virtual} | {layers}" if interleaved else schedule
            print(f"| {first} | {microbatches} | {precision} | {checkpointing} | {zero} | {stage} | "
                  f"{estimate / 2**20:.2f} MiB | {peak / 2**20:.2f} MiB | {error:+.2f}% | {phases} | "
                  f"{alone[stage]:+.2f}% |", flush=True)
    print(f"\n{len(errors)} {'rank' if interleaved else 'stage'} steps: median |error| "
          f"{statistics.median(abs(e) for e in errors):.2f}%, from {min(errors):+.2f}% to {max(errors):+.2f}%")


def context_parallel(measure_distributed) -> None:
    print("| schedule | layers | micro-batches | recipe | checkpointing | --zero | rank | estimate | measured | error | "
          "phase (est / measured) | error without --cp |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|---:|")
    errors = []
    for schedule, layers, microbatches, precision, checkpointing, zero in (
            ("1f1b", 4, 4, "bf16", "none", 2), ("1f1b", 4, 4, "bf16", "full", 2), ("gpipe", 4, 2, "fp32", "none", 2),
            ("1f1b", 4, 2, "bf16-pure", "full", 2), ("1f1b", 4, 4, "amp-bf16", "none", 2),
            ("1f1b", 4, 2, "bf16", "none", 3), ("interleaved-1f1b", 6, 4, "bf16", "none", 2)):
        raw = {**SMALL_LLAMA, "num_hidden_layers": layers}
        spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=512, checkpointing=checkpointing,
                            num_gpus=4, pp=2, cp=2, pp_schedule=schedule, microbatches=microbatches,
                            sharding="fsdp", zero_stage=zero)
        alone = {stage: error for stage, _, _, error, _ in _on_gloo(
            measure_distributed, raw, spec.replace(cp=1, seq_len=256))}
        for stage, estimate, peak, error, phases in _on_gloo(measure_distributed, raw, spec):
            errors.append(error)
            print(f"| {schedule} | {layers} | {microbatches} | {precision} | {checkpointing} | {zero} | {stage} | "
                  f"{estimate / 2**20:.2f} MiB | {peak / 2**20:.2f} MiB | {error:+.2f}% | {phases} | "
                  f"{alone[stage]:+.2f}% |", flush=True)
    print(f"\n{len(errors)} rank steps: median |error| {statistics.median(abs(e) for e in errors):.2f}%, from "
          f"{min(errors):+.2f}% to {max(errors):+.2f}%")


def moe(measure_distributed) -> None:
    print("| schedule | micro-batches | recipe | checkpointing | stage | estimate | measured | error | phase (est / "
          "measured) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|")
    _stage_grid(measure_distributed, (
        ([schedule, str(microbatches), precision, checkpointing], SMALL_MIXTRAL,
         TrainingSpec(precision=precision, micro_batch_size=2, seq_len=512, checkpointing=checkpointing, num_gpus=2,
                      pp=2, pp_schedule=schedule, microbatches=microbatches))
        for schedule, microbatches, precision, checkpointing in itertools.product(
            ("1f1b", "gpipe"), (2, 4), ("fp32", "bf16-pure", "amp-bf16"), ("none", "full"))))


def moe_ep(measure_distributed) -> None:
    """Each stage's most loaded rank: the estimate at the --ep-load its measured routing implies (the most loaded
    layer of the stage's ranks over T x top-k)."""
    print("| routing | schedule | gpus | micro-batches | recipe | checkpointing | --zero | stage | --ep-load | estimate "
          "| measured | error | phase (est / measured) |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    errors = []
    batch, seq = 2, 256
    for routing, (schedule, virtual, layers), gpus, microbatches, precision, checkpointing, zero in (
            ("worst", ("1f1b", 1, 4), 4, 2, "bf16", "none", 2), ("random", ("1f1b", 1, 4), 4, 4, "bf16", "full", 2),
            ("worst", ("gpipe", 1, 4), 4, 2, "fp32", "none", 2), ("random", ("1f1b", 1, 4), 4, 4, "bf16-pure", "none", 2),
            ("worst", ("1f1b", 1, 4), 4, 4, "amp-bf16", "full", 2), ("random", ("gpipe", 1, 4), 4, 3, "bf16", "none", 3),
            ("worst", ("1f1b", 1, 4), 4, 2, "bf16-pure", "full", 3), ("random", ("1f1b", 1, 4), 8, 2, "bf16", "none", 2),
            ("worst", ("interleaved-1f1b", 2, 6), 4, 4, "bf16", "none", 2),
            ("random", ("interleaved-1f1b", 2, 6), 4, 4, "amp-bf16", "full", 2)):
        raw = {**SMALL_MIXTRAL, "num_hidden_layers": layers, **({"initializer_range": 0.0} if routing == "worst" else {})}
        spec = TrainingSpec(precision=precision, micro_batch_size=batch, seq_len=seq, checkpointing=checkpointing,
                            num_gpus=gpus, pp=2, pp_schedule=schedule, microbatches=microbatches, sharding="fsdp",
                            zero_stage=zero, ep=2, **({"pp_virtual": virtual} if virtual > 1 else {}))
        model = model_of(ModelConfig("small-mixtral", raw, "benchmarks/pipeline.py"))
        ranks = measure_distributed({**raw, "_name": "small-mixtral"}, spec, engine="pp", world_size=gpus,
                                    method="gloo")
        for stage in range(2):
            mine = [m for m in ranks if m.run["distributed"]["stage"] == stage]
            received = max(n for m in mine for n in m.run["distributed"]["ep_received_pairs"])
            load = received / (batch * seq * raw["num_experts_per_tok"])
            busiest = max(mine, key=lambda m: m.measured_peak_bytes)
            where = {"pp_rank": stage} if virtual > 1 else {"pp_stage": stage}
            estimate = run(model, spec.replace(ep_load=load, **where)).per_gpu
            error = 100 * (estimate.peak_bytes / busiest.measured_peak_bytes - 1)
            errors.append(error)
            print(f"| {routing} | {schedule}{f' x {virtual}' if virtual > 1 else ''} | {gpus} | {microbatches} | "
                  f"{precision} | {checkpointing} | {zero} | {stage} | {load:.3f} | {estimate.peak_bytes / 2**20:.2f} "
                  f"MiB | {busiest.measured_peak_bytes / 2**20:.2f} MiB | {error:+.2f}% | "
                  f"{estimate.peak_phase.value} / {busiest.measured_peak_phase} |", flush=True)
    print(f"\n{len(errors)} stage steps: median |error| {statistics.median(abs(e) for e in errors):.2f}%, from "
          f"{min(errors):+.2f}% to {max(errors):+.2f}%")


def _tiny_raw(family: str) -> dict:
    """tests/tiny.py's config of ``family`` (the repository's root on the path: benchmarks run from anywhere)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny import tiny_raw

    return tiny_raw(family)


def moe_ep_sharding(measure_distributed) -> None:
    """Each stage's experts over 2 efsdp ranks: one expert a rank (2 experts, dim 0: each rank's shard padded to a
    whole expert), 2 a rank on dim 0 and on dim 1 (torchtitan's Shard(1)); every pair routed to one rank."""
    print("| experts | --ep-shard-dim | stage | --ep-load | estimate | measured | error | FSDP2 buffers at the peak "
          "(est. / measured) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for experts, dim in ((2, 0), (4, 0), (4, 1)):
        raw = {**_tiny_raw("mixtral"), "num_hidden_layers": 4, "initializer_range": 0.0, "num_local_experts": experts}
        spec = TrainingSpec(precision="bf16", micro_batch_size=2, seq_len=128, num_gpus=8, pp=2, microbatches=2,
                            sharding="fsdp", zero_stage=2, ep=2, ep_shard_dim=dim)
        ranks = measure_distributed({**raw, "_name": "tiny-mixtral"}, spec, engine="pp", world_size=8, method="gloo")
        model = model_of(ModelConfig("tiny-mixtral", raw, "tests/tiny.py"))
        for stage in (0, 1):
            busiest = max((m for m in ranks if m.run["distributed"]["stage"] == stage),
                          key=lambda m: m.measured_peak_bytes)
            load = max(busiest.run["distributed"]["ep_received_pairs"]) / (2 * 128 * raw["num_experts_per_tok"])
            report = run(model, spec.replace(pp_stage=stage, ep_load=load)).per_gpu
            at_peak = max(report.phases, key=lambda phase: phase.bytes).breakdown
            buffers = at_peak.get("fsdp_unsharded_params", 0) + at_peak.get("pipeline_recv_buffers", 0)
            peak = busiest.measured_peak_bytes
            print(f"| {experts} | {dim} | {stage} | {load:.3f} | {report.peak_bytes:,} | {peak:,} | "
                  f"{100 * (report.peak_bytes / peak - 1):+.2f}% | {buffers:,} / "
                  f"{busiest.per_term_bytes.get('comm_buffers', 0):,} |", flush=True)


def moe_families(measure_distributed) -> None:
    """The other MoE decoders the stages take, tests/tiny.py's with 4 layers (2 a stage), micro-batches of 2 x 128:
    alone on 2 ranks, and with --ep 2 on 4 (every pair routed to one rank: all weights zero)."""
    print("| model | recipe | checkpointing | gpus | --ep | stage | --ep-load | estimate | measured | error |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for family, precision, checkpointing, ep in (("qwen3_moe", "bf16-pure", "none", 1),
                                                 ("qwen2_moe", "amp-bf16", "full", 1),
                                                 ("qwen3_moe", "bf16", "full", 2), ("qwen2_moe", "bf16", "none", 2)):
        raw = {**_tiny_raw(family), "num_hidden_layers": 4, **({"initializer_range": 0.0} if ep > 1 else {})}
        layout = {"sharding": "fsdp", "zero_stage": 2, "ep": ep, "num_gpus": 4} if ep > 1 else {"num_gpus": 2}
        spec = TrainingSpec(precision=precision, micro_batch_size=2, seq_len=128, checkpointing=checkpointing, pp=2,
                            microbatches=2, **layout)
        ranks = measure_distributed({**raw, "_name": family}, spec, engine="pp", world_size=layout["num_gpus"],
                                    method="gloo")
        model = model_of(ModelConfig(family, raw, "tests/tiny.py"))
        for stage in (0, 1):
            busiest = max((m for m in ranks if m.run["distributed"]["stage"] == stage),
                          key=lambda m: m.measured_peak_bytes)
            received = busiest.run["distributed"].get("ep_received_pairs", [])
            load = max(received) / (2 * 128 * raw["num_experts_per_tok"]) if ep > 1 else 1.0
            estimate = run(model, spec.replace(pp_stage=stage, ep_load=load)).per_gpu.peak_bytes
            peak = busiest.measured_peak_bytes
            print(f"| {family} | {precision} | {checkpointing} | {layout['num_gpus']} | {ep} | {stage} | {load:.3f} | "
                  f"{estimate:,} | {peak:,} | {100 * (estimate / peak - 1):+.2f}% |", flush=True)


def _on_gloo(measure_distributed, raw: dict, spec: TrainingSpec):
    """Each gloo rank of the small Llama ``raw`` running ``spec`` (one per stage): (rank, estimate, measured peak,
    error %, the peak's phase estimated / measured)."""
    model = model_of(ModelConfig("small-llama", raw, "benchmarks/pipeline.py"))
    sharded = spec.sharding.value == "fsdp"
    seen = set()
    for measured in measure_distributed({**raw, "_name": "small-llama"}, spec, engine="pp", world_size=spec.num_gpus
                                        if sharded or spec.tp > 1 else spec.pp, method="gloo"):
        rank = measured.run["distributed"]["stage"]
        if rank in seen:  # (FSDP2, --tp: the stage's other data-parallel or tensor-parallel ranks run the same)
            continue
        seen.add(rank)
        estimate = run(model, spec.replace(pp_rank=rank) if spec.interleaved else spec.replace(pp_stage=rank))
        peak = measured.measured_peak_bytes
        yield (rank, estimate.per_gpu.peak_bytes, peak, 100 * (estimate.per_gpu.peak_bytes - peak) / peak,
               f"{estimate.per_gpu.peak_phase.value} / {measured.measured_peak_phase}")


def tensor_parallel(measure_distributed, tp: int) -> None:
    """2 stages of the small Llama (4 layers), each over tp tensor-parallel gloo ranks."""
    raw = {**SMALL_LLAMA, "num_hidden_layers": 4}
    print("| stages x tp | schedule | micro-batches | recipe | checkpointing | stage | estimate | measured | error | "
          "phase (est. / meas.) |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---|")
    _stage_grid(measure_distributed, (
        ([f"2 x {tp}", schedule, str(microbatches), precision, checkpointing], raw,
         TrainingSpec(precision=precision, micro_batch_size=2, seq_len=256, checkpointing=checkpointing,
                      num_gpus=2 * tp, tp=tp, pp=2, pp_schedule=schedule, microbatches=microbatches))
        for schedule, microbatches, precision, checkpointing in itertools.product(
            ("1f1b", "gpipe"), (2, 4), ("fp32", "bf16-pure", "amp-bf16", "bf16"), ("none", "full"))))


def _stage_grid(measure_distributed, runs, unit: str = "stage", phases: bool = True) -> None:
    """Each (leading cells, config, spec) of ``runs`` on gloo ranks: a row per stage (or rank), with the phases
    (estimated / measured) where asked, then the errors' summary."""
    errors = []
    for cells, raw, spec in runs:
        for stage, estimate, peak, error, phase in _on_gloo(measure_distributed, raw, spec):
            errors.append(error)
            print(f"| {' | '.join(cells)} | {stage} | {estimate / 2**20:.2f} MiB | {peak / 2**20:.2f} MiB | "
                  f"{error:+.2f}% |" + (f" {phase} |" if phases else ""), flush=True)
    print(f"\n{len(errors)} {unit} steps: median |error| {statistics.median(abs(e) for e in errors):.2f}%, from "
          f"{min(errors):+.2f}% to {max(errors):+.2f}%")


def interleaved(measure_distributed, schedule: str) -> None:
    print("| ranks x stages | layers | micro-batches | recipe | checkpointing | rank | estimate | measured | error |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|")
    _stage_grid(measure_distributed, (
        ([f"{pp} x {virtual}", str(layers), str(microbatches), precision, checkpointing],
         {**SMALL_LLAMA, "num_hidden_layers": layers},
         TrainingSpec(precision=precision, micro_batch_size=2, seq_len=256, checkpointing=checkpointing, num_gpus=pp,
                      pp=pp, pp_schedule=schedule, pp_virtual=virtual, microbatches=microbatches))
        for (pp, virtual, layers, microbatches), precision, checkpointing in itertools.product(
            ((2, 2, 6, 2), (2, 2, 6, 4), (3, 2, 10, 3), (2, 3, 10, 4)), ("fp32", "bf16-pure", "amp-bf16"),
            ("none",) if schedule == "zero-bubble" else ("none", "full"))), unit="rank", phases=False)


def preset(name: str, measure_distributed, precision: str, stage_counts: list[int], microbatches: int | None) -> None:
    from memcalc.api import model_input

    model = model_input(name, None)
    raw = {**model.config.raw, "_name": name}
    print("| model | stages | schedule | micro-batches | recipe | checkpointing | stage | estimate | "
          "measured (fake group) | error | phase (est. / meas.) |")
    print("|---|---:|---|---:|---|---|---:|---:|---:|---:|---|")
    for pp, schedule, checkpointing in itertools.product(stage_counts, ("gpipe", "1f1b", "interleaved-1f1b"),
                                                         ("none", "full")):
        spec = TrainingSpec(precision=precision, micro_batch_size=1, seq_len=2048, checkpointing=checkpointing,
                            num_gpus=pp, pp=pp, pp_schedule=schedule, microbatches=microbatches or pp)
        for measured in measure_distributed(raw, spec, engine="pp", world_size=pp, method="fake",
                                            fake_ranks=tuple(range(pp))):
            stage = measured.run["distributed"]["stage"]
            one = spec.replace(pp_rank=stage) if spec.interleaved else spec.replace(pp_stage=stage)
            per_gpu = run(model, one).per_gpu
            estimate = per_gpu.peak_bytes
            error = 100 * (estimate - measured.measured_peak_bytes) / measured.measured_peak_bytes
            print(f"| {name} | {pp} | {schedule} | {spec.microbatches} | {precision} | {checkpointing} | {stage} | "
                  f"{estimate / 2**30:.3f} GiB | "
                  f"{measured.measured_peak_bytes / 2**30:.3f} GiB | {error:+.2f}% | "
                  f"{per_gpu.peak_phase.value} / {measured.measured_peak_phase} |", flush=True)


if __name__ == "__main__":
    main()
