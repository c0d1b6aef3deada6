"""--compile: each decoder layer as torch.compile with Inductor runs it (memcalc.measure.compiled), estimated from the
traced step (memcalc.measure.timeline).

References: CPU steps of the same compiled layers measured by memcalc's tracker (the depth extrapolation, the
composition with offloading). Against real torch.compile'd CPU steps (Inductor's kernels built by the C++ compiler,
measured by resident memory: memcalc's tracker cannot see Inductor's allocations) the estimate is measured by
``python benchmarks/compile.py`` (32 cells, docs/accuracy.md), not here: building the kernels from a cold cache takes
about 30 s per configuration on this machine, beyond the suite's budget.
"""

from __future__ import annotations

import pytest

from memcalc.api import model_of, run
from memcalc.errors import MissingDependencyError
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import tiny_raw

# (2 layers, the first and the last: each layer is compiled on its own, most of a second of AOTAutograd and Inductor's
# scheduler apiece, in the trace and again in the measured step)
LAYERS, BATCH, SEQ = 2, 2, 64
LLAMA = {**tiny_raw("llama"), "num_hidden_layers": LAYERS, "vocab_size": 64}


def _estimate(raw: dict, spec: TrainingSpec):
    from memcalc.measure import derive

    with derive.semantics("cpu"):  # the trace as this CPU runs it, to compare with a real CPU step
        return run(model_of(ModelConfig("tiny", raw, "test")), spec)


def test_the_estimate_equals_a_measured_step_of_the_compiled_layers():
    """Checkpointed compiled layers and torchtune's chunked loss with each chunk's cross-entropy compiled (its
    compile_loss), traced at full depth (2 layers; the depth extrapolation is the step trace's own,
    tests/test_timeline.py), against a CPU step of the same compiled code measured by the tracker: within 0.01%. (Without checkpointing, the standard loss, and against eager steps:
    benchmarks/compile.py.)"""
    checkpointing = "full"
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memcalc.measure import step as st

    raw = {**LLAMA, "vocab_size": 2048}  # (a vocabulary the loss matters for)
    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=BATCH, seq_len=SEQ, checkpointing=checkpointing,
                        compile=True, loss="chunked:4")
    report = _estimate(raw, spec)
    assert report.training.activations == "trace" and report.training.compile
    # (real compiled CPU steps of this pair, measured by resident memory: benchmarks/compile.py --quick --chunked)
    assert not any(note.startswith("--compile with --loss chunked:N") for note in report.notes)
    measured = st.measure_cpu(raw, spec)
    for phase in report.per_gpu.phases[:2]:
        want = measured.per_phase_peak_bytes[phase.phase.value]
        assert abs(phase.bytes - want) / want <= 1e-4, (phase.phase, phase.bytes, want)
    # the activations term: what the compiled forward leaves saved, as the tracker counts it
    kept = measured.forward_end_bytes["activations"]
    assert abs(report.term("activations").bytes - kept) / kept <= 1e-3


def test_without_torch_it_says_what_to_install(monkeypatch):
    from memcalc import families

    monkeypatch.setattr(families, "fallback_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="compile is estimated by tracing"):
        run(model_of(ModelConfig("tiny", LLAMA, "test")), TrainingSpec(compile=True))


def test_with_activation_offloading_the_offloader_takes_the_compiled_layers_saved_tensors():
    """torchtune's offloading around compiled, checkpointed layers: the traced estimate equals a CPU step of the same
    composition (within 0.01%), holds less on the device than compiling alone, and says the pair is only traced."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memcalc.measure import step as st

    raw = {**LLAMA, "num_hidden_layers": 1}  # (the composition, not the depth)
    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=BATCH, seq_len=SEQ, checkpointing="full",
                        compile=True, activation_offload="torchtune")
    report = _estimate(raw, spec)
    measured = st.measure_cpu(raw, spec)
    alone = _estimate(raw, TrainingSpec(precision="bf16-pure", micro_batch_size=BATCH, seq_len=SEQ,
                                          checkpointing="full", compile=True))
    for phase in report.per_gpu.phases[:2]:
        want = measured.per_phase_peak_bytes[phase.phase.value]
        assert abs(phase.bytes - want) / want <= 1e-4, (phase.phase, phase.bytes, want)
    assert report.per_gpu.phases[0].bytes < alone.per_gpu.phases[0].bytes
    assert any("only traced" in note for note in report.notes)


@pytest.mark.parametrize(("args", "message"), [
    (["--zero", "2", "--gpus", "2"], "runs one process without ZeRO/FSDP sharding"),
    (["--checkpointing", "selective-op"], "--compile with --checkpointing selective-op is not modelled"),
])
def test_combinations_it_cannot_run_are_one_line(cli, args, message):
    result = cli("llama-3-8b", "--compile", *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
