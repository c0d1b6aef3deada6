"""--compare-with llm-analysis: llm-analysis 0.2.2's LLMAnalysis.training (cli99/llm-analysis d841e40,
llm_analysis/analysis.py) reproduced, checked by hand for Llama-3-70B."""

from __future__ import annotations

import pytest

from memcalc.api import compare_with, model_input, run
from memcalc.compat.llm_analysis import training_memory
from memcalc.spec import TrainingSpec


def test_llama3_70b_tp8_pp4_by_hand():
    """Llama-3-70B (hidden 8192, 80 layers, 64 heads, 8 kv heads, ffn 28672, vocabulary 128256), seq 4096, micro-batch
    1, tp 8 with sequence parallelism (llm-analysis's default sp = tp), pp 4, dp 1, flash attention, no recompute,
    ZeRO 0, w16a16e16, by the formulas of analysis.py (get_num_params_per_layer_*, get_weight_memory_per_layer,
    get_memory_optimizer_state_and_gradient_per_layer, get_activation_memory_per_layer_*, training's peak)."""
    attention = 2 * 8192**2 + 2 * 8192 * 1024  # kv' = max(8 / 8, 1) x 8 = 8 heads of 128
    mlp = 3 * 8192 * 28672
    layer_weights = attention * 2 / 8 + mlp * 2 / 8 + 2 * 8192 * 2  # norms not split by tp
    assert layer_weights == 213_942_272
    weights = 20 * layer_weights + 8192 * 128256 / 8 * 2 + 8192 * 2 / 8  # floor(80 / 4) layers, embedding, last norm
    gradients = 20 * 4 * (mlp + attention + 2 * 8192) / 8 + 4 * 8192 * 128256 / 8 + 4 * 8192 / 8
    optimizer = (20 * (12 * mlp / 8 + 12 * (attention / 8 + 2 * 8192)) + 12 * 8192 * 128256 / 8 + 12 * 8192 / 8)
    sbh = 4096 * 8192
    attn = (sbh / 8 + 4 * sbh / 8) * 2 + (2 * sbh + 4 * 64 * 4096) * 2 / 8 + sbh / 8
    mlp_acts = 2 * sbh / 8 + 4 * 3.5 * sbh / 8
    per_layer = attn + mlp_acts + 2 * sbh / 8 * 4
    assert per_layer == 163_840_000
    logits = 128256 * 4096 * 2 / 8
    activations = 80 * per_layer + 8192 * 4096 * 2 / 8 + logits + sbh / 8 * 4
    arch = model_input("llama-3-70b", None).arch
    got = training_memory(arch, tp=8, pp=4, dp=1, micro_batch=1, seq=4096, sequence_parallel=True, zero=0,
                          flash=True, full_recompute=False)
    assert (got.weights, got.gradients, got.optimizer, got.activations) == (weights, gradients, optimizer, activations)
    assert got.peak == optimizer + weights + max(activations, gradients) + max(2 * layer_weights, logits)
    assert round(got.peak) == 45_482_194_944


def test_zero_stages_divide_as_llm_analysis_does():
    arch = model_input("llama-3-8b", None).arch
    plain = training_memory(arch, tp=1, pp=1, dp=8, micro_batch=1, seq=2048, sequence_parallel=False, zero=0,
                            flash=True, full_recompute=True)
    z1, z2, z3 = (training_memory(arch, tp=1, pp=1, dp=8, micro_batch=1, seq=2048, sequence_parallel=False, zero=z,
                                  flash=True, full_recompute=True) for z in (1, 2, 3))
    assert z1.optimizer == pytest.approx(plain.optimizer / 8) and z1.gradients == plain.gradients
    assert z2.gradients == pytest.approx(plain.gradients / 8) and z2.weights == plain.weights
    assert z3.weights == pytest.approx(plain.weights / 8)
    assert plain.activations == 32 * 2048 * 4096 * 2 + 4096 * 2048 * 2 + 128256 * 2048 * 2 + 2048 * 4096 * 4


def test_rows_name_each_side():
    model = model_input("llama-3-70b", None)
    report = run(model, TrainingSpec(num_gpus=32, tp=8, pp=4, microbatches=8, sequence_parallel=True, seq_len=4096))
    rows = compare_with("llm-analysis", model, report)
    assert [row.term for row in rows] == ["weights", "gradients", "optimizer states (with the fp32 master)",
                                          "activations (all micro-batches held)", "peak per GPU"]
    assert rows[-1].memcalc_bytes == report.per_gpu.peak_bytes and rows[-1].tool_bytes == 45_482_194_944
    assert all(row.tool_bytes and row.why for row in rows)


@pytest.mark.parametrize(("model", "options", "message"), [
    ("gpt2", [], "decoders of the Llama layout"),
    ("llama-3-8b", ["--precision", "fp32"], "models 16-bit training"),
    ("llama-3-8b", ["--checkpointing", "every:2"], "its recompute levels have no every:2"),
    ("llama-3-8b", ["--cp", "2", "--gpus", "2"], "llm-analysis has no context parallelism"),
])
def test_what_it_cannot_say_is_one_line(cli, model, options, message):
    result = cli(model, "--compare-with", "llm-analysis", *options)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
