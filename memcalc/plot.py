"""A picture of one training step: GPU memory per GPU through the forward, the backward and the optimizer step.

Two layers, as in the rest of memcalc:
- ``step_series(report)`` is pure (no matplotlib): one ``Moment`` per phase of the step, the phase's largest
  moment as the engine names it (``PhaseTotal.moment``) and exactly what is alive then (``PhaseTotal.breakdown``):
  each term's bytes at that moment, and the named extras that are not terms (the logits during the loss, the loss
  gradients, a recomputed layer, one layer's activations...). The parts sum to the phase total, asserted where
  they are built, so the top of the stack is the engine's number.
- ``plot_step(report, path)`` draws that series with matplotlib, imported lazily (an optional extra,
  ``pip install 'memcalc-train[plot]'``) and headless: a ``Figure`` on the Agg canvas, never pyplot, so no GUI
  backend is chosen and a notebook's own backend is left alone. The format follows the suffix of ``path``.

Each phase is drawn as a block holding the composition at that phase's largest moment (the report gives one
moment per phase, not a curve inside it). Terms keep a colour per term (a hue per category); the extras are
hatched grey. What is in CPU RAM (offload) is not on the GPU and is not drawn; a note says how much there is.
Bytes stay integers until they are drawn; GiB = 2**30 and GB = 10**9 (``memcalc.units``).
"""

from __future__ import annotations

import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memcalc.errors import MissingDependencyError, OutputError, UsageError
from memcalc.units import DISPLAY_UNITS, UNIT_LABELS, format_bytes
from memcalc.vocab import CATEGORY_ACTIVATIONS, CATEGORY_MODEL_STATES, CATEGORY_TEMPORARIES, PHASE_LABELS, Phase

if TYPE_CHECKING:
    from memcalc.report import Report, VerifyResult

MISSING_MATPLOTLIB_MESSAGE = "drawing a plot needs matplotlib: pip install 'memcalc-train[plot]'"


# Output formats by suffix; html embeds the SVG inline (no scripts, no fonts or images fetched).
FORMATS: dict[str, str] = {".svg": "svg", ".png": "png", ".html": "html"}

# Stack order, bottom to top: what lives all step under what comes and goes; the extras (not terms) on top.
_CATEGORY_ORDER = (CATEGORY_MODEL_STATES, CATEGORY_TEMPORARIES, CATEGORY_ACTIVATIONS)
# Colours: a hue per category, a shade per term (tab20c: four shades per hue, dark to light).
_PALETTES: dict[str, tuple[str, tuple[int, ...]]] = {
    "blues": ("tab20c", (0, 1, 2, 3)),
    "oranges": ("tab20c", (4, 5, 6, 7, 16, 17, 18, 19)),  # temporaries can be many: oranges, then greys
    "greens": ("tab20c", (8, 9, 10, 11)),
    "purples": ("tab20c", (12, 13, 14, 15)),
}
_CATEGORY_PALETTES = {CATEGORY_MODEL_STATES: "blues", CATEGORY_TEMPORARIES: "oranges", CATEGORY_ACTIVATIONS: "greens"}
_OTHER_PALETTE = "purples"
# The extras' band style: hatched, a light grey and a hatch per extra so two extras of one moment stay apart.
_EXTRA_STYLES: tuple[tuple[str, str], ...] = (("0.86", "///"), ("0.74", "\\\\\\"), ("0.93", "xx"), ("0.80", "..."))

_FIGURE_SIZE_INCHES = (10.0, 5.6)
_PNG_DPI = 150


@dataclass(frozen=True)
class Moment:
    """One moment of the step: the largest moment of a phase, split into bands that sum to ``total_bytes``.

    ``parts`` maps every band of the picture (the same keys, in stack order, for every moment) to the bytes alive
    at this moment (0 when not alive): the phase's ``breakdown``. ``extras`` names the bands that are not terms.
    """

    phase: Phase
    label: str  # the phase: "forward", "backward", "optimizer step"
    moment: str  # which moment of the phase, as the engine names it: "start of backward"
    total_bytes: int
    parts: dict[str, int]
    extras: tuple[str, ...] = ()

    @property
    def extra_bytes(self) -> int:
        return sum(self.parts[name] for name in self.extras)

    @property
    def title(self) -> str:
        """The phase and its moment on one line: "backward: start of backward", or the phase alone."""
        return f"{self.label}: {self.moment}" if self.moment and self.moment != self.label else self.label

    @property
    def tick_label(self) -> str:
        return f"{self.label}\n{self.moment}" if self.moment and self.moment != self.label else self.label


def step_series(report: Report) -> list[Moment]:
    """The report's phase totals as stacked parts: each phase's breakdown at its largest moment, by name."""
    phases = report.per_gpu.phases
    terms = {t.name: t for t in report.per_gpu.terms}
    rank = {category: index for index, category in enumerate(_CATEGORY_ORDER)}
    order = {name: index for index, name in enumerate(terms)}
    names = list(dict.fromkeys(name for p in phases for name in p.breakdown))  # first appearance, in step order
    extras = tuple(name for name in names if name not in terms)
    stacked = sorted((name for name in names if name in terms),
                     key=lambda name: (rank.get(terms[name].category, len(rank)), order[name]))
    bands = [*stacked, *extras]
    moments: list[Moment] = []
    for phase_total in phases:
        parts = {name: phase_total.breakdown.get(name, 0) for name in bands}
        assert all(size >= 0 for size in parts.values()), (phase_total.phase, parts)
        assert sum(parts.values()) == phase_total.bytes, (phase_total.phase, parts, phase_total.bytes)
        moments.append(Moment(
            phase=phase_total.phase, label=PHASE_LABELS[phase_total.phase],
            moment=phase_total.moment, total_bytes=phase_total.bytes, parts=parts, extras=extras,
        ))
    return moments


def plot_format(path: str | Path) -> str:
    """The format a plot path asks for (svg, png or html), or a UsageError naming the suffixes it may end in."""
    typed = str(path)
    # "plot.svg/" names a folder, though Path would drop the slash and write a file.
    fmt = None if typed.endswith(("/", os.sep)) else FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot draw to {typed!r}: the file name must end in .svg, .png or .html")
    return fmt


def plot_step(report: Report, path: str | Path, *, usable_bytes: int | None = None, unit: str = "gib") -> Path:
    """Draw memory per GPU over the step of ``report`` into ``path`` (``.svg``, ``.png`` or ``.html``).

    ``usable_bytes``: the GPU's usable memory, drawn as a dashed line; by default the report's fit's, when a GPU
    was given. With a ``--verify`` measurement in the report, the measured peak of each phase is drawn over the
    estimate. Returns the path written.

    Raises ``UsageError`` for a suffix or unit it does not know, ``MissingDependencyError`` without matplotlib and
    ``OutputError`` when ``path`` cannot be written.
    """
    fmt = plot_format(path)
    path = Path(path)
    if unit not in DISPLAY_UNITS:
        raise UsageError(f"unit {unit!r} is not one of {', '.join(DISPLAY_UNITS)}")
    usable_label = "usable"
    if usable_bytes is None and report.fit is not None:
        usable_bytes, usable_label = report.fit.usable_bytes, f"usable on {report.fit.gpu}"
    data = _render(report, step_series(report), usable_bytes, usable_label, unit, fmt)
    try:
        path.write_bytes(data)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise OutputError(f"cannot write the plot to {str(path)!r}: {why}; choose a writable path") from None
    return path


def _render(report: Report, moments: list[Moment], usable_bytes: int | None, usable_label: str, unit: str,
            fmt: str) -> bytes:
    """The picture as the bytes of a file in ``fmt`` (svg, png or html)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(MISSING_MATPLOTLIB_MESSAGE) from None

    scale = DISPLAY_UNITS[unit]
    title = _title(report)
    # svg.fonttype none: text stays text in the SVG (searchable); hashsalt: the same report gives the same file;
    # parse_math off: a "$" in a model name or path is drawn as typed, never parsed as TeX.
    settings = {"svg.fonttype": "none", "svg.hashsalt": "memcalc", "text.parse_math": False, "font.size": 9}
    with matplotlib.rc_context(settings):
        figure = Figure(figsize=_FIGURE_SIZE_INCHES)
        FigureCanvasAgg(figure)  # Agg, headless; savefig picks the SVG canvas itself for .svg
        axes = figure.add_subplot()
        # Each phase is a block [i, i + 1) holding the composition at its largest moment: x twice per moment.
        xs = [x for index in range(len(moments)) for x in (index, index + 1)]
        band_labels = _draw_bands(axes, report, moments, xs, scale)
        _draw_totals_and_peak(axes, report, moments, usable_bytes, unit)
        highest = max((m.total_bytes for m in moments), default=0)
        if usable_bytes is not None:
            label = f"{usable_label}: {format_bytes(usable_bytes, unit)}"
            axes.axhline(usable_bytes / scale, color="tab:red", linestyle="--", linewidth=1.4, label=label)
            axes.text(len(moments) - 0.02, usable_bytes / scale, label, ha="right", va="bottom", color="tab:red",
                      bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1.5})
            highest = max(highest, usable_bytes)
        highest = max(highest, _draw_measured(axes, report.verify, moments, xs, scale))

        axes.set_xlim(0, max(len(moments), 1))
        axes.set_ylim(0, highest / scale * 1.15 if highest else 1)
        axes.set_xticks([i + 0.5 for i in range(len(moments))], [m.tick_label for m in moments])
        for boundary in range(1, len(moments)):
            axes.axvline(boundary, color="0.6", linewidth=0.6, zorder=0)
        axes.set_xlabel("training step (each phase drawn at its largest moment)")
        axes.set_ylabel(f"memory per GPU ({UNIT_LABELS[unit]})")
        axes.set_title(title, loc="left")
        axes.grid(axis="y", color="0.9")
        axes.set_axisbelow(True)
        handles, labels = axes.get_legend_handles_labels()
        # The lines first, then the bands from the top of the stack down, as the picture reads.
        count = len(band_labels)
        order = list(range(count, len(handles))) + list(reversed(range(count)))
        axes.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), frameon=False)
        notes = _notes(report, moments, unit)
        if notes:
            axes.text(0.0, -0.2, "\n".join(notes), transform=axes.transAxes, ha="left", va="top", color="0.3",
                      fontsize=8)
        # The peak in the file's own metadata too (PNG tEXt, SVG dc:description), for tools that read it.
        metadata = {"Title": title.replace("\n", " | "), "Description": _description(report, usable_bytes,
                                                                                     usable_label, unit)}
        buffer = io.BytesIO()
        if fmt == "png":
            figure.savefig(buffer, format="png", dpi=_PNG_DPI, bbox_inches="tight", metadata=metadata)
            return buffer.getvalue()
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={**metadata, "Date": None})
    if fmt == "html":
        return _html_page(buffer.getvalue().decode("utf-8"), metadata["Title"], metadata["Description"]).encode()
    return buffer.getvalue()


def _description(report: Report, usable_bytes: int | None, usable_label: str, unit: str) -> str:
    peak = report.per_gpu
    text = f"memcalc: {report.model.name}, peak per GPU {format_bytes(peak.peak_bytes, unit)} in the " \
           f"{PHASE_LABELS[peak.peak_phase]}"
    moment = next((p.moment for p in peak.phases if p.phase == peak.peak_phase), "")
    if moment and moment != PHASE_LABELS[peak.peak_phase]:
        text += f" ({moment})"
    if usable_bytes is not None:
        text += f", {usable_label} {format_bytes(usable_bytes, unit)}"
    return text


def _draw_bands(axes: Any, report: Report, moments: list[Moment], xs: list[int], scale: int) -> list[str]:
    """The stacked bands (those not zero throughout); returns their legend labels, bottom to top."""
    bands = [name for name in moments[0].parts if any(m.parts[name] for m in moments)] if moments else []
    if not bands:
        return []
    extras = set(moments[0].extras)
    colors, hatches = _band_styles(report, bands, extras)
    ys = [[m.parts[name] / scale for m in moments for _ in (0, 1)] for name in bands]
    polys = axes.stackplot(xs, ys, labels=bands, colors=[colors[n] for n in bands], edgecolor="white", linewidth=0.4)
    for poly, name in zip(polys, bands):
        if name in hatches:
            poly.set_hatch(hatches[name])
            poly.set_edgecolor("0.45")
    return bands


def _draw_totals_and_peak(axes: Any, report: Report, moments: list[Moment], usable_bytes: int | None,
                          unit: str) -> None:
    """Each phase's total above its block; the peak marked, with its value and the verdict against usable."""
    scale = DISPLAY_UNITS[unit]
    per_gpu = report.per_gpu
    peak_index = next((i for i, m in enumerate(moments) if m.phase == per_gpu.peak_phase), None)
    for index, moment in enumerate(moments):
        if index != peak_index:
            axes.text(index + 0.5, moment.total_bytes / scale, format_bytes(moment.total_bytes, unit),
                      ha="center", va="bottom", color="0.3")
    if peak_index is None:
        return
    x, y = peak_index + 0.5, per_gpu.peak_bytes / scale
    axes.plot([x], [y], marker="v", color="black", markersize=7, linestyle="none", zorder=5)
    text = f"peak {format_bytes(per_gpu.peak_bytes, unit)} ({moments[peak_index].title})"
    if usable_bytes is not None:
        margin = usable_bytes - per_gpu.peak_bytes
        if margin < 0:
            text += f"\ndoes not fit: {format_bytes(-margin, unit)} over"
        elif report.fit is not None and report.fit.peak_is_lower_bound:
            text += f"\nmay fit: {format_bytes(margin, unit)} to spare for what is counted (no activations)"
        else:
            text += f"\nfits, {format_bytes(margin, unit)} to spare"
    axes.annotate(text, xy=(x, y), xytext=(0, 12), textcoords="offset points", ha="center", va="bottom",
                  fontweight="bold", zorder=6)


def _draw_measured(axes: Any, verify: VerifyResult | None, moments: list[Moment], xs: list[int],
                   scale: int) -> int:
    """The measured peak of each phase as a line over the blocks; returns the largest value drawn (0: none)."""
    if verify is None or not verify.per_phase_peak_bytes:
        return 0
    measured = verify.per_phase_peak_bytes
    values = [measured.get(m.phase.value) for m in moments]
    ys = [float("nan") if v is None else v / scale for v in values for _ in (0, 1)]
    # A scaled-down model's measurement is not to the scale of this estimate: drawn, but dotted.
    linestyle = ":" if verify.scaled else "-"
    axes.plot(xs, ys, color="black", linewidth=1.8, linestyle=linestyle, label=_measured_label(verify))
    axes.plot([i + 0.5 for i in range(len(moments))], ys[::2], marker="o", markersize=4, color="black",
              linestyle="none")
    return max((v for v in values if v is not None), default=0)


def _title(report: Report) -> str:
    t = report.training
    recipe = f"{t.precision} ({t.weight_dtype} weights" + (f", {t.master_dtype} master" if t.master_dtype else "") + ")"
    recipe += f", {t.optimizer} ({t.optim_impl})"
    if t.lora_rank:
        recipe += f", {'QLoRA' if t.qlora else 'LoRA'} rank {t.lora_rank}"
    run = f"micro-batch {t.micro_batch_size} x {t.seq_len} tokens"
    if t.grad_accum > 1:
        run += f", grad-accum {t.grad_accum}"
    if t.checkpointing != "none":
        run += f", checkpointing {t.checkpointing}"
    run += f", {t.num_gpus} GPU" + ("s" if t.num_gpus > 1 else "")
    if t.zero_stage or t.num_gpus > 1:
        run += f", {t.sharding} ZeRO-{t.zero_stage}"
    if t.offload != "none":
        run += f", offload {t.offload}"
    return f"{report.model.name}: GPU memory over one training step\n{recipe}; {run}"


def _band_styles(report: Report, bands: list[str], extras: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Colours and hatches: a hue per category (model states blue, temporaries orange, activations green), a shade
    per term; the extras (not terms) hatched grey, a shade and a hatch each."""
    from matplotlib import colormaps

    category = {t.name: t.category for t in report.per_gpu.terms}
    colors: dict[str, Any] = {}
    hatches: dict[str, str] = {}
    used: dict[str, int] = {}
    for name in bands:
        if name in extras:
            colors[name], hatches[name] = _EXTRA_STYLES[len(hatches) % len(_EXTRA_STYLES)]
            continue
        palette = _CATEGORY_PALETTES.get(category.get(name, ""), _OTHER_PALETTE)
        index = used.get(palette, 0)
        used[palette] = index + 1
        colormap, shades = _PALETTES[palette]
        colors[name] = colormaps[colormap](shades[index % len(shades)])
    return colors, hatches


def _notes(report: Report, moments: list[Moment], unit: str) -> list[str]:
    notes = []
    if any(m.extra_bytes for m in moments):
        notes.append("hatched: short-lived buffers alive at that moment that are not terms of the table")
    if report.per_gpu.cpu_offload_bytes:
        notes.append(f"not drawn: {format_bytes(report.per_gpu.cpu_offload_bytes, unit)} offloaded to CPU RAM")
    verify = report.verify
    if verify is not None and verify.scaled:
        notes.append(f"measured on a scaled-down model (its own estimate: "
                     f"{format_bytes(verify.checked_peak_bytes, unit)}): " + "; ".join(verify.scaled))
    return notes


def _measured_label(verify: VerifyResult) -> str:
    details = [verify.method] if verify.method else []
    if verify.scaled:
        details.append("scaled-down model, not to scale")
    return "measured peak per phase" + (f" ({', '.join(details)})" if details else "")


def _html_page(svg: str, title: str, description: str) -> str:
    """A self-contained page: the SVG inline, nothing fetched."""
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and doctype, which are invalid inside HTML
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n"
        f"<meta name=\"description\" content=\"{html.escape(description)}\">\n"
        "<style>body{font-family:sans-serif;margin:1.5em} svg{max-width:100%;height:auto}</style>\n"
        f"</head>\n<body>\n{svg}\n<p>{html.escape(description)}</p>\n</body>\n</html>\n"
    )
