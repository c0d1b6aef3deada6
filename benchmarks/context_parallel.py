"""Context-parallel ranks: memcalc's estimate of one rank against that rank measured.

    python benchmarks/context_parallel.py [--model llama-3-8b] [--cp 2,4,8] [--precision bf16]
                                          [--seq-len 16384] [--checkpointing none,full] [--engine fsdp2]
                                          [--ranks first,last]

Each measurement builds the real transformers class under FakeTensorMode (no memory), wraps it as torchtitan does
(FSDP2 over the context-parallel ranks, ``--engine fsdp2``; or DDP, ``--engine ddp``), gives the rank its
``seq_len / cp`` positions and runs PyTorch's ring attention in place of sdpa (memcalc.measure.context_parallel),
one rank of a fake process group, a warm-up and a measured AdamW step under memcalc's tensor tracker with CUDA's
semantics. The first rank (rank 0, whose merged attention output is rebuilt by torch.cat) and the last are measured.
``--model small`` and ``--model ringy`` are the two toy Llamas of docs/accuracy.md (the second with a 256-word
vocabulary, so that attention rather than the logits makes the peak). Prints the markdown table of docs/accuracy.md's
"Context parallelism" section.
"""

from __future__ import annotations

import argparse
import time

from memcalc.spec import TrainingSpec

TOYS = {
    "small": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
              "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "vocab_size": 2000},
    "ringy": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
              "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
              "vocab_size": 256},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--cp", default="2,4,8")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpointing", default="none,full")
    parser.add_argument("--engine", default="fsdp2", choices=("fsdp2", "ddp"))
    parser.add_argument("--ranks", default="first,last")
    args = parser.parse_args()

    from memcalc.measure import _as_config, cuda_semantics, estimate_for
    from memcalc.measure.distributed import measure_distributed
    from memcalc.resolve import model_input

    raw = ({**TOYS[args.model], "_name": args.model} if args.model in TOYS
           else {**model_input(args.model, None).config.raw, "_name": args.model})
    sharding = {"fsdp2": ("fsdp", 3), "ddp": ("torch", 0)}[args.engine]
    print("| model | cp | recipe | checkpointing | rank | estimate | measured | error | phase (est. / meas.) | s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|---:|")
    for cp in (int(n) for n in args.cp.split(",")):
        for checkpointing in args.checkpointing.split(","):
            spec = TrainingSpec(precision=args.precision, micro_batch_size=args.batch, seq_len=args.seq_len,
                                checkpointing=checkpointing, num_gpus=cp, cp=cp, sharding=sharding[0],
                                zero_stage=sharding[1])
            estimate = estimate_for(_as_config(raw), spec).per_gpu
            ranks = tuple(sorted({0 if "first" in args.ranks else cp - 1, cp - 1 if "last" in args.ranks else 0}))
            started = time.perf_counter()
            with cuda_semantics.like_cuda():
                measured = measure_distributed(raw, spec, engine=args.engine, world_size=cp, method="fake",
                                               like_cuda=True, fake_ranks=ranks)
            seconds = (time.perf_counter() - started) / len(measured)
            for m in measured:
                error = 100 * (estimate.peak_bytes - m.measured_peak_bytes) / m.measured_peak_bytes
                print(f"| {args.model} | {cp} | {args.precision} b{args.batch} s{args.seq_len} ({args.engine}) | "
                      f"{checkpointing} | {m.run['distributed']['rank']} | {estimate.peak_bytes / 2**30:.3f} GiB | "
                      f"{m.measured_peak_bytes / 2**30:.3f} GiB | {error:+.2f}% | "
                      f"{estimate.peak_phase.value} / {m.measured_peak_phase} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
