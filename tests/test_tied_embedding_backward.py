"""A weight used twice in one step (the head tied to the token embedding, T5's table shared by its two stacks): what
torch's autograd holds when it sums the gradient contributions, and the estimate's backward moments against steps.

The engine's rule (memcalc/engine.py _head_gradient): autograd sums a weight's contributions in the input buffer of its
AccumulateGrad node (torch/csrc/autograd/input_buffer.cpp accumulate), in place only into a buffered tensor that is held
once with its storage. The head's contribution is a view of mm's result (FunctionsManual.cpp mm_mat2_backward, then
TBackward0), so a tied head's sum makes a third V x h tensor; autocast's cast (ToCopyBackward0) and an embedding's
gradient are fresh, and take the next contribution in place.

"Ordinary step" below: one training step with no dispatch mode active, measured by the CPU allocator's own record
(torch.profiler) plus what was alive before it. The tracker is a TorchDispatchMode, and under one autograd never sums in
place (ATen TensorSubclassLikeUtils.h isTensorSubclassLike is true for every tensor while a mode is active); the tests
show where that makes it hold one V x h table more than the ordinary step.
"""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F

from memcalc.api import model_of, run
from memcalc.measure import step as st
from memcalc.measure import tracker as trk
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from memcalc.vocab import MOMENT_BACKWARD_END, MOMENT_FIRST_SHARED_SUM, MOMENT_SHARED_GRADIENT_SUM, Phase

VOCAB = 8000  # the table dominates the tiny models: V x h x 4 B = 2 MB at h = 64, the rest of the step ~0.5 MB
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
         "max_position_embeddings": 256}
T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 64, "d_kv": 16, "d_ff": 128,
      "num_layers": 2, "num_heads": 4, "vocab_size": VOCAB, "dropout_rate": 0.0, "decoder_start_token_id": 0,
      "pad_token_id": 0}
TABLE = VOCAB * 64 * 4  # one fp32 V x h tensor
# Achieved (2026-12-02): -0.07% to 0.00% against the ordinary step (the estimate leaves out a few small tensors);
# tied T5 +0.2%: at its first sum the encoder's activations are counted as its layers' (the first layer's bytes) plus
# every per-model part, the decoder's included.
UNDER_PCT, OVER_PCT, T5_TIED_OVER_PCT = 0.1, 0.1, 0.5


def _allocator_peak(fn) -> int:
    """The CPU allocator's highest mark over ``fn()``, above where it started. Nothing made before the span may be
    freed inside it: the profiler reports such a free with the size an earlier span recorded at that address (seen
    here: a stray -1 table), so ``fn`` runs the whole forward and backward, with Python's cyclic collector paused (a
    collection inside the span could free garbage made before it)."""
    gc.disable()
    try:
        with trk.allocator_profiler() as prof:
            fn()
    finally:
        gc.enable()
    return trk.allocator_peak_and_end(prof)[0]


@pytest.mark.parametrize(("second_use", "autocast", "tables"), [
    ("head", False, 3),  # the head's view, the embedding's gradient, their out-of-place sum
    ("head", True, 2),  # autocast: the cast back to fp32 is fresh and takes the embedding's gradient in place
    ("embedding", False, 2),  # two embeddings (T5's stacks): fresh, in place
])
def test_autograd_sums_a_weight_used_twice_as_the_rule_says(second_use, autocast, tables):
    vocab, hidden = 20_000, 16
    table = vocab * hidden * 4
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden))
    ids = torch.randint(0, vocab, (1, 8))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden_states = F.embedding(ids, weight) * 2
            if second_use == "head":
                second = F.linear(hidden_states, weight)
            else:
                second = F.embedding(ids, weight) + hidden_states
            loss = second.float().sum()
        del hidden_states, second
        loss.backward()

    # Everything else in this step (8 x 20,000 logits and their gradient, under autocast the 16-bit copy of the
    # weight and the head's 16-bit gradient, both freed before the sum) stays below a table beside what is counted.
    peak = _allocator_peak(step)
    assert peak // table == tables, (peak, table)
    if autocast:  # under a dispatch mode (the tracker), the same sum is out of place: one table more
        weight.grad = None

        def under_tracker() -> None:
            with trk.MemoryTracker():
                step()

        assert _allocator_peak(under_tracker) // table == tables + 1


def _spec(precision: str) -> TrainingSpec:
    return TrainingSpec(precision=precision, optimizer="sgd", micro_batch_size=1, seq_len=16)


def _ordinary_step_peak(raw: dict, spec: TrainingSpec) -> int:
    """The peak of one step after the warm-up, with no dispatch mode: what was alive before it plus the CPU
    allocator's highest mark over it."""
    setup = st.resolve_setup(spec)
    torch.manual_seed(0)
    model = st.build_model(raw, setup)
    stepper = st.Stepper(model, setup)
    batch, _ = st.make_batch(model, setup)
    st.one_step(model, stepper, batch, setup, st.PhaseClock())
    before = st.storage_bytes([*model.parameters(), *model.buffers(), *stepper.masters, *batch.values(),
                               *(t for ts in stepper.state_tensors().values() for t in ts)])
    return before + _allocator_peak(lambda: st.one_step(model, stepper, batch, setup, st.PhaseClock()))


def _estimate(raw: dict, spec: TrainingSpec):
    report = run(model_of(ModelConfig("tiny", raw, "test")), spec)
    assert report.per_gpu.peak_phase == Phase.backward
    return next(p for p in report.per_gpu.phases if p.phase == Phase.backward)


@pytest.mark.parametrize(("raw", "precision", "moment"), [
    ({**LLAMA, "tie_word_embeddings": True}, "fp32", MOMENT_SHARED_GRADIENT_SUM),
    ({**LLAMA, "tie_word_embeddings": True}, "amp-bf16", MOMENT_SHARED_GRADIENT_SUM),
    ({**LLAMA, "tie_word_embeddings": True}, "bf16-pure", MOMENT_SHARED_GRADIENT_SUM),
    ({**LLAMA, "tie_word_embeddings": False}, "fp32", MOMENT_BACKWARD_END),
    ({**T5, "tie_word_embeddings": True}, "fp32", MOMENT_FIRST_SHARED_SUM),
    ({**T5, "tie_word_embeddings": False}, "fp32", MOMENT_SHARED_GRADIENT_SUM),  # t5-v1_1: one table, two stacks
], ids=["llama-tied-fp32", "llama-tied-amp-bf16", "llama-tied-bf16-pure", "llama-untied-fp32", "t5-tied-fp32",
        "t5-untied-fp32"])
def test_backward_peak_against_an_ordinary_step(raw, precision, moment):
    spec = _spec(precision)
    backward = _estimate(raw, spec)
    measured = _ordinary_step_peak(raw, spec)
    error_pct = 100 * (backward.bytes - measured) / measured
    print(f"\n{raw['model_type']} tied={raw['tie_word_embeddings']} {precision}: estimate {backward.bytes:,} B "
          f"({backward.moment}), ordinary step {measured:,} B ({error_pct:+.3f}%)")
    assert backward.moment == moment
    over = T5_TIED_OVER_PCT if raw["model_type"] == "t5" and raw["tie_word_embeddings"] else OVER_PCT
    assert -UNDER_PCT <= error_pct <= over


@pytest.mark.parametrize(("tied", "precision", "tracker_extra"), [
    (True, "fp32", 0),  # the sum is out of place anyway: the tracker and the ordinary step agree
    (False, "fp32", 0),
    (True, "amp-bf16", TABLE),  # in place in the ordinary step, out of place under the tracker
])
def test_tracker_backward_peak(tied, precision, tracker_extra):
    raw, spec = {**LLAMA, "tie_word_embeddings": tied}, _spec(precision)
    backward = _estimate(raw, spec)
    measured = st.measure_cpu(raw, spec)
    assert measured.measured_peak_phase == "backward"
    tracker_peak = measured.per_phase_peak_bytes["backward"]
    error_pct = 100 * (backward.bytes + tracker_extra - tracker_peak) / tracker_peak
    print(f"\nllama tied={tied} {precision}: estimate {backward.bytes:,} B, tracker {tracker_peak:,} B "
          f"(estimate + {tracker_extra:,} B: {error_pct:+.3f}%)")
    assert abs(error_pct) <= UNDER_PCT
