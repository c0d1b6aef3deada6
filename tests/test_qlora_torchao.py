"""--qlora-quantizer torchao: QLoRA's base as torchao's NF4Tensor, as torchtune's qlora_ builders make it. The bytes
and moments are checked against torchao's own objects and calls (measured by memcalc's tracker on CPU tensors) and
against torchtune's recipe measured on an H200 (benchmarks/gpu-runs/2026-12-04-h200-d, written by
benchmarks/torchtune_qlora_reserved.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memcalc import api
from memcalc.errors import UsageError
from memcalc.load import torchao_to_nf4_peak
from memcalc.model import ModelConfig
from memcalc.resolve import model_of
from memcalc.spec import TrainingSpec
from memcalc.trainable import nf4_bytes
from memcalc.vocab import EXTRA_LOAD_IN_FLIGHT, EXTRA_LOAD_TORCHAO_NF4, TERM_WEIGHTS
from tests.tiny import tiny_raw

H200_RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu-runs" / "2026-12-04-h200-d"
# Llama-2-7B's MLP weight, the largest torchtune quantizes (4096 x 11008)
LLAMA2_MLP = 11008 * 4096
QLORA = {"lora_rank": 8, "qlora": True, "qlora_quantizer": "torchao", "precision": "bf16-pure"}
# to_nf4 takes tensors of whole blocks of 64 x 256 elements: a tiny Llama whose Linear weights are (128 x 128,
# 256 x 128)
TINY = {**tiny_raw("llama"), "hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4}


def _torchao():
    pytest.importorskip("torchao")
    from memcalc.measure import qlora

    return qlora


def _tracked(call):
    """The allocation events of ``call()`` under memcalc's tracker (CPU tensors), and their peak above the start."""
    from memcalc.allocator import ALLOC
    from memcalc.measure import tracker as trk

    tracker = trk.MemoryTracker()
    tracker.events = []
    with tracker:
        kept = call()
    live, peak, sizes = 0, 0, {}
    for kind, key, size in tracker.events:
        if kind == ALLOC:
            sizes[key] = size
            live += size
            peak = max(peak, live)
        else:
            live -= sizes.pop(key, 0)
    return tracker.events, peak, kept


# Llama-3-8B's q_proj; 224 scaler blocks (not a power of two) over 3.5 chunks of 2^20 elements, in place of its MLP
# weight (14336 x 4096: 3584 scaler blocks, 5 s to quantize; the bytes follow the element count alone, nf4_bytes
# branching only on one scaler block or more); 32 scaler blocks; one
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 256), (512, 1024), (128, 128)])
def test_nf4_bytes_are_torchaos_nf4tensor(shape):
    """The step's weights term for a torchao base: the bytes of to_nf4's NF4Tensor (its __tensor_flatten__ tensors:
    codes, int8 scalers, bf16 factors per 256 blocks, the mean and the 16-entry code)."""
    import torch

    qlora = _torchao()
    made = qlora._to_nf4()(torch.zeros(shape, dtype=torch.bfloat16))
    held = sum(t.untyped_storage().nbytes() for t in qlora.torchao_parts_of(made))
    assert nf4_bytes(shape[0] * shape[1], torchao=True) == held


@pytest.mark.parametrize("shape", [(128, 128), (256, 1024), (1024, 2048), (2560, 1024)])
def test_the_to_nf4_peak_rule_is_the_tracked_call(shape):
    """memcalc.load.torchao_to_nf4_peak (the load's moment, from nf4_tensor.py's code) against the real to_nf4 of a
    bf16 tensor under the tracker: one scaler block, below one chunk (2^20 elements), two whole chunks, and a partial
    last chunk."""
    import torch

    qlora = _torchao()
    to_nf4 = qlora._to_nf4()
    weight = torch.full(shape, 0.01, dtype=torch.bfloat16)
    _, peak, _ = _tracked(lambda: to_nf4(weight))
    assert torchao_to_nf4_peak(weight.numel()) == peak + weight.numel() * 2  # (the input existed before the call)


def test_the_linear_nf4_mirror_allocates_what_torchaos_does():
    """The traced step's layer (qlora._LinearNF4, which calls get_original_weight itself so that the tracker sees it
    in every torchao) allocates what torchao's own linear_nf4 does, forward and backward, in the same order (torchao
    0.18 dequantizes through __torch_function__, which the tracker sees)."""
    import torch

    qlora = _torchao()
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    except ImportError:
        pytest.skip("a torchao whose linear_nf4 dequantizes inside __torch_dispatch__, unseen by the tracker")
    weight = qlora._to_nf4()(torch.full((384, 256), 0.01, dtype=torch.bfloat16))

    def step(linear):
        def run():
            x = torch.ones(2, 8, 256, dtype=torch.bfloat16, requires_grad=True)
            linear(x, weight).sum().backward()
        return run

    theirs, their_peak, _ = _tracked(step(linear_nf4))
    ours, our_peak, _ = _tracked(step(qlora._LinearNF4.apply))
    assert [(kind, size) for kind, _key, size in ours] == [(kind, size) for kind, _key, size in theirs]
    assert our_peak == their_peak > 384 * 256 * 2  # more than the dequantized weight alone
    # (about 14 B a weight element at once: activations.TORCHAO_UNTRACED_NOTE says so when the step is not traced)
    assert 14 <= our_peak / (384 * 256) < 14.5


def test_the_settings_torchtune_implies_and_refuses():
    # torchtune keeps the rest in the model's dtype: unless asked, no PEFT upcast
    report = api.estimate("llama-3.2-1b", **QLORA, activations="rules")
    assert any("as torchao's NF4Tensor (torchtune); the base's other tensors stay 16-bit" in n for n in report.notes)
    for extra, named in (({"qlora_upcast": True}, "qlora_upcast"), ({"qlora_double_quant": False}, "qlora_double_quant"),
                         ({"qlora_lm_head": True}, "qlora_lm_head")):
        with pytest.raises(UsageError, match=named):
            api.estimate("llama-3.2-1b", **QLORA, **extra)
    with pytest.raises(UsageError, match="add qlora"):
        TrainingSpec(lora_rank=8, qlora_quantizer="torchao")


def test_the_load_is_torchtunes_build_and_copy():
    """Llama-2-7B as torchtune's QLoRA recipe loads it: the whole model and the largest weight quantized again as the
    checkpoint is copied in."""
    report = api.estimate("llama-2-7b", **QLORA, activations="rules",
                          lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    loaded = report.per_gpu.load
    assert loaded.path == "torchtune-qlora" and "mlp" in loaded.moment
    assert loaded.breakdown[EXTRA_LOAD_IN_FLIGHT] == LLAMA2_MLP * 2
    assert loaded.breakdown[EXTRA_LOAD_IN_FLIGHT] + loaded.breakdown[EXTRA_LOAD_TORCHAO_NF4] \
        == torchao_to_nf4_peak(LLAMA2_MLP)
    assert loaded.peak_bytes == loaded.breakdown[TERM_WEIGHTS] + torchao_to_nf4_peak(LLAMA2_MLP)


def test_the_h200_load_pass_peak_is_to_nf4s():
    """torchtune bd2a0fc with torchao 0.18 on an H200 (the kept run): load_state_dict's peak above what the build left
    allocated is the largest weight's to_nf4, as the rule counts it, within the allocator's 512-byte rounding of the
    call's few tensors."""
    run = json.loads((H200_RUN / "tthead.json").read_text())
    assert run["torchao"] == "0.18.0" and run["loaded"]["unexpected"] == 0
    measured = run["after_init"]["max_allocated"] - run["after_build"]["allocated"]
    assert 0 <= measured - torchao_to_nf4_peak(LLAMA2_MLP) < 512 * 8


def test_torchtunes_build_and_copy_as_logged():
    """qlora.torchao_build and torchao_load, as --reserved logs them before the first step: per layer a 16-bit weight
    made, quantized by to_nf4 and dropped (the build); later a 16-bit checkpoint tensor arriving, quantized again,
    dropped, the new NF4's tensors copied into the layer's (which stay) and dropped."""
    import torch

    from memcalc.allocator import ALLOC, FREE

    qlora = _torchao()
    layers = [torch.nn.Linear(256, 384, bias=False, dtype=torch.bfloat16) for _ in range(2)]
    for layer in layers:
        layer.nf4 = qlora._to_nf4()(layer.weight.detach())
    weight = 384 * 256 * 2
    # a 16-bit weight made, quantized and dropped, as one call logs it
    call, _, _ = _tracked(lambda: qlora._to_nf4()(torch.empty(384, 256, dtype=torch.bfloat16)))
    quantized = [(kind, size) for kind, _key, size in call]
    assert quantized[0] == (ALLOC, weight) and quantized[-1] == (FREE, 0)
    # (the storages an NF4Tensor holds: torchao's scaler_mean is a view into another of its tensors)
    parts = len({t.untyped_storage().data_ptr() for t in qlora.torchao_parts(layers[0])})
    built, _, _ = _tracked(lambda: qlora.torchao_build(layers, torch.bfloat16))
    kept = [id(t) for layer in layers for t in qlora.torchao_parts(layer)]
    loaded, _, _ = _tracked(lambda: qlora.torchao_load(layers, torch.bfloat16))
    assert [(kind, size) for kind, _key, size in built] == 2 * quantized
    assert [(kind, size) for kind, _key, size in loaded] == 2 * (quantized + [(FREE, 0)] * parts)
    assert [id(t) for layer in layers for t in qlora.torchao_parts(layer)] == kept  # copied into, not replaced


def test_the_replay_holds_the_load_moment():
    """--reserved on a tiny Llama with torchao's base: the allocation log starts with torchtune's build and load, so
    its requested peak is at least the load's moment memcalc.load counts (its weights term the engine's)."""
    pytest.importorskip("torchao")
    from memcalc.allocator import parse_alloc_conf, replay
    from memcalc.measure.reserved import step_allocations

    raw = TINY
    spec = TrainingSpec(**{**QLORA, "qlora_upcast": False}, micro_batch_size=1, seq_len=16,
                        activations="rules", lora_targets=("q_proj", "v_proj"))
    report = api.run(model_of(ModelConfig("tiny", raw, "test")), spec)
    allocations, _ = step_allocations(raw, spec)
    replayed = replay(allocations.events, parse_alloc_conf(""))
    assert replayed.requested_peak_bytes >= report.per_gpu.load.peak_bytes


def test_without_torchao_the_estimate_says_what_it_leaves_out(monkeypatch):
    """No torchao: the step cannot be traced with torchao's layers. The estimate falls back to the rules, saying so
    and what they leave out; --reserved, which replays the traced step, is one line naming the package."""
    from memcalc.errors import MissingDependencyError
    from memcalc.measure import qlora

    def absent():
        raise MissingDependencyError(qlora.TORCHAO_INSTALL)

    monkeypatch.setattr(qlora, "_to_nf4", absent)
    settings = {**QLORA, "seq_len": 200}  # (a length no other test traces: nothing cached)
    report = api.estimate("llama-3.2-1b", **settings)
    note = next(n for n in report.notes if "could not be traced" in n)
    assert "pip install torchao" in note and "about 14 B per element of the largest quantized weight" in note
    with pytest.raises(UsageError, match="pip install torchao"):
        api.estimate("llama-3.2-1b", **settings, reserved=True)


def test_verify_measures_torchaos_layers(tmp_path):
    """--verify runs torchtune's QLoRA layers for real on the CPU (torchao's to_nf4 and linear_nf4 on real tensors,
    under the tracker): the estimate, whose trace runs the same layers under FakeTensorMode with the Python-level
    LinearNF4, is the measured step's peak within 0.1% (measured: +256 B on Llama-3.2-1B at 1 x 128)."""
    pytest.importorskip("torchao")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    report = api.verify(str(path), **QLORA, lora_targets="q_proj,v_proj", batch_size=2, seq_len=32,
                        method="cpu-tracker")
    measured = report.verify.measured_peak_bytes
    assert abs(report.per_gpu.step_peak().bytes - measured) <= measured * 0.001
    assert any("torchao's NF4Tensor, made by its to_nf4 and run by its linear_nf4" in n for n in report.verify.notes)
    # the weights as memory holds them: the NF4Tensor's tensors, not the 16-bit stand-in transformers builds
    weights = next(row for row in report.verify.rows if row.term == "weights")
    assert weights.estimate_bytes == weights.measured_bytes


def test_the_h200_reproduced_torchtunes_tutorial_figures():
    """torchtune 0914d5cfb with torchao 0.1, the QLoRA tutorial's commit, run on the H200 (the kept run): its
    reserved memory after init and over the steps are the tutorial's 9.13 GB and 9.29 GB (qlora_finetune.rst,
    docs/published-runs.md row 24), which the replay of today's build does not reach (docs/accuracy.md)."""
    run = json.loads((H200_RUN / "tt0914.json").read_text())
    assert run["torchao"].startswith("0.1") and run["loaded"]["unexpected"] == 0
    assert round(run["after_init"]["max_reserved"] / 1e9, 2) == 9.13
    assert round(max(step["max_reserved"] for step in run["steps"]) / 1e9, 2) == 9.29


def test_under_compile_the_dequantization_is_the_fused_kernels(tmp_path):
    """--compile with torchao's layers (torchtune's QLoRA configs compile, e.g. 8B_qlora_single_device): the compile
    emulation cannot trace an NF4Tensor, so each layer runs as one 16-bit dequantized weight per matmul (what
    Inductor's fusion of get_original_weight's pointwise ops leaves), said in a note; the step is estimated, not
    refused."""
    pytest.importorskip("torchao")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    report = api.estimate(str(path), **QLORA, compile=True, batch_size=1, seq_len=32)
    assert any("QLoRA under --compile" in n for n in report.notes)
    assert not any("could not be traced" in n for n in report.notes)
    # (a modelled fusion is not a step to measure: --verify says so)
    from memcalc.errors import MemcalcError

    with pytest.raises(MemcalcError, match="QLoRA under compile"):
        api.verify(str(path), **QLORA, compile=True, batch_size=1, seq_len=32, method="cpu-tracker")
