"""--from FILE: trainers' own example configs (tests/fixtures/trainers, sources in SOURCES.md there) read into memcalc's
settings, every key accounted for, contradictions refused, and hostile files answered with one line.

Expected values are read off the fixture files (the line is quoted in each comment) or are the trainer's documented
default for an absent key (its file and field named); none is computed by memcalc.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from memcalc.configs.trainers import read_trainer_config
from tests.test_hostile_files import _fifo, _sparse, assert_one_line_error, run_guarded

pytest.importorskip("yaml")  # the [yaml] extra (in [test]): most fixtures are YAML

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "trainers"
EXIT_USAGE, EXIT_MODEL_NOT_FOUND, EXIT_CONFIG, EXIT_MISSING_DEPENDENCY = 2, 3, 4, 7  # memcalc/errors.py

# transformers 5.24 training_args.py: per_device_train_batch_size=8, gradient_accumulation_steps=1,
# default_optim "adamw_torch_fused" (torch >= 2.8); trainer_optimizer.py builds it as torch.optim.AdamW(fused=True).
HF_BATCH, HF_ACCUM = 8, 1
HF_OPTIM = {"optim": "adamw", "optim_impl": "fused"}

EXPECTED = {
    # TRL: model_name_or_path "Qwen/Qwen2.5-0.5B"; the rest are defaults: TrainingArguments' batch, accumulation and
    # optimizer; trl/trainer/base_config.py gradient_checkpointing=True and bf16 = not fp16; sft_config.py
    # max_length=1024 (padded rows: an upper bound) and packing=False (rows padded: a padding mask); model_config.py
    # dtype="float32" -> fp32 weights + bf16 autocast.
    "trl_example_config.yaml": ("trl", {
        "model": "Qwen/Qwen2.5-0.5B", "batch_size": HF_BATCH, "grad_accum": HF_ACCUM, "checkpointing": "full",
        **HF_OPTIM, "seq_len": 1024, "padded": True, "precision": "amp-bf16"}),
    # "packing: true", "per_device_train_batch_size: 2", "gradient_accumulation_steps: 8", "use_peft: true",
    # "lora_r: 32"; max_length 1024 (default), exact with packing; model_config.py lora_dropout=0.05 (default).
    "trl_sft_lora.yaml": ("trl", {
        "model": "Qwen/Qwen2-0.5B", "batch_size": 2, "grad_accum": 8, "checkpointing": "full", **HF_OPTIM,
        "seq_len": 1024, "lora_rank": 32, "lora_dropout": 0.05, "precision": "amp-bf16"}),
    # "model_name_or_path": "gpt2", "per_device_train_batch_size": 8; TrainingArguments defaults otherwise
    # (gradient_checkpointing False); no torch_dtype: transformers 5 loads the checkpoint's dtype.
    "hf_run_clm_gpt2.json": ("hf", {
        "model": "gpt2", "batch_size": 8, "grad_accum": HF_ACCUM, "checkpointing": "none", **HF_OPTIM}),
    # "micro_batch_size: 2", "gradient_accumulation_steps: 4", "sequence_len: 2048", "optimizer: adamw_bnb_8bit",
    # "gradient_checkpointing: true", "attn_implementation: flash_attention_2", "adapter: qlora", "load_in_4bit: true",
    # "lora_r: 32", "lora_dropout: 0.05", lora_target_modules as listed; "bf16: auto" -> bf16 weights, fp32 adapters
    # (PEFT) -> bf16; loaders/model.py: its QLoRA BitsAndBytesConfig's bnb_4bit_use_double_quant True.
    "axolotl_qlora-1b.yml": ("axolotl", {
        "model": "NousResearch/Llama-3.2-1B", "batch_size": 2, "grad_accum": 4, "seq_len": 2048,
        "optim": "adamw-8bit", "optim_impl": "fused", "checkpointing": "full", "attn": "flash", "lora_rank": 32,
        "lora_dropout": 0.05,
        "lora_targets": "gate_proj,down_proj,up_proj,q_proj,v_proj,k_proj,o_proj", "qlora": True,
        "qlora_double_quant": True, "qlora_upcast": False, "precision": "bf16"}),
    # (qlora_upcast False: loaders/model.py _configure_embedding_dtypes casts norms, embeddings and head back to
    # torch_dtype after prepare_model_for_kbit_training.)
    # "micro_batch_size: 2", "gradient_accumulation_steps: 4", "sequence_len: 4096", "optimizer: adamw_torch_fused",
    # "liger_fused_linear_cross_entropy: true", "fsdp: [full_shard, auto_wrap]" -> FSDP stage 3; bf16 auto + FSDP
    # mixed precision -> fp32 shards gathered in bf16 (memcalc's bf16 under FSDP).
    "axolotl_fft-8b-liger-fsdp.yaml": ("axolotl", {
        "model": "NousResearch/Meta-Llama-3.1-8B", "batch_size": 2, "grad_accum": 4, "seq_len": 4096,
        "optim": "adamw", "optim_impl": "fused", "checkpointing": "full", "attn": "flash", "loss": "fused-linear",
        "sharding": "fsdp", "zero": 3, "precision": "bf16", "cpu_ram_efficient_loading": True}),
    # No fsdp: list, only "fsdp_config:" with "fsdp_version: 2" and "fsdp_reshard_after_forward: true": axolotl turns
    # FSDP on for the section alone (loaders/model.py ModelLoader.is_fsdp_enabled; utils/trainer.py setup_fsdp_envs)
    # -> FSDP2 stage 3; "micro_batch_size: 4", "gradient_accumulation_steps: 1", "sequence_len: 2048" with
    # "sample_packing: true", "optimizer: adamw_torch_fused", "gradient_checkpointing: false",
    # "attn_implementation: flash_attention_2", "bf16: auto" under FSDP -> fp32 shards gathered in bf16;
    # "fsdp_cpu_ram_efficient_loading: false" leaves memcalc's default.
    "axolotl_adamw-pretrain-fsdp2.yaml": ("axolotl", {
        "model": "Qwen/Qwen2.5-0.5B", "batch_size": 4, "grad_accum": 1, "seq_len": 2048, "optim": "adamw",
        "optim_impl": "fused", "checkpointing": "none", "attn": "flash", "sharding": "fsdp", "zero": 3,
        "precision": "bf16"}),
    # "context_parallel_size: 2", "tensor_parallel_size: 2" (said, not mapped: see below); "dp_shard_size: 2": the
    # FSDP shard group, the world's other data-parallel ranks replicas (utils/distributed.py
    # _get_parallel_config_kwargs: HSDP, --dp-shard 2);
    # "fsdp_version: 2" with "fsdp_config:" "reshard_after_forward: true" -> FSDP2 stage 3; "sequence_len: 8192" with
    # "sample_packing: true"; "micro_batch_size: 1", "gradient_accumulation_steps: 1", "optimizer: adamw_torch_fused",
    # "attn_implementation: flash_attention_2", "bf16: true" under FSDP -> memcalc's bf16; gradient_checkpointing
    # absent (schemas: false).
    "axolotl_qwen3-8b-fsdp-tp-cp.yaml": ("axolotl", {
        "model": "Qwen/Qwen3-8B", "batch_size": 1, "grad_accum": 1, "seq_len": 8192, "optim": "adamw",
        "optim_impl": "fused", "checkpointing": "none", "attn": "flash", "sharding": "fsdp", "zero": 3,
        "precision": "bf16", "dp_shard": 2}),
    # "fp8: true" -> torchao's tensorwise float8 (core/trainers/base.py additional_accelerator_args: a default
    # Float8LinearConfig); "fsdp_version: 2", "reshard_after_forward: true", "activation_checkpointing: false";
    # "micro_batch_size: 16", "sequence_len: 512" packed, "liger_fused_linear_cross_entropy: true"; bf16 absent (auto).
    "axolotl_3b-fp8-fsdp2.yaml": ("axolotl", {
        "model": "meta-llama/Llama-3.2-3B", "batch_size": 16, "grad_accum": 1, "seq_len": 512, "optim": "adamw",
        "optim_impl": "fused", "checkpointing": "none", "sharding": "fsdp", "zero": 3, "precision": "bf16",
        "loss": "fused-linear", "fp8": "tensorwise"}),
    # "_component_: torchtune.models.llama3_3.llama3_3_70b", "batch_size: 4", "gradient_accumulation_steps: 1",
    # "max_seq_len: 1024" (not packed: a bound), AdamW "fused: True", "dtype: bf16",
    # "enable_activation_checkpointing: True", "fsdp_cpu_offload: False" (FSDP keys: fsdp_reshard_after_forward's
    # default True -> stage 3); "compile: True" beside FSDP and "tensor_parallel_dim: 8" said, not mapped;
    # "data_parallel_replicate_dim: 1": no HSDP replicas (ParallelDims dp_replicate).
    "torchtune_llama3_3_70B_full_multinode.yaml": ("torchtune", {
        "model": "llama-3.3-70b", "repeat_kv": True, "batch_size": 4, "grad_accum": 1, "seq_len": 1024,
        "precision": "bf16-pure", "checkpointing": "full", "optim": "adamw", "optim_impl": "fused",
        "sharding": "fsdp", "zero": 3, "dp_replicate": 1}),
    # "per_device_train_batch_size: 1", "gradient_accumulation_steps: 8", "cutoff_len: 2048", "finetuning_type: lora",
    # "lora_rank: 8", "lora_target: all"; checkpointing on (model_utils/checkpointing.py, not disabled); the
    # precision waits for the checkpoint's dtype (recipes below); hparams/data_args.py packing None, on only for
    # pre-training: rows padded (a padding mask, which one row per batch does not need).
    "llamafactory_qwen3_lora_sft.yaml": ("llamafactory", {
        "model": "Qwen/Qwen3-4B-Instruct-2507", "batch_size": 1, "grad_accum": 8, "seq_len": 2048, "padded": True,
        "checkpointing": "full", **HF_OPTIM, "lora_rank": 8, "lora_dropout": 0.0, "lora_targets": "all-linear"}),
    # "gradient_accumulation_steps: 2", "finetuning_type: full", "deepspeed: examples/deepspeed/ds_z3_config.json"
    # (beside the config here), "bf16: true" -> DeepSpeed's bf16 recipe; packing off (as above): rows padded;
    # hparams/model_args.py use_reentrant_gc True by default, passed as {"use_reentrant": ...}
    # (model_utils/checkpointing.py prepare_model_for_training).
    "llamafactory_qwen3_full_sft.yaml": ("llamafactory", {
        "model": "Qwen/Qwen3-4B-Instruct-2507", "batch_size": 1, "grad_accum": 2, "seq_len": 2048, "padded": True,
        "checkpointing": "full", "checkpoint_reentrant": True, **HF_OPTIM, "precision": "bf16",
        "deepspeed": str(FIXTURES / "examples" / "deepspeed" / "ds_z3_config.json")}),
    # "_component_: torchtune.models.llama3_2.lora_llama3_2_1b", "lora_attn_modules: ['q_proj', 'v_proj',
    # 'output_proj']", "apply_lora_to_mlp: True", "lora_rank: 64", "batch_size: 4", "gradient_accumulation_steps: 8",
    # "torch.optim.AdamW" with "fused: True", "dtype: bf16", "enable_activation_checkpointing: False", "lora_dropout:
    # 0.0".
    "torchtune_llama3_2_1B_lora_single_device.yaml": ("torchtune", {
        "model": "llama-3.2-1b", "lora_rank": 64, "lora_dropout": 0.0, "lora_targets": "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "batch_size": 4, "grad_accum": 8, "precision": "bf16-pure", "checkpointing": "none", "optim": "adamw",
        "optim_impl": "fused", "repeat_kv": True}),
    # (repeat_kv: torchtune's MultiHeadAttention expands k and v to every head before sdpa, modules/attention.py.)
    # "llama3_2_3b", "batch_size: 4", "gradient_accumulation_steps: 8", "dtype: bf16",
    # "enable_activation_checkpointing: True", AdamW "fused: True".
    "torchtune_llama3_2_3B_full.yaml": ("torchtune", {
        "model": "llama-3.2-3b", "batch_size": 4, "grad_accum": 8, "precision": "bf16-pure", "checkpointing": "full",
        "optim": "adamw", "optim_impl": "fused", "repeat_kv": True}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_maps_to_settings(name):
    fmt, settings = EXPECTED[name]
    config = read_trainer_config(FIXTURES / name)
    assert config.format == fmt
    assert dict(config.settings) == settings


# Recipes by the checkpoint's dtype where the config loads "auto": run_clm without torch_dtype and no bf16/fp16 trains
# in the weights' dtype (fp32, or pure 16-bit); LLaMA-Factory upcasts trainable parameters to fp32 (adapter.py
# init_adapter), so LoRA on a 16-bit base is that base with fp32 adapters (memcalc's bf16/fp16), on fp32 weights
# it is autocast (bf16: true).
@pytest.mark.parametrize(("name", "recipes"), [
    ("hf_run_clm_gpt2.json", {"fp32": "fp32", "bf16": "bf16-pure", "fp16": "fp16-pure"}),
    ("llamafactory_qwen3_lora_sft.yaml", {"fp32": "amp-bf16", "bf16": "bf16", "fp16": "fp16"}),
])
def test_precision_waits_for_the_checkpoint_dtype(name, recipes):
    assert dict(read_trainer_config(FIXTURES / name).recipes) == recipes


def _top_keys(config) -> set[str]:
    keys = {m.key.split(".")[0] for m in config.mapped}
    keys |= {item.split(" ", 1)[0].split(".")[0] for item in (*config.not_modelled, *config.also_read)}
    keys |= {key.split(".")[0] for key in config.ignored}
    return keys


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_key_is_accounted_for(name):
    """Each top-level key of the file is mapped, also read, read but not modelled, or listed as ignored."""
    import yaml

    path = FIXTURES / name
    data = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
    assert set(data) <= _top_keys(read_trainer_config(path))


def test_output_names_mapped_not_modelled_and_ignored_keys(cli):
    result = cli("llama-3.1-8b", "--from", str(FIXTURES / "axolotl_fft-8b-liger-fsdp.yaml"), "--gpus", "8", "--json")
    assert result.exit_code == 0, result.stderr
    notes = result.json()["notes"]
    read = next(note for note in notes if note.startswith("read "))
    for part in ("micro_batch_size 2 -> --batch-size 2", "sequence_len 4096 -> --seq-len 4096",
                 "optimizer adamw_torch_fused -> --optim adamw --optim-impl fused",
                 "liger_fused_linear_cross_entropy true -> --loss fused-linear",
                 "fsdp [full_shard, auto_wrap] -> --sharding fsdp --zero 3"):
        assert part in read, read
    ignored = next(note for note in notes if " ignored (" in note)
    for key in ("learning_rate", "datasets", "wandb_project", "fsdp_config.fsdp_state_dict_type"):
        assert key in ignored
    unmodelled = [note for note in notes if "read but not modelled" in note]
    assert any("fsdp_config.fsdp_offload_params true" in note for note in unmodelled)
    assert any("liger_rms_norm true" in note for note in unmodelled)
    assert any("MODEL llama-3.1-8b stands in for" in note for note in notes)
    assert result.json()["training"]["micro_batch_size"] == 2 and result.json()["training"]["sharding"] == "fsdp"


def test_estimate_keyword_reads_the_config():
    import memcalc

    # (activations by the rules: the config's reading is the point; the traced QLoRA step is test_lora_traced's)
    report = memcalc.estimate("llama-3.2-1b", from_config=str(FIXTURES / "axolotl_qlora-1b.yml"), activations="rules")
    training = report.training
    # Values from the fixture (see EXPECTED), now in the report the engine produced.
    assert (training.micro_batch_size, training.seq_len, training.grad_accum) == (2, 2048, 4)
    assert (training.lora_rank, training.qlora, training.optimizer, training.attention) == (32, True, "adamw-8bit",
                                                                                             "flash")
    assert not any(d.startswith(("--batch-size", "--seq-len", "--precision")) for d in training.defaults_used)


# -- contradictions and stand-ins ---------------------------------------------------------------------------------


def test_a_flag_the_config_contradicts_is_refused(cli):
    result = cli("qwen2.5-0.5b", "--from", str(FIXTURES / "trl_sft_lora.yaml"), "--batch-size", "4")
    assert_one_line_error(result, EXIT_USAGE, "--batch-size 4 contradicts", "per_device_train_batch_size 2")


def test_a_flag_that_agrees_or_adds_is_accepted(cli):
    result = cli("qwen2.5-0.5b", "--from", str(FIXTURES / "trl_sft_lora.yaml"), "--batch-size", "2", "--gpus", "2",
                 "--activations", "rules", "--json")  # (the flags' acceptance is the point, not the traced step)
    assert result.exit_code == 0, result.stderr
    assert result.json()["training"]["num_gpus"] == 2


def test_a_shorter_sequence_under_a_padded_bound_is_accepted(cli):
    # trl_example_config.yaml has no packing: max_length 1024 is a bound; 512 is under it, 2048 above it.
    path = str(FIXTURES / "trl_example_config.yaml")
    result = cli("--from", path, "--seq-len", "512", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["training"]["seq_len"] == 512
    assert_one_line_error(cli("--from", path, "--seq-len", "2048"), EXIT_USAGE, "--seq-len 2048 contradicts")


def test_checkpoint_dtype_from_the_models_config(cli, tmp_path):
    """run_clm without torch_dtype loads the checkpoint's dtype: a config.json that records it decides the recipe,
    a preset (no dtype recorded) needs --precision."""
    path = str(FIXTURES / "hf_run_clm_gpt2.json")
    assert_one_line_error(cli("--from", path), EXIT_USAGE, "checkpoint's dtype", "--precision")
    raw = json.loads((Path(__file__).resolve().parent.parent / "presets" / "models" / "gpt2.json").read_text())
    for dtype, recipe in (("float32", "fp32"), ("bfloat16", "bf16-pure")):
        config = tmp_path / dtype / "config.json"
        config.parent.mkdir()
        config.write_text(json.dumps({**raw, "torch_dtype": dtype}))
        result = cli(str(config), "--from", path, "--json")
        assert result.exit_code == 0, result.stderr
        assert result.json()["training"]["precision"] == recipe
    result = cli("--from", path, "--precision", "fp16-pure", "--json")
    assert result.exit_code == 0 and result.json()["training"]["precision"] == "fp16-pure"
    assert_one_line_error(cli("--from", path, "--precision", "amp-bf16"), EXIT_USAGE, "not a recipe")


def test_deepspeed_config_beside_the_config_or_given(cli, tmp_path):
    path = FIXTURES / "llamafactory_qwen3_full_sft.yaml"
    result = cli("qwen3-4b", "--from", str(path), "--gpus", "8", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["training"]["zero_stage"] == 3  # ds_z3_config.json: "stage": 3
    alone = tmp_path / "alone.yaml"
    shutil.copy(path, alone)
    assert_one_line_error(cli("qwen3-4b", "--from", str(alone)), EXIT_CONFIG, "ds_z3_config.json",
                          "--deepspeed PATH")
    ds = str(FIXTURES / "examples" / "deepspeed" / "ds_z3_config.json")
    result = cli("qwen3-4b", "--from", str(alone), "--deepspeed", ds, "--gpus", "8", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["training"]["zero_stage"] == 3


def test_a_hub_id_that_is_not_a_preset_gets_the_resolvers_line(cli, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import memcalc.resolve

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(memcalc.resolve, "_hub_offline", lambda: True)
    result = run_guarded(cli, "--from", str(FIXTURES / "axolotl_qlora-1b.yml"))
    assert_one_line_error(result, EXIT_MODEL_NOT_FOUND, "NousResearch/Llama-3.2-1B")


def test_from_format_overrides_detection(cli):
    # Read as plain TrainingArguments, TRL's defaults no longer apply: no checkpointing, no max_length.
    config = read_trainer_config(FIXTURES / "trl_example_config.yaml", "hf")
    assert config.format == "hf" and config.settings["checkpointing"] == "none" and "seq_len" not in config.settings
    assert_one_line_error(cli("--from", str(FIXTURES / "trl_example_config.yaml"), "--from-format", "keras"),
                          EXIT_USAGE, "--from-format 'keras' is not one of")
    assert_one_line_error(cli("gpt2", "--from-format", "hf"), EXIT_USAGE, "--from FILE")


# -- optimizers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "parts"), [
    ("optimizer: adamw_nonexistent\n", ("'adamw_nonexistent' is not an optimizer transformers",)),
    ("optimizer: galore_adamw\n", ("galore_adamw (a transformers optimizer) has no memcalc model",)),
])
def test_unknown_optimizer_is_one_line(cli, tmp_path, line, parts):
    path = tmp_path / "axolotl.yaml"
    path.write_text("base_model: meta-llama/Llama-3.2-1B\n" + line)
    assert_one_line_error(run_guarded(cli, "--from", str(path)), EXIT_CONFIG, *parts)


def test_torchtune_components_are_strings_never_imported(cli, tmp_path):
    module = "memcalc_test_never_imported"
    path = tmp_path / "tune.yaml"
    path.write_text("model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\nbatch_size: 1\n"
                    "gradient_accumulation_steps: 1\noptimizer:\n  _component_: " + module + ".Optimizer\n")
    assert_one_line_error(run_guarded(cli, "--from", str(path)), EXIT_CONFIG, f"'{module}.Optimizer'",
                          "not an optimizer memcalc knows")
    assert module not in sys.modules


# -- hostile files ---------------------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))

HOSTILE = {
    # name: (bytes or a builder of the path, words the message must hold)
    "alias-bomb": (BOMB.encode(), ("expands to more than 100,000 values",)),
    "alias-to-itself": (b"a: &a [*a]\n", ("nested more than 64 levels",)),
    "python-object-tag": (b"a: !!python/object/apply:os.system ['echo owned']\n",
                          ("not valid YAML", "python/object/apply:os.system")),
    "python-name-tag": (b"optimizer: !!python/name:os.system\n", ("not valid YAML", "python/name:os.system")),
    "list-top-level": (b"- base_model: x\n", ("must hold a mapping", "not a list")),
    "scalar-top-level": (b"just text\n", ("must hold a mapping", "not a str")),
    "empty": (b"", ("is empty",)),
    "binary-junk": (bytes(range(256)) * 4, ("not UTF-8",)),
    "control-characters": (b"base_model: \x01\x02\n", ("not valid YAML", "unacceptable character")),
    "deep-flow-nesting": (b"[" * 200_000, ("nested more than 64 levels",)),
    "unclosed-bracket": (b"base_model: [x\n", ("not valid YAML (line 2",)),
    "number-key": (b"1: x\n", ("top-level key 1 is not a name",)),
    "absurd-batch": (b"base_model: x\nmicro_batch_size: 99999999999\n", ("micro_batch_size must be a whole number",)),
    "batch-as-text": (b"base_model: x\nmicro_batch_size: two\n", ("micro_batch_size must be a whole number",)),
    "json-array": (b"[1, 2]", ("must hold a JSON object",)),
    "huge": (lambda path: _sparse(path, 300 * 2**10), ("too large", "256 KiB")),
    "fifo": (lambda path: _fifo(path), ("not a regular file",)),
    "folder": (lambda path: path.mkdir() or path, ("is a folder",)),
    "missing": (lambda path: path, ("not found",)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_config_is_one_line(cli, tmp_path, case):
    build, parts = HOSTILE[case]
    path = tmp_path / ("config.json" if case == "json-array" else "config.yaml")
    if callable(build):
        build(path)
    else:
        path.write_bytes(build)
    assert_one_line_error(run_guarded(cli, "--from", str(path)), EXIT_CONFIG, *parts)


def test_dev_zero_is_refused(cli):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this platform")
    assert_one_line_error(run_guarded(cli, "--from", "/dev/zero"), EXIT_CONFIG, "not a regular file")


def test_yaml_without_pyyaml_is_one_line(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    result = cli("--from", str(FIXTURES / "axolotl_qlora-1b.yml"))
    assert_one_line_error(result, EXIT_MISSING_DEPENDENCY, "needs PyYAML", "memcalc-train[yaml]")
    result = cli("--from", str(FIXTURES / "hf_run_clm_gpt2.json"), "--precision", "fp32")  # JSON needs no PyYAML
    assert result.exit_code == 0, result.stderr


# -- rules, on small configs written here (each expectation cites the trainer code it follows) ------------------------

def _settings(data: dict, fmt: str | None = None) -> dict:
    from memcalc.configs.trainers import parse_trainer_config

    return dict(parse_trainer_config(data, fmt).settings)


AXOLOTL = {"base_model": "meta-llama/Llama-3.2-1B"}
AXOLOTL_QLORA = {**AXOLOTL, "adapter": "qlora", "load_in_4bit": True, "lora_r": 8, "lora_target_linear": True}


@pytest.mark.parametrize(("optimizer", "expected"), [
    # transformers trainer_optimizer.py: adamw_torch -> torch.optim.AdamW (torch's default foreach: not set here),
    # adamw_torch_fused -> fused=True; bitsandbytes 32-bit states are fp32 whatever the weights; the paged_ names are
    # bitsandbytes' paged optimizers (is_paged), memcalc's paged-adamw(-8bit).
    ("adamw_torch", {"optim": "adamw"}),
    ("adamw_torch_fused", {"optim": "adamw", "optim_impl": "fused"}),
    ("adafactor", {"optim": "adafactor"}),
    ("paged_adamw_8bit", {"optim": "paged-adamw-8bit", "optim_impl": "fused"}),
    ("paged_adamw_32bit", {"optim": "paged-adamw", "optim_impl": "fused"}),
    ("lion_32bit", {"optim": "lion", "optim_impl": "fused", "state_dtype": "fp32"}),
    ("sgd", {"optim": "sgd"}),
    # trainer_optimizer.py _get_torchao_optimizer: adamw_torch_8bit is torchao.optim.AdamW8bit (block_size 256).
    ("adamw_torch_8bit", {"optim": "torchao-adamw-8bit"}),
])
def test_hf_optimizer_names(optimizer, expected):
    settings = _settings({**AXOLOTL, "optimizer": optimizer})
    assert {k: v for k, v in settings.items() if k in ("optim", "optim_impl", "state_dtype")} == expected


def test_sgd_momentum_from_optim_args():
    # trainer_optimizer.py _get_sgd: optim_args' momentum goes to torch.optim.SGD.
    assert _settings({**AXOLOTL, "optimizer": "sgd", "optim_args": "momentum=0.9"})["optim"] == "sgd-momentum"


@pytest.mark.parametrize(("data", "precision"), [
    # TRL ModelConfig dtype bfloat16: bf16 weights; bf16 autocast adds nothing -> pure bf16.
    ({"max_length": 512, "dtype": "bfloat16"}, "bf16-pure"),
    # ... with use_peft: PEFT upcasts the adapters to fp32 on the bf16 base -> memcalc's bf16.
    ({"max_length": 512, "dtype": "bfloat16", "use_peft": True}, "bf16"),
    # ... with load_in_4bit: TRL casts the QLoRA adapters to bf16 (sft_trainer.py) -> pure bf16.
    ({"max_length": 512, "dtype": "bfloat16", "use_peft": True, "load_in_4bit": True}, "bf16-pure"),
    # float32 weights, fp16: true -> torch.autocast fp16.
    ({"max_length": 512, "fp16": True}, "amp-fp16"),
    # FSDP with mixed precision: fp32 shards gathered in bf16 (accelerate), whatever the loaded dtype.
    ({"max_length": 512, "dtype": "bfloat16", "fsdp": "full_shard"}, "bf16"),
])
def test_trl_recipes(data, precision):
    assert _settings(data)["precision"] == precision


def test_fp16_autocast_over_fp16_weights_is_refused():
    from memcalc.configs.trainers import parse_trainer_config
    from memcalc.errors import ConfigError

    with pytest.raises(ConfigError, match="GradScaler"):
        parse_trainer_config({"max_length": 512, "dtype": "float16", "fp16": True})


def test_hf_fsdp_and_checkpointing_options():
    # training_args.py _apply_legacy_fsdp_to_config: shard_grad_op -> reshard_after_forward False (memcalc's stage 2);
    # modeling_utils.py: every_n_layers checkpoints every n-th decoder layer (memcalc's every:N).
    settings = _settings({"max_length": 512, "fsdp": "shard_grad_op auto_wrap", "gradient_checkpointing": True,
                          "gradient_checkpointing_kwargs": {"every_n_layers": 2}})
    assert (settings["sharding"], settings["zero"], settings["checkpointing"]) == ("fsdp", 2, "every:2")
    assert _settings({"max_length": 512, "fsdp": "no_shard"})["sharding"] == "torch"


def test_hf_reentrant_checkpointing():
    # gradient_checkpointing_kwargs go to torch.utils.checkpoint (PEFT's docs run TRL with use_reentrant True);
    # reentrant checkpoints of adapters are read but not modelled (said), full fine-tuning's mapped.
    from memcalc.configs.trainers import parse_trainer_config

    data = {"max_length": 512, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    assert _settings(data)["checkpoint_reentrant"] is True
    assert "checkpoint_reentrant" not in _settings({**data, "gradient_checkpointing_kwargs": {"use_reentrant": False}})
    adapters = parse_trainer_config({**data, "use_peft": True, "lora_r": 8})
    assert "checkpoint_reentrant" not in adapters.settings
    assert any("use_reentrant true read but not modelled" in line for line in adapters.not_modelled)


@pytest.mark.parametrize(("component", "optim"), [
    # torchtune's docs (memory_optimizations.rst, "Lower Precision Optimizers") name bitsandbytes' PagedAdamW8bit
    # and torchao's AdamW8bit (torchao.prototype.low_bit_optim then, torchao.optim in 0.18).
    ("bitsandbytes.optim.PagedAdamW8bit", "paged-adamw-8bit"),
    ("bitsandbytes.optim.PagedAdamW", "paged-adamw"),
    ("bitsandbytes.optim.AdamW8bit", "adamw-8bit"),
    ("torchao.prototype.low_bit_optim.AdamW8bit", "torchao-adamw-8bit"),
    ("torchao.optim.AdamW4bit", "torchao-adamw-4bit"),
])
def test_torchtune_low_precision_optimizers(component, optim):
    data = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "dtype": "bf16", "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "optimizer": {"_component_": component}}
    assert _settings(data)["optim"] == optim


def test_torchtune_chunked_loss_and_interpolation():
    # ce_chunked_output_loss.py: num_output_chunks defaults to 8; ${batch_size} is OmegaConf's reference to it.
    data = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 2,
            "gradient_accumulation_steps": "${batch_size}", "dtype": "bf16",
            "optimizer": {"_component_": "torch.optim.AdamW"},
            "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}}
    settings = _settings(data)
    assert (settings["loss"], settings["grad_accum"]) == ("chunked:8", 2)
    data["loss"]["num_output_chunks"] = 16
    assert _settings(data)["loss"] == "chunked:16"
    from memcalc.configs.trainers import parse_trainer_config
    from memcalc.errors import ConfigError

    with pytest.raises(ConfigError, match="interpolation"):
        parse_trainer_config({**data, "batch_size": "${oc.env:BATCH}"})


@pytest.mark.parametrize(("data", "part"), [
    ({**AXOLOTL, "rl": "dpo"}, "rl dpo"),
    ({"finetuning_type": "lora", "stage": "dpo"}, "stage dpo"),
    ({"finetuning_type": "lora", "use_galore": True}, "use_galore"),
    ({**AXOLOTL, "adapter": "lora"}, "needs lora_r"),
    ({"max_length": 512, "load_in_4bit": True}, "trains only with adapters"),
    ({"max_length": 512, "deepspeed": {"zero_optimization": {"stage": 3}}}, "written inline"),
])
def test_runs_memcalc_does_not_model_are_refused(data, part):
    from memcalc.configs.trainers import parse_trainer_config
    from memcalc.errors import ConfigError

    with pytest.raises(ConfigError, match=part):
        parse_trainer_config(data)


# -- the trainers' own objects --------------------------------------------------------------------------------------

def test_tables_follow_the_installed_transformers():
    """Every optimizer name transformers knows is mapped or refused by name, and the TrainingArguments defaults the
    readers apply are transformers' own."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from memcalc.configs import trainers

    names = {name.value for name in transformers.training_args.OptimizerNames}
    removed = {"adamw_hf", "adamw_apex_fused"}  # mapped for older configs; gone from transformers 5
    assert names == (set(trainers.HF_OPTIMIZERS) - removed) | trainers.HF_UNMODELLED_OPTIMIZERS
    args = transformers.TrainingArguments(output_dir="unused", report_to="none")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (HF_BATCH, HF_ACCUM)
    assert args.optim.value == trainers.HF_DEFAULT_OPTIM
    assert (args.bf16, args.fp16, args.gradient_checkpointing) == (False, False, False)


def test_peft_keeps_fp32_adapters_on_a_bf16_base():
    """The premise of LoRA on a 16-bit base counting as memcalc's bf16: get_peft_model upcasts the adapters to fp32
    (autocast_adapter_dtype) and leaves the base in bf16."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    dtypes = {(("lora_" in name), param.dtype) for name, param in model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


def test_torchtune_ac_mode_and_ac_option():
    # recipes/configs/dev/8B_full_experimental.yaml: enable_activation_checkpointing False, ac_mode 'selective',
    # ac_option 2; full_finetune_distributed.py setup_model applies ac_mode only with enable_activation_checkpointing
    # false, and checkpoint_wrapper (training/activations.py) wraps layers whose 1-based count divides by ac_option.
    base = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 2, "dtype": "bf16",
            "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"},
            "enable_activation_checkpointing": False}
    assert _settings({**base, "ac_mode": "selective", "ac_option": 2})["checkpointing"] == "every:2"
    assert _settings({**base, "ac_mode": "selective", "ac_option": 1})["checkpointing"] == "full"
    assert _settings({**base, "ac_mode": "full"})["checkpointing"] == "full"
    # Both set: those recipes apply neither (the higher count, with a note).
    both = {**base, "enable_activation_checkpointing": True, "ac_mode": "selective", "ac_option": 2}
    assert _settings(both)["checkpointing"] == "none"
    from memcalc.configs.trainers import parse_trainer_config
    from memcalc.errors import ConfigError

    with pytest.raises(ConfigError, match="ac_option op: .*--checkpointing selective-op"):
        parse_trainer_config({**base, "ac_mode": "selective", "ac_option": "op"})
    with pytest.raises(ConfigError, match="ac_mode layer: torchtune takes full or selective"):
        parse_trainer_config({**base, "ac_mode": "layer"})


def test_checkpoint_offloading_keys_map_to_activation_offload():
    # transformers modeling_utils.py _activation_checkpointing_enable(offload=True): checkpoints offloaded.
    settings = _settings({"max_length": 512, "gradient_checkpointing": True,
                          "gradient_checkpointing_kwargs": {"offload": True}})
    assert (settings["checkpointing"], settings["activation_offload"]) == ("full", "checkpoints")
    # axolotl's deprecated gradient_checkpointing: offload is, by its schema's validator (schemas/validation.py
    # check_gradient_checkpointing_w_offload), checkpointing on with activation_offloading true: TRL's offloader (the
    # "new stream implementation"); offload_disk is activation_offloading "disk", not modelled. (Before, offload
    # counted the older per-layer hidden-states offload, monkeypatch/gradient_checkpointing/offload_cpu.py.)
    axolotl = {**AXOLOTL, "gradient_checkpointing": "offload"}
    settings = _settings(axolotl)
    assert (settings["checkpointing"], settings["activation_offload"]) == ("full", "trl")
    from memcalc.configs.trainers import parse_trainer_config

    assert any("runs TRL's OffloadActivations" in note for note in parse_trainer_config(axolotl).notes)
    disk = parse_trainer_config({**AXOLOTL, "gradient_checkpointing": "offload_disk"})
    assert disk.settings["checkpointing"] == "full" and "activation_offload" not in disk.settings
    assert any(line.startswith("gradient_checkpointing offload_disk read but not modelled") for line in disk.not_modelled)


def test_torchtune_qlora_keeps_the_base_s_other_tensors_in_its_dtype():
    # torchtune's qlora_ builders quantize Linears to torchao's NF4 and leave the rest in the model's dtype;
    # transformers' path (PEFT's prepare_model_for_kbit_training) upcasts those to fp32 (memcalc's default). Its Llama
    # builders quantize every projection of the layers, its Qwen2 builders (Qwen2.5 and Qwen3 too) only those LoRA
    # wraps (models/*/_component_builders.py, checked on torchtune 0.6.1 by benchmarks/qlora_torchtune.py).
    data = {"model": {"_component_": "torchtune.models.llama3_2.qlora_llama3_2_1b", "lora_attn_modules": ["q_proj"],
                      "lora_rank": 8}, "batch_size": 2, "dtype": "bf16", "gradient_accumulation_steps": 1,
            "optimizer": {"_component_": "torch.optim.AdamW"}}
    settings = _settings(data)
    assert (settings["qlora"], settings["qlora_upcast"]) == (True, False)
    assert "qlora_scope" not in settings  # all-linear
    # modules/peft/lora.py LoRALinear(quantize_base=True): torchao's to_nf4 and linear_nf4, not bitsandbytes
    assert settings["qlora_quantizer"] == "torchao"
    qwen = _settings({**data, "model": {**data["model"], "_component_": "torchtune.models.qwen2_5.qlora_qwen2_5_0_5b"}})
    assert (qwen["qlora"], qwen["qlora_scope"]) == (True, "lora-targets")
    trl = _settings({"max_length": 512, "use_peft": True, "load_in_4bit": True})
    assert trl["qlora"] is True and "qlora_upcast" not in trl  # the default: upcast
    assert "qlora_quantizer" not in trl  # the default: bitsandbytes
    # trl/trainer/model_config.py: use_bnb_nested_quant False by default, passed as bnb_4bit_use_double_quant.
    assert trl["qlora_double_quant"] is False
    assert _settings({"max_length": 512, "use_peft": True, "load_in_4bit": True,
                      "use_bnb_nested_quant": True})["qlora_double_quant"] is True


def test_axolotl_bnb_config_kwargs():
    """axolotl loaders/model.py: its QLoRA BitsAndBytesConfig (double quantization on) updated by bnb_config_kwargs;
    a skip list given there replaces transformers' default one (the head), so the head is quantized."""
    settings = _settings(AXOLOTL_QLORA)
    assert settings["qlora_double_quant"] is True and "qlora_lm_head" not in settings
    changed = _settings({**AXOLOTL_QLORA, "bnb_config_kwargs": {"bnb_4bit_use_double_quant": False,
                                                                 "llm_int8_skip_modules": []}})
    assert (changed["qlora_double_quant"], changed["qlora_lm_head"]) == (False, True)
    from memcalc.configs.trainers import parse_trainer_config

    parsed = parse_trainer_config({**AXOLOTL_QLORA, "bnb_config_kwargs": {"llm_int8_skip_modules": ["lm_head", "mlp"]}})
    assert "qlora_lm_head" not in parsed.settings
    assert any("mlp left 16-bit" in line for line in parsed.not_modelled)


def test_compile_maps_to_compiled_layers_unless_beside_what_they_are_not_modelled_with():
    """torchtune's compile (training/_compile.py compile_model: each layer) and HF Trainer's torch_compile map to
    --compile, beside activation offloading too; beside ZeRO sharding (not modelled together) the run is counted
    eager and the key listed."""
    from memcalc.configs.trainers import parse_trainer_config

    torchtune = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 2, "dtype": "bf16",
                 "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"}, "compile": True}
    assert _settings(torchtune)["compile"] is True
    offloaded = _settings({**torchtune, "enable_activation_offloading": True})
    assert (offloaded["compile"], offloaded["activation_offload"]) == (True, "torchtune")
    assert _settings({"model_name_or_path": "gpt2", "torch_compile": True}, "hf")["compile"] is True
    assert _settings({**AXOLOTL, "torch_compile": True})["compile"] is True
    sharded = parse_trainer_config({**AXOLOTL, "torch_compile": True, "fsdp": ["full_shard", "auto_wrap"]})
    assert "compile" not in sharded.settings
    assert any(line.startswith("torch_compile true read but not modelled") for line in sharded.not_modelled)


def test_torchao_8bit_block_size_other_than_256_is_said():
    from memcalc.configs.trainers import parse_trainer_config

    parsed = parse_trainer_config({**AXOLOTL, "optimizer": "adamw_torch_8bit", "optim_args": "block_size=128"})
    assert parsed.settings["optim"] == "torchao-adamw-8bit"
    assert any(line.startswith("optim_args block_size=128 read but not modelled") for line in parsed.not_modelled)


def test_torchtune_llama3_3_builder_maps_to_its_preset():
    # torchtune/models/llama3_3/__init__.py exports llama3_3_70b (recipes/configs/llama3_3/70B_full_multinode.yaml).
    data = {"model": {"_component_": "torchtune.models.llama3_3.llama3_3_70b"}, "batch_size": 1, "dtype": "bf16",
            "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"}}
    assert _settings(data)["model"] == "llama-3.3-70b"


def test_torchtune_compile_beside_fsdp_keys_is_said_not_refused(cli, tmp_path):
    """recipes/configs/llama3_3/70B_full_multinode.yaml: compile True with fsdp_cpu_offload False (FSDP keys): the
    run is counted eager under FSDP and compile listed as not modelled, instead of the spec's refusal of
    --compile beside --zero."""
    from memcalc.configs.trainers import parse_trainer_config

    data = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 1, "dtype": "bf16",
            "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"},
            "fsdp_cpu_offload": False, "compile": True}
    parsed = parse_trainer_config(data, source="tt.yaml")
    assert (parsed.settings["sharding"], parsed.settings["zero"]) == ("fsdp", 3) and "compile" not in parsed.settings
    assert any(line.startswith("compile true read but not modelled") for line in parsed.not_modelled)
    path = tmp_path / "tt.json"  # (JSON is YAML; the torchtune format is detected from model._component_)
    path.write_text(json.dumps(data))
    result = cli("--from", str(path), "--from-format", "torchtune", "--gpus", "2", "--activations", "rules", "--json")
    assert result.exit_code == 0, result.stderr
    assert (result.json()["training"]["zero_stage"], result.json()["training"]["compile"]) == (3, False)


def test_axolotl_fsdp_config_alone_turns_fsdp_on_with_its_settings():
    """axolotl's FSDP2 examples have no fsdp: list; the section's keys (prefixed or not: schemas/fsdp.py FSDPConfig,
    validation.py drops the fsdp_ prefix) set what accelerate's plugin reads from setup_fsdp_envs' FSDP_* variables."""
    from memcalc.configs.trainers import parse_trainer_config

    # examples/gpt-oss/gpt-oss-20b-fft-fsdp2-offload.yaml's section: offload_params true, reshard_after_forward true,
    # cpu_ram_efficient_loading true, activation_checkpointing true.
    data = {**AXOLOTL, "fsdp_version": 2, "fsdp_config": {
        "offload_params": True, "state_dict_type": "SHARDED_STATE_DICT", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "reshard_after_forward": True,
        "cpu_ram_efficient_loading": True, "activation_checkpointing": True}}
    parsed = parse_trainer_config(data)
    assert {k: parsed.settings[k] for k in ("sharding", "zero", "checkpointing", "cpu_ram_efficient_loading")} == {
        "sharding": "fsdp", "zero": 3, "checkpointing": "full", "cpu_ram_efficient_loading": True}
    assert any(line.startswith("fsdp_config.offload_params true read but not modelled") for line in parsed.not_modelled)
    assert not any("FSDP1" in line for line in parsed.not_modelled)  # fsdp_version 2
    assert "fsdp_config" not in " ".join(parsed.ignored).split(", ")  # the section is read, not ignored whole
    assert "fsdp_config.state_dict_type" in parsed.ignored
    # reshard_after_forward false: gathered parameters stay for the backward (memcalc's stage 2).
    data["fsdp_config"]["reshard_after_forward"] = False
    assert _settings(data)["zero"] == 2
    # fsdp_version absent: axolotl's _resolve_fsdp_version default 1 (FSDP1, said as counted as FSDP2).
    v1 = parse_trainer_config({**AXOLOTL, "fsdp_config": {"reshard_after_forward": True}})
    assert v1.settings["sharding"] == "fsdp" and any("FSDP1" in line for line in v1.not_modelled)
    # Neither key: no FSDP.
    assert "sharding" not in _settings(AXOLOTL)


@pytest.mark.parametrize(("data", "reentrant"), [
    # axolotl utils/config/__init__.py normalize_config: gradient_checkpointing without gradient_checkpointing_kwargs
    # (and without unfrozen_parameters) gets {"use_reentrant": True}.
    ({**AXOLOTL, "gradient_checkpointing": True}, True),
    ({**AXOLOTL, "gradient_checkpointing": True, "unfrozen_parameters": ["lm_head.*"]}, False),
    # ... kwargs given are passed on (core/builders/base.py _configure_gradient_checkpointing).
    ({**AXOLOTL, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}, False),
    ({**AXOLOTL, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}, True),
    ({**AXOLOTL, "gradient_checkpointing": False}, False),
    # LLaMA-Factory hparams/model_args.py use_reentrant_gc True by default (checkpointing on unless disabled).
    ({"finetuning_type": "full", "model_name_or_path": "gpt2"}, True),
    ({"finetuning_type": "full", "use_reentrant_gc": False}, False),
    ({"finetuning_type": "full", "disable_gradient_checkpointing": True}, False),
    # transformers trainer.py: kwargs left after every_n_layers/offload go to torch.utils.checkpoint, whose
    # use_reentrant None is True (torch/utils/checkpoint.py); an empty rest is {"use_reentrant": False}.
    ({"model_name_or_path": "gpt2", "gradient_checkpointing": True,
      "gradient_checkpointing_kwargs": {"preserve_rng_state": False}}, True),
    ({"model_name_or_path": "gpt2", "gradient_checkpointing": True,
      "gradient_checkpointing_kwargs": {"every_n_layers": 2}}, False),
    # TRL sft_trainer.py: setdefault("use_reentrant", False) on the kwargs.
    ({"max_length": 512, "gradient_checkpointing_kwargs": {"preserve_rng_state": False}}, False),
])
def test_reentrant_checkpointing_as_each_trainer_defaults_it(data, reentrant):
    fmt = "hf" if "model_name_or_path" in data and "finetuning_type" not in data else None
    assert _settings(data, fmt).get("checkpoint_reentrant", False) is reentrant


def test_reentrant_default_with_adapters_is_said_not_modelled():
    from memcalc.configs.trainers import parse_trainer_config

    parsed = parse_trainer_config({**AXOLOTL, "gradient_checkpointing": True, "adapter": "lora", "lora_r": 8})
    assert "checkpoint_reentrant" not in parsed.settings
    assert any(line.startswith("gradient_checkpointing_kwargs true read but not modelled")
               for line in parsed.not_modelled)


# TRL run with the model loaded in bf16 (ModelConfig dtype bfloat16; base_config.py bf16 defaults to not fp16).
TRL_BF16 = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16", "max_length": 512}


def _merged(data: dict, chosen: dict) -> tuple[dict, list[str]]:
    from memcalc.configs.trainers import merge, parse_trainer_config

    return merge(parse_trainer_config(data, source="run.yaml"), chosen, lambda model: None)


def test_fsdp_from_the_launcher_runs_accelerates_upcast():
    """accelerate launch with an FSDP config over a bf16-loaded model and bf16 true: fsdp2_prepare_model
    (accelerate/utils/fsdp_utils.py) upcasts every trainable parameter to fp32 when mixed_precision != "no", and the
    MixedPrecisionPolicy gathers them in bf16: memcalc's bf16 under FSDP, not the config's own pure bf16."""
    from memcalc.errors import UsageError

    assert _merged(TRL_BF16, {})[0]["precision"] == "bf16-pure"  # one GPU, no engine: pure bf16 (unchanged)
    settings, notes = _merged(TRL_BF16, {"fsdp": True, "num_gpus": 8})
    assert settings["precision"] == "bf16"
    assert any(note.startswith("run.yaml: precision bf16 under the launcher's FSDP") for note in notes)
    assert not any("precision bf16-pure" in note for note in notes)  # the config's own note is replaced
    # --precision bf16 is what the launcher runs: accepted; bf16-pure is not.
    assert _merged(TRL_BF16, {"fsdp": True, "precision": "bf16"})[0]["precision"] == "bf16"
    with pytest.raises(UsageError, match="under the launcher's FSDP"):
        _merged(TRL_BF16, {"fsdp": True, "precision": "bf16-pure"})
    # No autocast (bf16 false): accelerate's mixed_precision "no", nothing upcast: pure bf16 stays.
    assert _merged({**TRL_BF16, "bf16": False}, {"fsdp": True})[0]["precision"] == "bf16-pure"


def test_deepspeed_from_the_launcher_leaves_the_recipe_to_its_config(cli):
    """--deepspeed over a TRL bf16 config: the DeepSpeed config's bf16 section decides (transformers
    integrations/deepspeed.py trainer_config_process fills its "auto" from args.bf16), as with the config's own
    deepspeed key; LLaMA-Factory's examples/deepspeed/ds_z3_config.json has bf16.enabled "auto"."""
    settings, _ = _merged(TRL_BF16, {"deepspeed": "ds.json"})
    assert settings["precision"] == "bf16"
    result = cli("qwen2.5-0.5b", "--from", str(FIXTURES / "trl_example_config.yaml"), "--activations", "rules",
                 "--deepspeed", str(FIXTURES / "examples" / "deepspeed" / "ds_z3_config.json"), "--gpus", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert (result.json()["training"]["precision"], result.json()["training"]["zero_stage"]) == ("bf16", 3)


def test_fsdp_from_the_launcher_turns_llamafactory_reentrant_checkpointing_off():
    # model_utils/checkpointing.py prepare_model_for_training: FSDP2 (ACCELERATE_USE_FSDP, FSDP_VERSION 2) sets
    # use_reentrant_gc False.
    data = {"finetuning_type": "full", "model_name_or_path": "gpt2", "bf16": True}
    assert _merged(data, {})[0]["checkpoint_reentrant"] is True
    settings, notes = _merged(data, {"fsdp": True})
    assert "checkpoint_reentrant" not in settings and settings["precision"] == "bf16"
    assert any("non-reentrantly under FSDP2" in note for note in notes)


@pytest.mark.parametrize(("data", "upcast"), [
    # axolotl loaders/model.py: norms, embeddings and head cast back to bf16 after prepare_model_for_kbit_training;
    # under FSDP it is skipped (_prepare_model_for_quantization) and nothing cast.
    (AXOLOTL_QLORA, False),
    ({**AXOLOTL_QLORA, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}, False),
    # LLaMA-Factory: no prepare_model_for_kbit_training anywhere in src/llamafactory (model/adapter.py upcasts the
    # trainable parameters only).
    ({"finetuning_type": "lora", "quantization_bit": 4}, False),
    # TRL sft_trainer.py: no prepare_model_for_kbit_training; a bf16-loaded base stays bf16 ...
    ({"max_length": 512, "use_peft": True, "load_in_4bit": True, "dtype": "bfloat16"}, False),
    # ... and ModelConfig's default float32 loads the non-quantized tensors in fp32 (memcalc's default, upcast).
    ({"max_length": 512, "use_peft": True, "load_in_4bit": True}, True),
])
def test_qlora_upcast_as_each_trainer_runs_it(data, upcast):
    assert _settings(data).get("qlora_upcast", True) is upcast


def test_axolotl_qlora_notes_agree(cli):
    """One account of the base's non-quantized tensors: the reader's (16-bit, axolotl casts them back) and the
    estimate's, no 'in fp32, as PEFT's prepare_model_for_kbit_training casts them' beside it."""
    result = cli("llama-3.2-1b", "--from", str(FIXTURES / "axolotl_qlora-1b.yml"), "--activations", "rules", "--json")
    assert result.exit_code in (0, 6), result.stderr
    notes = " ".join(result.json()["notes"])
    assert "axolotl leaves the base's non-quantized tensors in its 16-bit dtype" in notes
    assert "the base's other tensors stay 16-bit" in notes
    assert "prepare_model_for_kbit_training casts them" not in notes
    assert "memcalc counts them in 16 bits" not in notes


@pytest.mark.parametrize(("name", "said"), [
    # Each key changes memory in a way memcalc does not count here: listed as read but not modelled, never ignored.
    ("torchtune_llama3_3_70B_full_multinode.yaml", [
        "tensor_parallel_dim 8 read but not modelled", "custom_sharded_layers [tok_embeddings, output] read but not",
        "compile true read but not modelled"]),
    ("axolotl_qwen3-8b-fsdp-tp-cp.yaml", [
        "tensor_parallel_size 2 read but not modelled", "context_parallel_size 2 read but not modelled"]),
    ("axolotl_3b-fp8-fsdp2.yaml", ["fp8_enable_fsdp_float8_all_gather true read but not modelled",
                                   "torch_compile true read but not modelled"]),
])
def test_parallel_and_kernel_keys_are_said_never_ignored(name, said):
    config = read_trainer_config(FIXTURES / name)
    for start in said:
        assert any(line.startswith(start) for line in config.not_modelled), start
    memory_keys = {"tensor_parallel_dim", "context_parallel_dim", "custom_sharded_layers", "tensor_parallel_size",
                   "context_parallel_size", "dp_shard_size", "tiled_mlp", "fp8", "lora_mlp_kernel", "lora_qkv_kernel",
                   "lora_o_kernel", "use_kernels", "compile", "torch_compile"}
    assert not memory_keys & set(config.ignored)


@pytest.mark.parametrize(("key", "direction"), [
    # monkeypatch/tiled_mlp/base.py TiledMLP saves only the MLP's input: memcalc's whole-MLP count is high.
    ("tiled_mlp", "(high)"),
    ("lora_mlp_kernel", "direction not measured"),
    ("lora_qkv_kernel", "direction not measured"),
    ("lora_o_kernel", "direction not measured"),
    ("use_kernels", "direction not known"),
])
def test_axolotl_kernel_switches_are_said_with_their_direction(key, direction):
    from memcalc.configs.trainers import parse_trainer_config

    parsed = parse_trainer_config({**AXOLOTL, "adapter": "lora", "lora_r": 8, key: True})
    line = next(line for line in parsed.not_modelled if line.startswith(f"{key} true read but not modelled"))
    assert line.endswith(direction) or direction in line


def test_axolotl_dp_shard_size_is_the_shard_group():
    # utils/distributed.py _get_parallel_config_kwargs: dp_shard_size ranks shard, the rest of the world replicates
    # (dp_replicate_size); the world is the launcher's (--gpus), not the config's.
    settings = _settings({**AXOLOTL, "dp_shard_size": 4})
    assert settings["dp_shard"] == 4 and "gpus" not in settings


def test_torchtune_context_parallel_dim_is_said():
    data = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 1, "dtype": "bf16",
            "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"},
            "fsdp_cpu_offload": False, "context_parallel_dim": 4, "tensor_parallel_dim": 1}
    from memcalc.configs.trainers import parse_trainer_config

    parsed = parse_trainer_config(data)
    assert any(line.startswith("context_parallel_dim 4 read but not modelled") and line.endswith("(high)")
               for line in parsed.not_modelled)
    assert "tensor_parallel_dim" not in parsed.ignored  # read: 1 is no tensor parallelism


def test_activation_offloading_beside_sharding_is_said_not_refused(cli, tmp_path):
    """axolotl examples/gpt-oss/gpt-oss-20b-fft-deepspeed-zero3.yaml: activation_offloading true with a ZeRO-3
    DeepSpeed config; memcalc estimates offloading on one unsharded process only, so it is said and counted on the
    GPU, as with --fsdp from the launcher beside torchtune's enable_activation_offloading."""
    from memcalc.configs.trainers import parse_trainer_config

    data = {**AXOLOTL, "gradient_checkpointing": True, "activation_offloading": True, "fsdp_version": 2,
            "fsdp_config": {"reshard_after_forward": True}}
    parsed = parse_trainer_config(data)
    assert "activation_offload" not in parsed.settings and parsed.settings["zero"] == 3
    assert any(line.startswith("activation_offloading true read but not modelled") for line in parsed.not_modelled)
    assert not any("counted as --activation-offload" in note for note in parsed.notes)  # one account, not two
    torchtune = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 1, "dtype": "bf16",
                 "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"},
                 "enable_activation_checkpointing": True, "enable_activation_offloading": True}
    settings, _ = _merged(torchtune, {"fsdp": True})
    assert "activation_offload" not in settings
    # compile from the config with FSDP from the launcher: said and counted eager, its "as memcalc does" note gone.
    settings, notes = _merged({**torchtune, "compile": True}, {"fsdp": True})
    assert "compile" not in settings
    assert any(note.startswith("run.yaml: compile true read but not modelled") for note in notes)
    assert not any("compiles each decoder layer, as memcalc does" in note for note in notes)
    path = tmp_path / "tt.json"
    path.write_text(json.dumps(torchtune))
    result = cli("--from", str(path), "--from-format", "torchtune", "--fsdp", "--gpus", "2", "--activations", "rules",
                 "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["training"]["activation_offload"] == "none"


def test_fsdp2_leaves_trainable_parameters_beside_4bit_weights_uncast():
    """accelerate fsdp2_prepare_model upcasts only `if accelerator.mixed_precision != "no" and not
    model_has_params4bit`: TRL's QLoRA adapters, cast to bf16 by sft_trainer.py, stay bf16 (pure bf16) under FSDP2,
    whether the config or the launcher asks for it; FSDP1 (Accelerator.prepare_model) upcasts them."""
    qlora = {**TRL_BF16, "use_peft": True, "load_in_4bit": True}
    assert _merged(qlora, {"fsdp": True})[0]["precision"] == "bf16-pure"
    assert _settings({**qlora, "fsdp": "full_shard"})["precision"] == "bf16-pure"  # (TRL's FSDP default: version 2)
    assert _settings({**qlora, "fsdp": "full_shard", "fsdp_config": {"version": 1}})["precision"] == "bf16"


def test_zero_from_the_command_line_is_deepspeed_s_recipe():
    """--zero 3 without a DeepSpeed file is memcalc's DeepSpeed ZeRO: HF Trainer fills its bf16 section from args.bf16
    (integrations/deepspeed.py trainer_config_process) and DeepSpeed keeps fp32 master weights of the bf16 model
    (memcalc's bf16), not the single-GPU pure bf16; a comparison with stage 0 keeps the config's recipe."""
    assert _merged(TRL_BF16, {"zero": 3})[0]["precision"] == "bf16"
    assert _merged(TRL_BF16, {"zero": [0, 3]})[0]["precision"] == "bf16-pure"
    assert _merged(TRL_BF16, {"zero": 0})[0]["precision"] == "bf16-pure"


def test_llamafactory_lora_under_the_launcher_s_fsdp_is_not_reentrant():
    # LoRA: reentrant checkpoints are said as not modelled on one GPU; under FSDP2 LLaMA-Factory does not use them
    # (model_utils/checkpointing.py prepare_model_for_training), so nothing is said about them.
    data = {"finetuning_type": "lora", "model_name_or_path": "gpt2", "bf16": True}
    from memcalc.configs.trainers import merge, parse_trainer_config

    alone = parse_trainer_config(data, source="run.yaml")
    assert any(line.startswith("use_reentrant_gc true read but not modelled") for line in alone.not_modelled)
    settings, notes = merge(alone, {"fsdp": True}, lambda model: None)
    assert "checkpoint_reentrant" not in settings
    assert not any("use_reentrant_gc true read but not modelled" in note for note in notes)
    assert any("non-reentrantly under FSDP2" in note for note in notes)


@pytest.mark.parametrize(("key", "value", "precision_or_error"), [
    # schemas/config.py: bf16: Literal["auto"] | bool | None and gradient_checkpointing: Literal["offload",
    # "offload_disk"] | bool | None, validated by pydantic, whose lax bool takes 1/0 and "yes"/"no" (so bf16 is on:
    # the model loads in bf16, resolve_dtype) and refuses anything else; before, "yes" and 1 read as fp32 and "full",
    # 7 or "maybe" passed
    ("bf16", 1, "bf16-pure"), ("bf16", "yes", "bf16-pure"), ("bf16", "off", "fp32"),
    ("bf16", "full", "bf16 must be 'auto', true or false"), ("bf16", 7, "bf16 must be 'auto', true or false"),
    ("gradient_checkpointing", "maybe", "gradient_checkpointing must be 'offload', 'offload_disk', true or false"),
])
def test_axolotl_switches_are_read_as_its_schema_validates_them(key, value, precision_or_error):
    from memcalc.errors import ConfigError

    if " " not in precision_or_error:
        assert _settings({**AXOLOTL, key: value})["precision"] == precision_or_error
        return
    with pytest.raises(ConfigError, match=precision_or_error):
        _settings({**AXOLOTL, key: value})


def test_a_config_naming_no_known_model_is_model_not_found(cli, tmp_path):
    """A torchtune builder memcalc has no preset for: the model is not found (exit 3, README's exit codes), and the line
    says to give MODEL; before, exit 2 (bad usage)."""
    path = tmp_path / "tt.yaml"
    path.write_text("model:\n  _component_: torchtune.models.foo.bar_7b\nbatch_size: 1\ngradient_accumulation_steps: 1\n"
                    "optimizer:\n  _component_: torch.optim.AdamW\n")
    result = cli("--from", str(path))
    assert_one_line_error(result, EXIT_MODEL_NOT_FOUND, "names no model memcalc can resolve: give MODEL")
