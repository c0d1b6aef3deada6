"""One family of errors, each with its documented exit code. The CLI alone turns them into one stderr line.

A message names a setting as ``{name}``, where ``name`` is a keyword of ``memcalc.estimate`` (a field of
``memcalc.request.Request``): ``str(error)`` spells it that way for Python callers, and the CLI spells it as the
flag a shell user types (``{batch_size}`` -> ``--batch-size``), so neither reads the other's vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# The settings a message may name: the keywords of memcalc.estimate (tests/test_api.py checks they are
# Request's fields).
SETTINGS = frozenset({
    "model", "params", "precision", "master_dtype", "grad_dtype", "state_dtype", "optim", "optim_impl", "amsgrad", "activations",
    "optim_in_backward", "checkpoint_reentrant", "activation_offload", "lora_dropout", "qlora_upcast", "qlora_scope", "qlora_double_quant", "qlora_lm_head", "qlora_quantizer", "plan_schedules", "dora", "compile", "repeat_kv", "padded", "fp8", "cpu_ram_efficient_loading",
    "lora_modules_to_save",
    "adafactor_beta1", "optim_rank", "batch_size", "seq_len", "decoder_seq_len", "grad_accum", "checkpointing", "loss", "attn", "zero", "gpus", "nodes",
    "gpus_per_node", "sharding", "engine", "fsdp", "offload", "deepspeed", "from_config", "from_format", "lora_rank", "lora_dtype", "lora_targets", "qlora", "freeze",
    "gpu", "gpu_memory", "cuda_context", "nccl_channels", "reserve_fraction", "reserved", "alloc_conf", "max_batch", "max_seq_len", "verify", "emit",
    "compare_with", "plot", "tp", "sp", "loss_parallel", "pp", "pp_schedule", "microbatches", "pp_layers", "pp_virtual", "cp", "ep", "ep_load", "ep_shard_dim", "dp_replicate", "dp_shard",
    "plan",
})
_NAMED = re.compile(r"\{([a-z][a-z0-9_]*)\}")


def printable(text: str) -> str:
    """Control and other non-printable characters spelled as ``repr`` does (a newline as ``\\n``, an ANSI escape
    as ``\\x1b``, an undecodable argv byte as ``\\udcff``): user text echoed to a terminal stays one harmless line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class MemcalcError(Exception):
    """Base class: the message is one line saying what is wrong and what to do."""

    exit_code = 2

    def render(self, spell: Callable[[str], str] | None = None) -> str:
        """The message with every ``{setting}`` spelled by ``spell`` (default: the keyword itself)."""
        text = str(self.args[0]) if self.args else type(self).__name__

        def name(match: re.Match[str]) -> str:
            setting = match.group(1)
            if setting not in SETTINGS:
                return match.group(0)
            return spell(setting) if spell else setting

        return _NAMED.sub(name, text)

    def __str__(self) -> str:
        return self.render()


class UsageError(MemcalcError):
    """A setting, number or combination of settings is invalid."""

    exit_code = 2


class ModelNotFoundError(MemcalcError):
    """A model name, path or hub id could not be resolved to a config."""

    exit_code = 3


class ConfigError(MemcalcError):
    """A config file exists but cannot be read or lacks what an inventory needs."""

    exit_code = 4


class UnsupportedModelError(MemcalcError):
    """The config's model_type has no pure-Python inventory and the fallback cannot run."""

    exit_code = 5


# 6: does not fit the GPU given (a verdict, not an error: the CLI's exit code, memcalc.cli.EXIT_DOES_NOT_FIT).


class OutOfMemoryError(MemcalcError):
    """A measured step ran out of GPU memory (--verify on CUDA): the run does not fit, exit code 6."""

    exit_code = 6


class MissingDependencyError(MemcalcError):
    """An optional dependency a command needs is not installed (torch and transformers, matplotlib)."""

    exit_code = 7


class OutputError(MemcalcError):
    """The output could not be written (stdout full or closed, a plot file that cannot be created)."""

    exit_code = 8


# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU wheel is what a laptop needs.
INSTALL_TORCH = "pip install torch==2.13.0 && pip install 'memcalc-train[verify]'"
