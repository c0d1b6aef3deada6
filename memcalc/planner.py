"""The layout planner (``--plan``): which layouts of data, tensor, pipeline, context and expert parallelism,
data-parallel sharding and checkpointing fit the GPUs, ranked by an explicit throughput model.

The memory of a layout is memcalc's estimate of its most loaded rank (as --tp and --pp report it). The ranking is a
model (THROUGHPUT_MODEL, printed with every plan), not a measurement.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from memcalc import context_parallel, expert_parallel, pipeline, tensor_parallel
from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.model import ROLE_EXPERT

THROUGHPUT_MODEL = """\
throughput model, per step (N params, G GPUs, M micro-batches, L_s layers/stage, dp data-parallel ranks of which cp
share each sequence and ep split the experts):
  tokens    T = dp/cp x batch x seq x M
  compute   C = (6 N_a + 6 L seq heads head_dim) T / G x 4/3 (ckpt full) / (peak bf16 FLOP/s x MFU)
              (N_a: the parameters a token runs, a MoE model's top-k of its experts; the second term: causal
              attention's scores and their product with v, forward and backward)
  tensor    X = (4 L_s - 2 L_moe/pp [with --ep]) M x 2 (tp-1)/tp x (batch x seq/cp x hidden x 2 B) / NVLink
              (each layer's attention and MLP outputs all-reduced, forward and backward; with --ep a MoE block's
              outputs are all-gathered instead: in E)
  pipeline  P = 2 v M x (batch x seq/cp x hidden x 2 B) / network  (v stages a rank: 1 for 1F1B, 2 interleaved)
  context   R = 8 L_s M (cp-1) x (batch x seq/cp x kv_heads/tp x head_dim x 2 B) / link  (the ring: k and v
              all-gathered forward and backward, their fp32 gradients passed on)
  expert    E = 4 L_moe/pp M (ep-1)/ep x (batch x seq/cp/tp x top_k x hidden x 2 B) / link  (each MoE layer's
              routed pairs sent and returned by all-to-all, forward and backward, a tp rank its slice's; balanced
              routing) + 2 L_moe M (tp-1)/tp x (batch x seq/cp x hidden x 2 B) / NVLink (with --ep the tp ranks'
              outputs all-gathered, forward and backward)
  bubble    B = (pp-1) / (v M + pp-1)  (interleaved 1F1B: Narayanan et al. 2021, each stage's share 1/v)
  data      D = k ((dp-1)/dp x rank's dense params + (e-1)/e x its experts) x 2 B / link (k 2 DDP/ZeRO-1, 3 FSDP;
              e = dp tp/ep ranks hold the same experts with --ep, dp without)
  step      S = (C + X + P + R + E) / (1 - B) + max(0, D - C/2)  (D overlaps backward)
  ranked by T / S"""

PLANNER_MFU = 0.4  # model FLOPs utilization assumed for every layout (the ranking compares layouts, not clusters)
# Per GPU: dense bf16 peak FLOP/s, the NVLink bandwidth per direction and the scale-out bandwidth per GPU (one
# 400 Gb/s InfiniBand NDR port per GPU, as DGX H100/H200 and most H100 clusters have; A100: 200 Gb/s HDR).
LINKS = {
    "h100": (989e12, 450e9, 50e9, ("NVIDIA H100 SXM datasheet: 989 TFLOPS bf16 dense, NVLink 900 GB/s (450 each "
                                   "way); 400 Gb/s InfiniBand NDR per GPU (DGX H100)")),
    "h200": (989e12, 450e9, 50e9, ("NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense, NVLink 900 GB/s; 400 Gb/s NDR "
                                   "per GPU (DGX H200)")),
    "a100": (312e12, 300e9, 25e9, ("NVIDIA A100 SXM datasheet: 312 TFLOPS bf16 dense, NVLink 600 GB/s; 200 Gb/s HDR "
                                   "per GPU (DGX A100)")),
}
DEFAULT_LINKS = "h100"
TP_SIZES = (1, 2, 4, 8)
PP_SIZES = (1, 2, 4, 8, 16, 32, 64)
CP_SIZES = (1, 2, 4, 8, 16, 32)
EP_SIZES = (1, 2, 4, 8, 16, 32, 64)
MIN_CONTEXT_PARALLEL_SEQ = 8192  # shorter sequences are not split (each rank would run under 4096 positions)
# On pipeline stages (torchtitan's long-context layout) a rank keeps at least this many positions: the search stays
# under its time budget, and a stage's micro-batches already shrink its activations
MIN_PIPELINE_CONTEXT_LOCAL = 4096
DEFAULT_SCHEDULES = ("1f1b",)
# --engine megatron's data-parallel engines (Layout.sharding): its DDP and its distributed optimizer
MEGATRON_DDP, MEGATRON_DISTOPT = "megatron-ddp", "megatron-distopt"
# --plan-schedules interleaved-1f1b: stages a rank (torchtitan's default for its interleaved schedules)
INTERLEAVED_STAGES_PER_RANK = 2
# Interleaved layouts are estimated best first by the throughput model while they can still be among this many best
# fitting ones (the table's rows, render.LAYOUTS_SHOWN): an interleaved rank's estimate walks every moment of its
# schedule, seconds for a deep pipeline
INTERLEAVED_SEARCH_DEPTH = 5
BYTES_16 = 2


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    sharding: str  # fsdp (ZeRO-3 over the data-parallel ranks; ZeRO-2-like on pipeline stages), ddp, zero1, or
    # --engine megatron's MEGATRON_DDP, MEGATRON_DISTOPT
    checkpointing: str
    microbatches: int
    cp: int = 1  # of the dp ranks, cp share each sequence (context parallelism)
    ep: int = 1  # of the dp ranks, ep split each MoE layer's experts (expert parallelism)
    ep_dim: int = 0  # the dimension FSDP2 shards a rank's experts on (--ep-shard-dim: 1 is torchtitan's Shard(1))
    schedule: str = "1f1b"  # the pipeline schedule (pp > 1): 1f1b or interleaved-1f1b
    virtual: int = 1  # stages a rank (interleaved 1F1B: INTERLEAVED_STAGES_PER_RANK)
    # --engine megatron where pp does not divide the layers: the first and the last stage's layer count (Megatron's
    # --decoder-first/last-pipeline-num-layers), every other stage the same, larger count; 0: an even split
    pp_ends: int = 0

    @property
    def label(self) -> str:
        interleaved = f", interleaved x{self.virtual}" if self.virtual > 1 else ""
        ends = f", {self.pp_ends} layer{'s' if self.pp_ends != 1 else ''} first and last" if self.pp_ends else ""
        pp = f" x pp {self.pp} (M {self.microbatches}{interleaved}{ends})" if self.pp > 1 else ""
        cp = f" (cp {self.cp})" if self.cp > 1 else ""
        ep = f" (ep {self.ep}{', experts on dim 1' if self.ep_dim else ''})" if self.ep > 1 else ""
        return f"dp {self.dp}{cp}{ep} {self.sharding} x tp {self.tp}{pp}, ckpt {self.checkpointing}"


@dataclass
class Candidate:
    layout: Layout
    peak_bytes: int
    capacity_bytes: int
    fits: bool
    tokens_per_step: int
    step_seconds: float
    tokens_per_second: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds: compute, tensor, pipeline, data, bubble fraction
    flags: str = ""  # the command-line flags that estimate this layout (layout_flags of its spec)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self.layout), "label": self.layout.label, "flags": self.flags,
                "peak_bytes": self.peak_bytes,
                "capacity_bytes": self.capacity_bytes, "fits": self.fits, "tokens_per_step": self.tokens_per_step,
                "step_seconds": round(self.step_seconds, 6), "tokens_per_second": round(self.tokens_per_second, 1),
                "model": {k: round(v, 6) for k, v in self.parts.items()}}


@dataclass
class LayoutPlan:
    candidates: list[Candidate]  # every layout tried, best first (fitting ones before the rest)
    gpus: int
    gpus_per_node: int
    links: str
    links_source: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]


def _spec_for(base, layout: Layout, model_layers: int = 0):
    zero, sharding = {"fsdp": (3, "fsdp"), "ddp": (0, "torch"), "zero1": (1, "torch"), MEGATRON_DDP: (0, "megatron"),
                      MEGATRON_DISTOPT: (1, "megatron")}[layout.sharding]
    tp, pp = layout.tp, layout.pp
    if pp > 1 and sharding == "fsdp":
        zero = 2  # (torchtitan's default under pipeline parallelism: no reshard after forward)
    return base.replace(num_gpus=layout.dp * tp * pp, tp=tp, sequence_parallel=tp > 1, loss_parallel=tp > 1,
                        cp=layout.cp, ep=layout.ep, ep_load=1.0, ep_shard_dim=layout.ep_dim, pp=pp, microbatches=layout.microbatches if pp > 1 else None, pp_layers=pipeline.megatron_uneven(model_layers, pp) if layout.pp_ends else None,
                        pp_schedule=layout.schedule, pp_virtual=layout.virtual if layout.virtual > 1 else None,
                        pp_stage=None, sharding=sharding, zero_stage=zero,
                        checkpointing=layout.checkpointing, grad_accum=1)


def layout_flags(spec) -> str:
    """The flags that estimate this layout, read off the spec the planner estimated (added to the run's own flags: a
    layout's label leaves out what every layout of the search shares, --sp and --loss-parallel with --tp, and the
    engine its sharding names)."""
    flags = [f"--gpus {spec.num_gpus}"]
    if spec.sharding.value == "megatron":
        flags.append("--engine megatron")
    else:
        flags.append(f"--sharding {spec.sharding.value}")
    flags.append(f"--zero {spec.zero_stage}")
    if spec.tp > 1:
        flags.append(f"--tp {spec.tp}" + (" --sp" if spec.sequence_parallel else "")
                     + (" --loss-parallel" if spec.loss_parallel else ""))
    if spec.cp > 1:
        flags.append(f"--cp {spec.cp}")
    if spec.ep > 1:
        flags.append(f"--ep {spec.ep}" + (f" --ep-shard-dim {spec.ep_shard_dim}" if spec.ep_shard_dim else ""))
    if spec.pp > 1:
        flags.append(f"--pp {spec.pp} --microbatches {spec.microbatches}")
        if spec.pp_schedule.value != "1f1b":
            flags.append(f"--pp-schedule {spec.pp_schedule.value}")
        if spec.pp_virtual and spec.pp_virtual > 1:
            flags.append(f"--pp-virtual {spec.pp_virtual}")
        if spec.pp_layers:
            flags.append(f"--pp-layers {','.join(str(n) for n in spec.pp_layers)}")
    flags.append(f"--checkpointing {spec.checkpointing_label}")
    return " ".join(flags)


def _peak(model, spec) -> int:
    """The layout's most loaded rank. Under --pp: stages 0, 1 and the last (a middle stage after the first holds at
    most stage 1's layers - torchtitan gives the remainder to the first stages - and no more micro-batches at once);
    interleaved: ranks 0, 1 and the last (rank r holds stages r, r + pp, ...: rank 0 the embedding's stage and the
    most micro-batches in flight, torch's warm-up falling with the rank; rank 1 the first stages' remainder layers
    too; the last the head's and the loss's stages)."""
    from memcalc.engine import estimate

    if spec.pp == 1:
        return estimate(model, spec).per_gpu.peak_bytes
    if spec.pp_virtual > 1:
        return max(estimate(model, spec.replace(pp_rank=rank)).per_gpu.peak_bytes
                   for rank in sorted({0, 1, spec.pp - 1}))
    return max(estimate(model, spec.replace(pp_stage=stage)).per_gpu.peak_bytes
               for stage in sorted({0, 1, spec.pp - 1}))


def _splits(check, *args) -> bool:
    """Whether the model can be split so (tensor_parallel.check, pipeline.check: their refusals, without the line)."""
    try:
        check(*args)
    except (UsageError, UnsupportedModelError):
        return False
    return True


def _context_sizes(model, base) -> tuple[int, ...]:
    """The context-parallel sizes the run can take (context_parallel.check, and the sequence cut into 2 cp chunks)."""
    if base.seq_len < MIN_CONTEXT_PARALLEL_SEQ:
        return (1,)

    def takes(cp: int) -> None:  # (the spec's own checks too: the sequence's chunks, the recipe)
        context_parallel.check(model.described, base.replace(cp=cp, num_gpus=cp, tp=1, pp=1, microbatches=None))

    return (1, *(cp for cp in CP_SIZES[1:] if _splits(takes, cp)))


def _expert_sizes(model) -> tuple[int, ...]:
    """The expert-parallel sizes the model takes (expert_parallel.check: a MoE model of transformers' plan, the experts
    split evenly); tried with FSDP alone (with context parallelism too, or with tp when ep is a multiple of it) and
    on FSDP2 pipeline stages (--ep's modelled layouts: no tp or cp on stages)."""
    return (1, *(ep for ep in EP_SIZES[1:] if _splits(expert_parallel.check, model.described, ep)))


def _layouts(model, gpus: int, gpus_per_node: int, context_sizes: tuple[int, ...] = (1,),
             expert_sizes: tuple[int, ...] = (1,), base_seq: int = 0,
             schedules: tuple[str, ...] = DEFAULT_SCHEDULES, megatron: bool = False) -> list[Layout]:
    """``megatron``: the layouts Megatron-LM runs (its DDP or distributed optimizer, its even layer split; the caller
    gives no context or expert sizes and 1F1B alone)."""
    found = []
    for tp in TP_SIZES:
        if gpus_per_node % tp:
            continue
        # (with --ep the experts stay whole: their width need not divide tp, so a model --tp alone cannot split may
        # still take --tp with --ep)
        splits = _splits(tensor_parallel.check, model.described, tp, megatron)
        splits_with_ep = len(expert_sizes) > 1 and _splits(tensor_parallel.check, model.described, tp, False, 2)
        if not (splits or splits_with_ep):
            continue
        for pp in PP_SIZES if splits else ():
            ends = pipeline.megatron_ends(model.arch.num_layers, pp) if megatron else 0
            layers = pipeline.megatron_uneven(model.arch.num_layers, pp) if ends else None
            if gpus % (tp * pp) or not _splits(pipeline.check, model.described, pp, layers, None, megatron):
                continue
            dp = gpus // (tp * pp)
            engines = ("fsdp", "ddp") if pp == 1 else ("fsdp", "zero1", "ddp")
            if dp == 1:
                engines = ("ddp",)
            if megatron:
                engines = (MEGATRON_DISTOPT, MEGATRON_DDP) if dp > 1 else (MEGATRON_DDP,)
            for cp in context_sizes:
                if dp % cp or (pp > 1 and cp > 1 and base_seq // cp < MIN_PIPELINE_CONTEXT_LOCAL):
                    continue
                # (context parallelism on pipeline stages as torchtitan lays it out: FSDP2 over the stage's data- and
                # context-parallel ranks)
                for sharding in engines if cp == 1 or pp == 1 else ("fsdp",):
                    for checkpointing in ("none", "full"):
                        if pp == 1:
                            found.append(Layout(dp, tp, pp, sharding, checkpointing, 1, cp))
                            continue
                        # (2 x pp micro-batches: torch's interleaved schedules take a multiple of pp)
                        found.extend(Layout(dp, tp, pp, sharding, checkpointing, 2 * pp, cp, schedule=schedule,
                                            virtual=virtual, pp_ends=ends)
                                     for schedule, virtual in _pipelines(model, pp, schedules))
                        if tp == 1 and cp == 1 and sharding == "fsdp":
                            # (each stage's experts split over ep of its FSDP2 ranks: torchtitan's (pp, dp, ep) mesh)
                            found.extend(Layout(dp, 1, pp, "fsdp", checkpointing, 2 * pp, 1, ep, schedule=schedule,
                                                virtual=virtual) for ep in expert_sizes[1:] if dp % ep == 0
                                         for schedule, virtual in _pipelines(model, pp, schedules))
        dp = gpus // tp
        if gpus % tp or dp == 1 or not splits_with_ep:
            continue
        # (and torchtitan's dim-1 sharding of each rank's experts where its rule picks it: the ranks sharding them times
        # ep, here dp x tp, exceed the experts; transformers' dim 0 then pads them whole)
        dims = (0, 1) if dp * tp > getattr(model.arch, "num_experts", 0) else (0,)
        # (and with context parallelism over the same data-parallel ranks, as memcalc models it; with tp, transformers'
        # layout: ep a multiple of tp dividing dp x tp; not both, which doubles the MoE models' search past 2 s at 512
        # GPUs and long sequences)
        for ep in expert_sizes[1:]:
            if (dp * tp) % ep == 0 and ep % tp == 0:
                found.extend(Layout(dp, tp, 1, "fsdp", checkpointing, 1, cp, ep, dim) for dim in dims
                             for checkpointing in ("none", "full") for cp in context_sizes
                             if dp % cp == 0 and (tp == 1 or cp == 1))
    return found


def _pipelines(model, pp: int, schedules: tuple[str, ...]) -> list[tuple[str, int]]:
    """The schedules searched for ``pp`` ranks, with their stages a rank: interleaved 1F1B where the layers split into
    pp x INTERLEAVED_STAGES_PER_RANK stages (pipeline.check)."""
    found = []
    for schedule in schedules:
        if schedule == "1f1b":
            found.append((schedule, 1))
        elif _splits(pipeline.check, model.described, pp * INTERLEAVED_STAGES_PER_RANK):
            found.append((schedule, INTERLEAVED_STAGES_PER_RANK))
    return found


def _throughput(model, spec, layout: Layout, gpus_per_node: int, links: tuple) -> tuple[int, float, dict]:
    flops_per_s, intra, inter = links[:3]
    arch = model.arch
    params = sum(t.numel for t in model.tensors)
    experts = sum(t.numel for t in model.tensors if t.role == ROLE_EXPERT)
    num_experts, top_k = getattr(arch, "num_experts", 0), getattr(arch, "experts_per_token", 0)
    active = params - experts + (experts * top_k // num_experts if num_experts else 0)
    micro = spec.micro_batch_size * spec.local_seq_len  # tokens of one micro-batch on one rank
    tokens = layout.dp * micro * layout.microbatches  # (dp / cp groups of sequences, each seq = cp x local)
    gpus = layout.dp * layout.tp * layout.pp
    recompute = 4 / 3 if layout.checkpointing == "full" else 1.0
    attention = 6 * arch.num_layers * spec.seq_len * arch.num_heads * arch.head_dim  # per token (causal: s/2 keys)
    compute = (6 * active + attention) * tokens / gpus * recompute / (flops_per_s * PLANNER_MFU)
    hidden = micro * arch.hidden_size * BYTES_16
    layers = -(-arch.num_layers // layout.pp)
    pipe = 2 * layout.virtual * layout.microbatches * hidden / inter if layout.pp > 1 else 0.0
    kv = micro * (arch.num_kv_heads // layout.tp) * arch.head_dim * BYTES_16
    ring_link = intra if layout.tp * layout.cp <= gpus_per_node else inter
    context = 8 * layers * layout.microbatches * (layout.cp - 1) * kv / ring_link
    moe_layers = sum(1 for layer in range(arch.num_layers) if getattr(arch, "sparse", lambda _: False)(layer))
    moe_layers = -(-moe_layers // layout.pp)  # (a stage's: its rank runs those)
    all_reduced = 4 * layers - (2 * moe_layers if layout.ep > 1 else 0)  # (--ep: a MoE block's outputs all-gathered)
    tensor = all_reduced * layout.microbatches * 2 * (layout.tp - 1) / layout.tp * hidden / intra
    expert = ((4 * moe_layers * layout.microbatches * (layout.ep - 1) / layout.ep * micro / layout.tp * top_k
               * arch.hidden_size * BYTES_16 / (intra if layout.ep <= gpus_per_node else inter))
              + 2 * moe_layers * layout.microbatches * (layout.tp - 1) / layout.tp * hidden / intra
              if layout.ep > 1 else 0.0)
    bubble = (layout.pp - 1) / (layout.virtual * layout.microbatches + layout.pp - 1)
    # (FSDP2: all-gather in forward and in backward, reduce-scatter; on a pipeline stage it all-gathers once per step)
    factor = 3 if layout.sharding == "fsdp" and layout.pp == 1 else 2
    dp_link = inter if layout.tp * layout.pp * layout.dp > gpus_per_node else intra
    # (a rank's experts: 1/ep of its stage's, whole, with --ep, over the dp x tp / ep ranks holding the same ones;
    # 1/tp of them without, over the dp ranks)
    efsdp = layout.dp * layout.tp // layout.ep if layout.ep > 1 else layout.dp
    rank_experts = experts / (layout.pp * (layout.ep if layout.ep > 1 else layout.tp))
    rank_dense = (params - experts) / (layout.tp * layout.pp)
    synced = (layout.dp - 1) / layout.dp * rank_dense + (efsdp - 1) / efsdp * rank_experts
    data = factor * synced * BYTES_16 / dp_link if layout.dp > 1 else 0.0
    step = (compute + tensor + pipe + context + expert) / (1 - bubble) + max(0.0, data - compute / 2)
    return tokens, step, {"compute_s": compute, "tensor_parallel_s": tensor, "pipeline_s": pipe,
                          "context_parallel_s": context, "expert_parallel_s": expert, "data_parallel_s": data,
                          "bubble_fraction": bubble}


def plan(model, base, gpu, gpus_per_node: int | None = None,
         schedules: tuple[str, ...] = DEFAULT_SCHEDULES) -> LayoutPlan:
    """Every layout of ``base.num_gpus`` GPUs for ``model`` (micro-batch, sequence and recipe from ``base``), its
    memory and whether it fits ``gpu`` (a memcalc.fit.GpuTarget), ranked by the throughput model. ``schedules``: the
    pipeline schedules searched (1f1b, interleaved-1f1b)."""
    if model.described is None:
        raise UsageError("{plan} splits the model's layers: give a model name or config.json, not only {params}")
    started = time.perf_counter()
    gpus = base.num_gpus
    per_node = gpus_per_node or min(8, gpus)
    key = next((name for name in LINKS if name in gpu.name.lower()), None)
    notes = []
    if key is None:
        notes.append(f"{gpu.name}: no FLOP/s and link figures known; ranked with {DEFAULT_LINKS}'s")
    links = LINKS[key or DEFAULT_LINKS]
    candidates, refused = [], []
    megatron = base.engine == "megatron"
    if megatron:  # (Megatron-LM's own layouts: its context and expert parallelism and interleaving are not modelled)
        schedules = ("1f1b",)
        notes.append("--engine megatron: Megatron-LM's DDP and distributed optimizer (--zero 0, 1) over the data-parallel "
                     "ranks, its even layer split (where pp does not divide the layers, fewer on the first and last "
                     "stages, its --decoder-first/last-pipeline-num-layers) and 1F1B; its context and expert "
                     "parallelism and its interleaved schedule are not modelled, so not searched")
    context_sizes = (1,) if megatron else _context_sizes(model, base)
    if context_sizes == (1,) and not megatron:
        notes.append(f"context parallelism not tried: seq {base.seq_len:,} is below {MIN_CONTEXT_PARALLEL_SEQ:,}"
                     if base.seq_len < MIN_CONTEXT_PARALLEL_SEQ else
                     "context parallelism not tried: the run does not take it (memcalc --cp's checks)")
    expert_sizes = (1,) if megatron else _expert_sizes(model)
    # each layout's capacity: the GPU less the CUDA context, the allocator reserve (memcalc.fit) and that layout's NCCL
    # buffers (memcalc.nccl: its process groups' communicators)
    gpu.nccl_env.check()
    interleaved = []
    # (1F1B pipelines are estimated even when only interleaved ones are searched: they bound them, below)
    plain: dict[Layout, bool] = {}
    for layout in _layouts(model, gpus, per_node, context_sizes, expert_sizes, base.seq_len,
                           tuple(dict.fromkeys(("1f1b", *schedules))), megatron):
        try:
            spec = _spec_for(base, layout, model.arch.num_layers)
            tokens, step, parts = _throughput(model, spec, layout, per_node, links)
            if layout.virtual > 1:
                interleaved.append((tokens / step, layout, spec, tokens, step, parts))
                continue
            peak = _peak(model, spec)
        except (UsageError, UnsupportedModelError) as error:  # the run's other settings do not go with this layout
            refused.append(str(error))
            continue
        capacity = gpu.usable_for(spec)
        plain[layout] = peak <= capacity
        if layout.pp == 1 or "1f1b" in schedules:
            candidates.append(Candidate(layout, peak, capacity, peak <= capacity, tokens, step, tokens / step, parts,
                                        layout_flags(spec)))
    passed, beyond = 0, 0
    # (torch's Interleaved1F1B warms rank r up with (v-1) pp + 2 (pp-1-r) forwards of 1/v of its layers each, at least
    # the pp - r whole micro-batches 1F1B keeps: where the same layout with 1F1B does not fit, neither does this one)
    for rate, layout, spec, tokens, step, parts in sorted(interleaved, key=lambda item: -item[0]):
        if not plain.get(dataclasses.replace(layout, schedule="1f1b", virtual=1), True):
            beyond += 1
            continue
        best = sorted((c.tokens_per_second for c in candidates if c.fits), reverse=True)
        if len(best) >= INTERLEAVED_SEARCH_DEPTH and rate <= best[INTERLEAVED_SEARCH_DEPTH - 1]:
            passed += 1
            continue
        try:
            peak = _peak(model, spec)
        except (UsageError, UnsupportedModelError) as error:
            refused.append(str(error))
            continue
        capacity = gpu.usable_for(spec)
        candidates.append(Candidate(layout, peak, capacity, peak <= capacity, tokens, step, rate, parts,
                                    layout_flags(spec)))
    if passed or beyond:
        notes.append(f"{passed + beyond} interleaved layouts not estimated: {beyond} whose 1F1B layout does not fit "
                     "(interleaved 1F1B holds at least as many micro-batches' activations a rank), "
                     f"{passed} that the throughput model ranks below the {INTERLEAVED_SEARCH_DEPTH} best that fit")
    if refused:
        notes.append(f"{len(refused)} layouts left out: the run's settings are not modelled with them ({refused[0]})")
    candidates.sort(key=lambda c: (not c.fits, -c.tokens_per_second, c.peak_bytes))
    notes.append("data parallelism over tensor-parallel groups and pipeline stages is composed from memcalc's models "
                 "of each (measured apart: DDP/FSDP2 ranks, tensor-parallel ranks, pipeline stages)")
    searched = " and ".join({"1f1b": "1F1B", "interleaved-1f1b": f"interleaved 1F1B ({INTERLEAVED_STAGES_PER_RANK} "
                                                                  "stages a rank)"}[s] for s in schedules)
    notes.append(f"pipelines are searched with {searched} and 2 x pp micro-batches (with context parallelism, FSDP2 "
                 f"over the stage's ranks only, torchtitan's layout, and at least {MIN_PIPELINE_CONTEXT_LOCAL:,} "
                 "positions a rank); "
                 + ("interleaved 1F1B (--plan-schedules 1f1b,interleaved-1f1b) and zero-bubble (--pp-schedule) are "
                    "estimated for a layout you give, not searched" if "interleaved-1f1b" not in schedules else
                    "zero-bubble (--pp-schedule) is estimated for a layout you give, not searched"))
    return LayoutPlan(candidates, gpus, per_node, key or DEFAULT_LINKS, links[3], time.perf_counter() - started, notes)
