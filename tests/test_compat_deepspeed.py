"""memcalc.compat.deepspeed: DeepSpeed's own estimators reproduced to the byte, and the comparison rows.

Expected figures are what deepspeed's own functions returned (estimate_zero2_model_states_mem_needs,
estimate_zero3_model_states_mem_needs, model_to_params), recorded with their versions in
tests/fixtures/peer_figures.json by scripts/peer_figures.py; DeepSpeed is not a memcalc dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcalc.api import model_input, run
from memcalc.compat.deepspeed import (
    compare_with_deepspeed,
    deepspeed_param_counts,
    deepspeed_zero2_estimate,
    deepspeed_zero3_estimate,
)
from memcalc.errors import UsageError
from memcalc.spec import TrainingSpec

PEER = json.loads((Path(__file__).parent / "fixtures" / "peer_figures.json").read_text())
LLAMA3_8B = 8_030_261_248


def test_figures_come_from_the_deepspeed_version_memcalc_reads():
    from memcalc.deepspeed_defaults import DEEPSPEED_VERSION_READ

    assert PEER["versions"]["deepspeed"] == DEEPSPEED_VERSION_READ


@pytest.mark.parametrize("case", PEER["deepspeed_zero2_estimate"], ids=lambda c: str(sorted(c["args"].values())))
def test_zero2_estimate_equals_deepspeeds(case):
    args = case["args"]
    assert deepspeed_zero2_estimate(args["total_params"], args["num_gpus_per_node"], args["num_nodes"],
                                    args["cpu_offload"], args["additional_buffer_factor"]) == (
        case["cpu_bytes"], case["gpu_bytes"])


@pytest.mark.parametrize("case", PEER["deepspeed_zero3_estimate"], ids=lambda c: str(sorted(c["args"].values())))
def test_zero3_estimate_equals_deepspeeds(case):
    a = case["args"]
    assert deepspeed_zero3_estimate(a["total_params"], a["largest_layer_params"], a["num_gpus_per_node"],
                                    a["num_nodes"], a["cpu_offload"], a["cpu_offload_params"], a["zero_init"],
                                    a["additional_buffer_factor"]) == (case["cpu_bytes"], case["gpu_bytes"])
    assert case["largest_layer_bytes"] == 4 * a["largest_layer_params"]  # DeepSpeed's third value, not returned


@pytest.mark.parametrize("case", PEER["deepspeed_model_to_params"], ids=lambda c: c["preset"])
def test_deepspeed_param_counts_like_model_to_params(tmp_path, case):
    # model_to_params on the real transformers model: every parameter once (tied head once), and the largest
    # module's own parameters (the embedding, or an untied LM head), not a transformer block.
    if case["config"] is not None:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(case["config"]))
        model = model_input(str(path), None)
    else:
        model = model_input(case["preset"], None)
    assert deepspeed_param_counts(model.tensors) == (case["total_params"], case["largest_layer_params"])


def _zero_case(total: int, per_node: int, nodes: int, offload: bool, **zero3) -> dict:
    table = PEER["deepspeed_zero3_estimate" if zero3 else "deepspeed_zero2_estimate"]
    wanted = {"total_params": total, "num_gpus_per_node": per_node, "num_nodes": nodes, "cpu_offload": offload,
              "additional_buffer_factor": 1.5, **zero3}
    return next(case for case in table if case["args"] == wanted)


@pytest.fixture(scope="module")
def llama3_8b():
    return model_input("llama-3-8b", None)


def rows_by_term(rows):
    return {row.term: row for row in rows}


def test_compare_with_deepspeed_zero2(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=2, num_gpus=8))
    rows = rows_by_term(compare_with_deepspeed(report))
    deepspeed = _zero_case(LLAMA3_8B, 8, 1, False)
    assert rows["GPU total (memcalc: peak)"].tool_bytes == deepspeed["gpu_bytes"]
    assert rows["CPU RAM per node"].tool_bytes == deepspeed["cpu_bytes"]
    assert rows["CPU RAM per node"].memcalc_bytes is None
    # Where both count the same thing, they agree to the byte (DeepSpeed's source comment splits 18 B/param
    # as 2 16-bit grads + 4 fp32 grads + 4 fp32 params + 8 Adam).
    p, n = LLAMA3_8B, 8
    for term, per_param in (("16-bit weights", 2 * n), ("16-bit gradients", 2), ("fp32 master weights", 4),
                            ("optimizer states", 8), ("fp32 gradients", 4)):
        assert rows[term].tool_bytes == per_param * p // n == rows[term].memcalc_bytes, term
    assert rows["activations"].tool_bytes == 0 and rows["activations"].memcalc_bytes > 0
    parts = [r.tool_bytes for r in rows.values() if r.term not in ("GPU model states", "GPU total (memcalc: peak)",
                                                                  "CPU RAM per node")]
    assert sum(parts) == deepspeed["gpu_bytes"]  # the rows add up to DeepSpeed's figure
    assert rows["GPU total (memcalc: peak)"].memcalc_bytes > rows["GPU total (memcalc: peak)"].tool_bytes
    assert "buffer factor" in rows["CPU RAM per node"].why
    assert all(row.why and "\n" not in row.why for row in rows.values())


def test_compare_with_deepspeed_zero1_explains_whole_gradients(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=1, num_gpus=8))
    rows = rows_by_term(compare_with_deepspeed(report))
    assert rows["16-bit gradients"].memcalc_bytes == 2 * LLAMA3_8B
    assert "ZeRO-1 does not partition" in rows["16-bit gradients"].why


def test_compare_with_deepspeed_zero3_with_offload(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=3, num_gpus=8))
    largest = deepspeed_param_counts(llama3_8b.tensors)[1]
    assert largest == 525_336_576  # the largest layer DeepSpeed's grid uses for Llama-3-8B (embed_tokens)
    rows = rows_by_term(compare_with_deepspeed(report, largest_layer_params=largest))
    none = _zero_case(LLAMA3_8B, 8, 1, False, largest_layer_params=largest, cpu_offload_params=False, zero_init=True)
    assert rows["GPU total (memcalc: peak)"].tool_bytes == none["gpu_bytes"]
    assert rows["gathered layer (params + grads)"].tool_bytes == 4 * largest
    assert "recurse=False" in rows["gathered layer (params + grads)"].why
    assert "sub-group" in rows["fp32 gradients"].why
    terms = [r for r in rows.values() if r.term not in ("GPU model states", "GPU total (memcalc: peak)",
                                                        "CPU RAM per node")]
    assert abs(sum(r.tool_bytes for r in terms) - none["gpu_bytes"]) <= len(terms)  # per-row rounding only
    both = rows_by_term(compare_with_deepspeed(report, largest_layer_params=largest, offload_optimizer=True,
                                               offload_params=True))
    offloaded = _zero_case(LLAMA3_8B, 8, 1, True, largest_layer_params=largest, cpu_offload_params=True,
                           zero_init=True)
    assert both["GPU total (memcalc: peak)"].tool_bytes == offloaded["gpu_bytes"]
    assert both["CPU RAM per node"].tool_bytes == offloaded["cpu_bytes"]
    assert both["optimizer states"].tool_bytes == 0 and "CPU" in both["optimizer states"].why


def test_compare_with_deepspeed_counts_offloaded_terms_in_cpu_ram_not_on_the_gpu(llama3_8b):
    report = run(llama3_8b, TrainingSpec(zero_stage=2, num_gpus=8, offload="optimizer"))
    rows = rows_by_term(compare_with_deepspeed(report, offload_optimizer=True))
    for term in ("fp32 master weights", "optimizer states", "fp32 gradients", "16-bit gradients"):
        assert rows[term].memcalc_bytes == 0 == rows[term].tool_bytes, term
    cpu = {t.name: t.bytes for t in report.per_gpu.terms if t.in_cpu_ram}
    # fp32 master 4 + Adam 8 + fp32 gradient partition 4 per parameter of this rank's partition, 8 ranks per node
    assert set(cpu) == {"master_weights", "optimizer_states", "fp32_grad_copy"}
    assert rows["CPU RAM per node"].memcalc_bytes == 8 * sum(cpu.values())
    assert "zero_offload_grad_buffer" in rows["other working memory"].why
    assert "master_weights" not in rows["other working memory"].why


def test_compare_with_deepspeed_needs_zero_and_a_consistent_layout(llama3_8b):
    with pytest.raises(UsageError, match="ZeRO stage"):
        compare_with_deepspeed(run(llama3_8b, TrainingSpec(zero_stage=0)))
    report = run(llama3_8b, TrainingSpec(zero_stage=2, num_gpus=8))
    with pytest.raises(UsageError, match="divisible"):
        compare_with_deepspeed(report, num_nodes=3)
    with pytest.raises(UsageError, match="stage 3"):
        compare_with_deepspeed(report, offload_optimizer=True, offload_params=True)
    two_nodes = rows_by_term(compare_with_deepspeed(report, num_nodes=2))
    assert two_nodes["GPU total (memcalc: peak)"].tool_bytes == _zero_case(LLAMA3_8B, 4, 2, False)["gpu_bytes"]
