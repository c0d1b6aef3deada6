"""--fp8: torchao float8 training (float8/float8_linear.py). matmul_with_hp_or_float8_args saves the high-precision
input and weight, so the activations are the bf16 recipe's; the float8 casts are per-Linear transients, counted at
the largest converted Linear (torchtitan's converter leaves the output layer bf16). Modelled from torchao's code:
no GPU with float8 matmuls here, so not measured."""

from __future__ import annotations

import pytest

from memcalc.api import model_input, run
from memcalc.errors import UsageError
from memcalc.spec import TrainingSpec


def test_the_casts_are_the_largest_linear_s_and_the_activations_unchanged():
    model = model_input("llama-3-8b", None)
    base = run(model, TrainingSpec(precision="bf16-pure", seq_len=8192))
    for recipe, scales in (("tensorwise", 0), ("rowwise", 4 * (3 * 8192 + 14336))):
        report = run(model, TrainingSpec(precision="bf16-pure", seq_len=8192, fp8=recipe))
        # Llama-3-8B's gate_proj (14336 x 4096, config.json intermediate_size x hidden_size), 8,192 tokens: backward
        # casts grad_output twice (2 x tokens x out), the weight (out x in) and the input (tokens x in), 1 B each.
        tokens, out_features, in_features = 8192, 14336, 4096
        want = 2 * tokens * out_features + out_features * in_features + tokens * in_features + scales
        assert report.term("fp8_casts").bytes == want
        assert report.term("activations").bytes == base.term("activations").bytes
        assert report.per_gpu.peak_bytes == base.per_gpu.peak_bytes + want
        assert report.training.fp8 == recipe


def test_it_needs_a_bf16_recipe(cli):
    with pytest.raises(UsageError, match="use a bf16 recipe"):
        TrainingSpec(precision="fp32", fp8="tensorwise")
    result = cli("llama-3-8b", "--fp8", "fp4")
    assert result.exit_code == 2 and "--fp8 'fp4' is not one of none, tensorwise, rowwise" in result.stderr
