"""CLI: exit codes, stdout/stderr separation, the JSON contract and every class of bad input."""

from __future__ import annotations

import json

import pytest

from memcalc.cli import EXIT_DOES_NOT_FIT
from memcalc.errors import ConfigError, ModelNotFoundError, UsageError

JSON_KEYS = {"schema_version", "model", "training", "per_gpu", "totals", "fit", "notes"}


def test_main_example_works_exactly_as_written(cli):
    result = cli("llama-3-8b", "--precision", "bf16", "--optim", "adamw")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for text in ("llama-3-8b", "8,030,261,248", "GiB", "weights", "master_weights", "optimizer_states", "peak"):
        assert text in result.stdout
    # Defaults are named, not silent.
    assert "--batch-size 1" in result.stdout and "--seq-len 2048" in result.stdout


def test_units_gb(cli):
    result = cli("llama-3-8b", "--units", "gb")
    assert result.exit_code == 0
    assert "in GB (10^9 bytes)" in result.stdout and "GiB" not in result.stdout.split("Per GPU")[1]


def test_json_contract(cli):
    result = cli("llama-3-8b", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    data = result.json()
    assert JSON_KEYS <= set(data)
    assert data["schema_version"] == 3
    assert data["model"]["num_params"] == data["model"]["num_trainable_params"] == 8_030_261_248
    assert data["training"]["precision"] == "bf16" and data["training"]["micro_batch_size"] == 1
    names = [t["name"] for t in data["per_gpu"]["terms"]]
    assert names[:4] == ["weights", "master_weights", "gradients", "optimizer_states"]
    for term in data["per_gpu"]["terms"]:
        assert set(term) >= {"name", "bytes", "formula", "source"} and isinstance(term["bytes"], int)
    per_gpu = data["per_gpu"]
    assert per_gpu["model_states_bytes"] == sum(t["bytes"] for t in per_gpu["terms"][:4])
    assert per_gpu["peak_bytes"] == max(p["bytes"] for p in per_gpu["phases"])
    assert per_gpu["peak_phase"] in ("forward", "backward", "optimizer_step")
    assert data["fit"] is None


def test_zero_what_if_is_per_gpu(cli):
    one = cli("llama-3-8b", "--json").json()
    eight = cli("llama-3-8b", "--zero", "2", "--gpus", "8", "--json").json()
    assert eight["training"]["zero_stage"] == 2 and eight["training"]["num_gpus"] == 8
    assert eight["per_gpu"]["model_states_bytes"] < one["per_gpu"]["model_states_bytes"]
    assert eight["totals"]["model_states_bytes"] == 8 * eight["per_gpu"]["model_states_bytes"]


def test_zero_comparison_table(cli):
    result = cli("llama-3-8b", "--zero", "0,1,2,3", "--gpus", "8")
    assert result.exit_code == 0
    for stage in range(4):
        assert f"ZeRO {stage}" in result.stdout
    data = cli("llama-3-8b", "--zero", "0,1,2,3", "--gpus", "8", "--json").json()
    peaks = [r["per_gpu"]["model_states_bytes"] for r in data["reports"]]
    assert peaks == sorted(peaks, reverse=True) and len(peaks) == 4


def test_fit_verdict_and_exit_codes(cli):
    too_big = cli("llama-3-8b", "--gpu", "h100-80gb")
    assert too_big.exit_code == EXIT_DOES_NOT_FIT
    assert "DOES NOT FIT" in too_big.stdout and "CUDA context" in too_big.stdout
    data = cli("llama-3-8b", "--gpu", "h100-80gb", "--json").json()
    fit = data["fit"]
    assert fit["fits"] is False and fit["headroom_bytes"] < 0
    # (the two cuBLAS workspaces of an H100, 32 MiB each: CublasHandlePool.cpp getChosenWorkspaceSize on sm 9.0)
    assert fit["cublas_workspace_bytes"] == 2 * (32 + 1) * 2**20  # (and the 1 MiB per thread a biased Linear keeps)
    assert fit["usable_bytes"] == (fit["gpu_memory_bytes"] - fit["cuda_context_bytes"] - fit["cublas_workspace_bytes"]
                                   - fit["allocator_reserve_bytes"])
    assert fit["gpu_memory_bytes"] == 81559 * 2**20  # nvidia-smi on an H100 80GB HBM3 (presets/gpus.json)
    fitting = [s for s in fit["suggestions"] if s["fits"]]
    assert fitting and all(s["peak_bytes"] <= fit["usable_bytes"] for s in fitting)
    small = cli("gpt2", "--gpu", "h100-80gb")
    assert small.exit_code == 0 and "FITS" in small.stdout


def test_gpu_memory_option(cli):
    data = cli("--params", "1B", "--precision", "fp32", "--gpu-memory", "80GiB", "--json").json()
    assert data["fit"]["gpu_memory_bytes"] == 80 * 2**30 and data["fit"]["fits"] is True


def test_params_forms(cli):
    for text, expected in (("7e9", 7 * 10**9), ("7B", 7 * 10**9), ("6.74B", 6_740_000_000), ("8030261248", 8_030_261_248)):
        data = cli("--params", text, "--json").json()
        assert data["model"]["num_params"] == expected
        assert data["model"]["params_source"] == "--params"


def test_params_overrides_model_count(cli):
    data = cli("llama-3-8b", "--params", "8e9", "--json").json()
    assert data["model"]["num_params"] == 8 * 10**9 and data["model"]["name"] == "llama-3-8b"


def test_explain_shows_formula_and_source(cli):
    result = cli("llama-3-8b", "--explain")
    assert result.exit_code == 0
    assert result.stdout.count("  formula: ") == result.stdout.count("  source:  ") >= 6
    assert "8,030,261,248 params x 2 B (bf16)" in result.stdout


def test_presets_command(cli):
    result = cli("presets")
    assert result.exit_code == 0 and "llama-3-8b" in result.stdout and "h100-80gb" in result.stdout
    data = cli("presets", "--json").json()
    assert len(data["models"]) >= 30 and len({m["model_type"] for m in data["models"]}) >= 12
    assert any(g["name"] == "h100-80gb" for g in data["gpus"])
    # each card's SMs and the CUDA context the fit deducts for it: measured on sm 9.0 (the H200's 806,158,336 B), for an
    # A100 108 SMs x 2,048 resident threads x 2,149 B + 225,206,272 B (tests/test_fit.py derives both figures)
    gpus = {g["name"]: g for g in data["gpus"]}
    assert (gpus["h100-80gb"]["sms"], gpus["h100-80gb"]["cuda_context_bytes"]) == (132, 806_158_336)
    assert (gpus["a100-80gb"]["sms"], gpus["a100-80gb"]["cuda_context_bytes"]) == (108, 700_530_688)
    assert gpus["a100-80gb"]["cuda_context_source"].startswith("estimated")


def test_help_is_one_command(cli):
    result = cli("--help")
    assert result.exit_code == 0 and "estimate" in result.stdout and "presets" in result.stdout


# ---- bad input: one line on stderr, nothing on stdout, a non-zero documented exit code --------------------

def _assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memcalc: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_model_suggests_closest(cli):
    _assert_one_line_error(cli("llama-3-8", "--json"), ModelNotFoundError.exit_code, "unknown model", "llama-3-8b")
    _assert_one_line_error(cli("lama3-8b"), ModelNotFoundError.exit_code, "did you mean")


def test_missing_and_malformed_config(cli, tmp_path):
    _assert_one_line_error(cli(str(tmp_path / "nope.json")), ModelNotFoundError.exit_code, "no such file")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    _assert_one_line_error(cli(str(bad)), ConfigError.exit_code, "not valid JSON")
    bad.write_text("[1, 2]")
    _assert_one_line_error(cli(str(bad)), ConfigError.exit_code, "JSON object")
    bad.write_text('{"hidden_size": 8}')
    _assert_one_line_error(cli(str(bad)), ConfigError.exit_code, "model_type")
    _assert_one_line_error(cli(str(tmp_path)), ConfigError.exit_code, "model_type")  # the folder holding it
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(cli(str(empty)), ConfigError.exit_code, "no config.json")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--params", "abc"], "not a number"),
        (["--params", "-5"], "must be positive"),
        (["--params", "0"], "positive"),
        (["--params", "7X"], "unknown suffix"),
        (["--params", "1e16"], "larger than"),
        (["llama-3-8b", "--gpus", "0"], "--gpus"),
        (["llama-3-8b", "--batch-size", "-1"], "--batch-size"),
        (["llama-3-8b", "--seq-len", "abc"], "--seq-len"),
        (["llama-3-8b", "--zero", "4"], "0, 1, 2 or 3"),
        (["llama-3-8b", "--optim", "adamx"], "--optim"),
        (["llama-3-8b", "--precision", "bf8"], "--precision"),
        (["llama-3-8b", "--units", "kg"], "--units"),
        (["llama-3-8b", "--gpu", "h1000"], "unknown GPU"),
        (["llama-3-8b", "--gpu-memory", "-80GiB"], "must be positive"),
        (["llama-3-8b", "--gpu-memory", "80 parsecs"], "unknown unit"),
        (["llama-3-8b", "--gpu", "h100", "--gpu-memory", "80GiB"], "not both"),
        (["llama-3-8b", "--no-such-flag"], "No such option"),
        (["--precision", "fp32"], "give a MODEL"),
        (["--params", "7B", "--lora-rank", "8"], "need an architecture"),
        (["llama-3-8b", "--qlora"], "--lora-rank"),
        (["llama-3-8b", "--freeze", "everything"], "--freeze"),
        (["llama-3-8b", "--precision", "fp32", "--master-dtype", "fp32"], "master copy"),
    ],
)
def test_bad_input_is_one_line(cli, args, needle):
    result = cli(*args)
    _assert_one_line_error(result, UsageError.exit_code, needle)


def test_zero3_on_one_gpu_is_allowed_and_says_so(cli):
    """DeepSpeed runs its ZeRO-3 optimizer on one GPU too: the shards are whole, but its reduce bucket and
    gathered-module buffers exist (deepspeed 0.19.8 stage3.py allocates the ipg bucket at initialisation)."""
    result = cli("llama-3-8b", "--zero", "3", "--gpus", "1", "--json")
    assert result.exit_code == 0
    data = result.json()
    assert any("divides nothing" in note for note in data["notes"])
    baseline = cli("llama-3-8b", "--json").json()
    terms = {t["name"]: t["bytes"] for t in data["per_gpu"]["terms"]}
    plain = {t["name"]: t["bytes"] for t in baseline["per_gpu"]["terms"]}
    for name in ("weights", "master_weights", "gradients", "optimizer_states"):
        assert terms[name] == plain[name], name
    # deepspeed/runtime/zero/config.py: reduce_bucket_size default pp_int(5e8) elements, in bf16.
    assert terms["zero_reduce_bucket"] == 500_000_000 * 2


def test_absurd_count_does_not_overflow_or_hang(cli):
    data = cli("--params", "1e15", "--gpu", "h200", "--json")
    assert data.exit_code == EXIT_DOES_NOT_FIT
    report = data.json()
    assert report["per_gpu"]["model_states_bytes"] == 16 * 10**15  # Python ints: exact, no overflow
    # Without an architecture the peak is a lower bound; only moving every model state to CPU RAM can make the
    # counted part fit, and the verdict says the rest was not counted.
    assert report["fit"]["peak_is_lower_bound"] is True
    fitting = [s["change"] for s in report["fit"]["suggestions"] if s["fits"]]
    assert fitting and all("--offload both" in change for change in fitting)


def test_internal_error_is_one_line_without_traceback(cli, monkeypatch):
    import memcalc.api

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(memcalc.api, "run", boom)
    result = cli("llama-3-8b")
    assert result.exit_code == 1 and "internal error" in result.stderr and "MEMCALC_DEBUG" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_json_stdout_is_pure_json_even_with_notes(cli):
    result = cli("llama-3-8b", "--zero", "3", "--gpus", "1", "--json")
    json.loads(result.stdout)  # nothing else on stdout


def test_json_output_validates_against_the_schema(cli):
    from memcalc.schema import validate_report_json

    text = cli("mixtral-8x7b", "--zero", "3", "--gpus", "8", "--gpu", "h100-80gb", "--json").stdout
    report = validate_report_json(text)
    assert report.to_dict() == json.loads(text)  # the document round-trips through the typed contract
    schema = cli("schema").json()
    assert {"model", "training", "per_gpu", "totals", "fit", "notes", "schema_version"} <= set(schema["properties"])


def test_max_batch_and_seq_len_solver(cli):
    data = cli("llama-3-8b", "--precision", "bf16-pure", "--optim-impl", "fused", "--gpu", "h100-80gb",
               "--max-batch", "--max-seq-len", "--json").json()
    fit = data["fit"]
    best_seq = fit["max_seq_len"]
    assert best_seq > 2048 and fit["max_seq_len_peak_bytes"] <= fit["usable_bytes"]
    # The answer is the boundary: one token more no longer fits.
    over = cli("llama-3-8b", "--precision", "bf16-pure", "--optim-impl", "fused", "--gpu", "h100-80gb",
               "--seq-len", str(best_seq + 1), "--json")
    assert over.exit_code == EXIT_DOES_NOT_FIT
    at = cli("llama-3-8b", "--precision", "bf16-pure", "--optim-impl", "fused", "--gpu", "h100-80gb",
             "--seq-len", str(best_seq), "--json").json()
    assert at["per_gpu"]["peak_bytes"] == fit["max_seq_len_peak_bytes"]
    small = cli("gpt2", "--gpu", "a100-80gb", "--max-batch", "--json").json()["fit"]
    assert small["max_micro_batch_size"] > 1
    bigger = cli("gpt2", "--gpu", "a100-80gb", "-b", str(small["max_micro_batch_size"] + 1), "--json")
    assert bigger.exit_code == EXIT_DOES_NOT_FIT
    none_fit = cli("llama-3-8b", "--gpu", "t4", "--max-batch", "--json").json()["fit"]
    assert none_fit["max_micro_batch_size"] is None and none_fit["max_micro_batch_limit"] == "none_fits"


def test_solver_needs_a_gpu(cli):
    result = cli("llama-3-8b", "--max-batch")
    assert result.exit_code == 2 and "--gpu" in result.stderr and result.stdout == ""


def test_grad_accum_keeps_gradients_alive_in_forward(cli):
    one = cli("llama-3-8b", "--optim-impl", "fused", "--json").json()
    four = cli("llama-3-8b", "--optim-impl", "fused", "--grad-accum", "4", "--json").json()
    grads = next(t["bytes"] for t in one["per_gpu"]["terms"] if t["name"] == "gradients")
    forward = {r["training"]["grad_accum"]: next(p["bytes"] for p in r["per_gpu"]["phases"] if p["phase"] == "forward")
               for r in (one, four)}
    assert forward[4] - forward[1] == grads  # p.grad persists from micro-batch 1 to the optimizer step
    assert any("--grad-accum 4" in note for note in four["notes"])


def test_gpus_from_nodes_times_gpus_per_node_is_not_listed_as_a_default(cli):
    data = cli("llama-3-8b", "--nodes", "2", "--gpus-per-node", "8", "--zero", "3", "--json").json()
    assert data["training"]["num_gpus"] == 16
    assert not any(d.startswith("--gpus") for d in data["training"]["defaults_used"])
    assert not any(d.startswith("--units") for d in data["training"]["defaults_used"])  # JSON is in bytes


def test_explain_says_what_each_transient_at_a_moment_is(cli):
    """The phase totals add transients that are not terms (the loss's logits, the first gradients of backward):
    --explain names each with its size and what it is."""
    data = cli("llama-3-8b", "--json").json()
    extras = {name: num_bytes for phase in data["per_gpu"]["phases"] for name, num_bytes in phase["breakdown"].items()
              if name not in {t["name"] for t in data["per_gpu"]["terms"]} and num_bytes}
    assert extras  # llama-3-8b's forward peaks during the loss
    text = cli("llama-3-8b", "--explain").stdout
    assert "What else is alive at a moment of the step" in text
    for name, num_bytes in extras.items():
        assert f"{name} = " in text and f"({num_bytes:,} B)" in text, name


@pytest.mark.parametrize(("options", "needles"), [
    # --fsdp is --sharding fsdp: a --sharding chosen otherwise contradicts it (before, deepspeed passed as the default)
    (["--fsdp", "--sharding", "deepspeed", "--gpus", "8"], ["--fsdp is --sharding fsdp"]),
    # a size without a unit is bytes: 80 B of GPU memory, 512 B of context, never what was meant
    (["--gpu-memory", "80"], ["has no unit, so it is 80 bytes", "80GiB"]),
    (["--gpu-memory", "80GiB", "--cuda-context", "512"], ["has no unit, so it is 512 bytes", "512MiB"]),
    # the most loaded of the expert-parallel ranks receives at least the average
    (["--ep", "2", "--gpus", "2", "--ep-load", "0.5"], ["at least 1 (balanced routing)"]),
    (["--gpus", "12", "--gpus-per-node", "8"], ["not a whole number of nodes"]),
])
def test_audited_inputs_are_one_line_exit_2(cli, options, needles):
    model = "mixtral-8x7b" if "--ep" in options else "llama-3-8b"
    _assert_one_line_error(cli(model, *options), UsageError.exit_code, *needles)


def test_gpus_and_gpus_per_node_make_the_nodes(cli):
    """--gpus 16 --gpus-per-node 8 is two nodes (before: refused, as if --nodes 1 had been given)."""
    given = json.loads(cli("llama-3-8b", "--gpus", "16", "--gpus-per-node", "8", "--zero", "3", "--json").stdout)
    nodes = json.loads(cli("llama-3-8b", "--nodes", "2", "--gpus-per-node", "8", "--zero", "3", "--json").stdout)
    assert given["training"]["num_gpus"] == 16 and given["training"]["num_nodes"] == 2
    assert given["per_gpu"] == nodes["per_gpu"]


@pytest.mark.parametrize(("options", "needle"), [
    # one flat tensor of 8,030,261,248 elements would be factored as a vector (Adafactor), quantized as one tensor
    # (torchao), stepped as the largest tensor (for-loop, in backward) or gathered as one FSDP unit: before, 179.49,
    # 164.77, 209.41 and 56.09 GiB where llama-3-8b's own tensors give 37.75, 108.85, 153.49 and 28.84
    (["--optim", "adafactor", "--precision", "bf16-pure"], "--optim adafactor factors each matrix"),
    (["--optim", "torchao-adamw-8bit"], "--optim torchao-adamw-8bit quantizes each tensor"),
    (["--optim-impl", "forloop"], "--optim-impl forloop steps one tensor at a time"),
    (["--optim-in-backward", "--precision", "bf16-pure"], "--optim-in-backward holds one gradient at a time"),
    (["--fsdp", "--gpus", "8"], "FSDP (--fsdp) gathers one block's parameters at a time"),
])
def test_a_bare_count_refuses_what_needs_tensor_shapes(cli, options, needle):
    _assert_one_line_error(cli("--params", "8030261248", *options), UsageError.exit_code, needle, "give a MODEL")
