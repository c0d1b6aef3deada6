"""NCCL's own device memory: the buffers each communicator of a rank's process groups allocates.

NCCL allocates them itself (cuMem), outside PyTorch's caching allocator: they appear in nvidia-smi, not in
``torch.cuda.memory_reserved``, and a step's tensors cannot use them. The fit deducts them from the usable memory,
named, one communicator at a time. Pure Python: no torch.

Derived from NCCL's code (NVIDIA/nccl v2.30.7, and v2.28.9-1 with the same rules: the release a published PyTorch
2.11 run used, NVIDIA/nccl#2363), for NCCL 2.22 and later with its defaults (cuMem on, connections made at first use):
- Buffers of one connection (``init.cc`` ``computeBuffSizes``): LL 8 lines x 512 threads x 8 steps x 16 B = 512 KiB,
  LL128 120 x 640 x 8 x 8 B = 4,915,200 B, SIMPLE 4 MiB (NCCL_BUFFSIZE); beside them a 4 KiB ncclSendMem or
  ncclRecvMem. Over NVLink or PCIe (``transport/p2p.cc`` ``p2pSendSetup``/``p2pRecvSetup``) the receiving GPU holds
  LL, LL128 and SIMPLE, the sending GPU its 4 KiB, each rounded up to 2 MiB (CUDA_IPC_MIN): 10 MiB + 2 MiB per channel.
  Where NCCL reads from the peer (compute capability 8.0 over NVLink, ``graph/paths.cc``) SIMPLE moves to the sender:
  6 MiB + 6 MiB. Over the network with GPUDirect RDMA (``transport/net.cc`` ``sendProxySetup``/``recvProxySetup``)
  the sender holds LL128 and SIMPLE, the receiver all three: 10 MiB each.
- Per channel at init (``channel.cc`` ``initChannel``): three device allocations, each a 2 MiB cuMem granule, for every
  channel up to the p2p channel count P; two more for the device communicator (``init.cc`` ``devCommSetup``).
- Algorithms connect on first use, on all their channels (``group.cc`` ``ncclCollPreconnect``): a ring is one send
  and one receive connection per collective channel C; a tree another pair per channel (none between 2 ranks); NVLink
  SHARP (``transport/nvls.cc`` ``ncclNvlsBufferSetup``, compute capability 9.0 and up behind NVSwitch) buffers of
  local ranks x NVLS channels x 2 x 8 x 128 KiB, plus 2 MiB per NVLS channel and 2 MiB of credits at init.
- Send/recv (pipeline stages, ``enqueue.cc``) connects the channels per peer (P2P channels per peer) with each peer
  it exchanges with; all-to-all (expert parallelism) with every peer of the group. Over the network these use shared
  pools (``net.cc`` ``sharedNetBuffersInit``): P x 16 steps x 128 KiB per direction. The pipeline group also
  all-reduces the gradient norm once a step (torchtitan's ``clip_grad_norm_`` with its pp mesh): one algorithm's
  connections.
- Without connections at first use (NCCL_RUNTIME_CONNECT=0, or NCCL_CUMEM_ENABLE=0, or NCCL before 2.22) every
  algorithm is connected at init and one more pool of P x 16 x the p2p chunk (512 KiB where all GPUs are joined by
  NVLink, 128 KiB otherwise) is made at init (``init.cc``, ``net.cc`` ``proxySharedInit``).

Every algorithm is counted as connected (which ones a run's collectives connect depends on NCCL's tuner and the
message sizes): an upper bound by at most one tree's and NVLS's buffers. The channel counts are results of NCCL's
topology search, taken from published NCCL_DEBUG=INFO logs (below); ``NCCL_DEBUG=INFO`` prints a run's own.

PyTorch (``ProcessGroupNCCL``) makes one communicator per process group a rank runs collectives on; process
groups split from the default one share no buffers (splitShare is off unless NCCL_COMM_SPLIT_SHARE_RESOURCES=1).
torch.distributed.pipelining's batched send/recv run on the pipeline group's communicator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memcalc.errors import UsageError

if TYPE_CHECKING:
    from memcalc.spec import TrainingSpec

MIB = 2**20
GRANULE = 2 * MIB  # CUDA_IPC_MIN (include/comm.h) and the cuMem granularity: every device allocation rounds up to it
LL_BYTES = 8 * 512 * 8 * 16  # NCCL_LL_LINES_PER_THREAD x NCCL_LL_MAX_NTHREADS x NCCL_STEPS x sizeof(ncclLLFifoLine)
LL128_BYTES = 120 * 640 * 8 * 8  # NCCL_LL128_ELEMS_PER_THREAD x NCCL_LL128_MAX_NTHREADS x NCCL_STEPS x 8 B
SIMPLE_BYTES = 1 << 22  # DEFAULT_BUFFSIZE (NCCL_BUFFSIZE)
MAX_BUFFSIZE = 1 << 30  # an NCCL_BUFFSIZE memcalc takes: past it, a setting no GPU could hold for its channels
CONN_MEM_BYTES = 4096  # ncclSendMem / ncclRecvMem, padded to MEM_ALIGN
STEPS = 8  # NCCL_STEPS
SHARED_POOL_STEPS = 16  # sharedNetBuffersInit: p2p channels x 16 x the p2p chunk per direction
NET_CHUNK = 128 * 1024  # P2P_NET_CHUNKSIZE (and P2P_PCI_CHUNKSIZE)
NVL_CHUNK = 512 * 1024  # P2P_NVL_CHUNKSIZE: all GPUs of the communicator joined by NVLink
NVLS_CHUNK = 128 * 1024  # NVLS_CHUNKSIZE (NCCL 2.21 and later)
NET_PEER_CHANNELS = 4  # P2P channels per peer in a communicator that spans nodes (logs: 2 to 4; the larger counted)


@dataclass(frozen=True)
class Channels:
    """NCCL's channel counts on one kind of node, and where they come from."""

    collective: int  # C: ring and tree channels (the topology search's nChannels)
    per_peer: int  # p2p channels per peer inside one node (at most the p2p channels)
    nvls: int  # NVLink SHARP channels (0: none)
    read: bool  # SIMPLE read from the peer (compute capability 8.0 over NVLink)
    nvlink: bool  # every GPU of a node joined by NVLink (the p2p chunk is 512 KiB)
    source: str
    p2p: int | None = None  # as a log printed them (--nccl-channels); None: the collective ones as NCCL rounds them

    def described(self) -> str:
        nvls = f", {self.nvls} NVLS" if self.nvls else ""
        return (f"{self.collective} collective ({self.p2p or _pow2_up(self.collective)} p2p, {self.per_peer} a "
                f"peer){nvls} channels: {self.source}")


CHANNELS = {
    ("nvswitch", "9.0"): Channels(24, 32, 16, False, True, (
        "as 8x H100 SXM nodes' NCCL_DEBUG=INFO logs print them (NCCL 2.2x); NVLS's from nvls.cc for sm 9.0")),
    ("nvswitch", "8.0"): Channels(24, 32, 0, True, True, (
        "as A100-SXM4 NCCL_DEBUG=INFO logs print them (NCCL 2.20.5); SIMPLE read from the peer (paths.cc: sm 8.0 over "
        "NVLink)")),
    ("nvswitch", "10.0"): Channels(32, 32, 24, False, True, (
        "assumed for sm 10.0, no log read (Hopper's 24 rounded up); NVLS's from nvls.cc for one sm 10.0 node")),
    ("nvlink", ""): Channels(16, 4, 0, False, True, "assumed for NVLink without NVSwitch, no log read"),
    ("pcie", ""): Channels(8, 2, 0, False, False, (
        "PCIe: logs show 2 to 8, the most counted; cards without peer access use host memory (SHM) and hold less")),
}

# The one published reading of an all-to-all's NCCL memory is above the rule (benchmarks/nccl_readings.py): said where
# a layout runs one.
ALL_TO_ALL_READING = ("the all-to-all's peers: NVIDIA/nccl#1685 read 3.28 GB appear at the first all_to_all_single of "
                      "8 H100s, 14% above this rule's 2.63 GiB (with the CUDA context's growth; not separated)")

# Process groups a step runs no collective on hold no communicator until one runs, unless torch makes them at once (a
# default group bound to its device: init_process_group(device_id=...), then new_group splits each at creation).
OTHER_GROUPS = ("a framework's other process groups (torchtitan's flattened meshes, Megatron-LM's up to 27) hold "
                "nothing until a collective runs on them, unless communicators are made at once "
                "(init_process_group(device_id=...)): then each holds its init part, {init} here: not counted")
MEGATRON_GROUPS_READING = ("verl measured 7 to 10 GB of NCCL buffers a rank under Megatron-LM TP2 PP2 DP2 on 8 H100s "
                           "(verl-project/verl#6266) where memcalc counts 2.80 GiB (its DDP or its distributed "
                           "optimizer); Megatron-LM's other groups are the likely difference (not separated)")

MAX_CHANNELS = 64  # MAXCHANNELS (include/device.h)


def given_channels(text: str) -> tuple[int, int, int, int]:
    """--nccl-channels COLL,NVLS,P2P,PER_PEER: the four counts of a run's NCCL_DEBUG=INFO line ("24 coll channels,
    16 nvls channels, 32 p2p channels, 32 p2p channels per peer")."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise UsageError(f"--nccl-channels {text!r} is not four whole numbers COLL,NVLS,P2P,PER_PEER (e.g. 24,16,32,32, "
                         "as NCCL_DEBUG=INFO prints them)")
    coll, nvls, p2p, per_peer = (int(part) for part in parts)
    if not (1 <= coll <= MAX_CHANNELS and 0 <= nvls <= MAX_CHANNELS and 1 <= p2p <= MAX_CHANNELS
            and 1 <= per_peer <= p2p):
        raise UsageError(f"--nccl-channels {text!r}: NCCL runs 1 to {MAX_CHANNELS} collective and p2p channels, 0 to "
                         f"{MAX_CHANNELS} NVLS ones, and at most its p2p channels per peer")
    return coll, nvls, p2p, per_peer


# A card not known (--gpu-memory): the largest counts above, an upper bound.
UNKNOWN_CARD = ("nvswitch", "10.0")


def channels_for(interconnect: str | None, compute_capability: str | None) -> tuple[Channels | None, str]:
    """The channel counts for a card, and a note when they are a bound or not modelled (None: RCCL)."""
    if interconnect == "xgmi":
        return None, "AMD's RCCL buffers are not modelled (not counted)"
    if interconnect is None:
        return CHANNELS[UNKNOWN_CARD], ("card not known: the largest channel counts memcalc has, sm 10.0 NVSwitch's ("
                                        + CHANNELS[UNKNOWN_CARD].described() + ")")
    key = (interconnect, compute_capability or "") if interconnect == "nvswitch" else (interconnect, "")
    if key not in CHANNELS:  # an NVSwitch card of a generation not listed: the nearest older one's counts
        key = ("nvswitch", "10.0") if float(compute_capability or 0) >= 10 else ("nvswitch", "9.0")
    return CHANNELS[key], ""


@dataclass(frozen=True)
class Environment:
    """The NCCL_* settings that change its buffers (read from the environment, like NCCL itself)."""

    simple_bytes: int = SIMPLE_BYTES  # NCCL_BUFFSIZE
    nvls: bool = True  # NCCL_NVLS_ENABLE=0 turns NVLink SHARP off
    runtime_connect: bool = True  # NCCL_RUNTIME_CONNECT=0 or NCCL_CUMEM_ENABLE=0: everything at init
    cumem: bool = True  # NCCL_CUMEM_ENABLE=0: plain cudaMalloc, small allocations not rounded to 2 MiB
    max_channels: int | None = None  # NCCL_MAX_NCHANNELS
    max_p2p_channels: int | None = None  # NCCL_MAX_P2P_NCHANNELS

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if environ is None else environ

        def integer(name: str) -> int | None:  # (NCCL reads its integers with strtoll, base 0, param.cc)
            try:
                value = int(env.get(name, "").strip(), 0)
            except ValueError:
                return None
            return value if value > 0 else None

        cumem = env.get("NCCL_CUMEM_ENABLE", "").strip() != "0"
        return cls(simple_bytes=integer("NCCL_BUFFSIZE") or SIMPLE_BYTES,
                   nvls=env.get("NCCL_NVLS_ENABLE", "").strip() != "0",
                   runtime_connect=cumem and env.get("NCCL_RUNTIME_CONNECT", "").strip() != "0", cumem=cumem,
                   max_channels=integer("NCCL_MAX_NCHANNELS"), max_p2p_channels=integer("NCCL_MAX_P2P_NCHANNELS"))

    def check(self) -> None:
        """Refuse settings no GPU could hold (asked where communicators are counted: a run on one GPU has none)."""
        if self.simple_bytes > MAX_BUFFSIZE:
            raise UsageError(f"NCCL_BUFFSIZE={self.simple_bytes} in the environment is over {MAX_BUFFSIZE:,} bytes a "
                             "buffer, more than NCCL could allocate for each channel of each connection on any GPU; "
                             f"unset it or give bytes (NCCL's default is {SIMPLE_BYTES:,})")

    def settings(self) -> list[str]:
        """The non-default settings, as the environment gives them."""
        out = []
        if self.simple_bytes != SIMPLE_BYTES:
            out.append(f"NCCL_BUFFSIZE={self.simple_bytes}")
        if not self.nvls:
            out.append("NCCL_NVLS_ENABLE=0")
        if not self.cumem:
            out.append("NCCL_CUMEM_ENABLE=0")
        elif not self.runtime_connect:
            out.append("NCCL_RUNTIME_CONNECT=0")
        if self.max_channels:
            out.append(f"NCCL_MAX_NCHANNELS={self.max_channels}")
        if self.max_p2p_channels:
            out.append(f"NCCL_MAX_P2P_NCHANNELS={self.max_p2p_channels}")
        return out


DEFAULTS = Environment()  # nothing set


def _pow2_up(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _granules(nbytes: int) -> int:
    return -(-nbytes // GRANULE) * GRANULE


@dataclass(frozen=True)
class Communicator:
    """One process group's communicator on the most loaded rank: what it runs and what NCCL holds for it."""

    group: str  # "data-parallel", "tensor-parallel", ...
    ranks: int
    local_ranks: int  # of them on this rank's node
    runs: str  # "collectives", "send/recv", "all-to-all", "barriers", "all-reduce" (a small one: one algorithm)
    bytes: int
    parts: tuple[tuple[str, int], ...]  # (what, bytes), adding up to bytes


@dataclass(frozen=True)
class Layout:
    """The NCCL channels of the card, the environment and the node size: what the communicators' bytes follow."""

    channels: Channels
    env: Environment = DEFAULTS
    node_size: int = 8

    @property
    def collective(self) -> int:
        return min(self.channels.collective, self.env.max_channels or self.channels.collective)

    @property
    def p2p(self) -> int:
        """P: the collective channels, at most NCCL_MAX_P2P_NCHANNELS, rounded up to a power of 2 (``graph/paths.cc``
        ``ncclTopoComputeP2pChannels``): 24 -> 32."""
        if self.channels.p2p:
            return min(self.channels.p2p, self.env.max_p2p_channels or self.channels.p2p)
        return _pow2_up(min(self.collective, self.env.max_p2p_channels or self.collective))

    def connection(self, over_network: bool) -> tuple[int, int]:
        """(send, receive) bytes one connection holds on the sending and the receiving GPU."""
        simple = self.env.simple_bytes
        if over_network:  # GPUDirect RDMA: LL stays in host memory on the sender
            return _granules(LL128_BYTES + simple), _granules(LL_BYTES + LL128_BYTES + simple)
        read = self.channels.read  # (p2p.cc rounds both to CUDA_IPC_MIN, with or without cuMem)
        send = CONN_MEM_BYTES + (simple if read else 0)
        receive = CONN_MEM_BYTES + LL_BYTES + LL128_BYTES + (0 if read else simple)
        return _granules(send), _granules(receive)

    def pair(self, over_network: bool) -> int:
        return sum(self.connection(over_network))

    def fixed(self, nvls: bool) -> int:
        """At init: three 2 MiB allocations per channel and two for the device communicator (cuMem), NVLS's."""
        if not self.env.cumem:
            return 0
        channels = max(self.collective, self.p2p)
        return (2 + 3 * channels) * GRANULE + ((1 + self.channels.nvls) * GRANULE if nvls else 0)

    def communicator(self, group: str, ranks: int, stride: int, runs: str, neighbours: int = 0,
                     placed: tuple[int, bool] | None = None) -> Communicator:
        """The bytes of one communicator of ``ranks`` ranks, ``stride`` ranks apart in the global order (``placed``:
        its ranks on this rank's node and whether it spans nodes, for a group not evenly strided)."""
        spans = ranks * stride > self.node_size
        local = max(1, min(ranks, self.node_size // stride)) if stride < self.node_size else 1
        if placed is not None:
            local, spans = placed
        # (NVLS's channels and credits are made at init wherever the communicator supports it; its buffers when a
        # collective first runs on it)
        nvls = self.env.nvls and self.channels.nvls > 0 and local > 2
        parts = [("at init (channels, device communicator" + (", NVLS" if nvls else "") + ")", self.fixed(nvls))]
        channels = self.collective
        if runs in ("collectives", "barriers"):
            parts.append(("ring" + (" (over the network, a bound)" if spans else ""), channels * self.pair(spans)))
        if runs in ("send/recv", "all-reduce"):  # the gradient norm's all-reduce (torchtitan's clip_grad_norm_ over the
            # stages; Megatron-LM's over its optimizer instance): one algorithm
            parts.append(("the gradient norm's all-reduce" + (" (over the network, a bound)" if spans else ""),
                          channels * self.pair(spans)))
        if runs == "collectives" and ranks > 2:
            parts.append(("tree" + (" (over the network, a bound)" if spans else ""), channels * self.pair(spans)))
        if nvls and runs == "collectives":
            parts.append(("NVLS", local * self.channels.nvls * 2 * STEPS * NVLS_CHUNK))
        if runs in ("send/recv", "all-to-all"):
            per_peer = min(NET_PEER_CHANNELS if spans else self.channels.per_peer, self.p2p)
            peers = neighbours if runs == "send/recv" else ranks - 1
            near = peers if not spans else min(peers, local - 1)
            if near > 0:
                parts.append((f"{near} peer{'s' if near > 1 else ''} x {per_peer} channels",
                               near * per_peer * self.pair(False)))
            if spans:
                parts.append(("network pools", 2 * self.p2p * SHARED_POOL_STEPS * NET_CHUNK))
        if not self.env.runtime_connect:  # connected at init, and the eager pool
            chunk = NVL_CHUNK if not spans and self.channels.nvlink else NET_CHUNK
            parts.append(("pool made at init", self.p2p * SHARED_POOL_STEPS * chunk))
        parts = [(what, b) for what, b in parts if b]
        return Communicator(group, ranks, local, runs, sum(b for _, b in parts), tuple(parts))


def node_size(spec: TrainingSpec) -> int:
    """GPUs per node as NCCL sees them: as given with --nodes; otherwise one node of at most 8 (an HGX board)."""
    return spec.gpus_per_node if spec.num_nodes > 1 else min(spec.num_gpus, 8)


def communicators(spec: TrainingSpec, layout: Layout) -> list[Communicator]:
    """The communicators of the most loaded rank, torchtitan's mesh order (pipeline outermost, then data, context
    and tensor parallelism innermost; expert parallelism inside the data-parallel ranks)."""
    if spec.num_gpus <= 1:
        return []
    out: list[Communicator] = []
    tp, pp, cp, ep = spec.tp, spec.pp, spec.cp, spec.ep
    dp = spec.data_parallel
    if tp > 1:
        out.append(layout.communicator("tensor-parallel", tp, 1, "collectives"))
    if cp > 1:
        out.append(layout.communicator("context-parallel", cp, tp, "collectives"))
    replicas = spec.dp_replicate
    if replicas > 1:
        # HSDP: the 2-D DeviceMesh (dp_replicate, dp_shard) makes a group per dimension (torchtitan's mesh order: the
        # replicas outside the shard ranks): FSDP2 all-gathers and reduce-scatters over the shard group, all-reduces
        # over the replicate group (_fsdp_collectives.py foreach_reduce)
        if dp // replicas > 1:
            out.append(layout.communicator("data-parallel shard (HSDP)", dp // replicas, tp, "collectives"))
        out.append(layout.communicator("data-parallel replicate (HSDP)", replicas, tp * dp // replicas, "collectives"))
    elif dp > 1:
        out.append(layout.communicator("data-parallel", dp, tp, "collectives"))
    if ep > 1:
        out.append(layout.communicator("expert-parallel", ep, tp, "all-to-all"))
        if dp // ep > 1:
            out.append(layout.communicator("experts' data-parallel", dp // ep, tp * ep, "collectives"))
    if pp > 1:
        neighbours = 1 if pp == 2 else 2  # a middle stage (any rank of an interleaved schedule: it wraps around)
        out.append(layout.communicator("pipeline", pp, spec.num_gpus // pp, "send/recv", neighbours))
    # A group of every rank is the default one (DeviceMesh reuses it): one communicator, whatever runs on it.
    world = [c for c in out if c.ranks == spec.num_gpus]
    if spec.engine == "megatron" and spec.zero_stage >= 1:
        # Megatron-LM's distributed optimizer all-reduces the gradient norm (and fp16's found-inf) over the group of
        # every rank of its instance, a group of its own (megatron-core 0.16 optimizer/__init__.py: the optimizer's
        # grad_stats_parallel_group is parallel_state's INTRA_DISTRIBUTED_OPTIMIZER_INSTANCE_GROUP, made by
        # create_group): a small all-reduce, one algorithm
        out.append(layout.communicator("Megatron-LM's optimizer instance", spec.num_gpus, 1, "all-reduce"))
    elif spec.engine == "megatron" and tp * pp > 1:
        # Megatron-LM's DDP (its Float16OptimizerWithFloat16Params and FP32Optimizer) all-reduces them over the model-
        # parallel group: the tp ranks of each of the pp stages (parallel_state's MODEL_PARALLEL_GROUP), a group of its
        # own beside the tensor- and pipeline-parallel ones
        stage = spec.num_gpus // pp
        stages_here = max(1, min(pp, layout.node_size // stage)) if stage < layout.node_size else 1
        placed = (min(tp * stages_here, layout.node_size), stage * (pp - 1) + tp > layout.node_size)
        out.append(layout.communicator("Megatron-LM's model-parallel", tp * pp, 1, "all-reduce", placed=placed))
    if not world:
        out.append(layout.communicator("world (barriers)", spec.num_gpus, 1, "barriers"))
    elif len(world) > 1:
        at_init = max((p for c in world for p in c.parts if p[0].startswith("at init")), key=lambda p: p[1])
        rest: dict[str, int] = {}
        for what, b in (p for c in world for p in c.parts if not p[0].startswith("at init")):
            rest[what] = rest.get(what, 0) + b
        parts = (at_init, *rest.items())
        merged = Communicator(" and ".join(c.group for c in world), spec.num_gpus, world[0].local_ranks,
                              " and ".join(c.runs for c in world), sum(b for _, b in parts), parts)
        out = [c for c in out if c.ranks != spec.num_gpus] + [merged]
    return out
