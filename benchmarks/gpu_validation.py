"""GPU validation: the estimate and the caching-allocator replay against real steps on a CUDA GPU.

    python benchmarks/gpu_validation.py [--out docs/accuracy-gpu.md] [--budget 540] [--quick]

One prepared script for a lent GPU (issue 15): it finishes inside ``--budget`` seconds (default 9 minutes), runs
what it can in that time, most informative first, and writes what it measured with the device, driver, torch and
CUDA versions and the allocator settings. Each configuration runs ``--verify``'s CUDA step (memcalc.measure.cuda: a
warm-up step, then the measured step with torch.cuda's peak statistics read per phase and the garbage collector off)
and is put beside:
  - the estimate (memcalc's peak: live tensors) against ``requested_bytes.all.peak`` (the tensors' own bytes; target
    1%) and ``max_memory_allocated`` (blocks: rounding included);
  - the replay of the measured step's own allocations through memcalc.allocator against
    ``reserved_bytes.all.peak`` (target 5%), with ``num_alloc_retries`` and ``num_ooms``.
It also reads the CUDA context (device memory in use less what the allocator reserved, after the first kernel).

The configurations: presets at realistic sizes first (Llama-3.2-1B, Qwen2.5-0.5B, Llama-3-8B with LoRA and in full
with checkpointing), then the recipes issue 13 modelled from code a CPU cannot run for real (activation offloading's
CUDA streams; each decoder layer compiled by Inductor's Triton backend; torchao float8 Linear layers, compiled as
torchtitan runs them), then the CPU accuracy matrix's small models (benchmarks/accuracy.py), and last Liger's fused
linear cross-entropy (its patch of transformers' Llama classes lasts for the process). The compiled, float8 and Liger rows run the real libraries, so they are measured by the
allocator's statistics alone (no tracker, no replay). A configuration that fails (an OOM, a missing package) is a row
saying so; the script goes on.

Without a GPU, ``--device cpu`` runs the same bookkeeping on CPU tensors with torch.cuda's statistics faked (the
test suite does: tests/test_gpu_validation.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.accuracy import MODELS, matrix
from memcalc.api import model_input, model_of, run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

GIB = 2**30
DEFAULT_BUDGET_S = 540
OUT = Path(__file__).resolve().parent.parent / "docs" / "accuracy-gpu.md"
TARGET_ALLOCATED_PCT = 1.0
TARGET_RESERVED_PCT = 5.0


@dataclass(frozen=True)
class GpuCase:
    label: str
    model: str | dict  # a preset name, or a config (the CPU matrix's small models)
    spec: TrainingSpec
    # "" (--verify's CUDA step), or the real library the step runs: "compile" (layer.compile() on each decoder layer,
    # as torchtune's compile_model), "fp8" (torchao convert_to_float8_training, the output layer left out, then
    # compiled, as torchtitan), "liger" (apply_liger_kernel_to_llama's fused linear cross-entropy)
    library: str = ""


def cases(quick: bool = False) -> list[GpuCase]:
    found = [
        GpuCase("llama-3.2-1b bf16-pure b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024)),
        GpuCase("qwen2.5-0.5b amp-bf16 ckpt=full b8xs1024", "qwen2.5-0.5b",
                TrainingSpec(precision="amp-bf16", micro_batch_size=8, seq_len=1024, checkpointing="full")),
        GpuCase("llama-3-8b LoRA r16 bf16-pure b2xs2048", "llama-3-8b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=2, seq_len=2048, lora_rank=16)),
        GpuCase("llama-3-8b bf16-pure fused ckpt=full b1xs1024", "llama-3-8b",
                TrainingSpec(precision="bf16-pure", optim_impl="fused", micro_batch_size=1, seq_len=1024,
                             checkpointing="full")),
        GpuCase("llama-3.2-1b bf16-pure expandable_segments b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024)),
    ]
    found.append(GpuCase("qwen2.5-0.5b amp-bf16 ckpt=full reentrant b8xs1024", "qwen2.5-0.5b",
                         TrainingSpec(precision="amp-bf16", micro_batch_size=8, seq_len=1024, checkpointing="full",
                                      checkpoint_reentrant=True)))
    found.append(GpuCase("llama-3.2-1b bf16-pure offload=torchtune ckpt=full b4xs1024", "llama-3.2-1b",
                         TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, checkpointing="full",
                                      activation_offload="torchtune")))
    found += [
        GpuCase("llama-3.2-1b bf16-pure compile (Triton) b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True), "compile"),
        GpuCase("llama-3.2-1b bf16-pure compile ckpt=full b4xs2048", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=2048, compile=True,
                             checkpointing="full"), "compile"),
        GpuCase("llama-3.2-1b bf16-pure fp8 tensorwise compile b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True,
                             fp8="tensorwise"), "fp8"),
        GpuCase("llama-3.2-1b bf16-pure fp8 rowwise compile b4xs1024", "llama-3.2-1b",
                TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, compile=True,
                             fp8="rowwise"), "fp8"),
    ]
    found += [GpuCase(case.label, MODELS[case.family], case.spec()) for case in matrix(quick)]
    # last: Liger patches transformers' Llama classes for the rest of the process
    found.append(GpuCase("llama-3.2-1b bf16-pure Liger fused-linear b4xs1024", "llama-3.2-1b",
                         TrainingSpec(precision="bf16-pure", micro_batch_size=4, seq_len=1024, loss="fused-linear"),
                         "liger"))
    return found


@dataclass
class Row:
    label: str
    estimate_bytes: int | None = None
    requested_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    replayed_reserved_bytes: int | None = None
    retries: int | None = None
    ooms: int | None = None
    seconds: float = 0.0
    failure: str = ""

    @staticmethod
    def pct(value: int | None, reference: int | None) -> float | None:
        if value is None or not reference:
            return None
        return 100 * (value - reference) / reference

    @property
    def allocated_error(self) -> float | None:
        return self.pct(self.estimate_bytes, self.requested_bytes)

    @property
    def reserved_error(self) -> float | None:
        return self.pct(self.replayed_reserved_bytes, self.reserved_bytes)


def _config(case: GpuCase) -> tuple[ModelConfig, object]:
    if isinstance(case.model, str):
        model = model_input(case.model, None)
        assert model.config is not None
        return model.config, model
    config = ModelConfig(name=case.model["model_type"], raw=case.model, source="benchmarks/accuracy.py")
    return config, model_of(config)


def measure(case: GpuCase, device: str) -> Row:
    """One configuration on the GPU (or, with device "cpu", on CPU tensors under faked statistics)."""
    from memcalc.allocator import environment_cublas_workspace, parse_alloc_conf, replay, workspace_allocations
    from memcalc.measure.cuda import measure_cuda

    started = time.perf_counter()
    row = Row(case.label)
    conf = "expandable_segments:True" if "expandable_segments" in case.label else ""
    previous = os.environ.get("PYTORCH_ALLOC_CONF")
    try:
        config, model = _config(case)
        row.estimate_bytes = run(model, case.spec).per_gpu.peak_bytes
        if conf:
            # (the allocator reads its settings once per process: a GPU run sets them with _set_allocator_settings)
            _set_allocator_settings(conf, device)
        if case.library:
            _measure_library(row, config, case, device)
            return row
        measured = measure_cuda(config, case.spec, device=device)
        stats = measured.allocator_stats
        row.requested_bytes = stats.get("requested_bytes.all.peak")
        row.allocated_bytes = measured.measured_peak_bytes
        row.reserved_bytes = stats.get("reserved_bytes.all.peak", measured.reserved_peak_bytes)
        row.retries, row.ooms = stats.get("num_alloc_retries"), stats.get("num_ooms")
        if measured.allocation_events:
            # the card's cuBLAS workspaces go through the same allocator (memcalc.allocator.cublas_workspace_bytes)
            capability = measured.run.get("compute_capability")
            workspace = environment_cublas_workspace(str(capability) if capability else None)
            row.replayed_reserved_bytes = replay(measured.allocation_events, parse_alloc_conf(conf),
                                                 persistent=workspace_allocations(workspace)).reserved_peak_bytes
    except Exception as error:  # noqa: BLE001 (a row saying what failed; the script goes on)
        row.failure = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
    finally:
        if conf:
            _set_allocator_settings(previous or "", device)
        _release(device)
        row.seconds = time.perf_counter() - started
    return row


def _measure_library(row: Row, config: ModelConfig, case: GpuCase, device: str) -> None:
    """A step that runs a real GPU library: built as --verify builds it, the library applied, a warm-up step (the
    compilation), the peak statistics reset, then the measured step; read from the allocator's statistics only."""
    import dataclasses

    import torch

    from memcalc.measure import build
    from memcalc.measure.step import PhaseClock, Stepper, build_model, make_batch, one_step, resolve_setup

    plain = dataclasses.replace(case.spec, compile=False, fp8="none", loss="standard")
    setup = resolve_setup(plain, "sdpa", device)
    if case.library == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # (patches the class: before building)

        apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, cross_entropy=False)
    model = build_model(config, setup)
    if case.library == "fp8":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda _module, fqn: fqn != "lm_head")
    if case.library in ("compile", "fp8"):
        for layer in build.decoder_layers(model):
            layer.compile()
    stepper = Stepper(model, setup)
    batch, _notes = make_batch(model, setup)
    one_step(model, stepper, batch, setup, PhaseClock())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    one_step(model, stepper, batch, setup, PhaseClock())
    stats = torch.cuda.memory_stats()
    row.requested_bytes = stats.get("requested_bytes.all.peak")
    row.allocated_bytes = stats.get("allocated_bytes.all.peak")
    row.reserved_bytes = stats.get("reserved_bytes.all.peak")
    row.retries, row.ooms = stats.get("num_alloc_retries"), stats.get("num_ooms")


def _set_allocator_settings(conf: str, device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.memory._set_allocator_settings(conf or "expandable_segments:False")


def _release(device: str) -> None:
    """Between configurations: nothing left cached, peaks reset (each row starts from an empty allocator)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(device: str) -> dict[str, str]:
    import torch

    from memcalc.measure.cuda import _device_name, _versions, cuda_context_bytes

    found = {"device": _device_name(device if device.startswith("cuda") else None), **_versions(),
             "transformers": _version_of("transformers"), "date": datetime.date.today().isoformat()}
    if device.startswith("cuda"):
        torch.ones(1, device=device).sum().item()  # the context exists once a kernel ran
    context = cuda_context_bytes(device if device.startswith("cuda") else None)
    found["cuda_context"] = "unknown" if context is None else f"{context:,} B ({context / 2**20:.0f} MiB)"
    return found


def _version_of(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def validate(selected: list[GpuCase], device: str, budget_s: float) -> tuple[dict[str, str], list[Row]]:
    started = time.perf_counter()
    env = environment(device)
    rows = []
    for case in selected:
        if time.perf_counter() - started > budget_s:
            rows.append(Row(case.label, failure=f"not run: the {budget_s:.0f} s budget was spent"))
            continue
        rows.append(measure(case, device))
        print(f"{rows[-1].label}: {rows[-1].seconds:.1f} s {rows[-1].failure}", file=sys.stderr, flush=True)
    return env, rows


def markdown(env: dict[str, str], rows: list[Row]) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.3f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.2f}%"

    lines = ["# Accuracy on a CUDA GPU (`python benchmarks/gpu_validation.py`)", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             ("Estimate: memcalc's peak (live tensors) against `requested_bytes.all.peak`; replay: the measured "
              "step's own allocations through memcalc.allocator against `reserved_bytes.all.peak`. In GiB."), "",
             ("| configuration | estimate | requested | error | allocated | reserved | replayed reserved | error | "
              "retries | OOMs | s | failure |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {gib(r.estimate_bytes)} | {gib(r.requested_bytes)} | {pct(r.allocated_error)} | "
                     f"{gib(r.allocated_bytes)} | {gib(r.reserved_bytes)} | {gib(r.replayed_reserved_bytes)} | "
                     f"{pct(r.reserved_error)} | {'-' if r.retries is None else r.retries} | "
                     f"{'-' if r.ooms is None else r.ooms} | {r.seconds:.1f} | {r.failure} |")
    for name, errors, target in (
            ("estimate vs requested", [r.allocated_error for r in rows], TARGET_ALLOCATED_PCT),
            ("replayed vs measured reserved", [r.reserved_error for r in rows], TARGET_RESERVED_PCT)):
        found = [abs(e) for e in errors if e is not None]
        if found:
            lines.append(f"\n{name}: {len(found)} rows, median |error| {statistics.median(found):.2f}%, worst "
                         f"{max(found):.2f}%, {sum(e <= target for e in found)} within the {target:g}% target")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds (default 540)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the small-model matrix")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with torch.cuda faked (tests)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_validation: no CUDA GPU here (torch.cuda.is_available() is False); nothing was written",
              file=sys.stderr)
        return 1
    env, rows = validate(cases(args.quick), args.device, args.budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(env, rows), encoding="utf-8")
    print(f"gpu_validation: {len(rows)} configurations, written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
