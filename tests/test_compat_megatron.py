"""--compare-with megatron: Megatron-LM's theoretical_memory_usage.py reproduced, checked by hand for Llama-3-70B."""

from __future__ import annotations

from memcalc.api import compare_with, model_input, run
from memcalc.compat.megatron import padded_vocab, theoretical_memory
from memcalc.spec import TrainingSpec


def test_llama3_70b_tp8_pp4_by_hand():
    # Llama-3-70B: hidden 8192, 64 heads of 128, 8 kv heads, ffn 28672, 80 layers, vocabulary 128256 (untied).
    assert padded_vocab(128256, 8) == 129024  # a multiple of 128 x tp
    attention = 2 * 8192 * 8192 * (1 + 8 / 64)
    layer = 2 * 8192 * (28672 * 3 / 2 + 1) + attention
    shard = ((80 * layer + 8192) / 4 + 8192 * 129024) / 8  # the first stage's shard: a quarter of the layers + embedding
    sbh = 2048 * 8192
    activations = (sbh * (10 + 24 / 8) * 80 + 8 * 2048 * 4 + sbh * 4) * 1.05  # no SP branch: 8 >= 4 micro-batches
    arch = model_input("llama-3-70b", None).arch
    states, acts = theoretical_memory(arch, tp=8, pp=4, dp=1, micro_batch=1, seq=2048, microbatches=8,
                                      sequence_parallel=True, selective_recompute=False, distributed_optimizer=False)
    assert states == shard * 18 and acts == activations
    states_do, _ = theoretical_memory(arch, tp=8, pp=4, dp=4, micro_batch=1, seq=2048, microbatches=8,
                                      sequence_parallel=True, selective_recompute=False, distributed_optimizer=True)
    assert states_do == shard * (6 + 12 / 4)


def test_rows_name_each_side():
    model = model_input("llama-3-70b", None)
    report = run(model, TrainingSpec(num_gpus=32, tp=8, pp=4, microbatches=8, sequence_parallel=True))
    rows = compare_with("megatron", model, report)
    assert [row.term for row in rows] == ["weights, gradients, optimizer states", "activations (all micro-batches held)",
                                          "peak per GPU"]
    assert rows[-1].memcalc_bytes == report.per_gpu.peak_bytes
    assert all(row.tool_bytes and row.why for row in rows)


def test_other_layouts_refused(cli):
    result = cli("gpt2", "--compare-with", "megatron")
    assert result.exit_code == 2 and "decoders of the Llama layout" in result.stderr
