"""The typer app. It maps arguments to a TrainingSpec, errors to one stderr line and an exit code; nothing else.

Exit codes (also in README):
  0 success (and, with --gpu, it fits)      1 internal error (a bug; MEMCALC_DEBUG=1 shows the traceback)
  2 bad usage (flag, number, combination)   3 model not found     4 unreadable or invalid config
  5 model type not supported                6 does not fit the GPU given with --gpu / --gpu-memory
"""


# No `from __future__ import annotations` here: typer reads the option annotations on every run, and
# string annotations would be re-evaluated each time (~8 ms of the start-up budget).
import dataclasses
import os
import sys
from typing import Annotated

import typer

from memcalc.errors import MemcalcError, UsageError
from memcalc.optimizers import OptimImpl, OptimizerName
from memcalc.precision import Dtype, PrecisionName
from memcalc.spec import DEFAULT_MICRO_BATCH_SIZE, DEFAULT_SEQ_LEN, Attention, Checkpointing, Offload, Sharding

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_DOES_NOT_FIT = 6
DEBUG_ENV = "MEMCALC_DEBUG"
COMMANDS = ("estimate", "presets", "schema")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="How much GPU memory a training run takes, term by term, and whether it fits. "
    "'memcalc MODEL --flags' is short for 'memcalc estimate MODEL --flags'.",
)

# Shared options, defined once.
ModelArg = Annotated[str | None, typer.Argument(help="Preset name (memcalc presets), config.json path, model folder or hub id.", show_default=False)]
ParamsOpt = Annotated[str | None, typer.Option("--params", help="Parameter count (7e9, 7B, 6.74B, 8030261248); replaces the model's count.")]
PrecisionOpt = Annotated[PrecisionName, typer.Option("--precision", help="Precision recipe (see README table).")]
DtypeOpt = Annotated[Dtype | None, typer.Option(help="Override one dtype of the recipe.", show_default=False)]
OptimOpt = Annotated[OptimizerName, typer.Option("--optim", help="Optimizer.")]
OptimImplOpt = Annotated[OptimImpl, typer.Option("--optim-impl", help="torch.optim implementation (foreach is CUDA's default).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Micro-batch size per GPU.")]
SeqOpt = Annotated[int, typer.Option("--seq-len", "-s", min=1, help="Sequence length in tokens.")]
GpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="Number of GPUs (data parallel).")]
ZeroOpt = Annotated[str, typer.Option("--zero", help="ZeRO stage 0-3, or a list like 0,1,2,3 for a comparison.")]
UnitsOpt = Annotated[str, typer.Option("--units", help="gib (2^30 B), gb (10^9 B), mib or mb.")]


VERIFY_METHODS = ("auto", "cuda", "cpu-tracker", "trace")


def route(argv: list[str]) -> list[str]:
    """'memcalc llama-3-8b ...' means 'memcalc estimate llama-3-8b ...'; a bare --verify means --verify=auto."""
    argv = _optional_verify_value(argv)
    if argv and (argv[0] in COMMANDS or argv[0] in ("--help", "-h")):
        return argv
    return ["estimate", *argv]


def _optional_verify_value(argv: list[str]) -> list[str]:
    routed: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--verify":
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following in VERIFY_METHODS:
                routed.append(f"--verify={following}")
                index += 2
                continue
            arg = "--verify=auto"
        routed.append(arg)
        index += 1
    return routed


def _fail(error: MemcalcError) -> typer.Exit:
    print(f"memcalc: {error}", file=sys.stderr)
    return typer.Exit(error.exit_code)


def _parse_stages(text: str) -> list[int]:
    stages: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part not in ("0", "1", "2", "3"):
            raise UsageError(f"--zero {text!r}: each stage must be 0, 1, 2 or 3 (e.g. --zero 2 or --zero 0,1,2,3)")
        if int(part) not in stages:
            stages.append(int(part))
    return stages


@app.command()
def estimate(
    ctx: typer.Context,
    model: ModelArg = None,
    params: ParamsOpt = None,
    precision: PrecisionOpt = PrecisionName.bf16,
    master_dtype: DtypeOpt = None,
    grad_dtype: DtypeOpt = None,
    state_dtype: DtypeOpt = None,
    optim: OptimOpt = OptimizerName.adamw,
    optim_impl: OptimImplOpt = OptimImpl.foreach,
    amsgrad: Annotated[bool, typer.Option(help="Adam/AdamW: keep max_exp_avg_sq.")] = False,
    adafactor_beta1: Annotated[float | None, typer.Option(help="Adafactor first moment (transformers default: none).")] = None,
    batch_size: BatchOpt = DEFAULT_MICRO_BATCH_SIZE,
    seq_len: SeqOpt = DEFAULT_SEQ_LEN,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = 1,
    checkpointing: Annotated[Checkpointing, typer.Option(help="Activation checkpointing.")] = Checkpointing.none,
    attn: Annotated[Attention, typer.Option("--attn", help="Attention implementation (transformers' attn_implementation).")] = Attention.sdpa,
    zero: ZeroOpt = "0",
    gpus: GpusOpt = 1,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes the GPUs are spread over (for offload RAM per node).")] = 1,
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", min=1, help="GPUs per node (--gpus = nodes x this).")] = None,
    sharding: Annotated[Sharding, typer.Option("--sharding", help="Engine that shards: deepspeed (ZeRO), fsdp (FSDP2), torch (DDP / ZeroRedundancyOptimizer).")] = Sharding.deepspeed,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Short for --sharding fsdp (with --zero 3 unless given).")] = False,
    offload: Annotated[Offload, typer.Option("--offload", help="DeepSpeed ZeRO-Offload to CPU RAM.")] = Offload.none,
    deepspeed: Annotated[str | None, typer.Option("--deepspeed", help="Read a DeepSpeed config (stage, offload, buckets, precision, micro-batch).")] = None,
    emit: Annotated[str | None, typer.Option("--emit", help="Print a config for this run (or the fit solver's recommendation): deepspeed.")] = None,
    compare_with: Annotated[str | None, typer.Option("--compare-with", help="Put another tool's figure beside memcalc's: deepspeed or accelerate.")] = None,
    gpu: Annotated[str | None, typer.Option(help="GPU preset for the fit check (memcalc presets).")] = None,
    gpu_memory: Annotated[str | None, typer.Option(help="GPU memory for the fit check, e.g. 80GiB or 24GB.")] = None,
    cuda_context: Annotated[str | None, typer.Option(help="CUDA context size assumed by the fit check (default 512MiB).")] = None,
    reserve_fraction: Annotated[float | None, typer.Option(min=0.0, max=0.9, help="Allocator reserve assumed by the fit check (default 0.05).")] = None,
    max_batch: Annotated[bool, typer.Option("--max-batch", help="With --gpu: the largest micro-batch that fits.")] = False,
    max_seq_len: Annotated[bool, typer.Option("--max-seq-len", help="With --gpu: the longest sequence that fits.")] = False,
    lora_rank: Annotated[int | None, typer.Option(min=1, help="Train LoRA adapters of this rank on a frozen base.")] = None,
    lora_targets: Annotated[str | None, typer.Option(help="Comma-separated module names, or all-linear (default: PEFT's per family).")] = None,
    qlora: Annotated[bool, typer.Option(help="QLoRA: frozen base Linear weights in 4-bit NF4.")] = False,
    freeze: Annotated[str | None, typer.Option(help="Freeze parts: embeddings, lm_head, norms, attention, mlp (comma-separated).")] = None,
    verify: Annotated[str | None, typer.Option(
        "--verify", help="Measure a real training step beside the estimate: --verify (auto: cuda when there is a "
        "GPU, else cpu-tracker), --verify=cpu-tracker, --verify=trace (full size, no memory) or --verify=cuda.",
        show_default=False)] = None,
    units: UnitsOpt = "gib",
    json_output: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    explain: Annotated[bool, typer.Option(help="Show each term's formula and source.")] = False,
    totals: Annotated[bool, typer.Option(help="Also show totals across all GPUs.")] = False,
) -> None:
    """Estimate per-GPU training memory for MODEL (or --params)."""
    options = dict(locals())
    options["typed"] = _typed(options.pop("ctx"))
    try:
        code = _estimate(**options)
    except MemcalcError as error:
        raise _fail(error) from None
    raise typer.Exit(code)


def _estimate(**options) -> int:
    # The engine loads here, not at import, so --help stays instant.
    from memcalc import api, render
    from memcalc.spec import TrainingSpec
    from memcalc.trainable import FREEZE_GROUPS
    from memcalc.units import DISPLAY_UNITS, parse_count, parse_size

    o = options
    unit = o["units"].lower()
    if unit not in DISPLAY_UNITS:
        raise UsageError(f"--units {o['units']!r} is not one of gib, gb, mib, mb")
    if o["gpu"] and o["gpu_memory"]:
        raise UsageError("give either --gpu NAME or --gpu-memory SIZE, not both")
    if (o["max_batch"] or o["max_seq_len"]) and not (o["gpu"] or o["gpu_memory"]):
        raise UsageError("--max-batch and --max-seq-len solve for a GPU: add --gpu NAME or --gpu-memory SIZE")
    freeze = tuple(p.strip() for p in o["freeze"].split(",") if p.strip()) if o["freeze"] else ()
    for group in freeze:
        if group not in FREEZE_GROUPS:
            raise UsageError(f"--freeze {group!r} is not one of {', '.join(FREEZE_GROUPS)}")
    num_params = parse_count(o["params"]) if o["params"] is not None else None
    typed = o["typed"]
    defaults_used = [label for name, label in DEFAULTS_SHOWN.items() if name not in typed]
    if o["fsdp"]:
        if o["sharding"] not in (Sharding.deepspeed, Sharding.fsdp):
            raise UsageError("--fsdp is --sharding fsdp: drop one of them")
        o["sharding"] = Sharding.fsdp
        if "zero" not in typed:
            o["zero"] = "3"
    num_gpus = o["gpus"]
    if o["gpus_per_node"] is not None:
        if "gpus" in typed and num_gpus != o["nodes"] * o["gpus_per_node"]:
            raise UsageError(f"--gpus {num_gpus} is not --nodes {o['nodes']} x --gpus-per-node {o['gpus_per_node']}; "
                             "give two of the three")
        num_gpus = o["nodes"] * o["gpus_per_node"]
    model = api.model_input(o["model"], num_params)
    ds_notes: list[str] = []
    fields = {
        "precision": o["precision"], "master_dtype": o["master_dtype"], "grad_dtype": o["grad_dtype"],
        "state_dtype": o["state_dtype"], "optimizer": o["optim"], "optim_impl": o["optim_impl"],
        "amsgrad": o["amsgrad"], "adafactor_beta1": o["adafactor_beta1"], "micro_batch_size": o["batch_size"],
        "seq_len": o["seq_len"], "grad_accum": o["grad_accum"], "checkpointing": o["checkpointing"],
        "attention": o["attn"], "num_gpus": num_gpus, "num_nodes": o["nodes"], "sharding": o["sharding"],
        "offload": o["offload"],
    }
    if o["deepspeed"]:
        ds_notes = _apply_deepspeed_config(o["deepspeed"], model, fields, typed, o)
    stages = [fields.pop("zero_stage")] if "zero_stage" in fields else _parse_stages(o["zero"])
    specs = [
        TrainingSpec(
            **fields, zero_stage=stage, lora_rank=o["lora_rank"],
            lora_targets=tuple(t.strip() for t in o["lora_targets"].split(",") if t.strip()) if o["lora_targets"] else None,
            qlora=o["qlora"], freeze=freeze,
        )
        for stage in stages
    ]
    gpu_target = None
    if o["gpu"] or o["gpu_memory"]:
        from memcalc.fit import DEFAULT_ALLOCATOR_RESERVE_FRACTION, DEFAULT_CUDA_CONTEXT_BYTES, GpuTarget
        from memcalc.presets import find_gpu

        context = parse_size(o["cuda_context"], "--cuda-context") if o["cuda_context"] else DEFAULT_CUDA_CONTEXT_BYTES
        reserve = o["reserve_fraction"] if o["reserve_fraction"] is not None else DEFAULT_ALLOCATOR_RESERVE_FRACTION
        if o["gpu"]:
            spec_gpu = find_gpu(o["gpu"])
            gpu_target = GpuTarget(spec_gpu.name, spec_gpu.memory_bytes, spec_gpu.source, context, reserve)
        else:
            size = parse_size(o["gpu_memory"], "--gpu-memory")
            gpu_target = GpuTarget(f"{o['gpu_memory']} GPU", size, "--gpu-memory", context, reserve)
        if gpu_target.usable_bytes <= 0:
            raise UsageError("the CUDA context and allocator reserve leave no usable memory; check --gpu-memory/--cuda-context")
    if o["verify"] is not None:
        if o["verify"] not in VERIFY_METHODS:
            raise UsageError(f"--verify={o['verify']}: use --verify, or --verify= one of {', '.join(VERIFY_METHODS[1:])}")
        if len(specs) > 1:
            raise UsageError("--verify measures one configuration: give a single --zero stage")
        if o["grad_accum"] > 1:
            raise UsageError("--verify measures a single micro-batch step: drop --grad-accum (its effect, gradients "
                             "alive during later forwards, is in the estimate)")
    reports = [api.run(model, spec, gpu_target, defaults_used, o["max_batch"], o["max_seq_len"]) for spec in specs]
    if ds_notes:
        reports = [dataclasses.replace(r, notes=[*ds_notes, *r.notes]) for r in reports]
    if o["emit"] is not None:
        return _emit(o["emit"], model, specs[0], reports[0])
    if o["compare_with"] is not None:
        return _compare_with(o["compare_with"], model, reports[0], o["json_output"], unit)
    if o["verify"] is not None:
        if model.config is None or not model.architecture_known:
            raise UsageError("--verify builds the real model: give a model name or config.json (not --params)")
        reports = [reports[0].with_verify(_verify(model.config, specs[0], o["verify"]))]

    from rich.console import Console

    console = Console(soft_wrap=True, emoji=False, highlight=False)
    if o["json_output"]:
        sys.stdout.write(render.to_json(reports) + "\n")
    else:
        if len(reports) == 1:
            render.render_table(reports[0], console, unit, explain=o["explain"], totals=o["totals"])
        else:
            render.render_comparison(reports, console, unit)
    if o["verify"] is not None and not o["json_output"]:
        render.render_verify(reports[0], console, unit)
    if gpu_target is not None and not all(r.fit and r.fit.fits for r in reports):
        return EXIT_DOES_NOT_FIT
    return EXIT_OK


# Options whose defaults shape the answer: each one the user did not type is named in the output.
DEFAULTS_SHOWN = {
    "precision": f"--precision {PrecisionName.bf16.value}",
    "optim": f"--optim {OptimizerName.adamw.value}",
    "optim_impl": f"--optim-impl {OptimImpl.foreach.value}",
    "batch_size": f"--batch-size {DEFAULT_MICRO_BATCH_SIZE}",
    "seq_len": f"--seq-len {DEFAULT_SEQ_LEN}",
    "checkpointing": f"--checkpointing {Checkpointing.none.value}",
    "attn": f"--attn {Attention.sdpa.value}",
    "gpus": "--gpus 1",
    "zero": "--zero 0",
    "units": "--units gib",
}


def _apply_deepspeed_config(path: str, model, fields: dict, typed: set[str], o: dict) -> list[str]:
    """--deepspeed: the config decides every field ``spec_fields`` names (stage, precision and master dtypes,
    micro-batch, accumulation, optimizer, offload, sharding, ZeRO buffers); a flag the user typed that says otherwise
    is an error, never a silent override. Flags outside DEFAULTS_SHOWN count as typed when they differ from their
    defaults."""
    from memcalc.configs.deepspeed import disagreements, read_deepspeed_config, spec_fields
    from memcalc.datafile import shown

    if o["fsdp"] or fields["sharding"] != Sharding.deepspeed:
        flag = "--fsdp" if o["fsdp"] else f"--sharding {fields['sharding'].value}"
        raise UsageError(f"{flag} contradicts --deepspeed (a DeepSpeed config runs DeepSpeed ZeRO); drop one of them")
    flags = {"zero_stage": "--zero", "precision": "--precision", "master_dtype": "--master-dtype",
             "state_dtype": "--state-dtype", "micro_batch_size": "--batch-size", "grad_accum": "--grad-accum",
             "optimizer": "--optim", "amsgrad": "--amsgrad", "offload": "--offload"}
    chosen = {key: value for key, value in {
        "zero_stage": _parse_stages(o["zero"]) if "zero" in typed else None,
        "precision": fields["precision"] if "precision" in typed else None,
        "master_dtype": fields["master_dtype"], "state_dtype": fields["state_dtype"],
        "micro_batch_size": fields["micro_batch_size"] if "batch_size" in typed else None,
        "grad_accum": fields["grad_accum"] if fields["grad_accum"] != 1 else None,
        "optimizer": fields["optimizer"] if "optim" in typed else None,
        "amsgrad": True if fields["amsgrad"] else None,
        "offload": fields["offload"] if fields["offload"] != Offload.none else None,
    }.items() if value is not None}
    stages = chosen.get("zero_stage")
    settings = read_deepspeed_config(
        path, hidden_size=model.hidden_size, micro_batch_size=chosen.get("micro_batch_size"),
        gradient_accumulation_steps=chosen.get("grad_accum"),
        precision=chosen["precision"].value if "precision" in chosen else None,
        zero_stage=stages[0] if stages and len(stages) == 1 else None,
        offload=chosen["offload"].value if "offload" in chosen else None, num_gpus=fields["num_gpus"],
    )
    config_fields = spec_fields(settings)

    def text(value) -> str:
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return "the recipe's default" if value is None else str(getattr(value, "value", value))

    for name, mine, theirs in disagreements(config_fields, chosen)[:1]:
        flag = flags[name] if name == "amsgrad" else f"{flags[name]} {text(mine)}"
        raise UsageError(f"{flag} contradicts {shown(path)}, which sets {name} {text(theirs)}; drop the flag or edit "
                         "the config")
    fields.update(config_fields)
    return [f"read {shown(path)}: ZeRO stage {settings.zero_stage}, offload {settings.offload}", *settings.notes]


def _emit(kind: str, model, spec, report) -> int:
    """--emit deepspeed: a config for this run, or for the fit solver's first fitting change when it does not fit."""
    import json

    from memcalc.configs.deepspeed import emit_deepspeed_config

    if kind != "deepspeed":
        raise UsageError(f"--emit {kind!r}: memcalc writes deepspeed configs (--emit deepspeed)")
    chosen, why = spec, "this run"
    if report.fit is not None and not report.fit.fits:
        for suggestion in report.fit.suggestions:
            if not suggestion.fits or any(k in suggestion.spec_changes for k in ("lora_rank", "qlora", "precision")):
                continue  # DeepSpeed configs have no switch for LoRA or pure 16-bit
            try:
                chosen, why = spec.replace(**suggestion.spec_changes), f"the fit solver's change: {suggestion.change}"
                break
            except MemcalcError:
                continue
    config = emit_deepspeed_config(chosen, model.hidden_size)
    print(f"memcalc: DeepSpeed config for {why}", file=sys.stderr)
    print(json.dumps(config, indent=2))
    return EXIT_OK


def _compare_with(tool: str, model, report, json_output: bool, unit: str) -> int:
    """--compare-with deepspeed|accelerate: the other tool's figure beside memcalc's, term by term, with why."""
    import json

    from memcalc.compat.accelerate import accelerate_counted_params, compare_with_accelerate
    from memcalc.compat.deepspeed import compare_with_deepspeed, deepspeed_param_counts
    from memcalc.units import format_bytes

    if tool == "deepspeed":
        spec = report.training
        rows = compare_with_deepspeed(
            report, num_nodes=spec.num_nodes, num_gpus_per_node=spec.num_gpus // spec.num_nodes,
            offload_optimizer=spec.offload in ("optimizer", "both"), offload_params=spec.offload in ("params", "both"),
            largest_layer_params=deepspeed_param_counts(model.tensors)[1] if model.architecture_known else None,
        )
    elif tool == "accelerate":
        counted = accelerate_counted_params(model.tensors) if model.architecture_known else None
        rows = compare_with_accelerate(report, counted)
    else:
        raise UsageError(f"--compare-with {tool!r}: use deepspeed or accelerate")
    if json_output:
        print(json.dumps({"schema_version": 1, "tool": tool, "rows": [row._asdict() for row in rows]}, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"memcalc vs {tool}, per GPU")
    for column in ("term", "memcalc", tool, "why they differ"):
        table.add_column(column, justify="right" if column in ("memcalc", tool) else "left")
    for row in rows:
        cells = ["-" if v is None else format_bytes(v, unit) for v in (row.memcalc_bytes, row.tool_bytes)]
        table.add_row(row.term, *cells, row.why)
    Console(soft_wrap=False, emoji=False, highlight=False).print(table)
    return EXIT_OK


def _verify(config, spec, method: str) -> dict:
    """Run the measurement with a progress line on stderr (stdout stays clean for --json)."""
    from rich.console import Console

    from memcalc.verify import verify

    with Console(stderr=True).status("verify: starting") as status:
        outcome = verify(config, spec, method, progress=lambda message: status.update(f"verify: {message}"))
    measurement = outcome.measurement
    return {
        "method": measurement.method,
        "measured_peak_bytes": measurement.measured_peak_bytes,
        "measured_peak_phase": measurement.measured_peak_phase,
        "per_term_bytes": measurement.term_bytes,
        "per_phase_peak_bytes": measurement.per_phase_peak_bytes,
        "checked_peak_bytes": outcome.report.per_gpu.peak_bytes,
        "checked_peak_phase": outcome.report.per_gpu.peak_phase.value,
        "rows": [row._asdict() for row in outcome.rows],
        "scaled": outcome.scaled,
        "differences_from_gpu": measurement.differences_from_gpu,
        "run": measurement.run,
        "reserved_peak_bytes": measurement.reserved_peak_bytes,
        "cuda_context_bytes": measurement.cuda_context_bytes,
        "elapsed_seconds": round(measurement.elapsed_seconds, 3),
        "notes": measurement.notes,
    }


def _typed(ctx: typer.Context) -> set[str]:
    """The options of DEFAULTS_SHOWN the user typed (the rest are named as defaults in the output)."""
    return {name for name in DEFAULTS_SHOWN if ctx.get_parameter_source(name).name != "DEFAULT"}


estimate_app = typer.Typer(add_completion=False)
estimate_app.command(help=estimate.__doc__)(estimate)


@app.command()
def presets(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """List model presets (with exact parameter counts) and GPU presets."""
    try:
        code = _presets(json_output)
    except MemcalcError as error:
        raise _fail(error) from None
    raise typer.Exit(code)


def _presets(json_output: bool) -> int:
    import json

    from memcalc.families import inventory
    from memcalc.presets import gpu_presets, model_preset_files
    from memcalc.resolve import resolve_model
    from memcalc.units import format_bytes, format_count

    models = []
    for name in model_preset_files():
        config = resolve_model(name)
        num_params = sum(t.numel for t in inventory(config))
        models.append({"name": name, "model_type": config.model_type, "num_params": num_params,
                       "aliases": list(config.aliases), "source": config.source})
    gpus = [{"name": g.name, "display": g.display, "memory_bytes": g.memory_bytes, "nominal": g.nominal,
             "aliases": list(g.aliases), "source": g.source} for g in gpu_presets()]
    if json_output:
        print(json.dumps({"schema_version": 1, "models": models, "gpus": gpus}, indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True, emoji=False, highlight=False)
    table = Table(title="Model presets (exact parameter counts from the inventory)")
    for column in ("name", "model_type", "params", "aliases"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for m in models:
        table.add_row(m["name"], m["model_type"], f"{m['num_params']:,} ({format_count(m['num_params'])})", ", ".join(m["aliases"]))
    console.print(table)
    table = Table(title="GPU presets (total memory as nvidia-smi reports it)")
    for column in ("name", "GPU", "memory", "nominal"):
        table.add_column(column)
    for g in gpus:
        table.add_row(g["name"], g["display"], f"{format_bytes(g['memory_bytes'], 'gib')} ({g['memory_bytes']:,} B)", g["nominal"])
    console.print(table)
    return EXIT_OK


@app.command()
def schema() -> None:
    """Print the JSON Schema of the --json report (schema_version 1)."""
    import json

    from memcalc.schema import report_json_schema

    print(json.dumps(report_json_schema(), indent=2))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: one line on stderr for every error, never a traceback unless debugging."""
    args = route(list(sys.argv[1:] if argv is None else argv))
    try:
        if args[0] == "estimate":
            # The estimate alone, as a one-command app: typer then builds one command, not the whole group
            # (a few ms of the start-up budget, benchmarks/startup.py).
            result = estimate_app(args[1:], prog_name="memcalc", standalone_mode=False)
        else:
            result = app(args, prog_name="memcalc", standalone_mode=False)
        return int(result or 0)
    except MemcalcError as error:  # raised outside a command (should not happen, but stay one line)
        print(f"memcalc: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("memcalc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # typer/click usage errors (unknown option, bad choice, out-of-range number) carry format_message().
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"memcalc: {exc.format_message()} (see memcalc --help)", file=sys.stderr)
            return int(exc.exit_code) if exc.exit_code else 2
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"memcalc: internal error: {type(exc).__name__}: {exc}; set {DEBUG_ENV}=1 for a traceback "
              "and please report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
