"""--activation-offload torchtune|trl (their OffloadActivations, memcalc.measure.offload) against measured steps: the table
behind docs/accuracy.md's "Activation offloading" section.

    python benchmarks/activation_offload.py

Small configs of the hand-modelled families (tests/tiny.py, 6 layers, batch 2 x seq 128, vocabulary 64), each
estimate (the step traced at depths 2, 3, 4 with the manager applied, extrapolated) beside a real CPU step run with
the same manager, measured by memcalc's tracker with the CPU's semantics: forward and backward peaks, the
activations left on the device when the forward ends, and the host bytes. Then Llama-3-8B at seq 2048 with and
without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memcalc.api import model_of, run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.tiny import GEMMA3, GPT2, LAYER_NORM_FAMILIES, tiny_raw


def _pct(estimate: int, measured: int) -> str:
    if not measured:
        return "equal (0)" if not estimate else f"{estimate:,} B vs 0"
    return f"{100 * (estimate - measured) / measured:+.3f}%"


def small_table() -> None:
    from memcalc.measure import derive
    from memcalc.measure.step import measure_cpu

    configs = {family: (tiny_raw(family), "sdpa") for family in ("llama", "qwen3", "gemma", "phi3", "qwen2_moe")}
    configs["gpt2"] = (GPT2, "sdpa")
    configs["gemma3"] = (GEMMA3, "sdpa")
    for name in ("opt", "bloom", "falcon"):
        raw, _norms, attentions = LAYER_NORM_FAMILIES[name]
        configs[name] = (raw, attentions[0])
    print("| config | style | recipe | checkpointing | forward | backward | left on the GPU | host |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (raw, attention) in configs.items():
        key = "n_layer" if "n_layer" in raw else "num_hidden_layers"
        raw = {**raw, key: 6, "vocab_size": 64}
        for style, recipe, checkpointing in [(s, r, c) for s in ("torchtune", "trl") for r in ("bf16-pure", "amp-bf16")
                                             for c in ("none", "full")]:
                spec = TrainingSpec(precision=recipe, micro_batch_size=2, seq_len=128, checkpointing=checkpointing,
                                    attention=attention, activation_offload=style)
                with derive.semantics("cpu"):
                    report = run(model_of(ModelConfig(name, raw, "benchmark")), spec)
                measured = measure_cpu(raw, spec, attn_implementation=attention)
                phases = {p.phase.value: p.bytes for p in report.per_gpu.phases}
                print(f"| {name} | {style} | {recipe} | {checkpointing} | "
                      f"{_pct(phases['forward'], measured.per_phase_peak_bytes['forward'])} | "
                      f"{_pct(phases['backward'], measured.per_phase_peak_bytes['backward'])} | "
                      f"{_pct(report.term('activations').bytes, measured.forward_end_bytes.get('activations', 0))} | "
                      f"{_pct(report.term('offloaded_activations').bytes, measured.term_bytes.get('offloaded_activations', 0))} |",
                      flush=True)


def full_size_table() -> None:
    import json

    raw = json.loads((HERE.parent / "presets" / "models" / "llama-3-8b.json").read_text())
    print("\n| Llama-3-8B, bf16-pure, seq 2048 | checkpointing | forward | backward | activations on the GPU | host |")
    print("|---|---|---|---|---|---|")
    gib = 2**30
    for checkpointing in ("none", "full"):
        for offload in ("none", "torchtune", "trl"):
            spec = TrainingSpec(precision="bf16-pure", micro_batch_size=1, seq_len=2048, checkpointing=checkpointing,
                                activation_offload=offload, optim_impl="fused")
            report = run(model_of(ModelConfig("llama-3-8b", raw, "benchmark")), spec)
            phases = {p.phase.value: p.bytes for p in report.per_gpu.phases}
            host = next((t.bytes for t in report.per_gpu.terms if t.name == "offloaded_activations"), 0)
            print(f"| {offload} | {checkpointing} | {phases['forward'] / gib:.2f} GiB | "
                  f"{phases['backward'] / gib:.2f} GiB | {report.term('activations').bytes / gib:.2f} GiB | "
                  f"{host / gib:.2f} GiB |", flush=True)


if __name__ == "__main__":
    small_table()
    full_size_table()
