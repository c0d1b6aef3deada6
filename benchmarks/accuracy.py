"""Accuracy of the estimate against measured training steps: the matrix behind docs/accuracy.md.

    python benchmarks/accuracy.py [--quick] [--no-trace] [--markdown docs/accuracy.md]

Every configuration runs a warm-up step and a measured step on the CPU under memcalc's tensor-lifetime
tracker (memcalc.measure, cpu-tracker), and the estimate for exactly that model and spec is put beside it.
Then Llama-3-8B is traced at full size (FakeTensorMode, no memory) at seq 2048 and 8192. Configurations
where a CPU run cannot behave like a GPU run (CPU autocast keeps layer_norm/softmax/pow in 16-bit) are
reported apart and left out of the summary statistics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from memcalc.api import model_input, model_of, run
from memcalc.model import ModelConfig
from memcalc.resolve import ModelInput
from memcalc.spec import TrainingSpec
from memcalc.units import format_bytes

# Small models of three families: big enough for realistic proportions, small enough for seconds per step.
MODELS = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
              "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 4096, "max_position_embeddings": 1024},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 256,
              "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 1024,
              "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 256, "n_layer": 4,
             "n_head": 8, "vocab_size": 4096, "n_positions": 1024,
             "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},  # CPU dropout differs from CUDA's
}


@dataclass(frozen=True)
class Case:
    family: str
    precision: str
    optimizer: str = "adamw"
    impl: str = "foreach"
    attention: str = "sdpa"
    checkpointing: str = "none"
    seq_len: int = 256
    batch: int = 2

    @property
    def label(self) -> str:
        parts = [self.family, self.precision, f"{self.optimizer}-{self.impl}" if self.optimizer in ("adamw", "adam") else self.optimizer,
                 self.attention, f"ckpt={self.checkpointing}", f"b{self.batch}xs{self.seq_len}"]
        return " ".join(parts)

    @property
    def cpu_differs(self) -> str | None:
        if self.precision.startswith("amp") and self.family == "gpt2":
            return "CPU autocast runs NewGELU's pow in bf16 (CUDA: fp32, as the estimate models)"
        return None

    def spec(self) -> TrainingSpec:
        return TrainingSpec(precision=self.precision, optimizer=self.optimizer, optim_impl=self.impl,
                            attention=self.attention, checkpointing=self.checkpointing,
                            micro_batch_size=self.batch, seq_len=self.seq_len)


def matrix(quick: bool = False) -> list[Case]:
    cases: list[Case] = []
    for family in ("llama", "qwen2", "gpt2"):
        for precision in ("fp32", "bf16-pure", "amp-bf16", "bf16"):
            cases.append(Case(family, precision))
        cases += [
            Case(family, "bf16-pure", impl="fused"),
            Case(family, "bf16-pure", impl="forloop"),
            Case(family, "fp32", optimizer="adafactor"),
            Case(family, "fp32", optimizer="sgd"),
            Case(family, "bf16-pure", attention="eager"),
            Case(family, "bf16-pure", checkpointing="full"),
            Case(family, "amp-bf16", checkpointing="full", seq_len=512),
            Case(family, "bf16-pure", seq_len=512),
        ]
    if quick:
        cases = [c for i, c in enumerate(cases) if i % 4 == 0]
    return cases


@dataclass
class Result:
    label: str
    estimated: int
    measured: int
    phase_estimated: str
    phase_measured: str
    seconds: float
    note: str = ""

    @property
    def error_pct(self) -> float:
        return 100 * (self.estimated - self.measured) / self.measured


def _model(raw: dict) -> tuple[ModelConfig, ModelInput]:
    config = ModelConfig(name=raw["model_type"], raw=raw, source="benchmarks/accuracy.py")
    return config, model_of(config)


def measure_case(case: Case) -> Result:
    from memcalc.measure import run_verify

    config, model = _model(MODELS[case.family])
    report = run(model, case.spec())
    start = time.perf_counter()
    measured = run_verify(config, case.spec(), "cpu-tracker")
    return Result(case.label, report.per_gpu.peak_bytes, measured.measured_peak_bytes,
                  report.per_gpu.peak_phase.value, measured.measured_peak_phase, time.perf_counter() - start,
                  case.cpu_differs or "")


def trace_llama3(seq_len: int, precision: str, checkpointing: str = "none", impl: str = "foreach") -> Result:
    from memcalc.measure import run_verify

    model = model_input("llama-3-8b", None)
    spec = TrainingSpec(precision=precision, seq_len=seq_len, checkpointing=checkpointing, optim_impl=impl)
    report = run(model, spec)
    start = time.perf_counter()
    measured = run_verify(model.config, spec, "trace")
    return Result(f"llama-3-8b {precision} adamw-{impl} ckpt={checkpointing} b1xs{seq_len} (trace)", report.per_gpu.peak_bytes,
                  measured.measured_peak_bytes, report.per_gpu.peak_phase.value, measured.measured_peak_phase,
                  time.perf_counter() - start)


def summary(results: list[Result]) -> tuple[float, float, int]:
    comparable = [r for r in results if not r.note]
    errors = [abs(r.error_pct) for r in comparable]
    phase_misses = sum(r.phase_estimated != r.phase_measured for r in comparable)
    return statistics.median(errors), max(errors), phase_misses


def table(results: list[Result]) -> str:
    lines = ["| configuration | estimated peak | measured peak | error | phase est. / meas. | note |",
             "|---|---:|---:|---:|---|---|"]
    for r in results:
        phase = r.phase_estimated if r.phase_estimated == r.phase_measured else f"**{r.phase_estimated} / {r.phase_measured}**"
        lines.append(f"| {r.label} | {format_bytes(r.estimated, 'mib', 3)} | {format_bytes(r.measured, 'mib', 3)} | "
                     f"{r.error_pct:+.2f}% | {phase} | {r.note} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every fourth configuration only")
    parser.add_argument("--no-trace", action="store_true", help="skip the full-size Llama-3-8B traces")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()

    results = []
    for case in matrix(args.quick):
        result = measure_case(case)
        results.append(result)
        print(f"{result.error_pct:+7.2f}%  {result.phase_estimated:>14} / {result.phase_measured:<14} {case.label}",
              file=sys.stderr)
    median, worst, misses = summary(results)
    text = ["# Accuracy: estimate vs measured training steps", "",
            "Written by `python benchmarks/accuracy.py --markdown docs/accuracy.md`. Each CPU row runs a warm-up "
            "step and a measured step of a small model under memcalc's tensor-lifetime tracker (`memcalc.measure`, "
            "cpu-tracker); the estimate is for exactly that model and spec. The Llama-3-8B rows trace the real "
            "transformers class at full size under FakeTensorMode (no memory). Error = (estimate - measured) / "
            "measured. Rows with a note are runs whose CPU behaviour differs from a GPU's, reported apart.", "",
            f"## CPU-tracked matrix ({len(results)} configurations)", "", table(results), "",
            f"Median absolute error {median:.2f}%, worst {worst:.2f}%, peak phase wrong in {misses} of "
            f"{sum(not r.note for r in results)} comparable configurations (rows with a note are left out)."]
    if not args.no_trace:
        # foreach AdamW makes the optimizer step the peak; fused leaves the forward/backward peak exposed.
        traces = [trace_llama3(seq, precision, ckpt, impl) for seq in (2048, 8192)
                  for precision in ("bf16-pure", "amp-bf16") for ckpt in ("none", "full") for impl in ("foreach", "fused")]
        text += ["", "## Llama-3-8B traced at full size (FakeTensorMode)", "", table(traces)]
    output = "\n".join(text)
    print(output)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(output + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
