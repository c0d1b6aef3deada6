"""memcalc.plot: the step's series (pure) against the engine's own phase totals, and the files it draws.

The series is checked against the report's phase totals and breakdowns, which the engine computed; drawing is
checked by what the file holds (the peak's formatted value as SVG text, in the HTML, in the PNG's tEXt metadata).
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest

from memcalc.api import model_input, run
from memcalc.errors import MissingDependencyError, OutputError, UsageError
from memcalc.fit import GpuTarget
from memcalc.plot import MISSING_MATPLOTLIB_MESSAGE, plot_step, step_series
from memcalc.report import VerifyResult
from memcalc.spec import TrainingSpec
from memcalc.units import BYTES_PER_GIB, format_bytes
from memcalc.vocab import (
    CATEGORY_ACTIVATIONS,
    CATEGORY_MODEL_STATES,
    CATEGORY_TEMPORARIES,
    EXTRA_LOSS_GRADIENTS,
    EXTRA_LOSS_LOGITS,
    MOMENT_BACKWARD_START,
    MOMENT_FORWARD,
    Phase,
)

H100 = GpuTarget("h100-80gb", 80 * BYTES_PER_GIB, "test")


@pytest.fixture(scope="module")
def llama():
    return model_input("llama-3-8b", None)


@pytest.fixture(scope="module")
def report(llama):
    return run(llama, TrainingSpec())


@pytest.fixture(scope="module")
def report_on_gpu(llama):
    return run(llama, TrainingSpec(), H100)


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def _verify(report, fraction=0.93, scaled=(), checked_peak_bytes=None):
    """A VerifyResult as --verify gives it, each phase measured at ``fraction`` of the estimate."""
    per_phase = {p.phase.value: int(p.bytes * fraction) for p in report.per_gpu.phases}
    peak_phase = max(per_phase, key=per_phase.get)
    checked = report.per_gpu.peak_bytes if checked_peak_bytes is None else checked_peak_bytes
    return VerifyResult(
        method="cpu-tracker", measured_peak_bytes=per_phase[peak_phase], measured_peak_phase=peak_phase,
        per_term_bytes={}, per_phase_peak_bytes=per_phase, checked_peak_bytes=checked,
        checked_peak_phase=report.per_gpu.peak_phase.value, rows=[], scaled=list(scaled), differences_from_gpu=[],
        run={}, reserved_peak_bytes=None, cuda_context_bytes=None, elapsed_seconds=0.0,
    )


def _with_phases(report, phases):
    return dataclasses.replace(report, per_gpu=dataclasses.replace(report.per_gpu, phases=phases))


# -- the series (no matplotlib) -------------------------------------------------------------------------------

SPECS = {
    "default": TrainingSpec(),
    "checkpointing-b4": TrainingSpec(checkpointing="full", micro_batch_size=4),
    "zero3-offload-lora": TrainingSpec(zero_stage=3, num_gpus=8, offload="both", lora_rank=16),
    "fsdp-checkpointing": TrainingSpec(zero_stage=3, num_gpus=8, sharding="fsdp", checkpointing="full"),
    "fp32-accum-zero2": TrainingSpec(precision="fp32", grad_accum=4, zero_stage=2, num_gpus=8),
    "qlora-checkpointing-b4-4k": TrainingSpec(lora_rank=16, qlora=True, checkpointing="full", micro_batch_size=4,
                                              seq_len=4096),
}


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_each_moment_is_the_engines_breakdown_at_that_phase(llama, spec):
    report = run(llama, spec)
    moments = step_series(report)
    phases = report.per_gpu.phases
    assert [m.phase for m in moments] == [p.phase for p in phases] == [Phase.forward, Phase.backward,
                                                                       Phase.optimizer_step]
    bands = list(moments[0].parts)
    for moment, phase_total in zip(moments, phases):
        assert list(moment.parts) == bands  # the same bands, in the same stack order, at every moment
        assert {name: size for name, size in moment.parts.items() if name in phase_total.breakdown} \
            == phase_total.breakdown
        assert not any(size for name, size in moment.parts.items() if name not in phase_total.breakdown)
        assert moment.moment == phase_total.moment and moment.moment
        assert sum(moment.parts.values()) == moment.total_bytes == phase_total.bytes
    peak = next(m for m in moments if m.phase == report.per_gpu.peak_phase)
    assert sum(peak.parts.values()) == report.per_gpu.peak_bytes == max(m.total_bytes for m in moments)


def test_terms_are_stacked_by_category_and_the_extras_on_top(llama):
    report = run(llama, TrainingSpec(checkpointing="full", micro_batch_size=4))
    moments = step_series(report)
    terms = {t.name: t for t in report.per_gpu.terms}
    bands = list(moments[0].parts)
    extras = moments[0].extras
    assert extras and set(extras) == {name for name in bands if name not in terms}
    assert bands[-len(extras):] == list(extras)
    order = [CATEGORY_MODEL_STATES, CATEGORY_TEMPORARIES, CATEGORY_ACTIVATIONS]
    ranks = [order.index(terms[name].category) for name in bands[:-len(extras)]]
    assert ranks == sorted(ranks)
    forward = moments[0]
    assert forward.extra_bytes == report.per_gpu.phases[0].breakdown[EXTRA_LOSS_LOGITS] > 0


def test_the_default_run_names_its_moments_and_extras(report):
    forward, backward, step = step_series(report)
    assert (forward.moment, backward.moment) == (MOMENT_FORWARD, MOMENT_BACKWARD_START)
    assert EXTRA_LOSS_LOGITS in forward.extras and forward.parts[EXTRA_LOSS_LOGITS] > 0
    assert backward.parts[EXTRA_LOSS_GRADIENTS] > 0 and forward.parts[EXTRA_LOSS_GRADIENTS] == 0
    assert forward.tick_label == f"forward\n{MOMENT_FORWARD}"
    assert backward.title == f"backward: {MOMENT_BACKWARD_START}"
    assert step.extra_bytes == 0


def test_terms_reduced_late_in_backward_are_drawn_at_their_bytes_then(llama):
    """Gradients partly produced at the late-backward moment: drawn at what is alive, not at the term's size."""
    report = run(llama, TrainingSpec(checkpointing="full", micro_batch_size=4))
    backward = step_series(report)[1]
    alive = report.per_gpu.phases[1].breakdown["gradients"]
    assert 0 < backward.parts["gradients"] == alive < report.term("gradients").bytes


def test_nothing_in_cpu_ram_is_drawn(llama):
    report = run(llama, TrainingSpec(zero_stage=3, num_gpus=8, offload="both"))
    cpu_terms = {t.name for t in report.per_gpu.terms if t.in_cpu_ram}
    assert cpu_terms, "this setup should offload something to CPU RAM"
    for moment in step_series(report):
        assert not any(moment.parts.get(name) for name in cpu_terms)


def test_step_series_is_pure(report):
    before = copy.deepcopy([(p.bytes, p.moment, p.breakdown, p.terms) for p in report.per_gpu.phases])
    first = step_series(report)
    assert [(p.bytes, p.moment, p.breakdown, p.terms) for p in report.per_gpu.phases] == before
    assert step_series(report) == first


def test_a_breakdown_that_does_not_sum_to_its_total_is_refused(report):
    forward = report.per_gpu.phases[0]
    short = dataclasses.replace(forward, breakdown={**forward.breakdown, "weights": 0})
    with pytest.raises(AssertionError):
        step_series(_with_phases(report, [short, *report.per_gpu.phases[1:]]))


# -- the files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".svg", ".png", ".html"])
def test_file_is_drawn_and_holds_the_peak(mpl, report_on_gpu, tmp_path, suffix):
    path = plot_step(report_on_gpu, tmp_path / f"step{suffix}")
    assert path == tmp_path / f"step{suffix}"
    data = path.read_bytes()
    assert data
    peak = format_bytes(report_on_gpu.per_gpu.peak_bytes)
    assert peak == "179.49 GiB"  # llama-3-8b, bf16 + fp32 master, AdamW foreach, b=1 x 2048
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        from PIL import Image

        with Image.open(path) as image:
            assert f"peak per GPU {peak}" in image.text["Description"]
    else:
        text = data.decode("utf-8")
        assert f"peak {peak}" in text  # the annotation, as text (svg.fonttype none)
        assert f"usable on h100-80gb: {format_bytes(report_on_gpu.fit.usable_bytes)}" in text
    if suffix == ".html":
        text = data.decode("utf-8")
        assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "<?xml" not in text
        assert "<script" not in text and "<link" not in text and "src=" not in text  # nothing fetched


def test_usable_line_is_drawn_when_given_without_a_gpu(mpl, report, tmp_path):
    text = plot_step(report, tmp_path / "step.svg", usable_bytes=70 * BYTES_PER_GIB).read_text()
    assert "usable: 70.00 GiB" in text
    assert "does not fit" in text


def test_unit_follows_the_argument(mpl, report, tmp_path):
    text = plot_step(report, tmp_path / "step.svg", unit="gb").read_text()
    assert f"peak {format_bytes(report.per_gpu.peak_bytes, 'gb')}" in text
    assert "memory per GPU (GB)" in text


def test_phases_and_moments_label_the_x_axis(mpl, report, tmp_path):
    text = plot_step(report, tmp_path / "step.svg").read_text()
    for phase_total in report.per_gpu.phases:
        assert phase_total.moment in text
    assert EXTRA_LOSS_LOGITS in text and EXTRA_LOSS_GRADIENTS in text  # the extras' bands, in the legend


@pytest.mark.parametrize("name", ["step.pdf", "step", "step.svg.txt", "step.svg/"])
def test_unknown_suffix_is_a_usage_error(report, tmp_path, name):
    with pytest.raises(UsageError, match=r"\.svg, \.png or \.html") as error:
        plot_step(report, f"{tmp_path}/{name}")
    assert error.value.exit_code == 2
    assert "\n" not in str(error.value)
    assert not (tmp_path / name).exists()


def test_unknown_unit_is_a_usage_error(report, tmp_path):
    with pytest.raises(UsageError, match="gib"):
        plot_step(report, tmp_path / "step.svg", unit="furlongs")


@pytest.mark.parametrize("where", ["no-such-folder/step.svg", "a-folder.svg"])
def test_unwritable_path_is_an_output_error(mpl, report, tmp_path, where):
    (tmp_path / "a-folder.svg").mkdir()
    with pytest.raises(OutputError, match="cannot write the plot") as error:
        plot_step(report, tmp_path / where)
    assert error.value.exit_code == 8
    assert "\n" not in str(error.value)


def test_verify_measurement_is_drawn_over_the_estimate(mpl, report, tmp_path):
    verified = report.with_verify(_verify(report))
    text = plot_step(verified, tmp_path / "step.svg").read_text()
    assert "measured peak per phase (cpu-tracker)" in text
    assert "not to scale" not in text
    assert "measured" not in plot_step(report, tmp_path / "plain.svg").read_text()


def test_scaled_down_measurement_is_dotted_and_says_so(mpl, report, tmp_path):
    scaled = _verify(report, 0.1, scaled=["num_hidden_layers 32 -> 2"], checked_peak_bytes=BYTES_PER_GIB)
    text = plot_step(report.with_verify(scaled), tmp_path / "step.svg").read_text()
    assert "scaled-down model, not to scale" in text
    assert "num_hidden_layers 32 -&gt; 2" in text
    assert f"its own estimate: {format_bytes(BYTES_PER_GIB)}" in text
    solid = plot_step(report.with_verify(_verify(report, 0.1)), tmp_path / "solid.svg").read_text()
    assert text.count("stroke-dasharray") > solid.count("stroke-dasharray")  # the measured line is dotted


def test_same_report_gives_the_same_svg(mpl, report, tmp_path):
    first = plot_step(report, tmp_path / "a.svg").read_bytes()
    assert plot_step(report, tmp_path / "b.svg").read_bytes() == first


def test_dollar_in_a_model_name_is_drawn_as_typed(mpl, report, tmp_path):
    named = dataclasses.replace(report, model=dataclasses.replace(report.model, name="my$odd$model"))
    assert "my$odd$model" in plot_step(named, tmp_path / "step.svg").read_text()


# -- matplotlib stays optional ---------------------------------------------------------------------------------


def test_missing_matplotlib_names_the_extra(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(MissingDependencyError) as error:
        plot_step(report, tmp_path / "step.svg")
    assert error.value.exit_code == 7
    assert str(error.value) == MISSING_MATPLOTLIB_MESSAGE
    assert "pip install 'memcalc-train[plot]'" in str(error.value)
    assert not (tmp_path / "step.svg").exists()


def test_importing_plot_does_not_import_matplotlib():
    probe = "import sys, memcalc.plot; print(sorted(m for m in ('matplotlib', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
