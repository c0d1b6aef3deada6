"""The CUDA measurement: for real on a GPU (marked gpu), and its bookkeeping on the CPU with torch.cuda faked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from memcalc import measure as verify
from memcalc.cli import flag_of
from memcalc.measure import cuda as vcuda
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.fake_cuda import GIB

TINY = ModelConfig(name="tiny-llama", source="test", raw={
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
})
SPEC = TrainingSpec(precision="bf16-pure", optimizer="adamw", optim_impl="foreach", micro_batch_size=2, seq_len=32)


def test_cuda_path_bookkeeping_with_faked_statistics(fake_cuda):
    # device="cpu": the tensors stay on the CPU; every torch.cuda statistic comes from FakeCuda.
    measured = vcuda.measure_cuda(TINY, SPEC, device="cpu")
    assert measured.method == "cuda"
    # Resets: one before the step, then one at the start of each phase; each phase's peak is read at its end.
    assert measured.per_phase_peak_bytes == {"forward": 2000, "backward": 3000, "optimizer_step": 4000}
    assert measured.measured_peak_bytes == 4000 and measured.measured_peak_phase == "optimizer_step"
    assert measured.reserved_peak_bytes == 8000
    assert measured.cuda_context_bytes == 1 * GIB
    assert measured.baseline_bytes == 200  # memory_allocated() when the forward began
    assert measured.run["device_name"] == "Fake GPU"
    # The tracker ran alongside: its composition of its own peak, and exact model states.
    assert sum(measured.per_term_bytes.values()) == measured.tracker_peak_bytes
    report = verify.estimate_for(TINY, SPEC)
    for term in ("weights", "gradients", "optimizer_states"):
        assert measured.model_state_bytes[term] == report.term(term).bytes
    assert measured.differences_from_gpu == []
    # memory_stats() read at each phase's end: the largest peak of each kind, the counters as last read
    assert measured.allocator_stats == {"requested_bytes.all.peak": 3600, "active_bytes.all.peak": 3800,
                                        "allocated_bytes.all.peak": 4000, "reserved_bytes.all.peak": 8000,
                                        "num_alloc_retries": 1, "num_ooms": 0}
    assert {"torch", "cuda_runtime", "driver", "alloc_conf"} <= set(measured.run)
    # the garbage collector is off while the step is measured, and on again afterwards
    import gc

    assert fake_cuda.gc_during and not any(fake_cuda.gc_during) and gc.isenabled()
    # the step's allocations were kept for the caching-allocator replay (not in the JSON)
    assert measured.allocation_events and "allocation_events" not in measured.to_dict()


def test_cuda_peaks_leave_out_the_cublas_workspaces(fake_cuda, monkeypatch):
    """The allocated peaks hold the card's cuBLAS workspaces (allocated in the warm-up step and kept; measured on an
    H200: requested peak - estimate = 64 MiB + 516 B, docs/accuracy-gpu.md); the measured peak compared with the
    estimate leaves them out. Here a card of compute capability 9.0 with CUBLAS_WORKSPACE_CONFIG=:1:1 (one 1 KiB
    workspace per handle, CublasHandlePool.cpp parseChosenWorkspaceSize), two handles: 2,048 B off each phase's peak."""
    monkeypatch.setattr(vcuda, "_versions", lambda: {"torch": "x", "cuda_runtime": "x", "driver": "x",
                                                     "alloc_conf": "", "compute_capability": "9.0"})
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":1:1")
    measured = vcuda.measure_cuda(TINY, SPEC, device="cpu")
    assert measured.per_phase_peak_bytes == {"forward": 0,  # (2,000 B less 2,048: none left, not negative)
                                             "backward": 3000 - 2048, "optimizer_step": 4000 - 2048}
    assert measured.measured_peak_bytes == 4000 - 2048
    assert any("2 cuBLAS workspaces (2,048 B" in note for note in measured.notes)


def test_cuda_oom_is_the_does_not_fit_exit(fake_cuda, monkeypatch):
    from memcalc.errors import OutOfMemoryError

    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.19 GiB of which 1.2 GiB is free.")

    monkeypatch.setattr(vcuda, "execute", out_of_memory)
    with pytest.raises(OutOfMemoryError) as caught:
        vcuda.measure_cuda(TINY, SPEC, device="cpu")
    assert caught.value.exit_code == 6
    message = str(caught.value)
    assert "\n" not in message and "Tried to allocate 2.00 GiB" in message and "does not fit" in message


def test_phase_clock_reads_each_phase_once(fake_cuda):
    clock = vcuda.CudaPhaseClock()
    clock.enter("forward")
    clock.enter("forward")  # repeated: ignored
    clock.enter("backward")
    clock.finish()
    assert clock.peaks == {"forward": 1000, "backward": 2000}


def test_auto_picks_cuda_when_available(fake_cuda, monkeypatch):
    sentinel = object()
    monkeypatch.setattr(vcuda, "measure_cuda", lambda *a, **k: sentinel)
    assert verify.resolve_method("auto") == "cuda"
    assert verify.run_verify(TINY, SPEC) is sentinel


def test_cuda_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert verify.resolve_method("auto") == "cpu-tracker"
    with pytest.raises(verify.UsageError):
        vcuda.measure_cuda(TINY, SPEC)


@pytest.mark.gpu
def test_cuda_measurement_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    measured = verify.run_verify(TINY, SPEC, "cuda")
    report = verify.estimate_for(TINY, SPEC)
    for term in ("weights", "gradients", "optimizer_states"):
        assert measured.model_state_bytes[term] == report.term(term).bytes
    assert set(measured.per_phase_peak_bytes) == {"forward", "backward", "optimizer_step"}
    # The allocator's peak holds at least the tensors the tracker saw at its peak (it rounds blocks up).
    assert measured.measured_peak_bytes >= measured.tracker_peak_bytes
    assert measured.reserved_peak_bytes >= measured.measured_peak_bytes
    print(f"\ncuda: estimated peak {report.per_gpu.peak_bytes:,} B ({report.per_gpu.peak_phase.value}), "
          f"measured {measured.measured_peak_bytes:,} B ({measured.measured_peak_phase})")


def test_cuda_run_refused_when_the_estimate_exceeds_the_card(fake_cuda, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("built before refusing")

    monkeypatch.setattr(vcuda, "measure_cuda", must_not_run)
    from memcalc.api import model_input

    config = model_input("llama-3-8b", None).config
    with pytest.raises(verify.UsageError) as err:
        verify.run_verify(config, TrainingSpec(precision="fp32", seq_len=2048), "cuda")
    assert "verify=trace" in str(err.value) and "estimated peak" in str(err.value)
    assert "--verify=trace" in err.value.render(flag_of)  # as the command line says it
