"""The seed posts' numbers, reproduced by naming the recipe each one silently assumed.

Sources (../shared/seeds/):
  000: LLaMA-2 7B with Adam: fp32 28 + 28 + 56 = 112 GB; bf16 14 + 14 + 28 = 56 GB; 7e9 x 4 B = 26.08 GiB = 28 GB.
  001: 7.5B params in fp16 mixed precision: 2 + 2 + (4 + 4 + 4) = 16 B/param -> 120 GB of model states;
       ZeRO per device: stage 1 4x + 12x/n, stage 2 2x + 14x/n, stage 3 16x/n (the ZeRO paper's Figure 1
       gives 31.4 GB, 16.6 GB and 1.9 GB for 7.5B on 64 GPUs).
  002: Llama-3-8B bf16 mixed: weights 16 + fp32 copy 32 + grads 16 + m 32 + v 32 GB at 8e9 params
       (its 132.8 GB adds a 30%-of-weights activation guess, which memcalc replaces by a model).
  004: T5-3B: AdamW states 8 B x 3B = 24 GB; 8-bit states 2 B x 3B = 6 GB; mixed precision weights
       "6 bytes per parameter" (fp32 + 16-bit copy); 12 B/param of optimizer memory (fp32 copy + m + v)
       for 7B -> 84 GB.
"""

from __future__ import annotations

import pytest

from memcalc.api import model_input, run
from memcalc.resolve import ModelInput
from memcalc.spec import TrainingSpec
from memcalc.units import BYTES_PER_GB, format_bytes
from memcalc.vocab import TERM_AUTOCAST_COPIES

GB = BYTES_PER_GB


def _states(num_params: int, **spec) -> dict[str, int]:
    report = run(ModelInput.from_count(num_params), TrainingSpec(**spec))
    terms = {t.name: t.bytes for t in report.per_gpu.terms}
    terms["model_states"] = report.per_gpu.model_states_bytes
    terms["exp_avg"] = report.term("optimizer_states").breakdown.get("exp_avg", 0)
    terms["exp_avg_sq"] = report.term("optimizer_states").breakdown.get("exp_avg_sq", 0)
    return terms


def test_seed000_fp32_adam_7b_is_112_gb():
    terms = _states(7 * 10**9, precision="fp32", optimizer="adam")
    assert (terms["weights"], terms["gradients"], terms["optimizer_states"]) == (28 * GB, 28 * GB, 56 * GB)
    assert terms["model_states"] == 112 * GB


def test_seed000_pure_bf16_adam_7b_is_56_gb():
    terms = _states(7 * 10**9, precision="bf16-pure", optimizer="adam")
    assert (terms["weights"], terms["gradients"], terms["optimizer_states"]) == (14 * GB, 14 * GB, 28 * GB)
    assert terms["model_states"] == 56 * GB


def test_seed000_units_gib_vs_gb():
    weights = _states(7 * 10**9, precision="fp32")["weights"]
    assert format_bytes(weights, "gib") == "26.08 GiB"
    assert format_bytes(weights, "gb") == "28.00 GB"


def test_seed001_fp16_mixed_7_5b_is_120_gb():
    terms = _states(7_500_000_000, precision="fp16", optimizer="adam")
    assert terms["model_states"] == 120 * GB
    assert terms["weights"] == terms["gradients"] == 15 * GB  # "only 15 GB in fp16"


@pytest.mark.parametrize(
    ("stage", "expected_bytes", "paper_gb"),
    [
        # seed 001 formulas with x = 7.5e9, n = 64 (exact), and the ZeRO paper's rounded Figure 1 figure.
        (0, 16 * 7_500_000_000, 120.0),
        (1, 4 * 7_500_000_000 + 12 * 7_500_000_000 // 64, 31.4),
        (2, 2 * 7_500_000_000 + 14 * 7_500_000_000 // 64, 16.6),
        (3, 16 * 7_500_000_000 // 64, 1.9),
    ],
)
def test_seed001_zero_stages_on_64_gpus(stage, expected_bytes, paper_gb):
    terms = _states(7_500_000_000, precision="fp16", optimizer="adam", zero_stage=stage, num_gpus=64)
    assert terms["model_states"] == expected_bytes
    assert round(terms["model_states"] / GB, 1) == paper_gb


def test_seed002_llama3_8b_bf16_at_8e9_params():
    terms = _states(8 * 10**9, precision="bf16", optimizer="adamw")
    assert terms["weights"] == 16 * GB
    assert terms["master_weights"] == 32 * GB
    assert terms["gradients"] == 16 * GB
    assert terms["exp_avg"] == terms["exp_avg_sq"] == 32 * GB
    assert terms["model_states"] == 128 * GB  # 132.8 GB minus the post's 4.8 GB activation guess


def test_seed002_llama3_8b_bf16_exact_count():
    # 8,030,261,248 = the parameter count of Meta-Llama-3-8B (HF safetensors index / model card).
    report = run(model_input("llama-3-8b", None), TrainingSpec(precision="bf16", optimizer="adamw"))
    num_params = 8_030_261_248
    assert report.model.num_params == num_params
    assert report.term("weights").bytes == 2 * num_params
    assert report.term("master_weights").bytes == 4 * num_params
    assert report.term("gradients").bytes == 2 * num_params
    assert report.term("optimizer_states").bytes == 8 * num_params
    assert report.per_gpu.model_states_bytes == 16 * num_params == 128_484_179_968


def test_seed004_t5_3b_adamw_24_gb_and_8bit_6_gb():
    adamw = _states(3 * 10**9, precision="fp32", optimizer="adamw")
    assert adamw["optimizer_states"] == 24 * GB
    eight_bit = run(ModelInput.from_count(3 * 10**9), TrainingSpec(precision="fp32", optimizer="adamw-8bit"))
    parts = eight_bit.term("optimizer_states").breakdown
    assert parts["state1"] + parts["state2"] == 6 * GB  # the seed's "2 x 3 = 6 GB": 1-byte codes only
    # ...plus what the seed leaves out: one fp32 absmax per 256 elements per state (1/64 of the codes).
    assert parts["absmax1"] + parts["absmax2"] == 2 * 4 * -(-3 * 10**9 // 256)


def test_seed004_t5_3b_preset_exact_vs_rounded():
    """The seed's 24 GB is 8 B x "3B"; the real t5-3b has fewer parameters."""
    report = run(model_input("t5-3b", None), TrainingSpec(precision="fp32", optimizer="adamw"))
    num_params = report.model.num_params
    assert 2.8e9 < num_params < 2.9e9
    assert report.term("optimizer_states").bytes == 8 * num_params < 24 * GB


def test_seed004_mixed_precision_weights_6_bytes_per_param():
    report = run(ModelInput.from_count(10**9), TrainingSpec(precision="amp-fp16", optimizer="adamw"))
    assert report.term("weights").bytes + report.term(TERM_AUTOCAST_COPIES).bytes == 6 * 10**9


def test_seed004_optimizer_memory_12_bytes_per_param_and_lora():
    terms = _states(7 * 10**9, precision="bf16", optimizer="adamw")
    assert terms["master_weights"] + terms["optimizer_states"] == 84 * GB  # "12 * 7 = 84 GB"
    adapters = _states(2 * 10**8, precision="bf16", optimizer="adamw")
    assert adapters["master_weights"] + adapters["optimizer_states"] == 2_400_000_000  # "12 * 0.2 = 2.4 GB"
