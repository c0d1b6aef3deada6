"""Issue "The first hour": each defect a new user met, as a regression test through the command line."""

from __future__ import annotations

import json
import re

import pytest

from memcalc.cli import EXIT_DOES_NOT_FIT, main


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memcalc: ")
    return lines[0]


# ---- output that contradicted itself ----------------------------------------------------------------------------

def test_defaults_used_are_those_that_applied_with_fsdp(cli):
    training = cli("llama-3-8b", "--fsdp", "--gpus", "8", "--json").json()["training"]
    assert training["sharding"] == "fsdp" and training["zero_stage"] == 3
    assert "--zero 3" in training["defaults_used"] and "--zero 0" not in training["defaults_used"]


def test_defaults_used_leave_out_what_a_deepspeed_config_set(cli, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                  "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    training = cli("llama-3-8b", "--gpus", "8", "--deepspeed", str(config), "--json").json()["training"]
    assert (training["zero_stage"], training["micro_batch_size"], training["grad_accum"]) == (2, 4, 2)
    assert not any(d.startswith(("--zero", "--batch-size", "--precision")) for d in training["defaults_used"])
    assert "--seq-len 2048" in training["defaults_used"]  # what the config does not say is still a default


def test_fsdp_recipe_says_the_fp32_shards_are_the_master(cli):
    data = cli("llama-3-8b", "--fsdp", "--gpus", "8", "--json").json()
    training, terms = data["training"], {t["name"] for t in data["per_gpu"]["terms"]}
    assert training["weight_dtype"] == "fp32" and training["master_dtype"] is None
    assert "master copy" in training["precision_description"] and "fp32 master weights" not in \
        training["precision_description"]
    assert "master_weights" not in terms


def test_sharding_fsdp_defaults_to_resharding_like_fsdp(cli):
    short = cli("llama-3-8b", "--fsdp", "--gpus", "8", "--json").json()
    long = cli("llama-3-8b", "--sharding", "fsdp", "--gpus", "8", "--json")
    assert long.exit_code == 0, long.stderr
    assert long.json()["training"]["zero_stage"] == 3 == short["training"]["zero_stage"]
    assert long.json()["per_gpu"]["peak_bytes"] == short["per_gpu"]["peak_bytes"]


def test_the_at_peak_column_accounts_for_the_peak(cli):
    """Issue: QLoRA, checkpointing, -b 4 --seq-len 4096: the rows summed to 17.8 GiB and the peak was 33.4 GiB."""
    # (the rules' moments, whose terms the table names; a traced QLoRA step names its own)
    args = ("llama-3-8b", "--lora-rank", "16", "--qlora", "--checkpointing", "full", "-b", "4", "--seq-len", "4096",
            "--activations", "rules")
    data = cli(*args, "--json").json()["per_gpu"]
    peak = next(p for p in data["phases"] if p["phase"] == data["peak_phase"])
    assert sum(peak["breakdown"].values()) == peak["bytes"] == data["peak_bytes"]
    assert "loss gradients" in peak["breakdown"]  # the term-less moment that made the gap
    text = cli(*args).stdout
    row = next(line for line in text.splitlines() if line.startswith("│ loss gradients"))
    gib = peak["breakdown"]["loss gradients"] / 2**30
    assert f"{gib:.2f}" in row and f"{100 * peak['breakdown']['loss gradients'] / peak['bytes']:.1f}%" in row


# ---- settings silently dropped or wrong -------------------------------------------------------------------------

def test_single_gpu_zero3_offload_moves_states_to_the_cpu(cli):
    plain = cli("llama-3.2-3b", "--json").json()["per_gpu"]
    offloaded = cli("llama-3.2-3b", "--zero", "3", "--offload", "both", "--json").json()["per_gpu"]
    on_cpu = {t["name"] for t in offloaded["terms"] if t["category"] == "cpu_offload"}
    assert {"master_weights", "optimizer_states", "offloaded_params"} <= on_cpu
    # The 16 B/param of fp32 master + Adam states leave the GPU: the peak drops by more than half.
    assert offloaded["peak_bytes"] < plain["peak_bytes"] / 2 and offloaded["cpu_offload_bytes"] > 0


def test_learned_positions_refuse_a_longer_sequence(cli):
    line = _one_line_error(cli("gpt2", "--seq-len", "2048"), 2)
    assert "--seq-len 2,048" in line and "1,024" in line


def test_a_default_sequence_longer_than_the_model_takes_its_maximum(cli):
    data = cli("gpt2", "--json").json()
    assert data["training"]["seq_len"] == 1024  # GPT2Config n_positions
    assert any("max_position_embeddings" in note for note in data["notes"])


def test_rotary_positions_beyond_the_maximum_are_noted(cli):
    data = cli("llama-3-8b", "--seq-len", "16384", "--json").json()  # max_position_embeddings 8192
    assert any("above the model's max_position_embeddings 8,192" in note for note in data["notes"])


def test_an_ambiguous_gpu_name_says_which_card(cli):
    data = cli("llama-3-8b", "--gpu", "a100", "--json").json()
    assert data["fit"]["gpu"] == "a100-40gb"
    assert any("a100-80gb" in note for note in data["notes"])


# ---- commands that failed ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_shows_the_estimate_options(cli, flag):
    text = cli(flag).stdout
    for option in ("--precision", "--zero", "--gpu", "--lora-rank", "--verify", "--plot"):
        assert option in text
    assert "memcalc presets" in text  # the other commands are named
    assert cli("llama-3-8b", flag).stdout == text


def test_version(cli):
    from memcalc import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"memcalc {__version__}"


def test_eighty_columns_cut_no_name_and_lead_with_the_verdict(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("llama-3-8b", "--lora-rank", "16", "--checkpointing", "full", "--gpu", "rtx-4090", "--explain")
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith(("FITS", "DOES NOT FIT"))
    terms = cli("llama-3-8b", "--lora-rank", "16", "--checkpointing", "full", "--json").json()["per_gpu"]["terms"]
    for name in [t["name"] for t in terms] + ["meta-llama/Meta-Llama-3-8B"]:  # names whole; prose wraps at spaces
        assert name in result.stdout, name
    assert not re.search(r"\w…", result.stdout)  # rich's ellipsis: a cut name


def test_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m memcalc llama-3-8b | head -1", shell=True, capture_output=True,
                          text=True, check=False, cwd=tmp_path)
    assert done.stderr == "" and done.stdout.startswith("llama-3-8b")
    probe = subprocess.run([sys.executable, "-c", ("import sys; from memcalc.cli import main; import os;"
                            "r, w = os.pipe(); os.close(r); os.dup2(w, 1); sys.exit(main(['llama-3-8b']))")],
                           capture_output=True, text=True, check=False)
    assert probe.returncode == 0 and probe.stderr == ""


def test_does_not_fit_still_exits_six(cli):
    assert cli("llama-3-8b", "--gpu", "rtx-4090").exit_code == EXIT_DOES_NOT_FIT


def test_entry_point_returns_codes_in_process():
    assert main(["--version"]) == 0
