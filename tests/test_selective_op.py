"""--checkpointing selective-op: torchtitan's per-op selective activation checkpointing (SelectiveAC in
torchtitan/distributed/activation_checkpoint.py), applied to each decoder layer (memcalc.measure.selective) and
estimated from the traced step (memcalc.measure.timeline).

References: real CPU steps under the same policy, measured by memcalc's tracker, with the CPU's semantics; and the
bytes the policy keeps per layer as read off torchtitan's code (every other mm's output, sdpa's output and
log-sum-exp), written out by hand below.
"""

from __future__ import annotations

import pytest

from memcalc.api import model_of, run
from memcalc.errors import MissingDependencyError
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import BASE, GPT2, tiny_raw

LAYERS, BATCH, SEQ = 4, 2, 128
LLAMA = {**tiny_raw("llama"), "num_hidden_layers": LAYERS, "vocab_size": 64}


def _spec(recipe: str, checkpointing: str = "selective-op", **more) -> TrainingSpec:
    return TrainingSpec(precision=recipe, checkpointing=checkpointing, micro_batch_size=BATCH, seq_len=SEQ, **more)


def _estimate(raw: dict, spec: TrainingSpec):
    from memcalc.measure import derive

    with derive.semantics("cpu"):  # the trace as this CPU runs it, to compare with a real CPU step
        return run(model_of(ModelConfig("tiny", raw, "test")), spec)


@pytest.mark.parametrize(("raw", "recipe"), [
    (LLAMA, "bf16-pure"), ({**GPT2, "n_layer": LAYERS, "vocab_size": 64}, "amp-bf16"),
    ({**tiny_raw("phi3"), "num_hidden_layers": LAYERS, "vocab_size": 64}, "fp32"),
], ids=["llama-bf16", "gpt2-amp", "phi3-fp32"])
def test_the_estimate_equals_a_real_step_under_the_policy(raw, recipe):
    """Forward's and backward's peaks within 0.01% (measured: -0.007% to -0.001%, the batch's and buffers' few
    hundred bytes) and the activations the forward leaves saved to the byte. (The optimizer step is not this flag's:
    the CPU tracker's step counters put it 0.07% apart.)"""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memcalc.measure.step import measure_cpu

    spec = _spec(recipe)
    report = _estimate(raw, spec)
    measured = measure_cpu(raw, spec)
    for phase in report.per_gpu.phases[:2]:
        got, want = phase.bytes, measured.per_phase_peak_bytes[phase.phase.value]
        assert abs(got - want) / want <= 1e-4, (phase.phase, got, want)
    assert report.per_gpu.peak_phase.value == measured.measured_peak_phase
    assert report.term("activations").bytes == measured.forward_end_bytes["activations"]


def test_a_layer_keeps_what_torchtitan_s_policy_saves():
    """Selective-op keeps, beyond full checkpointing (a real CPU step's saved activations), per layer: the outputs of the 1st, 3rd, 5th and 7th matmul
    (q, v, gate, down: every other mm recomputed) and sdpa's output and fp32 log-sum-exp. With BASE's shapes
    (hidden 96, 4 heads of 24, 2 KV heads, MLP 160) in bf16: tokens x (96 + 48 + 160 + 96 + 96) x 2 B + 4 heads x
    tokens x 4 B."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tokens = BATCH * SEQ
    heads = BASE["num_attention_heads"]
    per_layer = tokens * (96 + 48 + 160 + 96 + 96) * 2 + heads * tokens * 4
    selective = _estimate(LLAMA, _spec("bf16-pure")).term("activations").bytes
    from memcalc.measure.step import measure_cpu

    full = measure_cpu(LLAMA, _spec("bf16-pure", "full")).forward_end_bytes["activations"]
    assert selective - full == LAYERS * per_layer


def test_it_sits_between_full_checkpointing_and_none():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peaks = {mode: _estimate(LLAMA, _spec("bf16-pure", mode)).per_gpu.phases[1].bytes
             for mode in ("full", "selective-op", "none")}
    assert peaks["full"] < peaks["selective-op"] < peaks["none"]


def test_without_torch_it_says_what_to_install(monkeypatch):
    from memcalc import families

    monkeypatch.setattr(families, "fallback_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="selective-op is estimated by tracing"):
        run(model_of(ModelConfig("tiny", LLAMA, "test")), _spec("bf16-pure"))


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--zero", "2", "--gpus", "2"], 2, "runs one process without ZeRO/FSDP sharding"),
    (["--checkpointing", "selective-ops"], 2, "selective-op"),
])
def test_combinations_it_cannot_run_are_one_line(cli, args, code, message):
    result = cli("llama-3-8b", "--checkpointing", "selective-op", *args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_whose_code_mutates_a_saved_output_is_refused_with_torch_s_reason(cli, tmp_path):
    """transformers' Mixtral router divides topk's output in place; torchtitan's policy saves topk's outputs, and
    torch's SAC raises on the mutation: the real step fails, so the estimate says so instead of guessing."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps({**tiny_raw("mixtral"), "num_hidden_layers": LAYERS}))
    result = cli(str(path), "--checkpointing", "selective-op", "--seq-len", "64")
    assert result.exit_code == 5, result.stderr
    assert "has been mutated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
