"""memcalc.plot: the step's series (pure) against the engine's own phase totals, and the files it draws.

The series is checked against the report's phase totals, which the engine computed; drawing is checked by what
the file holds (the peak's formatted value as SVG text, in the HTML, in the PNG's tEXt metadata).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from memcalc.api import model_input, run
from memcalc.errors import UsageError
from memcalc.fit import GpuTarget
from memcalc.plot import MISSING_MATPLOTLIB_MESSAGE, TRANSIENTS, plot_step, step_series
from memcalc.report import PhaseTotal
from memcalc.spec import TrainingSpec
from memcalc.units import BYTES_PER_GIB, format_bytes
from memcalc.vocab import Phase

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


def _verify_dict(report, fraction=0.93):
    per_phase = {p.phase.value: int(p.bytes * fraction) for p in report.per_gpu.phases}
    return {"method": "cpu-tracker", "per_phase_peak_bytes": per_phase, "measured_peak_bytes": max(per_phase.values())}


# -- the series (no matplotlib) -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    TrainingSpec(),
    TrainingSpec(checkpointing="full", micro_batch_size=4),
    TrainingSpec(zero_stage=3, num_gpus=8, offload="both", lora_rank=16),
    TrainingSpec(zero_stage=3, num_gpus=8, sharding="fsdp", checkpointing="full"),
    TrainingSpec(precision="fp32", grad_accum=4, zero_stage=2, num_gpus=8),
], ids=["default", "checkpointing-b4", "zero3-offload-lora", "fsdp-checkpointing", "fp32-accum-zero2"])
def test_moments_sum_to_the_engines_phase_totals(llama, spec):
    report = run(llama, spec)
    moments = step_series(report)
    assert [m.phase for m in moments] == [Phase.forward, Phase.backward, Phase.optimizer_step]
    engine_totals = {p.phase: p.bytes for p in report.per_gpu.phases}
    for moment in moments:
        assert sum(moment.parts.values()) == moment.total_bytes == engine_totals[moment.phase]
        assert all(size >= 0 for size in moment.parts.values())
    assert max(sum(m.parts.values()) for m in moments) == report.per_gpu.peak_bytes
    peak = next(m for m in moments if m.phase == report.per_gpu.peak_phase)
    assert sum(peak.parts.values()) == report.per_gpu.peak_bytes


def test_each_moment_holds_the_terms_alive_then_and_no_cpu_ram(llama):
    report = run(llama, TrainingSpec(zero_stage=3, num_gpus=8, offload="both"))
    cpu_terms = {t.name for t in report.per_gpu.terms if t.in_cpu_ram}
    assert cpu_terms, "this setup should offload something to CPU RAM"
    sizes = {t.name: t.bytes for t in report.per_gpu.terms}
    for moment, phase_total in zip(step_series(report), report.per_gpu.phases):
        assert cpu_terms.isdisjoint(moment.parts)
        for name, size in moment.parts.items():
            if name == TRANSIENTS:
                continue
            assert size == (sizes[name] if name in phase_total.terms else 0) or name in moment.partial


def test_transients_band_is_what_the_phase_total_holds_beyond_its_terms(report):
    forward = step_series(report)[0]
    listed = sum(t.bytes for t in report.per_gpu.terms if t.name in report.per_gpu.phases[0].terms)
    assert forward.transient_bytes == report.per_gpu.phases[0].bytes - listed > 0  # the loss's logits transient


def test_terms_counted_in_part_are_cut_at_the_phase_total(report):
    """When the listed terms exceed the phase total (activations freed late in backward), the top is cut."""
    forward = report.per_gpu.phases[0]
    short = PhaseTotal(phase=forward.phase, bytes=forward.bytes - 10 * BYTES_PER_GIB, terms=forward.terms,
                       first_step_bytes=forward.first_step_bytes)
    cut = dataclasses.replace(report, per_gpu=dataclasses.replace(report.per_gpu,
                                                                  phases=[short, *report.per_gpu.phases[1:]]))
    moment = step_series(cut)[0]
    assert sum(moment.parts.values()) == short.bytes
    assert moment.transient_bytes == 0
    assert "activations" in moment.partial
    assert moment.parts["weights"] == cut.term("weights").bytes  # cut from the top, model states kept


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


@pytest.mark.parametrize("name", ["step.pdf", "step", "step.svg.txt"])
def test_unknown_suffix_is_a_usage_error(report, tmp_path, name):
    with pytest.raises(UsageError, match=r"\.svg, \.png or \.html") as error:
        plot_step(report, tmp_path / name)
    assert "\n" not in str(error.value)
    assert not (tmp_path / name).exists()


def test_unknown_unit_is_a_usage_error(report, tmp_path):
    with pytest.raises(UsageError, match="gib"):
        plot_step(report, tmp_path / "step.svg", unit="furlongs")


def test_unwritable_path_is_a_usage_error(mpl, report, tmp_path):
    with pytest.raises(UsageError, match="cannot write the plot"):
        plot_step(report, tmp_path / "no-such-folder" / "step.svg")


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "dataclass-like"])
def test_verify_measurement_is_drawn_over_the_estimate(mpl, report, tmp_path, as_object):
    verify = _verify_dict(report)
    verified = report.with_verify(SimpleNamespace(**verify) if as_object else verify)
    text = plot_step(verified, tmp_path / "step.svg").read_text()
    assert "measured peak per phase (cpu-tracker)" in text
    assert "measured" not in plot_step(report, tmp_path / "plain.svg").read_text()


def test_scaled_down_measurement_says_so(mpl, report, tmp_path):
    verify = {**_verify_dict(report, 0.1), "scaled": ["num_hidden_layers 32 -> 2"], "checked_peak_bytes": BYTES_PER_GIB}
    text = plot_step(report.with_verify(verify), tmp_path / "step.svg").read_text()
    assert "scaled-down model, not to scale" in text
    assert "num_hidden_layers 32 -&gt; 2" in text


def test_same_report_gives_the_same_svg(mpl, report, tmp_path):
    first = plot_step(report, tmp_path / "a.svg").read_bytes()
    assert plot_step(report, tmp_path / "b.svg").read_bytes() == first


def test_dollar_in_a_model_name_is_drawn_as_typed(mpl, report, tmp_path):
    named = dataclasses.replace(report, model=dataclasses.replace(report.model, name="my$odd$model"))
    assert "my$odd$model" in plot_step(named, tmp_path / "step.svg").read_text()


# -- matplotlib stays optional ---------------------------------------------------------------------------------


def test_missing_matplotlib_names_the_extra(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(UsageError) as error:
        plot_step(report, tmp_path / "step.svg")
    assert str(error.value) == MISSING_MATPLOTLIB_MESSAGE
    assert "pip install 'memcalc-train[plot]'" in str(error.value)
    assert not (tmp_path / "step.svg").exists()


def test_importing_plot_does_not_import_matplotlib():
    probe = "import sys, memcalc.plot; print(sorted(m for m in ('matplotlib', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
