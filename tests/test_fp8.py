"""--fp8: torchao float8 training (float8/float8_linear.py) with torchtitan's converter (components/quantization/utils.py
module_filter_fn: Linear layers whose dims are multiples of 16, the output layer left bf16). torchao's float8 layers
run on the CPU (torch._scaled_mm) and under FakeTensorMode, so one process's step is traced with them and measured
with them; under sharding the casts are the engine's modelled ``fp8_casts`` term."""

from __future__ import annotations

import pytest

from memcalc import activations
from memcalc.api import model_input, run
from memcalc.errors import MissingDependencyError, UsageError
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import tiny_raw


@pytest.mark.parametrize(("precision", "checkpointing", "recipe"), [
    ("bf16-pure", "full", "tensorwise"),
    ("bf16-pure", "none", "rowwise"),
    ("amp-bf16", "none", "tensorwise"),
])
def test_traced_float8_step_matches_a_real_one(precision, checkpointing, recipe):
    """The estimate (the step traced with torchao's layers) against a real CPU step of the same layers under
    memcalc's tracker: forward and backward within 0.01% (benchmarks/fp8.py's 12 Llama cells at 2 x 128 tokens: -0.004%
    at most; these cells at 1 x 16: 84 B low in each phase, -0.006% at most). Before they were traced, the modelled
    casts read -6.7% (bf16-pure, checkpointed: eager casts go through fp32 copies) and +8.7% (amp-bf16: Float8Linear
    casts the fp32 weight itself, so autocast keeps no bf16 copies of converted weights)."""
    pytest.importorskip("torchao")
    from memcalc.measure import estimate_for, run_verify

    config = ModelConfig("llama", tiny_raw("llama"), "tiny")
    # (16 tokens: torch._scaled_mm on the CPU, the real step's float8 matmuls, takes ~45 ns a multiply-add here, so
    # the step's time goes with the tokens; 16 keeps every matmul's dimensions multiples of 16, as on a GPU)
    spec = TrainingSpec(precision=precision, micro_batch_size=1, seq_len=16, checkpointing=checkpointing, fp8=recipe)
    measured = run_verify(config, spec, "cpu-tracker")
    report = estimate_for(config, spec)
    assert report.training.activations == "trace"
    for phase in report.per_gpu.phases[:2]:  # (forward, backward: the optimizer step's is the recipe's, not fp8's)
        real = measured.per_phase_peak_bytes[phase.phase.value]
        assert abs(phase.bytes - real) <= 1e-4 * real, (phase.phase, phase.bytes, real)
    assert not any(t.name == "fp8_casts" for t in report.per_gpu.terms)  # (the casts are in the traced moments)


def test_autocast_keeps_no_copies_of_converted_weights():
    """Under amp-bf16 Float8Linear casts its fp32 weight to float8 itself: autocast's copies are the output layer's
    only (Llama-3-8B's lm_head, 128,256 x 4,096 in bf16; its embedding is untied)."""
    model = model_input("llama-3-8b", None)
    report = run(model, TrainingSpec(precision="amp-bf16", zero_stage=3, num_gpus=8, fp8="tensorwise"))
    assert report.term("autocast_weight_copies").bytes == 128256 * 4096 * 2


def test_sharded_casts_are_the_largest_linear_s_and_the_activations_unchanged():
    """ZeRO-3 ranks are not traced: the casts are a modelled term, the float8 copies one converted Linear makes at a
    time in backward, at the largest (torchao matmul_with_hp_or_float8_args.backward: grad_output twice, the weight
    and the input, 1 B each; rowwise adds fp32 scales per row)."""
    model = model_input("llama-3-8b", None)
    base = run(model, TrainingSpec(precision="bf16-pure", seq_len=8192, zero_stage=3, num_gpus=8))
    for recipe, scales in (("tensorwise", 0), ("rowwise", 4 * (3 * 8192 + 14336))):
        report = run(model, TrainingSpec(precision="bf16-pure", seq_len=8192, zero_stage=3, num_gpus=8, fp8=recipe))
        # Llama-3-8B's gate_proj (14336 x 4096, config.json intermediate_size x hidden_size), 8,192 tokens
        tokens, out_features, in_features = 8192, 14336, 4096
        want = 2 * tokens * out_features + out_features * in_features + tokens * in_features + scales
        assert report.term("fp8_casts").bytes == want
        assert report.term("activations").bytes == base.term("activations").bytes
        assert report.per_gpu.peak_bytes == base.per_gpu.peak_bytes + want
        assert report.training.fp8 == recipe


def test_one_process_needs_torchao(monkeypatch):
    real = activations.importlib.util.find_spec
    monkeypatch.setattr(activations.importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchao" else real(name, *args))
    with pytest.raises(MissingDependencyError, match="pip install torchao"):
        run(model_input("llama-3.2-1b", None), TrainingSpec(precision="bf16-pure", fp8="tensorwise"))


def test_it_needs_a_bf16_recipe(cli):
    with pytest.raises(UsageError, match="use a bf16 recipe"):
        TrainingSpec(precision="fp32", fp8="tensorwise")
    result = cli("llama-3-8b", "--fp8", "fp4")
    assert result.exit_code == 2 and "--fp8 'fp4' is not one of none, tensorwise, rowwise" in result.stderr
