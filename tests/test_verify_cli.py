"""--verify through the CLI: a tiny config end to end (seconds), JSON contract, and bad input."""

from __future__ import annotations

import json

import pytest

from memcalc.errors import MissingDependencyError

pytest.importorskip("torch")
pytest.importorskip("transformers")

# Achieved on these tiny runs: -0.02% (one CPU step, gloo ranks), +0.12% (fake process group); a small margin.
VERIFY_TOLERANCE_PCT = 0.25

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 256}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_verify_tiny_config_end_to_end(cli, tiny_config):
    result = cli(tiny_config, "--seq-len", "64", "--precision", "bf16-pure", "--verify=cpu-tracker")
    assert result.exit_code == 0, result.stderr
    assert "verify (cpu-tracker" in result.stdout and "Estimate vs measured" in result.stdout
    assert "phase: backward" in result.stdout and "measured peak" in result.stdout


def test_verify_json_object(cli, tiny_config):
    result = cli(tiny_config, "--seq-len", "64", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # progress went to stderr: stdout is one JSON document
    verify = data["verify"]
    assert verify["method"] == "cpu-tracker" and verify["scaled"] == []
    assert verify["measured_peak_phase"] in ("forward", "backward", "optimizer_step")
    for term in ("weights", "master_weights", "gradients", "optimizer_states"):
        assert verify["per_term_bytes"][term] == next(t["bytes"] for t in data["per_gpu"]["terms"] if t["name"] == term)
    peak = next(row for row in verify["rows"] if row["term"] == "peak")
    assert peak["measured_bytes"] == verify["measured_peak_bytes"]
    assert abs(peak["error_pct"]) < VERIFY_TOLERANCE_PCT
    assert verify["run"]["seq_len"] == 64 and verify["run"]["precision"] == "bf16"


BIG = {**TINY, "num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
       "num_key_value_heads": 4}


def test_cpu_verify_of_what_the_ram_cannot_hold_runs_the_full_size_trace(cli, monkeypatch, tiny_config):
    """The README's `memcalc MODEL --verify` works on a laptop: a model the RAM cannot hold is traced at full size
    under FakeTensorMode instead of refused, and the output says so."""
    from memcalc import measure as verify

    monkeypatch.setattr(verify, "ram_bytes", lambda: 64 * 1024 * 1024)  # a 64 MiB machine
    with open(tiny_config, "w") as handle:
        json.dump(BIG, handle)
    result = cli(tiny_config, "--seq-len", "16", "--precision", "bf16-pure", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    measured = result.json()["verify"]
    assert measured["method"] == "trace" and measured["scaled"] == []
    assert any("half of this machine's RAM" in note and "FakeTensorMode" in note for note in measured["notes"])
    human = cli(tiny_config, "--seq-len", "16", "--precision", "bf16-pure", "--verify")
    assert "verify: a real CPU step would hold" in human.stdout


def test_cpu_tracker_scales_down_what_the_ram_cannot_hold(cli, monkeypatch, tiny_config):
    from memcalc import measure as verify

    monkeypatch.setattr(verify, "ram_bytes", lambda: 64 * 1024 * 1024)  # a 64 MiB machine
    with open(tiny_config, "w") as handle:
        json.dump(BIG, handle)
    result = cli(tiny_config, "--seq-len", "16", "--precision", "bf16-pure", "--verify=cpu-tracker", "--json")
    assert result.exit_code == 0, result.stderr
    measured = result.json()["verify"]
    assert measured["method"] == "cpu-tracker" and measured["scaled"]
    assert measured["checked_peak_bytes"] <= 32 * 1024 * 1024  # what ran fits half the (pretended) RAM


def test_verify_scales_a_model_down_to_fit(monkeypatch):
    """What a GPU run does when the model does not fit the card (exercised here on the CPU)."""
    from memcalc import measure as verify
    from memcalc.model import ModelConfig
    from memcalc.spec import TrainingSpec

    monkeypatch.setattr(verify, "ram_bytes", lambda: 64 * 1024 * 1024)
    config = ModelConfig("big", BIG, "test")
    spec = TrainingSpec(precision="bf16-pure", seq_len=16)
    outcome = verify.verify(config, spec, "cpu-tracker", scale=True)
    assert outcome.scaled and outcome.scaled[0] == "num_hidden_layers 8 -> 2"
    assert outcome.report.per_gpu.peak_bytes <= 32 * 1024 * 1024  # half the (fake) RAM
    assert outcome.measurement.run["num_params"] < verify.estimate_for(config, spec).model.num_params
    peak = next(row for row in outcome.rows if row.term == "peak")
    assert abs(peak.error_pct) < VERIFY_TOLERANCE_PCT


def test_verify_without_torch_is_an_install_hint(cli, monkeypatch, tiny_config):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in ("torch", "transformers") else real(name, *a, **k))
    result = cli(tiny_config, "--verify")
    assert result.exit_code == MissingDependencyError.exit_code == 7 and result.stdout == ""
    # the README's install order: the CPU torch wheel first, pinned (an unpinned torch pulls a CUDA build)
    assert len(result.stderr.strip().splitlines()) == 1 and "pip install torch==2.13.0" in result.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--params", "7B", "--verify"], "config.json"),
    (["--zero", "0,1", "--gpus", "2", "--verify"], "single --zero"),
    (["--verify=fast"], "--verify=fast"),
])
def test_verify_bad_input(cli, tiny_config, args, needle):
    result = cli(tiny_config if "--params" not in args else "--params", *(args if "--params" not in args else args[1:]))
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("sharding", "method"), [("fsdp", "trace"), ("torch", "cpu-tracker")])
def test_verify_several_gpus(cli, tiny_config, sharding, method):
    """--gpus N --verify: a fake process group (trace) or real gloo ranks (cpu-tracker), the busiest rank shown."""
    zero = "3" if sharding == "fsdp" else "1"
    result = cli(tiny_config, "--seq-len", "32", "--gpus", "2", "--zero", zero, "--sharding", sharding,
                 f"--verify={method}", "--json")
    assert result.exit_code == 0, result.stderr
    verify = json.loads(result.stdout)["verify"]
    assert verify["method"] == ("fake-pg" if method == "trace" else "gloo")
    peak = next(row for row in verify["rows"] if row["term"] == "peak")
    assert abs(peak["error_pct"]) < VERIFY_TOLERANCE_PCT


def test_verify_deepspeed_stage_checks_the_torch_equivalent(cli, tiny_config):
    result = cli(tiny_config, "--seq-len", "32", "--gpus", "2", "--zero", "3", "--verify=trace", "--json")
    verify = json.loads(result.stdout)["verify"]
    assert any("DeepSpeed is not run here" in note for note in verify["notes"])
