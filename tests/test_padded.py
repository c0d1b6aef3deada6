"""--padded: rows padded to the longest of the micro-batch (no packing). transformers cannot leave a padded batch's
mask to sdpa's is_causal (masking_utils.sdpa_mask, allow_is_causal_skip), so every layer's sdpa gets the 4-D boolean
mask: torch keeps it as a float bias for backward, and transformers repeats k and v to every head (use_gqa_in_sdpa
wants no mask). Checked against the hand derivation below and against real CPU steps of padded batches."""

from __future__ import annotations

import json

import pytest

from memcalc.api import estimate
from tests.test_traced import WITHOUT_RULES
from tests.test_trainer_configs import FIXTURES
from tests.tiny import GEMMA3, GPT2, tiny_raw


def _activations(report) -> int:
    return next(t.bytes for t in report.per_gpu.terms if t.name == "activations")


def test_the_padding_mask_adds_its_bias_and_the_repeated_kv_in_every_layer():
    """Llama-3-8B (presets: 32 layers, 32 heads of 128, 8 kv heads), bf16-pure, 8 x 2048, sdpa, no checkpointing. By
    hand, per layer: the mask's bf16 bias (b, 1, s, s) = 2 x 8 x 2048^2 B, and k and v repeated from 8 to 32 heads,
    2 x 2 B x 8 x 2048 x (32 - 8) x 128; per model the batch's attention_mask and its labels apart from input_ids, int64
    each (2 x 8 x 8 x 2048)."""
    settings = {"precision": "bf16-pure", "batch_size": 8, "seq_len": 2048}
    plain = estimate("llama-3-8b", **settings)
    padded = estimate("llama-3-8b", padded=True, **settings)
    per_layer = 2 * 8 * 2048**2 + 2 * 2 * 8 * 2048 * (32 - 8) * 128
    assert _activations(padded) - _activations(plain) == 32 * per_layer + 2 * 8 * 8 * 2048
    assert any("padding mask" in note for note in padded.notes)
    assert padded.training.padded


def test_one_row_pads_nothing_and_eager_attention_has_its_mask_anyway():
    """One row is its own longest: no padding, no mask. Eager attention gets a 4-D mask padded or not
    (masking_utils.eager_mask): only the batch's attention_mask and labels, int64 8 x 2048 each, are added."""
    one = {"precision": "bf16-pure", "batch_size": 1, "seq_len": 2048}
    assert estimate("llama-3-8b", padded=True, **one).per_gpu.peak_bytes == estimate("llama-3-8b", **one).per_gpu.peak_bytes
    eager = {"precision": "bf16-pure", "batch_size": 8, "seq_len": 2048, "attn": "eager"}
    plain, padded = estimate("llama-3-8b", **eager), estimate("llama-3-8b", padded=True, **eager)
    assert _activations(padded) - _activations(plain) == 2 * 8 * 8 * 2048


def test_a_family_whose_rules_count_no_mask_is_traced_padded():
    """GPT-2's rules count no padding mask: a padded batch of its causal LM is traced with its mask instead (with torch
    and transformers), more than the rules' unpadded count; asked for its rules, it says what they leave out."""
    pytest.importorskip("transformers")
    settings = {"precision": "bf16-pure", "batch_size": 4, "seq_len": 1024}
    traced = estimate("gpt2", padded=True, **settings)
    assert traced.training.activations == "trace"
    assert traced.per_gpu.peak_bytes > estimate("gpt2", **settings).per_gpu.peak_bytes
    ruled = estimate("gpt2", padded=True, activations="rules", **settings)
    assert any(note.startswith("--padded: not counted for GPT2LMHeadModel") for note in ruled.notes)


def _tiny(tmp_path, raw: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize(("raw", "settings"), [
    (tiny_raw("llama"), {"precision": "bf16-pure"}),
    (tiny_raw("qwen3"), {"precision": "fp32"}),  # fp32 with grouped heads: CUDA's math path unless masked
    (tiny_raw("mixtral"), {"precision": "amp-bf16", "checkpointing": "full"}),
    ({**GEMMA3, "sliding_window": 64}, {"precision": "bf16-pure"}),  # sliding and full layers: two masks
    (GPT2, {"precision": "bf16-pure"}),  # rules without a mask: traced, padded
    ({"model_type": "olmo2", **WITHOUT_RULES["olmo2"]}, {"precision": "amp-bf16", "checkpointing": "full"}),  # traced
    (tiny_raw("llama"), {"precision": "amp-bf16", "lora_rank": 8}),  # LoRA: the step traced, padded
])
def test_padded_cpu_steps_match(tmp_path, raw, settings):
    """Real CPU steps of a batch whose last row is half padding (measure.step.make_batch), measured by the tracker,
    against the rules or, where they count no mask, the trace of a padded batch. Measured 2026-12-05: every peak
    within -0.08% and +0.07% (Mixtral's +0.04% as unpadded); the optimizer step reads 0.1-0.7% low at these sizes,
    2 x 128 tokens: the batch's int64 tensors, which the training loop holds through the step, against a step of a
    megabyte or two (24 B a token; the -0.08% peaks are such a step)."""
    pytest.importorskip("transformers")
    from memcalc.api import verify

    report = verify(_tiny(tmp_path, raw), "cpu-tracker", batch_size=2, seq_len=128, padded=True, **settings)
    rows = {row.term: row.error_pct for row in report.verify.rows if row.error_pct is not None}
    assert -0.1 <= rows["peak"] <= 0.1, rows
    assert abs(rows["phase:backward"]) <= 0.1 and -1.0 <= rows["phase:optimizer_step"] <= 0, rows


def test_a_traced_step_pads_as_a_real_one(tmp_path):
    """Under FakeTensorMode the padding has no values, but transformers does not read them there (is_tracing:
    _ignore_causal_mask_sdpa keeps the 4-D mask): the trace of a padded batch equals the rules (measured -0.00%)."""
    pytest.importorskip("transformers")
    from memcalc.api import verify

    report = verify(_tiny(tmp_path, tiny_raw("llama")), "trace", batch_size=2, seq_len=128, padded=True,
                    precision="bf16-pure")
    rows = {row.term: row.error_pct for row in report.verify.rows if row.error_pct is not None}
    assert abs(rows["peak"]) <= 0.01 and abs(rows["phase:backward"]) <= 0.01, rows


def test_trainers_that_pad_and_those_that_do_not(tmp_path):
    """TRL's SFTConfig packing=False (sft_config.py) pads with a mask; padding_free concatenates rows; torchtune's
    padded_collate_sft (data/_collate.py) hands its models tokens and labels only, no mask."""
    from memcalc.configs.trainers import read_trainer_config

    assert read_trainer_config(FIXTURES / "trl_example_config.yaml").settings["padded"] is True
    free = tmp_path / "trl.yaml"
    free.write_text((FIXTURES / "trl_example_config.yaml").read_text() + "\npadding_free: true\n")
    assert read_trainer_config(free).settings["padded"] is False
    torchtune = read_trainer_config(FIXTURES / "torchtune_llama3_2_3B_full.yaml")
    assert "padded" not in torchtune.settings
