"""The load before the first step (memcalc.load): the estimate against real loads of the libraries on the CPU
(memcalc.measure.load), the paths modelled from code against their arithmetic, and how the load shows in a report."""

from __future__ import annotations

import json

import pytest

from memcalc import api
from memcalc.engine import estimate
from memcalc.errors import UsageError
from memcalc.model import ModelConfig
from memcalc.resolve import model_of
from memcalc.spec import TrainingSpec
from memcalc.vocab import EXTRA_LOAD_GATHERED, EXTRA_LOAD_UNIT, EXTRA_LOAD_UPCAST, TERM_WEIGHTS, Phase
from tests.tiny import GPT2, tiny_raw

# Llama-3-8B (presets/models: meta-llama/Meta-Llama-3-8B config.json): vocabulary and hidden size
VOCAB, HIDDEN, LLAMA3_8B_PARAMS = 128256, 4096, 8_030_261_248


def _raw(family: str, tied: bool) -> dict:
    raw = dict(GPT2) if family == "gpt2" else tiny_raw(family)
    raw["tie_word_embeddings"] = tied
    return raw


@pytest.mark.parametrize(("family", "tied", "fields"), [
    ("llama", False, {"precision": "bf16-pure"}),
    ("llama", True, {"precision": "amp-bf16"}),  # an fp32 load
    ("mixtral", False, {"precision": "bf16-pure"}),  # per-expert checkpoint tensors merged on load
    ("qwen2", False, {"lora_rank": 8, "qlora": True}),  # quantized on arrival, then PEFT's fp32 upcast
    ("gpt2", True, {"lora_rank": 8, "qlora": True, "qlora_upcast": False}),  # Conv1D weights copied to quantize
    ("llama", False, {"lora_rank": 8, "qlora": True, "qlora_double_quant": False, "qlora_scope": "lora-targets"}),
])
def test_load_peak_matches_a_real_load(family, tied, fields):
    """transformers' from_pretrained (bitsandbytes' 4-bit config and PEFT's prepare_model_for_kbit_training for
    QLoRA) of a checkpoint of the tiny config, tracked: the estimate's load peak within 0.1% of the measured one and
    never below it by more than that (108 loads in benchmarks/load.py: -0.082% to +0.000%; what is under is the
    model's buffers, rotary tables of a few hundred bytes, which no term counts). QLoRA reads one checkpoint tensor at
    a time: the host's peak is the largest tensor (written in fp32 here)."""
    pytest.importorskip("bitsandbytes")
    from memcalc.measure.load import measure

    raw, spec = _raw(family, tied), TrainingSpec(**fields)
    model = model_of(ModelConfig(family, raw, "tiny"))
    loaded = estimate(model, spec).per_gpu.load
    measured = measure(raw, spec)
    error = (loaded.peak_bytes - measured.peak_bytes) / measured.peak_bytes
    assert -0.001 <= error <= 0.001, (loaded.peak_bytes, measured.peak_bytes, loaded.moment)
    if spec.qlora:
        assert measured.host_peak_bytes == max(t.numel for t in model.tensors) * 4


def test_zero3_load_gathers_the_largest_module_whole():
    """transformers' _load_state_dict_into_zero3_model: each module's own parameters gathered whole on every rank
    while rank 0 copies them in; Llama-3-8B's largest module is the token embedding, V x h in bf16 beside the
    rank's partitions."""
    report = api.estimate("llama-3-8b", zero=3, gpus=8, precision="bf16")
    loaded = report.per_gpu.load
    assert loaded.path == "zero3" and "model.embed_tokens" in loaded.moment
    assert loaded.breakdown == {TERM_WEIGHTS: report.term(TERM_WEIGHTS).bytes, EXTRA_LOAD_GATHERED: VOCAB * HIDDEN * 2}
    assert loaded.peak_bytes == sum(loaded.breakdown.values())


def test_fsdp2_load_moves_each_unit_whole_before_sharding_it():
    """accelerate's fsdp2_prepare_model: every process loads the model on the host in bf16 and casts the trainable
    parameters to fp32 there (mixed precision), then fully_shard moves each unit whole to the GPU; the last unit is
    the final norm with the head (h + V x h, fp32), beside every fp32 shard made so far (the weights term). The host
    holds the fp32 model and, at the last cast, the head's bf16 copy too, in each of the node's 8 processes."""
    report = api.estimate("llama-3-8b", fsdp=True, nodes=2, gpus_per_node=8, precision="bf16")
    loaded = report.per_gpu.load
    assert loaded.path == "fsdp2" and "lm_head" in loaded.moment
    assert loaded.breakdown == {TERM_WEIGHTS: report.term(TERM_WEIGHTS).bytes,
                                EXTRA_LOAD_UNIT: (HIDDEN + VOCAB * HIDDEN) * 4}
    assert loaded.host_bytes == LLAMA3_8B_PARAMS * 4 + VOCAB * HIDDEN * 2
    assert loaded.host_bytes_per_node == 8 * loaded.host_bytes


@pytest.mark.parametrize(("model", "gpus", "precision"), [("llama-3-8b", 8, "bf16"), ("gemma-2-9b", 8, "bf16-pure")])
def test_fsdp2_load_matches_fully_shard_on_the_fake_process_group(model, gpus, precision):
    """Each unit made whole on the device, then torch's own fully_shard shards it, one rank of the fake process group
    at full size: the estimate's load peak to the byte (a tied head too: the tail unit holds the embedding; Gemma-2's
    2-byte residue is a scalar buffer), and what is left is the rank's shards, the step's weights term."""
    pytest.importorskip("torch")
    from memcalc.measure.load import measure_fsdp2

    found = api.model_input(model, None)
    spec = TrainingSpec(precision=precision, num_gpus=gpus, sharding="fsdp", zero_stage=3)
    report = estimate(found, spec)
    measured = measure_fsdp2(found.config, spec)
    assert abs(report.per_gpu.load.peak_bytes - measured.peak_bytes) <= 2
    assert abs(measured.end_bytes - report.term(TERM_WEIGHTS).bytes) <= 2


def test_ram_efficient_fsdp2_load_matches_accelerate_on_the_fake_process_group():
    """accelerate's cpu_ram_efficient_loading: the units sharded on the meta device, then accelerate's own
    fsdp2_load_full_state_dict sends each parameter whole (rank 1 of 4, GPT-2: a tied head, the embedding sent once
    more at the end; 50,257 rows that 4 ranks do not divide, so distribute_tensor's padded chunk too): the estimate's
    load peak to the byte. Only the main process holds the model on the host."""
    pytest.importorskip("accelerate")
    from memcalc.measure.load import measure_fsdp2

    found = api.model_input("gpt2", None)
    spec = TrainingSpec(precision="bf16", num_gpus=4, sharding="fsdp", zero_stage=3, cpu_ram_efficient_loading=True)
    loaded = estimate(found, spec).per_gpu.load
    assert loaded.moment == "lm_head.weight (tied) broadcast whole"
    assert loaded.peak_bytes == measure_fsdp2(found.config, spec, rank=1).peak_bytes
    assert loaded.host_bytes_per_node == loaded.host_bytes
    with pytest.raises(UsageError, match="accelerate's FSDP loading"):
        TrainingSpec(num_gpus=4, zero_stage=3, cpu_ram_efficient_loading=True)


def test_each_process_of_a_node_holds_the_whole_model_on_the_host():
    """HF Trainer's load without a device_map: the model on the host in the recipe's weight dtype (fp32 under
    amp-bf16), in each of the node's processes; the GPU holds the weights and nothing beside them, below the step."""
    report = api.estimate("llama-3-8b", sharding="torch", gpus=8, precision="amp-bf16")
    loaded, per_gpu = report.per_gpu.load, report.per_gpu
    assert loaded.path == "host-then-gpu"
    assert loaded.peak_bytes == report.term(TERM_WEIGHTS).bytes == LLAMA3_8B_PARAMS * 4
    assert loaded.host_bytes_per_node == 8 * LLAMA3_8B_PARAMS * 4
    assert per_gpu.peak_phase != Phase.load and all(p.phase != Phase.load for p in per_gpu.phases)


def test_a_load_above_the_step_is_the_runs_peak():
    """QLoRA on Llama-3-8B at 128 tokens, checkpointed: PEFT's fp32 cast of the head (the last parameter) holds its
    bf16 copy beside the fp32 base, V x h x 2 B above the base, more than the short step adds. The load is then the
    peak, a phase of its own, and what the fit checks; the verify comparison keeps the step's peak."""
    report = api.estimate("llama-3-8b", lora_rank=16, qlora=True, seq_len=128, checkpointing="full",
                          activations="rules", gpu="rtx-4090")
    per_gpu, loaded = report.per_gpu, report.per_gpu.load
    assert loaded.path == "qlora" and loaded.moment == "lm_head.weight cast to fp32"
    assert loaded.breakdown[EXTRA_LOAD_UPCAST] == VOCAB * HIDDEN * 2
    assert per_gpu.peak_phase == Phase.load and per_gpu.phases[0].phase == Phase.load
    assert per_gpu.peak_bytes == loaded.peak_bytes > per_gpu.step_peak().bytes
    assert report.fit.peak_bytes == loaded.peak_bytes
    data = json.loads(report.to_json())
    assert data["per_gpu"]["peak_phase"] == "load" and data["per_gpu"]["load"]["path"] == "qlora"


def test_the_load_line_and_its_explanation(cli):
    out = cli("llama-3-8b", "--lora-rank", "16", "--qlora", "--seq-len", "128", "--checkpointing", "full",
              "--activations", "rules", "--explain").stdout
    assert "load (before step 1):" in out and "the run's peak" in out
    assert "prepare_model_for_kbit_training" in out
    out = cli("llama-3-8b").stdout
    assert "load (before step 1):" in out and "below the step's" in out
    # every process of a node holds the model on the host, unless accelerate's ram-efficient loading is on
    out = " ".join(cli("llama-3-8b", "--fsdp", "--nodes", "2", "--gpus-per-node", "8").stdout.split())
    # 8,030,261,248 params x 4 B (fp32 after accelerate's cast) + the head's 16-bit copy at the last cast, x 8
    assert "host RAM 30.89 GiB per process, 247.15 GiB per node of 8" in out
    out = " ".join(cli("llama-3-8b", "--fsdp", "--nodes", "2", "--gpus-per-node", "8",
                       "--cpu-ram-efficient-loading").stdout.split())
    assert "host RAM 30.89 GiB in the main process only" in out
