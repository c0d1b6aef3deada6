"""The public Python API: what a notebook calls (memcalc.estimate, compare, verify, presets)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import memcalc
from memcalc.errors import SETTINGS, MemcalcError, ModelNotFoundError, UsageError
from memcalc.request import Request


def test_estimate_is_the_cli_answer(cli):
    report = memcalc.estimate("llama-3-8b", precision="bf16", optim="adamw", gpu="h100-80gb")
    via_cli = cli("llama-3-8b", "--precision", "bf16", "--optim", "adamw", "--gpu", "h100-80gb", "--json")
    assert via_cli.exit_code == 6
    ours = report.to_dict()
    theirs = via_cli.json()
    assert ours == theirs  # the same document (the JSON is in bytes: no display unit among the defaults)
    assert report.per_gpu.peak_phase.value == "optimizer_step" and report.fit is not None and not report.fit.fits


def test_settings_named_in_messages_are_the_keywords():
    fields = {f.name for f in dataclasses.fields(Request)} - {"chosen"}
    outputs = {"verify", "emit", "compare_with", "plot", "plan"}  # the CLI's output options, the API's own calls
    assert fields | outputs == SETTINGS


@pytest.mark.parametrize(("settings", "keyword"), [
    ({"batch_size": 0}, "batch_size"),
    ({"zero": 7}, "zero"),
    ({"precision": "bf17"}, "precision"),
    ({"offload": "optimizer"}, "offload"),
    ({"gpu": "h100", "gpu_memory": "80GiB"}, "gpu_memory"),
    ({"max_batch": True}, "max_batch"),
    ({"lora_targets": "nothing_here", "lora_rank": 8}, "lora_targets"),
    ({"reserve_fraction": float("nan"), "gpu": "h100"}, "reserve_fraction"),
])
def test_errors_name_settings_as_keywords_not_flags(settings, keyword):
    with pytest.raises(UsageError) as err:
        memcalc.estimate("llama-3-8b", **settings)
    message = str(err.value)
    assert keyword in message and "--" not in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("settings", "needle"), [
    ({"deepspeed": 5}, "deepspeed must be a path"),
    ({"gpu": 5}, "gpu must be text"),
    ({"gpu": ["h100"]}, "gpu must be text"),
    ({"precision": 16}, "precision must be text"),
    ({"lora_rank": 8, "lora_targets": 5}, "lora_targets takes names"),
    ({"lora_rank": 8, "lora_targets": [1]}, "lora_targets takes names"),
    ({"freeze": {"mlp": True}}, "freeze takes names"),
    ({"lora_rank": 8, "lora_targets": []}, "lora_targets names nothing"),
    ({"freeze": ""}, "freeze names nothing"),
    ({"freeze": [" ", ""]}, "freeze names nothing"),
    ({"qlora": 1}, "qlora is a switch"),
])
def test_values_of_the_wrong_kind_are_usage_errors(settings, needle):
    with pytest.raises(UsageError, match=needle):
        memcalc.estimate("gpt2", **settings)


def test_model_of_the_wrong_kind_is_a_usage_error():
    with pytest.raises(UsageError, match="model must be text"):
        memcalc.estimate(5)


def test_unknown_keyword_and_model():
    with pytest.raises(UsageError, match="unknown setting 'batchsize'"):
        memcalc.estimate("llama-3-8b", batchsize=2)
    with pytest.raises(ModelNotFoundError):
        memcalc.estimate("no-such-model-here")
    assert issubclass(ModelNotFoundError, MemcalcError)


def test_compare_gives_one_report_per_stage():
    reports = memcalc.compare("llama-3-8b", zero=[0, 1, 2, 3], gpus=8)
    assert [r.training.zero_stage for r in reports] == [0, 1, 2, 3]
    states = [r.per_gpu.model_states_bytes for r in reports]
    assert states == sorted(states, reverse=True)  # each stage shards more (ZeRO paper, Figure 1)
    with pytest.raises(UsageError, match="compare"):
        memcalc.estimate("llama-3-8b", zero="0,3", gpus=8)


def test_presets_count_every_preset_file():
    from memcalc.catalog import model_preset_files

    found = memcalc.presets()
    assert [m.name for m in found.models] == list(model_preset_files())
    llama = next(m for m in found.models if m.name == "llama-3-8b")
    assert llama.num_params == 8_030_261_248  # Meta's model card: 8.03B
    assert any(g.name == "h100-80gb" for g in found.gpus)


def test_report_serialises_and_validates_against_the_schema():
    from memcalc.schema import validate_report_json

    report = memcalc.estimate("qwen2.5-0.5b", lora_rank=8, gpu="rtx-4090")
    again = validate_report_json(report.to_json())
    assert again.per_gpu.peak_bytes == report.per_gpu.peak_bytes
    assert json.loads(report.to_json())["schema_version"] == 3


def test_verify_through_the_api(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 128, "max_position_embeddings": 64}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    report = memcalc.verify(str(path), method="cpu-tracker", seq_len=32, precision="bf16-pure")
    assert report.verify is not None and report.verify.method == "cpu-tracker"
    assert report.verify.measured_peak_bytes > 0
    peak = next(row for row in report.verify.rows if row.term == "peak")
    assert peak.estimate_bytes == report.per_gpu.peak_bytes


def test_importing_memcalc_loads_nothing_until_used():
    probe = ("import sys, memcalc; before = 'memcalc.api' in sys.modules; memcalc.UsageError; "
             "mid = 'memcalc.api' in sys.modules; memcalc.estimate; print(before, mid, 'memcalc.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]
