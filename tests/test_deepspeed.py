"""memcalc.deepspeed: DeepSpeed configs read and written as data, DeepSpeed's and accelerate's estimators reproduced.

No torch, no deepspeed: the expected DeepSpeed figures are derived by hand below from the formulas in
deepspeed/runtime/zero/stage_1_and_2.py (estimate_zero2_model_states_mem_needs) and
deepspeed/runtime/zero/stage3.py (estimate_zero3_model_states_mem_needs), and cross-checked against numbers that
came from calling those functions in deepspeed==0.19.8 (scratch script, CPU, not a dependency).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcalc import deepspeed as ds
from memcalc.api import model_input, run
from memcalc.errors import ConfigError, UsageError
from memcalc.precision import Dtype, PrecisionName
from memcalc.spec import TrainingSpec


def write(tmp_path: Path, config, name: str = "ds_config.json") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


# -- round trip -------------------------------------------------------------------------------------------------

ROUND_TRIP_SPECS = [
    (TrainingSpec(zero_stage=stage, precision=precision, optimizer=optimizer, micro_batch_size=4, num_gpus=8), "none")
    for stage in (0, 1, 2, 3)
    for precision in ("bf16", "fp16", "fp32", "amp-bf16", "amp-fp16")
    for optimizer in ("adamw", "adam", "lion", "sgd", "sgd-momentum", "adafactor")
] + [
    (TrainingSpec(zero_stage=2, precision="bf16", master_dtype="bf16", state_dtype="bf16"), "none"),
    (TrainingSpec(zero_stage=1, precision="bf16", master_dtype="bf16"), "none"),
    (TrainingSpec(zero_stage=3, amsgrad=True, num_gpus=16), "optimizer"),
    (TrainingSpec(zero_stage=2, num_gpus=4), "optimizer"),
    (TrainingSpec(zero_stage=3, num_gpus=2), "both"),
    (TrainingSpec(zero_stage=3, num_gpus=2), "params"),
]


@pytest.mark.parametrize(("spec", "offload"), ROUND_TRIP_SPECS)
def test_emit_then_read_gives_the_spec_back(tmp_path, spec, offload):
    config = ds.emit_deepspeed_config(spec, hidden_size=4096, offload=offload)
    path = write(tmp_path, json.dumps(config))  # JSON-ready
    settings = ds.read_deepspeed_config(path, num_gpus=spec.num_gpus)
    assert spec.replace(**ds.spec_overrides(settings)) == spec
    assert settings.offload == offload
    assert settings.train_batch_size == spec.micro_batch_size * spec.num_gpus


def test_emit_uses_deepspeed_defaults_or_the_hf_rules_for_buckets():
    zero = ds.emit_deepspeed_config(TrainingSpec(zero_stage=2))["zero_optimization"]
    assert zero == {"stage": 2, "contiguous_gradients": True, "overlap_comm": False,
                    "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    zero3 = ds.emit_deepspeed_config(TrainingSpec(zero_stage=3))["zero_optimization"]
    assert zero3["stage3_prefetch_bucket_size"] == 50_000_000
    assert zero3["stage3_param_persistence_threshold"] == 100_000
    assert zero3["stage3_max_live_parameters"] == 1_000_000_000
    assert zero3["overlap_comm"] is True
    hf = ds.emit_deepspeed_config(TrainingSpec(zero_stage=3), hidden_size=4096)["zero_optimization"]
    assert hf["reduce_bucket_size"] == 4096 * 4096 == 16_777_216
    assert hf["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096) == 15_099_494
    assert hf["stage3_param_persistence_threshold"] == 40_960
    config = ds.emit_deepspeed_config(TrainingSpec(micro_batch_size=2, num_gpus=8, precision="bf16"))
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["optimizer"]["type"] == "AdamW"
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (2, 16)
    assert "optimizer" not in ds.emit_deepspeed_config(TrainingSpec(optimizer="adafactor"))


@pytest.mark.parametrize(("spec", "offload", "needle"), [
    (TrainingSpec(precision="bf16-pure", zero_stage=2), "none", "master"),
    (TrainingSpec(precision="fp16-pure"), "none", "master"),
    (TrainingSpec(zero_stage=0), "optimizer", "--zero"),
    (TrainingSpec(zero_stage=2), "params", "--zero 3"),
    (TrainingSpec(zero_stage=0, master_dtype="bf16"), "none", "--zero"),
    (TrainingSpec(zero_stage=2, state_dtype="bf16"), "none", "--master-dtype bf16"),
    (TrainingSpec(zero_stage=2, grad_dtype="fp32"), "none", "--grad-dtype"),
    (TrainingSpec(zero_stage=2), "disk", "--offload"),
])
def test_emit_refuses_what_deepspeed_has_no_switch_for(spec, offload, needle):
    with pytest.raises(UsageError) as info:
        ds.emit_deepspeed_config(spec, offload=offload)
    assert needle in str(info.value) and "\n" not in str(info.value)


# -- defaults -------------------------------------------------------------------------------------------------


def test_absent_keys_take_deepspeeds_defaults():
    # deepspeed/runtime/zero/config.py DeepSpeedZeroConfig; checked against DeepSpeedZeroConfig() of 0.19.8.
    settings = ds.parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1})
    assert settings.zero_stage == 0
    assert settings.reduce_bucket_size == 500_000_000
    assert settings.allgather_bucket_size == 500_000_000
    assert settings.stage3_prefetch_bucket_size == 50_000_000
    assert settings.stage3_max_live_parameters == 1_000_000_000
    assert settings.stage3_max_reuse_distance == 1_000_000_000
    assert settings.stage3_param_persistence_threshold == 100_000
    assert settings.sub_group_size == 1_000_000_000
    assert settings.contiguous_gradients is True
    assert settings.overlap_comm is False  # overlap_comm_valid: stage == 3
    assert settings.gradient_clipping == 1.0  # runtime/constants.py GRADIENT_CLIPPING_DEFAULT
    assert settings.gradient_accumulation_steps == 1
    assert settings.precision == PrecisionName.fp32
    assert ds.parse_deepspeed_config({"zero_optimization": {"stage": 3}}).overlap_comm is True


def test_numbers_as_deepspeed_writes_them():
    settings = ds.parse_deepspeed_config({
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "prefetch_bucket_size": 1e7,
                              "stage3_max_live_parameters": 3e8, "cpu_offload": True},
    })
    assert settings.reduce_bucket_size == 500_000_000 and isinstance(settings.reduce_bucket_size, int)
    assert settings.stage3_prefetch_bucket_size == 10_000_000  # field name and stage3_ alias both accepted
    assert settings.stage3_max_live_parameters == 300_000_000
    assert settings.offload == "optimizer"  # deprecated cpu_offload
    assert any("cpu_offload" in note for note in settings.notes)


def test_deepspeed_batch_rules():
    # deepspeed/runtime/config.py _set_batch_related_parameters.
    s = ds.parse_deepspeed_config({"train_batch_size": 64, "gradient_accumulation_steps": 2}, num_gpus=8)
    assert s.train_micro_batch_size_per_gpu == 4
    s = ds.parse_deepspeed_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}, num_gpus=8)
    assert s.gradient_accumulation_steps == 4
    s = ds.parse_deepspeed_config({"train_batch_size": 16}, num_gpus=8)
    assert (s.train_micro_batch_size_per_gpu, s.gradient_accumulation_steps) == (2, 1)


def test_overrides_map_deepspeed_precision_flags():
    s = ds.parse_deepspeed_config({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2},
                                   "bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                            "bf16_optimizer_states": True},
                                   "optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}})
    assert ds.spec_overrides(s) == {"zero_stage": 2, "precision": PrecisionName.bf16, "micro_batch_size": 3,
                                    "master_dtype": Dtype.bf16, "state_dtype": Dtype.bf16, "optimizer": "adam",
                                    "amsgrad": False}
    s = ds.parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}})
    assert ds.spec_overrides(s)["precision"] == PrecisionName.fp16
    s = ds.parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "torch_autocast": {"enabled": True}})
    assert ds.spec_overrides(s)["precision"] == PrecisionName.amp_bf16
    s = ds.parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Muon"}})
    assert "optimizer" not in ds.spec_overrides(s)
    assert any("Muon" in note for note in s.notes)


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
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize(("config", "needle"), BAD_CONFIGS)
def test_bad_config_is_one_config_error_line_naming_the_key(tmp_path, config, needle):
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        ds.read_deepspeed_config(path, num_gpus=8)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message and str(path) in message
    assert info.value.exit_code == 4


def test_unknown_key_suggests_the_spelling(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'zero_optimization'"):
        ds.read_deepspeed_config(write(tmp_path, {"zero_optimisation": {}}))


@pytest.mark.parametrize(("text", "needle"), [
    ('{"zero_optimization": {"stage": 2,}}', "not valid JSON at line 1"),
    ('{"fp16": {"enabled": true}, "fp16": {"enabled": false}}', "'fp16' appears twice"),
    ("// comment\n{}", "no comments"),
])
def test_unreadable_json_is_one_line(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        ds.read_deepspeed_config(write(tmp_path, text))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ds.read_deepspeed_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="folder"):
        ds.read_deepspeed_config(tmp_path)


def test_removed_deepspeed_sections_are_noted_not_fatal():
    s = ds.parse_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "sparse_attention": {"mode": "fixed"},
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


def test_auto_values_resolved_like_the_hf_integration(tmp_path):
    path = write(tmp_path, HF_ZERO3_CONFIG)
    s = ds.read_deepspeed_config(path, hidden_size=4096, micro_batch_size=4, precision="bf16", num_gpus=8)
    # transformers/integrations/deepspeed.py trainer_config_finalize
    assert s.reduce_bucket_size == 4096 * 4096
    assert s.stage3_prefetch_bucket_size == int(0.9 * 4096 * 4096)
    assert s.stage3_param_persistence_threshold == 10 * 4096
    # trainer_config_process (TrainingArguments defaults where the CLI has no flag)
    assert (s.train_micro_batch_size_per_gpu, s.gradient_accumulation_steps, s.train_batch_size) == (4, 1, 32)
    assert (s.bf16, s.fp16, s.gradient_clipping) == (True, False, 1.0)
    assert s.optimizer_params_dict == {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert s.offload == "both" and s.zero_stage == 3
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16.enabled",
                "fp16.enabled", "gradient_clipping", "optimizer.params.lr"):
        assert any(key in note and "auto" in note for note in s.notes), key
    assert ds.spec_overrides(s) == {"zero_stage": 3, "precision": PrecisionName.bf16, "micro_batch_size": 4,
                                    "optimizer": "adamw", "amsgrad": False}


def test_auto_without_what_the_rules_need_says_what_was_assumed():
    s = ds.parse_deepspeed_config(HF_ZERO3_CONFIG)
    assert s.reduce_bucket_size == 500_000_000  # no hidden size: DeepSpeed's default, noted
    assert any("hidden size is unknown" in note for note in s.notes)
    assert s.train_micro_batch_size_per_gpu == 1
    assert any("default is 8" in note and "--batch-size" in note for note in s.notes)
    assert s.precision == PrecisionName.fp32  # args.bf16 / args.fp16 default False
    assert s.train_batch_size is None


def test_stage3_auto_keys_below_stage3_keep_deepspeed_defaults():
    config = json.loads(json.dumps(HF_ZERO3_CONFIG))
    config["zero_optimization"] = {"stage": 2, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                   "offload_optimizer": {"device": "auto"}}
    s = ds.parse_deepspeed_config(config, hidden_size=2048, offload="optimizer")
    assert s.reduce_bucket_size == 2048 * 2048  # HF fills this one at every stage
    assert s.stage3_prefetch_bucket_size == 50_000_000
    assert any("unused below ZeRO-3" in note for note in s.notes)
    assert s.offload == "optimizer"  # accelerate's DeepSpeedPlugin fills the device


def test_accelerate_fills_the_stage():
    s = ds.parse_deepspeed_config({"zero_optimization": {"stage": "auto"}, "train_micro_batch_size_per_gpu": 1},
                                  zero_stage=2)
    assert s.zero_stage == 2 and any("zero_optimization.stage" in note for note in s.notes)


def test_hf_hidden_size_lookup():
    assert ds.hf_hidden_size({"hidden_size": 4096}) == 4096
    assert ds.hf_hidden_size({"hidden_sizes": [96, 192, 384]}) == 384
    assert ds.hf_hidden_size({"text_config": {"hidden_size": 2560}}) == 2560
    assert ds.hf_hidden_size({"n_embd": 768}) is None


# -- DeepSpeed's estimators, to the byte ------------------------------------------------------------------------

P75 = 7_500_000_000  # a 7.5B model
L75 = 131_072_000  # its largest layer: a 32000 x 4096 embedding
GIB = 2**30


def test_zero2_estimate_7_5b_one_node_eight_gpus():
    # stage_1_and_2.py estimate_zero2_model_states_mem_needs, total_gpus = 1 x 8:
    # no offload: gpu = 2P + int(18P / 8); cpu = P x 4 x 8 GPUs per node x 1.5
    assert ds.deepspeed_zero2_estimate(P75, 8, 1, cpu_offload=False) == (
        int(P75 * 4 * 8 * 1.5), 2 * P75 + int(18 * P75 / 8)) == (360_000_000_000, 31_875_000_000)
    # offload: gpu = 2P; cpu = P x max(4 x 8, 16) x 1.5
    assert ds.deepspeed_zero2_estimate(P75, 8, 1, cpu_offload=True) == (
        int(P75 * max(4 * 8, 16) * 1.5), 2 * P75) == (360_000_000_000, 15_000_000_000)
    # deepspeed==0.19.8 estimate_zero2_model_states_mem_needs_all_cold(7.5e9, 8, 1) printed
    # "335.28GB | 13.97GB | offload_optimizer=cpu" and "335.28GB | 29.69GB | offload_optimizer=none".
    assert round(360_000_000_000 / GIB, 2) == 335.28 and round(15_000_000_000 / GIB, 2) == 13.97
    assert round(31_875_000_000 / GIB, 2) == 29.69


def test_zero3_estimate_7_5b_one_node_eight_gpus():
    # stage3.py estimate_zero3_model_states_mem_needs, largest_layer_memory = 4 x L, gpus_factor = 1 / nodes.
    four_l = 4 * L75
    # no offload: gpu = 4L + int(18P / 8); cpu (zero_init) = L x 4 x 8 x 1.5
    assert ds.deepspeed_zero3_estimate(P75, L75, 8, 1, cpu_offload=False, cpu_offload_params=False) == (
        int(L75 * 4 * 8 * 1.5), four_l + int(18 * P75 / 8)) == (6_291_456_000, 17_399_288_000)
    # optimizer offloaded: gpu = 4L + int(2P / 8); cpu = P x 16 x 1 x 1.5
    assert ds.deepspeed_zero3_estimate(P75, L75, 8, 1, cpu_offload=True, cpu_offload_params=False) == (
        int(P75 * 16 * 1.5), four_l + int(2 * P75 / 8)) == (180_000_000_000, 2_399_288_000)
    # optimizer and params offloaded: gpu = 4L; cpu = P x 18 x 1.5
    assert ds.deepspeed_zero3_estimate(P75, L75, 8, 1, cpu_offload=True, cpu_offload_params=True) == (
        int(P75 * 18 * 1.5), four_l) == (202_500_000_000, 524_288_000)
    # without zero.Init: cpu = P x max(4 x 8, 18) x 1.5
    assert ds.deepspeed_zero3_estimate(P75, L75, 8, 1, True, True, zero_init=False) == (360_000_000_000, 524_288_000)
    # cpu_offload_params is read only under cpu_offload (as in DeepSpeed)
    assert ds.deepspeed_zero3_estimate(P75, L75, 8, 1, False, True) == ds.deepspeed_zero3_estimate(P75, L75, 8, 1,
                                                                                                   False, False)


def test_estimates_match_deepspeed_0_19_8_outputs():
    # Returned by deepspeed==0.19.8's own functions (scratch script on CPU; DeepSpeed is not a dependency).
    z2 = ds.deepspeed_zero2_estimate
    z3 = ds.deepspeed_zero3_estimate
    assert z2(P75, 8, 2, True) == (720_000_000_000, 15_000_000_000)  # max(4 x 16 GPUs, 16): all GPUs, not per node
    assert z2(P75, 8, 2, False) == (360_000_000_000, 23_437_500_000)
    assert z3(P75, L75, 8, 2, True, True) == (101_250_000_000, 524_288_000)
    assert z3(P75, L75, 8, 2, True, False) == (90_000_000_000, 1_461_788_000)
    assert z3(P75, L75, 8, 2, False, False) == (6_291_456_000, 8_961_788_000)
    p8, l8 = 8_030_261_248, 525_336_576  # Llama-3-8B
    assert z2(p8, 8, 1, False) == (385_452_539_904, 34_128_610_304)
    assert z2(p8, 8, 1, True) == (385_452_539_904, 16_060_522_496)
    assert z3(p8, l8, 8, 1, False, False) == (25_216_155_648, 20_169_434_112)
    assert z3(p8, l8, 8, 1, True, False) == (192_726_269_952, 4_108_911_616)
    assert z3(p8, l8, 8, 1, True, True) == (216_817_053_696, 2_101_346_304)


@pytest.fixture(scope="module")
def llama3_8b():
    return model_input("llama-3-8b", None)


def test_deepspeed_param_counts_like_model_to_params(llama3_8b):
    # stage3.py model_to_params: the largest module's own parameters is the 128256 x 4096 embedding (and the
    # untied LM head), not a transformer block. (Equal to model_to_params on tiny real llama/gpt2 models.)
    assert ds.deepspeed_param_counts(llama3_8b.tensors) == (8_030_261_248, 128256 * 4096)


def rows_by_term(rows):
    return {row.term: row for row in rows}


def test_compare_with_deepspeed_zero2(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=2, num_gpus=8))
    rows = rows_by_term(ds.compare_with_deepspeed(report))
    p, n = 8_030_261_248, 8
    assert rows["GPU total (memcalc: peak)"].tool_bytes == 2 * p + int(18 * p / n) == 34_128_610_304
    assert rows["CPU RAM per node"].tool_bytes == 385_452_539_904
    assert rows["CPU RAM per node"].memcalc_bytes is None
    # Where both count the same thing, they agree to the byte.
    for term, per_param in (("16-bit weights", 2 * n), ("16-bit gradients", 2), ("fp32 master weights", 4),
                            ("optimizer states", 8), ("fp32 gradients", 4)):
        assert rows[term].tool_bytes == per_param * p // n == rows[term].memcalc_bytes, term
    assert rows["activations"].tool_bytes == 0 and rows["activations"].memcalc_bytes > 0
    parts = [r.tool_bytes for r in rows.values() if r.term not in ("GPU model states", "GPU total (memcalc: peak)",
                                                                  "CPU RAM per node")]
    assert sum(parts) == rows["GPU total (memcalc: peak)"].tool_bytes  # the rows add up to DeepSpeed's figure
    assert rows["GPU total (memcalc: peak)"].memcalc_bytes > rows["GPU total (memcalc: peak)"].tool_bytes
    assert "buffer factor" in rows["CPU RAM per node"].why
    assert all(row.why and "\n" not in row.why for row in rows.values())


def test_compare_with_deepspeed_zero1_explains_whole_gradients(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=1, num_gpus=8))
    rows = rows_by_term(ds.compare_with_deepspeed(report))
    assert rows["16-bit gradients"].memcalc_bytes == 2 * 8_030_261_248
    assert "ZeRO-1 does not partition" in rows["16-bit gradients"].why


def test_compare_with_deepspeed_zero3_with_offload(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=3, num_gpus=8))
    largest = ds.deepspeed_param_counts(llama3_8b.tensors)[1]
    rows = rows_by_term(ds.compare_with_deepspeed(report, largest_layer_params=largest))
    assert rows["GPU total (memcalc: peak)"].tool_bytes == 20_169_434_112
    assert rows["gathered layer (params + grads)"].tool_bytes == 4 * largest
    assert "recurse=False" in rows["gathered layer (params + grads)"].why
    terms = [r for r in rows.values() if r.term not in ("GPU model states", "GPU total (memcalc: peak)",
                                                        "CPU RAM per node")]
    assert abs(sum(r.tool_bytes for r in terms) - 20_169_434_112) <= len(terms)  # per-row rounding only
    both = rows_by_term(ds.compare_with_deepspeed(report, largest_layer_params=largest, offload_optimizer=True,
                                                  offload_params=True))
    assert both["GPU total (memcalc: peak)"].tool_bytes == 4 * largest
    assert both["CPU RAM per node"].tool_bytes == 216_817_053_696
    assert both["optimizer states"].tool_bytes == 0 and "CPU" in both["optimizer states"].why


def test_compare_with_deepspeed_needs_zero_and_a_consistent_layout(llama3_8b):
    with pytest.raises(UsageError, match="--zero"):
        ds.compare_with_deepspeed(run(llama3_8b, TrainingSpec(zero_stage=0)))
    report = run(llama3_8b, TrainingSpec(zero_stage=2, num_gpus=8))
    with pytest.raises(UsageError, match="divisible"):
        ds.compare_with_deepspeed(report, num_nodes=3)
    with pytest.raises(UsageError, match="--zero 3"):
        ds.compare_with_deepspeed(report, offload_optimizer=True, offload_params=True)
    two_nodes = rows_by_term(ds.compare_with_deepspeed(report, num_nodes=2))
    expected = ds.deepspeed_zero2_estimate(8_030_261_248, 4, 2, False)[1]
    assert two_nodes["GPU total (memcalc: peak)"].tool_bytes == expected


# -- accelerate estimate-memory -----------------------------------------------------------------------------------


def test_accelerate_training_figures():
    # accelerate/commands/estimate.py estimate_training_usage: values from accelerate==1.15.0 for 7e9 params.
    assert ds.accelerate_training_usage(28_000_000_000, "float32") == {
        "model": 28_000_000_000, "optimizer": 56_000_000_000, "gradients": 28_000_000_000, "step": 112_000_000_000}
    assert ds.accelerate_training_usage(28_000_000_000, "float16") == {
        "model": 28_000_000_000, "optimizer": 56_000_000_000, "gradients": 42_000_000_000, "step": 56_000_000_000}
    assert ds.accelerate_training_figure(7_000_000_000, "float32") == 112_000_000_000  # 4x the fp32 model
    assert ds.accelerate_training_figure(7_000_000_000, "float16") == 56_000_000_000  # the max, not the sum
    assert ds.accelerate_training_figure(7_000_000_000, "int8") == -1  # "N/A"


def test_compare_with_accelerate(llama3_8b):
    report = run(llama3_8b, TrainingSpec())
    counted = ds.accelerate_counted_params(llama3_8b.tensors)
    assert counted == 8_030_261_248 - 128256 * 4096  # AutoModel: LlamaModel, no lm_head
    rows = rows_by_term(ds.compare_with_accelerate(report, counted))
    # accelerate==1.15.0 estimate_training_usage(4 x 7_504_924_672, "float16") -> max 60_039_397_376
    assert rows["training figure (memcalc: peak)"].tool_bytes == 60_039_397_376
    assert "LARGEST" in rows["training figure (memcalc: peak)"].why and "no LM head" in rows["model"].why
    fp32 = rows_by_term(ds.compare_with_accelerate(run(llama3_8b, TrainingSpec(precision="fp32")), counted))
    assert fp32["training figure (memcalc: peak)"].tool_bytes == 120_078_794_752
    assert fp32["model"].tool_bytes == fp32["gradients"].tool_bytes == 4 * counted
