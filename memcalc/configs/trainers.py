"""Trainers' configs as data (``--from FILE``): the run a Hugging Face, TRL, axolotl, torchtune or LLaMA-Factory
config describes, as memcalc settings (``memcalc.request.Request`` keywords). Standard library only; a YAML file is
read with PyYAML's safe loader (``memcalc.datafile.read_yaml_mapping``). Nothing a config names is imported or run:
a torchtune ``_component_`` is a string looked up in the tables below, a model name goes to memcalc's resolver.

Every key of the config ends in one of four lists, all printed with the estimate (as notes, in --json too):
- mapped: the key (or the trainer's default for an absent key, marked so) and the setting it becomes (Liger's fused
  linear cross-entropy and torchtune's chunked loss become --loss, HF's every_n_layers --checkpointing every:N);
- also read: keys that shaped a mapping without one of their own (sample_packing: the length is exact);
- read but not modelled: the key changes memory in a way memcalc does not count (axolotl's disk or hidden-states
  offloading, Liger's fused norms and SwiGLU, FSDP CPU offload...), said with the direction of the error;
- ignored: every other key (learning rate, logging, datasets...), listed by name.
A flag the config contradicts is refused by ``merge`` (as with --deepspeed); MODEL and --deepspeed given stand in.

Formats (``--from-format``, else detected from the content, in this order):
  torchtune     a top-level section with a ``_component_`` (``model: {_component_: torchtune.models...}``)
  axolotl       ``base_model``
  llamafactory  ``finetuning_type``, ``cutoff_len``, ``lora_target``, ``quantization_bit`` or ``pure_bf16``
  trl           a key of TRL's SFTConfig or ModelConfig only (``max_length``, ``packing``, ``use_peft``...), or any
                other YAML file (``trl sft --config`` is what reads TrainingArguments as YAML)
  hf            any other JSON file: ``HfArgumentParser.parse_json_file`` (TrainingArguments, with run_clm's model
                and data arguments)

The dtype the model is loaded in decides the recipe, as the trainers run it (``_recipe``): fp32 weights with
``bf16: true`` are torch.autocast (``amp-bf16``); 16-bit weights with nothing upcast are pure 16-bit
(``bf16-pure``); 16-bit frozen base weights with fp32 trainable parameters (PEFT's adapters, LLaMA-Factory's upcast)
count as ``bf16`` (a 16-bit weight plus an fp32 master is what an fp32 trainable parameter and its 16-bit use cost:
4 + 4 + 8 = 2 + 4 + 2 + 8 bytes with Adam); FSDP with mixed precision is memcalc's ``bf16`` under FSDP (fp32 shards,
accelerate's upcast, gathered in 16 bits). When a config loads the checkpoint's
own dtype ("auto"), the model's config.json says it (``torch_dtype``/``dtype``); a preset does not record it, so
then ``--precision`` decides, among the recipes the config allows. An engine the launcher adds (memcalc's --fsdp or
--deepspeed beside a config without one) gives the recipe that engine runs (``TrainerConfig.launched``, ``merge``).

Rules were read from transformers 5.24 (training_args.py, trainer_optimizer.py, modeling_utils.py), TRL at
f2cd577 (trl/trainer/base_config.py, sft_config.py, model_config.py, sft_trainer.py, scripts/sft.py), axolotl at
067b021 (src/axolotl/utils/config/__init__.py, utils/schemas/, loaders/), torchtune at bd2a0fc (recipes/,
torchtune/models/), LLaMA-Factory at ff6d4d1 (src/llamafactory/hparams/, model/), PEFT 0.21 and accelerate 1.15.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcalc.datafile import read_json_object, read_yaml_mapping, shown
from memcalc.errors import ConfigError, ModelNotFoundError, UsageError
from memcalc.spec import REENTRANT_UNMODELLED, is_on

FORMATS = {
    "hf": "Hugging Face TrainingArguments",
    "trl": "TRL's SFTConfig",
    "axolotl": "an axolotl config",
    "torchtune": "a torchtune config",
    "llamafactory": "a LLaMA-Factory config",
}
WHAT = "trainer config"
COMPILE_BESIDE_SHARDING = ("--compile is not modelled with ZeRO/FSDP sharding; counted as eager (high: the compiled "
                           "layers hold less)")
OFFLOAD_BESIDE_SHARDING = ("activation offloading beside ZeRO/FSDP sharding is not modelled (memcalc traces it on one "
                           "unsharded process); the activations it moves to CPU RAM are counted on the GPU (high)")
MAX_LISTED = 100  # keys named per list in the output; a real config has a few dozen
MAX_INTEGER = 10**9  # batch, length, rank, steps: far past any run (memcalc.spec.MAX_TOKENS)

# -- Optimizers as the trainers spell them --------------------------------------------------------------------------
# (memcalc optimizer, implementation or None for the default, state dtype forced by the implementation, note);
# bitsandbytes steps every tensor with one fused kernel (memcalc's fused: no foreach temporaries).
_Optim = tuple[str, str | None, str | None, str]

# transformers/training_args.py OptimizerNames, built in trainer_optimizer.py (_OPTIMIZER_HANDLERS):
# _get_adamw_torch adds fused=True for adamw_torch_fused only; _get_adafactor is transformers' Adafactor;
# _get_bitsandbytes_optimizer builds bitsandbytes AdamW/Lion with optim_bits 8 or 32 (32-bit bitsandbytes states are
# fp32 whatever the weights: bitsandbytes/optim/optimizer.py Optimizer2State.init_state, dtype=torch.float32) and
# is_paged for the paged_ names (memcalc's paged optimizers: their notes say which states are paged); _get_sgd is
# torch.optim.SGD with optim_args' momentum.
HF_OPTIMIZERS: dict[str, _Optim] = {
    "adamw_torch": ("adamw", None, None, ""),
    "adamw_torch_fused": ("adamw", "fused", None, ""),
    # trainer_optimizer.py _get_torchao_optimizer: torchao.optim.AdamW8bit (torchao.prototype.low_bit_optim before
    # 0.11) with block_size optim_args' or 256, torchao's own default, as memcalc counts it.
    "adamw_torch_8bit": ("torchao-adamw-8bit", None, None, ""),
    "adafactor": ("adafactor", None, None, ""),
    "adamw_bnb_8bit": ("adamw-8bit", "fused", None, ""),
    "adamw_8bit": ("adamw-8bit", "fused", None, ""),
    "paged_adamw_8bit": ("paged-adamw-8bit", "fused", None, ""),
    "paged_adamw_32bit": ("paged-adamw", "fused", None, ""),
    "lion_32bit": ("lion", "fused", "fp32", ""),
    "paged_lion_32bit": ("lion", "fused", "fp32", ("paged: bitsandbytes puts the states of tensors of >= 100,000 "
                                                   "elements in CUDA unified memory, outside PyTorch's allocator; "
                                                   "counted on the GPU")),
    "sgd": ("sgd", None, None, ""),
    # Removed from transformers 5 (older configs still name them): transformers' own AdamW and apex's FusedAdam.
    "adamw_hf": ("adamw", "forloop", None, "transformers' own AdamW (removed in transformers 5), one tensor at a time"),
    "adamw_apex_fused": ("adamw", "fused", None, "adamw_apex_fused (removed in transformers 5): apex FusedAdam"),
}
# Names transformers 5.24 knows that memcalc has no model for: an error, never a silent AdamW.
HF_UNMODELLED_OPTIMIZERS = frozenset({
    "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_anyprecision", "adamw_torch_4bit",
    "ademamix", "adagrad", "ademamix_8bit", "lion_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw",
    "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw",
    "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
})
# transformers 5.24 training_args.py: default_optim is adamw_torch_fused with torch >= 2.8 (else adamw_torch).
HF_DEFAULT_OPTIM = "adamw_torch_fused"

# torchtune's optimizer._component_, matched as exact strings (never imported). torch.optim's AdamW/Adam/SGD keep
# states like their parameters; bitsandbytes' 8-bit AdamW as memcalc's adamw-8bit, its paged ones as memcalc's paged
# optimizers; torchao's low-bit AdamW (torchtune's docs name the prototype path, torchao 0.18 torchao.optim).
TORCHTUNE_OPTIMIZERS: dict[str, _Optim] = {
    "torch.optim.AdamW": ("adamw", None, None, ""),
    "torch.optim.Adam": ("adam", None, None, ""),
    "torch.optim.SGD": ("sgd", None, None, ""),
    "bitsandbytes.optim.AdamW8bit": ("adamw-8bit", "fused", None, ""),
    "bitsandbytes.optim.PagedAdamW8bit": ("paged-adamw-8bit", "fused", None, ""),
    "bitsandbytes.optim.PagedAdamW": ("paged-adamw", "fused", None, ""),
    "bitsandbytes.optim.PagedAdamW32bit": ("paged-adamw", "fused", None, ""),
    "torchao.prototype.low_bit_optim.AdamW8bit": ("torchao-adamw-8bit", None, None, ""),
    "torchao.prototype.low_bit_optim.AdamW4bit": ("torchao-adamw-4bit", None, None, ""),
    "torchao.optim.AdamW8bit": ("torchao-adamw-8bit", None, None, ""),
    "torchao.optim.AdamW4bit": ("torchao-adamw-4bit", None, None, ""),
}

# -- torchtune model builders -> memcalc presets ----------------------------------------------------------------------
# torchtune/models/<family>/__init__.py; the lora_ and qlora_ builders take the same name. "llama" names mean the
# Hugging Face modules are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, so torchtune's LoRA
# module names translate one to one; phi3/phi4 fuse qkv_proj and gate_up_proj in transformers, so they do not.
# torchtune builders whose QLoRA quantizes only the Linear layers LoRA wraps (the rest stay nn.Linear).
TORCHTUNE_LORA_TARGETS_ONLY = ("torchtune.models.qwen2.", "torchtune.models.qwen2_5.", "torchtune.models.qwen3.")

TORCHTUNE_MODELS: dict[str, tuple[str, bool]] = {
    "torchtune.models.llama2.llama2_7b": ("llama-2-7b", True),
    "torchtune.models.llama2.llama2_13b": ("llama-2-13b", True),
    "torchtune.models.llama2.llama2_70b": ("llama-2-70b", True),
    "torchtune.models.llama3.llama3_8b": ("llama-3-8b", True),
    "torchtune.models.llama3.llama3_70b": ("llama-3-70b", True),
    "torchtune.models.llama3_1.llama3_1_8b": ("llama-3.1-8b", True),
    "torchtune.models.llama3_1.llama3_1_70b": ("llama-3.1-70b", True),
    "torchtune.models.llama3_1.llama3_1_405b": ("llama-3.1-405b", True),
    "torchtune.models.llama3_2.llama3_2_1b": ("llama-3.2-1b", True),
    "torchtune.models.llama3_2.llama3_2_3b": ("llama-3.2-3b", True),
    "torchtune.models.llama3_3.llama3_3_70b": ("llama-3.3-70b", True),
    "torchtune.models.qwen2_5.qwen2_5_0_5b": ("qwen2.5-0.5b", True),
    "torchtune.models.qwen2_5.qwen2_5_1_5b_base": ("qwen2.5-1.5b", True),
    "torchtune.models.qwen2_5.qwen2_5_1_5b_instruct": ("qwen2.5-1.5b", True),
    "torchtune.models.qwen2_5.qwen2_5_7b_base": ("qwen2.5-7b", True),
    "torchtune.models.qwen2_5.qwen2_5_7b_instruct": ("qwen2.5-7b", True),
    "torchtune.models.qwen2_5.qwen2_5_72b_base": ("qwen2.5-72b", True),
    "torchtune.models.qwen2_5.qwen2_5_72b_instruct": ("qwen2.5-72b", True),
    "torchtune.models.qwen3.qwen3_0_6b_base": ("qwen3-0.6b", True),
    "torchtune.models.qwen3.qwen3_0_6b_instruct": ("qwen3-0.6b", True),
    "torchtune.models.qwen3.qwen3_1_7b_base": ("qwen3-1.7b", True),
    "torchtune.models.qwen3.qwen3_1_7b_instruct": ("qwen3-1.7b", True),
    "torchtune.models.qwen3.qwen3_4b_base": ("qwen3-4b", True),
    "torchtune.models.qwen3.qwen3_4b_instruct": ("qwen3-4b", True),
    "torchtune.models.qwen3.qwen3_8b_base": ("qwen3-8b", True),
    "torchtune.models.qwen3.qwen3_8b_instruct": ("qwen3-8b", True),
    "torchtune.models.qwen3.qwen3_14b_base": ("qwen3-14b", True),
    "torchtune.models.qwen3.qwen3_14b_instruct": ("qwen3-14b", True),
    "torchtune.models.qwen3.qwen3_32b": ("qwen3-32b", True),
    "torchtune.models.gemma.gemma_2b": ("gemma-2b", True),
    "torchtune.models.gemma.gemma_7b": ("gemma-7b", True),
    "torchtune.models.gemma2.gemma2_9b": ("gemma-2-9b", True),
    "torchtune.models.gemma2.gemma2_27b": ("gemma-2-27b", True),
    "torchtune.models.mistral.mistral_7b": ("mistral-7b", True),
    "torchtune.models.phi3.phi3_mini": ("phi-3-mini", False),
    "torchtune.models.phi4.phi4_14b": ("phi-4", False),
}
# torchtune/modules/peft: LoRA module names of the attention (lora_attn_modules) -> transformers' module names.
TORCHTUNE_LORA_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
TORCHTUNE_LORA_MLP = ("gate_proj", "up_proj", "down_proj")  # apply_lora_to_mlp: w1, w3, w2
# torchtune's losses (loss._component_). CEWithChunkedOutputLoss (modules/loss/ce_chunked_output_loss.py) upcasts
# and scores num_output_chunks chunks of the model's chunked output (default 8): memcalc's --loss chunked:N.
# LinearCrossEntropyLoss (cross_entropy_loss.py) applies the output projection itself chunk by chunk, a path memcalc
# has no rule for.
TORCHTUNE_CHUNKED_LOSS = "torchtune.modules.loss.CEWithChunkedOutputLoss"
TORCHTUNE_CHUNKS_DEFAULT = 8
TORCHTUNE_PLAIN_LOSSES = frozenset({"torch.nn.CrossEntropyLoss"})

# transformers' attn_implementation values -> memcalc --attn.
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash", "flash_attention_3": "flash",
             "kernels-community/flash-attn": "flash", "kernels-community/flash-attn3": "flash",
             "kernels-community/vllm-flash-attn3": "flash"}
# HF dtype names (from_pretrained's dtype / torch_dtype) -> memcalc dtypes; "auto" is the checkpoint's.
DTYPES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
          "torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "fp32": "fp32", "bf16": "bf16",
          "fp16": "fp16", "auto": "auto"}


@dataclass(frozen=True)
class Mapped:
    """One key read into a setting. ``key`` as written (dotted inside a section), ``written`` its value, or the
    trainer's default when ``default`` is true; ``setting`` the Request keyword (None: read and counted as memcalc
    already counts it) and ``value`` what it becomes. ``bound``: the value is an upper bound the run may stay under
    (a sequence padded to the batch's longest), so a smaller typed value does not contradict it."""

    key: str
    written: Any
    setting: str | None
    value: Any
    default: bool = False
    bound: bool = False
    label: str | None = None  # how the output names the keys, where several decide one setting (the precision)

    @property
    def read_as(self) -> str:
        if self.label is not None:
            return self.label
        return f"{self.key} (absent: default {_text(self.written)})" if self.default else \
            f"{self.key} {_text(self.written)}"

    @property
    def becomes(self) -> str:
        return f"({self.value})" if self.setting is None else f"{_flag(self.setting)} {_text(self.value)}"


@dataclass(frozen=True, eq=False)
class TrainerConfig:
    """What a trainer's config says, as memcalc settings, with every key accounted for.

    ``settings``: Request keywords -> values (model, batch_size, seq_len, precision...). ``recipes``: when the
    precision depends on the checkpoint's dtype, the recipe for each (``fp32``/``bf16``/``fp16`` -> a recipe, or a
    ConfigError message); ``model`` the model reference the config names (or None).
    """

    source: str
    format: str
    detected_by: str
    model: str | None
    settings: Mapping[str, Any]
    mapped: tuple[Mapped, ...]
    not_modelled: tuple[str, ...]
    ignored: tuple[str, ...]
    notes: tuple[str, ...]
    also_read: tuple[str, ...] = ()  # "key value": keys read that shaped a mapping without one of their own
    recipes: Mapping[str, str] | None = None
    dtype_key: str = ""
    # What changes when the launcher, not the config, adds the engine ("fsdp", "deepspeed" -> the precision, the
    # settings it drops, its note): applied by ``merge`` for memcalc's --fsdp / --deepspeed.
    launched: Mapping[str, Mapping[str, Any]] | None = None
    precision_note: str = ""
    about: Mapping[str, str] | None = None  # note -> the setting it explains (dropped with it)

    def summary(self) -> list[str]:
        """The notes the estimate prints: what was read and how, what is not modelled, what was ignored."""
        groups: list[tuple[str, list[str]]] = []
        for mapped in self.mapped:  # one key that sets several settings is shown once
            if groups and groups[-1][0] == mapped.read_as:
                groups[-1][1].append(mapped.becomes)
            else:
                groups.append((mapped.read_as, [mapped.becomes]))
        lines = [f"read {self.source} as {FORMATS[self.format]} ({self.detected_by}): "
                 + "; ".join(f"{read_as} -> {' '.join(becomes)}" for read_as, becomes in groups)]
        if self.also_read:
            lines.append(f"{self.source} also read (they shape the settings above): "
                         f"{', '.join(_capped(list(self.also_read)))}")
        lines.extend(f"{self.source}: {item}" for item in _capped(list(self.not_modelled)))
        lines.extend(f"{self.source}: {note}" for note in self.notes)
        if self.ignored:
            lines.append(f"{self.source} ignored (no effect memcalc models): {', '.join(self.ignored)}")
        return lines


def _capped(items: list[str]) -> list[str]:
    if len(items) <= MAX_LISTED:
        return items
    return [*items[:MAX_LISTED], f"... and {len(items) - MAX_LISTED:,} more"]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if value is None:
        return "null"
    return shown(value, 80)


def _flag(setting: str) -> str:
    """The flag a setting is typed with (memcalc.cli.flag_of, without importing the command line)."""
    return {"model": "MODEL", "from_config": "--from"}.get(setting, "--" + setting.replace("_", "-"))


# -- Reading --------------------------------------------------------------------------------------------------------


def read_trainer_config(path: str | os.PathLike[str], fmt: str | None = None) -> TrainerConfig:
    """Read a trainer's config file: JSON by its .json suffix, YAML otherwise (safe loader, bounded)."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"{{from_format}} {shown(repr(fmt))} is not one of {', '.join(FORMATS)}")
    text = os.fsdecode(path)
    if not text.strip():
        raise UsageError("{from_config} is empty; give the trainer's config file (YAML or JSON)")
    is_json = text.lower().endswith(".json")
    data = read_json_object(path, WHAT) if is_json else read_yaml_mapping(path, WHAT)
    return parse_trainer_config(data, fmt, source=shown(text), is_json=is_json, folder=Path(text).parent)


def parse_trainer_config(data: Mapping[str, Any], fmt: str | None = None, *, source: str = WHAT,
                         is_json: bool = False, folder: Path | None = None) -> TrainerConfig:
    """The same as ``read_trainer_config`` for a config already loaded. ``folder``: where a relative DeepSpeed
    config path is looked for when the current folder does not have it."""
    if fmt is None:
        fmt, why = detect_format(data, is_json)
    else:
        why = "--from-format"
    reader = _Reader(data, source, folder)
    _READERS[fmt](reader)
    return reader.result(fmt, why)


def detect_format(data: Mapping[str, Any], is_json: bool) -> tuple[str, str]:
    """(format, why) by the keys only one trainer writes; see the module docstring for the order."""
    for key, value in sorted(data.items(), key=lambda item: item[0] != "model"):
        if isinstance(value, dict) and "_component_" in value:
            return "torchtune", f"its {key}._component_"
    if "base_model" in data:
        return "axolotl", "its base_model key"
    for key in ("finetuning_type", "cutoff_len", "lora_target", "quantization_bit", "pure_bf16"):
        if key in data:
            return "llamafactory", f"its {key} key"
    for key in _TRL_ONLY_KEYS:
        if key in data:
            return "trl", f"its {key} key (TRL's SFTConfig/ModelConfig)"
    if is_json:
        return "hf", "a JSON file of TrainingArguments (HfArgumentParser.parse_json_file)"
    return "trl", "a YAML file of TrainingArguments, as `trl sft --config` reads it"


# Keys of TRL's SFTConfig (trl/trainer/sft_config.py) and ModelConfig (model_config.py) that TrainingArguments lacks.
_TRL_ONLY_KEYS = ("max_length", "packing", "padding_free", "dataset_text_field",
                  "completion_only_loss", "assistant_only_loss", "model_init_kwargs", "activation_offloading",
                  "use_peft", "lora_r", "lora_target_modules", "load_in_4bit", "load_in_8bit", "loss_type")


class _Reader:
    """Reads keys of one config, recording each as mapped, not modelled or (at the end) ignored."""

    def __init__(self, data: Mapping[str, Any], source: str, folder: Path | None) -> None:
        self.data = data
        self.source = source
        self.folder = folder
        self.read: set[str] = set()  # dotted keys read; a section read whole is its own name
        self.sections: set[str] = set()  # sections read key by key: their unread keys are listed as ignored
        self.settings: dict[str, Any] = {}
        self.mapped: list[Mapped] = []
        self.unmodelled: list[str] = []
        self.unmodelled_keys: set[str] = set()
        self.notes: list[str] = []
        self.model: str | None = None
        self.recipes: dict[str, str] | None = None
        self.dtype_key = ""
        self.launched: dict[str, dict[str, Any]] = {}  # TrainerConfig.launched
        self.precision_note = ""  # the note that says why the precision is what it is
        self.fsdp_version = 0  # the config's FSDP version (0: none)
        self.about: dict[str, str] = {}  # note -> the setting it explains

    # -- access ------------------------------------------------------------------------------------------------
    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def has(self, key: str) -> bool:
        return self._lookup(key)[0]

    def get(self, key: str, default: Any = None) -> Any:
        """The value at ``key`` (dotted: inside a section), marked read; ``default`` when absent or null."""
        present, value = self._lookup(key)
        if present:
            self._mark(key)
        value = self._interpolated(key, value)
        return default if value is None else value

    def _mark(self, key: str) -> None:
        if self.has(key):
            self.read.add(key)
            if "." in key:
                self.sections.add(key.rsplit(".", 1)[0])

    def _lookup(self, key: str) -> tuple[bool, Any]:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def _interpolated(self, key: str, value: Any) -> Any:
        """torchtune's OmegaConf interpolation ``${other.key}`` of a value memcalc reads: looked up once, as data."""
        if isinstance(value, str) and value.startswith("${"):
            match = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", value)
            present, target = self._lookup(match.group(1)) if match else (False, None)
            if not present or (isinstance(target, str) and target.startswith("${")):
                raise self.fail(f"{key} is {shown(value)}, an interpolation memcalc cannot resolve (it reads "
                                "${other.key} of a plain value only); write the value")
            return target
        return value

    def section(self, key: str) -> dict[str, Any]:
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"{key} must be a mapping of settings, got {_text(value)}")
        self.sections.add(key)
        self.read.discard(key)
        return value

    def integer(self, key: str, default: int | None = None, minimum: int = 1,
                maximum: int = MAX_INTEGER) -> int | None:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(f"{key} must be a whole number from {minimum} to {maximum:,}, got {_text(value)}")
        return value

    def fraction(self, key: str, default: float) -> float:
        """A probability in [0, 1) at ``key`` (a dropout), ``default`` when absent or null."""
        value = self.get(key, default)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise self.fail(f"{key} must be a probability from 0 to below 1, got {_text(value)}")
        return float(value)

    def boolean(self, key: str, default: bool | None = False) -> bool | None:
        value = self.get(key, None)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, got {_text(value)}")
        return value

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{key} must be text, got {_text(value)}")
        return value

    def names(self, key: str) -> list[str] | None:
        """A list of names, or one name or comma-separated names as text."""
        value = self.get(key, None)
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise self.fail(f"{key} must name modules (a list or comma-separated text), got {_text(value)}")
        return [item.strip() for item in items if item.strip()]

    # -- recording ---------------------------------------------------------------------------------------------
    def set(self, setting: str, value: Any, key: str, written: Any = None, *, default: bool = False,
            bound: bool = False, label: str | None = None) -> None:
        self._mark(key)
        self.settings[setting] = value
        self.mapped.append(Mapped(key, value if written is None else written, setting, value, default, bound, label))

    def counted(self, key: str, written: Any, how: str) -> None:
        """A key read whose effect is what memcalc counts anyway."""
        self._mark(key)
        self.mapped.append(Mapped(key, written, None, how))

    def not_modelled(self, key: str, written: Any, why: str) -> None:
        self._mark(key)
        self.unmodelled_keys.add(key)
        self.unmodelled.append(f"{key} {_text(written)} read but not modelled: {why}")

    def note(self, text: str, about: str | None = None) -> None:
        """``about``: the setting the note explains, so that it goes when the setting does (TrainerConfig.about)."""
        self.notes.append(text)
        if about is not None:
            self.about[text] = about

    # -- the end -----------------------------------------------------------------------------------------------
    def ignored(self) -> list[str]:
        found: list[str] = []
        for key, value in self.data.items():
            if key in self.read:
                continue
            if key in self.sections and isinstance(value, dict):
                found.extend(f"{key}.{sub}" for sub in value if f"{key}.{sub}" not in self.read
                             and f"{key}.{sub}" not in self.sections)
                found.extend(f"{key}.{sub}.{leaf}" for sub, inner in value.items()
                             if f"{key}.{sub}" in self.sections and isinstance(inner, dict)
                             for leaf in inner if f"{key}.{sub}.{leaf}" not in self.read)
            else:
                found.append(key)
        return _capped([shown(key, 60) for key in found])

    def _offload_unmodelled(self) -> None:
        """Activation offloading beside ZeRO/FSDP sharding, which memcalc estimates on one unsharded process only
        (memcalc.activations refuses the pair): said, and counted without offloading."""
        del self.settings["activation_offload"]
        mapped = next(m for m in self.mapped if m.setting == "activation_offload")
        self.mapped.remove(mapped)
        self.notes = [note for note in self.notes if self.about.get(note) != "activation_offload"]
        self.not_modelled(mapped.key, mapped.written, OFFLOAD_BESIDE_SHARDING)

    def also_read(self) -> list[str]:
        shown_keys = {m.key for m in self.mapped} | self.unmodelled_keys
        return [f"{shown(key, 60)} {_text(self._lookup(key)[1])}" for key in sorted(self.read - shown_keys)
                if key not in self.sections]

    def result(self, fmt: str, why: str) -> TrainerConfig:
        if self.settings.get("checkpoint_reentrant") and any(is_on(self.settings.get(name))
                                                            for name in REENTRANT_UNMODELLED):
            # (what TrainingSpec refuses with reentrant checkpoints: said, counted as non-reentrant)
            del self.settings["checkpoint_reentrant"]
            mapped = next(m for m in self.mapped if m.setting == "checkpoint_reentrant")
            self.mapped.remove(mapped)
            self.not_modelled(mapped.key, True, "reentrant checkpoints with adapters, compiled layers, offloading or "
                              "float8 are counted as non-reentrant ones (low by about one hidden state, the recomputed "
                              "layer's output)")
        if is_on(self.settings.get("activation_offload")) and (
                self.settings.get("zero") or self.settings.get("deepspeed") is not None):
            self._offload_unmodelled()
        return TrainerConfig(
            source=self.source, format=fmt, detected_by=why, model=self.model, settings=dict(self.settings),
            mapped=tuple(self.mapped), not_modelled=tuple(self.unmodelled), ignored=tuple(self.ignored()),
            notes=tuple(self.notes), also_read=tuple(self.also_read()), recipes=self.recipes,
            dtype_key=self.dtype_key, launched=self.launched, precision_note=self.precision_note, about=self.about,
        )


# -- Shared rules -----------------------------------------------------------------------------------------------------


def _dtype(r: _Reader, key: str, value: Any) -> str:
    name = value if isinstance(value, str) else None
    if name is None or name not in DTYPES:
        raise r.fail(f"{key} {_text(value)} is not a dtype memcalc knows ({', '.join(sorted(DTYPES))})")
    return DTYPES[name]


def _recipe(weights: str, autocast: str | None, *, trainable_fp32: bool, lora: bool, fsdp: bool = False) -> str:
    """The memcalc recipe of a run whose weights load in ``weights``, with HF Trainer's autocast ``autocast``
    (TrainingArguments.bf16/fp16), and trainable parameters upcast to fp32 or not.

    - fp32 weights, or every weight trainable and upcast: torch.autocast over fp32 (amp-bf16/amp-fp16), or fp32
      without it (transformers/trainer.py: autocast through accelerate's mixed_precision);
    - a 16-bit frozen base with fp32 trainable parameters (PEFT tuners_utils.cast_adapter_dtype, LLaMA-Factory's
      cast_trainable_params_to_fp32, accelerate's fsdp2_prepare_model upcast): the 16-bit recipe with an fp32
      master, the same bytes per trainable parameter as an fp32 one (4 + 4 + 8 = 2 + 4 + 2 + 8 with Adam);
    - 16-bit weights, nothing upcast: pure 16-bit (optimizer states like the parameters, torch.optim zeros_like).
    - FSDP with mixed precision: fp32 trainable shards (accelerate fsdp2_prepare_model upcasts them) gathered in
      16 bits (FullyShardedDataParallelPlugin.set_mixed_precision: param_dtype), memcalc's bf16/fp16 under FSDP.
    Raises ValueError (its message) for runs the trainers refuse or memcalc has no recipe for.
    """
    if fsdp and autocast is not None:
        return autocast
    if weights == "fp32" or (trainable_fp32 and not lora):
        return f"amp-{autocast}" if autocast else "fp32"
    if trainable_fp32:
        return weights
    if autocast == "fp16" and weights == "fp16":
        # torch/amp/grad_scaler.py, GradScaler._unscale_grads_: "Attempting to unscale FP16 gradients."
        raise ValueError("fp16 mixed precision over fp16 trainable weights fails in torch's GradScaler "
                         "(\"Attempting to unscale FP16 gradients\"); load the model in float32 or use bf16")
    if autocast not in (None, weights):
        raise ValueError(f"{autocast} autocast over {weights} weights has no memcalc recipe; load the model in "
                         f"float32 or {autocast}")
    return f"{weights}-pure"


def _recipes(weights: str, autocast: str | None, *, trainable_fp32: bool, lora: bool, fsdp: bool) -> dict[str, str]:
    """``_recipe`` for each dtype the weights may load in ("auto": every one), a refusal as "!" + its message."""
    recipes: dict[str, str] = {}
    for dtype in ("fp32", "bf16", "fp16") if weights == "auto" else (weights,):
        try:
            recipes[dtype] = _recipe(dtype, autocast, trainable_fp32=trainable_fp32, lora=lora, fsdp=fsdp)
        except ValueError as error:
            recipes[dtype] = "!" + str(error)
    return recipes


def _set_recipe(r: _Reader, label: str, weights: str, autocast: str | None, *, trainable_fp32: bool, lora: bool,
                fsdp: bool = False, why: str, auto: str = "") -> None:
    """Set the precision, or, for weights in the checkpoint's dtype ("auto"), every recipe it may be.
    ``label``: the keys that decide it and their values, as the output names them; ``auto``: what loads the
    checkpoint's dtype, for the message that asks for it. Without an engine in the config, the recipe the same run
    has when the launcher adds one (``accelerate launch`` with an FSDP or DeepSpeed config, memcalc's --fsdp or
    --deepspeed) is kept for ``merge``: TrainerConfig.launched."""
    # accelerate's FSDP2 prepare skips its upcast for a model holding bitsandbytes' Params4bit (fsdp2_prepare_model:
    # `if accelerator.mixed_precision != "no" and not model_has_params4bit`); FSDP1's (Accelerator.prepare_model) does
    # not. memcalc's --fsdp is FSDP2.
    params4bit = bool(r.settings.get("qlora"))
    if fsdp and params4bit and r.fsdp_version == 2:
        fsdp = False
        why = why.replace(_FSDP_UPCAST, _FSDP2_PARAMS4BIT)
    elif not fsdp:
        # accelerate's FSDP prepare upcasts the trainable parameters under mixed precision (utils/fsdp_utils.py
        # fsdp2_prepare_model; FSDP1: Accelerator.prepare_model), whoever asked for FSDP.
        r.launched["fsdp"] = {"recipes": _recipes(weights, autocast, trainable_fp32=trainable_fp32, lora=lora,
                                                  fsdp=not params4bit),
                              "label": label, "auto": auto,
                              "why": why + (f"; {_FSDP2_PARAMS4BIT if params4bit else _FSDP_UPCAST}"
                                            if autocast else "")}
        # transformers integrations/deepspeed.py trainer_config_process: the DeepSpeed config's bf16/fp16 sections
        # decide, the trainer's flags fill their "auto" (_deepspeed_precision).
        r.launched["deepspeed"] = {"precision": autocast, "label": label}
    recipes = _recipes(weights, autocast, trainable_fp32=trainable_fp32, lora=lora, fsdp=fsdp)
    if len(set(recipes.values())) == 1:  # the checkpoint's dtype does not matter (or is written)
        recipe = next(iter(recipes.values()))
        if recipe.startswith("!"):
            raise r.fail(recipe[1:])
        r.set("precision", recipe, label.split(" ", 1)[0], label=label)
        r.note(f"precision {recipe}: {why}")
        r.precision_note = r.notes[-1]
        return
    r.recipes = recipes
    r.dtype_key = auto or label
    r.note(f"precision: {label}; {why}")
    r.precision_note = r.notes[-1]


def _optimizer(r: _Reader, key: str, name: Any, default: bool, optim_args: Any = None) -> None:
    if not isinstance(name, str):
        raise r.fail(f"{key} must name an optimizer, got {_text(name)}")
    spelled = name.strip().lower()
    if spelled in HF_UNMODELLED_OPTIMIZERS:
        raise r.fail(f"{key} {shown(name)} (a transformers optimizer) has no memcalc model; memcalc models "
                     f"{', '.join(sorted(HF_OPTIMIZERS))}")
    if spelled not in HF_OPTIMIZERS:
        raise r.fail(f"{key} {shown(repr(name))} is not an optimizer transformers 5.24 knows (OptimizerNames); "
                     f"memcalc reads {', '.join(sorted(HF_OPTIMIZERS))}")
    _apply_optimizer(r, key, name, HF_OPTIMIZERS[spelled], default)
    block = _optim_arg(optim_args, "block_size") if optim_args is not None else None
    if spelled == "adamw_torch_8bit" and block not in (None, "256"):
        r.not_modelled("optim_args", _text(optim_args), f"torchao's AdamW8bit with block_size {block} keeps one fp32 "
                       "scale per block; memcalc counts blocks of 256")
    if spelled == "sgd" and optim_args is not None:
        # trainer_optimizer.py _get_sgd: optim_args "momentum=0.9,..." (parsed from "k=v,k=v" by the Trainer).
        momentum = _optim_arg(optim_args, "momentum")
        if momentum not in (None, "0", "0.0"):
            r.set("optim", "sgd-momentum", "optim_args", _text(optim_args))


def _optim_arg(optim_args: Any, name: str) -> str | None:
    if isinstance(optim_args, dict):
        value = optim_args.get(name)
        return None if value is None else str(value)
    for part in str(optim_args).split(","):
        key, _, value = part.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def _apply_optimizer(r: _Reader, key: str, written: str, optim: _Optim, default: bool) -> None:
    name, impl, state_dtype, note = optim
    r.set("optim", name, key, written, default=default)
    if impl is not None:
        r.set("optim_impl", impl, key, written, default=default)
    if state_dtype is not None:
        r.set("state_dtype", state_dtype, key, written, default=default)
    if note:
        r.note(f"{key} {written}: {note}")


def _attention(r: _Reader, key: str, value: Any) -> None:
    if not isinstance(value, str) or value not in ATTENTION:
        r.not_modelled(key, value, "an attention implementation memcalc has no rule for; counted as sdpa")
        return
    r.set("attn", ATTENTION[value], key, value)


def _deepspeed(r: _Reader, key: str) -> bool:
    value = r.get(key)
    if value is None:
        return False
    if isinstance(value, dict):
        raise r.fail(f"{key} is a DeepSpeed config written inline; memcalc reads DeepSpeed configs from a file: "
                     "save it as JSON and point the key (or --deepspeed) at it")
    if not isinstance(value, str) or not value.strip():
        raise r.fail(f"{key} must be the path of a DeepSpeed JSON config, got {_text(value)}")
    # The trainers open it relative to the folder they run in (transformers HfTrainerDeepSpeedConfig, axolotl
    # normalize_config): the current folder first, then beside the config file.
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and r.folder is not None and (r.folder / path).exists():
        r.note(f"{key} {shown(value)} is not in the current folder; read the one beside the config")
        path = r.folder / path
    r.set("deepspeed", str(path), key, value)
    return True


def _fsdp(r: _Reader, fsdp_key: str, config_key: str, version_key: str | None, default_version: int,
          *, checkpointing_key: str = "activation_checkpointing", config_enables: bool = False) -> bool:
    """HF Trainer's and axolotl's FSDP: ``fsdp`` (true, or the legacy options string/list) and ``fsdp_config``
    (transformers training_args.py _process_fsdp_args, which drops each key's fsdp_ prefix, and
    _apply_legacy_fsdp_to_config: full_shard -> reshard_after_forward true, shard_grad_op -> false, offload ->
    cpu_offload). ``config_enables``: an ``fsdp_config`` section alone turns FSDP on (axolotl: loaders/model.py
    ModelLoader.is_fsdp_enabled is ``fsdp_config is not None or fsdp is not None``, and utils/trainer.py
    prepare_optim_env calls setup_fsdp_envs for either, which sets ACCELERATE_USE_FSDP and the FSDP_* variables
    accelerate's FullyShardedDataParallelPlugin reads: FSDP_VERSION, FSDP_RESHARD_AFTER_FORWARD, FSDP_OFFLOAD_PARAMS,
    FSDP_ACTIVATION_CHECKPOINTING, FSDP_CPU_RAM_EFFICIENT_LOADING)."""
    value = r.get(fsdp_key)
    by_config = False
    if value in (None, False, "", []):
        if not (config_enables and isinstance(r.get(config_key), dict)):
            return False
        # The section is the switch: the keys below name it (fsdp_version, else fsdp_config) as what set FSDP.
        by_config = True
        fsdp_key = version_key if version_key and r.has(version_key) else config_key
        value = r.get(fsdp_key) if fsdp_key != config_key else "present"
    options = [] if by_config else value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    if not by_config and (not isinstance(value, (bool, str, list)) or not all(isinstance(o, str) for o in options)):
        raise r.fail(f"{fsdp_key} must be true or FSDP options (full_shard, shard_grad_op, offload...), got "
                     f"{_text(value)}")
    section = r.section(config_key) if r.has(config_key) else {}

    def option(name: str) -> tuple[str, Any] | None:
        for key in (name, f"fsdp_{name}"):
            if key in section:
                return f"{config_key}.{key}", r.get(f"{config_key}.{key}")
        return None

    found = option("version") or (
        (version_key, r.get(version_key)) if version_key and r.has(version_key) else None)
    version = int(found[1]) if found and str(found[1]).strip() in ("1", "2") else default_version
    r.fsdp_version = version
    if version == 1:
        r.not_modelled(found[0] if found else fsdp_key, found[1] if found else value,
                       "FSDP1 (flat parameters) counted as FSDP2 fully_shard: the same shards and gathered layers, "
                       "without FSDP1's flat-buffer padding")
    sharding = {o.lower() for o in options}
    strategy = option("sharding_strategy")  # FSDP1's FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD...
    if strategy is not None and isinstance(strategy[1], str):
        sharding = {strategy[1].lower()}
    reshard = option("reshard_after_forward")
    stage = 3
    if "shard_grad_op" in sharding or "hybrid_shard_zero2" in sharding:
        stage = 2
    if reshard is not None:
        stage = 3 if str(reshard[1]).lower() in ("true", "full_shard", "hybrid_shard") else 2
    if sharding & {"hybrid_shard", "hybrid_shard_zero2"} or (
            reshard is not None and "hybrid" in str(reshard[1]).lower()):
        # FSDP1's HYBRID_SHARD (accelerate's FullyShardedDataParallelPlugin passes it to torch's FSDP, whose
        # _init_utils.py _init_intra_and_inter_node_groups shards within a node and replicates across nodes): HSDP with
        # a replica per node, counted as FSDP2's on a (nodes, gpus per node) mesh
        where = strategy if strategy is not None else reshard if reshard is not None else (fsdp_key, value)
        r.set("dp_replicate", "nodes", where[0], where[1])
        r.note(f"{where[0]} {_text(where[1])}: each node's GPUs shard the model, the nodes are replicas: give --nodes "
               "(one node is plain FSDP)")
    if "no_shard" in sharding:
        r.set("sharding", "torch", fsdp_key, value)
        r.set("zero", 0, fsdp_key, value)
        r.read.discard(config_key)
        return True
    r.set("sharding", "fsdp", fsdp_key, value)
    r.set("zero", stage, reshard[0] if reshard else fsdp_key, reshard[1] if reshard else value)
    offload = option("cpu_offload") or option("offload_params")
    if "offload" in sharding or (offload is not None and str(offload[1]).lower() == "true"):
        where = offload if offload is not None else (fsdp_key, value)
        r.not_modelled(where[0], where[1], "FSDP CPU offload keeps parameters, gradients and optimizer states in "
                       "CPU RAM; memcalc counts them on the GPU (high)")
    checkpointing = option(checkpointing_key)
    if checkpointing is not None and str(checkpointing[1]).lower() == "true":
        r.set("checkpointing", "full", checkpointing[0], checkpointing[1])
    efficient = option("cpu_ram_efficient_loading")  # (accelerate's FSDP plugin: only the main process loads)
    if efficient is not None and str(efficient[1]).lower() == "true":
        r.set("cpu_ram_efficient_loading", True, efficient[0], efficient[1])
    r.note("the number of GPUs comes from the launcher, not the config: give --gpus N (and --nodes)")
    r.read.discard(config_key)  # (read key by key: its unread keys are listed as ignored)
    return True


def _lora_targets(r: _Reader, key: str, names: list[str] | None, default_key: str) -> None:
    if names is None:
        r.note(f"{default_key}: LoRA on PEFT's default modules for the model type")
        return
    if names in (["all-linear"], ["all"]):
        r.set("lora_targets", "all-linear", key, names)
        return
    r.set("lora_targets", ",".join(names), key, names)


def _sequence(r: _Reader, key: str, value: int | None, default: bool, packed: bool, packing_key: str,
              masks_padding: bool = True) -> None:
    """The sequence length; unpacked rows are padded to the batch's longest, which a transformers model sees in the
    attention_mask the collator hands it (``masks_padding``: torchtune's padded_collate_sft gives its models none)."""
    if value is None:
        r.note(f"{key} is null: no length cap, each batch runs as long as its longest sample; give --seq-len "
               "for the longest you expect")
        return
    if packed:
        r.set("seq_len", value, key, default=default)
        return
    r.set("seq_len", value, key, default=default, bound=True)
    if masks_padding:
        r.set("padded", True, packing_key, False, default=not r.has(packing_key))
    r.note(f"without {packing_key}, rows are padded to the batch's longest sample, at most {key} {value}: the "
           "estimate takes the longest (a smaller --seq-len is accepted)"
           + (", and counts the padding mask attention then gets (--padded)" if masks_padding else ""))


def _quantized(r: _Reader, key: str, bits: Any, lora: bool, double_quant: bool | None, dq_key: str,
               skip_key: str | None = None) -> None:
    """A 4-bit base (bitsandbytes NF4) trains LoRA adapters: QLoRA. 8-bit and other schemes are not modelled.
    ``double_quant``: bnb_4bit_use_double_quant as the trainer sets it (None: not known, counted with it);
    ``skip_key``: where the trainer's llm_int8_skip_modules is, if it has one."""
    if not lora:
        # transformers/trainer.py: "You cannot perform fine-tuning on purely quantized models" without adapters.
        raise r.fail(f"{key} {_text(bits)} quantizes the base, which HF Trainer trains only with adapters; add "
                     "LoRA or drop the quantization")
    if str(bits) in ("4", "True", "true") or bits is True or bits == 4:
        r.set("qlora", True, key, r.get(key))
        if double_quant is not None:
            r.set("qlora_double_quant", double_quant, dq_key, default=not r.has(dq_key))
        skipped = r.names(skip_key) if skip_key is not None else None
        if skipped is not None:
            # transformers quantizers/base.py get_modules_to_not_convert: a given skip list replaces the default
            # one (get_keys_to_not_convert: the output head), so the head is quantized unless the list names it.
            if "lm_head" not in skipped:
                r.set("qlora_lm_head", True, skip_key, skipped)
            others = [name for name in skipped if name != "lm_head"]
            if others:
                r.not_modelled(skip_key, skipped, f"{', '.join(others)} left 16-bit by bitsandbytes are counted in "
                               "NF4 (low by about 1.5 B per skipped weight)")
        return
    r.not_modelled(key, bits, "an 8-bit (or other) quantized base: memcalc counts it in 16 bits (high)")


# -- Hugging Face TrainingArguments and TRL ----------------------------------------------------------------------------


def _read_hf(r: _Reader, *, trl: bool) -> None:
    """HF TrainingArguments (transformers 5.24 training_args.py) with run_clm's ModelArguments/DataTrainingArguments,
    or TRL's SFTConfig (base_config.py, sft_config.py) with ModelConfig (model_config.py)."""
    trainer = "TRL" if trl else "TrainingArguments"
    model = r.text("model_name_or_path")
    if model is not None:
        r.model = model
        r.set("model", model, "model_name_or_path")
    # Batch and accumulation (training_args.py: per_device_train_batch_size 8, gradient_accumulation_steps 1).
    default_batch = not r.has("per_device_train_batch_size")
    r.set("batch_size", r.integer("per_device_train_batch_size", 8), "per_device_train_batch_size",
          default=default_batch)
    default_accum = not r.has("gradient_accumulation_steps")
    r.set("grad_accum", r.integer("gradient_accumulation_steps", 1), "gradient_accumulation_steps",
          default=default_accum)
    if r.boolean("auto_find_batch_size"):
        r.not_modelled("auto_find_batch_size", True, "the Trainer halves the batch after an out-of-memory error; "
                       "the estimate is for the batch as written")
    # Mixed precision: TrainingArguments bf16/fp16 default False; TRL's bf16 defaults to `not fp16`.
    fp16 = bool(r.boolean("fp16"))
    bf16 = r.boolean("bf16", None)
    bf16_default = bf16 is None
    if bf16 is None:
        bf16 = (not fp16) if trl else False
    if bf16 and fp16:
        raise r.fail("bf16 and fp16 are both true; TrainingArguments refuses that (\"At most one of fp16 and bf16 "
                     "can be True\"): keep one")
    autocast = "bf16" if bf16 else "fp16" if fp16 else None
    # Checkpointing: activation_checkpointing, or its deprecated alias gradient_checkpointing (training_args.py
    # __post_init__); TRL's default is true.
    _hf_checkpointing(r, trl)
    # Optimizer.
    optim = r.get("optim")
    _optimizer(r, "optim", optim if optim is not None else HF_DEFAULT_OPTIM, optim is None, r.get("optim_args"))
    # Sequence length.
    packing = bool(r.boolean("packing")) if trl else False
    if trl:
        key = "max_seq_length" if r.has("max_seq_length") and not r.has("max_length") else "max_length"
        present = r.has(key)
        length = r.integer(key, None) if present else 1024  # sft_config.py: max_length default 1024
        _sequence(r, key, length, not present, packing, "packing")
        if r.boolean("padding_free"):
            r.set("padded", False, "padding_free", True)  # (rows concatenated: no padding, no mask)
            r.not_modelled("padding_free", True, "rows are concatenated without padding: tokens per step may be "
                           "fewer than batch x length (the estimate counts batch x length)")
    else:
        for key in ("block_size", "max_seq_length"):
            if r.has(key):
                _sequence(r, key, r.integer(key, None), False, key == "block_size", "grouped texts")
                break
        else:
            r.note("TrainingArguments fixes no sequence length: give --seq-len (the estimate uses memcalc's)")
    # Attention.
    for key in ("attn_implementation", "model_init_kwargs.attn_implementation"):
        if r.has(key) and r.get(key) is not None:
            _attention(r, key, r.get(key))
    # Distributed engines.
    deepspeed = _deepspeed(r, "deepspeed")
    fsdp = _fsdp(r, "fsdp", "fsdp_config", None, 2) if not deepspeed else False
    # LoRA and quantization (TRL ModelConfig).
    lora = False
    if trl and r.boolean("use_peft"):
        lora = True
        present = r.has("lora_r")
        r.set("lora_rank", r.integer("lora_r", 16), "lora_r", default=not present)
        # model_config.py ModelConfig.lora_dropout: 0.05 by default.
        r.set("lora_dropout", r.fraction("lora_dropout", 0.05), "lora_dropout", default=not r.has("lora_dropout"))
        _lora_targets(r, "lora_target_modules", r.names("lora_target_modules"), "lora_target_modules")
        _peft_extras(r, "use_dora", "lora_modules_to_save")
    quantized = False
    for key in ("load_in_4bit", "load_in_8bit"):
        if r.boolean(key):
            quantized = True
            _quantized(r, key, 4 if key == "load_in_4bit" else 8, lora,
                       r.boolean("use_bnb_nested_quant") if trl else None, "use_bnb_nested_quant")
    # The dtype the model is loaded in. TRL: ModelConfig.dtype, default float32 (model_config.py; sft_trainer.py
    # applies the same default to model_init_kwargs); run_clm: torch_dtype, default None, which transformers 5
    # from_pretrained reads as "auto" (modeling_utils.py from_pretrained: `if dtype is None: dtype = "auto"`).
    dtype_key, written = next(((k, r.get(k)) for k in ("dtype", "torch_dtype", "model_init_kwargs.dtype",
                                                      "model_init_kwargs.torch_dtype") if r.get(k) is not None),
                              ("dtype" if trl else "torch_dtype", "float32" if trl else "auto"))
    weights = _dtype(r, dtype_key, written)
    if r.settings.get("qlora") and weights in ("bf16", "fp16"):
        # TRL's SFTTrainer never calls PEFT's prepare_model_for_kbit_training (sft_trainer.py: get_peft_model, then
        # the QLoRA adapters cast to bf16): the base's non-quantized tensors stay in the dtype it loads.
        r.set("qlora_upcast", False, "load_in_4bit", True)
        r.note(f"load_in_4bit: TRL does not upcast the base's non-quantized tensors (no prepare_model_for_kbit_"
               f"training in sft_trainer.py); they stay {weights}")
    loads = "the checkpoint's dtype" if written == "auto" else written
    if not r.has(dtype_key):
        r.note(f"{dtype_key} absent: {trainer} loads the model in {loads} "
               f"({'ModelConfig.dtype default' if trl else 'transformers 5 from_pretrained: dtype None is auto'})")
    # Who upcasts: PEFT's get_peft_model casts 16-bit adapters to fp32 (autocast_adapter_dtype=True), except that
    # TRL passes False under ZeRO-3 and casts QLoRA adapters to bf16 (sft_trainer.py); accelerate's FSDP2 upcasts
    # every trainable parameter with mixed precision on.
    upcast = lora and not (trl and quantized)
    if deepspeed:
        _deepspeed_precision(r, autocast, bf16_default)
    else:
        absent = " (absent: default)"
        flag = "fp16" if fp16 else "bf16"
        label = (f"{dtype_key} {_text(written)}{'' if r.has(dtype_key) else absent}, {flag} "
                 f"{_text(bf16 if flag == 'bf16' else fp16)}{absent if flag == 'bf16' and bf16_default else ''}")
        _set_recipe(r, label, weights, autocast, trainable_fp32=upcast, lora=lora, fsdp=fsdp,
                    auto=f"{dtype_key} auto{'' if r.has(dtype_key) else ', the default'}",
                    why=f"the model loads in {loads}, {autocast or 'no'} autocast"
                        f"{' (TRL: bf16 unless fp16)' if bf16_default and trl and bf16 else ''}"
                        f"{'; LoRA adapters in fp32 (PEFT autocast_adapter_dtype)' if upcast else ''}"
                        f"{'; ' + _FSDP_UPCAST if fsdp and autocast else ''}")
    _hf_unmodelled(r, trl)


_FSDP_UPCAST = "FSDP keeps fp32 trainable shards (accelerate fsdp2_prepare_model, Accelerator.prepare_model)"
_FSDP2_PARAMS4BIT = ("FSDP2 leaves the trainable parameters in their dtype beside 4-bit weights (accelerate "
                     "fsdp2_prepare_model skips its upcast with Params4bit)")


def _hf_checkpointing(r: _Reader, trl: bool) -> None:
    key = "activation_checkpointing" if r.has("activation_checkpointing") else "gradient_checkpointing"
    present = r.has(key) and r.get(key) is not None
    enabled = r.boolean(key, trl)
    r.set("checkpointing", "full" if enabled else "none", key, bool(enabled), default=not present)
    kwargs_key = next((k for k in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
                       if r.has(k)), None)
    if kwargs_key is not None and enabled:
        # TRL: sft_trainer.py SFTTrainer.__init__ setdefault("use_reentrant", False) on the kwargs.
        _checkpointing_kwargs(r, kwargs_key, absent_reentrant=False if trl else None)


def _checkpointing_kwargs(r: _Reader, kwargs_key: str, *, absent_reentrant: bool | None) -> None:
    """gradient_checkpointing_kwargs as transformers' Trainer uses them (trainer.py: every_n_layers and offload popped,
    the rest passed to torch.utils.checkpoint.checkpoint through activation_checkpointing_enable, an empty rest as
    None, which modeling_utils.py _activation_checkpointing_enable makes {"use_reentrant": False}).
    ``absent_reentrant``: use_reentrant when the kwargs do not name it; None: transformers' own rule (False for an empty
    rest, else torch's default, torch/utils/checkpoint.py checkpoint: use_reentrant None is True, with a warning)."""
    kwargs = r.section(kwargs_key)
    if "every_n_layers" in kwargs:
        every = r.integer(f"{kwargs_key}.every_n_layers")
        if every is not None and every > 1:
            # modeling_utils.py _activation_checkpointing_enable: layer_index % every_n_layers == 0 (layers 0, N,
            # 2N...); memcalc's every:N counts layers N-1, 2N-1...: as many when N divides the depth, else one
            # fewer checkpointed (higher).
            r.set("checkpointing", f"every:{every}", f"{kwargs_key}.every_n_layers", every)
            r.note(f"every_n_layers {every}: transformers checkpoints layers 0, {every}, {2 * every}...; memcalc's "
                   f"every:{every} the same number when {every} divides the depth, else one fewer (higher)")
    if kwargs.get("offload"):
        # modeling_utils.py _activation_checkpointing_enable(offload=True): save_on_cpu around each checkpoint.
        r.set("activation_offload", "checkpoints", f"{kwargs_key}.offload", True)
    if "use_reentrant" in kwargs:
        if r.boolean(f"{kwargs_key}.use_reentrant", False):
            r.set("checkpoint_reentrant", True, f"{kwargs_key}.use_reentrant", True)
        return
    rest = sorted(set(kwargs) - {"every_n_layers", "offload"})
    reentrant = absent_reentrant if absent_reentrant is not None else bool(rest)
    if reentrant:
        r.set("checkpoint_reentrant", True, f"{kwargs_key}.use_reentrant", True, default=True)
        r.note(f"{kwargs_key} passes {', '.join(rest)} without use_reentrant to torch.utils.checkpoint, whose "
               "default is the reentrant variant")


def _liger(r: _Reader, key: str, config_key: str | None = None) -> None:
    """Liger's kernels for the model (liger_kernel.transformers apply_liger_kernel_to_<model>: rope, rms_norm, swiglu
    and fused_linear_cross_entropy on by default; transformers integrations/liger.py passes liger_kernel_config)."""
    config = r.section(config_key) if config_key and r.has(config_key) else {}
    fused = config.get("fused_linear_cross_entropy", True)
    if config_key and "fused_linear_cross_entropy" in config:
        r.get(f"{config_key}.fused_linear_cross_entropy")
    if fused:
        r.set("loss", "fused-linear", key, True)
    r.not_modelled(key, True, "Liger's fused RMSNorm, RoPE and SwiGLU save other tensors than transformers' modules; "
                   "counted unfused")


def _peft_extras(r: _Reader, dora_key: str, modules_to_save_key: str) -> None:
    if r.boolean(dora_key):
        r.set("dora", True, dora_key, True)
    saved = r.names(modules_to_save_key)
    if saved:
        # peft LoraConfig.modules_to_save: a trainable copy of each beside the frozen original.
        r.set("lora_modules_to_save", ",".join(saved), modules_to_save_key, saved)


def _deepspeed_precision(r: _Reader, autocast: str | None, default: bool = False) -> None:
    """With DeepSpeed the DeepSpeed config's bf16/fp16 sections decide the recipe; the trainer's bf16/fp16 fill its
    "auto" values (transformers integrations/deepspeed.py, trainer_config_process: fill_match("bf16.enabled",
    args.bf16)), as memcalc's --precision bf16/fp16 does."""
    if autocast is not None:
        r.set("precision", autocast, autocast, True, default=default)
    r.note("precision: the DeepSpeed config's bf16/fp16 sections decide it (the trainer's flags fill \"auto\")")


HF_WHOLE_MODEL = ("HF Trainer compiles the whole model (torch.compile(model)); memcalc compiles each decoder layer and "
                  "counts the embeddings, head and loss eager (not measured against a whole-model compile; compiled, "
                  "the head and loss would hold less)")


def _compile(r: _Reader, key: str, how: str) -> None:
    """torch.compile: --compile, unless the config also asks for what --compile is not modelled with (then eager,
    which holds more: high)."""
    settings = r.settings
    beside = [name for name, given in (
        ("selective-op checkpointing", settings.get("checkpointing") == "selective-op"),
        ("ZeRO/FSDP sharding", bool(settings.get("zero")) or settings.get("deepspeed") is not None))
        if given]
    if beside:
        r.not_modelled(key, r.get(key), f"--compile is not modelled with {' and '.join(beside)}; counted as eager "
                       "(high: the compiled layers hold less)")
        return
    r.set("compile", True, key, r.get(key))
    r.note(f"{key}: {how}", about="compile")


def _hf_unmodelled(r: _Reader, trl: bool) -> None:
    if r.boolean("use_liger_kernel"):
        _liger(r, "use_liger_kernel", "liger_kernel_config")
    compile_keys = [k for k in ("torch_compile", "torch_compile_backend", "torch_compile_mode") if r.get(k)]
    smoothing = r.get("label_smoothing_factor")
    if isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool) and smoothing > 0:
        r.not_modelled("label_smoothing_factor", smoothing, "the Trainer's LabelSmoother takes its own log-softmax "
                       "of the logits; memcalc counts the model's loss only (low)")
    if r.boolean("use_cpu"):
        raise r.fail("use_cpu true trains on the CPU; memcalc estimates GPU memory")
    if r.get("neftune_noise_alpha") is not None:
        r.not_modelled("neftune_noise_alpha", r.get("neftune_noise_alpha"), "NEFTune's noisy embeddings add an "
                       "embedding-sized tensor in the forward")
    if compile_keys:
        _compile(r, compile_keys[0], HF_WHOLE_MODEL)
    if not trl:
        return
    loss = r.get("loss_type")
    if loss is None:
        # sft_config.py: unset loss_type is chunked_nll, or nll with use_liger_kernel.
        loss = "nll" if r.get("use_liger_kernel") else "chunked_nll"
        key = "loss_type (absent: default)"
    else:
        key = "loss_type"
    if r.settings.get("loss") == "fused-linear":
        r.counted(key, loss, "Liger's fused linear cross-entropy computes the loss")
    elif loss == "chunked_nll":
        r.not_modelled(key, loss, "TRL computes lm_head and the cross-entropy in chunks over non-ignored tokens; "
                       "memcalc counts the full logits and loss (high)")
    elif loss == "nll":
        r.counted(key, loss, "the full-logits loss memcalc counts")
    else:
        r.not_modelled(key, loss, "a loss memcalc has no rule for; counted as the full-logits cross-entropy")
    if r.boolean("activation_offloading"):
        # trainer/sft_trainer.py: get_act_offloading_ctx_manager(model) around training_step.
        r.set("activation_offload", "trl", "activation_offloading", True)


# -- axolotl --------------------------------------------------------------------------------------------------------


_PYDANTIC_TRUE = ("1", "on", "t", "true", "y", "yes")
_PYDANTIC_FALSE = ("0", "off", "f", "false", "n", "no")


def _schema_value(r: _Reader, key: str, default: Any, literals: tuple[str, ...]) -> Any:
    """A key axolotl's schema types ``Literal[*literals] | bool | None``, as pydantic validates it: one of the
    literals as written, else a bool in pydantic's lax form (1/0, "yes"/"no", "on"/"off"...); anything else
    axolotl refuses, and so does this."""
    value = r.get(key, None)
    if value is None:
        return default
    if value in literals or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _PYDANTIC_TRUE + _PYDANTIC_FALSE:
        return value.strip().lower() in _PYDANTIC_TRUE
    allowed = ", ".join(f"'{literal}'" for literal in literals)
    raise r.fail(f"{key} must be {allowed}, true or false (axolotl's schema), got {_text(value)}")


def _read_axolotl(r: _Reader) -> None:
    """axolotl's YAML (src/axolotl/utils/schemas/, utils/config/__init__.py normalize_config and resolve_dtype)."""
    rl = r.get("rl")
    if rl:
        raise r.fail(f"rl {_text(rl)}: preference and RL training (a reference model, paired sequences) is not "
                     "modelled; memcalc estimates supervised fine-tuning and pre-training")
    model = r.text("base_model_config") or r.text("base_model")
    if model is None:
        raise r.fail("base_model is empty; axolotl needs it")
    r.model = model
    r.get("base_model")
    r.set("model", model, "base_model_config" if r.has("base_model_config") else "base_model")
    # Batch: micro_batch_size (default 1); gradient_accumulation_steps (default 1), or batch_size // micro_batch_size
    # when only batch_size is given (normalize_config).
    micro = r.integer("micro_batch_size", 1)
    r.set("batch_size", micro, "micro_batch_size", default=not r.has("micro_batch_size"))
    if r.has("gradient_accumulation_steps") or not r.has("batch_size"):
        r.set("grad_accum", r.integer("gradient_accumulation_steps", 1), "gradient_accumulation_steps",
              default=not r.has("gradient_accumulation_steps"))
    else:
        total = r.integer("batch_size")
        assert total is not None and micro is not None
        r.set("grad_accum", max(total // micro, 1), "batch_size", total)
    # Sequence: sequence_len (default 512); packed rows or pad_to_sequence_len are exactly that long.
    packing, padded = r.boolean("sample_packing"), r.boolean("pad_to_sequence_len")
    packed = bool(packing) or bool(padded)
    present = r.has("sequence_len")
    _sequence(r, "sequence_len", r.integer("sequence_len", 512), not present, packed, "sample_packing")
    # Optimizer (default adamw_torch_fused: schemas/training.py).
    optim = r.get("optimizer")
    _optimizer(r, "optimizer", optim if optim is not None else HF_DEFAULT_OPTIM, optim is None,
               r.get("optim_args"))
    # Checkpointing (default false): true, or the deprecated "offload"/"offload_disk", which the schema's validator
    # (schemas/validation.py check_gradient_checkpointing_w_offload) turns into checkpointing on with
    # activation_offloading true (its stream offloader) or "disk".
    checkpointing = _schema_value(r, "gradient_checkpointing", False, ("offload", "offload_disk"))
    r.set("checkpointing", "full" if checkpointing else "none", "gradient_checkpointing", checkpointing,
          default=not r.has("gradient_checkpointing"))
    offload_key, offloading = "activation_offloading", r.get("activation_offloading")
    if checkpointing in ("offload", "offload_disk"):
        offload_key, offloading = "gradient_checkpointing", True if checkpointing == "offload" else "disk"
    if checkpointing and r.get("gradient_checkpointing_kwargs") is not None:
        # core/builders/base.py _configure_gradient_checkpointing: passed on to TrainingArguments as written.
        _checkpointing_kwargs(r, "gradient_checkpointing_kwargs", absent_reentrant=None)
    elif checkpointing and r.get("unfrozen_parameters") is None:
        # utils/config/__init__.py normalize_config: gradient_checkpointing on, no gradient_checkpointing_kwargs and no
        # unfrozen_parameters (rl is refused above) -> gradient_checkpointing_kwargs {"use_reentrant": True}.
        r.set("checkpoint_reentrant", True, "gradient_checkpointing_kwargs", {"use_reentrant": True}, default=True)
    if offloading is True:
        # core/trainers/mixins/activation_checkpointing.py: TRL's get_act_offloading_ctx_manager around training_step
        # (LoRA models: its own variant), with patches that clone non-contiguous saved tensors first.
        r.set("activation_offload", "trl", offload_key, checkpointing if offload_key != "activation_offloading" else True)
        r.note(f"{offload_key} {_text(checkpointing) if offload_key != 'activation_offloading' else 'true'}: axolotl "
               "runs TRL's OffloadActivations (counted as --activation-offload trl); its clone of non-contiguous saved "
               "tensors before offloading is not modelled", about="activation_offload")
    elif offloading:
        r.not_modelled(offload_key, checkpointing if offload_key != "activation_offloading" else offloading,
                       "axolotl's legacy/disk/hidden_states offloading moves saved activations to CPU RAM or disk; "
                       "memcalc counts them on the GPU (high)")
    _axolotl_attention(r)
    # Adapters.
    adapter = r.text("adapter")
    lora = adapter in ("lora", "qlora")
    if adapter is not None and not lora:
        raise r.fail(f"adapter {shown(adapter)} is not modelled (memcalc models lora and qlora)")
    if lora:
        rank = r.integer("lora_r")
        if rank is None:
            raise r.fail("adapter lora needs lora_r (axolotl refuses it without)")
        r.set("lora_rank", rank, "lora_r")
        # utils/schemas/peft.py: lora_dropout 0.0 by default.
        r.set("lora_dropout", r.fraction("lora_dropout", 0.0), "lora_dropout", default=not r.has("lora_dropout"))
        if r.boolean("lora_target_linear"):
            r.set("lora_targets", "all-linear", "lora_target_linear", True)
            r.names("lora_target_modules")
        else:
            _lora_targets(r, "lora_target_modules", r.names("lora_target_modules"), "lora_target_modules")
        _peft_extras(r, "peft_use_dora", "lora_modules_to_save")
        if adapter == "qlora" and not r.boolean("load_in_4bit"):
            raise r.fail("adapter qlora needs load_in_4bit: true (axolotl refuses it without)")
    for key in ("load_in_4bit", "load_in_8bit"):
        if r.boolean(key):
            # loaders/model.py ModelLoader._set_quantization_config: axolotl's QLoRA BitsAndBytesConfig sets
            # bnb_4bit_use_double_quant True, then applies bnb_config_kwargs over it.
            _quantized(r, key, 4 if key == "load_in_4bit" else 8, lora,
                       r.boolean("bnb_config_kwargs.bnb_4bit_use_double_quant", True),
                       "bnb_config_kwargs.bnb_4bit_use_double_quant", "bnb_config_kwargs.llm_int8_skip_modules")
    if r.settings.get("qlora"):
        # loaders/model.py ModelLoader: _prepare_model_for_quantization skips PEFT's prepare_model_for_kbit_training
        # under FSDP or ZeRO-3, and otherwise _configure_embedding_dtypes casts every module named *norm* and the
        # embeddings and head (get_linear_embedding_layers) back to torch_dtype after it (should_convert: QLoRA
        # without FSDP); with FSDP nothing was upcast. Either way the base's non-quantized tensors train in 16 bits.
        r.set("qlora_upcast", False, "adapter", adapter)
        r.note("adapter qlora: axolotl leaves the base's non-quantized tensors in its 16-bit dtype (it skips "
               "prepare_model_for_kbit_training under FSDP or ZeRO-3, else casts norms, embeddings and head back after "
               "it: loaders/model.py); biases and MoE routers it leaves in fp32 are counted 16-bit (low by 2 bytes "
               "each)")
        if r.boolean("fp32_norms"):
            # utils/fp32_norms.py get_fp32_norm_patterns: norm modules kept in fp32.
            r.not_modelled("fp32_norms", True, "norm weights kept in fp32 are counted 16-bit (low by 2 bytes per "
                           "norm weight)")
    # Precision (resolve_dtype): bf16 "auto" is true on a GPU with bf16 (assumed); the model loads in
    # torch_dtype = bf16 if bf16 or bfloat16, fp16 if load_in_8bit, fp16 or float16, else fp32; HF Trainer then
    # autocasts with args.bf16/fp16.
    bf16 = _schema_value(r, "bf16", "auto", ("auto",))  # schemas/config.py: bf16 defaults to "auto"
    fp16 = bool(_schema_value(r, "fp16", False, ()))
    if bf16 == "auto" and not fp16:
        r.note("bf16 auto: true on a GPU with bf16 (Ampere or newer), as assumed here")
    bf16_on = bf16 is True or (bf16 == "auto" and not fp16)
    fp16_on = fp16 and not bf16_on
    pure_bf16, pure_fp16, eight_bit = r.boolean("bfloat16"), r.boolean("float16"), r.boolean("load_in_8bit")
    weights = "bf16" if (bf16_on or pure_bf16) else "fp16" if (eight_bit or fp16_on or pure_fp16) else "fp32"
    autocast = "bf16" if bf16_on else "fp16" if fp16_on else None
    deepspeed = _deepspeed(r, "deepspeed")
    fsdp = _fsdp(r, "fsdp", "fsdp_config", "fsdp_version", 1, config_enables=True) if not deepspeed else False
    _axolotl_hsdp(r)
    upcast = lora and bool(r.boolean("peft_autocast_adapter_dtype", True))
    if deepspeed:
        _deepspeed_precision(r, autocast)
    else:
        label = (f"bf16 {_text(bf16)}{'' if r.has('bf16') else ' (absent: default)'}, fp16 {_text(fp16)} "
                 f"({weights} weights)")
        _set_recipe(r, label, weights, autocast, trainable_fp32=upcast, lora=lora, fsdp=fsdp,
                    why=f"axolotl loads the model in {weights} (resolve_dtype), {autocast or 'no'} autocast"
                        f"{'; LoRA adapters in fp32 (PEFT autocast_adapter_dtype)' if upcast else ''}"
                        f"{'; ' + _FSDP_UPCAST if fsdp and autocast else ''}")
    _axolotl_unmodelled(r)


def _axolotl_hsdp(r: _Reader) -> None:
    """utils/distributed.py build_parallelism_config: _get_parallel_config_kwargs gives tp, cp, then dp_replicate_size
    and dp_shard_size their ranks (the one left open takes the rest of the world) into accelerate's ParallelismConfig,
    whose fsdp_dim_names ("dp_replicate", "dp_shard_cp") fsdp2_prepare_model shards on: HSDP."""
    for key, setting in (("dp_replicate_size", "dp_replicate"), ("dp_shard_size", "dp_shard")):
        value = r.integer(key) if r.get(key) is not None else None
        if value == 1 and key == "dp_replicate_size":  # (_get_parallel_config_kwargs reads it only above 1)
            r.counted(key, value, "no replicas of their own: the ranks left over from dp_shard_size are replicas")
        elif value is not None and value <= 1 and key == "dp_shard_size":  # (read only above 1, too)
            r.counted(key, value, "no shard group of its own: FSDP shards over the data-parallel ranks")
        elif value is not None:
            r.set(setting, value, key)


def _axolotl_attention(r: _Reader) -> None:
    if r.get("attn_implementation") is not None:
        _attention(r, "attn_implementation", r.get("attn_implementation"))
        return
    # Deprecated switches (schemas/config.py): each names an attn_implementation.
    for key, value in (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
                       ("eager_attention", "eager"), ("xformers_attention", "xformers"),
                       ("flex_attention", "flex_attention"), ("sage_attention", "sage")):
        if r.boolean(key, False):
            _attention(r, key, value)
            return
    attention = r.get("attention")  # older examples: attention: flash
    if attention is not None:
        _attention(r, "attention", {"flash": "flash_attention_2"}.get(attention, attention))


def _axolotl_unmodelled(r: _Reader) -> None:
    plugins = r.get("plugins") or []
    if not isinstance(plugins, list):
        raise r.fail(f"plugins must be a list, got {_text(plugins)}")
    for plugin in plugins:
        r.not_modelled("plugins", plugin, "a plugin's kernels and patches (Liger, Cut Cross-Entropy...) are not "
                       "counted; see its switches")
    for key, value in r.data.items():
        if key == "liger_fused_linear_cross_entropy" and value is True:
            r.set("loss", "fused-linear", key, True)
        elif key.startswith("liger_") and value:
            r.get(key)
            r.not_modelled(key, value, "a Liger kernel (fused norms, RoPE, SwiGLU) saves other tensors than "
                           "transformers' modules; counted unfused")
    if r.get("cut_cross_entropy"):
        r.set("loss", "fused-linear", "cut_cross_entropy", True)
        r.note("cut_cross_entropy: Apple's Cut Cross-Entropy keeps less than Liger's fused linear cross-entropy, as "
               "which it is counted (high)")
    if r.get("torch_compile"):
        _compile(r, "torch_compile", HF_WHOLE_MODEL)
    if r.get("unfrozen_parameters"):
        r.not_modelled("unfrozen_parameters", r.get("unfrozen_parameters"), "only the matching parameters train; "
                       "memcalc counts every parameter trainable (high)")
    _axolotl_parallel(r)
    if r.boolean("fp8"):
        # core/trainers/base.py additional_accelerator_args: accelerate's mixed_precision "fp8" with AORecipeKwargs(
        # Float8LinearConfig(...)), torchao's tensorwise scaling by default; accelerate/utils/ao.py
        # convert_model_to_fp8_ao (from Accelerator.prepare) skips the first and last Linear (filter_linear_layers with
        # find_first_last_linear_layers), torchtitan's converter (memcalc's --fp8) the output head only. FSDP's
        # param_dtype for "fp8" is bf16 (FullyShardedDataParallelPlugin.set_mixed_precision).
        r.set("fp8", "tensorwise", "fp8", True)
        r.note("fp8 true: torchao's float8 Linear with tensorwise scales (accelerate's AO recipe); accelerate also "
               "leaves the first decoder Linear in bf16, which memcalc converts (its float8 casts counted: high by "
               "one layer's)")
        if r.boolean("fp8_enable_fsdp_float8_all_gather"):
            r.not_modelled("fp8_enable_fsdp_float8_all_gather", True, "FSDP gathers the float8 weights (1 byte per "
                           "element); memcalc gathers them in bf16 (high)")
    if r.boolean("tiled_mlp"):
        # monkeypatch/tiled_mlp/base.py TiledMLP: the MLP run over sequence shards, saving only its input and
        # recomputing each shard in backward.
        r.not_modelled("tiled_mlp", True, "axolotl runs the MLP over sequence shards, saving only its input; memcalc "
                       "counts the whole MLP's saved tensors (high)")
    kernels = [key for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel") if r.boolean(key)]
    for key in kernels:
        # kernels/lora.py: custom autograd functions for LoRA's MLP, QKV and output projections.
        r.not_modelled(key, True, "axolotl's fused LoRA kernels save other tensors than PEFT's LoRA layers, which "
                       "memcalc counts (direction not measured)")
    if r.boolean("use_kernels"):
        # loaders/model.py: from_pretrained(use_kernels=True): transformers' hub kernels (kernels-community) replace
        # modules (norms, activations, MoE experts) with their own.
        r.not_modelled("use_kernels", True, "transformers' hub kernels replace norms, activations or MoE experts with "
                       "code whose saved tensors memcalc does not know; counted as transformers' modules (direction "
                       "not known)")


def _axolotl_parallel(r: _Reader) -> None:
    """axolotl's tensor and context parallelism (utils/trainer.py setup_parallelism_envs: PARALLELISM_CONFIG_TP_SIZE,
    _CP_SIZE for accelerate's ParallelismConfig, whose ranks multiply to the world size; the data-parallel sizes:
    _axolotl_hsdp)."""
    sizes = {}
    for key in ("tensor_parallel_size", "context_parallel_size"):
        size = r.integer(key, None, minimum=1) if r.has(key) and r.get(key) is not None else None
        if size is not None:
            sizes[key] = size
    tp, cp = (sizes.get(k, 1) for k in ("tensor_parallel_size", "context_parallel_size"))
    if tp > 1:
        # transformers' tp_plan (models/llama/configuration_llama.py base_model_tp_plan) splits the attention and MLP
        # projections and leaves the embeddings and norms whole on every tensor-parallel rank; memcalc's --tp is
        # torchtitan's plan, which splits the embeddings too.
        r.not_modelled("tensor_parallel_size", tp, "transformers' tensor-parallel plan splits each layer's "
                       "projections and their activations over the ranks (memcalc counts them whole: high) and keeps "
                       "the embeddings whole on each (memcalc shards them over all --gpus: low); direction not known")
    if cp > 1:
        # monkeypatch/ring_attn (ring-flash-attn) and utils/ctx_managers/sequence_parallel.py: each rank runs its slice
        # of the sequence; memcalc's --cp is torch's context_parallel with sdpa.
        r.not_modelled("context_parallel_size", cp, "each rank keeps the activations of its slice of the sequence "
                       "(ring-flash-attn); memcalc counts the whole sequence on each GPU (high)")
    # (dp_shard_size and dp_replicate_size: _axolotl_hsdp)


# -- LLaMA-Factory --------------------------------------------------------------------------------------------------


def _read_llamafactory(r: _Reader) -> None:
    """LLaMA-Factory's YAML (src/llamafactory/hparams: ModelArguments, DataArguments, FinetuningArguments,
    Seq2SeqTrainingArguments; model/loader.py, adapter.py, model_utils/checkpointing.py)."""
    stage = r.text("stage", "sft")
    if stage not in ("sft", "pt"):
        raise r.fail(f"stage {shown(stage)} (reward, PPO, DPO or KTO training) is not modelled; memcalc estimates "
                     "sft and pt")
    model = r.text("model_name_or_path")
    if model is not None:
        r.model = model
        r.set("model", model, "model_name_or_path")
    finetuning = r.text("finetuning_type", "lora")
    if finetuning not in ("lora", "full", "freeze"):
        raise r.fail(f"finetuning_type {shown(finetuning)} is not modelled (memcalc models lora, full and freeze)")
    if finetuning == "freeze":
        r.not_modelled("finetuning_type", "freeze", "only the last freeze_trainable_layers layers train; memcalc "
                       "counts every layer trainable (high)")
    r.set("batch_size", r.integer("per_device_train_batch_size", 8), "per_device_train_batch_size",
          default=not r.has("per_device_train_batch_size"))
    r.set("grad_accum", r.integer("gradient_accumulation_steps", 1), "gradient_accumulation_steps",
          default=not r.has("gradient_accumulation_steps"))
    # cutoff_len (default 2048); packing defaults to true for stage pt (data_args.py / parser.py).
    packing = r.boolean("packing", None)
    packed = bool(packing) if packing is not None else stage == "pt"
    neat = r.boolean("neat_packing")
    packed = packed or bool(neat)
    _sequence(r, "cutoff_len", r.integer("cutoff_len", 2048), not r.has("cutoff_len"), packed, "packing")
    # checkpointing.py prepare_model_for_training: on unless disable_gradient_checkpointing.
    disabled = r.boolean("disable_gradient_checkpointing")
    r.set("checkpointing", "none" if disabled else "full", "disable_gradient_checkpointing", bool(disabled),
          default=not r.has("disable_gradient_checkpointing"))
    if r.boolean("use_unsloth_gc"):
        r.not_modelled("use_unsloth_gc", True, "unsloth's checkpointing offloads the checkpoints to CPU RAM; "
                       "counted on the GPU (high)")
    elif not disabled and r.boolean("use_reentrant_gc", True):
        # model_args.py use_reentrant_gc True by default; model_utils/checkpointing.py prepare_model_for_training passes
        # {"use_reentrant": use_reentrant_gc} to torch.utils.checkpoint (False under FSDP2, which the launcher sets).
        r.set("checkpoint_reentrant", True, "use_reentrant_gc", True, default=not r.has("use_reentrant_gc"))
    for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon"):
        if r.boolean(key):
            raise r.fail(f"{key} replaces the optimizer with one memcalc has no model for")
    optim = r.get("optim")
    _optimizer(r, "optim", optim if optim is not None else HF_DEFAULT_OPTIM, optim is None, r.get("optim_args"))
    attention = r.text("flash_attn")
    if attention is not None:
        # model_utils/attention.py configure_attn_implementation: auto leaves transformers' default (sdpa).
        mapped = {"auto": "sdpa", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
                  "fa3": "flash_attention_3"}.get(attention, attention)
        _attention(r, "flash_attn", mapped)
    # LoRA (finetuning_args.py: lora_rank 8, lora_target "all").
    lora = finetuning == "lora"
    if lora:
        r.set("lora_rank", r.integer("lora_rank", 8), "lora_rank", default=not r.has("lora_rank"))
        # finetuning_args.py: lora_dropout 0.0 by default.
        r.set("lora_dropout", r.fraction("lora_dropout", 0.0), "lora_dropout", default=not r.has("lora_dropout"))
        targets = r.names("lora_target")
        if targets is None or targets == ["all"]:
            r.set("lora_targets", "all-linear", "lora_target", "all", default=targets is None)
        else:
            r.set("lora_targets", ",".join(targets), "lora_target", targets)
        _peft_extras(r, "use_dora", "additional_target")
    bits = r.get("quantization_bit")
    quantized = bits is not None
    if quantized:
        method = r.text("quantization_method", "bnb")
        if method != "bnb":
            r.not_modelled("quantization_method", method, "a quantization memcalc has no layout for; counted as "
                           "bitsandbytes")
        _quantized(r, "quantization_bit", bits, lora, r.boolean("double_quantization", True), "double_quantization")
        if r.settings.get("qlora"):
            # LLaMA-Factory never calls PEFT's prepare_model_for_kbit_training; model/adapter.py upcasts only the
            # trainable parameters (and upcast_layernorm the norms): the base's other tensors keep the checkpoint's
            # dtype.
            r.set("qlora_upcast", False, "quantization_bit", bits)
            r.note("quantization_bit 4: LLaMA-Factory does not upcast the base's non-quantized tensors (no "
                   "prepare_model_for_kbit_training; model/adapter.py upcasts the trainable ones only)")
    deepspeed = _deepspeed(r, "deepspeed")
    # Precision: the checkpoint's dtype (loader.py: torch_dtype "auto"); trainable parameters upcast to fp32
    # unless pure_bf16 (or BAdam), or under ZeRO-3 without quantization (adapter.py init_adapter).
    fp16 = bool(r.boolean("fp16"))
    bf16 = bool(r.boolean("bf16"))
    pure = bool(r.boolean("pure_bf16"))
    if bf16 and fp16:
        raise r.fail("bf16 and fp16 are both true; keep one")
    autocast = "bf16" if bf16 else "fp16" if fp16 else None
    if deepspeed:
        if pure:
            r.not_modelled("pure_bf16", True, "under DeepSpeed the config's bf16 section decides the recipe")
        _deepspeed_precision(r, autocast)
    elif pure:
        r.set("precision", "bf16-pure", "pure_bf16", True)
    else:
        _set_recipe(r, f"bf16 {_text(bf16)}, fp16 {_text(fp16)} (the checkpoint's dtype)", "auto", autocast,
                    trainable_fp32=True, lora=lora, auto="LLaMA-Factory loads torch_dtype auto",
                    why=f"LLaMA-Factory loads the checkpoint's dtype (loader.py: torch_dtype auto) and upcasts "
                        f"trainable parameters to fp32 (adapter.py init_adapter), {autocast or 'no'} autocast")
    if r.settings.get("checkpoint_reentrant"):
        # model_utils/checkpointing.py prepare_model_for_training: ACCELERATE_USE_FSDP with FSDP_VERSION 2 sets
        # use_reentrant_gc False (memcalc's --fsdp is FSDP2's fully_shard).
        why = "use_reentrant_gc: LLaMA-Factory checkpoints non-reentrantly under FSDP2 (prepare_model_for_training)"
        r.launched.setdefault("fsdp", {})["drop"] = (("checkpoint_reentrant", "use_reentrant_gc", why),)
    if r.boolean("enable_liger_kernel"):
        # model_utils/liger_kernel.py: fused_linear_cross_entropy stays on for stages pt and sft (require_logits off).
        _liger(r, "enable_liger_kernel")
    if r.boolean("use_unsloth"):
        r.not_modelled("use_unsloth", True, "unsloth's patched model saves less than transformers' (high)")
    if r.boolean("upcast_layernorm"):
        r.not_modelled("upcast_layernorm", True, "norm weights in fp32 where memcalc counts the recipe's dtype")


# -- torchtune --------------------------------------------------------------------------------------------------------


def _read_torchtune(r: _Reader) -> None:
    """torchtune's recipe configs (recipes/*.py read cfg.batch_size, cfg.gradient_accumulation_steps, cfg.dtype,
    enable_activation_checkpointing...; components are OmegaConf ``_component_`` strings, matched here exactly)."""
    builder = r.text("model._component_")
    if builder is None:
        raise r.fail("model._component_ is missing; a torchtune recipe builds its model from it")
    name = builder.rsplit(".", 1)
    base, prefix = builder, ""
    if len(name) == 2:
        for start in ("qlora_", "lora_"):
            if name[1].startswith(start):
                prefix, base = start, f"{name[0]}.{name[1][len(start):]}"
                break
    known = TORCHTUNE_MODELS.get(base)
    if known is not None:
        r.model = known[0]
        r.set("model", known[0], "model._component_", builder)
        r.note("torchtune's modules are counted as transformers' class of the same model (the same weights; "
               "activations follow transformers' code)")
        # modules/attention.py MultiHeadAttention.forward: k and v expanded to every query head (expand, then
        # flatten: a copy) before sdpa, which saves them.
        r.set("repeat_kv", True, "model._component_", builder)
    else:
        r.note(f"model._component_ {shown(builder)} is not a builder memcalc maps to a preset: give MODEL")
    lora = prefix != ""
    if lora:
        rank = r.integer("model.lora_rank")
        if rank is None:
            raise r.fail(f"{builder} needs model.lora_rank")
        r.set("lora_rank", rank, "model.lora_rank")
        # the lora_* builders' lora_dropout: 0.0 by default.
        r.set("lora_dropout", r.fraction("model.lora_dropout", 0.0), "model.lora_dropout",
              default=not r.has("model.lora_dropout"))
        modules = r.names("model.lora_attn_modules") or []
        unknown = [m for m in modules if m not in TORCHTUNE_LORA_MODULES]
        if unknown or (known is not None and not known[1]):
            raise r.fail(f"model.lora_attn_modules {_text(modules)}: memcalc maps torchtune's q_proj, k_proj, v_proj "
                         "and output_proj of Llama-style models to transformers' modules")
        targets = [TORCHTUNE_LORA_MODULES[m] for m in modules]
        if r.boolean("model.apply_lora_to_mlp"):
            targets.extend(TORCHTUNE_LORA_MLP)
        if r.boolean("model.apply_lora_to_output"):
            # the output projection a LoRALinear (lora_llama3 ... output_proj = adapter_cls(...)): PEFT's lm_head target
            targets.append("lm_head")
            r.counted("model.apply_lora_to_output", True, "lm_head among the LoRA targets")
        r.set("lora_targets", ",".join(targets), "model.lora_attn_modules", modules)
        if r.boolean("model.use_dora"):
            r.set("dora", True, "model.use_dora", True)
        quantize_base = r.boolean("model.quantize_base")
        if prefix == "qlora_" or quantize_base:
            r.set("qlora", True, "model._component_", builder)
            r.set("qlora_upcast", False, "model._component_", builder)  # the model's dtype for all but the NF4 base
            if base.startswith(TORCHTUNE_LORA_TARGETS_ONLY):
                # models/qwen2/_component_builders.py lora_qwen2_self_attention / lora_qwen2: the projections LoRA
                # does not wrap are nn.Linear, quantize_base or not (Qwen2.5 and Qwen3 build from the same code).
                r.set("qlora_scope", "lora-targets", "model._component_", builder)
            # modules/peft/lora.py LoRALinear(quantize_base=True): torchao's to_nf4 and linear_nf4
            r.set("qlora_quantizer", "torchao", "model._component_", builder)
    for key in ("batch_size", "gradient_accumulation_steps"):
        if not r.has(key):
            raise r.fail(f"{key} is missing; torchtune's recipes read it")
    r.set("batch_size", r.integer("batch_size"), "batch_size")
    r.set("grad_accum", r.integer("gradient_accumulation_steps"), "gradient_accumulation_steps")
    packed = bool(r.boolean("dataset.packed"))
    # (unpacked: data/_collate.py padded_collate_sft hands the model tokens and labels, no mask: causal attention over
    # the padding, whose labels are ignored)
    _sequence(r, "tokenizer.max_seq_len", r.integer("tokenizer.max_seq_len", None), False, packed, "dataset.packed",
              masks_padding=False)
    # dtype: training.get_dtype(cfg.dtype): the model is built in it (set_default_dtype) and trains in it.
    dtype = r.text("dtype")
    weights = "fp32" if dtype is None else _dtype(r, "dtype", dtype)
    if weights not in ("fp32", "bf16"):
        # recipes/*.py: "ValueError: If dtype is set to fp16" (training.get_dtype takes fp32 and bf16).
        raise r.fail(f"dtype {shown(dtype)}: torchtune's recipes train in fp32 or bf16 only")
    recipe = "fp32" if weights == "fp32" else f"{weights}-pure"
    r.set("precision", recipe, "dtype", dtype if dtype is not None else "fp32", default=dtype is None)
    r.note(f"precision {recipe}: torchtune builds the model in its dtype and trains it there (no autocast, no "
           "master copy)")
    if r.has("ac_mode"):
        _torchtune_ac_mode(r)
    elif r.boolean("enable_activation_checkpointing"):
        r.set("checkpointing", "full", "enable_activation_checkpointing", True)
    else:
        r.set("checkpointing", "none", "enable_activation_checkpointing", False,
              default=not r.has("enable_activation_checkpointing"))
    _torchtune_optimizer(r)
    if r.has("fsdp_cpu_offload") or r.has("fsdp_reshard_after_forward"):
        reshard = r.boolean("fsdp_reshard_after_forward", True)
        r.set("sharding", "fsdp", "fsdp_reshard_after_forward", reshard)
        r.set("zero", 3 if reshard else 2, "fsdp_reshard_after_forward", reshard)
        if r.boolean("fsdp_cpu_offload"):
            r.not_modelled("fsdp_cpu_offload", True, "FSDP CPU offload keeps parameters, gradients and states in CPU "
                           "RAM; counted on the GPU (high)")
        r.note("the number of GPUs comes from tune run --nproc_per_node: give --gpus N")
    else:
        r.note("the recipe (single device or distributed) is chosen on the tune run command line: counted on one "
               "GPU; for a *_distributed recipe give --fsdp --gpus N")
    _torchtune_hsdp(r)
    # After the sharding: compile beside FSDP is said to be not modelled (_compile), not refused by the spec.
    _torchtune_unmodelled(r)


def _torchtune_hsdp(r: _Reader) -> None:
    """recipes/full_finetune_distributed.py: ParallelDims(dp_replicate=cfg.data_parallel_replicate_dim, dp_shard=
    cfg.data_parallel_shard_dim (-1: the rest of the world), cp, tp); with dp_replicate > 1 training.shard_model shards
    on the ("dp_replicate", "dp_shard_cp") mesh: HSDP (--dp-replicate), or given by its shard group (--dp-shard)."""
    replicate = r.integer("data_parallel_replicate_dim", 1)
    shard = r.integer("data_parallel_shard_dim", -1, minimum=-1)
    if shard == 0:
        raise r.fail("data_parallel_shard_dim must be -1 (the rest of the world) or a whole number of ranks, got 0")
    if r.has("data_parallel_shard_dim") and shard > 0:
        r.set("dp_shard", shard, "data_parallel_shard_dim")
        r.note(f"data_parallel_shard_dim {shard}: torchtune's world is data_parallel_replicate_dim x "
               "data_parallel_shard_dim x context_parallel_dim x tensor_parallel_dim; --gpus must be that product")
    if r.has("data_parallel_replicate_dim") or replicate > 1:
        r.set("dp_replicate", replicate, "data_parallel_replicate_dim", default=not r.has("data_parallel_replicate_dim"))
        if replicate > 1 and "sharding" not in r.settings:  # (only the distributed recipes read the key)
            r.set("sharding", "fsdp", "data_parallel_replicate_dim", replicate)
            r.set("zero", 3, "data_parallel_replicate_dim", replicate)  # (fsdp_reshard_after_forward: True)


def _torchtune_optimizer(r: _Reader) -> None:
    component = r.text("optimizer._component_")
    if component is None:
        raise r.fail("optimizer._component_ is missing; torchtune's recipes build the optimizer from it")
    if component not in TORCHTUNE_OPTIMIZERS:
        raise r.fail(f"optimizer._component_ {shown(repr(component))} is not an optimizer memcalc knows; it reads "
                     f"{', '.join(TORCHTUNE_OPTIMIZERS)}")
    _apply_optimizer(r, "optimizer._component_", component, TORCHTUNE_OPTIMIZERS[component], False)
    name = TORCHTUNE_OPTIMIZERS[component][0]
    if name in ("adamw", "adam") and component.startswith("torch.optim."):
        if r.boolean("optimizer.fused"):
            r.set("optim_impl", "fused", "optimizer.fused", True)
        elif r.boolean("optimizer.foreach", True) is False:
            r.set("optim_impl", "forloop", "optimizer.foreach", False)
        if r.boolean("optimizer.amsgrad"):
            r.set("amsgrad", True, "optimizer.amsgrad", True)
    if name == "sgd":
        momentum = r.get("optimizer.momentum", 0)
        if momentum:
            r.set("optim", "sgd-momentum", "optimizer.momentum", momentum)
    if r.boolean("optimizer_in_bwd"):
        r.set("optim_in_backward", True, "optimizer_in_bwd", True)


def _torchtune_ac_mode(r: _Reader) -> None:
    """ac_mode and ac_option, read by recipes/full_finetune_distributed.py and qat_distributed.py (setup_model): only
    when enable_activation_checkpointing is false do they apply (training/activations.py
    apply_selective_activation_checkpointing); with both set, those recipes checkpoint nothing."""
    mode = r.text("ac_mode")
    option = r.get("ac_option")
    if r.boolean("enable_activation_checkpointing"):
        r.set("checkpointing", "none", "ac_mode", mode)
        r.note("enable_activation_checkpointing and ac_mode are both set: full_finetune_distributed and qat_distributed "
               "then apply neither (setup_model), so no checkpointing is counted; a recipe that does not read ac_mode "
               "checkpoints every layer: give --checkpointing full for it")
        return
    if mode == "full":
        r.set("checkpointing", "full", "ac_mode", mode)
        return
    if mode != "selective":
        # checkpoint_wrapper raises NotImplementedError for any other mode.
        raise r.fail(f"ac_mode {shown(mode)}: torchtune takes full or selective")
    # checkpoint_wrapper: every_x_layer = int(ac_option); layers whose 1-based count divides by it (0: every layer).
    written = str(option).strip() if not isinstance(option, bool) else ""
    every = int(written) if written.isdigit() else None
    if every is None:
        raise r.fail(f"ac_option {shown(option)}: torchtune's selective mode takes a whole number of layers "
                     "(int(ac_option) in training/activations.py checkpoint_wrapper; its op option is not "
                     "implemented); torchtitan's per-op policy is --checkpointing selective-op")
    r.set("checkpointing", "full" if every <= 1 else f"every:{every}", "ac_option", option)


def _torchtune_unmodelled(r: _Reader) -> None:
    loss = r.text("loss._component_")
    if loss == TORCHTUNE_CHUNKED_LOSS:
        chunks = r.integer("loss.num_output_chunks", TORCHTUNE_CHUNKS_DEFAULT)
        r.set("loss", f"chunked:{chunks}", "loss._component_", loss)
    elif loss == "torchtune.modules.loss.LinearCrossEntropyLoss":
        r.not_modelled("loss._component_", loss, "the output projection and cross-entropy run chunk by chunk inside "
                       "the loss; memcalc counts the full logits and loss (high)")
    elif loss in TORCHTUNE_PLAIN_LOSSES:
        r.counted("loss._component_", loss, "the full-logits loss memcalc counts")
    elif loss is not None:
        r.not_modelled("loss._component_", loss, "a loss memcalc has no rule for; counted as the full-logits "
                       "cross-entropy")
    if r.boolean("enable_activation_offloading"):
        # training.get_act_offloading_ctx_manager(model, enable_activation_offloading): OffloadActivations around the
        # model's forward, the output head excepted.
        r.set("activation_offload", "torchtune", "enable_activation_offloading", True)
    if r.boolean("compile"):
        # training/_compile.py compile_model: each decoder layer compiled; compile_loss: the loss too.
        _compile(r, "compile", "torchtune compiles each decoder layer, as memcalc does, and the loss, which memcalc "
                 "counts eager (high by what the compiled loss fuses)")
    device = r.text("device")
    if device is not None and device != "cuda":
        r.not_modelled("device", device, "memcalc estimates CUDA GPU memory")
    # recipes/full_finetune_distributed.py setup: a device mesh of data_parallel_shard_dim x tensor_parallel_dim x
    # context_parallel_dim ranks (training.ParallelDims); the model's parallelize plan (tensor_parallel_plan) over the
    # tp ranks, torch's context_parallel over the cp ranks. memcalc's --tp and --cp are not modelled with torchtune's
    # attention (k and v repeated to every head: --repeat-kv) nor its chunked loss, so both are said, not mapped.
    for key, why in (
            ("tensor_parallel_dim", ("each layer's weights, gathered copies and activations are split over the "
             "tensor-parallel ranks; memcalc counts them whole on each GPU (high), the model states sharded over all "
             "--gpus as FSDP over data- x tensor-parallel ranks shards them")),
            ("context_parallel_dim", ("each rank keeps the activations of its part of the sequence; memcalc counts "
             "the whole sequence on each GPU (high)"))):
        size = r.integer(key, None, minimum=1) if r.has(key) else None
        if size is not None and size > 1:
            if key == "tensor_parallel_dim":
                r.get("tensor_parallel_plan._component_")
            r.not_modelled(key, size, why)
        elif size is not None:
            r.counted(key, size, "no tensor parallelism" if key == "tensor_parallel_dim" else "no context parallelism")
    custom = r.names("custom_sharded_layers")
    if custom:
        # training/_distributed.py shard_model: each named module its own fully_shard unit (resharded after forward).
        r.not_modelled("custom_sharded_layers", custom, "these modules are their own FSDP units, gathered only while "
                       "they run; memcalc keeps the embeddings and head gathered with the root unit through the step "
                       "(high)")


_READERS: dict[str, Callable[[_Reader], None]] = {
    "hf": lambda r: _read_hf(r, trl=False),
    "trl": lambda r: _read_hf(r, trl=True),
    "axolotl": _read_axolotl,
    "llamafactory": _read_llamafactory,
    "torchtune": _read_torchtune,
}


# -- Into a request -------------------------------------------------------------------------------------------------


def merge(config: TrainerConfig, chosen: Mapping[str, Any],
          checkpoint_dtype: Callable[[str], str | None]) -> tuple[dict[str, Any], list[str]]:
    """The settings the config decides, checked against those the caller chose (``chosen``: Request keyword ->
    value). A chosen value the config sets otherwise is a UsageError, as with ``--deepspeed``; MODEL and
    ``--deepspeed`` given by the caller stand in for the config's (a local config.json for a hub id the machine
    cannot reach), said in a note. ``checkpoint_dtype(model)``: the dtype a model's config.json records, or None.
    Returns (settings, notes)."""
    config = _launched(config, chosen)
    settings = dict(config.settings)
    notes = config.summary()
    for name in ("model", "deepspeed"):
        if name in chosen and name in settings:
            if str(chosen[name]) != str(settings[name]):
                notes.append(f"{_flag(name)} {shown(chosen[name])} stands in for {config.source}'s "
                             f"{shown(settings[name])}")
            del settings[name]
    if "deepspeed" in settings and not Path(settings["deepspeed"]).exists():
        written = next(m.written for m in config.mapped if m.setting == "deepspeed")
        raise ConfigError(f"{config.source}: its DeepSpeed config {shown(written)} is in neither the current folder "
                          "nor the config's; run memcalc from the folder the trainer runs in, or give --deepspeed PATH")
    model = chosen.get("model", settings.get("model"))
    if model is None and "params" not in chosen:
        raise ModelNotFoundError(f"{config.source} names no model memcalc can resolve: give MODEL (a preset name "
                                 "or the model's config.json)")
    for mapped in config.mapped:
        name = mapped.setting
        if name is None or name not in chosen or name in ("model", "deepspeed") or settings.get(name) != mapped.value:
            continue
        mine, theirs = chosen[name], mapped.value
        if _same(mine, theirs):
            continue
        if mapped.bound and isinstance(mine, int) and not isinstance(mine, bool) and mine <= theirs:
            del settings[name]  # the caller's value, under the config's cap, stands
            notes.append(f"{_flag(name)} {mine}: given, under {config.source}'s {mapped.key} {theirs}")
            continue
        raise UsageError(f"{{{name}}} {_text(getattr(mine, 'value', mine))} contradicts {config.source}, which sets "
                         f"{mapped.key} {_text(mapped.written)} ({_flag(name)} {_text(theirs)}); drop the setting or "
                         "edit the config")
    if config.recipes is not None and "precision" not in settings:
        settings["precision"] = _checkpoint_recipe(config, chosen, model, checkpoint_dtype, notes)
        if settings["precision"] is None:
            del settings["precision"]
    return settings, notes


def _launched(config: TrainerConfig, chosen: Mapping[str, Any]) -> TrainerConfig:
    """The config as the launcher runs it when the launcher, not the config, adds FSDP (memcalc's --fsdp or
    --sharding fsdp: ``accelerate launch`` with an FSDP config) or DeepSpeed (--deepspeed): the precision the trainer
    and accelerate then run (TrainerConfig.launched), with its note in place of the config's own."""
    sharding = chosen.get("sharding")
    sharding = getattr(sharding, "value", sharding)
    engine = None
    if "sharding" not in config.settings and "deepspeed" not in config.settings:
        if chosen.get("fsdp") is True or sharding == "fsdp":
            engine = "fsdp"
        elif chosen.get("deepspeed") is not None or (sharding in (None, "deepspeed") and _zero_given(chosen.get("zero"))):
            engine = "deepspeed"  # a DeepSpeed config, or memcalc's ZeRO without one (--zero N, DeepSpeed's sharding)
    if engine is None:
        return config
    change = (config.launched or {}).get(engine, {})
    mapped = list(config.mapped)
    settings = dict(config.settings)
    notes = list(config.notes)
    unmodelled = list(config.not_modelled)
    recipes, dtype_key = config.recipes, config.dtype_key
    # What memcalc estimates on one unsharded process only (memcalc.activations), as the readers say it beside a
    # config's own sharding (_Reader._offload_unmodelled, _compile).
    for name, why in (("activation_offload", OFFLOAD_BESIDE_SHARDING), ("compile", COMPILE_BESIDE_SHARDING)):
        if is_on(settings.get(name)):
            dropped = next(m for m in mapped if m.setting == name)
            del settings[name]
            mapped.remove(dropped)
            notes = [note for note in notes if (config.about or {}).get(note) != name]
            unmodelled.append(f"{dropped.key} {_text(dropped.written)} read but not modelled: {why}")
    for name, key, why in change.get("drop", ()):
        # (set, or already said as not modelled beside what reentrant checkpoints are not modelled with)
        said = [line for line in unmodelled if line.startswith(f"{key} ")]
        if name in settings or said:
            settings.pop(name, None)
            mapped = [m for m in mapped if m.setting != name]
            unmodelled = [line for line in unmodelled if line not in said]
            notes.append(why)
    how = "the launcher's FSDP (--fsdp)" if engine == "fsdp" else "the launcher's DeepSpeed (--deepspeed, --zero)"
    if "label" in change:
        mapped = [m for m in mapped if m.setting != "precision"]
        settings.pop("precision", None)
        if config.precision_note in notes:
            notes.remove(config.precision_note)
        recipes, dtype_key = None, ""
        label = f"{change['label']} under {how}"
        if engine == "deepspeed":
            if change["precision"] is not None:
                settings["precision"] = change["precision"]
                mapped.append(Mapped(*label.split(" ", 1), "precision", change["precision"], label=label))
            notes.append("precision: the DeepSpeed config's bf16/fp16 sections decide it (the trainer's flags fill "
                         "\"auto\": transformers integrations/deepspeed.py trainer_config_process)")
        else:
            found = change["recipes"]
            if len(set(found.values())) == 1:
                recipe = next(iter(found.values()))
                if recipe.startswith("!"):
                    raise ConfigError(f"{config.source}: {recipe[1:]}")
                settings["precision"] = recipe
                mapped.append(Mapped(*label.split(" ", 1), "precision", recipe, label=label))
                notes.append(f"precision {recipe} under {how}: {change['why']}")
            else:
                recipes, dtype_key = found, change["auto"] or label
                notes.append(f"precision: {label}; {change['why']}")
    return dataclasses.replace(config, settings=settings, mapped=tuple(mapped), notes=tuple(notes), recipes=recipes,
                               dtype_key=dtype_key, not_modelled=tuple(unmodelled))


def _zero_given(zero: Any) -> bool:
    """Whether --zero names only stages above 0 (an int, "1,2,3" or a list of stages; a comparison with stage 0 keeps
    the config's own recipe)."""
    stages = zero.split(",") if isinstance(zero, str) else zero if isinstance(zero, (list, tuple)) else [zero]
    return all(str(stage).strip() not in ("", "0", "None") for stage in stages)


def _same(mine: Any, theirs: Any) -> bool:
    mine = getattr(mine, "value", mine)
    if isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)) or "," in str(mine) + str(theirs):
        def items(value: Any) -> list[str]:
            parts = value.split(",") if isinstance(value, str) else list(value)
            return sorted(str(p).strip() for p in parts if str(p).strip())

        return items(mine) == items(theirs)
    return str(mine) == str(theirs)


def _checkpoint_recipe(config: TrainerConfig, chosen: Mapping[str, Any], model: Any,
                       checkpoint_dtype: Callable[[str], str | None], notes: list[str]) -> str | None:
    """The recipe of a run that loads the checkpoint's dtype: the caller's --precision when it is one the config
    allows, else the one the model's config.json dtype gives; refused when neither says."""
    assert config.recipes is not None
    allowed = {dtype: recipe for dtype, recipe in config.recipes.items() if not recipe.startswith("!")}
    options = ", ".join(f"{recipe} for {dtype} weights" for dtype, recipe in allowed.items())
    if "precision" in chosen:
        typed = str(getattr(chosen["precision"], "value", chosen["precision"]))
        if typed not in allowed.values():
            raise UsageError(f"{{precision}} {typed} is not a recipe {config.source} can run ({options})")
        notes.append(f"precision {typed}: given by --precision for the checkpoint's dtype ({config.dtype_key})")
        return None
    dtype = checkpoint_dtype(str(model)) if model is not None else None
    if dtype is None:
        raise UsageError(f"{config.source} loads the model in its checkpoint's dtype ({config.dtype_key}), which "
                         f"{shown(model)} does not record (a config.json's torch_dtype): give {{precision}} "
                         f"({options})")
    recipe = config.recipes.get(dtype)
    if recipe is None:
        raise UsageError(f"the checkpoint's dtype {dtype} of {shown(model)} is not one memcalc has recipes for: "
                         f"give {{precision}} ({options})")
    if recipe.startswith("!"):
        raise ConfigError(f"{config.source}: {recipe[1:]}")
    notes.append(f"precision {recipe}: {shown(model)}'s checkpoint dtype is {dtype} (its config.json)")
    return recipe


def config_dtype(raw: Mapping[str, Any]) -> str | None:
    """The dtype a config.json records (``torch_dtype``, or ``dtype`` since transformers 4.56), in memcalc's
    names; None when it records none."""
    for holder in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}):
        for key in ("dtype", "torch_dtype"):
            value = holder.get(key)
            if isinstance(value, str) and DTYPES.get(value) in ("fp32", "bf16", "fp16"):
                return DTYPES[value]
    return None

