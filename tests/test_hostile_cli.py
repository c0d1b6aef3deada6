"""Hostile settings and config fields through the CLI (issue 11, "Hostile input"): none may crash, hang, accept
nonsense with exit 0, or print more than one line.

A hand-written matrix, each case with its documented exit code (memcalc/errors.py: 2 usage, 4 invalid config,
5 model type not supported, 8 output not written) and words its one stderr line must hold. Hostile *files*
(FIFOs, /dev/zero, non-UTF-8, nesting, unreadable folders, odd names, hub ids, --gpu names with newlines, ANSI
escapes or 300 characters) are tests/test_hostile_files.py's; this file takes numbers, config fields, class names,
the other options' text, --verify on many ranks, and stdout that is full, closed or goes away. Every case runs
under a SIGALRM guard, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import has_module
from tests.test_hostile_files import assert_one_line_error, no_hang

EXIT_USAGE, EXIT_CONFIG, EXIT_UNSUPPORTED, EXIT_OUTPUT = 2, 4, 5, 8  # memcalc/errors.py
GUARD_SECONDS = 5  # a case answers in milliseconds (transformers' first import takes a few seconds)
# A hang guard, not a timing test: a huge dimension is refused at once, never computed layer by layer (a
# regression to per-layer work on 10**9 layers would not finish at all).
BOUNDED_SECONDS = 10
TRANSFORMERS_SECONDS = 60  # cases that import torch and transformers (the meta-device fallback)
VERIFY_SECONDS = 300  # --verify on 32 fake ranks builds and traces a (tiny) model per rank

# Tiny configs of three families (the sizes of tests/test_inventory_exact.py).
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 128, "n_embd": 32, "n_layer": 2,
        "n_head": 2, "n_positions": 16}
QWEN2_MOE = {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 128,
             "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2, "moe_intermediate_size": 32, "num_experts": 3, "num_experts_per_tok": 2}
FAMILIES = {"llama": LLAMA, "gpt2": GPT2, "qwen2_moe": QWEN2_MOE}
_ABSENT = object()


def write_config(tmp_path, family: str, **fields) -> str:
    """A tiny config.json of ``family`` with ``fields`` changed (a field set to _ABSENT is removed)."""
    raw = {**FAMILIES[family], **fields}
    raw = {key: value for key, value in raw.items() if value is not _ABSENT}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


def run_guarded(cli, *args: str, seconds: float = GUARD_SECONDS):
    with no_hang(seconds):
        return cli(*args)


# -- the tiny configs themselves are good ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_config_is_a_good_config(cli, tmp_path, family):
    result = run_guarded(cli, write_config(tmp_path, family), "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["per_gpu"]["peak_bytes"] > 0


# -- config fields: every dimension bounded and typed --------------------------------------------------------------

CONFIG_CASES = {
    # name: (family, changed fields, words of the message)
    "hidden-size-0": ("llama", {"hidden_size": 0}, ("'hidden_size'", "got 0")),
    "hidden-size-1e30": ("llama", {"hidden_size": 10**30}, ("'hidden_size'", "whole number from 1")),
    "hidden-size-abc": ("llama", {"hidden_size": "abc"}, ("'hidden_size'", "got 'abc'")),
    "hidden-size-fraction": ("llama", {"hidden_size": 64.5}, ("'hidden_size'", "64.5")),
    "hidden-size-true": ("llama", {"hidden_size": True}, ("'hidden_size'", "True")),
    "hidden-size-negative": ("llama", {"hidden_size": -64}, ("'hidden_size'", "-64")),
    "hidden-size-null": ("llama", {"hidden_size": None}, ("'hidden_size'", "None")),
    "layers-1e9": ("llama", {"num_hidden_layers": 10**9}, ("'num_hidden_layers'", "1000000000")),
    "layers-1e6": ("llama", {"num_hidden_layers": 10**6}, ("'num_hidden_layers'", "1000000")),
    "layers-list": ("llama", {"num_hidden_layers": [2]}, ("'num_hidden_layers'",)),
    "kv-heads-larger": ("llama", {"num_key_value_heads": 8}, ("'num_key_value_heads' (8)", "must divide")),
    "kv-heads-not-dividing": ("llama", {"num_key_value_heads": 3}, ("'num_key_value_heads' (3)", "must divide")),
    "kv-heads-0": ("llama", {"num_key_value_heads": 0}, ("'num_key_value_heads'",)),
    "head-dim-0": ("llama", {"head_dim": 0}, ("head_dim is 0",)),
    "head-dim-huge": ("llama", {"head_dim": 10**9}, ("'head_dim'",)),
    "heads-0": ("llama", {"num_attention_heads": 0}, ("'num_attention_heads'", "got 0")),  # ZeroDivisionError once
    "heads-more-than-hidden": ("llama", {"num_attention_heads": 128, "num_key_value_heads": _ABSENT},
                               ("head_dim is 0",)),
    "vocab-0": ("llama", {"vocab_size": 0}, ("'vocab_size'",)),
    "intermediate-negative": ("llama", {"intermediate_size": -1}, ("'intermediate_size'",)),
    "dropout-2": ("llama", {"attention_dropout": 2.0}, ("'attention_dropout'", "probability")),
    "tie-word-embeddings-text": ("llama", {"tie_word_embeddings": "yes"}, ("'tie_word_embeddings'",)),
    "model-type-number": ("llama", {"model_type": 5}, ("model_type",)),
    "mlp-only-layers-5": ("qwen2_moe", {"mlp_only_layers": 5}, ("'mlp_only_layers'", "got 5")),
    "mlp-only-layers-text": ("qwen2_moe", {"mlp_only_layers": ["a"]}, ("'mlp_only_layers'",)),
    "mlp-only-layers-out-of-range": ("qwen2_moe", {"mlp_only_layers": [10**9]}, ("'mlp_only_layers'",)),
    "experts-1e9": ("qwen2_moe", {"num_experts": 10**9}, ("'num_experts'",)),
    "n-embd-abc": ("gpt2", {"n_embd": "abc"}, ("'n_embd'", "got 'abc'")),
    "n-layer-1e9": ("gpt2", {"n_layer": 10**9}, ("'n_layer'",)),
    "n-head-0": ("gpt2", {"n_head": 0}, ("'n_head'",)),
    "n-positions-0": ("gpt2", {"n_positions": 0}, ("'n_positions'",)),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_config_field(cli, tmp_path, case):
    family, fields, parts = CONFIG_CASES[case]
    result = run_guarded(cli, write_config(tmp_path, family, **fields), seconds=BOUNDED_SECONDS)
    assert_one_line_error(result, EXIT_CONFIG, *parts)


# -- architectures[0] chooses a class, never code -------------------------------------------------------------------

NOT_MODEL_CLASSES = ["GPT2LMHeadModel", "set_seed", "Trainer", "os.system", "TrainingArguments", "LlamaConfig",
                     "AutoModelForCausalLM", "__import__", "Llama\nForCausalLM"]


@pytest.fixture
def recorded_calls(monkeypatch):
    """transformers.set_seed, transformers.Trainer and os.system replaced by recorders (transformers only when it is
    installed). Set in the module's namespace: transformers is a lazy module, and asking it for the real Trainer
    would import the whole trainer stack."""
    calls: list[str] = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"memcalc called {name}")
        return record

    monkeypatch.setattr(os, "system", recorder("os.system"))
    if has_module("transformers"):
        import transformers

        for name in ("set_seed", "Trainer", "TrainingArguments"):
            monkeypatch.setitem(vars(transformers), name, recorder(f"transformers.{name}"))
    return calls


@pytest.mark.parametrize("name", NOT_MODEL_CLASSES)
def test_architecture_that_is_not_a_model_class_of_the_type(cli, tmp_path, recorded_calls, name):
    """A llama config naming another family's class, a function or a dotted path: with torch and transformers
    installed a config error (and nothing called); without them the meta-device fallback is unavailable (5)."""
    expected = EXIT_CONFIG if has_module("torch") and has_module("transformers") else EXIT_UNSUPPORTED
    result = run_guarded(cli, write_config(tmp_path, "llama", architectures=[name]), seconds=TRANSFORMERS_SECONDS)
    line = assert_one_line_error(result, expected)
    if expected == EXIT_CONFIG:
        assert "is not a transformers model class of model_type 'llama'" in line, line
    assert recorded_calls == []


# -- options: numbers, empty strings, unknown words ---------------------------------------------------------------

OPTION_CASES = {
    # name: (arguments, exit code, words of the message)
    "params-rounds-to-0": (("--params", "0.4"), EXIT_USAGE, ("--params '0.4'", "rounds to 0")),
    "params-tiny-exponent": (("--params", "1e-9"), EXIT_USAGE, ("rounds to 0",)),
    "params-0": (("--params", "0"), EXIT_USAGE, ("--params", "positive")),
    "params-1e20": (("--params", "1e20"), EXIT_USAGE, ("--params '1e20'", "larger than")),
    "params-nan": (("--params", "nan"), EXIT_USAGE, ("--params",)),
    "params-inf": (("--params", "inf"), EXIT_USAGE, ("--params",)),
    "params-empty": (("--params", ""), EXIT_USAGE, ("--params is empty",)),
    "gpu-memory-rounds-to-0": (("gpt2", "--gpu-memory", "0.4"), EXIT_USAGE, ("--gpu-memory", "rounds to 0")),
    "cuda-context-rounds-to-0": (("gpt2", "--gpu", "h100", "--cuda-context", "0.4"), EXIT_USAGE,
                                 ("--cuda-context", "rounds to 0")),
    "gpu-memory-1e30": (("gpt2", "--gpu-memory", "1e30"), EXIT_USAGE, ("--gpu-memory", "larger than")),
    "context-fills-the-gpu": (("gpt2", "--gpu", "h100", "--cuda-context", "100GB"), EXIT_USAGE,
                              ("no usable memory",)),
    "reserve-fraction-nan": (("gpt2", "--gpu", "h100", "--reserve-fraction", "nan"), EXIT_USAGE,
                             ("--reserve-fraction", "got nan")),
    "reserve-fraction-inf": (("gpt2", "--gpu", "h100", "--reserve-fraction", "inf"), EXIT_USAGE,
                             ("--reserve-fraction", "got inf")),
    "reserve-fraction-minus-inf": (("gpt2", "--gpu", "h100", "--reserve-fraction=-inf"), EXIT_USAGE,
                                   ("--reserve-fraction",)),
    "reserve-fraction-negative": (("gpt2", "--gpu", "h100", "--reserve-fraction", "-1"), EXIT_USAGE,
                                  ("--reserve-fraction", "0 to 0.9")),
    "reserve-fraction-1": (("gpt2", "--gpu", "h100", "--reserve-fraction", "1"), EXIT_USAGE,
                           ("--reserve-fraction", "0 to 0.9")),
    "reserve-fraction-nan-without-gpu": (("gpt2", "--reserve-fraction", "nan"), EXIT_USAGE, ("--reserve-fraction",)),
    "cuda-context-not-a-size-without-gpu": (("gpt2", "--cuda-context", "abc"), EXIT_USAGE, ("--cuda-context",)),
    "gpu-empty": (("gpt2", "--gpu", ""), EXIT_USAGE, ("--gpu is empty",)),
    "gpu-blank": (("gpt2", "--gpu", "  "), EXIT_USAGE, ("--gpu is empty",)),
    "gpu-memory-empty": (("gpt2", "--gpu-memory", ""), EXIT_USAGE, ("--gpu-memory is empty",)),
    "cuda-context-empty": (("gpt2", "--cuda-context", ""), EXIT_USAGE, ("--cuda-context is empty",)),
    "deepspeed-empty": (("gpt2", "--deepspeed", ""), EXIT_USAGE, ("--deepspeed is empty",)),
    "plot-empty": (("gpt2", "--plot", ""), EXIT_USAGE, ("--plot", "file name")),
    "zero-5": (("gpt2", "--zero", "5"), EXIT_USAGE, ("--zero '5'", "0, 1, 2 or 3")),
    "zero-x": (("gpt2", "--zero", "x"), EXIT_USAGE, ("--zero 'x'",)),
    "zero-empty": (("gpt2", "--zero", ""), EXIT_USAGE, ("--zero",)),
    "zero-list-with-5": (("gpt2", "--zero", "0,1,5"), EXIT_USAGE, ("--zero '0,1,5'",)),
    "units-unknown": (("gpt2", "--units", "furlongs"), EXIT_USAGE, ("--units 'furlongs'", "gib, gb, mib, mb")),
    "units-empty": (("gpt2", "--units", ""), EXIT_USAGE, ("--units ''",)),
    "batch-size-0": (("gpt2", "--batch-size", "0"), EXIT_USAGE, ("--batch-size",)),
    "batch-size-huge": (("llama-3-8b", "--batch-size", "1000000000"), EXIT_USAGE, ("--batch-size",)),
    "seq-len-past-learned-positions": (("gpt2", "--seq-len", "100000000"), EXIT_USAGE, ("--seq-len", "1,024")),
    "gpus-1e9": (("gpt2", "--gpus", "1000000000"), EXIT_USAGE, ("--gpus",)),
    "gpus-1e30": (("gpt2", "--gpus", str(10**30)), EXIT_USAGE, ("--gpus",)),
    "nodes-times-gpus-per-node-1e9": (("gpt2", "--nodes", "1000000000", "--gpus-per-node", "3"), EXIT_USAGE,
                                      ("--gpus",)),
    "lora-rank-huge": (("gpt2", "--lora-rank", "1000000000"), EXIT_USAGE, ("--lora-rank",)),
    "grad-accum-huge": (("gpt2", "--grad-accum", str(10**12)), EXIT_USAGE, ("--grad-accum",)),
    "adafactor-beta1-nan": (("gpt2", "--optim", "adafactor", "--adafactor-beta1", "nan"), EXIT_USAGE,
                            ("--adafactor-beta1",)),
    "precision-unknown": (("gpt2", "--precision", "fp8"), EXIT_USAGE, ("--precision",)),
    "unknown-option": (("gpt2", "--no-such-option"), EXIT_USAGE, ("--no-such-option",)),
    "emit-unknown": (("gpt2", "--emit", "megatron"), EXIT_USAGE, ("--emit 'megatron'",)),
    "compare-with-unknown": (("gpt2", "--compare-with", "megatron"), EXIT_USAGE, ("megatron",)),
    "emit-with-several-stages": (("gpt2", "--zero", "1,2", "--gpus", "2", "--emit", "deepspeed"), EXIT_USAGE,
                                 ("--emit takes one run", "--zero 1,2")),
    "compare-with-several-stages": (("gpt2", "--zero", "1,2", "--gpus", "2", "--compare-with", "deepspeed"),
                                    EXIT_USAGE, ("--compare-with takes one run",)),
    "plot-with-several-stages": (("gpt2", "--zero", "1,2", "--gpus", "2", "--plot", "x.svg"), EXIT_USAGE,
                                 ("--plot takes one run",)),
    "emit-and-compare-with": (("gpt2", "--zero", "2", "--emit", "deepspeed", "--compare-with", "deepspeed"),
                              EXIT_USAGE, ("one at a time",)),
    "verify-with-emit": (("gpt2", "--verify", "--emit", "deepspeed"), EXIT_USAGE, ("--emit prints no measurement",)),
    "verify-with-compare-with": (("gpt2", "--verify", "--compare-with", "accelerate"), EXIT_USAGE,
                                 ("--compare-with prints no measurement",)),
    "plot-bad-suffix-before-any-work": (("gpt2", "--verify", "--plot", "x.txt"), EXIT_USAGE, (".svg, .png or .html",)),
    "freeze-unknown": (("gpt2", "--freeze", "everything"), EXIT_USAGE, ("--freeze 'everything'",)),
    "lora-targets-nothing": (("gpt2", "--lora-rank", "8", "--lora-targets", "nonexistent"), EXIT_USAGE,
                             ("--lora-targets", "matches no Linear")),
    "deepspeed-missing": (("gpt2", "--deepspeed", "./no-such-ds.json"), EXIT_CONFIG, ("not found",)),
    # User text echoed into the message: escaped, so the error stays one line and sends no escape to the terminal.
    "gpu-memory-newline": (("gpt2", "--gpu-memory", "8\n0GiB"), EXIT_USAGE, ("'8\\n0GiB'",)),
    "gpu-memory-300": (("gpt2", "--gpu-memory", "9" * 300), EXIT_USAGE, ("--gpu-memory",)),
    "cuda-context-ansi": (("gpt2", "--gpu", "h100", "--cuda-context", "\x1b[31m1GiB"), EXIT_USAGE,
                          ("\\x1b[31m1GiB",)),
    "zero-ansi": (("gpt2", "--zero", "\x1b[31m1"), EXIT_USAGE, ("\\x1b[31m1",)),
    "units-newline": (("gpt2", "--units", "gib\nfake line"), EXIT_USAGE, ("gib\\nfake line",)),
    "params-ansi": (("--params", "\x1b[31m7B"), EXIT_USAGE, ("'\\x1b[31m7B'",)),
    "freeze-escape": (("gpt2", "--freeze", "mlp\x1b[2J"), EXIT_USAGE, ("mlp\\x1b[2J",)),
    "emit-newline": (("gpt2", "--emit", "deep\nspeed"), EXIT_USAGE, ("deep\\nspeed",)),
    "compare-with-osc": (("gpt2", "--compare-with", "\x1b]0;title\x07"), EXIT_USAGE, ("\\x1b]0;title\\x07",)),
    "lora-targets-newline": (("gpt2", "--lora-rank", "8", "--lora-targets", "q\nproj"), EXIT_USAGE, ("q\\nproj",)),
    "deepspeed-path-newline": (("gpt2", "--deepspeed", "./no\nsuch.json"), EXIT_CONFIG,
                               ("no\\nsuch.json", "not found")),
    "deepspeed-path-300": (("gpt2", "--deepspeed", "d" * 300 + ".json"), EXIT_CONFIG, ("(305 characters)",)),
    "precision-newline": (("gpt2", "--precision", "bf\n16"), EXIT_USAGE, ("--precision",)),
    # (--gpu with a newline, an ANSI escape or 300 characters, each alone: tests/test_hostile_files.py)
    "gpu-300-with-escapes": (("gpt2", "--gpu", "\x1b[31m" + "a\nb" * 100), EXIT_USAGE,
                             ("unknown GPU", "\\x1b[31ma\\nb", "(305 characters)")),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_hostile_option(cli, case):
    args, exit_code, parts = OPTION_CASES[case]
    result = run_guarded(cli, *args)
    assert_one_line_error(result, exit_code, *parts)


# -- --verify on many ranks of a tiny model --------------------------------------------------------------------------

def test_verify_trace_on_more_ranks_than_parameters(cli, tmp_path):
    """--verify=trace --zero 1 --sharding torch --gpus 32 on a 2-layer llama (21 parameter tensors): a measured
    answer or a one-line refusal, never an internal error."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = write_config(tmp_path, "llama")
    result = run_guarded(cli, config, "--verify=trace", "--zero", "1", "--sharding", "torch", "--gpus", "32",
                         seconds=VERIFY_SECONDS)
    assert "Traceback" not in result.stderr
    if result.exit_code == 0:
        assert result.stdout
        return
    assert_one_line_error(result, result.exit_code)
    assert result.exit_code in (EXIT_USAGE, EXIT_CONFIG), result.stderr


# -- stdout full, gone, or closed ------------------------------------------------------------------------------------

def memcalc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "memcalc", *args]


def subprocess_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MEMCALC_DEBUG"}
    return {**env, "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}


def assert_one_stderr_line(stderr: str, *parts: str) -> None:
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), repr(stderr)
    assert stderr.startswith("memcalc: ") and stderr[:-1].isprintable(), repr(stderr)
    assert "Traceback" not in stderr
    for part in parts:
        assert part in stderr, stderr


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this platform")


@needs_dev_full
@pytest.mark.parametrize("output", ["table", "json"])
def test_stdout_on_dev_full_is_exit_8(output):
    args = ("llama-3-8b", "--json") if output == "json" else ("llama-3-8b",)
    with open("/dev/full", "w") as full:
        done = subprocess.run(memcalc_command(*args), stdout=full, stderr=subprocess.PIPE, text=True, check=False,
                              env=subprocess_env(), timeout=60)
    assert done.returncode == EXIT_OUTPUT, done.stderr
    assert_one_stderr_line(done.stderr, "cannot write the output")


def test_piped_into_head_ends_quietly():
    """memcalc llama-3-8b | head -1: exit 0 and nothing on stderr, as Unix tools do (pipefail: memcalc's status)."""
    if not os.path.exists("/bin/bash") or not os.path.exists("/usr/bin/head") and not os.path.exists("/bin/head"):
        pytest.skip("needs bash and head")
    line = " ".join(f"'{arg}'" for arg in memcalc_command("llama-3-8b")) + " | head -1"
    done = subprocess.run(["/bin/bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, check=False,
                          env=subprocess_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count("\n") == 1 and "llama-3-8b" in done.stdout


@pytest.mark.parametrize("output", ["table", "json"])
def test_reader_gone_before_the_output_ends_quietly(output):
    """The reader closes the pipe before memcalc writes (the output is smaller than a pipe buffer, so `| head -1`
    alone may never make a write fail): exit 0, no stderr."""
    args = ("llama-3-8b", "--json") if output == "json" else ("llama-3-8b",)
    process = subprocess.Popen(memcalc_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=subprocess_env())
    process.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stderr == b""


class BrokenPipe(io.TextIOBase):
    """A stdout whose reader went away: every write and flush fails with EPIPE, as a real pipe does."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


@pytest.mark.parametrize("args", [("llama-3-8b",), ("llama-3-8b", "--json"), ("llama-3-8b", "--emit", "deepspeed")],
                         ids=["table", "json", "emit"])
def test_reader_gone_in_process(monkeypatch, args):
    """The same, in-process: main() returns 0 (it neither raises SystemExit nor says anything)."""
    from memcalc.cli import main

    monkeypatch.delenv("MEMCALC_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stdout", BrokenPipe())
    stderr = io.StringIO()
    with no_hang(), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # what typer does with an EPIPE: a bug, reported as such
            code = f"SystemExit({exit_.code})"
    assert code == 0
    assert [line for line in stderr.getvalue().splitlines() if not line.startswith("memcalc: DeepSpeed config")] == []


@pytest.mark.parametrize("output", ["table", "json"])
def test_closed_stdout_is_exit_8(output):
    """memcalc ... >&- : nothing can be written, so exit 8 with one line, as for /dev/full."""
    args = ("llama-3-8b", "--json") if output == "json" else ("llama-3-8b",)
    done = subprocess.run(memcalc_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False, env=subprocess_env(), timeout=60, preexec_fn=lambda: os.close(1))
    assert done.returncode == EXIT_OUTPUT, done.stderr
    assert_one_stderr_line(done.stderr, "cannot write the output")
