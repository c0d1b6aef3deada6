"""Rendering: the only place that turns bytes into units. Rich tables for people, JSON for programs.

Every table the command line prints is built here: the report (terms, what is alive at the peak, the phases),
the ZeRO comparison, the fit verdict and suggestions, the verify comparison, the presets, and the peers' figures.
rich is imported by the functions that print, never at import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from memcalc.errors import printable
from memcalc.report import (
    VERDICT_DOES_NOT_FIT,
    VERDICT_FITS,
    VERDICT_MAY_FIT,
    AllocatorReplay,
    Fit,
    Report,
    VerifyResult,
)
from memcalc.units import UNIT_LABELS, format_bytes, format_count, format_value
from memcalc.vocab import EXTRA_MEANING, PHASE_LABELS, TERM_ACTIVATIONS, Phase

if TYPE_CHECKING:
    from rich.console import Console

    from memcalc.catalog import Presets
    from memcalc.compat import ComparisonRow
    from memcalc.planner import LayoutPlan

# Short names for the phases a term is alive in (the table's last column).
_ALIVE_LABELS = {(Phase.forward, Phase.backward, Phase.optimizer_step): "whole step",
                 (Phase.forward, Phase.backward): "forward, backward", (Phase.backward, Phase.optimizer_step):
                 "backward, step", (Phase.forward,): "forward", (Phase.backward,): "backward",
                 (Phase.optimizer_step,): "step"}


def alive_label(phases: Sequence[Phase]) -> str:
    return _ALIVE_LABELS.get(tuple(phases), ", ".join(PHASE_LABELS[p] for p in phases))
UNIT_BASES = {"gib": "2^30", "gb": "10^9", "mib": "2^20", "mb": "10^6"}


def console() -> Console:
    """The console that prints to stdout: words wrapped at its width, no emoji, no guessed highlighting. A closed
    pipe (``| head``) is raised as BrokenPipeError for the CLI to end quietly; rich would exit with 1."""
    import sys

    from rich.console import Console

    from memcalc.errors import OutputError

    if sys.stdout is None:  # started with stdout closed (>&-): rich would print to nowhere
        raise OutputError("cannot write the output: stdout is closed")

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _Console(soft_wrap=False, emoji=False, highlight=False)


@contextlib.contextmanager
def progress(label: str) -> Iterator[Callable[[str], None]]:
    """A status line on stderr (stdout stays clean for --json); yields the function that updates it."""
    from rich.console import Console

    with Console(stderr=True).status(f"{label}: starting") as status:
        yield lambda message: status.update(f"{label}: {message}")


def _describe_run(report: Report) -> list[str]:
    m, t = report.model, report.training
    arch = f"{m.model_type}, " if m.model_type else ""
    # (under --tp, --pp or --ep the report's tensors are the shown rank's: its shards, its stage's layers, its experts)
    split = t.tp > 1 or t.pp > 1 or t.ep > 1
    count = f"{m.num_params:,} params{' on this rank' if split else ''} ({format_count(m.num_params)})"
    if m.num_trainable_params != m.num_params:
        count += f", {m.num_trainable_params:,} trainable"
    engine = f"ZeRO stage {t.zero_stage}" if t.sharding == "deepspeed" else f"{t.sharding} stage {t.zero_stage}"
    if t.sharding == "megatron":
        engine = f"Megatron-LM {'distributed optimizer' if t.zero_stage else 'DDP'}"
    lines = [
        f"[bold]{_escape(m.name)}[/bold] ({arch}{count}; {m.params_source}; source: {_escape(m.source)})",
        f"recipe [bold]{t.precision}[/bold]: {t.precision_description}",
        f"optimizer [bold]{t.optimizer}[/bold]: {t.optimizer_description}",
        (f"run: micro-batch {t.micro_batch_size} x seq {t.seq_len}"
         f"{f' x {t.grad_accum} accumulated' if t.grad_accum > 1 else ''}, attention {t.attention}, "
         f"checkpointing {t.checkpointing}, {t.num_gpus} GPU{'s' if t.num_gpus > 1 else ''}"
         f"{f' on {t.num_nodes} nodes' if t.num_nodes > 1 else ''}"
         f"{_layout(t)}, {engine}"
         f"{', offload ' + t.offload if t.offload != 'none' else ''}"
         f"{', activations ' + t.activations if t.activations != 'rules' else ''}"
         f"{', loss ' + t.loss if t.loss != 'standard' else ''}"
         f"{', optimizer stepped in backward' if t.optim_in_backward else ''}"
         f"{', activations offloaded (' + t.activation_offload + ')' if t.activation_offload != 'none' else ''}"
         f"{', layers compiled (torch.compile)' if t.compile else ''}"
         f"{', k and v repeated per head' if t.repeat_kv else ''}"
         f"{', rows padded (a padding mask)' if t.padded and t.micro_batch_size > 1 else ''}"
         f"{', float8 Linear layers (' + t.fp8 + ')' if t.fp8 != 'none' else ''}"),
    ]
    if t.defaults_used:
        lines.append(f"defaults used: {', '.join(t.defaults_used)}")
    return lines


def _layout(t) -> str:
    """The tensor/pipeline layout of the run line: data-parallel groups x pipeline stages x tensor-parallel ranks."""
    replicas = getattr(t, "dp_replicate", 1)
    if t.tp == 1 and t.pp == 1 and t.cp == 1 and t.ep == 1 and replicas == 1:
        return ""
    data_parallel = t.num_gpus // (t.tp * t.pp)
    parts = [f"{data_parallel} data-parallel" + (f" ({data_parallel // t.cp} x {t.cp} context-parallel, each "
                                                 f"{t.seq_len // t.cp:,} positions of a sequence)" if t.cp > 1 else "")]
    if replicas > 1:
        parts[0] += (f" as {replicas} HSDP replicas of {data_parallel // replicas} (FSDP2 shards within a replica, "
                     "all-reduces across them)")
    if t.ep > 1:
        spanned = (f"{t.ep} ranks ({t.ep // t.tp} data- x {t.tp} tensor-parallel)" if t.tp > 1
                   else f"{t.ep} of them")
        parts[0] += (f", {spanned} splitting the experts"
                     + (f" (the most loaded receiving {t.ep_load:g} x the average tokens)" if t.ep_load != 1 else ""))
    if t.pp > 1:
        stages = f" ranks of {t.pp_virtual} stages each" if t.pp_virtual > 1 else " stages"
        parts.append(f"{t.pp} pipeline{stages} ({t.pp_schedule}, {t.microbatches} micro-batches)")
    if t.tp > 1:
        extra = " with sequence parallelism" if t.sequence_parallel else ""
        extra += f"{' and' if extra else ' with'} loss parallelism" if t.loss_parallel else ""
        parts.append(f"{t.tp} tensor-parallel{extra}")
    shown = ("one rank" if t.pp == 1 else f"pipeline rank {t.pp_stage}" if t.pp_virtual > 1
             else f"stage {t.pp_stage}'s rank")
    return f" as {' x '.join(parts)}; figures for {shown}"


def _escape(text: str) -> str:
    """User text (a model name, a path) shown as it is: rich markup escaped, control characters spelled out."""
    from rich.markup import escape

    return escape(printable(text))


def print_reports(reports: Sequence[Report], console: Console, unit: str, explain: bool = False,
                  totals: bool = False) -> None:
    """One report as its table (and, when measured, the verify comparison); several as a ZeRO comparison."""
    if len(reports) > 1:
        render_comparison(reports, console, unit)
        return
    render_table(reports[0], console, unit, explain=explain, totals=totals)
    if reports[0].verify is not None:
        render_verify(reports[0], console, unit)


VERDICT_STYLES = {VERDICT_FITS: "bold green", VERDICT_MAY_FIT: "bold yellow", VERDICT_DOES_NOT_FIT: "bold red"}


def _headline(report: Report, unit: str) -> str | None:
    fit = report.fit
    if fit is None:
        return None
    margin = (f"{format_bytes(fit.headroom_bytes, unit)} headroom" if fit.fits
              else f"{format_bytes(-fit.headroom_bytes, unit)} over")
    verdict = f"[{VERDICT_STYLES[fit.verdict]}]{fit.verdict}[/{VERDICT_STYLES[fit.verdict]}]"
    if fit.paged_out_bytes:
        return (f"{verdict} on {_escape(fit.gpu)}: peak {format_bytes(fit.peak_bytes, unit)} of "
                f"{format_bytes(fit.usable_bytes, unit)} usable; without the paged optimizer states "
                f"{format_bytes(fit.peak_bytes - fit.paged_bytes, unit)}, so the driver pages "
                f"{format_bytes(fit.paged_out_bytes, unit)} of them to CPU RAM (slower steps; details below)")
    if fit.verdict == VERDICT_MAY_FIT:
        return (f"{verdict} on {_escape(fit.gpu)}: what is counted peaks at "
                f"{format_bytes(fit.peak_bytes, unit)} of {format_bytes(fit.usable_bytes, unit)} usable, but with "
                "--params only the activations are not counted (details below)")
    return (f"{verdict} on {_escape(fit.gpu)}: peak {format_bytes(fit.peak_bytes, unit)} of "
            f"{format_bytes(fit.usable_bytes, unit)} usable, {margin} (details below)")


def render_table(report: Report, console: Console, unit: str, explain: bool = False, totals: bool = False) -> None:
    """The run, then every term with what of it is alive at the peak and its share of the peak, the named extras
    alive at that moment (the loss's logits, a recomputed layer...), so that the "at peak" column adds up to the
    peak; then the phases, each at its largest moment."""
    from rich.table import Table  # lazily: rich is only needed to print

    headline = _headline(report, unit)
    if headline:
        console.print(headline)
    for line in _describe_run(report):
        console.print(line)
    label = UNIT_LABELS[unit]
    per_gpu = report.per_gpu
    peak_phase = next(p for p in per_gpu.phases if p.phase == per_gpu.peak_phase)
    at_peak = peak_phase.breakdown
    gpu_terms = [t for t in per_gpu.terms if not t.in_cpu_ram]
    cpu_terms = [t for t in per_gpu.terms if t.in_cpu_ram]
    # Term names never wrap (the column is as wide as the longest); part names and prose wrap between words.
    names = [t.name for t in gpu_terms] + [name for name in at_peak if name not in {t.name for t in per_gpu.terms}]
    table = Table(title=f"Per GPU, in {label} ({UNIT_BASES[unit]} bytes)")
    table.add_column("term", overflow="fold", min_width=max(len(n) for n in names if " " not in n) + 2)
    table.add_column(label, justify="right", no_wrap=True)
    table.add_column("at peak", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("alive in", min_width=len("whole step"))
    peak = per_gpu.peak_bytes or 1
    for term in gpu_terms:
        alive = at_peak.get(term.name, 0)
        table.add_row(term.name, format_value(term.bytes, unit), format_value(alive, unit) if alive else "-",
                      f"{100 * alive / peak:.1f}%" if alive else "", alive_label(term.phases))
        if explain or term.name != TERM_ACTIVATIONS:  # the activations' parts: with --explain (always in JSON)
            for part, num_bytes in term.breakdown.items():
                table.add_row(f"  {part}", format_value(num_bytes, unit), "", "", "", style="dim")
    extras = [name for name in at_peak if name not in {t.name for t in per_gpu.terms}]
    if extras:
        table.add_section()
        for name in extras:
            table.add_row(name, format_value(at_peak[name], unit), format_value(at_peak[name], unit),
                          f"{100 * at_peak[name] / peak:.1f}%", "at the peak")
    if cpu_terms:
        table.add_section()
        for term in cpu_terms:
            table.add_row(f"{term.name} (CPU RAM)", format_value(term.bytes, unit), "", "", "offloaded", style="dim")
    table.add_section()
    table.add_row("model states on the GPU", format_value(per_gpu.model_states_bytes, unit), "", "", "")
    for phase in per_gpu.phases:
        marker = " <- peak" if phase.phase == per_gpu.peak_phase else ""
        table.add_row(f"{PHASE_LABELS[phase.phase]}{marker}", format_value(phase.bytes, unit), "", "",
                      "" if phase.phase == Phase.optimizer_step else phase.moment, style="bold" if marker else None)
    console.print(table)
    console.print(
        f"peak per GPU: [bold]{format_bytes(per_gpu.peak_bytes, unit)}[/bold] during the "
        f"{PHASE_LABELS[per_gpu.peak_phase]}{'' if peak_phase.phase == Phase.optimizer_step else ', ' + peak_phase.moment}"
        f" (steady state; first step: "
        f"{format_bytes(per_gpu.first_step_peak_bytes, unit)}). The \"at peak\" column adds up to it; the sum of "
        "all terms is not the peak.",
    )
    if per_gpu.paged_bytes:
        console.print(
            f"of which paged: {format_bytes(per_gpu.paged_bytes, unit)} of optimizer states in CUDA unified memory, "
            f"outside PyTorch's allocator: torch.cuda.max_memory_allocated() of a steady-state step shows the peak "
            f"less them, {format_bytes(per_gpu.peak_bytes - per_gpu.paged_bytes, unit)}; on a GPU too small for them the driver "
            "pages them to CPU RAM (slower steps, not an OOM); the verdict counts them on the GPU",
        )
    if per_gpu.load is not None:
        _print_load(report, console, unit, explain)
    if per_gpu.allocator is not None:
        _print_allocator(per_gpu.allocator, console, unit)
    if per_gpu.cpu_offload_bytes:
        t = report.training
        console.print(
            f"offload: {format_bytes(per_gpu.cpu_offload_bytes, unit)} of CPU RAM per GPU process, "
            f"{format_bytes(report.totals.cpu_offload_bytes_per_node, unit)} per node ({t.num_gpus // t.num_nodes} GPUs "
            f"per node; pinned memory, plus the framework's own)",
        )
    if totals or report.training.num_gpus > 1:
        console.print(
            f"across {report.totals.num_gpus} GPUs: model states {format_bytes(report.totals.model_states_bytes, unit)}, "
            f"sum of per-GPU peaks {format_bytes(report.totals.peak_bytes_sum, unit)}",
        )
    if explain:
        console.print("\n[bold]How each term is computed[/bold]")
        for term in report.per_gpu.terms:
            console.print(f"[bold]{term.name}[/bold] = {format_bytes(term.bytes, unit)} ({term.bytes:,} B)")
            console.print(f"  formula: {term.formula}", markup=False)
            console.print(f"  source:  {term.source}", markup=False)
        extras = [(phase, name, num_bytes) for phase in report.per_gpu.phases
                  for name, num_bytes in phase.breakdown.items() if name in EXTRA_MEANING and num_bytes]
        if extras:
            console.print("\n[bold]What else is alive at a moment of the step[/bold] (not a term: a transient the "
                          "phase totals add)")
            for phase, name, num_bytes in extras:
                console.print(f"[bold]{name}[/bold] = {format_bytes(num_bytes, unit)} ({num_bytes:,} B) in "
                              f"{PHASE_LABELS[phase.phase]}, {phase.moment}", highlight=False)
                console.print(f"  {EXTRA_MEANING[name]}", markup=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    if report.fit is not None:
        render_fit(report, console, unit)


def _print_load(report: Report, console: Console, unit: str, explain: bool) -> None:
    """One line for the load before the first step (memcalc.load); with --explain what runs and how it is known."""
    loaded, per_gpu = report.per_gpu.load, report.per_gpu
    where = ("the run's peak" if per_gpu.peak_phase == Phase.load
             else f"below the step's {format_bytes(per_gpu.step_peak().bytes, unit)}")
    processes = report.training.num_gpus // max(report.training.num_nodes, 1)
    if loaded.host_bytes and processes > 1 and loaded.host_bytes_per_node == loaded.host_bytes:
        host = f"host RAM {format_bytes(loaded.host_bytes, unit)} in the main process only"
    elif loaded.host_bytes:
        host = f"host RAM {format_bytes(loaded.host_bytes, unit)} per process"
        if processes > 1:
            host += f", {format_bytes(loaded.host_bytes_per_node, unit)} per node of {processes}"
    else:
        host = "host RAM not counted"
    console.print(f"load (before step 1): {format_bytes(loaded.peak_bytes, unit)} on the GPU, {loaded.moment} "
                  f"({where}); {host}", markup=False, highlight=False)
    if explain:
        console.print(f"  how: {loaded.description}; {loaded.accuracy}", markup=False, highlight=False)


def _print_allocator(replayed: AllocatorReplay, console: Console, unit: str) -> None:
    """--reserved: the replayed caching allocator's peaks beside the tensors' peak, and what it assumed."""
    from memcalc.allocator import CUBLAS_HANDLES_PER_STEP

    workspaces = CUBLAS_HANDLES_PER_STEP * (replayed.cublas_workspace_bytes or 0)
    tensors = replayed.requested_peak_bytes - workspaces
    over = replayed.reserved_peak_bytes - tensors
    share = f" (+{100 * over / tensors:.1f}%)" if tensors else ""
    with_workspaces = f" and {format_bytes(workspaces, unit)} of cuBLAS workspaces" if workspaces else ""
    conf = f"PYTORCH_ALLOC_CONF '{replayed.alloc_conf}' from {replayed.alloc_conf_source}" if replayed.alloc_conf \
        else "the allocator's defaults"
    console.print(f"reserved peak (caching-allocator replay, {conf}): [bold]"
                  f"{format_bytes(replayed.reserved_peak_bytes, unit)}[/bold]{share} for "
                  f"{format_bytes(tensors, unit)} of tensors{with_workspaces}; allocated blocks "
                  f"{format_bytes(replayed.allocated_peak_bytes, unit)}; {replayed.segments_peak:,} segments",
                  highlight=False)
    console.print(f"  replayed: {replayed.num_events:,} allocations and frees of {replayed.source}", markup=False,
                  highlight=False)
    if replayed.reserved_after_load_bytes is not None:
        console.print(f"  reserved once the weights are built and loaded (before the first step): "
                      f"{format_bytes(replayed.reserved_after_load_bytes, unit)}", markup=False, highlight=False)
    if replayed.capacity_bytes is not None and replayed.bounded_reserved_peak_bytes is not None:
        outcome = ("ran out of memory" if replayed.num_ooms else
                   f"freed its cache and retried {replayed.num_alloc_retries} time(s)" if replayed.num_alloc_retries
                   else "never filled it")
        console.print(f"  within {format_bytes(replayed.capacity_bytes, unit)} (the GPU less the CUDA context) the "
                      f"allocator {outcome}; reserved peak there "
                      f"{format_bytes(replayed.bounded_reserved_peak_bytes, unit)}", markup=False, highlight=False)
    for note in replayed.notes:
        console.print(f"  note: {note}", markup=False, highlight=False)


def _nccl_line(fit: Fit, size: Callable[[int], str]) -> str:
    """The NCCL buffers' term of the usable line: each communicator, its parts, and what the figures rest on."""
    if not fit.nccl_communicators:
        return f" (NCCL: {fit.nccl_note})" if fit.nccl_note else ""
    groups = "; ".join(
        f"{c.group} group of {c.ranks}" + (f", {c.local_ranks} on the node" if c.local_ranks != c.ranks else "")
        + f" ({c.runs}): " + ", ".join(f"{what} {size(b)}" for what, b in c.parts.items())
        for c in fit.nccl_communicators)
    note = f"; {fit.nccl_note}" if fit.nccl_note else ""
    return (f" - NCCL buffers {size(fit.nccl_bytes)} ({groups}; NCCL 2.28-2.30's sizes with every algorithm counted as "
            f"connected, memcalc/nccl.py{note}; NCCL_DEBUG=INFO prints a run's channels, --nccl-channels takes them)")


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

    verdict = fit.verdict
    margin = (f"{size(fit.headroom_bytes)} headroom" if fit.fits else f"{size(-fit.headroom_bytes)} over")
    if fit.paged_out_bytes:
        margin = f"{size(fit.paged_out_bytes)} over, all of it paged optimizer states"
    console.print()
    headline = wrap(f"{verdict} on {fit.gpu}: peak {size(fit.peak_bytes)}, usable {size(fit.usable_bytes)}, {margin}",
                    indent="  ", first="")
    for number, line in enumerate(headline):
        text = Text(line)
        if number == 0:
            text.stylize(VERDICT_STYLES[verdict], 0, len(verdict))
        console.print(text, highlight=False, soft_wrap=True)
    if fit.peak_is_lower_bound:
        say("the peak is a lower bound: with --params only there is no architecture, so activations and per-layer buffers are "
            "not counted here or in the changes below; give a preset or a config.json as MODEL for the whole peak",
            indent="  ")
    if fit.paged_out_bytes:
        say(f"with paging: of the {size(fit.paged_bytes)} of optimizer states bitsandbytes keeps in CUDA unified memory, "
            f"the driver holds {size(fit.paged_out_bytes)} in CPU RAM and pages them in and out as each step updates "
            f"them (slower steps, not an OOM); the rest of the step, {size(fit.peak_bytes - fit.paged_bytes)}, fits",
            indent="  ")
    reserve_how = ("predicted by --reserved: reserved beyond the tensors at the replayed step's reserved peak, the same "
                   "bytes for the changes below; --cuda-context") if fit.allocator_reserve_predicted \
        else "assumed; --cuda-context, --reserve-fraction, or --reserved to predict it"
    workspaces = (f" - cuBLAS workspaces {size(fit.cublas_workspace_bytes)} (one per handle: the forward's and "
                  "autograd's threads, CublasHandlePool.cpp; with 1 MiB each that a biased Linear's first step "
                  "keeps)") if fit.cublas_workspace_bytes else ""
    say(f"usable = {size(fit.gpu_memory_bytes)} total - CUDA context {size(fit.cuda_context_bytes)} "
        f"({fit.cuda_context_source}){workspaces}{_nccl_line(fit, size)} - allocator reserve "
        f"{size(fit.allocator_reserve_bytes)} ({reserve_how})", indent="  ")
    reserved_how = ("the replayed reserved peak" if fit.allocator_reserve_predicted
                    else "the peak, the workspaces and the assumed reserve")
    say(f"nvidia-smi would show about {size(fit.nvidia_smi_bytes)} for this process at the step's peak: the "
        f"allocator's reserved memory ({reserved_how}), the CUDA context"
        + (" and NCCL's buffers" if fit.nccl_bytes else ""), indent="  ")
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
    fits_word = "yes*" if fit.peak_is_lower_bound else "yes"
    rows = [(f"{s.cost:g}", size(s.peak_bytes), fits_word if s.fits else "no",
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
    console.print(f"\n[bold]verify[/bold] ({verify.method}, {verify.elapsed_seconds:.1f} s)")
    if verify.scaled:
        console.print("the model was scaled down to fit this machine (same family and structure): "
                      + "; ".join(verify.scaled) + ". The estimate checked below is that scaled model's.",
                      markup=False)
    run = verify.run
    if run:
        console.print("ran: " + ", ".join(f"{k} {v}" for k, v in run.items()), highlight=False, markup=False)
    table = Table(title=f"Estimate vs measured, in {UNIT_LABELS[unit]}")
    for column in ("term", "estimate", "measured", "error"):
        table.add_column(column, justify="left" if column == "term" else "right")
    estimated_terms = {t.name for t in report.per_gpu.terms}
    for row in verify.rows:
        if row.term == "peak":
            table.add_section()
        name = row.term.replace("phase:", "phase: ")
        measured = "-" if row.measured_bytes is None else format_value(row.measured_bytes, unit)
        error = "" if row.error_pct is None else f"{row.error_pct:+.2f}%"
        estimate = format_value(row.estimate_bytes, unit)
        if ":" not in row.term and row.term != "peak" and row.term not in estimated_terms:
            # measured only: backward temporaries (the loss gradients the estimate adds to the backward
            # phase) and other (inputs, buffers, host-side step counters)
            estimate, error, name = "in phases", "", f"{name} *"
        table.add_row(name, estimate, measured, error, style="bold" if row.term == "peak" else None)
    console.print(table)
    console.print("* measured only: the estimate counts these inside the phase totals, not as terms", highlight=False)
    console.print(f"measured peak {format_bytes(verify.measured_peak_bytes, unit)} in the "
                  f"{PHASE_LABELS.get(verify.measured_peak_phase, verify.measured_peak_phase)}; estimated "
                  f"{format_bytes(verify.checked_peak_bytes, unit)} in the {PHASE_LABELS.get(verify.checked_peak_phase, verify.checked_peak_phase)}")
    _print_replayed(verify, console, unit)
    for note in verify.notes:
        console.print(f"verify: {note}", markup=False)
    for difference in verify.differences_from_gpu:
        console.print(f"CPU vs GPU: {difference}", highlight=False, markup=False)


def _print_replayed(verify: VerifyResult, console: Console, unit: str) -> None:
    """The measured step's allocations replayed through the caching-allocator model; on CUDA beside the allocator's
    own reserved, allocated and requested peaks."""
    if verify.replayed_reserved_peak_bytes is None:
        return
    conf = f"PYTORCH_ALLOC_CONF '{verify.alloc_conf}'" if verify.alloc_conf else "the allocator's defaults"
    stats = verify.allocator_stats
    pairs = (("reserved", verify.replayed_reserved_peak_bytes, stats.get("reserved_bytes.all.peak")),
             ("allocated", verify.replayed_allocated_peak_bytes, stats.get("allocated_bytes.all.peak")),
             ("requested", verify.replayed_requested_peak_bytes, stats.get("requested_bytes.all.peak")))
    if any(measured for _name, _replayed, measured in pairs):
        console.print(f"caching allocator, replayed ({conf}) vs measured: " + "; ".join(
            f"{name} {format_bytes(replayed or 0, unit)} vs {format_bytes(measured, unit)} "
            f"({100 * ((replayed or 0) - measured) / measured:+.2f}%)"
            for name, replayed, measured in pairs if measured), highlight=False, markup=False)
        counters = ", ".join(f"{k} {stats[k]}" for k in ("num_alloc_retries", "num_ooms") if k in stats)
        if counters:
            console.print(f"allocator counters over the step: {counters}", highlight=False, markup=False)
        return
    console.print(f"on a GPU (caching-allocator replay of this step's allocations, {conf}): reserved "
                  f"{format_bytes(verify.replayed_reserved_peak_bytes, unit)}, allocated blocks "
                  f"{format_bytes(verify.replayed_allocated_peak_bytes or 0, unit)}, tensors "
                  f"{format_bytes(verify.replayed_requested_peak_bytes or 0, unit)}", highlight=False, markup=False)


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
            match = [t for t in r.per_gpu.terms if t.name == name]
            # A term offload keeps in CPU RAM is marked: the column is otherwise GPU memory.
            cells.append("-" if not match else
                         format_value(match[0].bytes, unit) + (" (CPU RAM)" if match[0].in_cpu_ram else ""))
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


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2)


def presets_json(found: Presets) -> str:
    models = [dataclasses.asdict(m) for m in found.models]
    for model in models:
        model["aliases"] = list(model["aliases"])
    from memcalc.fit import cuda_context_for

    gpus = []
    for g in found.gpus:
        # the context the fit deducts for this card (lazy module loading; memcalc.fit.cuda_context_for)
        context, context_source = cuda_context_for(g.compute_capability, g.sms)
        gpus.append({"name": g.name, "display": g.display, "memory_bytes": g.memory_bytes, "nominal": g.nominal,
                     "aliases": list(g.aliases), "source": g.source, "compute_capability": g.compute_capability,
                     "interconnect": g.interconnect, "sms": g.sms, "cuda_context_bytes": context,
                     "cuda_context_source": context_source})
    return json_text({"schema_version": 1, "models": models, "gpus": gpus})


def print_presets(found: Presets, console: Console) -> None:
    from rich.table import Table

    table = Table(title="Model presets (exact parameter counts from the inventory)")
    for column in ("name", "model_type", "params", "aliases"):
        table.add_column(column, justify="right" if column == "params" else "left",
                         no_wrap=column in ("name", "model_type", "params"))
    for m in found.models:
        table.add_row(m.name, m.model_type, f"{m.num_params:,} ({format_count(m.num_params)})", ", ".join(m.aliases))
    console.print(table)
    table = Table(title="GPU presets (total memory as nvidia-smi reports it; joined by: how one node's cards connect, "
                        "which sets NCCL's buffers)")
    for column in ("name", "GPU", "memory", "nominal", "joined by"):
        table.add_column(column, no_wrap=column == "name")
    for g in found.gpus:
        table.add_row(g.name, g.display, f"{format_bytes(g.memory_bytes, 'gib')} ({g.memory_bytes:,} B)", g.nominal,
                      g.interconnect or "-")
    console.print(table)


def rows_json(tool: str, rows: Sequence[ComparisonRow]) -> str:
    return json_text({"schema_version": 1, "tool": tool, "rows": [row._asdict() for row in rows]})


def print_comparison_rows(rows: Sequence[ComparisonRow], tool: str, console: Console, unit: str) -> None:
    """memcalc's figure beside another tool's, term by term, with why they differ."""
    from rich.table import Table

    table = Table(title=f"memcalc vs {tool}, per GPU")
    for column in ("term", "memcalc", tool, "why they differ"):
        table.add_column(column, justify="right" if column in ("memcalc", tool) else "left")
    for row in rows:
        cells = ["-" if v is None else format_bytes(v, unit) for v in (row.memcalc_bytes, row.tool_bytes)]
        table.add_row(row.term, *cells, row.why)
    console.print(table)


LAYOUTS_SHOWN = 5


def layouts_json(plan: LayoutPlan) -> dict[str, Any]:
    """The planner's result: every layout tried, best first, with the model's assumptions."""
    from memcalc import planner

    return {"plan": {"gpus": plan.gpus, "gpus_per_node": plan.gpus_per_node, "links": plan.links,
                     "links_source": plan.links_source, "mfu_assumed": planner.PLANNER_MFU,
                     "throughput_model": planner.THROUGHPUT_MODEL, "seconds": round(plan.seconds, 3),
                     "fitting": len(plan.fitting), "layouts": [c.to_dict() for c in plan.candidates],
                     "notes": list(plan.notes)}}


def print_layouts(plan: LayoutPlan, console: Console, unit: str) -> None:
    """The fitting layouts, best first by the throughput model, then the model's formula and assumptions."""
    from rich.table import Table

    from memcalc import planner

    shown = plan.fitting[:LAYOUTS_SHOWN]
    table = Table(title=f"{plan.gpus} GPUs: {len(plan.fitting)} of {len(plan.candidates)} layouts fit; best "
                        f"{len(shown)} by the throughput model")
    for column in ("#", "layout", "peak/GPU", "usable/GPU", "tokens/s", "step s", "bubble"):
        table.add_column(column, justify="left" if column == "layout" else "right")
    for rank, c in enumerate(shown, 1):
        table.add_row(str(rank), c.layout.label, format_bytes(c.peak_bytes, unit), format_bytes(c.capacity_bytes, unit),
                      f"{c.tokens_per_second:,.0f}", f"{c.step_seconds:.1f}", f"{c.parts['bubble_fraction']:.0%}")
    console.print(table)
    if shown:
        console.print("usable per GPU: the GPU less the CUDA context, the allocator reserve and the layout's NCCL "
                      "buffers (its process groups' communicators, memcalc/nccl.py). Each layout's estimate: this "
                      "command without --plan, with")
        for rank, c in enumerate(shown, 1):
            console.print(f"  #{rank}: {c.flags}", markup=False, highlight=False)
    else:
        smallest = min(plan.candidates, key=lambda c: c.peak_bytes, default=None)
        if smallest is not None:
            console.print(f"no layout fits: the smallest peak is {format_bytes(smallest.peak_bytes, unit)} "
                          f"({smallest.layout.label}) of {format_bytes(smallest.capacity_bytes, unit)} usable")
    console.print("The memory is memcalc's estimate of each layout's most loaded rank; the ranking is a model, not a "
                  f"measurement: MFU {planner.PLANNER_MFU:.0%} assumed for every layout; links: {plan.links_source}.")
    console.print(planner.THROUGHPUT_MODEL, markup=False, highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}")
