"""The library: what notebooks and the CLI both call. No printing.

    import memcalc
    report = memcalc.estimate("llama-3-8b", precision="bf16", optim="adamw", gpu="h100-80gb")
    report.per_gpu.peak_bytes, report.per_gpu.peak_phase, report.fit.fits
    memcalc.compare("llama-3-8b", zero=[0, 1, 2, 3], gpus=8)        # one Report per ZeRO stage
    memcalc.verify("qwen2.5-0.5b", seq_len=256)                       # a measured step beside the estimate
    memcalc.layouts("llama-3.1-405b", gpus=512, gpu="h100-80gb")     # layouts that fit, ranked (memcalc.planner)
    memcalc.presets()                                                 # model and GPU presets

The keywords are ``memcalc.request.Request``'s fields (the CLI's flags with ``_`` for ``-``). Errors are
``memcalc.errors`` classes; their messages name settings by these keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from memcalc import families
from memcalc.engine import estimate as _estimate_spec
from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.report import Report, VerifyResult, VerifyRow
from memcalc.request import Plan, Request
from memcalc.resolve import ModelInput, model_input, model_of, resolve_model  # noqa: F401 (the API's)
from memcalc.spec import TrainingSpec
from memcalc.vocab import COMPARE_TOOLS, VERIFY_METHODS

if TYPE_CHECKING:
    from memcalc.allocator import AllocatorConfig
    from memcalc.catalog import Presets
    from memcalc.compat import ComparisonRow
    from memcalc.fit import ConfigOwner, GpuTarget
    from memcalc.planner import LayoutPlan
    from memcalc.report import Fit


def estimate(model: str | None = None, **settings: Any) -> Report:
    """Per-GPU memory of one training run: every term, the phases, the peak and, with ``gpu``, the fit.

    ``model``: a preset name (``memcalc.presets()``), a config.json path or folder, or a hub id. ``settings``: the
    keywords of ``memcalc.request.Request`` (precision, optim, batch_size, seq_len, checkpointing, zero, gpus,
    lora_rank, gpu...). Several ZeRO stages: use ``compare``.
    """
    plan = plan_of(model, **settings)
    if len(plan.specs) > 1:
        raise UsageError("several {zero} stages ask for a comparison: use memcalc.compare(...)")
    return run_plan(plan)[0]


def layouts(model: str | None = None, **settings: Any) -> LayoutPlan:
    """The layout planner: every layout of ``gpus`` GPUs (data-parallel sharding, tensor and pipeline parallelism,
    checkpointing) with its per-GPU peak, whether it fits ``gpu``, and its rank by memcalc.planner's throughput model,
    best first. ``gpus`` and ``gpu`` are required; the layout settings (tp, pp, zero, sharding, checkpointing) are the
    planner's to choose."""
    request = Request(model=model, **settings)
    return plan_layouts(request.plan(), {name for name in LAYOUT_SETTINGS if request.is_chosen(name)})


# What the planner chooses: given by the user, each is one line and exit 2.
LAYOUT_SETTINGS = ("tp", "pp", "cp", "ep", "ep_load", "ep_shard_dim", "dp_replicate", "dp_shard", "zero", "sharding", "engine", "fsdp", "checkpointing", "microbatches", "pp_layers", "pp_schedule",
                   "pp_virtual", "sp", "loss_parallel", "grad_accum", "deepspeed")


def plan_layouts(plan: Plan, chosen: set[str] | frozenset[str] = frozenset()) -> LayoutPlan:
    """The planner for a resolved plan; ``chosen``: the layout settings the user gave (refused)."""
    from memcalc import planner

    if plan.specs and plan.specs[0].engine == "megatron":
        chosen = set(chosen) - {"engine"}  # (--engine megatron: the layouts Megatron-LM runs are searched)
        if plan.plan_schedules and set(plan.plan_schedules) != {"1f1b"}:
            raise UnsupportedModelError("{plan_schedules} with {engine} megatron: its interleaved schedule is not "
                                        "modelled yet; drop {plan_schedules} (Megatron's 1F1B is searched)")
    if chosen:
        raise UsageError(f"{{plan}} chooses the layout itself: drop {{{min(chosen)}}}")
    if plan.gpu is None:
        raise UsageError("{plan} needs the GPU the layouts must fit: add {gpu} NAME (e.g. {gpu} h100-80gb)")
    if len(plan.specs) != 1 or plan.specs[0].num_gpus < 2:
        raise UsageError("{plan} lays a run out over several GPUs: give {gpus} N (N > 1)")
    spec = plan.specs[0]
    return planner.plan(plan.model, spec, plan.gpu, spec.gpus_per_node if spec.num_nodes > 1 else None,
                        plan.plan_schedules or planner.DEFAULT_SCHEDULES)


def compare(model: str | None = None, **settings: Any) -> list[Report]:
    """One Report per ZeRO stage in ``zero`` (e.g. ``zero=[0, 1, 2, 3]``), the rest of the setup alike."""
    return run_plan(plan_of(model, **settings))


def verify(model: str | None = None, method: str = "auto", progress: Callable[[str], None] | None = None,
           **settings: Any) -> Report:
    """The estimate with a measured training step beside it (``Report.verify``): on a CUDA GPU its allocator's
    peak, else a real CPU step under memcalc's tensor tracker when it fits half the RAM, else the full-size model
    traced under FakeTensorMode (no memory). Needs torch and transformers (``[verify]`` extra)."""
    plan = plan_of(model, **settings)
    return verify_plan(plan, method, progress)


def plan_of(model: str | None = None, **settings: Any) -> Plan:
    """A Request from keywords, resolved (``Request.plan``); the keywords given count as chosen."""
    unknown = sorted(set(settings) - {f for f in Request.__dataclass_fields__ if f != "chosen"})
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}; the settings are the fields of memcalc.request.Request")
    chosen = frozenset(settings) | ({"model"} if model is not None else set())
    return Request(model=model, **settings, chosen=chosen).plan()


def _not_a_search(plan: Plan) -> None:
    if plan.plan_schedules:
        raise UsageError("{plan_schedules} says which pipeline schedules the layout search tries: add {plan}")


def run_plan(plan: Plan) -> list[Report]:
    """One Report per TrainingSpec of the plan, each with its fit when the plan has a GPU."""
    _not_a_search(plan)
    return [run(plan.model, spec, plan.gpu, plan.defaults_used, plan.solve_batch, plan.solve_seq_len,
                plan.precision_chosen, plan.notes, _config_owner(plan), plan.allocator, plan.allocator_source)
            for spec in plan.specs]


def _with_reserved(report: Report, model: ModelInput, spec: TrainingSpec, allocator: AllocatorConfig, source: str,
                   gpu: GpuTarget | None) -> GpuTarget | None:
    """Put the replayed reserved peak on the report; return the GPU target with the predicted reserve."""
    import dataclasses
    import importlib.util

    from memcalc.errors import INSTALL_TORCH, MissingDependencyError

    if model.config is None:
        raise UsageError("{reserved} replays the model's own step: give a {model}, not {params}")
    if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers")):
        raise MissingDependencyError(f"{{reserved}} traces the model's own step: install torch and transformers "
                                     f"({INSTALL_TORCH})")
    from memcalc.allocator import environment_cublas_workspace
    from memcalc.measure.reserved import predict_reserved, predicted_reserve

    capacity = gpu.capacity_bytes if gpu is not None else None
    workspace = environment_cublas_workspace(gpu.compute_capability if gpu is not None else None)
    replayed = predict_reserved(model.config.raw, spec, allocator, source, capacity, workspace)
    report.per_gpu.reserved_peak_bytes = replayed.reserved_peak_bytes
    report.per_gpu.allocator = replayed
    if gpu is None:
        return None
    return dataclasses.replace(gpu, predicted_reserve_bytes=predicted_reserve(replayed, report.per_gpu.peak_bytes))


def _config_owner(plan: Plan) -> ConfigOwner | None:
    if plan.config_path is None:
        return None
    from memcalc.fit import ConfigOwner

    return ConfigOwner(plan.config_path, plan.config_fields)


def run(model: ModelInput, spec: TrainingSpec, gpu: GpuTarget | None = None, defaults_used: Sequence[str] = (),
        solve_batch: bool = False, solve_seq_len: bool = False, precision_chosen: bool = True,
        notes: Sequence[str] = (), config_owner: ConfigOwner | None = None,
        allocator: AllocatorConfig | None = None, allocator_source: str = "default") -> Report:
    """The engine's report for one spec (the lower-level entry: a ModelInput and a TrainingSpec).
    ``config_owner``: the DeepSpeed config the spec was read from (the fit's suggestions edit its keys).
    ``allocator``: predict the reserved peak by replaying the step through the caching allocator with these settings
    (``--reserved``; traces the step, needs torch); the fit then uses it for the allocator reserve."""
    report = _estimate_spec(model, spec, defaults_used)
    if notes:
        report.notes[:0] = list(notes)
    if allocator is not None:
        gpu = _with_reserved(report, model, spec, allocator, allocator_source, gpu)
    if gpu is not None:
        from memcalc.fit import check_fit  # only with a GPU

        arch, cap = model.arch, None
        if arch is not None and arch.learned_positions and arch.max_positions:
            cap = (arch.max_positions, (f"sequence length {arch.max_positions:,} is the most {model.name} can run "
                                        "(its position embeddings are a learned table of that many rows)"))
        fit = check_fit(report, spec, gpu, rerun=lambda changed: _estimate_spec(model, changed),
                        solve_batch=solve_batch, solve_seq_len=solve_seq_len, precision_chosen=precision_chosen,
                        seq_len_cap=cap, config_owner=config_owner)
        if allocator is not None and fit.max_micro_batch_size is not None and fit.max_micro_batch_limit == "memory":
            _confirm_micro_batch(fit, model, spec, allocator, allocator_source, gpu)
        report = report.with_fit(fit)
    return report


# Micro-batches the allocator replay may try below the solver's answer before it stops (each is a traced step).
REPLAY_CONFIRM_TRIES = 4


def _confirm_micro_batch(fit: Fit, model: ModelInput, spec: TrainingSpec, allocator: AllocatorConfig, source: str,
                         gpu: GpuTarget) -> None:
    """--reserved --max-batch: the solver applies the asked run's reserve to every micro-batch; the largest it finds is
    replayed within the GPU (a traced step), and stepped down while the replay runs out of memory (fragmentation
    grows with the micro-batch)."""
    import dataclasses

    from memcalc.allocator import environment_cublas_workspace
    from memcalc.measure.reserved import predict_reserved
    from memcalc.units import format_bytes

    assert model.config is not None and fit.max_micro_batch_size is not None
    capacity = gpu.capacity_bytes
    workspace = environment_cublas_workspace(gpu.compute_capability)
    batch, tried = fit.max_micro_batch_size, []
    while batch >= 1 and len(tried) < REPLAY_CONFIRM_TRIES:
        changed = dataclasses.replace(spec, micro_batch_size=batch)
        replayed = predict_reserved(model.config.raw, changed, allocator, source, capacity, workspace)
        if not replayed.num_ooms:
            reason = (f"; the allocator replay at micro-batch {batch:,} fits (reserved "
                      f"{format_bytes(replayed.bounded_reserved_peak_bytes or 0)} within {format_bytes(capacity)}, "
                      "the GPU less the CUDA context)")
            if tried:
                reason += f", at {', '.join(f'{b:,}' for b in tried)} it ran out of memory (fragmentation)"
                fit.max_micro_batch_size = batch
                fit.max_micro_batch_peak_bytes = _estimate_spec(model, changed).per_gpu.peak_bytes
            fit.max_micro_batch_reason = (fit.max_micro_batch_reason or "") + reason
            return
        tried.append(batch)
        batch -= 1
    fit.max_micro_batch_reason = ((fit.max_micro_batch_reason or "") + f"; the allocator replay ran out of memory at "
                                  f"micro-batch {', '.join(f'{b:,}' for b in tried)}: the answer above may not fit")


# -- measuring --------------------------------------------------------------------------------------------------


def verify_plan(plan: Plan, method: str = "auto", progress: Callable[[str], None] | None = None) -> Report:
    """The plan's report with a measured step beside it (see ``verify``)."""
    _not_a_search(plan)
    if method not in VERIFY_METHODS:
        raise UsageError(f"{{verify}}={method}: use one of {', '.join(VERIFY_METHODS)}")
    if len(plan.specs) > 1:
        raise UsageError("verify measures one configuration: give a single {zero} stage")
    spec = plan.specs[0]
    if spec.grad_accum > 1:
        raise UsageError("verify measures a single micro-batch step: drop {grad_accum} (its effect, gradients alive "
                         "during later forwards, is in the estimate)")
    if plan.model.config is None or not plan.model.architecture_known:
        raise UsageError("verify builds the real model: give a {model} (preset name or config.json), not {params}")
    from memcalc.measure import verify as measure

    outcome = measure(plan.model.config, spec, method, progress=progress)
    report = run_plan(plan)[0]
    measurement = outcome.measurement
    result = VerifyResult(
        method=measurement.method, measured_peak_bytes=measurement.measured_peak_bytes,
        measured_peak_phase=measurement.measured_peak_phase, per_term_bytes=dict(measurement.term_bytes),
        per_phase_peak_bytes=dict(measurement.per_phase_peak_bytes),
        checked_peak_bytes=outcome.report.per_gpu.step_peak().bytes,
        checked_peak_phase=outcome.report.per_gpu.step_peak().phase.value,
        rows=[VerifyRow(*row) for row in outcome.rows], scaled=list(outcome.scaled),
        differences_from_gpu=list(measurement.differences_from_gpu), run=dict(measurement.run),
        reserved_peak_bytes=measurement.reserved_peak_bytes, cuda_context_bytes=measurement.cuda_context_bytes,
        elapsed_seconds=round(measurement.elapsed_seconds, 3), notes=list(measurement.notes),
        allocator_stats=dict(measurement.allocator_stats),
    )
    if measurement.allocation_events:
        _replay_measured(result, measurement.allocation_events, plan)
    return report.with_verify(result)


def _replay_measured(result: VerifyResult, events: list[tuple[int, int, int]], plan: Plan) -> None:
    """The measured step's allocations through the caching-allocator model: with the plan's settings (--alloc-conf),
    else the environment's, as the measured process read them."""
    from memcalc.allocator import (
        AllocConfError,
        environment_alloc_conf,
        environment_cublas_workspace,
        parse_alloc_conf,
        replay,
        workspace_allocations,
    )

    config = plan.allocator
    if config is None:
        text, _source = environment_alloc_conf()
        try:
            config = parse_alloc_conf(text)
        except AllocConfError as error:
            result.notes.append(f"the caching-allocator replay was skipped: the environment's allocator settings "
                                f"'{text}' cannot be replayed ({error})")
            return
    # on CUDA the card is known: its cuBLAS workspaces went through the same allocator
    capability = result.run.get("compute_capability")
    workspace = environment_cublas_workspace(str(capability) if capability else None)
    replayed = replay(events, config, persistent=workspace_allocations(workspace))
    result.replayed_reserved_peak_bytes = replayed.reserved_peak_bytes
    result.replayed_allocated_peak_bytes = replayed.allocated_peak_bytes
    result.replayed_requested_peak_bytes = replayed.requested_peak_bytes
    result.alloc_conf = config.text


# -- presets, peers' figures, configs --------------------------------------------------------------------------


def presets() -> Presets:
    """Every model preset with its exact parameter count, and every GPU preset with its memory."""
    from memcalc.catalog import ModelPreset, Presets, gpu_presets, model_preset_files

    models = []
    for name in model_preset_files():
        config = resolve_model(name)
        described = families.describe(config)
        # A preset of a model type without hand rules states its meta-device count (_num_params, checked against
        # transformers by tests/test_inventory_exact.py), so listing the presets imports neither torch nor
        # transformers.
        stated = config.raw.get("_num_params") if not described.modelled_inventory else None
        num_params = stated if isinstance(stated, int) else sum(t.numel for t in described.inventory())
        models.append(ModelPreset(name, described.declared_type, num_params, tuple(config.aliases), config.source))
    return Presets(models, list(gpu_presets()))


def compare_with(tool: str, model: ModelInput, report: Report) -> list[ComparisonRow]:
    """Another tool's own estimate beside memcalc's, term by term, with why they differ: ``deepspeed``
    (estimate_zero2/3_model_states_mem_needs), ``accelerate`` (estimate-memory), ``megatron``
    (theoretical_memory_usage.py) or ``llm-analysis`` (LLMAnalysis.training)."""
    if report.training.dp_replicate > 1:
        raise UsageError(f"{{compare_with}} {tool}: its estimate shards over every GPU, and {{dp_replicate}} "
                         f"{report.training.dp_replicate} shards over one replica's: drop one of them")
    if tool == "deepspeed":
        from memcalc.compat.deepspeed import compare_with_deepspeed, deepspeed_param_counts

        training = report.training
        return compare_with_deepspeed(
            report, num_nodes=training.num_nodes, num_gpus_per_node=training.num_gpus // training.num_nodes,
            offload_optimizer=training.offload in ("optimizer", "both"),
            offload_params=training.offload in ("params", "both"),
            largest_layer_params=deepspeed_param_counts(model.tensors)[1] if model.architecture_known else None,
        )
    if tool == "accelerate":
        from memcalc.compat.accelerate import accelerate_counted_params, compare_with_accelerate

        counted = accelerate_counted_params(model.tensors) if model.architecture_known else None
        return compare_with_accelerate(report, counted)
    if tool in ("megatron", "llm-analysis"):
        from memcalc import tensor_parallel

        if model.described is None or model.model_type not in tensor_parallel.MODEL_TYPES:
            raise UsageError(f"{{compare_with}} {tool} reproduces its formula for decoders of the Llama layout "
                             f"({', '.join(tensor_parallel.MODEL_TYPES)}): give such a model")
        if tool == "megatron":
            from memcalc.compat.megatron import compare_with_megatron

            return compare_with_megatron(report, model.arch)
        from memcalc.compat.llm_analysis import compare_with_llm_analysis

        return compare_with_llm_analysis(report, model.arch)
    raise UsageError(f"compare with {tool!r}: use one of {', '.join(COMPARE_TOOLS)}")


def deepspeed_config(plan: Plan, report: Report) -> tuple[dict[str, Any], str, bool]:
    """A DeepSpeed config for the plan's run or, when it does not fit the GPU, for the fit advisor's best fitting
    change DeepSpeed can express (no LoRA, no pure 16-bit, no optimizer step in backward); which of the two it is, in
    words; and whether what it
    configures fits (True without a GPU)."""
    from memcalc.configs.deepspeed import emit_deepspeed_config, emitted_buffers
    from memcalc.errors import MemcalcError

    spec, why, fits = plan.specs[0], "this run", True
    if spec.engine == "megatron":
        raise UsageError("{emit} deepspeed writes DeepSpeed's config; {engine} megatron is Megatron-LM's engine, "
                         "which a DeepSpeed config does not run: drop one of them")
    if spec.sharding.value != "deepspeed":
        engine = "FSDP ({fsdp})" if spec.sharding.value == "fsdp" else f"{{sharding}} {spec.sharding.value}"
        raise UsageError(f"{{emit}} deepspeed writes DeepSpeed's config; the run shards with PyTorch's {engine}, "
                         "which a DeepSpeed config does not run: drop one of them")
    split = [name for name, size in (("tp", spec.tp), ("pp", spec.pp), ("cp", spec.cp), ("ep", spec.ep)) if size > 1]
    if split:
        raise UsageError(f"{{emit}} deepspeed writes ZeRO, offload, precision and batch settings; the run's "
                         f"{{{split[0]}}} is PyTorch's parallelism, which a DeepSpeed config does not set: drop "
                         f"{{{split[0]}}} or {{emit}}")
    if report.fit is not None and not report.fit.fits:
        why, fits = (f"this run, which does not fit {report.fit.gpu}: no change the fit advisor found that DeepSpeed "
                     "can express fits (LoRA, pure 16-bit recipes and an optimizer step in backward are not DeepSpeed "
                     "settings)"), False
        for suggestion in report.fit.suggestions:
            if not suggestion.fits or any(k in suggestion.spec_changes for k in ("lora_rank", "qlora", "precision",
                                                                                  "optim_in_backward")):
                continue  # DeepSpeed configs have no switch for LoRA, pure 16-bit or a step in backward
            try:
                changed = spec.replace(**suggestion.spec_changes)
            except MemcalcError:
                continue
            if changed.sharding.value != "deepspeed":
                continue  # (FSDP: PyTorch's engine, not a DeepSpeed setting)
            spec, why, fits = changed, f"the fit advisor's change: {suggestion.change}", True
            break
    config = emit_deepspeed_config(spec, plan.model.hidden_size)
    buffers = emitted_buffers(spec, plan.model.hidden_size)
    if buffers != spec.zero_buffers:
        # (the config runs HF's "auto" buffers for this hidden size, not the defaults estimated (larger ones too: a
        # prefetch bucket of 0.9 h^2 passes DeepSpeed's 5e7 from hidden 7,454): its own peak, said, and its own fit)
        from memcalc.engine import estimate

        emitted = spec.replace(zero_buffers=buffers)
        peak = estimate(plan.model, emitted).per_gpu.peak_bytes
        why += (f"; its ZeRO buffers are what HF Trainer fills 'auto' with for hidden size {plan.model.hidden_size:,} "
                f"(reduce bucket {buffers.reduce_bucket_size:,}), with which the peak per GPU is {peak:,} B")
        if plan.gpu is not None:
            fits = peak <= plan.gpu.usable_for(emitted)
            why += "" if fits else f", which does not fit {plan.gpu.name}"
    if "optimizer" not in config:
        why += (f" (no optimizer section: DeepSpeed's config has no name for {spec.optimizer.value}; the trainer "
                f"supplies it, as HF Trainer's --optim does, and memcalc reads it back with --optim "
                f"{spec.optimizer.value})")
    return config, why, fits
