"""memcalc.configs.deepspeed: DeepSpeed configs read and written as data, and mapped onto TrainingSpec fields.

DeepSpeed's defaults and HF Trainer's "auto" values are compared with what DeepSpeed's and transformers' own code
returned (tests/fixtures/peer_figures.json, written by scripts/peer_figures.py with the versions it records).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcalc import deepspeed_defaults
from memcalc.configs.deepspeed import (
    disagreements,
    emit_deepspeed_config,
    parse_deepspeed_config,
    read_deepspeed_config,
    spec_fields,
)
from memcalc.errors import ConfigError, UsageError
from memcalc.optimizers import OptimImpl, OptimizerName
from memcalc.precision import Dtype, PrecisionName
from memcalc.spec import Offload, Sharding, TrainingSpec, ZeroBuffers

PEER = json.loads((Path(__file__).parent / "fixtures" / "peer_figures.json").read_text())


def write(tmp_path: Path, config, name: str = "ds_config.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


# -- round trip -------------------------------------------------------------------------------------------------

ROUND_TRIP_SPECS = [
    TrainingSpec(zero_stage=stage, precision=precision, optimizer=optimizer, micro_batch_size=4, num_gpus=8)
    for stage in (0, 1, 2, 3)
    for precision in ("bf16", "fp16", "fp32", "amp-bf16", "amp-fp16")
    for optimizer in ("adamw", "adam", "lion", "sgd", "sgd-momentum", "adafactor")
] + [
    TrainingSpec(zero_stage=2, precision="bf16", master_dtype="bf16", state_dtype="bf16"),
    TrainingSpec(zero_stage=1, precision="bf16", master_dtype="bf16"),
    TrainingSpec(zero_stage=3, amsgrad=True, num_gpus=16, offload="optimizer"),
    TrainingSpec(zero_stage=2, num_gpus=4, offload="optimizer", grad_accum=8),
    TrainingSpec(zero_stage=3, num_gpus=2, offload="both"),
    TrainingSpec(zero_stage=3, num_gpus=2, offload="params", micro_batch_size=3, grad_accum=2),
]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS)
def test_emit_then_read_gives_the_spec_back(tmp_path, spec):
    config = emit_deepspeed_config(spec, hidden_size=4096)
    settings = read_deepspeed_config(write(tmp_path, json.dumps(config)), num_gpus=spec.num_gpus)  # JSON-ready
    fields = spec_fields(settings)
    # DeepSpeed builds FusedAdam / FusedLion for the optimizer it is named (runtime/engine.py), torch.optim.AdamW
    # with torch_adam (emitted for amsgrad, which FusedAdam lacks): the implementation is DeepSpeed's.
    fused = spec.optimizer.value in ("adamw", "adam", "lion") and not spec.amsgrad
    impl = "fused" if fused else spec.optim_impl.value
    assert spec.replace(**fields) == spec.replace(zero_buffers=fields["zero_buffers"], optim_impl=impl)
    assert settings.offload == spec.offload.value
    assert settings.train_batch_size == spec.micro_batch_size * spec.grad_accum * spec.num_gpus


def test_emit_uses_deepspeed_defaults_or_the_hf_rules_for_buckets():
    defaults = PEER["deepspeed_zero_config_defaults"]["by_stage"]
    zero = emit_deepspeed_config(TrainingSpec(zero_stage=2))["zero_optimization"]
    assert zero == {"stage": 2, "contiguous_gradients": defaults["2"]["contiguous_gradients"],
                    "overlap_comm": defaults["2"]["overlap_comm"],
                    "reduce_bucket_size": defaults["2"]["reduce_bucket_size"]}  # no allgather bucket: sizes nothing
    zero3 = emit_deepspeed_config(TrainingSpec(zero_stage=3))["zero_optimization"]
    for key in ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters"):
        assert zero3[f"stage3_{key}"] == defaults["3"][key], key
    assert zero3["overlap_comm"] is defaults["3"]["overlap_comm"] is True
    # What HF Trainer's trainer_config_finalize writes for "auto" with Llama-3-8B (hidden size 4096).
    hf = next(r["zero_optimization"] for r in PEER["hf_trainer_auto"]
              if r["preset"] == "llama-3-8b" and r["stage"] == 3)
    emitted = emit_deepspeed_config(TrainingSpec(zero_stage=3), hidden_size=4096)["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert emitted[key] == hf[key], key
    config = emit_deepspeed_config(TrainingSpec(micro_batch_size=2, num_gpus=8, precision="bf16", grad_accum=3))
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["optimizer"]["type"] == "AdamW"
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (2, 3, 48)
    assert "optimizer" not in emit_deepspeed_config(TrainingSpec(optimizer="adafactor"))


@pytest.mark.parametrize(("spec", "needle"), [
    (TrainingSpec(precision="bf16-pure", zero_stage=2), "master"),
    (TrainingSpec(precision="fp16-pure"), "master"),
    (TrainingSpec(zero_stage=0, master_dtype="bf16"), "ZeRO stage 1, 2 or 3"),
    (TrainingSpec(zero_stage=2, state_dtype="bf16"), "master dtype to bf16"),
    (TrainingSpec(zero_stage=2, grad_dtype="fp32"), "gradient dtype"),
    (TrainingSpec(precision="fp32", master_dtype=None, state_dtype="bf16"), "no DeepSpeed switch"),
])
def test_emit_refuses_what_deepspeed_has_no_switch_for(spec, needle):
    with pytest.raises(UsageError) as info:
        emit_deepspeed_config(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


# -- defaults: one table, equal to DeepSpeed's --------------------------------------------------------------------


def test_the_defaults_table_is_deepspeeds():
    ds = PEER["deepspeed_zero_config_defaults"]
    zero = ds["by_stage"]["0"]
    assert deepspeed_defaults.ZERO_STAGE == zero["stage"]
    assert deepspeed_defaults.CONTIGUOUS_GRADIENTS == zero["contiguous_gradients"]
    assert deepspeed_defaults.REDUCE_BUCKET_SIZE == zero["reduce_bucket_size"]
    assert deepspeed_defaults.ALLGATHER_BUCKET_SIZE == zero["allgather_bucket_size"]
    assert deepspeed_defaults.PREFETCH_BUCKET_SIZE == zero["prefetch_bucket_size"]
    assert deepspeed_defaults.PARAM_PERSISTENCE_THRESHOLD == zero["param_persistence_threshold"]
    assert deepspeed_defaults.MAX_LIVE_PARAMETERS == zero["max_live_parameters"]
    assert deepspeed_defaults.MAX_REUSE_DISTANCE == zero["max_reuse_distance"]
    assert deepspeed_defaults.SUB_GROUP_SIZE == zero["sub_group_size"]
    assert deepspeed_defaults.GRADIENT_CLIPPING == ds["gradient_clipping"]
    for stage, values in ds["by_stage"].items():
        assert deepspeed_defaults.overlap_comm(int(stage)) is values["overlap_comm"]
    # TrainingSpec's ZeroBuffers takes the same table (nothing written twice).
    assert ZeroBuffers() == ZeroBuffers(zero["reduce_bucket_size"], zero["prefetch_bucket_size"],
                                        zero["max_live_parameters"], zero["param_persistence_threshold"],
                                        zero["max_reuse_distance"], zero["sub_group_size"],
                                        zero["contiguous_gradients"], None)


def test_absent_keys_take_deepspeeds_defaults():
    defaults = PEER["deepspeed_zero_config_defaults"]["by_stage"]
    settings = parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1})
    assert settings.zero_stage == defaults["0"]["stage"]
    assert settings.reduce_bucket_size == defaults["0"]["reduce_bucket_size"]
    assert settings.stage3_prefetch_bucket_size == defaults["0"]["prefetch_bucket_size"]
    assert settings.stage3_max_live_parameters == defaults["0"]["max_live_parameters"]
    assert settings.stage3_max_reuse_distance == defaults["0"]["max_reuse_distance"]
    assert settings.stage3_param_persistence_threshold == defaults["0"]["param_persistence_threshold"]
    assert settings.sub_group_size == defaults["0"]["sub_group_size"]
    assert settings.contiguous_gradients is defaults["0"]["contiguous_gradients"]
    assert settings.overlap_comm is defaults["0"]["overlap_comm"]
    assert settings.gradient_clipping == PEER["deepspeed_zero_config_defaults"]["gradient_clipping"]
    assert settings.gradient_accumulation_steps == 1
    assert settings.precision == PrecisionName.fp32
    assert parse_deepspeed_config({"zero_optimization": {"stage": 3}}).overlap_comm is defaults["3"]["overlap_comm"]
    assert not hasattr(settings, "allgather_bucket_size")  # checked, never carried: it sizes no memory


def test_numbers_as_deepspeed_writes_them():
    settings = parse_deepspeed_config({
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "prefetch_bucket_size": 1e7,
                              "stage3_max_live_parameters": 3e8, "sub_group_size": 1e8, "cpu_offload": True},
    })
    assert settings.reduce_bucket_size == 500_000_000 and isinstance(settings.reduce_bucket_size, int)
    assert settings.stage3_prefetch_bucket_size == 10_000_000  # field name and stage3_ alias both accepted
    assert settings.stage3_max_live_parameters == 300_000_000
    assert settings.sub_group_size == 100_000_000
    assert settings.offload == "optimizer"  # deprecated cpu_offload
    assert any("cpu_offload" in note for note in settings.notes)


def test_allgather_bucket_size_is_checked_then_noted():
    settings = parse_deepspeed_config({"zero_optimization": {"stage": 2, "allgather_bucket_size": 2e8}})
    assert any("allgather_bucket_size" in note and "no memory" in note for note in settings.notes)
    # stage_1_and_2.py DeepSpeedZeroOptimizer.__init__ asserts allgather_bucket_size % 2 == 0.
    with pytest.raises(ConfigError, match="multiple of 2"):
        parse_deepspeed_config({"zero_optimization": {"stage": 1, "allgather_bucket_size": 500_000_001}})
    parse_deepspeed_config({"zero_optimization": {"stage": 3, "allgather_bucket_size": 500_000_001}})  # unread there


def test_deepspeed_batch_rules():
    # deepspeed/runtime/config.py _set_batch_related_parameters.
    s = parse_deepspeed_config({"train_batch_size": 64, "gradient_accumulation_steps": 2}, num_gpus=8)
    assert s.train_micro_batch_size_per_gpu == 4
    s = parse_deepspeed_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, num_gpus=8)
    assert s.gradient_accumulation_steps == 4
    s = parse_deepspeed_config({"train_batch_size": 16}, num_gpus=8)
    assert (s.train_micro_batch_size_per_gpu, s.gradient_accumulation_steps) == (2, 1)


# -- spec_fields: every field the config decides ---------------------------------------------------------------


def test_spec_fields_name_every_field_the_config_decides():
    s = parse_deepspeed_config({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4,
                                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                "bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                         "bf16_optimizer_states": True},
                                "optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}})
    fields = spec_fields(s)
    assert fields == {"zero_stage": 2, "precision": PrecisionName.bf16, "master_dtype": Dtype.bf16,
                      "state_dtype": Dtype.bf16, "micro_batch_size": 3, "grad_accum": 4, "offload": Offload.optimizer,
                      "sharding": Sharding.deepspeed, "zero_buffers": ZeroBuffers(overlap_comm=False),
                      "optimizer": OptimizerName.adam, "amsgrad": False, "optim_impl": OptimImpl.fused}
    TrainingSpec(num_gpus=8, **fields)  # a valid spec as it stands


@pytest.mark.parametrize(("config", "field", "expected"), [
    ({"fp16": {"enabled": True}}, "precision", PrecisionName.fp16),
    ({"torch_autocast": {"enabled": True}}, "precision", PrecisionName.amp_bf16),
    ({"optimizer": {"type": "SGD", "params": {"momentum": 0.9}}}, "optimizer", OptimizerName.sgd_momentum),
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "amsgrad", True),
    ({"zero_optimization": {"stage": 3, "sub_group_size": 123}}, "zero_buffers", ZeroBuffers(sub_group_size=123,
                                                                                              overlap_comm=True)),
])
def test_spec_fields_map_deepspeed_switches(config, field, expected):
    assert spec_fields(parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, **config}))[field] == expected


def test_an_optimizer_memcalc_does_not_know_leaves_the_choice_to_the_caller():
    s = parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Muon"}})
    assert "optimizer" not in spec_fields(s) and "amsgrad" not in spec_fields(s)
    assert any("Muon" in note for note in s.notes)
    assert "optimizer" not in spec_fields(parse_deepspeed_config({}))  # no section: the client brings one


def test_disagreements():
    fields = spec_fields(parse_deepspeed_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    assert disagreements(fields, {"zero_stage": [2], "precision": PrecisionName.bf16}) == []
    assert disagreements(fields, {"zero_stage": [0, 1, 2, 3]}) == [("zero_stage", [0, 1, 2, 3], 2)]
    assert disagreements(fields, {"precision": "fp16", "optimizer": "lion"}) == [
        ("precision", "fp16", PrecisionName.bf16)]  # the config names no optimizer: the caller's stands
    assert disagreements(fields, {"offload": Offload.optimizer}) == [("offload", Offload.optimizer, Offload.none)]


# -- bad configs: one line each -----------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"zero_optimisation": {"stage": 2}}, "zero_optimisation"),
    ({"zero_optimization": {"stage": 2, "stage3_prefetch_bucket": 1}}, "zero_optimization.stage3_prefetch_bucket"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin": True}}},
     "zero_optimization.offload_param.pin"),
    ({"bf16": {"enabled": True, "master_weights": True}}, "bf16.master_weights"),
    ({"optimizer": {"type": "AdamW", "parameters": {}}}, "optimizer.parameters"),
    ({"zero_optimization": {"stage": 2, "mics_shard_size": 8}}, "mics_shard_size"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}}, "ratio"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}, "reduce_bucket_size"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}, "reduce_bucket_size"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": -5e8}}, "allgather_bucket_size"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": -1}}, "sub_group_size"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "sub_group_size"),
    ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": -1}}, "stage3_max_live_parameters"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": -1}}, "stage3_prefetch_bucket_size"),
    ({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": -10}},
     "stage3_param_persistence_threshold"),
    ({"zero_optimization": {"stage": 3, "prefetch_bucket_size": 1, "stage3_prefetch_bucket_size": 2}},
     "stage3_prefetch_bucket_size"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1.5}}, "reduce_bucket_size"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "yes"}}, "overlap_comm"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "offload_optimizer.device"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "allgather_bucket_size"),
    ({"zero_optimization": {"stage": "auto"}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "bf16_optimizer_states": True}},
     "bf16_optimizer_states"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, "bf16_master_weights_and_grads"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"bf16_master_weights_and_grads": True}}, "bf16.enabled"),
    ({"amp": {"enabled": True}}, "amp"),
    ({"optimizer": {"params": {"lr": 1e-4}}}, "optimizer.type"),
    ({"optimizer": {"type": "AdamW", "params": {"momentum": "auto"}}}, "optimizer.params.momentum"),
    ({"gradient_clipping": -1.0}, "gradient_clipping"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 32},
     "train_batch_size"),
    ({"torch_autocast": {"enabled": True, "dtype": "int8"}}, "torch_autocast.dtype"),
    ({"zero_optimization": [2]}, "zero_optimization"),
    ({"bad\nkey\x1b[31m": 1}, "bad\\nkey\\x1b[31m"),
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize(("config", "needle"), BAD_CONFIGS)
def test_bad_config_is_one_config_error_line_naming_the_key(tmp_path, config, needle):
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        read_deepspeed_config(path, num_gpus=8)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message and "\x1b" not in message and str(path) in message
    assert info.value.exit_code == 4


def test_unknown_key_suggests_the_spelling(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'zero_optimization'"):
        read_deepspeed_config(write(tmp_path, {"zero_optimisation": {}}))


@pytest.mark.parametrize(("text", "needle"), [
    ('{"zero_optimization": {"stage": 2,}}', "not valid JSON (line 1"),
    ('{"fp16": {"enabled": true}, "fp16": {"enabled": false}}', "'fp16' appears twice"),
    ('{"zero_optimization": {"stage": 2, "stage": 3}}', "'stage' appears twice"),
    ("// comment\n{}", "no comments"),
    ("[" * 100_000, "nested too deeply"),
])
def test_unreadable_json_is_one_line(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        read_deepspeed_config(write(tmp_path, text))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_file_folder_fifo_and_non_utf8(tmp_path):
    import os

    with pytest.raises(ConfigError, match="not found"):
        read_deepspeed_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="folder"):
        read_deepspeed_config(tmp_path)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):  # would block forever if opened for reading
        read_deepspeed_config(fifo)
    latin = tmp_path / "latin1.json"
    latin.write_bytes('{"zero_optimization": {"stage": 2}, "x": "\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_deepspeed_config(latin)
    with pytest.raises(UsageError, match="empty"):
        read_deepspeed_config("")


def test_deepspeed_attribute_names_written_as_sections_are_noted_not_fatal():
    """LLaMA-Factory's examples/deepspeed/ds_z3_fp8_config.json writes "comms_config": {"verbose": false} and
    "monitor_config": {...}: DeepSpeed reads neither key (deepspeed/runtime/config.py builds its comms_config from
    "comms_logger", deepspeed/comm/config.py, and monitor_config from tensorboard/wandb/csv_monitor/comet,
    deepspeed/monitor/config.py get_monitor_config), so they are noted, not refused as misspellings."""
    s = parse_deepspeed_config({"zero_optimization": {"stage": 3}, "comms_config": {"verbose": False},
                                "monitor_config": {"enabled": True, "csv_monitor": {"enabled": False}}})
    assert s.zero_stage == 3
    assert [note.split(":")[0] for note in s.notes if "DeepSpeed does not read it" in note] == [
        "comms_config", "monitor_config"]
    with pytest.raises(ConfigError, match="unknown top-level key 'comms_configs'"):
        parse_deepspeed_config({"comms_configs": {}})


def test_removed_deepspeed_sections_are_noted_not_fatal():
    s = parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "sparse_attention": {"mode": "fixed"},
                                "tensorboard": {"enabled": False}, "scheduler": {"type": "WarmupLR"}})
    assert any(note.startswith("sparse_attention") for note in s.notes)


# -- "auto", as the HF integration fills it --------------------------------------------------------------------

HF_ZERO3_CONFIG = {  # the shape of the HF Trainer docs' ZeRO-3 example
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.mark.parametrize(("preset", "hidden_size"), [("gpt2", 768), ("llama-3-8b", 4096)])
def test_auto_buckets_as_hf_trainer_writes_them(tmp_path, preset, hidden_size):
    # hidden_size: the model's (ModelInput.hidden_size); the expected values are what HF's own
    # trainer_config_finalize wrote for the preset's transformers config (GPT-2 calls it n_embd).
    s = read_deepspeed_config(write(tmp_path, HF_ZERO3_CONFIG), hidden_size=hidden_size, num_gpus=8)
    hf = next(r["zero_optimization"] for r in PEER["hf_trainer_auto"] if r["preset"] == preset and r["stage"] == 3)
    assert (s.reduce_bucket_size, s.stage3_prefetch_bucket_size, s.stage3_param_persistence_threshold) == (
        hf["reduce_bucket_size"], hf["stage3_prefetch_bucket_size"], hf["stage3_param_persistence_threshold"])


def test_auto_values_resolved_like_the_hf_integration(tmp_path):
    path = write(tmp_path, HF_ZERO3_CONFIG)
    s = read_deepspeed_config(path, hidden_size=4096, micro_batch_size=4, gradient_accumulation_steps=2,
                              precision="bf16", num_gpus=8)
    # trainer_config_process (TrainingArguments values where the caller gives them, its defaults otherwise)
    assert (s.train_micro_batch_size_per_gpu, s.gradient_accumulation_steps, s.train_batch_size) == (4, 2, 64)
    assert (s.bf16, s.fp16, s.gradient_clipping) == (True, False, 1.0)
    assert s.optimizer_params_dict == {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert s.offload == "both" and s.zero_stage == 3
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16.enabled",
                "fp16.enabled", "gradient_clipping", "optimizer.params.lr"):
        assert any(key in note and "auto" in note for note in s.notes), key
    fields = spec_fields(s)
    assert (fields["zero_stage"], fields["precision"], fields["micro_batch_size"], fields["grad_accum"],
            fields["optimizer"], fields["offload"]) == (3, PrecisionName.bf16, 4, 2, OptimizerName.adamw, Offload.both)


def test_auto_without_what_the_rules_need_says_what_was_assumed():
    s = parse_deepspeed_config(HF_ZERO3_CONFIG)
    assert s.reduce_bucket_size == deepspeed_defaults.REDUCE_BUCKET_SIZE  # no hidden size: DeepSpeed's default
    assert any("hidden size is unknown" in note for note in s.notes)
    assert s.train_micro_batch_size_per_gpu == 1
    assert any("default is 8" in note for note in s.notes)
    assert s.gradient_accumulation_steps == 1  # TrainingArguments.gradient_accumulation_steps default
    assert s.precision == PrecisionName.fp32  # args.bf16 / args.fp16 default False
    assert s.train_batch_size is None


def test_stage3_auto_keys_below_stage3_keep_deepspeed_defaults():
    config = json.loads(json.dumps(HF_ZERO3_CONFIG))
    config["zero_optimization"] = {"stage": 2, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                   "offload_optimizer": {"device": "auto"}}
    s = parse_deepspeed_config(config, hidden_size=2048, offload="optimizer")
    assert s.reduce_bucket_size == 2048 * 2048  # HF fills this one at every stage (trainer_config_finalize)
    assert s.stage3_prefetch_bucket_size == deepspeed_defaults.PREFETCH_BUCKET_SIZE
    assert any("unused below ZeRO-3" in note for note in s.notes)
    assert s.offload == "optimizer"  # accelerate's DeepSpeedPlugin fills the device


def test_accelerate_fills_the_stage():
    s = parse_deepspeed_config({"zero_optimization": {"stage": "auto"}, "train_micro_batch_size_per_gpu": 1},
                               zero_stage=2)
    assert s.zero_stage == 2 and any("zero_optimization.stage" in note for note in s.notes)
