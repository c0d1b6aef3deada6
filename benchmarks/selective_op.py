"""--checkpointing selective-op (torchtitan's per-op policy, memcalc.measure.selective) against measured steps: the
table behind docs/accuracy.md's "Selective-op checkpointing" section.

    python benchmarks/selective_op.py [--no-full-size]

1. Small configs of the hand-modelled families (tests/tiny.py, 4 layers, batch 2 x seq 128, vocabulary 64), each
   estimate (the step traced at depths 2, 3, 4 and extrapolated) beside a real CPU step under the same policy,
   measured by memcalc's tracker, with the CPU's semantics: forward and backward peaks and the saved activations.
2. Llama-3-8B and OLMo-2-7B at seq 2048: the estimate beside --verify=trace's full-depth trace of the whole step
   (FakeTensorMode), with the estimate's time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from memcalc.api import model_of, run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.tiny import GEMMA3, GPT2, LAYER_NORM_FAMILIES, tiny_raw

LAYERS = 4


def _pct(estimate: int, measured: int) -> str:
    return f"{100 * (estimate - measured) / measured:+.3f}%"


def _small() -> dict[str, tuple[dict, str]]:
    configs: dict[str, tuple[dict, str]] = {}
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "qwen2_moe", "mixtral", "qwen3_moe"):
        configs[family] = (tiny_raw(family), "sdpa")
    configs["gemma3"] = (GEMMA3, "sdpa")
    configs["gpt2"] = (GPT2, "sdpa")
    for name, (raw, _norms, attentions) in LAYER_NORM_FAMILIES.items():
        configs[name] = (raw, attentions[0])
    return configs


def small_table() -> None:
    from memcalc.measure import derive
    from memcalc.measure.step import measure_cpu

    print("| config | recipe | forward | backward | saved activations | peak phase |")
    print("|---|---|---|---|---|---|")
    for name, (raw, attention) in _small().items():
        key = "n_layer" if "n_layer" in raw else "num_hidden_layers"
        raw = {**raw, key: LAYERS, "vocab_size": 64}
        for recipe in ("bf16-pure", "amp-bf16"):
            spec = TrainingSpec(precision=recipe, micro_batch_size=2, seq_len=128, checkpointing="selective-op",
                                attention=attention)
            try:
                with derive.semantics("cpu"):
                    report = run(model_of(ModelConfig(name, raw, "benchmark")), spec)
            except Exception as error:  # noqa: BLE001 (a refusal is a row of the table)
                print(f"| {name} | {recipe} | refused: {str(error)[:120]} | | | |")
                break
            measured = measure_cpu(raw, spec, attn_implementation=attention)
            phases = {p.phase.value: p.bytes for p in report.per_gpu.phases}
            kept = report.term("activations").bytes
            measured_kept = measured.forward_end_bytes["activations"]
            same = "same" if report.per_gpu.peak_phase.value == measured.measured_peak_phase else "DIFFERENT"
            print(f"| {name} | {recipe} | {_pct(phases['forward'], measured.per_phase_peak_bytes['forward'])} | "
                  f"{_pct(phases['backward'], measured.per_phase_peak_bytes['backward'])} | "
                  f"{_pct(kept, measured_kept)} | {same} |", flush=True)


def full_size_table() -> None:
    from memcalc.measure.trace import measure_trace

    print("\n| model | recipe | forward | backward | estimate (cold) |")
    print("|---|---|---|---|---|")
    models = {"Llama-3-8B": HERE.parent / "presets" / "models" / "llama-3-8b.json",
              "OLMo-2-7B": HERE / "configs" / "olmo-2-1124-7b.json"}
    for name, path in models.items():
        raw = __import__("json").loads(path.read_text())
        raw = raw.get("config", raw)
        for recipe in ("bf16-pure", "amp-bf16"):
            spec = TrainingSpec(precision=recipe, micro_batch_size=1, seq_len=2048, checkpointing="selective-op",
                                optim_impl="fused")
            started = time.perf_counter()
            report = run(model_of(ModelConfig(name, raw, "benchmark")), spec)
            seconds = time.perf_counter() - started
            measured = measure_trace(raw, spec)
            phases = {p.phase.value: p.bytes for p in report.per_gpu.phases}
            print(f"| {name} | {recipe} | {_pct(phases['forward'], measured.per_phase_peak_bytes['forward'])} | "
                  f"{_pct(phases['backward'], measured.per_phase_peak_bytes['backward'])} | {seconds:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    small_table()
    if "--no-full-size" not in sys.argv:
        full_size_table()
