"""``memcalc MODEL --plot FILE`` through the console-script entry point: the file, the exit code, the one-line
errors, and stdout left as it was (the table, or valid JSON)."""

from __future__ import annotations

import sys

import pytest

from memcalc.units import format_bytes

PEAK = "179.49 GiB"  # llama-3-8b, bf16 + fp32 master, AdamW foreach, b=1 x 2048: the peak as the table prints it


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def test_plot_writes_the_file_with_the_peak_as_printed(mpl, cli, tmp_path):
    path = tmp_path / "OUT.svg"
    result = cli("llama-3-8b", "--plot", str(path))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert PEAK in result.stdout
    assert f"peak {PEAK}" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["out.txt", "out", "out.svg/"])
def test_unknown_suffix_exits_2_in_one_line(cli, tmp_path, name):
    result = cli("llama-3-8b", "--plot", f"{tmp_path}/{name}")
    assert result.exit_code == 2
    assert result.stderr.startswith("memcalc: ") and result.stderr.count("\n") == 1
    assert ".svg, .png or .html" in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_does_not_fit_exits_6_and_still_draws_the_usable_line(mpl, cli, tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    result = cli("llama-3-8b", "--gpu", "h100-80gb", "--plot", str(path))
    assert result.exit_code == 6, result.stderr
    usable = cli("llama-3-8b", "--gpu", "h100-80gb", "--json").json()["fit"]["usable_bytes"]
    with Image.open(path) as image:
        assert image.format == "PNG"
        description = image.text["Description"]
    assert f"peak per GPU {PEAK}" in description
    assert f"usable on h100-80gb {format_bytes(usable)}" in description
    assert format_bytes(usable) in result.stdout


@pytest.mark.parametrize("where", ["no-such-folder/x.svg", "a-folder.svg"])
def test_an_unwritable_path_exits_8_in_one_line(mpl, cli, tmp_path, where):
    (tmp_path / "a-folder.svg").mkdir()
    result = cli("llama-3-8b", "--plot", str(tmp_path / where))
    assert result.exit_code == 8
    assert result.stderr.startswith("memcalc: cannot write the plot") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_json_with_plot_writes_the_file_and_stdout_stays_json(mpl, cli, tmp_path):
    path = tmp_path / "x.svg"
    result = cli("llama-3-8b", "--json", "--plot", str(path))
    assert result.exit_code == 0, result.stderr
    report = result.json()  # one report: the report itself
    peak = report["per_gpu"]["peak_bytes"]
    assert format_bytes(peak) == PEAK
    assert f"peak {PEAK}" in path.read_text(encoding="utf-8")


def test_missing_matplotlib_exits_7_with_the_install_hint(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    path = tmp_path / "x.svg"
    result = cli("llama-3-8b", "--plot", str(path))
    assert result.exit_code == 7
    assert result.stderr.count("\n") == 1
    assert "pip install 'memcalc-train[plot]'" in result.stderr
    assert not path.exists()


@pytest.mark.parametrize("output", [("--emit", "deepspeed"), ("--compare-with", "accelerate")])
def test_plot_is_drawn_beside_the_other_outputs(mpl, cli, tmp_path, output):
    path = tmp_path / "x.svg"
    result = cli("llama-3-8b", *output, "--plot", str(path))
    assert result.exit_code == 0, result.stderr
    assert f"peak {PEAK}" in path.read_text(encoding="utf-8")
