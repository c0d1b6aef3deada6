"""Published GPU memory figures of real fine-tuning runs beside memcalc's estimate for the same settings.

    python benchmarks/published.py           # a markdown table for docs/accuracy.md "Published runs"

Each row is a run from docs/published-runs.md (its row number in brackets) whose settings memcalc can express, with
the settings that describe it. The estimate is the per-GPU peak of live tensors (``per_gpu.peak_bytes``), which
``max_memory_allocated`` and the peak of active bytes approximate; where a source measures something else, the row
says so. Rows with ``--compile`` trace each compiled layer at full size on this CPU (20 s to 90 s each).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc import api

GIB = 2**30
CONFIGS = Path(__file__).resolve().parent / "configs"
QV = "q_proj,v_proj"
# PEFT's MetaMathQA runs (method_comparison/MetaMathQA, results of torch 2.13 on an L40S): bf16 weights, fp32
# adapters (autocast_adapter_dtype), torch AdamW, batch 4, padded per batch to at most 768 tokens (estimated at 768)
PEFT = {"batch_size": 4, "seq_len": 768}
# torchtune README at 1814feb17, "Optimization flags": full_finetune_single_device, Llama 3.2 3B, batch 2, packed to
# 4096 tokens, bf16; each row adds one technique to the one before. torchtune's attention (modules/attention.py)
# repeats k and v to every query head before sdpa.
TT_BASE = {"precision": "bf16-pure", "optim": "adamw", "batch_size": 2, "seq_len": 4096, "repeat_kv": True}
TT_COMPILE = {**TT_BASE, "compile": True}
TT_CHUNKED = {**TT_COMPILE, "loss": "chunked:8"}
TT_CHECKPOINTED = {**TT_CHUNKED, "checkpointing": "full", "optim_impl": "fused"}
TT_IN_BACKWARD = {**TT_CHECKPOINTED, "optim_in_backward": True}
TT_OFFLOADED = {**TT_IN_BACKWARD, "activation_offload": "torchtune"}
# "LoRA and QLoRA ... do not use optimizer_in_bwd or AdamW8bit": 3B_lora_single_device's r64 on q, v, o and the MLP
TT_LORA = {**{k: v for k, v in TT_OFFLOADED.items() if k != "optim_in_backward"}, "lora_rank": 64,
           "lora_targets": "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}


@dataclass(frozen=True)
class Row:
    source: str  # the source and its docs/published-runs.md row
    run: str
    published_gib: float
    model: str | None
    settings: dict
    differs: str = ""
    counted: bool = True  # in the median and worst; a row left out says why in ``differs``
    also: dict = field(default_factory=dict)  # another reading of the unstated, shown beside the estimate
    # compared without the paged optimizer states (per_gpu.paged_bytes): what PyTorch's allocator counts
    allocator_view: bool = False


ROWS = (
    Row("PEFT MetaMathQA, lora--llama-3.2-3B-rank32 (34)",
        "Llama-3.2-3B, LoRA r32 q,v, bf16 base (fp32 adapters), AdamW, batch 4, seq <= 768, no checkpointing",
        18.74, "llama-3.2-3b", {**PEFT, "precision": "bf16", "lora_rank": 32, "lora_targets": QV},
        "p99 of reserved per step vs allocated; seq at its cap 768"),
    Row("same, rank64 (35)", "r64", 18.97, "llama-3.2-3b",
        {**PEFT, "precision": "bf16", "lora_rank": 64, "lora_targets": QV}, "same"),
    Row("same, full-finetuning lr 1e-5 (36)", "full, bf16 params and AdamW states, batch 4, seq <= 768", 34.78,
        "llama-3.2-3b", {**PEFT, "precision": "bf16-pure"}, "reserved (above allocated) vs allocated"),
    Row("torchtune README, Llama 3.2 3B \"+ Packed Dataset\" (2)",
        "full, bf16, AdamW, batch 2, packed 4096, no checkpointing, standard CE", 60.0, "llama-3.2-3b", TT_BASE),
    Row("same, \"+ Compile\" (3)", "+ each layer compiled", 51.0, "llama-3.2-3b", TT_COMPILE,
        "the loss compiled in torchtune, eager here"),
    Row("same, \"+ Chunked Cross Entropy\" (4)", "+ chunked:8, its cross-entropy compiled", 42.9, "llama-3.2-3b",
        TT_CHUNKED),
    Row("same, \"+ Activation Checkpointing\" (5)", "+ every layer checkpointed", 24.9, "llama-3.2-3b",
        TT_CHECKPOINTED, "the baseline's AdamW implementation is not stated: foreach's step temporaries (a bf16 "
        "copy of every parameter) do not fit the figure, so fused is the row compared",
        also={"optim_impl": "foreach"}),
    Row("same, \"+ Fuse optimizer step into backward\" (6)", "+ optimizer step in backward", 23.1, "llama-3.2-3b",
        TT_IN_BACKWARD),
    Row("same, \"+ Activation Offloading\" (7)", "+ torchtune's offloading", 21.8, "llama-3.2-3b", TT_OFFLOADED,
        "offloading with compiled layers traced, not measured"),
    Row("same, \"+ 8-bit AdamW\" (8)", "+ an 8-bit AdamW: the config's bitsandbytes PagedAdamW8bit, or torchao's "
        "AdamW8bit (the class the README names; torchtune's docs offer both)", 17.6,
        "llama-3.2-3b", {**TT_OFFLOADED, "optim": "paged-adamw-8bit", "optim_impl": None},
        "left out, which optimizer ran is not stated: PagedAdamW8bit's states counted on the GPU (without them, as "
        "PyTorch's allocator sees it: 9.94 GiB, -43.5%), or torchao's AdamW8bit with its compiled step's buffers",
        counted=False, also={"optim": "torchao-adamw-8bit"}),
    Row("same, \"LoRA\" (9)", "LoRA r64 on q, v, o and the MLP (3B_lora_single_device), bf16 adapters, fused AdamW, "
        "checkpointing, offloading, compile, chunked:8", 8.5, "llama-3.2-3b", TT_LORA),
    Row("same, \"QLoRA\" (10)", "the same as QLoRA (3B_qlora_single_device: every Linear of the layers NF4, the rest "
        "bf16)", 4.6, "llama-3.2-3b", {**TT_LORA, "qlora": True, "qlora_quantizer": "torchao"},
        "torchao's NF4 layout; compiled, its dequantization taken as one 16-bit weight a matmul (Inductor's fusion)"),
    Row("torchtune README (30b8519e8), Llama 3.1 8B full fine-tuning on an RTX 4090 (11)",
        "8B_full_single_device: full, bf16, bitsandbytes PagedAdamW8bit stepped in backward, checkpointing, chunked "
        "CE; batch 2, packed 2048, compile, no accumulation (the README's note)", 18.9, None,
        {"from_config": str(CONFIGS / "torchtune-30b8519e8-8B_full_readme.yaml")},
        "compared without the 14.96 GiB of paged states (the estimate with them: 34.94 GiB): the run fits a 24 GB "
        "card only with them outside PyTorch's allocator, which its statistics do not see; which statistic \"Peak "
        "Memory per GPU\" is, the README does not say", allocator_view=True),
    Row("same, LoRA (13)",
        "8B_lora_single_device: LoRA r8 q,v, bf16, fused AdamW, checkpointing, chunked CE, the rest as above", 16.2,
        None,
        {"from_config": str(CONFIGS / "torchtune-30b8519e8-8B_lora_readme.yaml")},
        "as above"),
    Row("same, QLoRA (15)", "8B_qlora_single_device: QLoRA r8 on q,k,v,o and the MLP, the rest as above", 7.4, None,
        {"from_config": str(CONFIGS / "torchtune-30b8519e8-8B_qlora_readme.yaml")}, "as above"),
)


def _peak_gib(model: str | None, settings: dict, allocator_view: bool = False) -> float:
    settings = {k: v for k, v in settings.items() if v is not None}
    per_gpu = api.estimate(model, **settings).per_gpu
    return (per_gpu.peak_bytes - (per_gpu.paged_bytes if allocator_view else 0)) / GIB


def main() -> None:
    print("| source (docs/published-runs.md row) | run | published | estimate | error | what differs |")
    print("|---|---|---|---|---|---|")
    errors = []
    for row in ROWS:
        estimate = _peak_gib(row.model, row.settings, row.allocator_view)
        error = 100 * (estimate - row.published_gib) / row.published_gib
        shown, error_shown = f"{estimate:.2f} GiB", f"{error:+.1f}%"
        if row.also:
            other = _peak_gib(row.model, {**row.settings, **row.also}, row.allocator_view)
            other_error = 100 * (other - row.published_gib) / row.published_gib
            label = ", ".join(f"{v}" for v in row.also.values())
            shown += f" ({label}: {other:.2f} GiB)"
            error_shown += f" ({other_error:+.1f}%)"
        if row.counted:
            errors.append(error)
        print(f"| {row.source} | {row.run} | {row.published_gib} GiB | {shown} | {error_shown} | {row.differs} |",
              flush=True)
    magnitudes = [abs(e) for e in errors]
    print(f"\nOver the {len(errors)} rows counted: median |error| {statistics.median(magnitudes):.1f}%, "
          f"worst {max(magnitudes):.1f}%")


if __name__ == "__main__":
    main()
