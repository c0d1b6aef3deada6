"""--repeat-kv: k and v repeated to every query head before sdpa, which then saves the copies (torchtune's
MultiHeadAttention.forward: ``k.unsqueeze(2).expand(...).flatten(1, 2)``; transformers' sdpa_attention_forward when
use_gqa_in_sdpa is False: repeat_kv). The step is measured with transformers' repeat path forced
(memcalc.measure.build.SDPA_REPEAT_KV); the rules' extra is read off the code by hand below."""

from __future__ import annotations

import pytest

from memcalc.api import model_of, run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import tiny_raw

LAYERS, BATCH, SEQ = 4, 2, 128
LLAMA = {**tiny_raw("llama"), "num_hidden_layers": LAYERS, "vocab_size": 64}


def _backward(spec: TrainingSpec, cpu: bool = False) -> int:
    from memcalc.measure import derive

    with derive.semantics("cpu") if cpu else derive.semantics("cuda"):
        return run(model_of(ModelConfig("tiny", LLAMA, "test")), spec).per_gpu.phases[1].bytes


def test_each_layer_saves_the_repeated_copies():
    """Per layer, sdpa saves k and v for every query head instead of every kv head: 2 x 2 B x (2 x 128 tokens) x
    (4 - 2 heads) x 24 head dims more (tiny Llama: 4 heads, 2 kv heads, head dim 24), in the rules and in the
    traced step alike."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    heads, kv, head_dim = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"], 96 // 4
    extra = LAYERS * 2 * 2 * (BATCH * SEQ) * (heads - kv) * head_dim
    for source in ("rules", "trace"):
        plain, repeated = (_backward(TrainingSpec(precision="bf16-pure", micro_batch_size=BATCH, seq_len=SEQ,
                                                  activations=source, repeat_kv=flag)) for flag in (False, True))
        assert repeated - plain == extra, source


def test_the_traced_step_equals_a_measured_step_with_the_copies():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memcalc.measure import derive
    from memcalc.measure import step as st

    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=BATCH, seq_len=SEQ, activations="trace",
                        repeat_kv=True)
    with derive.semantics("cpu"):
        report = run(model_of(ModelConfig("tiny", LLAMA, "test")), spec)
    measured = st.measure_cpu(LLAMA, spec).per_phase_peak_bytes
    for phase in report.per_gpu.phases[:2]:
        want = measured[phase.phase.value]
        assert abs(phase.bytes - want) / want <= 1e-4, (phase.phase, phase.bytes, want)
    assert report.training.repeat_kv
