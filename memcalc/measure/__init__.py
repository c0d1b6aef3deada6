"""Measure a real training step and put it beside the estimate (``--verify``).

The only part of memcalc that uses torch and transformers; importing this package imports neither (they are
imported when a measurement runs). Methods:
  cuda         a CUDA GPU's allocator peak (``torch.cuda.max_memory_allocated``) over a steady-state step
  cpu-tracker  real CPU tensors, their storages tracked by a TorchDispatchMode (memcalc.measure.tracker)
  trace        the full-size model under FakeTensorMode through the same tracker: no memory allocated
``auto`` picks cuda when a GPU is available; else cpu-tracker when the estimated peak fits half this machine's RAM,
and the full-size trace when it does not. Several GPUs: a fake process group at full size, or gloo ranks.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, NamedTuple

from memcalc.errors import INSTALL_TORCH, MissingDependencyError, UsageError
from memcalc.measure.measurement import METHOD_CPU_TRACKER, METHOD_CUDA, METHOD_TRACE, METHODS, Measurement
from memcalc.model import ModelConfig
from memcalc.report import Report
from memcalc.spec import Sharding, TrainingSpec
from memcalc.units import format_bytes
from memcalc.vocab import (
    TERM_ACTIVATIONS,
    TERM_LOSS_BUFFERS,
    TERM_PIPELINE_BUFFERS,
    TERM_PIPELINE_HELD_ACTIVATIONS,
    TERM_PIPELINE_HELD_LOSSES,
    TERM_PIPELINE_OUTPUTS,
    Phase,
)

__all__ = ["INSTALL_HINT", "METHODS", "Measurement", "Outcome", "Row", "compare", "estimate_for", "run_verify", "verify"]

INSTALL_HINT = f"verify needs torch and transformers: {INSTALL_TORCH}"
# A cpu-tracker run holds real tensors: refuse one whose estimated peak is above this share of the RAM.
CPU_RAM_FRACTION = 0.5
PHASE_ROW_PREFIX = "phase:"
PEAK_ROW = "peak"
MEASURED_ONLY_TERMS = ("backward_temporaries", "other")


class Row(NamedTuple):
    """One line of estimate vs measurement. ``term`` is a term name, ``phase:<phase>`` or ``peak``.
    ``error_pct`` is (estimate - measured) / measured x 100, None when nothing was measured."""

    term: str
    estimate_bytes: int
    measured_bytes: int | None
    error_pct: float | None


def _require_torch() -> None:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"{INSTALL_HINT} ({' and '.join(missing)} not installed)")


def _as_config(model_config: ModelConfig | dict[str, Any]) -> ModelConfig:
    if isinstance(model_config, ModelConfig):
        return model_config
    raw = dict(model_config)
    return ModelConfig(name=str(raw.get("_name", "config")), raw=raw, source=str(raw.get("_source", "config dict")))


def estimate_for(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec) -> Report:
    """The estimate the measurement is checked against: the exact inventory of this config."""
    from memcalc.engine import estimate
    from memcalc.resolve import model_of

    return estimate(model_of(_as_config(model_config)), spec)


def ram_bytes() -> int | None:
    """MemTotal from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_fits_ram(report: Report, spec: TrainingSpec) -> None:
    total = ram_bytes()
    if total is None:
        return
    peak = report.per_gpu.peak_bytes
    if peak > CPU_RAM_FRACTION * total:
        raise UsageError(
            f"verify on the CPU would hold real tensors: the estimated peak is {format_bytes(peak)} "
            f"({report.training.precision}, {report.training.optimizer}, batch {spec.micro_batch_size} x seq "
            f"{spec.seq_len}, peak in the {report.per_gpu.peak_phase.value}), more than half of this machine's "
            f"{format_bytes(total)} RAM; use {{verify}}=trace (no memory) or a smaller {{seq_len}}"
        )


def _check_fits_gpu(report: Report, spec: TrainingSpec) -> None:
    import torch

    try:
        _free, total = torch.cuda.mem_get_info()
    except (RuntimeError, AssertionError):
        return
    peak = report.per_gpu.peak_bytes
    if peak > total:
        raise UsageError(
            f"verify on this GPU: the estimated peak is {format_bytes(peak)} ({report.training.precision}, "
            f"{report.training.optimizer}, batch {spec.micro_batch_size} x seq {spec.seq_len}), more than its "
            f"{format_bytes(int(total))}; use {{verify}}=trace (full size, no memory) or a smaller {{seq_len}}"
        )


def resolve_method(method: str) -> str:
    if method == "auto":
        import torch

        return METHOD_CUDA if torch.cuda.is_available() else METHOD_CPU_TRACKER
    if method not in METHODS:
        raise UsageError(f"{{verify}}={method}: use auto, {', '.join(METHODS)}")
    return method


# spec.attention -> transformers attn_implementation for the measured run. flash_attention_2 needs the
# flash-attn package and CUDA; its memory is sdpa's (output + logsumexp), so sdpa stands in for it.
ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "sdpa"}


def run_verify(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, method: str = "auto", *,
               attn_implementation: str | None = None, progress: Callable[[str], None] | None = None) -> Measurement:
    """Run one warm-up and one measured training step of this config and spec; return what was measured.

    Raises UsageError (before anything is allocated) when torch/transformers are missing, when the spec has
    parts a single-process step cannot run, or when a cpu-tracker run's estimated peak exceeds half the RAM.
    """
    _require_torch()
    config = _as_config(model_config)
    method = resolve_method(method)
    attn_implementation = attn_implementation or ATTN_IMPLEMENTATIONS[spec.attention.value]
    if attn_implementation == "sdpa":
        from memcalc.measure import build

        if not build.sdpa_supported(config.raw):
            attn_implementation = "eager"  # (a class without an sdpa path trains eager: the estimate counts it so)
    if method == METHOD_CPU_TRACKER:
        _check_fits_ram(estimate_for(config, spec), spec)
    elif method == METHOD_CUDA:
        _check_fits_gpu(estimate_for(config, spec), spec)
    from memcalc.measure.step import resolve_setup

    setup = resolve_setup(spec, attn_implementation)  # refuse unsupported specs before building anything
    if spec.lora_rank and setup.master_dtype is not None:
        # PEFT's adapters on a 16-bit base are fp32 (autocast_adapter_dtype), which the estimate counts as 16-bit
        # weights with an fp32 master: the two steps would differ in what holds the adapters, not in memory.
        raise UsageError("verify runs LoRA with a recipe without a master copy (bf16-pure, fp32, amp-bf16); the "
                         f"{spec.precision.value} recipe counts PEFT's fp32 adapters as 16-bit weights with an fp32 "
                         "master")
    if method == METHOD_TRACE:
        from memcalc.measure.trace import measure_trace

        return measure_trace(config, spec, attn_implementation=attn_implementation, progress=progress)
    if method == METHOD_CUDA:
        from memcalc.measure.cuda import measure_cuda

        return measure_cuda(config, spec, attn_implementation=attn_implementation, progress=progress)
    from memcalc.measure.step import measure_cpu

    return measure_cpu(config, spec, attn_implementation=attn_implementation, progress=progress)


def _error_pct(estimate: int, measured: int | None) -> float | None:
    if measured is None:
        return None
    if measured == 0:
        return 0.0 if estimate == 0 else None
    return round((estimate - measured) / measured * 100, 2)


# --pp: the other micro-batches' activations and losses a stage holds are terms of their own in the estimate, one
# category with the micro-batch's own for the tracker (and so are its cached outputs); the stage's receive buffers are
# its comm_buffers.
_HELD_WITH = {TERM_PIPELINE_HELD_ACTIVATIONS: TERM_ACTIVATIONS, TERM_PIPELINE_OUTPUTS: TERM_ACTIVATIONS,
              TERM_PIPELINE_HELD_LOSSES: TERM_LOSS_BUFFERS}
_MEASURED_AS = {TERM_PIPELINE_BUFFERS: "comm_buffers"}  # (memcalc.measure.distributed.COMM_BUFFERS: needs torch)


def compare(report: Report, measurement: Measurement) -> list[Row]:
    """Estimate beside measurement: one row per estimator term (plus the measured-only terms), then one per
    phase (``phase:forward`` ...) and the ``peak``."""
    rows: list[Row] = []
    measured = measurement.term_bytes
    estimated = {t.name: t.bytes for t in report.per_gpu.terms}
    for term in report.per_gpu.terms:
        if term.name in _HELD_WITH:
            continue  # (shown in the row of the term it holds more of, as the tracker counts them)
        value = measured.get(_MEASURED_AS.get(term.name, term.name), 0)
        expected = term.bytes + sum(estimated.get(name, 0) for name, of in _HELD_WITH.items() if of == term.name)
        rows.append(Row(term.name, expected, value, _error_pct(expected, value)))
    names = {t.name for t in report.per_gpu.terms}
    for name in MEASURED_ONLY_TERMS:
        if name not in names and measured.get(name):
            rows.append(Row(name, 0, measured[name], _error_pct(0, measured[name])))
    for phase in report.per_gpu.phases:
        if phase.phase == Phase.load:
            continue  # (the load before the first step: a measured step starts after it)
        value = measurement.per_phase_peak_bytes.get(phase.phase.value)
        rows.append(Row(PHASE_ROW_PREFIX + phase.phase.value, phase.bytes, value, _error_pct(phase.bytes, value)))
    step_peak = report.per_gpu.step_peak().bytes
    rows.append(Row(PEAK_ROW, step_peak, measurement.measured_peak_bytes,
                    _error_pct(step_peak, measurement.measured_peak_bytes)))
    return rows


# A GPU run may use this share of the card (the rest: CUDA context, allocator slack).
GPU_MEMORY_FRACTION = 0.9


class Outcome(NamedTuple):
    """A verification: the estimate that was checked (of the scaled config when scaled), what was measured,
    the rows comparing them, and how the config was scaled down to fit the measuring machine (or [])."""

    report: Report
    measurement: Measurement
    rows: list[Row]
    scaled: list[str]


def _budget_bytes(method: str) -> int | None:
    if method == METHOD_CPU_TRACKER:
        total = ram_bytes()
        return int(CPU_RAM_FRACTION * total) if total else None
    if method == METHOD_CUDA:
        import torch

        try:
            _free, total = torch.cuda.mem_get_info()
        except (RuntimeError, AssertionError):
            return None
        return int(GPU_MEMORY_FRACTION * total)
    return None  # trace: fake tensors hold no memory


def verify(model_config: ModelConfig, spec: TrainingSpec, method: str = "auto", *,
           progress: Callable[[str], None] | None = None, scale: bool | None = None) -> Outcome:
    """Measure a step of this config beside its estimate.

    ``auto`` on a CPU: a real step under the tensor tracker when the model's estimated peak fits half the RAM,
    else the full-size model traced under FakeTensorMode (no memory), as the notes then say. ``cuda`` and
    ``cpu-tracker`` scale a model their machine cannot hold down (same family and structure: fewer layers, then
    narrower) and verify that instead, as the output says; ``scale=False`` refuses instead.
    """
    from memcalc.families.scaling import scale_to_fit
    from memcalc.spec import Sharding

    if spec.sharding == Sharding.megatron:
        raise UsageError("{verify} runs PyTorch's step; {engine} megatron is Megatron-LM's, which needs CUDA and is "
                         "not run here (its model states are modelled from its code, unmeasured): drop {verify}")
    _require_torch()
    if spec.num_gpus > 1:
        return _verify_ranks(model_config, spec, method, progress)
    notes: list[str] = []
    resolved = resolve_method(method)
    if method == "auto" and resolved == METHOD_CPU_TRACKER:
        peak, budget = estimate_for(model_config, spec).per_gpu.peak_bytes, _budget_bytes(METHOD_CPU_TRACKER)
        if budget is not None and peak > budget:
            resolved = METHOD_TRACE
            notes.append(f"a real CPU step would hold {format_bytes(peak)}, more than half of this machine's RAM: "
                         "the full-size model was traced under FakeTensorMode instead (no memory); cpu-tracker "
                         "runs a scaled-down copy for real")
    budget = _budget_bytes(resolved) if scale is not False else None
    raw, scaled = model_config.raw, []
    if budget is not None:
        raw, scaled = scale_to_fit(model_config.raw,
                                   lambda r: estimate_for(_with_raw(model_config, r), spec).per_gpu.peak_bytes, budget)
    config = _with_raw(model_config, raw) if scaled else model_config
    report = estimate_for(config, spec)
    measurement = run_verify(config, spec, resolved, progress=progress)
    measurement.notes[:0] = notes
    return Outcome(report, measurement, compare(report, measurement), scaled)


def _torch_engine(spec: TrainingSpec) -> tuple[str, bool, TrainingSpec, list[str]]:
    """The PyTorch engine that runs this spec's sharding (DeepSpeed itself is not installed here)."""
    from memcalc.spec import Sharding

    if spec.sharding == Sharding.fsdp:
        return "fsdp2", spec.zero_stage == 3, spec, []
    if spec.sharding == Sharding.torch:
        return ("ddp" if spec.zero_stage == 0 else "zero1"), True, spec, []
    # DeepSpeed ZeRO: measure PyTorch's equivalent, and check the estimate of that equivalent.
    if spec.offload.value != "none":
        raise UsageError("verify with {offload}: DeepSpeed is not run here and PyTorch has no ZeRO-Offload "
                         "equivalent; verify without {offload}")
    engine, sharding, stage = {0: ("ddp", "torch", 0), 1: ("zero1", "torch", 1), 2: ("fsdp2", "fsdp", 2),
                               3: ("fsdp2", "fsdp", 3)}[spec.zero_stage]
    note = (f"DeepSpeed is not run here: verified PyTorch's equivalent of ZeRO-{spec.zero_stage} "
            f"({engine}{', reshard_after_forward=' + str(stage == 3) if engine == 'fsdp2' else ''}) against "
            "memcalc's estimate for that engine")
    return engine, stage == 3, spec.replace(sharding=sharding, zero_stage=stage), [note]


def _verify_ranks(model_config: ModelConfig, spec: TrainingSpec, method: str,
                  progress: Callable[[str], None] | None) -> Outcome:
    """Several GPUs: a fake process group at full size (auto, trace) or real gloo ranks on the CPU."""
    from memcalc.measure.distributed import measure_distributed

    if method == METHOD_CUDA:
        raise UsageError("{verify}=cuda measures one GPU; for several GPUs use {verify}=trace (fake process group) "
                         "or {verify}=cpu-tracker (gloo ranks on this CPU)")
    if spec.ep > 1:
        if method == METHOD_TRACE:
            raise UsageError("{verify}=trace with {ep}: how many tokens each rank receives is the router's choice, "
                             "which fake tensors cannot make; use {verify}=cpu-tracker (gloo ranks)")
        method = METHOD_CPU_TRACKER
    if spec.pp > 1:
        return _verify_stages(model_config, spec, method, progress)
    layout: dict[str, bool] = {}
    if spec.cp > 1 and spec.num_gpus != spec.cp * spec.tp:
        raise UsageError(f"{{verify}} runs one context-parallel group of {spec.cp} ranks (of {spec.tp} tensor-parallel "
                         f"ranks each): give {{gpus}} {spec.cp * spec.tp} (more data parallelism around it is "
                         "composed, not measured)")
    if spec.tp > 1:
        layout = {"sequence_parallel": spec.sequence_parallel, "loss_parallel": spec.loss_parallel}
        if spec.data_parallel == 1 and spec.ep == 1:
            engine, reshard, checked, notes = "tp", True, spec, []
        elif spec.sharding.value == "fsdp":
            engine, reshard, checked, notes = "fsdp2", spec.zero_stage == 3, spec, []
        else:
            raise UsageError(f"{{verify}} runs tensor-parallel groups alone or under FSDP2 ({{sharding}} fsdp): give "
                             f"{{gpus}} {spec.tp} or {{sharding}} fsdp")
    else:
        engine, reshard, checked, notes = _torch_engine(spec)
    report = estimate_for(model_config, checked)
    if engine == "zero1" and report.model.num_tensors < spec.num_gpus:
        # ZeroRedundancyOptimizer gives each rank whole tensors: past one tensor per rank some ranks own none, and
        # their torch.optim optimizer refuses the empty parameter list (PyTorch's own run fails the same way).
        raise UsageError(f"ZeroRedundancyOptimizer on {spec.num_gpus} ranks: this model has {report.model.num_tensors} "
                         f"parameter tensors, so some ranks would own none and torch.optim refuses an empty parameter "
                         f"list; verify with {{gpus}} {report.model.num_tensors} or fewer")
    if method == METHOD_CPU_TRACKER:
        total = ram_bytes()
        needed = report.per_gpu.peak_bytes * spec.num_gpus
        if total and needed > CPU_RAM_FRACTION * total:
            raise UsageError(
                f"{{verify}}=cpu-tracker would run {spec.num_gpus} gloo ranks of {format_bytes(report.per_gpu.peak_bytes)} "
                f"each, more than half of this machine's {format_bytes(total)} RAM; use {{verify}}=trace")
        ranks = measure_distributed(model_config, checked, engine=engine, world_size=spec.num_gpus, method="gloo",
                                    reshard_after_forward=reshard, progress=progress, **layout)
    else:
        # rank 0, and for ZeroRedundancyOptimizer every rank (whole parameters: ranks differ); with context
        # parallelism the first and the last (rank 0's attention output is rebuilt, the last's is not)
        # (one rank of a (dp, tp) mesh: the fake group's process groups are made once per process)
        wanted = (tuple(range(spec.num_gpus)) if engine == "zero1"
                  else (0, spec.num_gpus - 1) if spec.cp > 1 and spec.tp == 1 else (0,))
        ranks = measure_distributed(model_config, checked, engine=engine, world_size=spec.num_gpus, method="fake",
                                    reshard_after_forward=reshard, progress=progress, fake_ranks=wanted, **layout)
    busiest = max(ranks, key=lambda m: m.measured_peak_bytes)
    if spec.ep > 1:
        notes.append(_routing_note(ranks, model_config, spec))
    busiest.notes.extend(notes)
    busiest.notes.append(f"measured {len(ranks)} rank(s); shown: the most loaded")
    return Outcome(report, busiest, compare(report, busiest), [])


def _routing_note(ranks: list[Measurement], model_config: ModelConfig, spec: TrainingSpec) -> str:
    """--ep: the routing the measured step ran (pairs each rank received per MoE layer) and the --ep-load it implies."""
    from memcalc.expert_parallel import sent_tokens
    from memcalc.resolve import model_of

    received = [m.run.get("distributed", {}).get("ep_received_pairs", []) for m in ranks]
    # (the pairs a rank sends: its micro-batch's, or with --tp its slice of the group's)
    average = (sent_tokens(spec.micro_batch_size * spec.local_seq_len, spec.tp)
               * model_of(model_config).arch.experts_per_token)
    most = max((max(r, default=0) for r in received), default=0)
    implied = f"--ep-load {most / average:.3g}" if average else "an --ep-load"
    shown = "; ".join(f"rank {i}: {', '.join(f'{n:,}' for n in r)}" for i, r in enumerate(received))
    return (f"routing measured (pairs each rank received in each MoE forward, every layer and micro-batch, the "
            f"warm-up step's included, then any recomputation): {shown}; "
            f"the most loaded layer of the most loaded rank took {most:,} of the {average:,} average, so {implied} "
            "describes this run (the estimate shown uses the --ep-load given)")


def _verify_stages(model_config: ModelConfig, spec: TrainingSpec, method: str,
                   progress: Callable[[str], None] | None) -> Outcome:
    """--pp: every stage (torch.distributed.pipelining) on its own gloo rank (cpu-tracker, real tensors) or alone on
    the fake process group at full size (trace, and auto), beside the estimate of the most loaded measured stage."""
    from memcalc.measure.distributed import measure_distributed

    sharded = spec.data_parallel > 1 and spec.sharding == Sharding.fsdp and spec.zero_stage >= 2
    if spec.tp > 1 and method != METHOD_CPU_TRACKER:
        raise UsageError("{verify} runs stages over tensor-parallel groups on gloo ranks only: use "
                         "{verify}=cpu-tracker")
    if spec.tp > 1 and (spec.data_parallel > 1 or spec.interleaved or spec.sequence_parallel or spec.loss_parallel):
        raise UsageError(f"{{verify}} runs stages over tensor-parallel groups on gloo ranks ({{verify}}=cpu-tracker): "
                         f"one pipeline of {spec.pp} x {spec.tp} ranks, gpipe or 1f1b, without {{sp}} or "
                         f"{{loss_parallel}}; give {{gpus}} {spec.pp * spec.tp} (other layouts of stages under tensor "
                         "parallelism are composed, not measured)")
    if spec.tp == 1 and spec.data_parallel > 1 and not (sharded and method == METHOD_CPU_TRACKER):
        raise UsageError(f"{{verify}} runs one pipeline of {spec.pp} ranks, or on gloo ranks ({{verify}}=cpu-tracker) "
                         f"its stages over FSDP2 data-parallel ranks: give {{gpus}} {spec.pp} (stages under DDP or "
                         "ZeRO-1 are composed, not measured)")
    world = spec.pp * spec.tp * spec.data_parallel
    if method == METHOD_CUDA:
        raise UsageError("{verify}=cuda measures one GPU; pipeline stages run on gloo ranks ({verify}=cpu-tracker) or "
                         "on the fake process group ({verify}=trace)")
    if method == METHOD_CPU_TRACKER:
        report = estimate_for(model_config, spec)
        total = ram_bytes()
        if total and report.per_gpu.peak_bytes * world > CPU_RAM_FRACTION * total:
            raise UsageError(f"{{verify}}=cpu-tracker would run {world} gloo ranks of up to "
                             f"{format_bytes(report.per_gpu.peak_bytes)} each, more than half of this machine's "
                             f"{format_bytes(total)} RAM: use {{verify}}=trace")
        stages = measure_distributed(model_config, spec, engine="pp", world_size=world, method="gloo",
                                     progress=progress)
    else:
        stages = measure_distributed(model_config, spec, engine="pp", world_size=spec.pp, method="fake",
                                     progress=progress, fake_ranks=tuple(range(spec.pp)))
    busiest = max(stages, key=lambda m: m.measured_peak_bytes)
    rank = busiest.run["distributed"]["stage"]
    checked = estimate_for(model_config, spec.replace(pp_rank=rank) if spec.interleaved
                           else spec.replace(pp_stage=rank))
    if spec.interleaved:
        what = f"ranks; shown: the most loaded, rank {rank}"
    elif sharded:
        ring = (", its context-parallel ranks too: the ring over them" if spec.cp > 1 else
                f", {spec.ep} of them splitting its experts" if spec.ep > 1 else "")
        what = (f"ranks ({spec.pp} stages x {spec.data_parallel} FSDP2 data-parallel ranks{ring}); shown: the most "
                f"loaded, stage {rank}")
    elif spec.tp > 1:
        what = f"ranks ({spec.pp} stages x {spec.tp} tensor-parallel ranks); shown: the most loaded, stage {rank}"
    else:
        what = f"stages; shown: the most loaded, stage {rank}"
    busiest.notes.append(f"measured {len(stages)} {what}, beside its estimate")
    if spec.ep > 1:
        busiest.notes.append(_routing_note(stages, model_config, spec))
    return Outcome(checked, busiest, compare(checked, busiest), [])


def _with_raw(config: ModelConfig, raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig(name=f"{config.name} (scaled)" if raw is not config.raw else config.name, raw=raw,
                       source=config.source, aliases=config.aliases)
