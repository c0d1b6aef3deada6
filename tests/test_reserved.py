"""--reserved and --alloc-conf: the step's allocations replayed through the caching-allocator model (memcalc.allocator,
whose rules tests/test_allocator.py checks), wired into the report, the fit and --verify."""

import json
import math

import pytest

from tests.conftest import has_module, load_log
from tests.tiny import BASE

needs_torch = pytest.mark.skipif(not (has_module("torch") and has_module("transformers")),
                                 reason="needs torch and transformers")

# Two layers wide enough that the weights, activations and logits are large-pool blocks (1-10 MiB requests share
# 20 MiB segments, larger ones get their own), traced in a second.
WIDE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **BASE, "hidden_size": 1024,
        "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192}


@pytest.fixture
def wide(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(WIDE))
    return str(path)


@needs_torch
def test_replayed_step_holds_the_traced_steps_tensors(wide, cli):
    """The replayed allocations are the whole step: their requested peak is the peak a trace of the same step measures
    (--verify=trace, memcalc's tracker), and the allocator holds at least that."""
    estimate = cli(wide, "--precision", "bf16-pure", "--seq-len", "256", "--batch-size", "2", "--reserved", "--json")
    assert estimate.exit_code == 0, estimate.stderr
    from memcalc.schema import validate_report_json

    validate_report_json(estimate.stdout)  # the new fields are in the JSON contract
    per_gpu = estimate.json()["per_gpu"]
    replayed = per_gpu["allocator"]
    assert per_gpu["reserved_peak_bytes"] == replayed["reserved_peak_bytes"]
    assert replayed["reserved_peak_bytes"] >= replayed["allocated_peak_bytes"] >= replayed["requested_peak_bytes"]
    assert replayed["alloc_conf_source"] == "default" and replayed["capacity_bytes"] is None
    verify = cli(wide, "--precision", "bf16-pure", "--seq-len", "256", "--batch-size", "2", "--verify=trace", "--json")
    assert verify.exit_code == 0, verify.stderr
    measured = verify.json()["verify"]
    # (the estimate's trace follows CUDA's semantics, the verify trace the CPU's: for bf16-pure Llama they agree)
    assert replayed["requested_peak_bytes"] == measured["measured_peak_bytes"]
    # the verify replays its own measured step's allocations the same way
    assert measured["replayed_requested_peak_bytes"] == measured["measured_peak_bytes"]
    assert measured["replayed_reserved_peak_bytes"] == replayed["reserved_peak_bytes"]


@needs_torch
def test_accumulated_gradients_are_in_the_replay(wide, cli):
    """With gradient accumulation the replay runs two micro-batches per step, the second beside the first's
    gradients: its requested peak is the Llama rules' peak for that run (the engine's accumulation moment, derived
    apart from any trace), to the few KiB the rules leave out (the batch's token ids, scalars); without the
    accumulated gradients it would be ~5% apart here (the peak moves from the optimizer step to the backward)."""
    for accumulation in ("1", "3"):
        result = cli(wide, "--precision", "bf16-pure", "--seq-len", "256", "--batch-size", "2", "--grad-accum",
                     accumulation, "--activations", "rules", "--reserved", "--json").json()["per_gpu"]
        replayed = result["allocator"]["requested_peak_bytes"]
        assert abs(replayed - result["peak_bytes"]) <= 1e-4 * result["peak_bytes"], (accumulation, replayed)


@needs_torch
def test_a_step_the_replay_cannot_run_is_one_line(cli):
    result = cli("llama-3.2-1b", "--reserved", "--optim", "muon")
    assert result.exit_code == 2 and result.stdout == ""
    assert "--reserved replays a step that does not yet run --optim muon; drop it" in result.stderr


@needs_torch
def test_a_ddp_rank_is_replayed_with_its_buckets(wide, cli):
    """--sharding torch --gpus 2: one DistributedDataParallel rank over a fake process group, its gradient buckets made
    at construction; the replayed requested peak is the DDP rank's estimated peak (parallel.py's buckets, checked on
    gloo ranks in tests/test_verify_distributed.py) to the few KiB the estimate leaves out (token ids, scalars)."""
    result = cli(wide, "--precision", "bf16-pure", "--seq-len", "256", "--batch-size", "2", "--gpus", "2",
                 "--sharding", "torch", "--reserved", "--json").json()["per_gpu"]
    replayed = result["allocator"]
    assert abs(replayed["requested_peak_bytes"] - result["peak_bytes"]) <= 1e-4 * result["peak_bytes"]
    assert "DistributedDataParallel's construction on rank 0 of 2" in replayed["source"]
    refused = cli(wide, "--gpus", "2", "--sharding", "torch", "--lora-rank", "8", "--reserved")
    assert refused.exit_code == 2
    assert "--reserved replays DDP ranks that do not yet run LoRA" in refused.stderr


@needs_torch
def test_fp8_replays_torchao_s_layers(wide, cli):
    """The replayed step runs torchao's Float8Linear layers (eager), as the estimate's traced step does: its
    requested peak is the estimate's peak."""
    pytest.importorskip("torchao")
    result = cli(wide, "--precision", "bf16-pure", "--seq-len", "256", "--fp8", "tensorwise", "--reserved", "--json")
    data = result.json()
    replayed = data["per_gpu"]["allocator"]
    assert any(note.startswith("--fp8 tensorwise: the replay runs torchao's float8 layers") for note in replayed["notes"])
    assert abs(replayed["requested_peak_bytes"] - data["per_gpu"]["peak_bytes"]) <= 1e-4 * data["per_gpu"]["peak_bytes"]


@needs_torch
def test_fit_uses_the_predicted_reserve(wide, cli):
    args = (wide, "--precision", "bf16-pure", "--seq-len", "256", "--batch-size", "2", "--reserved", "--json")
    replayed = cli(*args).json()["per_gpu"]["allocator"]
    overhead = replayed["reserved_peak_bytes"] - replayed["requested_peak_bytes"]
    assert overhead > 0
    context = 512 * 2**20
    roomy = cli(*args, "--gpu-memory", f"{replayed['reserved_peak_bytes'] + context + 2**30}")
    fit = roomy.json()["fit"]
    assert roomy.exit_code == 0 and fit["fits"] and fit["allocator_reserve_predicted"]
    assert fit["allocator_reserve_bytes"] == overhead
    assert roomy.json()["per_gpu"]["allocator"]["num_alloc_retries"] == 0
    # what nvidia-smi would show: the replayed reserved peak and the context (one GPU: no NCCL buffers)
    assert fit["nvidia_smi_bytes"] == roomy.json()["per_gpu"]["reserved_peak_bytes"] + context
    assert roomy.json()["per_gpu"]["reserved_peak_bytes"] == replayed["reserved_peak_bytes"]
    # room for the tensors' peak and 1 MiB more: the allocator's rounding and cached segments do not fit in that
    tight = cli(*args, "--gpu-memory", f"{replayed['requested_peak_bytes'] + context + 2**20}")
    assert tight.exit_code == 6
    assert not tight.json()["fit"]["fits"]
    assert tight.json()["per_gpu"]["allocator"]["num_ooms"] == 1


@needs_torch
def test_a_named_card_adds_its_cublas_workspaces(wide, cli):
    """--gpu h100 (compute capability 9.0 in presets/gpus.json): two 32 MiB cuBLAS workspaces, one per thread running
    matmuls, replayed before the step; with --gpu-memory the card is not known and they are left out, said."""
    args = (wide, "--precision", "bf16-pure", "--seq-len", "256", "--reserved", "--json")
    named = cli(*args, "--gpu", "h100").json()["per_gpu"]["allocator"]
    unnamed = cli(*args, "--gpu-memory", "80GiB").json()["per_gpu"]["allocator"]
    assert named["cublas_workspace_bytes"] == 32 * 2**20 and unnamed["cublas_workspace_bytes"] is None
    assert named["requested_peak_bytes"] == unnamed["requested_peak_bytes"] + 2 * 32 * 2**20
    assert any("name the card with --gpu" in note for note in unnamed["notes"])
    # the placement the replay assumes is said with every replay (memcalc.allocator: each new segment below the last)
    assert all(any("placed below the earlier ones" in note for note in a["notes"]) for a in (named, unnamed))


@needs_torch
def test_alloc_conf_from_the_flag_and_the_environment(wide, cli, monkeypatch):
    args = (wide, "--precision", "bf16-pure", "--seq-len", "256", "--json")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    replayed = cli(*args, "--reserved").json()["per_gpu"]["allocator"]
    assert (replayed["alloc_conf"], replayed["alloc_conf_source"]) == ("expandable_segments:True",
                                                                     "PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")  # read before the older name, as torch does
    assert cli(*args, "--reserved").json()["per_gpu"]["allocator"]["alloc_conf_source"] == "PYTORCH_ALLOC_CONF"
    given = cli(*args, "--alloc-conf", "roundup_power2_divisions:4").json()["per_gpu"]["allocator"]
    assert (given["alloc_conf"], given["alloc_conf_source"]) == ("roundup_power2_divisions:4", "--alloc-conf")


@pytest.mark.parametrize(("args", "message"), [
    (("--alloc-conf", "max_split_size_mb:8"), "--alloc-conf 'max_split_size_mb:8': max_split_size_mb must be at least 20"),
    (("--alloc-conf", "expandable_segment:True"), "unknown option 'expandable_segment'"),
    (("--reserved", "--zero", "2", "--gpus", "2"), "--reserved replays one process's step"),
    (("--reserved", "--gpu", "h100", "--reserve-fraction", "0.1"), "give one"),
])
def test_bad_reserved_input_is_one_line(cli, args, message):
    result = cli("llama-3.2-1b", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_reserved_needs_a_model(cli):
    result = cli("--params", "7B", "--reserved")
    assert result.exit_code == 2 and "give a MODEL" in result.stderr


def test_reserved_without_torch_names_the_extra(cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = cli("llama-3.2-1b", "--reserved")
    assert result.exit_code == 7
    assert "--reserved traces the model's own step: install torch" in result.stderr


def test_environment_alloc_conf_errors_name_the_variable(cli, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    result = cli("llama-3.2-1b", "--reserved")
    assert result.exit_code == 2
    assert "the environment's PYTORCH_CUDA_ALLOC_CONF 'backend:cudaMallocAsync'" in result.stderr


def test_nf4_allocations_add_up_to_the_nf4_base():
    """A 4-bit layer's logged allocations (bitsandbytes' packed weight, absmax, nested absmax and codes) sum to the
    NF4 bytes the estimate counts, which tests/test_trainable.py checks against bitsandbytes' quantize_4bit."""
    torch = pytest.importorskip("torch")
    from memcalc.measure import qlora
    from memcalc.trainable import nf4_bytes

    for shape in ((4096, 4096), (14336, 4096), (10, 10)):
        for double in (True, False):
            layer = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
            layer.stored_dtype, layer.double_quant = torch.bfloat16, double
            parts = qlora.stored_parts(layer)
            assert sum(parts) == nf4_bytes(math.prod(shape), double)


@needs_torch
def test_max_batch_is_replayed_and_stepped_down_while_it_runs_out(wide, cli, monkeypatch):
    """--reserved --max-batch: the solver's answer is replayed within the GPU; where the replay runs out of memory
    the answer steps down, at most four replays (here the replay is made to run out above a chosen micro-batch, to
    follow the steps)."""
    from memcalc.measure import reserved

    real = reserved.predict_reserved
    asked: list[int] = []
    limit = {"batch": 0}

    def replay_running_out_above(raw, spec, *args, **kwargs):
        found = real(raw, spec, *args, **kwargs)
        asked.append(spec.micro_batch_size)
        if len(asked) > 1 and spec.micro_batch_size > limit["batch"]:  # (the first replay is the asked run's)
            found.num_ooms = 1
        return found

    monkeypatch.setattr(reserved, "predict_reserved", replay_running_out_above)
    args = (wide, "--precision", "bf16-pure", "--seq-len", "256", "--gpu-memory", "1GiB", "--max-batch", "--reserved",
            "--json")
    solved = cli(wide, "--precision", "bf16-pure", "--seq-len", "256", "--gpu-memory", "1GiB", "--max-batch",
                 "--json").json()["fit"]["max_micro_batch_size"]
    # the solver alone, with the assumed reserve and the two cuBLAS workspaces of a card given by its memory (2 x 32
    # MiB, deducted from the usable 1 GiB: 4 before they were); --reserved's replay holds its own workspaces instead
    assert solved == 3
    limit["batch"] = 2
    fit = cli(*args).json()["fit"]
    assert asked[1:] == [4, 3, 2]
    assert fit["max_micro_batch_size"] == 2
    assert "at 4, 3 it ran out of memory (fragmentation)" in fit["max_micro_batch_reason"]
    asked.clear()
    limit["batch"] = 0  # never fits: four replays, then the answer stands with a warning
    fit = cli(*args).json()["fit"]
    assert asked[1:] == [4, 3, 2, 1]
    assert "ran out of memory at micro-batch 4, 3, 2, 1: the answer above may not fit" in fit["max_micro_batch_reason"]


@pytest.mark.parametrize("text", ["expandable_segments:True\n\x1b[31m", "a" * 300, "max_split_size_mb:" + "x" * 300])
def test_hostile_alloc_conf_is_one_printable_line(cli, text):
    from tests.test_hostile_files import assert_one_line_error

    line = assert_one_line_error(cli("llama-3.2-1b", "--alloc-conf", text), 2, "--alloc-conf")
    assert len(line) < 400


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_the_qlora_log_holds_the_load_as_memcalc_load_counts_it(upcast, double_quant):
    """--reserved's log of a bitsandbytes QLoRA step starts with transformers' load (each 4-bit weight arriving in
    16-bit and quantized, the fp32 scratch of double quantization, PEFT's fp32 casts): its largest moment is the one
    memcalc.load counts (measured on real transformers + bitsandbytes loads, tests/test_load.py), to the byte."""
    pytest.importorskip("torch")
    import torch

    from memcalc import api
    from memcalc.allocator import parse_alloc_conf, replay
    from memcalc.measure import step as measured
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of
    from memcalc.spec import TrainingSpec
    from tests.tiny import tiny_raw

    raw = tiny_raw("llama")
    spec = TrainingSpec(lora_rank=8, qlora=True, qlora_upcast=upcast, qlora_double_quant=double_quant,
                        precision="bf16-pure", micro_batch_size=1, seq_len=8, activations="rules")
    loaded = api.run(model_of(ModelConfig("tiny", raw, "test")), spec).per_gpu.load
    weight_dtype = measured.resolve_setup(spec, traced=True).weight_dtype
    events, _loaded, _model = load_log(raw, spec, nf4=True, upcast=upcast and weight_dtype != torch.float32)
    peak = replay(tuple(events), parse_alloc_conf("")).requested_peak_bytes
    assert peak == loaded.peak_bytes, loaded.moment


@needs_torch
def test_reserved_after_the_load_is_the_weights_segments(cli, tmp_path):
    """The tiny Llama's weights (fp32; every tensor at most 115 KB, 0.8 MB in all) are small-pool blocks, which the
    allocator packs into 2 MiB segments (c10/cuda/CUDACachingAllocator.cpp get_allocation_size, kSmallBuffer): once
    loaded, one segment is reserved. The human output says it."""
    from tests.tiny import tiny_raw

    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_raw("llama")))
    common = (str(path), "--precision", "fp32", "--seq-len", "16", "--reserved")
    replayed = cli(*common, "--json").json()["per_gpu"]["allocator"]
    assert replayed["reserved_after_load_bytes"] == 2 * 2**20
    assert "reserved once the weights are built and loaded (before the first step): " in cli(*common).stdout


def test_the_cublas_workspaces_are_made_as_the_step_begins():
    """A handle's workspace is allocated at its first matmul, after the load (torch's CublasHandlePool.cpp through the
    caching allocator): a 100 MiB block the load freed holds both 32 MiB workspaces (split, the rest 36 MiB free), and
    nothing more is reserved; where the step's start is not known they come first, in segments of their own."""
    from memcalc.allocator import ALLOC, FREE, replay
    from memcalc.measure.reserved import StepAllocations, with_workspaces

    mib = 2**20
    events = ((ALLOC, 0, 100 * mib), (FREE, 0, 0), (ALLOC, 1, 10 * mib))
    at_step = StepAllocations(events, "", "", 0.0, {}, loaded=2, step=2)
    assert replay(with_workspaces(at_step, 32 * mib)).reserved_peak_bytes == 100 * mib
    unknown = StepAllocations(events, "", "", 0.0, {})
    assert replay(with_workspaces(unknown, 32 * mib)).reserved_peak_bytes == (32 + 32 + 100) * mib
