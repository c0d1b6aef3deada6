"""NCCL's buffers (memcalc.nccl) against the published readings of NCCL's device memory (docs/accuracy.md, "NCCL's
buffers"). No GPU and no torch: each row is the setup a public issue describes, the reading it published, memcalc's
figure and the error.

    python benchmarks/nccl_readings.py
"""

from __future__ import annotations

from memcalc import nccl

MIB = 2**20
H100 = nccl.CHANNELS[("nvswitch", "9.0")]
A100 = nccl.CHANNELS[("nvswitch", "8.0")]


def rows() -> list[tuple[str, str, float, float, str]]:
    """(source, setup, published MiB, memcalc MiB, what the reading covers)."""
    eager_a100 = nccl.Layout(A100, nccl.Environment.read({"NCCL_CUMEM_ENABLE": "0"}), node_size=4)
    four = eager_a100.communicator("four", 4, 1, "collectives")
    root = four.bytes - A100.collective * eager_a100.connection(over_network=False)[0]  # the chain's root: no send up
    h100 = nccl.Layout(H100)
    send, receive = h100.connection(over_network=False)
    all_to_all = dict(h100.communicator("expert-parallel", 8, 1, "all-to-all").parts)["7 peers x 32 channels"]
    one_rank = nccl.Channels(64, 64, 0, False, False, "a single-rank communicator: MAXCHANNELS")
    one_channel = nccl.Layout(one_rank, nccl.Environment.read({"NCCL_MAX_NCHANNELS": "1"}))
    return [
        ("sgl-project/sglang#35538", "RTX 3060, a 1-rank new_group([0]) (64 channels: MAXCHANNELS)", 388,
         nccl.Layout(one_rank).fixed(nvls=False) / MIB, "device memory each extra group added"),
        ("sgl-project/sglang#35538", "same, NCCL_MAX_NCHANNELS=1", 10, one_channel.fixed(nvls=False) / MIB,
         "device memory each extra group added"),
        ("NVIDIA/Megatron-LM#6479", "a singleton communicator (GPU not named)", 388,
         nccl.Layout(one_rank).fixed(nvls=False) / MIB, "its device memory"),
        ("NVIDIA/nccl#1685", "8x H100, one P2P connection's receive buffer (NCCL_DEBUG_SUBSYS=ALLOC)",
         10_485_760 / MIB, receive / MIB, "the allocation size"),
        ("NVIDIA/nccl#1685", "8x H100, one P2P connection's send buffer (NCCL_DEBUG_SUBSYS=ALLOC)",
         2_097_152 / MIB, send / MIB, "the allocation size"),
        ("NVIDIA/nccl#964", "4x A100 NVLink, 2023 NCCL (no cuMem), group of 2, all-reduce, rank 0",
         544, eager_a100.communicator("pair", 2, 1, "collectives").bytes / MIB, "device memory the group added"),
        ("NVIDIA/nccl#964", "same, group of 3 or 4, rank 0 (the tree's root: receives only)",
         688, root / MIB, "device memory the group added"),
        ("NVIDIA/nccl#964", "same, group of 4, a middle rank (memcalc's most loaded rank)",
         688, four.bytes / MIB, "rank 0's reading: a middle rank's tree also sends"),
        ("NVIDIA/nccl#1685", "8x H100, first all_to_all_single (NCCL 2.2x, lazy connection)",
         3.28e9 / MIB, all_to_all / MIB, "nvidia-smi's growth: the all-to-all's buffers and the CUDA context's"),
    ]


def main() -> None:
    print("| source | setup | published | memcalc | error | what the reading covers |")
    print("|---|---|---:|---:|---:|---|")
    for source, setup, published, predicted, covers in rows():
        error = (predicted - published) / published * 100
        print(f"| {source} | {setup} | {published:,.0f} MiB | {predicted:,.0f} MiB | {error:+.1f}% | {covers} |")


if __name__ == "__main__":
    main()
