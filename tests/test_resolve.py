"""MODEL resolution: presets and aliases, paths, folders, nested configs, hub ids (download faked)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from memcalc.api import model_input
from memcalc.errors import ConfigError, ModelNotFoundError
from memcalc.presets import find_model_preset, load_model_preset, model_preset_files
from memcalc.resolve import resolve_model
from tests.conftest import PRESETS_MODELS

PRESET_NAMES = sorted(model_preset_files())

REQUIRED = [
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b",
    "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "mixtral-8x7b", "mixtral-8x22b",
    "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "qwen3-8b", "gemma-2b", "gemma-7b", "gemma-2-9b", "gemma-2-27b",
    "gemma-3-4b", "phi-3-mini", "phi-4", "deepseek-v2-lite", "gpt2", "gpt2-xl", "bert-base", "bert-large",
    "t5-base", "t5-3b", "falcon-7b", "opt-1.3b", "bloom-560m",
]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(PRESET_NAMES)
    assert len(PRESET_NAMES) >= 30
    families = {load_model_preset(name)["model_type"] for name in PRESET_NAMES}
    assert len(families) >= 12


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_is_data_with_provenance(name):
    raw = load_model_preset(name)
    assert raw["_source"] and raw["model_type"]
    assert "auto_map" not in raw  # no remote code referenced
    for alias in raw.get("_aliases", []):
        assert find_model_preset(alias) == name
    assert model_input(name, None).architecture_known


@pytest.mark.parametrize("typed", ["llama3-8b", "Llama-3-8B", "meta-llama/Meta-Llama-3-8B", "LLAMA_3_8B"])
def test_aliases_users_type(typed):
    assert resolve_model(typed).name == "llama-3-8b"


def test_config_path_and_folder(tmp_path):
    raw = json.loads((PRESETS_MODELS / "gpt2.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw))
    by_file = model_input(str(tmp_path / "config.json"), None)
    by_folder = model_input(str(tmp_path), None)
    by_preset = model_input("gpt2", None)
    assert sum(t.numel for t in by_file.tensors) == sum(t.numel for t in by_folder.tensors) == 124_439_808
    assert by_file.tensors == by_preset.tensors


def test_nested_text_config(tmp_path):
    text = {k: v for k, v in load_model_preset("gemma-3-4b").items() if not k.startswith("_")}
    wrapper = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
               "vision_config": {"hidden_size": 1152}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(wrapper))
    nested = model_input(str(path), None)
    assert sum(t.numel for t in nested.tensors) == sum(t.numel for t in model_input("gemma-3-4b", None).tensors)


def _fake_hub(monkeypatch, tmp_path, behaviour):
    """A stand-in huggingface_hub module: tests never touch the network."""
    calls = []
    hub = types.ModuleType("huggingface_hub")
    errors = types.ModuleType("huggingface_hub.errors")

    class RepositoryNotFoundError(Exception):
        pass

    class EntryNotFoundError(Exception):
        pass

    errors.RepositoryNotFoundError = RepositoryNotFoundError
    errors.EntryNotFoundError = EntryNotFoundError

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return behaviour(repo_id, filename, errors)

    hub.hf_hub_download = hf_hub_download
    hub.errors = errors
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", errors)
    return calls


def test_hub_id_fetches_config_only(monkeypatch, tmp_path):
    raw = json.loads((PRESETS_MODELS / "qwen2.5-0.5b.json").read_text())
    local = tmp_path / "config.json"
    local.write_text(json.dumps(raw))
    calls = _fake_hub(monkeypatch, tmp_path, lambda repo, filename, errors: str(local))
    model = model_input("someorg/some-finetune", None)
    assert calls == [("someorg/some-finetune", "config.json", {"etag_timeout": 10})]
    assert model.source == "someorg/some-finetune config.json (hub)"
    assert sum(t.numel for t in model.tensors) == sum(t.numel for t in model_input("qwen2.5-0.5b", None).tensors)


def test_hub_offline_is_one_clear_error(monkeypatch, tmp_path):
    def offline(repo, filename, errors):
        raise OSError("We couldn't connect to the hub (offline mode)")

    _fake_hub(monkeypatch, tmp_path, offline)
    with pytest.raises(ModelNotFoundError, match="offline.*preset"):
        model_input("someorg/some-finetune", None)


def test_hub_missing_repo(monkeypatch, tmp_path):
    def missing(repo, filename, errors):
        raise errors.RepositoryNotFoundError(repo)

    _fake_hub(monkeypatch, tmp_path, missing)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        model_input("nobody/nothing", None)


def test_alias_wins_over_hub(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path, lambda *a: pytest.fail("the hub must not be asked"))
    assert model_input("meta-llama/Meta-Llama-3-8B", None).name == "llama-3-8b"
    assert calls == []


def test_config_without_model_type(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 8}')
    with pytest.raises(ConfigError, match="model_type"):
        resolve_model(str(path))


def test_nested_and_fallback_configs_say_what_was_counted(tmp_path):
    text = {k: v for k, v in load_model_preset("gemma-3-4b").items() if not k.startswith("_")}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                "text_config": text}))
    from memcalc.api import run
    from memcalc.spec import TrainingSpec

    report = run(model_input(str(path), None), TrainingSpec())
    assert any("text_config" in note for note in report.notes)
