"""Hostile MODEL arguments, through the CLI entry point in-process: none may hang, crash or print more than one line.

Each case asserts the documented exit code (memcalc/errors.py: 2 usage, 3 model not found, 4 unreadable or
invalid config), an empty stdout, exactly one stderr line starting "memcalc: ", no traceback and no control
character. A SIGALRM guard turns a regression that blocks (a FIFO opened for reading) or reads forever
(/dev/zero) into a failure instead of a stuck suite.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PRESETS_MODELS

EXIT_USAGE, EXIT_MODEL_NOT_FOUND, EXIT_CONFIG = 2, 3, 4  # memcalc/errors.py
GUARD_SECONDS = 5  # a hostile case answers in milliseconds; 5 s only catches a hang
HUB_SECONDS = 10  # issue 11: a hub id without network must fail within 10 s
GPT2 = (PRESETS_MODELS / "gpt2.json").read_text()


class Hung(BaseException):  # a BaseException: the CLI's catch-all for Exception must not swallow it
    pass


@contextlib.contextmanager
def no_hang(seconds: float = GUARD_SECONDS):
    """Fail the test if the block runs longer than ``seconds`` (SIGALRM interrupts a blocking open or read)."""
    if not hasattr(signal, "SIGALRM"):  # no alarm on this platform: run unguarded
        yield
        return

    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s: memcalc hangs on this input")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_error(result, exit_code: int, *parts: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, repr(result.stderr)
    line = result.stderr[:-1]
    assert line.startswith("memcalc: "), line
    assert line.isprintable(), f"control or other non-printable character in {line!r}"
    for part in parts:
        assert part in line, line
    return line


def run_guarded(cli, *args: str, seconds: float = GUARD_SECONDS):
    with no_hang(seconds):
        return cli(*args)


# --- files that are not config files -------------------------------------------------------------------------------

def _fifo(path: pathlib.Path) -> pathlib.Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(path)
    return path


def _folder_with(tmp_path: pathlib.Path, make) -> pathlib.Path:
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder / "config.json")
    return folder


FILE_CASES = {
    # name: (build(tmp_path) -> MODEL argument, words the message must hold)
    "fifo-as-config": (lambda t: _fifo(t / "config.json"), ("not a regular file",)),
    "fifo-inside-folder": (lambda t: _folder_with(t, _fifo), ("config.json is not a regular file",)),
    "fifo-with-newline-in-name": (lambda t: _fifo(t / "con\nfig.json"), ("con\\nfig.json", "not a regular file")),
    "non-utf8": (lambda t: _write(t / "config.json", b"\xff\xfe{\"model_type\": \"gpt2\"}"), ("not UTF-8",)),
    "deeply-nested-array": (lambda t: _write(t / "config.json", b"[" * 200_000 + b"]" * 200_000),
                            ("nested too deeply",)),
    "deeply-nested-object": (lambda t: _write(t / "config.json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
                             ("nested too deeply",)),
    "deep-inside-folder": (lambda t: _folder_with(t, lambda p: _write(p, b"[" * 200_000)), ("nested too deeply",)),
    "larger-than-cap": (lambda t: _sparse(t / "config.json", 17 * 2**20), ("too large",)),
    "not-json": (lambda t: _write(t / "config.json", b"model_type: gpt2\n"), ("not valid JSON",)),
    "json-array": (lambda t: _write(t / "config.json", b"[1, 2]"), ("must hold a JSON object",)),
    "empty-file": (lambda t: _write(t / "config.json", b""), ("not valid JSON",)),
    "no-model-type": (lambda t: _write(t / "config.json", b'{"hidden_size": 8}'), ("has no 'model_type'",)),
    "folder-without-config": (lambda t: _folder_with(t, lambda p: None), ("has no config.json",)),
    "config-json-is-a-folder": (lambda t: _folder_with(t, lambda p: p.mkdir()), ("is a folder",)),
}


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def _sparse(path: pathlib.Path, size: int) -> pathlib.Path:
    with open(path, "wb") as file:  # a hole, not 17 MiB of disk
        file.truncate(size)
    return path


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_hostile_file(cli, tmp_path, case):
    build, parts = FILE_CASES[case]
    target = build(tmp_path)
    result = run_guarded(cli, str(target))
    assert_one_line_error(result, EXIT_CONFIG, *parts)


def test_dev_zero_is_refused_not_read(cli):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this platform")
    result = run_guarded(cli, "/dev/zero")
    assert_one_line_error(result, EXIT_CONFIG, "/dev/zero", "not a regular file")


# --- permissions: chmod 000 does not bite root, so each case also runs with the refusal simulated ---------------------

root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                          reason="root reads files whatever their mode; the simulated twin covers it")


@root
def test_unreadable_config_file(cli, tmp_path):
    config = _write(tmp_path / "config.json", GPT2.encode())
    config.chmod(0)
    try:
        result = run_guarded(cli, str(config))
    finally:
        config.chmod(0o600)
    assert_one_line_error(result, EXIT_CONFIG, "cannot read", "ermission denied")


@root
@pytest.mark.parametrize("given", ["folder", "config"])
def test_unreadable_folder(cli, tmp_path, given):
    folder = _folder_with(tmp_path, lambda p: p.write_text(GPT2))
    folder.chmod(0)
    try:
        result = run_guarded(cli, str(folder if given == "folder" else folder / "config.json"))
    finally:
        folder.chmod(0o700)
    assert_one_line_error(result, EXIT_CONFIG, "cannot read", "ermission denied")


def test_unreadable_config_file_simulated(cli, tmp_path, monkeypatch):
    import memcalc.datafile

    config = _write(tmp_path / "config.json", GPT2.encode())
    real_open = os.open

    def denied(path, *args, **kwargs):
        if os.fspath(path) == str(config):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(memcalc.datafile.os, "open", denied)
    result = run_guarded(cli, str(config))
    assert_one_line_error(result, EXIT_CONFIG, "cannot read", "ermission denied")


@pytest.mark.parametrize("given", ["folder", "config"])
def test_unreadable_folder_simulated(cli, tmp_path, monkeypatch, given):
    """A folder without search permission: every stat below it fails with EACCES."""
    folder = _folder_with(tmp_path, lambda p: p.write_text(GPT2))
    real_stat = pathlib.Path.stat

    def denied(self, *args, **kwargs):
        if self.parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", denied)
    result = run_guarded(cli, str(folder if given == "folder" else folder / "config.json"))
    assert_one_line_error(result, EXIT_CONFIG, "cannot read", "ermission denied")


# --- names and paths that do not resolve ----------------------------------------------------------------------------

NAME_CASES = {
    "unknown-user": ("~nosuchuser-memcalc/config.json", ("no such user",)),
    "300-characters": ("a" * 300, ("unknown model", "(300 characters)")),
    "300-character-path": ("/" + "a" * 300 + ".json", ("no such file or folder", "characters)")),
    "300-character-folder": ("./" + "b" * 300, ("no such file or folder",)),
    "newline": ("llama\n-3-8b", ("unknown model 'llama\\n-3-8b'",)),
    "ansi-escape": ("\x1b[31mred\x1b[0m", ("'\\x1b[31mred\\x1b[0m'",)),
    "ansi-clear-screen": ("\x1b[2J\x1b[H", ("\\x1b[2J",)),
    "carriage-return": ("gpt2\rfake output", ("gpt2\\rfake output",)),
    "newline-in-path": ("./no\nsuch.json", ("./no\\nsuch.json",)),
    "newline-in-hub-id": ("org/mo\ndel", ("org/mo\\ndel",)),
    "undecodable-argv-byte": ("model-\udcff", ("model-\\udcff",)),
    "bidi-override": ("gpt\u202e2", ("gpt\\u202e2",)),
    "nul-character": ("gpt\x002.json", ("gpt\\x002.json",)),
    "empty": ("", ("MODEL argument is empty",)),
    "blank": ("   ", ("MODEL argument is empty",)),
    "three-part-name": ("a/b/c", ("no such file or folder",)),
    "missing-file": ("./missing-config.json", ("no such file or folder",)),
}


@pytest.mark.parametrize("case", sorted(NAME_CASES))
def test_hostile_name(cli, case):
    typed, parts = NAME_CASES[case]
    result = run_guarded(cli, typed)
    assert_one_line_error(result, EXIT_MODEL_NOT_FOUND, *parts)


def test_symlink_loop(cli, tmp_path):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    result = run_guarded(cli, str(loop))
    line = assert_one_line_error(result, result.exit_code)
    assert result.exit_code in (EXIT_MODEL_NOT_FOUND, EXIT_CONFIG), line


# --- GPU names (presets.find_gpu) -----------------------------------------------------------------------------------

# An empty --gpu never reaches find_gpu (memcalc/cli.py tests `if o["gpu"]`); find_gpu("") itself is covered
# in test_gpu_presets.py.
@pytest.mark.parametrize("typed, part", [("h1\n00", "'h1\\n00'"),
                                         ("\x1b[1ma100", "'\\x1b[1ma100'"), ("x" * 300, "(300 characters)")])
def test_hostile_gpu_name(cli, typed, part):
    result = run_guarded(cli, "gpt2", "--gpu", typed)
    assert_one_line_error(result, EXIT_USAGE, part)


# --- hub ids with no network: fast, one line, the cause named --------------------------------------------------------

@pytest.fixture
def no_network_hub(monkeypatch, tmp_path):
    """huggingface_hub aimed at a closed local port, with an empty cache and no token. It reads HF_* variables
    once at import (constants.py), so its constants are patched as well as the environment."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens, so the connection is refused
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in (("HF_ENDPOINT", endpoint), ("HF_HOME", tmp_path / "hf-home"), ("HF_HUB_CACHE", cache)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    patched = {"ENDPOINT": endpoint,
               "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
               "HF_HUB_DISABLE_TELEMETRY": True, "AGENT_HARNESSES_PATH": str(tmp_path / "hf-home" / "agents.json")}
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    return constants


def test_hub_id_without_network(cli, no_network_hub):
    start = time.monotonic()
    result = run_guarded(cli, "someorg/some-model", seconds=HUB_SECONDS + 5)
    assert time.monotonic() - start < HUB_SECONDS
    assert_one_line_error(result, EXIT_MODEL_NOT_FOUND, "cannot reach the Hugging Face Hub", "connection refused")


def test_hub_id_offline(cli, no_network_hub, monkeypatch):
    monkeypatch.setattr(no_network_hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_guarded(cli, "someorg/some-model")
    assert_one_line_error(result, EXIT_MODEL_NOT_FOUND, "offline mode is on", "not in the local Hugging Face cache")


def test_hub_id_without_network_in_a_fresh_process(tmp_path):
    """The real thing: environment variables read at import, huggingface_hub's own stderr (its retry logs at
    HF_HUB_VERBOSITY=info) included, timed end to end."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_VERBOSITY": "info", "NO_PROXY": "127.0.0.1"}
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "memcalc", "someorg/some-model"], capture_output=True, text=True,
                          check=False, env=env, timeout=60, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert elapsed < HUB_SECONDS, f"{elapsed:.1f} s"
    assert done.returncode == EXIT_MODEL_NOT_FOUND, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("memcalc: "), done.stderr
    assert "connection refused" in done.stderr


def test_a_good_config_still_works_after_the_hostile_ones(cli, tmp_path):
    config = _write(tmp_path / "config.json", GPT2.encode())
    result = run_guarded(cli, str(config), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"]["num_params"] == 124_439_808
