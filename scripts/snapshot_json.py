"""Write `memcalc ... --json` for a fixed list of representative invocations into a folder, one file each.

    python scripts/snapshot_json.py OUT_DIR

Run it before and after a restructuring and diff the folders (`diff -r before after`): every difference must
be a named bug fix. The DeepSpeed configs it needs are written into OUT_DIR/_configs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

DS_ZERO2 = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
DS_ZERO3_OFFLOAD = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                          "stage3_prefetch_bucket_size": "auto", "sub_group_size": 100000000,
                                          "reduce_bucket_size": "auto",
                                          "stage3_param_persistence_threshold": "auto"}}

INVOCATIONS: dict[str, list[str]] = {
    "main": ["llama-3-8b", "--precision", "bf16", "--optim", "adamw"],
    "fp32-adam": ["llama-2-7b", "--precision", "fp32", "--optim", "adam"],
    "bf16-pure": ["mistral-7b", "--precision", "bf16-pure"],
    "amp-bf16-ckpt": ["qwen2.5-7b", "--precision", "amp-bf16", "--checkpointing", "full", "-b", "2"],
    "eager": ["gemma-2-9b", "--attn", "eager", "--seq-len", "1024"],
    "params": ["--params", "7B", "--precision", "fp32", "--optim", "adam"],
    "params-model": ["llama-3-8b", "--params", "8e9"],
    "lora": ["llama-3-8b", "--lora-rank", "16"],
    "qlora": ["llama-3-8b", "--lora-rank", "16", "--qlora", "--checkpointing", "full", "-b", "4", "--seq-len", "4096"],
    "qlora-moe": ["mixtral-8x7b", "--lora-rank", "16", "--qlora"],
    "freeze": ["bert-base", "--freeze", "embeddings,norms"],
    "zero1": ["llama-3-8b", "--zero", "1", "--gpus", "8"],
    "zero2": ["llama-3-8b", "--zero", "2", "--gpus", "8"],
    "zero3": ["llama-3-70b", "--zero", "3", "--gpus", "16", "--nodes", "2"],
    "zero3-offload": ["llama-3-8b", "--zero", "3", "--gpus", "8", "--offload", "both"],
    "zero-compare": ["llama-3-8b", "--zero", "0,1,2,3", "--gpus", "8"],
    "fsdp": ["llama-3-8b", "--fsdp", "--gpus", "8"],
    "fsdp2": ["llama-3-8b", "--sharding", "fsdp", "--zero", "2", "--gpus", "8"],
    "ddp": ["qwen2.5-1.5b", "--sharding", "torch", "--gpus", "4"],
    "zero-redundancy": ["qwen2.5-1.5b", "--sharding", "torch", "--zero", "1", "--gpus", "4"],
    "ds-zero2": ["gpt2", "--gpus", "8", "--deepspeed", "{cfg}/ds_zero2.json"],
    "ds-zero3-offload": ["llama-3-8b", "--gpus", "8", "--deepspeed", "{cfg}/ds_zero3_offload.json"],
    "fit": ["llama-3-8b", "--gpu", "h100-80gb"],
    "fit-small": ["gpt2", "--gpu", "rtx-4090"],
    "fit-70b-lora": ["llama-3-70b", "--lora-rank", "16", "--gpu", "a100-80gb"],
    "max-batch": ["llama-3-8b", "--gpu", "h100-80gb", "--max-batch", "--max-seq-len", "--precision", "bf16-pure",
                  "--optim", "adamw-8bit", "--checkpointing", "full"],
    "adafactor": ["t5-3b", "--optim", "adafactor"],
    "adamw8bit": ["phi-3-mini", "--optim", "adamw-8bit", "--optim-impl", "fused"],
    "grad-accum": ["llama-3.2-1b", "--grad-accum", "8", "-b", "2"],
    "moe": ["qwen3-30b-a3b", "--seq-len", "4096"],
    "deepseek": ["deepseek-v2-lite", "--precision", "amp-bf16"],
    "falcon": ["falcon-7b", "--attn", "eager"],
    "gpt2-xl": ["gpt2-xl", "--precision", "fp16", "--gpus", "2", "--zero", "2"],
    "opt-bloom": ["bloom-560m", "--checkpointing", "full"],
    "gemma3": ["gemma-3-4b", "--precision", "amp-bf16"],
}


def main() -> None:
    from memcalc.cli import main as memcalc

    out = Path(sys.argv[1])
    configs = out / "_configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "ds_zero2.json").write_text(json.dumps(DS_ZERO2))
    (configs / "ds_zero3_offload.json").write_text(json.dumps(DS_ZERO3_OFFLOAD))
    for name, args in INVOCATIONS.items():
        args = [a.replace("{cfg}", "_configs") for a in args] + ["--json"]
        stdout, stderr = io.StringIO(), io.StringIO()
        here = os.getcwd()
        os.chdir(out)  # relative config paths keep the snapshots comparable (contextlib.chdir needs Python 3.11)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = memcalc(args)
        finally:
            os.chdir(here)
        (out / f"{name}.json").write_text(f"# exit {code}\n# stderr {stderr.getvalue().strip()}\n{stdout.getvalue()}")
    print(f"wrote {len(INVOCATIONS)} snapshots to {out}")


if __name__ == "__main__":
    main()
