"""HSDP, hybrid sharding (--dp-replicate R): FSDP2's fully_shard on a (dp_replicate, dp_shard) mesh shards over the
dp / R ranks of a replica and all-reduces each unit's sharded gradients across the R replicas, in place on the
reduce-scatter output (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py foreach_reduce). So one rank holds
what FSDP2 over dp / R ranks holds, nothing more.

Hand derivations below; the gloo test measures 4 ranks (2 replicas x 2 shards) of a tiny Llama and checks each rank's
model states against the shards by hand and the estimate's peak against the busiest rank.
"""

from __future__ import annotations

import math

import pytest

import memcalc
from memcalc.errors import UsageError

# Llama-3-70B (presets/models: meta-llama/Meta-Llama-3-70B config.json): hidden 8192, MLP 28672, 80 layers, 64 heads
# of 128, 8 kv heads, vocabulary 128,256, untied head. Every tensor's first dimension divides by 8 (and 16), so FSDP2's
# dim-0 shards carry no padding and a rank's shard is exactly N / ranks.
H, I, L, KV, V = 8192, 28672, 80, 1024, 128256
LAYER = 2 * H * H + 2 * KV * H + 3 * H * I + 2 * H  # q, o; k, v; gate, up, down; two norms
N_70B = L * LAYER + 2 * V * H + H  # + embedding, head, final norm
assert N_70B == 70_553_706_496


def _terms(report) -> dict[str, int]:
    return {t.name: t.bytes for t in report.per_gpu.terms}


def test_a_rank_holds_fsdp2_shards_over_one_replica():
    """16 GPUs, R = 2: shards over 8. --precision bf16 under FSDP2 is fp32 shards (the master), fp32 gradients, AdamW's
    two fp32 states: 4 + 4 + 8 bytes per parameter of the shard."""
    hsdp = _terms(memcalc.estimate("llama-3-70b", fsdp=True, gpus=16, dp_replicate=2))
    assert hsdp["weights"] == 4 * N_70B // 8
    assert hsdp["gradients"] == 4 * N_70B // 8
    assert hsdp["optimizer_states"] == 8 * N_70B // 8
    flat = _terms(memcalc.estimate("llama-3-70b", fsdp=True, gpus=16))
    assert flat["weights"] == 4 * N_70B // 16  # (without R: shards over all 16, half the bytes)


def test_torchtune_replicate_dim_raises_the_70b_estimate():
    """The audit's case: torchtune's 70B full fine-tune on 16 GPUs with data_parallel_replicate_dim 2 was estimated as
    FSDP over 16; each rank holds shards over 8, and every unit's unsharded layer is the same whole layer, so the
    peak rises by exactly the model states' second half: (4 + 4 + 8) x N / 16 bytes."""
    settings = {"fsdp": True, "precision": "bf16", "checkpointing": "full", "batch_size": 2, "gpus": 16}
    before = memcalc.estimate("llama-3-70b", **settings).per_gpu
    after = memcalc.estimate("llama-3-70b", dp_replicate=2, **settings).per_gpu
    on_8 = memcalc.estimate("llama-3-70b", **{**settings, "gpus": 8}).per_gpu
    assert after.model_states_bytes - before.model_states_bytes == 16 * N_70B // 16
    assert after.peak_bytes == on_8.peak_bytes
    print(f"\nLlama-3-70B, 16 GPUs, full checkpointing, batch 2: FSDP over 16 {before.peak_bytes / 2**30:.2f} GiB, "
          f"HSDP 2 x 8 {after.peak_bytes / 2**30:.2f} GiB")


def test_replicas_over_nodes_is_one_replica_per_node():
    report = memcalc.estimate("llama-3-8b", fsdp=True, gpus=16, nodes=2, dp_replicate="nodes")
    assert report.training.dp_replicate == 2
    # the nodes --gpus and --gpus-per-node make (before, read as --nodes' default 1: one replica, silently)
    given = memcalc.estimate("llama-3-8b", fsdp=True, gpus=16, gpus_per_node=8, dp_replicate="nodes")
    assert given.training.dp_replicate == 2 and given.per_gpu.peak_bytes == report.per_gpu.peak_bytes
    shard = memcalc.estimate("llama-3-8b", fsdp=True, gpus=16, gpus_per_node=8, dp_shard=8)
    assert shard.training.dp_replicate == 2


def test_more_gpus_are_not_offered_under_hsdp_and_other_tools_are_not_compared(cli):
    """More GPUs under HSDP are more replicas of the same shard group: a rank holds what it held, so the fit advisor
    offers none (before, '--gpus 32' was suggested at FSDP-over-32's peak, which the HSDP run does not reach)."""
    report = memcalc.estimate("llama-3-70b", fsdp=True, gpus=16, dp_shard=8, gpu="h100-80gb", checkpointing="full")
    assert not report.fit.fits
    assert not any("num_gpus" in s.spec_changes for s in report.fit.suggestions)
    refused = cli("llama-3-8b", "--fsdp", "--gpus", "16", "--dp-replicate", "2", "--compare-with", "deepspeed")
    assert refused.exit_code == UsageError.exit_code and "shards over one replica's" in refused.stderr


@pytest.mark.parametrize("settings,message", [
    ({"gpus": 16, "dp_replicate": 2}, "dp_replicate is FSDP2's hybrid sharding"),
    ({"gpus": 16, "zero": 3, "dp_replicate": 2}, "add fsdp"),
    ({"gpus": 12, "fsdp": True, "dp_replicate": 8}, "gpus 12 is not divisible by tp x pp x dp_replicate = 8"),
    ({"gpus": 16, "fsdp": True, "tp": 2, "dp_replicate": 3}, "not divisible"),
    ({"gpus": 16, "fsdp": True, "cp": 4, "seq_len": 4096, "dp_replicate": 8}, "tp x pp x cp x dp_replicate = 32"),
    ({"gpus": 16, "fsdp": True, "dp_replicate": "two"}, "whole number of replicas"),
    ({"gpus": 16, "fsdp": True, "dp_replicate": 0}, "between 1 and"),
])
def test_unmodelled_or_impossible_layouts_are_one_line(settings, message):
    with pytest.raises(UsageError, match=message):
        memcalc.estimate("llama-3-8b", **settings)


def test_with_experts_it_is_refused():
    with pytest.raises(UsageError, match="dp_replicate with ep is not modelled"):
        memcalc.estimate("mixtral-8x7b", gpus=16, fsdp=True, ep=2, dp_replicate=2)


def test_cli_flag_and_exit_code(cli):
    result = cli("llama-3-8b", "--gpus", "16", "--dp-replicate", "2")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--dp-replicate is FSDP2's hybrid sharding" in result.stderr
    result = cli("llama-3-8b", "--gpus", "16", "--fsdp", "--dp-replicate", "2", "--json")
    assert result.exit_code == 0
    assert result.json()["training"]["dp_replicate"] == 2


def test_the_planner_leaves_replicas_to_the_user():
    with pytest.raises(UsageError, match="plan chooses the layout itself: drop dp_replicate"):
        memcalc.layouts("llama-3-8b", gpus=16, gpu="h100-80gb", fsdp=True, dp_replicate=2)


def test_nccl_has_a_shard_group_and_a_replicate_group():
    """2 nodes of 8: the shard group is a node's 8 GPUs (stride 1), the replicate group 2 GPUs 8 apart, one per node."""
    report = memcalc.estimate("llama-3-8b", fsdp=True, gpus=16, nodes=2, dp_replicate=2, gpu="h100-80gb")
    groups = {c.group: (c.ranks, c.local_ranks) for c in report.fit.nccl_communicators}
    assert groups["data-parallel shard (HSDP)"] == (8, 8)
    assert groups["data-parallel replicate (HSDP)"] == (2, 1)
    assert "data-parallel" not in groups


# -- measured: 4 gloo ranks, (dp_replicate 2, dp_shard 2) -------------------------------------------------------
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1001,
}
# The tiny Llama's tensors (transformers' LlamaForCausalLM, untied head): (dim0, elements per row)
TINY_SHAPES = ([(1001, 64)] + 2 * [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128), (64, 1),
                                   (64, 1)] + [(64, 1), (1001, 64)])
assert sum(d * r for d, r in TINY_SHAPES) == 202_176
WORLD, REPLICAS = 4, 2
SHARD = WORLD // REPLICAS
TOLERANCE_PCT = 0.1


def _shard_rows(dim0: int, shard_rank: int) -> tuple[int, int]:
    """(padded rows every rank stores, rows really this rank's): torch.chunk over the SHARD ranks of a replica."""
    chunk = -(-dim0 // SHARD)
    return chunk, max(0, min(chunk, dim0 - shard_rank * chunk))


def _measure():
    """The ranks, FSDP2 over gloo releasing a finished collective's buffers late at a moment that varies: the lowest
    of runs taken until two agree (tests/test_verify_distributed.py fsdp2_gloo_ranks)."""
    from memcalc.measure.distributed import measure_distributed
    from memcalc.model import ModelConfig
    from tests.test_verify_distributed import fsdp2_gloo_ranks

    tiny = ModelConfig(name="tiny-llama", raw=TINY_LLAMA, source="test")
    return fsdp2_gloo_ranks(lambda: measure_distributed(tiny, _spec(), engine="fsdp2", world_size=WORLD,
                                                        method="gloo"))


def _spec():
    from memcalc.spec import TrainingSpec

    return TrainingSpec(precision="bf16", optimizer="adamw", optim_impl="foreach", micro_batch_size=2, seq_len=32,
                        sharding="fsdp", zero_stage=3, num_gpus=WORLD, dp_replicate=REPLICAS)


def test_gloo_ranks_of_two_replicas_hold_shards_over_two_and_the_estimate_meets_the_busiest():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from memcalc.api import model_of, run
    from memcalc.model import ModelConfig
    from tests.conftest import shared_measurement

    ranks = shared_measurement("test_hsdp-gloo-2x2-bf16", _measure)
    report = run(model_of(ModelConfig(name="tiny-llama", raw=TINY_LLAMA, source="test")), _spec())
    estimate = report.per_gpu
    flat = run(model_of(ModelConfig(name="tiny-llama", raw=TINY_LLAMA, source="test")),
               _spec().replace(dp_replicate=1)).per_gpu
    print(f"\nHSDP 2 x 2 gloo ranks, tiny Llama bf16 (fp32 shards), AdamW, 2 x 32 tokens: estimate "
          f"{estimate.peak_bytes:,} B ({estimate.peak_phase.value})")
    for m in ranks:
        info = m.run["distributed"]
        rank = info["rank"]
        assert (info["dp_replicate"], info["dp_shard"]) == (REPLICAS, SHARD)
        # mesh (2, 2): rank r is replica r // 2, shard r % 2
        padded = sum(_shard_rows(d, rank % SHARD)[0] * r for d, r in TINY_SHAPES)
        mine = sum(_shard_rows(d, rank % SHARD)[1] * r for d, r in TINY_SHAPES)
        assert m.model_state_bytes["weights"] == 4 * padded  # fp32 shards (MixedPrecisionPolicy: bf16 compute)
        assert m.model_state_bytes["gradients"] == 4 * padded  # the reduce-scatter output, all-reduced in place
        assert m.model_state_bytes["optimizer_states"] == 2 * 4 * mine
        error = 100 * (estimate.peak_bytes - m.measured_peak_bytes) / m.measured_peak_bytes
        print(f"  rank {rank} (replica {rank // SHARD}, shard {rank % SHARD}): measured {m.measured_peak_bytes:,} B "
              f"({m.measured_peak_phase}), estimate error {error:+.3f}%")
    busiest = max(ranks, key=lambda m: m.measured_peak_bytes)
    error = 100 * (estimate.peak_bytes - busiest.measured_peak_bytes) / busiest.measured_peak_bytes
    assert abs(error) <= TOLERANCE_PCT
    assert estimate.peak_phase.value == busiest.measured_peak_phase
    assert _terms(report)["weights"] == busiest.model_state_bytes["weights"]
    # FSDP over all 4 ranks (R ignored) is far below what a rank of the 2 x 2 mesh holds
    low = 100 * (flat.peak_bytes - busiest.measured_peak_bytes) / busiest.measured_peak_bytes
    print(f"  counted as FSDP2 over {WORLD} ranks: {flat.peak_bytes:,} B ({low:+.1f}%)")
    assert low < -10
    assert math.isclose(sum(m.measured_peak_bytes for m in ranks[:SHARD]),
                        sum(m.measured_peak_bytes for m in ranks[SHARD:]), rel_tol=1e-3)  # the replicas alike


# -- trainers' configs (--from) ------------------------------------------------------------------------------------
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "trainers"


def _config(tmp_path, fixture: str, *, append: str = "", replace: tuple[str, str] | None = None) -> str:
    text = (FIXTURES / fixture).read_text()
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / fixture
    path.write_text(text + append)
    return str(path)


def test_torchtune_data_parallel_replicate_dim(tmp_path):
    pytest.importorskip("yaml")
    from memcalc.configs.trainers import read_trainer_config

    path = _config(tmp_path, "torchtune_llama3_2_3B_full.yaml", append="\ndata_parallel_replicate_dim: 2\n")
    config = read_trainer_config(path, None)
    assert "data_parallel_replicate_dim" not in config.ignored
    report = memcalc.estimate(from_config=path, gpus=8)
    assert (report.training.dp_replicate, report.training.sharding) == (2, "fsdp")
    # torchtune's bf16 (pure): 2 B weights; Llama-3.2-3B's dims all divide by 4 but the vocabulary (128,256 = 4 x
    # 32,064): shards over 4, the tied embedding once
    assert _terms(report)["weights"] == 2 * 3_212_749_824 // 4


def test_torchtune_data_parallel_shard_dim_leaves_the_rest_as_replicas(tmp_path):
    pytest.importorskip("yaml")
    path = _config(tmp_path, "torchtune_llama3_2_3B_full.yaml",
                   append="\nfsdp_reshard_after_forward: True\ndata_parallel_shard_dim: 4\n")
    assert memcalc.estimate(from_config=path, gpus=16).training.dp_replicate == 4


@pytest.mark.parametrize("append,gpus,replicas", [("\ndp_replicate_size: 2\n", 16, 2), ("\ndp_shard_size: 4\n", 16, 4),
                                                  ("\ndp_replicate_size: 1\ndp_shard_size: 8\n", 16, 2)])
def test_axolotl_dp_replicate_and_shard_sizes(tmp_path, append, gpus, replicas):
    pytest.importorskip("yaml")
    from memcalc.configs.trainers import read_trainer_config

    path = _config(tmp_path, "axolotl_fft-8b-liger-fsdp.yaml", append=append)
    config = read_trainer_config(path, None)
    assert not {"dp_replicate_size", "dp_shard_size"} & set(config.ignored)
    report = memcalc.estimate("llama-3-8b", from_config=path, gpus=gpus, activations="rules")
    assert report.training.dp_replicate == replicas


def test_fsdp1_hybrid_shard_is_a_replica_per_node(tmp_path):
    pytest.importorskip("yaml")
    path = _config(tmp_path, "axolotl_fft-8b-liger-fsdp.yaml",
                   replace=("fsdp_sharding_strategy: FULL_SHARD", "fsdp_sharding_strategy: HYBRID_SHARD"))
    two_nodes = memcalc.estimate("llama-3-8b", from_config=path, gpus=16, nodes=2, activations="rules")
    assert two_nodes.training.dp_replicate == 2
    assert memcalc.estimate("llama-3-8b", from_config=path, gpus=8, activations="rules").training.dp_replicate == 1


def test_the_load_shards_over_one_replica_too():
    """accelerate's fsdp2_prepare_model shards each unit on the (dp_replicate, dp_shard_cp) mesh: the shards kept while
    the next unit arrives whole are a replica's (memcalc.load's FSDP2 path)."""
    hsdp = memcalc.estimate("llama-3-8b", fsdp=True, gpus=16, dp_replicate=2).per_gpu.load
    on_8 = memcalc.estimate("llama-3-8b", fsdp=True, gpus=8).per_gpu.load
    on_16 = memcalc.estimate("llama-3-8b", fsdp=True, gpus=16).per_gpu.load
    assert hsdp.peak_bytes == on_8.peak_bytes > on_16.peak_bytes
