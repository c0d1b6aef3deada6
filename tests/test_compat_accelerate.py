"""memcalc.compat.accelerate: ``accelerate estimate-memory`` reproduced, and the comparison rows.

Expected figures are what accelerate's own code returned (estimate_training_usage; AutoModel under
init_empty_weights measured by calculate_maximum_sizes), recorded with its version in
tests/fixtures/peer_figures.json by scripts/peer_figures.py. accelerate's -1 ("N/A") is recorded as null there,
and memcalc says None.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcalc.api import model_input, run
from memcalc.compat.accelerate import (
    accelerate_counted_params,
    accelerate_training_figure,
    accelerate_training_usage,
    compare_with_accelerate,
)
from memcalc.spec import TrainingSpec

PEER = json.loads((Path(__file__).parent / "fixtures" / "peer_figures.json").read_text())["accelerate"]


@pytest.mark.parametrize("case", PEER["estimate_training_usage"],
                         ids=lambda c: f"{c['bytes']}-{c['mixed_precision']}")
def test_training_usage_equals_accelerates(case):
    usage = accelerate_training_usage(case["bytes"], case["mixed_precision"])
    assert usage == case["components"]
    assert -1 not in usage.values()  # no sentinel in memcalc's data


@pytest.mark.parametrize("case", [c for c in PEER["estimate_training_usage"] if c["bytes"] % 4 == 0],
                         ids=lambda c: f"{c['bytes']}-{c['mixed_precision']}")
def test_training_figure_is_accelerates_max(case):
    # estimate_command shows max(components), "N/A" when that is -1.
    assert accelerate_training_figure(case["bytes"] // 4, case["mixed_precision"]) == case["training_figure"]


@pytest.mark.parametrize("case", PEER["auto_models"], ids=lambda c: c["preset"])
def test_counted_params_are_automodels(case):
    # estimate-memory builds AutoModel (LlamaModel, GPT2Model: no LM head); its total size also counts buffers.
    assert accelerate_counted_params(model_input(case["preset"], None).tensors) == case["num_params"]
    assert case["total_size_bytes"] == 4 * case["num_params"] + case["buffer_bytes"]


@pytest.fixture(scope="module")
def llama3_8b():
    return model_input("llama-3-8b", None)


def test_compare_with_accelerate(llama3_8b):
    counted = accelerate_counted_params(llama3_8b.tensors)
    peer = next(c for c in PEER["estimate_training_usage"] if c["bytes"] == 4 * counted
                and c["mixed_precision"] == "float16")
    rows = {row.term: row for row in compare_with_accelerate(run(llama3_8b, TrainingSpec()), counted)}
    assert rows["training figure (memcalc: peak)"].tool_bytes == peer["training_figure"]
    assert "LARGEST" in rows["training figure (memcalc: peak)"].why and "no LM head" in rows["model"].why
    assert rows["gradients"].tool_bytes == peer["components"]["gradients"]
    fp32 = {row.term: row for row in compare_with_accelerate(run(llama3_8b, TrainingSpec(precision="fp32")), counted)}
    peer32 = next(c for c in PEER["estimate_training_usage"] if c["bytes"] == 4 * counted
                  and c["mixed_precision"] == "float32")
    assert fp32["training figure (memcalc: peak)"].tool_bytes == peer32["training_figure"]
    assert (fp32["model"].tool_bytes, fp32["gradients"].tool_bytes, fp32["step"].tool_bytes) == (
        peer32["components"]["model"], peer32["components"]["gradients"], peer32["components"]["step"])
