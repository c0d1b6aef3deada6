"""Published reserved-memory readings of real GPU runs beside memcalc's caching-allocator replay (--reserved).

    python benchmarks/reserved.py            # a markdown table for docs/accuracy.md (needs torch and transformers)

Each row is a run from docs/published-runs.md whose figure is the caching allocator's reserved memory
(max_memory_reserved or memory_reserved), or an nvidia-smi reading (reserved plus the CUDA context its source
measured), with the memcalc settings that describe it. The replay traces each step at
full size on this CPU (a few seconds each; cached afterwards). Sequences padded per batch are replayed at their cap,
an upper bound for the step the figure comes from.

torchtune's rows are of its releases before 0.3, replayed with their build and load (one decoder layer built, then
deep-copied per layer: memcalc.measure.torchtune_build); two of them are the reserved memory once the model is built
and loaded, which its recipes log after init. The QLoRA rows replay torchao's own to_nf4 (--qlora-quantizer torchao)
with the torchao on the path. The published run had torchao 0.1, which quantized whole tensors at once; to replay it
so:

    pip install --no-deps --target /tmp/ao01 torchao==0.1
    PYTHONPATH=/tmp/ao01 python benchmarks/reserved.py

(PEFT refuses torchao below 0.16 when it looks for torchao's own LoRA layers; this script then tells PEFT that
torchao is absent, which changes nothing here: the NF4 layers are torchtune's.)
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc import api
from memcalc.fit import MEASURED_EAGER_CUDA_CONTEXTS
from memcalc.measure import torchtune_build

GIB = 2**30
GB = 10**9
# bert-large-uncased with a two-label classification head, as model_memory_anatomy.md loads it
BERT_CLASSIFIER = str(Path(__file__).resolve().parent / "configs" / "bert-large-uncased-classifier.json")
QV = "q_proj,v_proj"
ATTENTION_MLP = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# torchtune's Llama2 7B recipes at ff594c231 / 0914d5cfb: bf16 weights and adapters, batch 2, alpaca_cleaned cut at
# 512 tokens, every layer checkpointed, torch AdamW (foreach on CUDA)
TORCHTUNE_LLAMA2 = {"precision": "bf16-pure", "batch_size": 2, "seq_len": 512, "checkpointing": "full"}
# The CUDA context under CUDA_MODULE_LOADING=EAGER on the H200, in a fresh process (benchmarks/gpu-runs/2026-12-04-h200-b,
# rows.json "context"): after the first kernel, and after a small Llama training step (memcalc.fit's eager figure;
# cuBLAS's modules and the rest loaded at their first use: 585,105,408 B of the growth came with the first bf16 matmul)
EAGER_CONTEXT_FIRST_KERNEL = 1_319_960_576
EAGER_CONTEXT_AFTER_STEP = MEASURED_EAGER_CUDA_CONTEXTS["9.0"][0]
TORCHTUNE_QLORA = {**TORCHTUNE_LLAMA2, "lora_rank": 8, "lora_targets": ATTENTION_MLP, "qlora": True,
                   "qlora_quantizer": "torchao"}
# PEFT's MetaMathQA runs: bf16 weights, fp32 adapters (autocast_adapter_dtype), AdamW, batch 4, padded to <= 768
PEFT = {"batch_size": 4, "seq_len": 768}
# What PEFT's run.py (init_accelerator) reserved before the run and subtracts from accelerator_memory_max: one 2 MiB
# small-pool segment, nn.Linear(1, 1)'s weight and bias
PEFT_INIT = 2 * 2**20
PEFT_MAX = ("accelerator_memory_max: max_memory_reserved over the whole run (evaluation at batch 50 and generation "
            "included), plus the 2 MiB run.py reserved before and subtracts; the run's worst training step is its "
            "longest batch, at most the 768-token cap replayed")


@dataclass(frozen=True)
class Row:
    source: str  # docs/published-runs.md row and file
    run: str
    published_bytes: int
    unit: int  # the unit the source writes (GiB or GB), for display
    model: str
    settings: dict
    differs: str
    context_bytes: int = 0  # an nvidia-smi reading: the CUDA context the same source measured (the fit's nvidia_smi_bytes)
    # a torchtune run of 0.1 to 0.2.1: replayed with its build and load (memcalc.measure.torchtune_build)
    torchtune_before_0_3: bool = False
    after_load: bool = False  # the figure is reserved after the model's init (its weights built and loaded)


ROWS = (
    Row("PEFT MetaMathQA lora--llama-3.2-3B-rank32.json (34)", "Llama-3.2-3B, LoRA r32 q,v, L40S, torch 2.13",
        20_120_076_288, GIB, "llama-3.2-3b", {**PEFT, "precision": "bf16", "lora_rank": 32, "lora_targets": QV},
        "p99 over steps of memory_reserved() after a step (empty_cache every 10 steps); sequences <= 768, "
        "replayed at 768; PEFT's loop keeps the output (logits) through backward"),
    Row("same, lora--llama-3.2-3B-rank64.json (35)", "r64", 20_369_637_376, GIB, "llama-3.2-3b",
        {**PEFT, "precision": "bf16", "lora_rank": 64, "lora_targets": QV}, "as above"),
    Row("same, lora--llama-3.2-3B-rank32-dora.json (35)", "DoRA r32 q,v (published to 0.01 GiB)",
        round(20.66 * GIB), GIB, "llama-3.2-3b",
        {**PEFT, "precision": "bf16", "lora_rank": 32, "lora_targets": QV, "dora": True}, "as above"),
    Row("same, full-finetuning--llama-3.2-3B-lr_0.00001.json (36)", "full fine-tuning, bf16 weights and AdamW states",
        37_345_097_154, GIB, "llama-3.2-3b", {**PEFT, "precision": "bf16-pure"}, "as above"),
    Row("same, lora--llama-3.2-3B-rank32.json (34): the run's maximum", "LoRA r32 q,v",
        22_292_725_760 + PEFT_INIT, GIB, "llama-3.2-3b",
        {**PEFT, "precision": "bf16", "lora_rank": 32, "lora_targets": QV}, PEFT_MAX),
    Row("same, lora--llama-3.2-3B-rank64.json (35): the run's maximum", "LoRA r64 q,v (published to 0.01 GiB)",
        round(21.00 * GIB) + PEFT_INIT, GIB, "llama-3.2-3b",
        {**PEFT, "precision": "bf16", "lora_rank": 64, "lora_targets": QV}, "as above"),
    Row("same, lora--llama-3.2-3B-rank32-dora.json (35): the run's maximum", "DoRA r32 q,v (published to 0.01 GiB)",
        round(22.85 * GIB) + PEFT_INIT, GIB, "llama-3.2-3b",
        {**PEFT, "precision": "bf16", "lora_rank": 32, "lora_targets": QV, "dora": True}, "as above"),
    Row("same, full-finetuning--llama-3.2-3B-lr_0.00001.json (36): the run's maximum", "full fine-tuning",
        38_868_615_168 + PEFT_INIT, GIB, "llama-3.2-3b", {**PEFT, "precision": "bf16-pure"}, "as above"),
    Row("torchtune tutorials/lora_finetune.rst (23)", "Llama2-7B, LoRA r8 q,v", 15_570_000_000, GB, "llama-2-7b",
        {**TORCHTUNE_LLAMA2, "lora_rank": 8, "lora_targets": QV},
        "peak reserved over the run (the same 15.57 GB is 'Peak memory reserved' in qlora_finetune.rst); replayed "
        "with that torchtune's build (one layer built, then deep-copied per layer; its template's 16-bit weights, "
        "0.40 GB, freed and cached) and each layer's own rotary cache", torchtune_before_0_3=True),
    Row("same (23)", "LoRA r8 on q,k,v,o, the MLP and the output", 15_870_000_000, GB, "llama-2-7b",
        {**TORCHTUNE_LLAMA2, "lora_rank": 8, "lora_targets": ATTENTION_MLP + ",lm_head"}, "as above",
        torchtune_before_0_3=True),
    Row("same (23)", "LoRA r64 q,v", 15_860_000_000, GB, "llama-2-7b",
        {**TORCHTUNE_LLAMA2, "lora_rank": 64, "lora_targets": QV}, "as above", torchtune_before_0_3=True),
    Row("same (23)", "LoRA r64 on q,k,v,o, the MLP and the output", 17_040_000_000, GB, "llama-2-7b",
        {**TORCHTUNE_LLAMA2, "lora_rank": 64, "lora_targets": ATTENTION_MLP + ",lm_head"}, "as above",
        torchtune_before_0_3=True),
    Row("torchtune tutorials/qlora_finetune.rst (24): after init", "Llama2-7B, LoRA r8 q,v", 13_980_000_000, GB,
        "llama-2-7b", {**TORCHTUNE_LLAMA2, "lora_rank": 8, "lora_targets": QV},
        "reserved once the model is built and its checkpoint loaded ('Memory Stats after model init'), replayed with "
        "that torchtune's build", torchtune_before_0_3=True, after_load=True),
    Row("torchtune tutorials/qlora_finetune.rst (24)", "Llama2-7B, QLoRA r8 q,k,v,o and the MLP (NF4 via torchao)",
        9_290_000_000, GB, "llama-2-7b", TORCHTUNE_QLORA,
        "replayed with torchao {torchao} and that torchtune's build and load (memcalc.measure.torchtune_build): one "
        "layer built, its weights quantized, then deep-copied per layer, each copy's NF4 weight dequantized and "
        "quantized again (torchtune's clone); the checkpoint quantized again as it is loaded, the layer's NF4 tensors "
        "replaced (torchtune's copy_). The same build and load on an H200 (benchmarks/gpu-runs/2026-12-04-h200-d/"
        "tt0914.json): 9,133,096,960 B after init, 9,288,286,208 B over the steps", torchtune_before_0_3=True),
    Row("same (24): after init", "Llama2-7B, QLoRA as above", 9_130_000_000, GB, "llama-2-7b", TORCHTUNE_QLORA,
        "reserved once the model is built and its checkpoint loaded ('Memory Stats after model init'): what to_nf4's "
        "(n, 16) distance tensors left cached, 1.44 GB each for an MLP weight", torchtune_before_0_3=True,
        after_load=True),
    Row("transformers docs/source/en/model_memory_anatomy.md (nvidia-smi)",
        "bert-large-uncased sequence classification, fp32, AdamW, batch 4 x 512, V100 16 GB, CUDA 11.2 (2022)",
        14_949 * 2**20, 2**20, BERT_CLASSIFIER,
        {"precision": "fp32", "batch_size": 4, "seq_len": 512, "optim_impl": "forloop", "attn": "eager",
         "grad_accum": 2, "gpu": "v100-16gb"},
        "nvidia-smi after training = reserved + the CUDA context: the 1,343 MiB the same page measured after a "
        "tiny tensor (before lazy loading), and what a training process's context grows by after its first kernel "
        "under eager loading, cuBLAS's modules chiefly (measured on the H200, CUDA 13: 606 MiB; the run's cuBLAS 11 "
        "not measured); the Trainer of 2022 zeroed gradients in place (model.zero_grad(), set_to_none False then), so "
        "they stay allocated through the next forward: replayed as two accumulated micro-batches; BERT's attention was "
        "eager then; today's transformers code replayed",
        context_bytes=1_343 * 2**20 + EAGER_CONTEXT_AFTER_STEP - EAGER_CONTEXT_FIRST_KERNEL),
)


def _torchao_version() -> str:
    """The torchao on the path; below 0.16, PEFT told it is absent (the module docstring)."""
    from importlib import metadata

    try:
        version = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return "(none)"
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 16):
        import peft.import_utils
        import peft.tuners.lora.torchao
        import peft.utils.quantization_utils

        for module in (peft.import_utils, peft.tuners.lora.torchao, peft.utils.quantization_utils):
            module.is_torchao_available = lambda: False
    return version


def main() -> None:
    torchao = _torchao_version()
    print("| source (docs/published-runs.md row) | run | published reserved | replayed reserved | error | tensors' "
          "peak (estimate) | what differs |")
    print("|---|---|---|---|---|---|---|")
    errors = []
    for row in ROWS:
        if row.context_bytes:  # an nvidia-smi reading: the fit's, with the context that source measured
            report = api.estimate(row.model, reserved=True, cuda_context=row.context_bytes, **row.settings)
            assert report.fit is not None and report.per_gpu.allocator is not None
            predicted = report.fit.nvidia_smi_bytes
        else:
            with torchtune_build.releases_before_0_3() if row.torchtune_before_0_3 else contextlib.nullcontext():
                report = api.estimate(row.model, reserved=True, **row.settings)
            replayed = report.per_gpu.allocator
            assert replayed is not None
            predicted = replayed.reserved_after_load_bytes if row.after_load else replayed.reserved_peak_bytes
            assert predicted is not None
        error = 100 * (predicted - row.published_bytes) / row.published_bytes
        errors.append(error)
        label = {GIB: "GiB", GB: "GB"}.get(row.unit, "MiB")
        decimals = 0 if label == "MiB" else 2
        estimate = ("(a moment before the step)" if row.after_load else
                    f"{report.per_gpu.peak_bytes / row.unit:,.{decimals}f} {label}")
        print(f"| {row.source} | {row.run} | {row.published_bytes / row.unit:,.{decimals}f} {label} | "
              f"{predicted / row.unit:,.{decimals}f} {label} | {error:+.1f}% | {estimate} | "
              f"{row.differs.replace('{torchao}', torchao)} |")
    within = sum(abs(e) <= 10 for e in errors)
    print(f"\n{within} of {len(errors)} rows within 10%; median |error| "
          f"{sorted(abs(e) for e in errors)[len(errors) // 2]:.1f}%")


if __name__ == "__main__":
    main()
