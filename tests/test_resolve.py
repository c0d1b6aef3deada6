"""MODEL resolution: presets and aliases, paths, folders, nested configs, hub ids (download faked)."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
import types

import pytest

from memcalc import resolve
from memcalc.api import model_input
from memcalc.catalog import find_model_preset, load_model_preset, model_preset_files
from memcalc.errors import ConfigError, ModelNotFoundError
from memcalc.resolve import resolve_model
from tests.conftest import PRESETS_MODELS

PRESET_NAMES = sorted(model_preset_files())

REQUIRED = [
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b",
    "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "mixtral-8x7b", "mixtral-8x22b",
    "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "qwen3-8b", "gemma-2b", "gemma-7b", "gemma-2-9b", "gemma-2-27b",
    "gemma-3-4b", "phi-3-mini", "phi-4", "deepseek-v2-lite", "gpt2", "gpt2-xl", "bert-base", "bert-large",
    "t5-base", "t5-3b", "falcon-7b", "opt-1.3b", "bloom-560m",
    # what people fine-tune now (issue 12): the configs with no hand rules go through the meta-device build
    "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b",
    "gemma-3-1b", "gemma-3-12b", "gemma-3-27b", "gpt-oss-20b", "gpt-oss-120b", "deepseek-v3", "olmo-2-7b",
    "olmo-2-13b", "mistral-small-24b", "phi-4-mini", "smollm3-3b", "granite-3.3-8b",
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


def _fake_hub(monkeypatch, behaviour):
    """A stand-in huggingface_hub module that records calls (for tests that must not reach the hub at all)."""
    calls = []
    hub = types.ModuleType("huggingface_hub")

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return behaviour(repo_id, filename)

    hub.hf_hub_download = hf_hub_download
    hub.get_hf_file_metadata = lambda *a, **k: behaviour(*a)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    return calls


def test_alias_wins_over_hub(monkeypatch):
    calls = _fake_hub(monkeypatch, lambda *a: pytest.fail("the hub must not be asked"))
    assert model_input("meta-llama/Meta-Llama-3-8B", None).name == "llama-3-8b"
    assert calls == []


# --- hub ids against a local stand-in for the Hugging Face Hub: the real huggingface_hub, never the network --------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
QWEN_CONFIG = (PRESETS_MODELS / "qwen2.5-0.5b.json").read_bytes()


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """Answers HEAD/GET /<org>/<repo>/resolve/main/config.json as the hub does, by the org name:
    ok -> the file; missing -> RepoNotFound; gated -> GatedRepo; noconfig -> EntryNotFound; down -> 503;
    slow -> no answer for longer than the test's timeout."""

    def _answer(self, with_body: bool) -> None:
        org = self.path.strip("/").split("/")[0]
        self.server.requests.append((self.command, self.path))
        if "/resolve/" not in self.path:  # only config.json downloads are served here
            org = "missing"
        if org == "slow":
            time.sleep(3)
        status, headers, body = 200, {"X-Repo-Commit": COMMIT, "ETag": '"cafe0001"'}, QWEN_CONFIG
        if org == "missing":
            status, headers, body = 404, {"X-Error-Code": "RepoNotFound"}, b""
        elif org == "gated":
            status, headers, body = 401, {"X-Error-Code": "GatedRepo"}, b""
        elif org == "noconfig":
            status, headers, body = 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b""
        elif org == "down":
            status, headers, body = 503, {}, b""
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)
        except OSError:  # the client gave up (the timeout test)
            pass

    def do_HEAD(self):
        self._answer(with_body=False)

    def do_GET(self):
        self._answer(with_body=True)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """huggingface_hub pointed at an empty cache under tmp_path, with no token; returns a function that points it
    at an endpoint. huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE once, at import
    (constants.py), so the constants are patched too, not only the environment."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in (("HF_HOME", tmp_path / "hf-home"), ("HF_HUB_CACHE", cache), ("NO_PROXY", "127.0.0.1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    # Its user-agent telemetry fetches {ENDPOINT}/api/agent-harnesses once and caches it under the HF_HOME of
    # import time: keep both away from the user's files.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / ".agent_harnesses.json"),
                        raising=False)

    def point_at(endpoint: str, offline: bool = False):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return hub

    point_at.cache = cache
    return point_at


@pytest.fixture
def local_hub(hub_env):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.requests = []
    server.daemon_threads = True
    # (shutdown() waits for the serving loop's next poll: every 0.5 s by default, half a second per test)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    hub_env(f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


def _cache_config(cache, repo_id: str) -> None:
    """Put config.json of ``repo_id`` in the hub cache layout (refs/main -> snapshots/<commit>/config.json)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_bytes(QWEN_CONFIG)


def _one_line_error(excinfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.isprintable(), message
    for part in parts:
        assert part in message, message
    return message


def test_hub_id_fetches_config_only(local_hub):
    model = model_input("ok/some-finetune", None)
    assert model.source == "ok/some-finetune config.json (hub)"
    assert sum(t.numel for t in model.tensors) == sum(t.numel for t in model_input("qwen2.5-0.5b", None).tensors)
    assert {path for _, path in local_hub.requests} == {"/ok/some-finetune/resolve/main/config.json"}


def test_hub_missing_repo(local_hub):
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("missing/nothing", None)
    _one_line_error(excinfo, "'missing/nothing' does not exist")


def test_hub_gated_repo_says_gated(local_hub):
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("gated/model", None)
    _one_line_error(excinfo, "is gated", "HF_TOKEN")


def test_hub_repo_without_config(local_hub):
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("noconfig/model", None)
    _one_line_error(excinfo, "has no config.json")


def test_hub_server_error_is_named_and_not_retried(local_hub):
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("down/model", None)
    _one_line_error(excinfo, "HTTP 503")
    assert len(local_hub.requests) == 1  # one probe, no retries with backoff


def test_hub_timeout_is_short_and_named(local_hub, monkeypatch):
    monkeypatch.setattr(resolve, "HUB_TIMEOUT_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("slow/model", None)
    assert time.monotonic() - start < 10
    _one_line_error(excinfo, "no answer within 0.5 s", "not in the local cache")


def test_hub_no_network_fails_fast_and_names_the_cause(hub_env):
    hub_env("http://127.0.0.1:9")  # the discard port: nothing listens, the connection is refused
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("someorg/some-finetune", None)
    assert time.monotonic() - start < 10
    _one_line_error(excinfo, "cannot reach the Hugging Face Hub", "connection refused", "HF_ENDPOINT")


def test_hub_offline_and_not_cached(hub_env):
    hub_env("http://127.0.0.1:9", offline=True)
    with pytest.raises(ModelNotFoundError) as excinfo:
        model_input("someorg/some-finetune", None)
    _one_line_error(excinfo, "offline mode is on (HF_HUB_OFFLINE)", "not in the local Hugging Face cache")


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "no-network"])
def test_hub_cached_config_is_used_without_network(hub_env, offline):
    hub_env("http://127.0.0.1:9", offline=offline)
    _cache_config(hub_env.cache, "someorg/cached-model")
    model = model_input("someorg/cached-model", None)
    assert model.source == "someorg/cached-model config.json (hub)"
    assert sum(t.numel for t in model.tensors) == sum(t.numel for t in model_input("qwen2.5-0.5b", None).tensors)


def test_hub_logging_and_progress_bars_are_restored(local_hub):
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled

    logger = logging.getLogger("huggingface_hub")
    level, bars_off = logger.level, are_progress_bars_disabled()
    with pytest.raises(ModelNotFoundError):
        model_input("down/model", None)
    model_input("ok/model", None)
    assert (logger.level, are_progress_bars_disabled()) == (level, bars_off)


@pytest.mark.parametrize("typed", ["org/na me", "org/x\ny", "a/b/c", "org/..", "-org/x", "org/" + "x" * 97])
def test_text_that_is_not_a_hub_id_never_reaches_the_hub(monkeypatch, typed):
    calls = _fake_hub(monkeypatch, lambda *a: pytest.fail("the hub must not be asked"))
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(typed)
    _one_line_error(excinfo)
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


def test_preset_name_lookup_reads_no_preset_file(monkeypatch):
    """The estimate path stays fast: a preset's own name is found from the folder listing; only an alias
    lookup reads every preset file."""
    from memcalc import catalog as presets

    def no_reading(*args, **kwargs):
        raise AssertionError("a preset file was read to find a preset by its own name")

    presets._model_alias_index.cache_clear()
    monkeypatch.setattr(presets, "read_json_object", no_reading)
    try:
        assert find_model_preset("gpt2") == "gpt2"
        assert find_model_preset("Llama_3_8B") == "llama-3-8b"
        with pytest.raises(AssertionError, match="was read"):
            find_model_preset("llama3-8b")  # an alias: this one needs the index
    finally:
        presets._model_alias_index.cache_clear()


@pytest.mark.parametrize("typed", ["../models/gpt2", "models/../gpt2", "/gpt2", "gpt2/"])
def test_preset_lookup_builds_no_path_from_user_text(typed):
    assert find_model_preset(typed) is None
