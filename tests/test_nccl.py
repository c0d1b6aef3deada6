"""NCCL's buffers per communicator (memcalc.nccl): each figure derived by hand from NCCL's constants (NVIDIA/nccl
v2.30.7: init.cc DEFAULT_*_BUFFSIZE, p2p.cc p2pSendSetup/p2pRecvSetup, channel.cc initChannel, nvls.cc), or a
published reading (the issue each cites)."""

from __future__ import annotations

import json

import pytest

from memcalc import api, nccl
from memcalc.spec import TrainingSpec

MIB = 2**20
H100 = nccl.CHANNELS[("nvswitch", "9.0")]
A100 = nccl.CHANNELS[("nvswitch", "8.0")]


def _mib(parts) -> dict[str, float]:
    return {what: b / MIB for what, b in parts}


def test_a_connection_holds_what_nvidia_nccl_1685_saw_allocated():
    """Over NVLink on an H100 the receiver holds ncclRecvMem (4 KiB) + LL (512 KiB) + LL128 (4,915,200 B) + SIMPLE
    (4 MiB) = 9,637,888 B, rounded to 2 MiB: 10,485,760 B; the sender its 4 KiB ncclSendMem: 2,097,152 B. Those are
    the two allocation sizes NVIDIA/nccl#1685 lists under NCCL_DEBUG_SUBSYS=ALLOC (8x H100)."""
    assert nccl.Layout(H100).connection(over_network=False) == (2_097_152, 10_485_760)
    # A100 over NVLink reads SIMPLE from the sender (paths.cc): 4 KiB + 4 MiB -> 6 MiB; 4 KiB + LL + LL128 -> 6 MiB.
    assert nccl.Layout(A100).connection(over_network=False) == (6 * MIB, 6 * MIB)
    # NCCL_BUFFSIZE=8 MiB: the receiver's 4,096 + 524,288 + 4,915,200 + 8,388,608 = 13,832,192 B -> 14 MiB.
    bigger = nccl.Layout(H100, nccl.Environment.read({"NCCL_BUFFSIZE": str(8 * MIB)}))
    assert bigger.connection(over_network=False) == (2 * MIB, 14 * MIB)


def test_an_8_gpu_h100_data_parallel_group_by_hand():
    """One communicator of 8 H100s (24 collective, 32 p2p and 16 NVLS channels, as NCCL_DEBUG=INFO logs of such
    nodes print): at init 2 + 3 x 32 granules of 2 MiB and NVLS's 1 + 16 = 230 MiB; a ring and a tree of 24 channels
    x (2 + 10) MiB = 288 MiB each; NVLS 8 local ranks x 16 channels x 2 x 8 steps x 128 KiB = 256 MiB."""
    [comm] = nccl.communicators(TrainingSpec(num_gpus=8, zero_stage=3), nccl.Layout(H100))
    assert (comm.group, comm.ranks, comm.local_ranks, comm.runs) == ("data-parallel", 8, 8, "collectives")
    assert list(_mib(comm.parts).values()) == [230, 288, 288, 256]
    assert comm.bytes == 1062 * MIB
    # NCCL_NVLS_ENABLE=0: no NVLS buffers, no NVLS channels at init.
    [plain] = nccl.communicators(TrainingSpec(num_gpus=8, zero_stage=3),
                                 nccl.Layout(H100, nccl.Environment.read({"NCCL_NVLS_ENABLE": "0"})))
    assert plain.bytes == (196 + 288 + 288) * MIB
    # Two ranks have no tree (NCCL's tree of 2 is the ring's own connections) and no NVLS (fewer than 3 local ranks).
    [pair] = nccl.communicators(TrainingSpec(num_gpus=2), nccl.Layout(H100))
    assert _mib(pair.parts) == {"at init (channels, device communicator)": 196, "ring": 288}


def test_the_readings_of_nvidia_nccl_964():
    """4 A100s joined by NVLink, 2023's NCCL (no cuMem: everything connected and pooled at init), an all-reduce per
    group, measured on rank 0: 544 MB for a group of 2, 688 MB for a group of 3 or 4. By hand: a ring of 24 channels
    x (6 + 6) MiB = 288 MiB, the pool made at init 32 p2p channels x 16 x 512 KiB = 256 MiB: 544 MiB. A group of 4
    adds a tree: the chain's middle ranks send and receive (288 MiB, the most loaded rank, which memcalc counts); its
    root, rank 0, only receives: 24 x 6 MiB = 144 MiB less, 688 MiB, the reading."""
    layout = nccl.Layout(A100, nccl.Environment.read({"NCCL_CUMEM_ENABLE": "0"}), node_size=4)
    assert layout.communicator("pair", 2, 1, "collectives").bytes == 544 * MIB
    four = layout.communicator("four", 4, 1, "collectives")
    root_sends_nothing_up = A100.collective * layout.connection(over_network=False)[0]
    assert four.bytes - root_sends_nothing_up == 688 * MIB


def test_the_part_made_at_init_is_what_a_one_rank_communicator_holds():
    """A communicator of one rank connects nothing: it holds only what init makes, 3 allocations of 2 MiB per channel
    and 2 for the device communicator. sgl-project/sglang#35538 (RTX 3060) read 388 MiB per new_group([0]) and 10 MiB
    with NCCL_MAX_NCHANNELS=1; NVIDIA/Megatron-LM#6479 388 MiB for a singleton communicator. By hand: (2 + 3 x 64) x 2
    MiB = 388 MiB at NCCL's MAXCHANNELS (64, device.h: nothing bounds one rank's channels), (2 + 3 x 1) x 2 = 10 MiB at
    one channel."""
    one_rank = nccl.Channels(64, 64, 0, False, False, "a single-rank communicator: MAXCHANNELS")
    assert nccl.Layout(one_rank).fixed(nvls=False) == 388 * MIB
    capped = nccl.Layout(one_rank, nccl.Environment.read({"NCCL_MAX_NCHANNELS": "1"}))
    assert (capped.collective, capped.p2p, capped.fixed(nvls=False)) == (1, 1, 10 * MIB)
    # p2p channels: the collective ones rounded up to a power of 2 (paths.cc ncclTopoComputeP2pChannels): 24 -> 32
    assert nccl.Layout(H100).p2p == 32
    assert nccl.Layout(H100, nccl.Environment.read({"NCCL_MAX_P2P_NCHANNELS": "12"})).p2p == 16


def test_send_recv_and_all_to_all_connect_their_peers():
    """A middle pipeline stage on one node exchanges with 2 neighbours over 32 channels each, (2 + 10) MiB per
    channel: 768 MiB, and all-reduces the gradient norm with the other stages (torchtitan's clip_grad_norm_): a ring's
    24 x 12 MiB; expert parallelism over 8 GPUs connects all 7 peers: 7 x 32 x 12 = 2,688 MiB (NVIDIA/nccl#1685
    saw 3.28 GB appear at the first all_to_all_single of 8 H100s, the CUDA context's growth with it: the figure is
    14% below that reading, docs/accuracy.md). Across nodes a communicator's peers get 4 channels, and the network's
    shared pools are 2 x 32 x 16 x 128 KiB = 128 MiB."""
    layout = nccl.Layout(H100)
    stage = layout.communicator("pipeline", 4, 2, "send/recv", neighbours=2)
    # (4 ranks on the node: NVLS's channels and credits are made at init too, 34 MiB, though send/recv uses none)
    assert _mib(stage.parts) == {"at init (channels, device communicator, NVLS)": 230,
                                 "the gradient norm's all-reduce": 288, "2 peers x 32 channels": 768}
    experts = layout.communicator("expert-parallel", 8, 1, "all-to-all")
    assert _mib(experts.parts)["7 peers x 32 channels"] == 2688
    spread = nccl.Layout(H100, node_size=8).communicator("pipeline", 2, 16, "send/recv", neighbours=1)
    assert _mib(spread.parts) == {"at init (channels, device communicator)": 196, "network pools": 128,
                                  "the gradient norm's all-reduce (over the network, a bound)": 24 * 20}
    # --ep 8 on 8 GPUs: the data-parallel and the expert-parallel groups are both every rank, the default group: one
    # communicator (its init counted once), the 8-GPU group's 1,062 MiB and the peers' 2,688 MiB.
    [both] = nccl.communicators(TrainingSpec(num_gpus=8, ep=8, zero_stage=3, sharding="fsdp"), layout)
    assert (both.group, both.runs) == ("data-parallel and expert-parallel", "collectives and all-to-all")
    assert both.bytes == (1062 + 2688) * MIB


def test_a_layout_s_groups_follow_the_mesh():
    """torchtitan's order (pp, dp, cp, tp innermost) over 8 nodes of 8: tp 8 stays on a node, the 4 data-parallel
    ranks are 8 apart (one per node: their ring and tree go over the network, 20 MiB a channel), the 2 stages 32
    apart; the world group's barriers are a communicator of their own."""
    spec = TrainingSpec(num_gpus=64, num_nodes=8, tp=8, pp=2, zero_stage=3, sharding="fsdp")
    comms = nccl.communicators(spec, nccl.Layout(H100, node_size=nccl.node_size(spec)))
    assert [(c.group, c.ranks, c.local_ranks, c.runs) for c in comms] == [
        ("tensor-parallel", 8, 8, "collectives"), ("data-parallel", 4, 1, "collectives"),
        ("pipeline", 2, 1, "send/recv"), ("world (barriers)", 64, 8, "barriers")]
    assert _mib(comms[1].parts) == {"at init (channels, device communicator)": 196,
                                    "ring (over the network, a bound)": 24 * 20,
                                    "tree (over the network, a bound)": 24 * 20}
    # Plain data parallelism: the data-parallel group is the world (DeviceMesh reuses the default group).
    assert [c.group for c in nccl.communicators(TrainingSpec(num_gpus=8), nccl.Layout(H100))] == ["data-parallel"]
    assert nccl.communicators(TrainingSpec(num_gpus=1), nccl.Layout(H100)) == []


def test_the_fit_deducts_them_named(cli, monkeypatch):
    for name in ("NCCL_NVLS_ENABLE", "NCCL_BUFFSIZE", "NCCL_CUMEM_ENABLE", "NCCL_RUNTIME_CONNECT"):
        monkeypatch.delenv(name, raising=False)
    one = api.estimate("llama-3-8b", gpu="h100-80gb").fit
    eight = api.estimate("llama-3-8b", gpu="h100-80gb", gpus=8, zero=3).fit
    assert one.nccl_bytes == 0 and not one.nccl_communicators
    assert eight.nccl_bytes == 1062 * MIB == sum(c.bytes for c in eight.nccl_communicators)
    assert eight.usable_bytes == one.usable_bytes - eight.nccl_bytes
    assert eight.headroom_bytes == eight.usable_bytes - eight.peak_bytes
    # nvidia-smi shows NCCL's buffers beside the allocator's reserve and the context: 1,062 MiB more than one GPU's
    # beside the same allocator terms (the 8-rank peak is the ZeRO-3 shard's)
    for fit in (one, eight):
        assert fit.nvidia_smi_bytes == (fit.peak_bytes + fit.cuda_context_bytes + fit.cublas_workspace_bytes
                                        + fit.allocator_reserve_bytes + fit.nccl_bytes)
    assert eight.nvidia_smi_bytes - eight.peak_bytes - (one.nvidia_smi_bytes - one.peak_bytes) == 1062 * MIB
    data = cli("llama-3-8b", "--gpu", "h100-80gb", "--gpus", "8", "--zero", "3", "--json").json()
    assert data["fit"]["nccl_bytes"] == 1062 * MIB
    assert data["fit"]["nccl_communicators"][0]["parts"]["NVLS"] == 256 * MIB
    text = " ".join(cli("llama-3-8b", "--gpu", "h100-80gb", "--gpus", "8", "--zero", "3").stdout.split())
    assert "NCCL buffers 1.04 GiB (data-parallel group of 8 (collectives)" in text
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("NCCL_BUFFSIZE", "0x800000")  # (NCCL reads its integers in any base)
    fit = api.estimate("llama-3-8b", gpu="h100-80gb", gpus=8, zero=3).fit
    assert fit.nccl_bytes == (196 + 24 * 16 * 2) * MIB  # ring and tree: 24 channels x (2 + 14) MiB
    assert fit.nccl_note.endswith("; from the environment: NCCL_BUFFSIZE=8388608, NCCL_NVLS_ENABLE=0")
    monkeypatch.setenv("NCCL_BUFFSIZE", str(2**40))  # a setting no GPU holds: one line, exit 2
    result = cli("llama-3-8b", "--gpu", "h100-80gb", "--gpus", "8", "--zero", "3")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "NCCL_BUFFSIZE=1099511627776" in result.stderr
    one = cli("llama-3-8b", "--gpu", "h100-80gb")  # one GPU: no communicator, the setting is moot (a verdict, exit 6)
    assert (one.exit_code, one.stderr) == (6, "") and one.stdout.startswith("DOES NOT FIT")
    monkeypatch.setenv("NCCL_BUFFSIZE", "lots")  # not a number: the default size is counted
    assert api.estimate("llama-3-8b", gpu="h100-80gb", gpus=8, zero=3).fit.nccl_bytes == (196 + 288 + 288) * MIB


def test_the_output_names_the_channels_and_their_source():
    fit = api.estimate("llama-3-8b", gpu="a100-80gb", gpus=8, zero=3).fit
    assert fit.nccl_note.startswith("24 collective (32 p2p, 32 a peer) channels: as A100-SXM4 NCCL_DEBUG=INFO logs")
    assert fit.nccl_bytes == (196 + 2 * 24 * 12) * MIB  # no NVLS before Hopper; 6 + 6 MiB a channel (read mode)


def test_groups_not_counted_are_named_with_their_init_part():
    """A layout of several groups says what other groups would hold if made at once (their init part: 196 MiB on an
    H100, as above); under --engine megatron also verl's reading, against memcalc's count for TP2 PP2 DP2 on 8 H100s:
    484 (tp) + 484 (dp) + 868 (pp: 196 + a ring 288 + 1 peer x 32 x 12) + 518 (the default group's barriers: 8 local
    ranks, so NVLS's 34 MiB at init) + 518 for the group the gradient norm is all-reduced over (megatron-core 0.16
    optimizer/__init__.py): under its DDP the model-parallel group (tp x pp = 4 ranks, all on the node), under its
    distributed optimizer the group of every rank of its instance = 2,872 MiB either way."""
    plain = api.estimate("llama-3-8b", gpu="h100-80gb", gpus=8, zero=3).fit
    assert "other process groups" not in plain.nccl_note  # one group: the world
    for zero, group, ranks in ((0, "Megatron-LM's model-parallel", 4), (1, "Megatron-LM's optimizer instance", 8)):
        fit = api.estimate("llama-3-8b", gpu="h100-80gb", gpus=8, tp=2, pp=2, engine="megatron", zero=zero).fit
        assert fit.nccl_bytes == (484 + 484 + 868 + 518 + 518) * MIB
        stats = next(c for c in fit.nccl_communicators if c.group == group)
        assert (stats.ranks, stats.local_ranks, stats.bytes) == (ranks, ranks, 518 * MIB)
        assert "each holds its init part, 196 MiB here: not counted" in fit.nccl_note
        assert "verl-project/verl#6266) where memcalc counts 2.80 GiB" in fit.nccl_note


def test_a_run_s_own_channel_counts_are_taken(cli):
    """--nccl-channels COLL,NVLS,P2P,PER_PEER as NCCL_DEBUG=INFO prints them, on the card's buffers: 16 of each on an
    H100 node of 8: at init (2 + 3 x 16) x 2 + (1 + 16) x 2 = 134 MiB, ring and tree 16 x 12 = 192 MiB each, NVLS 8 x 16
    x 2 = 256 MiB: 774 MiB. A wrong count is one line, exit 2."""
    data = cli("llama-3-8b", "--gpu", "h100-80gb", "--gpus", "8", "--zero", "3", "--nccl-channels", "16,16,16,16",
               "--json").json()
    assert data["fit"]["nccl_bytes"] == (134 + 192 + 192 + 256) * MIB
    assert data["fit"]["nccl_note"].startswith("16 collective (16 p2p, 16 a peer), 16 NVLS channels: given")
    for bad in ("24,16,32", "0,0,0,0", "24,16,32,64", "24,16,65,32"):
        result = cli("llama-3-8b", "--gpu", "h100-80gb", "--gpus", "8", "--nccl-channels", bad)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--nccl-channels" in result.stderr, bad


def test_amd_cards_say_rccl_is_not_counted():
    fit = api.estimate("llama-3-8b", gpu="mi300x", gpus=8, zero=3).fit
    assert fit.nccl_bytes == 0 and "RCCL" in (fit.nccl_note or "")


def test_more_gpus_than_a_node_are_nodes_of_8_unless_told():
    fit = api.estimate("llama-3-8b", gpu="h100-80gb", gpus=16, zero=3).fit
    [comm] = fit.nccl_communicators
    assert (comm.ranks, comm.local_ranks) == (16, 8) and "nodes of 8 GPUs assumed" in fit.nccl_note
    told = api.estimate("llama-3-8b", gpu="h100-80gb", nodes=4, gpus_per_node=4, zero=3).fit
    assert told.nccl_communicators[0].local_ranks == 4 and "assumed" not in told.nccl_note


@pytest.mark.parametrize("gpus", [8, 64])
def test_the_planner_s_capacity_is_each_layout_s(gpus):
    plan = api.layouts("llama-3-8b", gpus=gpus, gpu="h100-80gb", **({"nodes": gpus // 8} if gpus > 8 else {}))
    one = api.estimate("llama-3-8b", gpu="h100-80gb").fit.usable_bytes
    assert all(c.capacity_bytes < one for c in plan.candidates)
    assert len({c.capacity_bytes for c in plan.candidates}) > 1, json.dumps([c.layout.label for c in plan.candidates])
