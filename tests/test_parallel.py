"""Many GPUs: ZeRO stages as DeepSpeed runs them, offload, FSDP2 and torch sharding, and their CLI flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memcalc.api import model_input, run
from memcalc.errors import UsageError
from memcalc.families import inventory as build_inventory
from memcalc.parallel import fsdp2_shard_numel, zero12_partition_numel, zero_redundancy_partition
from memcalc.spec import TrainingSpec

LLAMA3_8B = 8_030_261_248  # exact count of the preset (tests/test_seeds.py)


def _terms(report) -> dict[str, int]:
    return {t.name: t.bytes for t in report.per_gpu.terms}


def test_zero12_partition_padding():
    # flatten_dense_tensors_aligned pads to 2 x world size: 10 elements on 4 GPUs -> 16 -> 4 each.
    assert zero12_partition_numel(10, 4) == 4
    assert zero12_partition_numel(16, 4) == 4
    assert zero12_partition_numel(17, 4) == 6


def test_zero2_reduce_bucket_is_named_and_sized_by_the_config():
    model = model_input("llama-3-8b", None)
    report = run(model, TrainingSpec(zero_stage=2, num_gpus=8))
    terms = _terms(report)
    assert terms["zero_reduce_bucket"] == 500_000_000 * 2  # DeepSpeed's default reduce_bucket_size, bf16
    assert terms["gradients"] == 2 * zero12_partition_numel(LLAMA3_8B, 8)


def test_zero3_fp32_grad_buffer_and_persistence_threshold():
    model = model_input("llama-3-8b", None)
    report = run(model, TrainingSpec(zero_stage=3, num_gpus=8))
    terms = _terms(report)
    tensors = build_inventory(model.config)
    small = [t for t in tensors if t.numel <= 100_000]  # norms stay whole on every GPU
    expected_shard = sum(t.numel if t.numel <= 100_000 else math.ceil(t.numel / 8) for t in tensors)
    assert terms["weights"] == 2 * expected_shard and small
    # The step's fp32 gradient of one optimizer sub-group: DeepSpeed 0.19.8's own sub-grouping of this rank's
    # partition (sub-groups close once they reach sub_group_size, 1e9 by default), run by scripts/peer_figures.py.
    peer = json.loads((Path(__file__).parent / "fixtures" / "peer_figures.json").read_text())
    deepspeed = next(case for case in peer["deepspeed_zero3_sub_groups"]["models"]
                     if (case["preset"], case["num_gpus"], case["sub_group_size"]) == ("llama-3-8b", 8, 10**9))
    assert terms["zero3_fp32_grad_buffer"] == 4 * deepspeed["largest_sub_group_numel"]
    assert "fp32_grad_copy" not in terms  # the buffer is the fp32 gradient: no per-step cast


def test_offload_moves_master_and_states_to_cpu():
    model = model_input("llama-3-8b", None)
    on_gpu = run(model, TrainingSpec(zero_stage=2, num_gpus=8))
    offloaded = run(model, TrainingSpec(zero_stage=2, num_gpus=8, offload="optimizer"))
    cpu = {t.name: t.bytes for t in offloaded.per_gpu.terms if t.category == "cpu_offload"}
    gpu = _terms(on_gpu)
    assert cpu["master_weights"] == gpu["master_weights"] and cpu["optimizer_states"] == gpu["optimizer_states"]
    assert offloaded.per_gpu.cpu_offload_bytes == sum(cpu.values())
    assert offloaded.totals.cpu_offload_bytes_per_node == 8 * offloaded.per_gpu.cpu_offload_bytes
    assert offloaded.per_gpu.peak_bytes < on_gpu.per_gpu.peak_bytes


def test_offload_gradients_follow_deepspeed_per_stage():
    """Where the gradients live with offload_optimizer, read from deepspeed 0.19.8:
    stage 2: copy_grads_in_partition sends each reduced gradient to the fp32 CPU partition, so none stay on the GPU;
    stage 1: every p.grad lives through backward and is cleared by the epilogue before the step;
    stage 3: grad_partitions_flat_buffer is allocated on self.device, the CPU with offload.
    Stages 1 and 2 also keep temp_grad_buffer_for_gpu_offload, sized by the largest parameter, on the GPU."""
    model = model_input("llama-3-8b", None)
    largest = 128_256 * 4_096  # embed_tokens (and the untied lm_head): vocab_size x hidden_size of the config
    by_stage = {stage: run(model, TrainingSpec(zero_stage=stage, num_gpus=8, offload="optimizer"))
                for stage in (1, 2, 3)}
    terms = {stage: {t.name: t for t in report.per_gpu.terms} for stage, report in by_stage.items()}
    assert terms[2]["gradients"].bytes == 0
    assert terms[1]["gradients"].bytes == 2 * LLAMA3_8B and terms[1]["gradients"].phases == ["backward"]
    assert terms[3]["gradients"].category == "cpu_offload" and terms[3]["gradients"].phases == []
    for stage in (1, 2):
        assert terms[stage]["zero_offload_grad_buffer"].bytes == 2 * largest
    assert "zero_offload_grad_buffer" not in terms[3]


def test_zero1_offload_gradients_build_up_through_backward():
    """ZeRO-1-Offload keeps p.grad on the GPU during backward only: the gradients appear as backward runs, so
    the start of backward (beside every activation) holds none of them, and its end holds them all."""
    model = model_input("llama-3-8b", None)
    report = run(model, TrainingSpec(zero_stage=1, num_gpus=8, offload="optimizer", seq_len=512))
    backward = next(p for p in report.per_gpu.phases if p.phase.value == "backward")
    assert backward.moment == "end of backward"
    assert "gradients" in backward.breakdown and "activations" not in backward.breakdown


def test_fsdp2_shards_dim0_with_padding():
    assert fsdp2_shard_numel((10, 3), 4) == 3 * 3  # ceil(10 / 4) = 3 rows
    assert fsdp2_shard_numel((4096,), 8) == 512
    model = model_input("llama-3-8b", None)
    report = run(model, TrainingSpec(sharding="fsdp", zero_stage=3, num_gpus=8))
    tensors = build_inventory(model.config)
    shard = sum(fsdp2_shard_numel(t.shape, 8) for t in tensors)
    terms = _terms(report)
    assert terms["weights"] == 4 * shard  # fp32 shards under MixedPrecisionPolicy (bf16 recipe)
    assert terms["gradients"] == 4 * shard  # reduced in fp32
    assert "master_weights" not in terms
    kept = run(model, TrainingSpec(sharding="fsdp", zero_stage=2, num_gpus=8))
    assert _terms(kept)["fsdp_unsharded_params"] == 2 * sum(t.numel for t in tensors)  # nothing resharded


def test_zero_redundancy_optimizer_partitions_whole_parameters():
    tensors = build_inventory(model_input("gpt2", None).config)
    ranks = zero_redundancy_partition(tensors, 4)
    assert sorted(t.name for rank in ranks for t in rank) == sorted(t.name for t in tensors)
    loads = [sum(t.numel for t in rank) for rank in ranks]
    assert max(loads) >= sum(loads) / 4  # unbalanced: whole parameters
    report = run(model_input("gpt2", None), TrainingSpec(sharding="torch", zero_stage=1, num_gpus=4, precision="fp32"))
    assert _terms(report)["optimizer_states"] == 8 * max(loads)
    assert any("most loaded rank" in n for n in report.notes)


@pytest.mark.parametrize(("spec", "needle"), [
    ({"offload": "optimizer"}, "needs ZeRO"),
    ({"offload": "params", "zero_stage": 2, "num_gpus": 8}, "zero 3"),
    ({"sharding": "fsdp", "zero_stage": 1, "num_gpus": 8}, "zero 3"),
    ({"sharding": "torch", "zero_stage": 3, "num_gpus": 8}, "fsdp"),
    ({"num_gpus": 12, "num_nodes": 5}, "not divisible"),
])
def test_bad_parallel_combinations(spec, needle):
    with pytest.raises(UsageError, match=needle):
        TrainingSpec(**spec)


def test_cli_nodes_and_gpus_per_node(cli):
    data = cli("llama-3-8b", "--zero", "3", "--nodes", "2", "--gpus-per-node", "8", "--offload", "optimizer", "--json").json()
    assert data["training"]["num_gpus"] == 16 and data["training"]["num_nodes"] == 2
    assert data["totals"]["cpu_offload_bytes_per_node"] == 8 * data["per_gpu"]["cpu_offload_bytes"]
    bad = cli("llama-3-8b", "--gpus", "10", "--nodes", "2", "--gpus-per-node", "8")
    assert bad.exit_code == 2 and "--gpus-per-node" in bad.stderr


def test_cli_deepspeed_config(cli, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2,
                                  "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    data = cli("llama-3-8b", "--gpus", "8", "--deepspeed", str(config), "--json").json()
    assert data["training"]["zero_stage"] == 3 and data["training"]["micro_batch_size"] == 2
    assert any("auto" in note for note in data["notes"])
    bucket = next(t for t in data["per_gpu"]["terms"] if t["name"] == "zero_reduce_bucket")
    assert bucket["bytes"] == 4096 * 4096 * 2  # HF "auto": hidden_size**2 elements, bf16
    conflict = cli("llama-3-8b", "--gpus", "8", "--zero", "2", "--deepspeed", str(config))
    assert conflict.exit_code == 2 and "contradicts" in conflict.stderr
    config.write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "bogus": 1}')
    bad = cli("llama-3-8b", "--gpus", "8", "--deepspeed", str(config))
    assert bad.exit_code == 4 and len(bad.stderr.strip().splitlines()) == 1


def test_cli_emit_and_compare(cli):
    emitted = cli("llama-3-8b", "--gpu", "h100-80gb", "--emit", "deepspeed")
    assert emitted.exit_code == 0
    config = json.loads(emitted.stdout)
    # The fit advisor's cheapest fitting change DeepSpeed can express (no LoRA, no pure bf16): ZeRO-Offload of
    # the optimizer, which fits one H100 now that offload applies on a single GPU.
    assert "--zero 2 --offload optimizer" in emitted.stderr
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu" and config["bf16"]["enabled"] is True
    compared = cli("llama-3-8b", "--gpus", "8", "--zero", "3", "--compare-with", "deepspeed", "--json").json()
    assert compared["tool"] == "deepspeed" and any(r["term"] == "optimizer states" for r in compared["rows"])
    accelerate = cli("llama-3-8b", "--compare-with", "accelerate", "--json")
    assert accelerate.exit_code == 0
    assert cli("llama-3-8b", "--emit", "yaml").exit_code == 2


def test_zero3_reuse_distance_is_named_as_not_counted_unless_it_is_0():
    """deepspeed 0.19.8 partitioned_param_coordinator.py __params_to_release keeps a module's parameters gathered
    when they are used again within max_reuse_distance elements: not modelled, so the report says so and how much
    it can add (min(all params, distance) x 2 B); with the distance 0 every module is released."""
    from memcalc.spec import ZeroBuffers

    model = model_input("llama-3-8b", None)
    default = run(model, TrainingSpec(zero_stage=3, num_gpus=8))
    note = next(n for n in default.notes if "stage3_max_reuse_distance" in n)
    # deepspeed_defaults: max_reuse_distance pp_int(1e9) elements, below Llama-3-8B's 8.03e9; bf16: 2e9 B = 1.86 GiB
    assert "up to 1.86 GiB" in note
    released = run(model, TrainingSpec(zero_stage=3, num_gpus=8, zero_buffers=ZeroBuffers(stage3_max_reuse_distance=0)))
    assert not any("stage3_max_reuse_distance" in n for n in released.notes)
