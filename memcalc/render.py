"""Rendering: the only place that turns bytes into units. Rich tables for people, JSON for programs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from memcalc.report import Report
from memcalc.units import UNIT_LABELS, format_bytes, format_count, format_value
from memcalc.vocab import Phase

if TYPE_CHECKING:
    from rich.console import Console

PHASE_LABELS = {Phase.forward: "forward", Phase.backward: "backward", Phase.optimizer_step: "optimizer step"}


def _describe_run(report: Report) -> list[str]:
    m, t = report.model, report.training
    arch = f"{m.model_type}, " if m.model_type else ""
    count = f"{m.num_params:,} params ({format_count(m.num_params)})"
    if m.num_trainable_params != m.num_params:
        count += f", {m.num_trainable_params:,} trainable"
    lines = [
        f"[bold]{m.name}[/bold] ({arch}{count}; {m.params_source}; source: {m.source})",
        f"recipe [bold]{t.precision}[/bold]: {t.precision_description}",
        f"optimizer [bold]{t.optimizer}[/bold]: {t.optimizer_description}",
        f"run: micro-batch {t.micro_batch_size} x seq {t.seq_len}"
        f"{f' x {t.grad_accum} accumulated' if t.grad_accum > 1 else ''}, attention {t.attention}, checkpointing {t.checkpointing}, "
        f"{t.num_gpus} GPU{'s' if t.num_gpus > 1 else ''}"
        f"{f' on {t.num_nodes} nodes' if t.num_nodes > 1 else ''}, "
        f"{'ZeRO stage ' + str(t.zero_stage) if t.sharding == 'deepspeed' else t.sharding + ' stage ' + str(t.zero_stage)}"
        f"{', offload ' + t.offload if t.offload != 'none' else ''}",
    ]
    if t.defaults_used:
        lines.append(f"defaults used: {', '.join(t.defaults_used)}")
    return lines


def render_table(report: Report, console: Console, unit: str, explain: bool = False, totals: bool = False) -> None:
    from rich.table import Table  # lazily: rich is only needed to print

    for line in _describe_run(report):
        console.print(line, highlight=False)
    label = UNIT_LABELS[unit]
    table = Table(title=f"Per GPU, in {label} ({'2^30' if unit == 'gib' else '10^9' if unit == 'gb' else '2^20' if unit == 'mib' else '10^6'} bytes)")
    table.add_column("term")
    table.add_column(label, justify="right")
    table.add_column("share", justify="right")
    table.add_column("alive in")
    gpu_terms = [t for t in report.per_gpu.terms if not t.in_cpu_ram]
    cpu_terms = [t for t in report.per_gpu.terms if t.in_cpu_ram]
    terms_sum = sum(t.bytes for t in gpu_terms) or 1
    for term in gpu_terms:
        table.add_row(
            term.name, format_value(term.bytes, unit), f"{100 * term.bytes / terms_sum:.1f}%",
            ", ".join(PHASE_LABELS[p] for p in term.phases),
        )
        for part, num_bytes in term.breakdown.items():
            table.add_row(f"  {part}", format_value(num_bytes, unit), "", "", style="dim")
    if cpu_terms:
        table.add_section()
        for term in cpu_terms:
            table.add_row(f"{term.name} (CPU RAM)", format_value(term.bytes, unit), "", "offloaded", style="dim")
    table.add_section()
    table.add_row("model states on the GPU", format_value(report.per_gpu.model_states_bytes, unit), "", "")
    for phase in report.per_gpu.phases:
        marker = " <- peak" if phase.phase == report.per_gpu.peak_phase else ""
        table.add_row(f"{PHASE_LABELS[phase.phase]}{marker}", format_value(phase.bytes, unit), "", "",
                      style="bold" if marker else None)
    console.print(table)
    console.print(
        f"peak per GPU: [bold]{format_bytes(report.per_gpu.peak_bytes, unit)}[/bold] during the "
        f"{PHASE_LABELS[report.per_gpu.peak_phase]} (steady state; first step: "
        f"{format_bytes(report.per_gpu.first_step_peak_bytes, unit)}). The sum of all terms is not the peak.",
        highlight=False,
    )
    if report.per_gpu.cpu_offload_bytes:
        t = report.training
        console.print(
            f"offload: {format_bytes(report.per_gpu.cpu_offload_bytes, unit)} of CPU RAM per GPU process, "
            f"{format_bytes(report.totals.cpu_offload_bytes_per_node, unit)} per node ({t.num_gpus // t.num_nodes} GPUs "
            f"per node; pinned memory, plus the framework's own)", highlight=False,
        )
    if totals or report.training.num_gpus > 1:
        console.print(
            f"across {report.totals.num_gpus} GPUs: model states {format_bytes(report.totals.model_states_bytes, unit)}, "
            f"sum of per-GPU peaks {format_bytes(report.totals.peak_bytes_sum, unit)}", highlight=False,
        )
    if explain:
        console.print("\n[bold]How each term is computed[/bold]")
        for term in report.per_gpu.terms:
            console.print(f"[bold]{term.name}[/bold] = {format_bytes(term.bytes, unit)} ({term.bytes:,} B)", highlight=False)
            console.print(f"  formula: {term.formula}", highlight=False, markup=False)
            console.print(f"  source:  {term.source}", highlight=False, markup=False)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    if report.fit is not None:
        render_fit(report, console, unit)


def render_fit(report: Report, console: Console, unit: str) -> None:
    """The verdict first (its first line says FITS or DOES NOT FIT), then the solvers, then the changes that
    would make it fit, cheapest first, with their cost and the largest micro-batch after each. Prose is wrapped
    at the console's width between words; a flag or a name is never cut."""
    import re
    import textwrap

    from rich.text import Text

    fit = report.fit
    assert fit is not None
    width = max(console.width, 40)

    def wrap(text: str, indent: str = "", first: str | None = None) -> list[str]:
        # A number stays with its unit, and "CUDA context" stays one phrase: their spaces are held as NUL while
        # wrapping.
        held = re.sub(r"(\d) (GiB|GB|MiB|MB)\b", "\\1\0\\2", text).replace("CUDA context", "CUDA\0context")
        lines = textwrap.wrap(held, width=width, initial_indent=indent if first is None else first,
                              subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
        return [line.replace("\0", " ") for line in lines]

    def say(text: str, indent: str = "", first: str | None = None) -> None:
        for line in wrap(text, indent, first):
            console.print(line, highlight=False, markup=False, soft_wrap=True)

    def size(num_bytes: int) -> str:
        return format_bytes(num_bytes, unit)

    verdict = "FITS" if fit.fits else "DOES NOT FIT"
    margin = (f"{size(fit.headroom_bytes)} headroom" if fit.fits else f"{size(-fit.headroom_bytes)} over")
    console.print()
    headline = wrap(f"{verdict} on {fit.gpu}: peak {size(fit.peak_bytes)}, usable {size(fit.usable_bytes)}, {margin}",
                    indent="  ", first="")
    for number, line in enumerate(headline):
        text = Text(line)
        if number == 0:
            text.stylize("bold green" if fit.fits else "bold red", 0, len(verdict))
        console.print(text, highlight=False, soft_wrap=True)
    say(f"usable = {size(fit.gpu_memory_bytes)} total - CUDA context {size(fit.cuda_context_bytes)} - allocator "
        f"reserve {size(fit.allocator_reserve_bytes)} (assumed; --cuda-context, --reserve-fraction)", indent="  ")
    if fit.hf_trainer_recipe is not None and fit.hf_trainer_peak_bytes is not None:
        master = "bf16" if fit.hf_trainer_recipe.endswith("bf16") else "fp16"
        say(f"HF Trainer's {master}=True runs {fit.hf_trainer_recipe} (fp32 weights, autocast): peak "
            f"{size(fit.hf_trainer_peak_bytes)}, {'fits' if fit.hf_trainer_fits else 'does not fit'}. The {master} "
            f"above keeps an fp32 master copy (Megatron/DeepSpeed); say which with --precision.", indent="  ")
    for label, value, peak, limit, reason in (
        ("micro-batch", fit.max_micro_batch_size, fit.max_micro_batch_peak_bytes, fit.max_micro_batch_limit,
         fit.max_micro_batch_reason),
        ("sequence length", fit.max_seq_len, fit.max_seq_len_peak_bytes, fit.max_seq_len_limit, fit.max_seq_len_reason),
    ):
        if limit is None:
            continue  # not asked
        if limit == "none_fits" and peak is not None:
            say(f"largest {label} that fits: none; {label} 1 already peaks at {size(peak)}")
        elif limit == "not_memory" and peak is not None:
            say(f"largest {label}: {reason}; the peak stays {size(peak)}")
        elif value is None or peak is None:
            say(f"largest {label}: none; {reason}")
        else:
            say(f"largest {label} that fits: {value:,} (peak {size(peak)}); {reason}")
    if not fit.suggestions:
        return
    fitting = [s for s in fit.suggestions if s.fits]
    alone = [s for s in fit.suggestions if not s.fits]
    rows = [(f"{s.cost:g}", size(s.peak_bytes), "yes" if s.fits else "no",
             "-" if s.max_micro_batch_size is None else f"{s.max_micro_batch_size:,}", s.change)
            for s in fit.suggestions]
    header = ("cost", "peak", "fits", "max micro-batch", "change")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lead = "  " + "  ".join(" " * w for w in widths) + "  "
    room = width - len(lead)

    def row_line(cells: tuple[str, ...], change: str) -> None:
        left = "  " + "  ".join(cell.rjust(w) if i in (0, 1, 3) else cell.ljust(w)
                                for i, (cell, w) in enumerate(zip(cells, widths)))
        if room < 24:  # too narrow for the change beside the numbers: the change goes on its own lines
            console.print(left.rstrip(), highlight=False, markup=False, soft_wrap=True)
            say(change, indent="      ")
        else:
            say(change, indent=lead, first=left + "  ")

    say("What would change it: the changes that fit, cheapest first, then each change alone; peak: per GPU after "
        "the change; max micro-batch: the largest that fits with it.")
    if fit.cost_model:
        say(f"{fit.cost_model[0].upper()}{fit.cost_model[1:]}.")
    row_line(header[:4], header[4])
    for suggestion, row in zip(fit.suggestions, rows):
        if alone and suggestion is alone[0]:
            say("each change alone, not enough:" if fitting else
                "no combination of these changes fits" + (" within the search's budget" if fit.search_budget_reached
                                                          else "") + "; each change alone:", indent="  ")
        row_line(row[:4], row[4])
        if suggestion.fits and suggestion.cost_parts:
            say("= " + " + ".join(f"{lever} {points:g}" for lever, points in suggestion.cost_parts.items()),
                indent=lead + "  ", first=lead)
    used = [lever for s in fitting for lever in s.cost_parts]
    if used:
        say("why these costs:")
        for lever in dict.fromkeys(used):
            if lever in fit.cost_reasons:
                say(f"{lever}: {fit.cost_reasons[lever]}", indent="    ", first="  ")


def render_verify(report: Report, console: Console, unit: str) -> None:
    """Estimate and measurement side by side, per term and per phase, with the error in percent."""
    from rich.table import Table

    verify = report.verify
    assert verify is not None
    console.print(f"\n[bold]verify[/bold] ({verify['method']}, {verify['elapsed_seconds']:.1f} s)", highlight=False)
    if verify["scaled"]:
        console.print("the model was scaled down to fit this machine (same family and structure): "
                      + "; ".join(verify["scaled"]) + ". The estimate checked below is that scaled model's.",
                      highlight=False, markup=False)
    run = verify["run"]
    if run:
        console.print("ran: " + ", ".join(f"{k} {v}" for k, v in run.items()), highlight=False, markup=False)
    table = Table(title=f"Estimate vs measured, in {UNIT_LABELS[unit]}")
    for column in ("term", "estimate", "measured", "error"):
        table.add_column(column, justify="left" if column == "term" else "right")
    estimated_terms = {t.name for t in report.per_gpu.terms}
    for row in verify["rows"]:
        if row["term"] == "peak":
            table.add_section()
        name = row["term"].replace("phase:", "phase: ")
        measured = "-" if row["measured_bytes"] is None else format_value(row["measured_bytes"], unit)
        error = "" if row["error_pct"] is None else f"{row['error_pct']:+.2f}%"
        estimate = format_value(row["estimate_bytes"], unit)
        if ":" not in row["term"] and row["term"] != "peak" and row["term"] not in estimated_terms:
            # measured only: backward temporaries (the loss gradients the estimate adds to the backward
            # phase) and other (inputs, buffers, host-side step counters)
            estimate, error, name = "in phases", "", f"{name} *"
        table.add_row(name, estimate, measured, error, style="bold" if row["term"] == "peak" else None)
    console.print(table)
    console.print("* measured only: the estimate counts these inside the phase totals, not as terms", highlight=False)
    console.print(f"measured peak {format_bytes(verify['measured_peak_bytes'], unit)} in the "
                  f"{verify['measured_peak_phase'].replace('_', ' ')}; estimated {format_bytes(verify['checked_peak_bytes'], unit)} in the "
                  f"{verify['checked_peak_phase'].replace('_', ' ')}", highlight=False)
    for note in verify.get("notes", []):
        console.print(f"verify: {note}", highlight=False, markup=False)
    for difference in verify["differences_from_gpu"]:
        console.print(f"CPU vs GPU: {difference}", highlight=False, markup=False)


def render_comparison(reports: Sequence[Report], console: Console, unit: str) -> None:
    from rich.table import Table

    for line in _describe_run(reports[0])[:3]:
        console.print(line, highlight=False)
    label = UNIT_LABELS[unit]
    num_gpus = reports[0].training.num_gpus
    table = Table(title=f"Per GPU with {num_gpus} GPUs, in {label}")
    table.add_column("term")
    for r in reports:
        table.add_column(f"ZeRO {r.training.zero_stage}", justify="right")
    names: list[str] = []
    for r in reports:
        names.extend(t.name for t in r.per_gpu.terms if t.name not in names)
    for name in names:
        cells = []
        for r in reports:
            match = [t.bytes for t in r.per_gpu.terms if t.name == name]
            cells.append(format_value(match[0], unit) if match else "-")
        table.add_row(name, *cells)
    table.add_section()
    table.add_row("model states", *[format_value(r.per_gpu.model_states_bytes, unit) for r in reports])
    table.add_row("peak", *[format_value(r.per_gpu.peak_bytes, unit) for r in reports], style="bold")
    table.add_row("peak phase", *[PHASE_LABELS[r.per_gpu.peak_phase] for r in reports])
    if any(r.fit for r in reports):
        table.add_row("fits " + (reports[0].fit.gpu if reports[0].fit else ""),
                      *["yes" if r.fit and r.fit.fits else "no" for r in reports])
    console.print(table)
    notes = {n for r in reports for n in r.notes}
    for note in sorted(notes):
        console.print(f"note: {note}", highlight=False, markup=False)


def to_json(reports: Sequence[Report]) -> str:
    """One report as itself; several (a --zero comparison) as {"schema_version", "reports": [...]}."""
    if len(reports) == 1:
        return reports[0].to_json()
    return json.dumps({"schema_version": reports[0].schema_version, "reports": [r.to_dict() for r in reports]}, indent=2)
