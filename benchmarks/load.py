"""The load before the first step: memcalc's estimate (memcalc.load) against real loads measured on the CPU.

    python benchmarks/load.py [--families llama,qwen2,...] [--fsdp2] [--full-size]

Each row writes a checkpoint of a tiny config of the family (tests/tiny.py, random weights), loads it with
transformers' from_pretrained as the run would (the recipe's weight dtype; QLoRA: bitsandbytes' 4-bit config, then
PEFT's prepare_model_for_kbit_training) under memcalc's tracker (memcalc.measure.load), and puts the device's peak
beside the estimate's load peak. Untied and tied heads; bf16-pure, amp-bf16 (an fp32 load), QLoRA with its storage
options. ``--fsdp2``: FSDP2's units at full size, each made whole then sharded by torch's fully_shard on the fake
process group (memcalc.measure.load.measure_fsdp2). ``--full-size`` prints the estimate's load for presets at full
size beside their step's peak (no measurement). Prints the markdown of docs/accuracy.md's "The load" section.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from tiny import GPT2, tiny_raw

from memcalc.spec import TrainingSpec

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "gpt2"]
VARIANTS = {
    "bf16-pure": {"precision": "bf16-pure"},
    "amp-bf16 (fp32 load)": {"precision": "amp-bf16"},
    "QLoRA": {"lora_rank": 8, "qlora": True},
    "QLoRA, no upcast": {"lora_rank": 8, "qlora": True, "qlora_upcast": False},
    "QLoRA, no double quant": {"lora_rank": 8, "qlora": True, "qlora_double_quant": False},
    "QLoRA, lora-targets": {"lora_rank": 8, "qlora": True, "qlora_scope": "lora-targets"},
}
# FSDP2 units on the fake process group at full size: (model, GPUs, recipe); full fine-tuning (measure_fsdp2 builds
# the bare transformers model, no adapters)
FSDP2 = [
    ("llama-3-8b", 8, "bf16"), ("llama-3-8b", 64, "bf16"), ("llama-3-8b", 8, "bf16-pure"),
    ("llama-3-8b", 8, "amp-bf16"), ("qwen2.5-7b", 16, "bf16"), ("gemma-2-9b", 8, "bf16-pure"),
    ("mixtral-8x7b", 8, "bf16"), ("phi-3-mini", 4, "bf16"), ("gpt2", 4, "bf16"),
]
# the same with accelerate's cpu_ram_efficient_loading (its fsdp2_load_full_state_dict run as rank 1)
FSDP2_RAM_EFFICIENT = [
    ("llama-3-8b", 8, "bf16"), ("qwen2.5-7b", 16, "amp-bf16"), ("gemma-2-9b", 8, "bf16-pure"),
    ("mixtral-8x7b", 8, "bf16"), ("phi-3-mini", 4, "bf16"), ("gpt2", 4, "bf16"),
]
FULL_SIZE = [
    ("llama-3-8b", "--lora-rank 16 --qlora --seq-len 512 --checkpointing full"),
    ("llama-3-8b", "--lora-rank 16 --qlora --seq-len 2048 --checkpointing full"),
    ("llama-3.1-70b", "--lora-rank 16 --qlora --seq-len 512 --checkpointing full"),
    ("llama-3-8b", "--precision amp-bf16 --sharding torch --nodes 1 --gpus-per-node 8"),
    ("llama-3-8b", "--precision bf16 --fsdp --nodes 8 --gpus-per-node 8"),
    ("llama-3.1-70b", "--precision bf16 --fsdp --nodes 8 --gpus-per-node 8"),
    ("llama-3.1-70b", "--precision bf16 --fsdp --nodes 8 --gpus-per-node 8 --cpu-ram-efficient-loading"),
    ("llama-3.1-70b", "--precision bf16 --zero 3 --nodes 8 --gpus-per-node 8"),
]


def raw_of(family: str, tied: bool) -> dict:
    raw = dict(GPT2) if family == "gpt2" else tiny_raw(family)
    raw["tie_word_embeddings"] = tied
    return raw


def measured_rows(families: list[str]) -> list[tuple[str, str, str, int, int, float, float]]:
    from memcalc.api import model_of
    from memcalc.engine import estimate
    from memcalc.measure.load import measure
    from memcalc.model import ModelConfig

    rows = []
    for family in families:
        for tied in (False, True):
            raw = raw_of(family, tied)
            for label, fields in VARIANTS.items():
                spec = TrainingSpec(**fields)
                model = model_of(ModelConfig(family, raw, "tiny"))
                if spec.lora_rank and model.described.family.lora_targets is None:
                    spec = spec.replace(lora_targets=("q_proj", "v_proj"))  # (no PEFT default for the family)
                loaded = estimate(model, spec).per_gpu.load
                start = time.perf_counter()
                measured = measure(raw, spec)
                error = 100 * (loaded.peak_bytes - measured.peak_bytes) / measured.peak_bytes
                rows.append((family, "tied" if tied else "untied", label, loaded.peak_bytes, measured.peak_bytes,
                             error, time.perf_counter() - start))
                print(f"{family:10} {rows[-1][1]:6} {label:24} estimate {loaded.peak_bytes:>11,} measured "
                      f"{measured.peak_bytes:>11,} {error:+.3f}%", file=sys.stderr, flush=True)
    return rows


def fsdp2_rows() -> list[str]:
    from memcalc.api import model_input
    from memcalc.engine import estimate
    from memcalc.measure.load import measure_fsdp2

    lines = ["| model | GPUs | recipe | cpu_ram_efficient_loading | estimate (B) | measured (B) | error | moment |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    cases = [(*case, False) for case in FSDP2] + [(*case, True) for case in FSDP2_RAM_EFFICIENT]
    for model, gpus, precision, efficient in cases:
        found = model_input(model, None)
        spec = TrainingSpec(precision=precision, num_gpus=gpus, sharding="fsdp", zero_stage=3,
                            cpu_ram_efficient_loading=efficient)
        loaded = estimate(found, spec).per_gpu.load
        measured = measure_fsdp2(found.config, spec, rank=1 if efficient else 0)
        error = 100 * (loaded.peak_bytes - measured.peak_bytes) / measured.peak_bytes
        lines.append(f"| {model} | {gpus} | {precision} | {'on' if efficient else 'off'} | {loaded.peak_bytes:,} | "
                     f"{measured.peak_bytes:,} | {error:+.4f}% | {loaded.moment} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def full_size_rows() -> list[str]:
    from memcalc.api import estimate
    from memcalc.units import format_bytes

    lines = ["| model | run | load peak (moment) | step peak | host RAM per process / per node |",
             "|---|---|---|---|---|"]
    for model, flags in FULL_SIZE:
        report = estimate(model, **_fields(flags))
        loaded, per_gpu = report.per_gpu.load, report.per_gpu
        host = (f"{format_bytes(loaded.host_bytes)} / {format_bytes(loaded.host_bytes_per_node)}" if loaded.host_bytes
                else "not counted")
        lines.append(f"| {model} | `{flags}` | {format_bytes(loaded.peak_bytes)} ({loaded.moment}) | "
                     f"{format_bytes(per_gpu.step_peak().bytes)} | {host} |")
    return lines


def _fields(flags: str) -> dict:
    """The few flags FULL_SIZE uses, as the Python API's keywords."""
    words, fields = flags.split(), {}
    names = {"--lora-rank": ("lora_rank", int), "--seq-len": ("seq_len", int), "--checkpointing": ("checkpointing", str),
             "--precision": ("precision", str), "--sharding": ("sharding", str), "--nodes": ("nodes", int),
             "--gpus-per-node": ("gpus_per_node", int), "--zero": ("zero", int)}
    i = 0
    while i < len(words):
        if words[i] in ("--qlora", "--fsdp", "--cpu-ram-efficient-loading"):
            fields[words[i][2:].replace("-", "_")] = True
            i += 1
            continue
        name, kind = names[words[i]]
        fields[name] = kind(words[i + 1])
        i += 2
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--full-size", action="store_true", help="also the presets' estimates at full size")
    parser.add_argument("--fsdp2", action="store_true", help="also FSDP2's units on the fake process group")
    args = parser.parse_args()
    rows = measured_rows(args.families.split(","))
    print("| family | head | recipe | estimate (B) | measured (B) | error |")
    print("|---|---|---|---:|---:|---:|")
    for family, head, label, est, measured, error, _seconds in rows:
        print(f"| {family} | {head} | {label} | {est:,} | {measured:,} | {error:+.3f}% |")
    errors = [row[5] for row in rows]
    print(f"\n{len(rows)} loads: error {min(errors):+.3f}% to {max(errors):+.3f}%, "
          f"median |error| {sorted(abs(e) for e in errors)[len(errors) // 2]:.3f}%")
    if args.fsdp2:
        print()
        print("\n".join(fsdp2_rows()))
    if args.full_size:
        print()
        print("\n".join(full_size_rows()))


if __name__ == "__main__":
    main()
