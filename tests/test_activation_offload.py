"""--activation-offload: torchtune's OffloadActivations (training/_activation_offloading.py), its bookkeeping run on
one device by memcalc.measure.offload, and the estimate traced with it (memcalc.measure.timeline).

References: torchtune's rules as its code states them (a 1024-byte minimum, nn.Parameter objects kept, a forward
stash of 5, the previous node's tensors freed by the next), checked on a graph whose saved tensors are known; and
real CPU steps run with it, measured by memcalc's tracker with the CPU's semantics.
"""

from __future__ import annotations

import json

import pytest

from memcalc.api import model_of, run
from memcalc.errors import MissingDependencyError
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import GPT2, tiny_raw

LAYERS, BATCH, SEQ = 4, 2, 128
LLAMA = {**tiny_raw("llama"), "num_hidden_layers": LAYERS, "vocab_size": 64}


def _spec(recipe: str, checkpointing: str = "none", style: str = "torchtune", **more) -> TrainingSpec:
    return TrainingSpec(precision=recipe, checkpointing=checkpointing, micro_batch_size=BATCH, seq_len=SEQ,
                        activation_offload=style, **more)


@pytest.mark.parametrize(("with_small_saves", "stashed"), [(False, 3), (True, 2)])
def test_the_manager_follows_torchtune_s_rules_on_known_tensors(with_small_saves, stashed):
    """A chain of 8 products by 1024-element fp32 weights; each saves its input h (4096 B: copied to the host) and
    its weight (an nn.Parameter: kept). The forward stash frees an offloaded tensor once a tensor 5 ids later is
    offloaded, and every save takes an id: with two saves a product, the last 3 inputs are still on the device when
    the forward ends (ids n-4, n-2, n); with two more small saves between products (8 B and 4 B: kept), the last 2."""
    torch = pytest.importorskip("torch")
    from memcalc.measure import tracker as trk
    from memcalc.measure.offload import Offload

    weights = [torch.nn.Parameter(torch.ones(1024)) for _ in range(8)]
    small = torch.nn.Parameter(torch.ones(2))
    x = torch.ones(1024, requires_grad=True)
    tracker = trk.MemoryTracker()
    with tracker:
        manager = Offload(tracker)
        with manager:
            h = x * 1.0  # (a scalar factor: nothing saved)
            for w in weights:
                h = h * w
                if with_small_saves:
                    (small * small[0]).sum()  # saves small and small[0]; the graph is dropped at once
            on_device = tracker.by_category[trk.ACTIVATIONS]
        h.sum().backward()
    assert tracker.host_peak_bytes == 8 * 4096  # every input copied once, no weight
    # every offloaded one unpacked in backward (a dropped graph's saves stay referenced, as in torchtune's tracker)
    assert all(device is None for _tensor, device in manager.saved.values())
    assert not manager.backward_stash  # emptied at the end of backward
    assert on_device == (1 + stashed) * 4096  # the last product and the stashed inputs


@pytest.mark.parametrize(("style", "host"), [("torchtune", 1024 + 4096 + 1024 + 1024), ("trl", 1024)])
def test_trl_skips_parameter_storages_and_saves_of_an_offloaded_storage(style, host):
    """h (8 x 32 fp32, 1024 B) @ w.t() saves h and the view w.t() (4096 B); h * h saves h twice. torchtune copies
    all four: w.t() is a plain tensor, not an nn.Parameter object, and it does not deduplicate. TRL's copy skips a
    tensor on a parameter's storage (update_model_params) and keeps a second save of an offloaded storage on the
    device: h alone is copied."""
    torch = pytest.importorskip("torch")
    from memcalc.measure import tracker as trk
    from memcalc.measure.offload import Offload

    w = torch.nn.Parameter(torch.ones(32, 32))
    x = torch.ones(8, 32, requires_grad=True)
    tracker = trk.MemoryTracker()
    with tracker:
        with Offload(tracker, style, [w]):
            h = x * 2.0
            loss = (h @ w.t()).sum() + (h * h).sum()
        loss.backward()
    assert tracker.host_peak_bytes == host
    # d loss / dh = 32 (a row sum of w) + 2 h = 36; dx = 2 x 36: the copies brought back hold the values
    assert torch.equal(x.grad, torch.full_like(x, 72.0))


def test_without_torch_it_says_what_to_install(monkeypatch):
    from memcalc import families

    monkeypatch.setattr(families, "fallback_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="activation_offload torchtune is estimated by tracing"):
        run(model_of(ModelConfig("tiny", LLAMA, "test")), _spec("bf16-pure"))


def _estimate(raw: dict, spec: TrainingSpec):
    from memcalc.measure import derive

    with derive.semantics("cpu"):  # the trace as this CPU runs it, to compare with a real CPU step
        return run(model_of(ModelConfig("tiny", raw, "test")), spec)


def _compared(raw: dict, spec: TrainingSpec):
    """The estimate and a real CPU step run the same way (memcalc's tracker): forward's and backward's peaks within
    0.02%, the activations left on the device and the host bytes to the byte."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memcalc.measure.step import measure_cpu

    report = _estimate(raw, spec)
    measured = measure_cpu(raw, spec)
    for phase in report.per_gpu.phases[:2]:
        got, want = phase.bytes, measured.per_phase_peak_bytes[phase.phase.value]
        assert abs(got - want) / want <= 2e-4, (phase.phase, got, want)
    assert report.term("activations").bytes == measured.forward_end_bytes.get("activations", 0)
    assert report.term("offloaded_activations").bytes == measured.term_bytes["offloaded_activations"]
    return report, measured


@pytest.mark.parametrize(("raw", "recipe", "checkpointing", "style"), [
    (LLAMA, "bf16-pure", "none", "torchtune"), ({**GPT2, "n_layer": LAYERS, "vocab_size": 64}, "amp-bf16", "full",
                                                "torchtune"),
    (LLAMA, "bf16-pure", "none", "trl"), (LLAMA, "amp-bf16", "full", "trl"),
], ids=["llama-bf16", "gpt2-amp-full", "trl-llama-bf16", "trl-llama-amp-full"])
def test_the_estimate_equals_a_real_step_with_offloading(raw, recipe, checkpointing, style):
    """Forward's and backward's peaks within 0.02% (measured: -0.007% to -0.002%, the batch's and buffers' few
    hundred bytes), the activations left on the device and the host bytes to the byte."""
    report, measured = _compared(raw, _spec(recipe, checkpointing, style))
    assert report.per_gpu.cpu_offload_bytes == measured.term_bytes["offloaded_activations"]


def test_offloading_lowers_the_forward_and_backward_peaks():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    on = _estimate(LLAMA, _spec("bf16-pure"))
    off = _estimate(LLAMA, TrainingSpec(precision="bf16-pure", micro_batch_size=BATCH, seq_len=SEQ))
    assert [p.bytes for p in on.per_gpu.phases[:2]] < [p.bytes for p in off.per_gpu.phases[:2]]
    assert on.term("activations").bytes < off.term("activations").bytes / 4


@pytest.mark.parametrize("args", [["--zero", "2", "--gpus", "2"], ["--offload", "optimizer", "--zero", "2", "--gpus", "2"]])
def test_combinations_it_cannot_run_are_one_line(cli, args):
    result = cli("llama-3-8b", "--activation-offload", "torchtune", *args)
    assert result.exit_code == 2, result.stderr
    assert "runs one process without ZeRO/FSDP sharding" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchtune_s_flag_in_its_config_maps_to_it():
    # recipes/configs/llama3_2/1B_lora_single_device.yaml style: enable_activation_offloading true.
    from memcalc.configs.trainers import parse_trainer_config

    data = {"model": {"_component_": "torchtune.models.llama3_2.llama3_2_1b"}, "batch_size": 2, "dtype": "bf16",
            "gradient_accumulation_steps": 1, "optimizer": {"_component_": "torch.optim.AdamW"},
            "enable_activation_checkpointing": True, "enable_activation_offloading": True}
    parsed = parse_trainer_config(data)
    settings = json.loads(json.dumps(parsed.settings))
    assert settings["activation_offload"] == "torchtune"
    assert settings["checkpointing"] == "full"


@pytest.mark.parametrize("recipe", ["bf16-pure", "amp-bf16"])
def test_transformers_checkpoint_offloading_equals_a_real_step(recipe):
    """--activation-offload checkpoints: transformers' activation_checkpointing_enable(offload=True) (save_on_cpu
    around each checkpoint call, its copies booked as host memory) against a real CPU step run that way: each phase
    within 0.02%, the activations left on the GPU and the host bytes to the byte. Each layer's saved inputs go to the
    host: at least its hidden states (batch x seq x hidden in the residual dtype) per layer."""
    report, _measured = _compared(LLAMA, _spec(recipe, "full", "checkpoints"))
    host = report.term("offloaded_activations").bytes
    residual = 4 if recipe == "amp-bf16" else 2  # autocast keeps the residual stream in fp32
    assert host >= LAYERS * BATCH * SEQ * 96 * residual
    plain = _estimate(LLAMA, TrainingSpec(precision=recipe, checkpointing="full", micro_batch_size=BATCH, seq_len=SEQ))
    assert report.term("activations").bytes < plain.term("activations").bytes


def test_checkpoint_offloading_needs_checkpointing(cli):
    result = cli("llama-3-8b", "--activation-offload", "checkpoints")
    assert result.exit_code == 2
    assert "add --checkpointing full" in result.stderr
