"""--verify through the CLI: a tiny config end to end (seconds), JSON contract, and bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

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
    assert abs(peak["error_pct"]) < 1.0
    assert verify["run"]["seq_len"] == 64 and verify["run"]["precision"] == "bf16"


def test_verify_scales_a_model_too_big_for_the_machine(cli, monkeypatch, tiny_config):
    import memcalc.verify as verify

    monkeypatch.setattr(verify, "ram_bytes", lambda: 64 * 1024 * 1024)  # a 64 MiB machine: must shrink
    big = {**TINY, "num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
           "num_key_value_heads": 4}
    with open(tiny_config, "w") as handle:
        json.dump(big, handle)
    data = json.loads(cli(tiny_config, "--seq-len", "16", "--precision", "bf16-pure", "--verify", "--json").stdout)
    scaled = data["verify"]["scaled"]
    assert scaled and scaled[0] == "num_hidden_layers 8 -> 2"
    assert data["verify"]["checked_peak_bytes"] < data["per_gpu"]["peak_bytes"]


def test_verify_without_torch_is_an_install_hint(cli, monkeypatch, tiny_config):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in ("torch", "transformers") else real(name, *a, **k))
    result = cli(tiny_config, "--verify")
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "pip install" in result.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--params", "7B", "--verify"], "config.json"),
    (["--zero", "0,1", "--gpus", "2", "--verify"], "single --zero"),
    (["--verify=fast"], "--verify=fast"),
])
def test_verify_bad_input(cli, tiny_config, args, needle):
    result = cli(tiny_config if "--params" not in args else "--params", *(args if "--params" not in args else args[1:]))
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
