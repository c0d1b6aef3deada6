"""Does the per-GPU peak fit a GPU, with what headroom, and which changes would make it fit, cheapest first.

usable = GPU memory (nvidia-smi total) - CUDA context - allocator reserve; each is a named term.

When it does not fit, ``check_fit`` searches combinations of the changes in ``_dimensions``, one dimension per
lever: precision (drop the fp32 master), optimizer (fused implementation, 8-bit states, Adafactor), LoRA or QLoRA,
full checkpointing, sdpa attention, micro-batch 1 (the same tokens through --grad-accum), ZeRO stage (several
GPUs), ZeRO-Offload, and more GPUs with ZeRO-3. Each change has a cost in points (``COSTS``: rough and relative,
with the reason for each); a combination costs the sum of its changes.
  1. Every change alone is estimated first (the GPU count by bisection over ``SUGGESTED_GPU_COUNTS``): these are
     listed whether or not they fit.
  2. Best-first: combinations leave a priority queue in order of cost, fewer changes first at equal cost.
  3. A combination that fits ends its branch (adding a change only adds cost); a combination that contains a
     fitting one is not estimated.
  4. Dominance: a combination that does not fit is expanded only if its peak is lower, by more than
     ``DOMINANCE_TOLERANCE`` of the usable memory, than that of every cheaper combination estimated so far
     (which do not fit either); otherwise a cheaper one is as good.
  5. Diminishing returns: a change that lowered the peak by less than that tolerance when added to a combination
     is not added to larger combinations whose peak is in the same phase (see ``_search``).
  6. The search stops when it holds ``MAX_FITTING_SUGGESTIONS`` fitting combinations no dearer than anything left
     in the queue, when the queue is empty, or at ``SEARCH_ESTIMATE_BUDGET`` engine estimates (a few ms each).
Each fitting combination then gets the largest micro-batch that fits with it (``largest_fitting``).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memcalc.errors import MemcalcError
from memcalc.nccl import (
    ALL_TO_ALL_READING,
    MEGATRON_GROUPS_READING,
    OTHER_GROUPS,
    Communicator,
    channels_for,
    communicators,
    node_size,
)
from memcalc.nccl import DEFAULTS as NCCL_DEFAULTS
from memcalc.nccl import Environment as NcclEnvironment
from memcalc.nccl import Layout as NcclLayout
from memcalc.optimizers import OptimImpl, OptimizerName
from memcalc.precision import PrecisionName
from memcalc.report import Fit, FitSuggestion, NcclCommunicator, Report
from memcalc.spec import (
    MAX_TOKENS,
    ActivationSource,
    Attention,
    Checkpointing,
    Offload,
    Sharding,
    TrainingSpec,
    setting_of,
)
from memcalc.units import BYTES_PER_MIB

# The CUDA context (driver, kernels, cuBLAS/cuDNN handles) is outside PyTorch's allocator. With lazy
# module loading (CUDA >= 11.7) it is about 300 MB (pytorch/pytorch#107667, ptrblck); 512 MiB leaves room
# for library handles and workspaces. An assumption, printed with every verdict; override --cuda-context.
DEFAULT_CUDA_CONTEXT_BYTES = 512 * BYTES_PER_MIB
# Measured contexts by compute capability: the device memory in use (cudaMemGetInfo) less what the caching allocator
# reserved (memcalc.measure.cuda.cuda_context_bytes), by benchmarks/gpu_validation.py on a lent GPU
# (docs/accuracy-gpu.md), read once a process had run training steps. With lazy module loading (CUDA's default) the
# context grows as kernels are first launched: on the H200 648,871,936 B after the first kernel, 785,186,816 B after a
# bf16 matmul's forward and backward (cuBLAS), 804,061,184 B after a small Llama training step, and 806,158,336 B in
# the harness's process after presets, eager attention, offloading and Liger's Triton kernels had run; the last is
# the figure (the first, used before, was 157 MB short of a training process). CUDA_MODULE_LOADING=EAGER loads every
# module at once: 1,955,397,632 B after the step (--cuda-context for such a run). Used for a --gpu preset of that
# generation (its kernels and libraries are the same ones; another torch or CUDA release loads other amounts: the
# output says which run it was).
MEASURED_CUDA_CONTEXTS = {
    "9.0": (806_158_336, ("measured 2026-12-04 on an H200 (sm 9.0) after training steps, lazy module loading: "
                          "torch 2.11.0+cu130, CUDA 13.0, driver 580.159.04; CUDA_MODULE_LOADING=EAGER took "
                          "1,955,397,632 B")),
}
CUDA_CONTEXT_ASSUMED = "assumed (no measurement for this GPU generation)"
# A generation without a measurement: its context estimated from the card. The bare context (a process's first CUDA
# call, no kernel launched yet) grows with the threads the card can hold at once: the driver reserves local memory for
# every resident thread (the default stack, cudaLimitStackSize 1 KiB, among it). Published bare contexts, lazy module
# loading, read in nvidia-smi (card, SMs, resident threads per SM, MiB, source):
PUBLISHED_BARE_CONTEXTS = (
    ("H100 SXM", 132, 2048, 534, "meta-pytorch/torchcomms PR #777: 'On H100, each primary context costs ~534 MiB'"),
    ("B200", 148, 2048, 612, "unslothai/unsloth PR #8669: torch.cuda.mem_get_info in a fresh process, 612 MiB"),
    ("RTX 6000 Ada", 142, 1536, 426, "unslothai/unsloth-zoo PR #1053: torch 2.10.0+cu130, mem_get_info, 426 MiB"),
    ("RTX 3090", 82, 1536, 256, "invoke-ai/InvokeAI #9413: torch 2.7.1+cu128, an idle server's context, 256 MiB"),
    ("RTX PRO 6000 Blackwell", 188, 1536, 555, "ggml-org/llama.cpp PR #23604: cudaMemGetInfo's context, 555 MiB"),
    ("RTX 4060 Ti", 34, 1536, 107, "ggml-org/llama.cpp PR #23604: cudaMemGetInfo's context, 107 MiB"),
)
# Per resident thread they read 2,015 to 2,149 B; the largest is taken, so none of those cards' bare part comes out low.
BYTES_PER_RESIDENT_THREAD = max(-(-mib * BYTES_PER_MIB // (sms * threads))
                                for _card, sms, threads, mib, _source in PUBLISHED_BARE_CONTEXTS)
# CUDA C++ Programming Guide, "Maximum number of resident threads per SM", by compute capability
RESIDENT_THREADS_PER_SM = {"7.0": 2048, "7.5": 1024, "8.0": 2048, "8.6": 1536, "8.7": 2048, "8.9": 1536, "9.0": 2048,
                           "10.0": 2048, "12.0": 1536}
# What a training process holds beyond its bare context (the kernels and libraries its step loads: cuBLAS, autograd's,
# the optimizer's): the H200's measured context less its bare part by the rule above (132 SMs x 2,048 threads).
MEASURED_CONTEXT_CARD = (132, 2048)  # the H200 the sm 9.0 figures were measured on
_MEASURED_CARD_BARE = MEASURED_CONTEXT_CARD[0] * MEASURED_CONTEXT_CARD[1] * BYTES_PER_RESIDENT_THREAD
TRAINING_CONTEXT_BEYOND_BARE = MEASURED_CUDA_CONTEXTS["9.0"][0] - _MEASURED_CARD_BARE
# CUDA_MODULE_LOADING=EAGER (read from the environment, as the CUDA driver reads it) loads every module of every
# library at the first call: on the same H200 1,955,397,632 B once the step had run (benchmarks/gpu-runs/
# 2026-12-04-h200-b, --context)
MEASURED_EAGER_CUDA_CONTEXTS = {
    "9.0": (1_955_397_632, ("measured 2026-12-04 on an H200 (sm 9.0) after a training step with "
                            "CUDA_MODULE_LOADING=EAGER (from the environment): torch 2.11.0+cu130, CUDA 13.0")),
}
EAGER_CONTEXT_BEYOND_BARE = MEASURED_EAGER_CUDA_CONTEXTS["9.0"][0] - _MEASURED_CARD_BARE


def cuda_context_for(compute_capability: str | None, sms: int | None = None,
                     module_loading: str | None = None) -> tuple[int, str]:
    """The CUDA context for a card of this compute capability (and this many SMs), and where the figure comes from:
    measured for its generation; else estimated from its resident threads (PUBLISHED_BARE_CONTEXTS); else assumed.
    ``module_loading``: $CUDA_MODULE_LOADING (EAGER loads every module at once; LAZY, the default, as kernels run)."""
    rocm = (compute_capability or "").startswith("gfx")  # (an AMD card: CUDA's module loading does not apply)
    eager = (module_loading or "").strip().upper() == "EAGER" and not rocm
    measured = MEASURED_EAGER_CUDA_CONTEXTS if eager else MEASURED_CUDA_CONTEXTS
    if compute_capability in measured:
        return measured[compute_capability]
    threads = RESIDENT_THREADS_PER_SM.get(compute_capability or "")
    if sms is None or threads is None:
        if eager:
            figure, _source = MEASURED_EAGER_CUDA_CONTEXTS["9.0"]
            return figure, ("assumed: CUDA_MODULE_LOADING=EAGER (from the environment) with no measurement for this "
                            "card; the H200's eager context")
        return DEFAULT_CUDA_CONTEXT_BYTES, CUDA_CONTEXT_ASSUMED
    bare = sms * threads * BYTES_PER_RESIDENT_THREAD
    beyond = EAGER_CONTEXT_BEYOND_BARE if eager else TRAINING_CONTEXT_BEYOND_BARE
    return bare + beyond, (
        f"estimated, not measured for this generation: {sms} SMs x {threads:,} resident threads x "
        f"{BYTES_PER_RESIDENT_THREAD:,} B (the bare context per thread, the largest of {len(PUBLISHED_BARE_CONTEXTS)} "
        f"published readings, memcalc/fit.py) + {beyond / BYTES_PER_MIB:,.0f} MiB a training process held beyond its "
        "bare context on an H200 (measured), "
        + ("CUDA_MODULE_LOADING=EAGER (from the environment)" if eager else "lazy module loading"))


# Memory the caching allocator reserves but cannot hand out (fragmentation, block rounding): reserved
# minus allocated at the peak. An assumption of 5% of the GPU, printed; override with --reserve-fraction.
DEFAULT_ALLOCATOR_RESERVE_FRACTION = 0.05

# GPU counts tried when suggesting ZeRO-3 over more GPUs.
SUGGESTED_GPU_COUNTS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
# The LoRA rank suggested when the run trains every weight (PEFT examples commonly use 8-64).
SUGGESTED_LORA_RANK = 16

# Engine estimates the change search may run, the single changes (at most about 16) included. One estimate takes
# 1-2 ms for an 8B model and 5-20 ms for a 70B one, so a whole --gpu run of a 70B model stays well under a second.
# The cases tried end on their own after 20-60 estimates; the budget bounds the rest.
SEARCH_ESTIMATE_BUDGET = 64
# A combination that does not fit is expanded only when its peak is below that of every cheaper one that does
# not fit by more than this share of the usable memory (epsilon-dominance): a change that saves a few hundred
# MiB of a 195 GiB peak (8-bit states of LoRA adapters) does not open a branch of its own.
DOMINANCE_TOLERANCE = 0.01
# Fitting combinations reported; the search stops when it has found this many.
MAX_FITTING_SUGGESTIONS = 5
# Estimates one ``largest_fitting`` may run. It usually needs 2-4 (the peak is close to linear in the micro-batch);
# interpolation alternating with bisection needs at most about 2 log2(range) = 60 for a 10^9-token range.
LARGEST_FITTING_ESTIMATE_BUDGET = 64
# The same for the largest micro-batch shown beside each fitting suggestion (a range of about 2^19 at 2048 tokens).
SUGGESTION_BATCH_ESTIMATE_BUDGET = 16
# Everything check_fit may run for one verdict: the search, each fitting suggestion's largest micro-batch, the HF
# Trainer recipe, and the --max-batch and --max-seq-len solvers.
FIT_ESTIMATE_BUDGET = (SEARCH_ESTIMATE_BUDGET + MAX_FITTING_SUGGESTIONS * SUGGESTION_BATCH_ESTIMATE_BUDGET + 1
                       + 2 * LARGEST_FITTING_ESTIMATE_BUDGET)


@dataclass(frozen=True, eq=False, repr=False)
class GpuTarget:
    name: str
    memory_bytes: int
    source: str
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES
    reserve_fraction: float = DEFAULT_ALLOCATOR_RESERVE_FRACTION
    # --reserved: the allocator's reserved bytes beyond the tensors at the step's reserved peak (memcalc.allocator
    # replay of the asked run), used in place of the assumed fraction; the change search applies the same bytes to
    # the changed runs it estimates
    predicted_reserve_bytes: int | None = None
    compute_capability: str | None = None  # the preset's (None for --gpu-memory): sizes the cuBLAS workspaces
    cuda_context_source: str = CUDA_CONTEXT_ASSUMED  # where cuda_context_bytes comes from (cuda_context_for, or given)
    # how one node's cards are joined (the preset's; None for --gpu-memory) and the NCCL_* settings read: NCCL's
    # buffers per communicator (memcalc.nccl), deducted from the usable memory of each layout (usable_for)
    interconnect: str | None = None
    nccl_env: NcclEnvironment = NCCL_DEFAULTS
    nccl_channels: tuple[int, int, int, int] | None = None  # --nccl-channels COLL,NVLS,P2P,PER_PEER (given)

    @property
    def reserve_bytes(self) -> int:
        if self.predicted_reserve_bytes is not None:
            return self.predicted_reserve_bytes
        return round(self.memory_bytes * self.reserve_fraction)

    @property
    def capacity_bytes(self) -> int:
        """What the caching allocator may reserve: the memory less the CUDA context."""
        return self.memory_bytes - self.cuda_context_bytes

    @property
    def workspace_bytes(self) -> int:
        """The cuBLAS workspaces the caching allocator makes in the first step and keeps beside the tensors, one per
        handle (the forward's thread and autograd's device thread; memcalc.allocator.cublas_workspace_bytes, 2 x 32
        MiB on an H200: its steps' requested peaks held them, docs/accuracy-gpu.md), and the 1 MiB per thread a
        biased Linear's first step keeps (memcalc.allocator.CUBLASLT_WORKSPACE; counted whether the model has biases
        or not); 0 under --reserved, whose replay holds the workspaces; a card not known (--gpu-memory) takes the
        larger size."""
        if self.predicted_reserve_bytes is not None:
            return 0
        from memcalc.allocator import (
            CUBLAS_HANDLES_PER_STEP,
            CUBLAS_WORKSPACE_LARGE,
            CUBLASLT_WORKSPACE,
            step_workspace_bytes,
        )

        return (step_workspace_bytes(self.compute_capability, unknown=CUBLAS_WORKSPACE_LARGE)
                + CUBLAS_HANDLES_PER_STEP * CUBLASLT_WORKSPACE)

    @property
    def usable_bytes(self) -> int:
        """What the tensors of a one-GPU run may use (a layout over several GPUs: usable_for)."""
        return self.memory_bytes - self.cuda_context_bytes - self.workspace_bytes - self.reserve_bytes

    def nccl(self, spec: TrainingSpec) -> tuple[list[Communicator], str]:
        """The NCCL communicators of the most loaded rank of ``spec``'s layout on this card, and a note when their
        counts are a bound or not modelled (memcalc.nccl)."""
        if spec.num_gpus <= 1:
            return [], ""
        channels, note = channels_for(self.interconnect, self.compute_capability)
        if channels is None:
            return [], note
        if self.nccl_channels is not None:  # the card's buffers (its reads, its links), the run's own counts
            coll, nvls, p2p, per_peer = self.nccl_channels
            channels = dataclasses.replace(channels, collective=coll, nvls=nvls, p2p=p2p, per_peer=per_peer,
                                           source="given (--nccl-channels)")
            note = ""
        layout = NcclLayout(channels, self.nccl_env, node_size(spec))
        comms = communicators(spec, layout)
        notes = [note or channels.described()]
        if len(comms) > 1 or spec.engine == "megatron":
            notes.append(OTHER_GROUPS.format(init=f"{layout.fixed(nvls=False) / 2**20:,.0f} MiB"))
        if spec.engine == "megatron":
            notes.append(MEGATRON_GROUPS_READING)
        if spec.num_nodes == 1 and spec.num_gpus > node_size(spec):
            notes.append(f"nodes of {node_size(spec)} GPUs assumed (--nodes to say)")
        if self.nccl_env.settings():
            notes.append("from the environment: " + ", ".join(self.nccl_env.settings()))
        if any("all-to-all" in c.runs for c in comms):
            notes.append(ALL_TO_ALL_READING)
        return comms, "; ".join(notes)

    def usable_for(self, spec: TrainingSpec) -> int:
        """usable_bytes less the NCCL buffers of ``spec``'s layout (none on one GPU)."""
        return self.usable_bytes - sum(c.bytes for c in self.nccl(spec)[0])


# ---------------------------------------------------------------------------------------------------------
# The cost model: rough relative costs, not measurements.
# One point is about one percent more step time or GPU-hours of the run as given; quality entries are ordinal
# penalties put on the same scale by judgement (how much a careful user would pay in compute to avoid them).
# A combination costs the sum of its levers' points, which is how suggestions are ranked.


@dataclass(frozen=True)
class LeverCost:
    points: float
    kind: str  # compute | hardware | quality
    reason: str


COST_MODEL = ("cost: rough relative points, not measurements; 1 point ~ 1% more step time or GPU-hours, "
              "quality penalties are judgements on the same scale")

LEVER_FUSED = "fused optimizer"
LEVER_SDPA = "sdpa attention"
LEVER_ZERO = {1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
LEVER_BATCH_1 = "micro-batch 1"
LEVER_AUTOCAST = "autocast"
LEVER_PURE = "pure 16-bit"
LEVER_8BIT = "8-bit optimizer"
LEVER_ADAFACTOR = "Adafactor"
LEVER_IN_BACKWARD = "optimizer step in backward"
LEVER_CHECKPOINTING = "full checkpointing"
LEVER_LORA = "LoRA"
LEVER_4BIT = "4-bit base"
LEVER_OFFLOAD_OPTIMIZER = "optimizer offload"
LEVER_OFFLOAD_PARAMS = "parameter offload"
LEVER_MORE_GPUS = "more GPUs"

COSTS: dict[str, LeverCost] = {
    LEVER_FUSED: LeverCost(0, "compute", "the same update in one fused kernel, usually the fastest of torch.optim's "
                           "implementations; needs floating-point parameters on the GPU"),
    LEVER_SDPA: LeverCost(0, "compute", "the same attention in a fused kernel that keeps no s^2 scores; usually faster "
                          "than eager"),
    LEVER_ZERO[1]: LeverCost(2, "compute", "optimizer states partitioned: the same communication volume as data "
                             "parallelism (Rajbhandari et al. 2020, sec. 7)"),
    LEVER_ZERO[2]: LeverCost(3, "compute", "gradients partitioned too: reduce-scatter instead of all-reduce, the same "
                             "volume (Rajbhandari et al. 2020, sec. 7)"),
    LEVER_ZERO[3]: LeverCost(15, "compute", "parameters gathered for every forward and backward: 1.5x the "
                             "communication of data parallelism (Rajbhandari et al. 2020, sec. 7.2.2), partly hidden "
                             "by prefetch"),
    LEVER_BATCH_1: LeverCost(10, "compute", "the same tokens per optimizer step through --grad-accum, in smaller "
                             "matmuls that use the GPU less well"),
    LEVER_AUTOCAST: LeverCost(2, "compute", "fp32 to torch.autocast: the usual mixed precision, faster; small "
                              "numerical change"),
    LEVER_PURE: LeverCost(20, "quality", "no fp32 master copy: updates smaller than bf16's rounding step are lost "
                          "(Zamirai et al. 2020; Kahan summation or stochastic rounding mitigate it)"),
    LEVER_8BIT: LeverCost(10, "quality", "block-wise 8-bit optimizer states: a small quality risk (Dettmers et al. "
                          "2022 report 32-bit quality on their benchmarks)"),
    LEVER_ADAFACTOR: LeverCost(25, "quality", "a different optimizer (factored second moment, Shazeer and Stern "
                               "2018): different dynamics, may need new hyperparameters"),
    LEVER_IN_BACKWARD: LeverCost(5, "quality", "each parameter stepped as soon as its gradient exists (torchtune "
                                 "optimizer_in_bwd): no gradient accumulation and no clipping by the global gradient "
                                 "norm; the same update otherwise"),
    LEVER_CHECKPOINTING: LeverCost(33, "compute", "one more forward per step: 4/3 of the step's FLOPs when the "
                                   "backward is twice the forward (Chen et al. 2016; Korthikanti et al. 2022 measure "
                                   "29% faster steps without it on a 530B model)"),
    LEVER_LORA: LeverCost(40, "quality", "trains a low-rank update of some layers, not every weight: a different "
                          "result from full fine-tuning (Hu et al. 2021; Biderman et al. 2024)"),
    LEVER_4BIT: LeverCost(10, "quality", "QLoRA's frozen base in 4-bit NF4: quantization error in the base and "
                          "dequantization in every matmul (Dettmers et al. 2023)"),
    LEVER_OFFLOAD_OPTIMIZER: LeverCost(40, "compute", "the optimizer step on the CPU, gradients and parameters over "
                                       "PCIe every step (Ren et al. 2021, ZeRO-Offload): slower unless batches "
                                       "are large"),
    LEVER_OFFLOAD_PARAMS: LeverCost(40, "compute", "ZeRO-3 parameter shards fetched from CPU RAM over PCIe for every "
                                    "forward and backward"),
    LEVER_MORE_GPUS: LeverCost(100, "hardware", "proportional to the GPU count: 100 points for each further copy of "
                               "the GPUs the run has"),
}


# ---------------------------------------------------------------------------------------------------------
# The changes searched.


@dataclass(frozen=True)
class _Option:
    changes: tuple[tuple[str, Any], ...]  # TrainingSpec fields; zero_stage combines as the highest asked
    costs: tuple[tuple[str, float], ...]  # (lever, points)


@dataclass(frozen=True)
class _Dimension:
    name: str
    options: tuple[_Option, ...]
    ordered: bool = False  # options are levels (more GPUs): a combination steps to the next one


def _option(changes: dict[str, Any], *costs: tuple[str, float]) -> _Option:
    return _Option(tuple(changes.items()), tuple(costs))


def _changed(spec: TrainingSpec, changes: dict[str, Any]) -> TrainingSpec:
    """The run with ``changes``. A suggested LoRA counts its activations by the rules (full fine-tuning's, high):
    tracing the LoRA step would import torch on the estimate path. The run given --lora-rank is traced."""
    if "lora_rank" in changes and spec.lora_rank is None and spec.activations == ActivationSource.auto:
        changes = {**changes, "activations": ActivationSource.rules}
    return spec.replace(**changes)


def _lever(name: str) -> tuple[str, float]:
    return name, COSTS[name].points


def _zero_points(stage: int) -> float:
    return COSTS[LEVER_ZERO[stage]].points if stage else 0.0


@dataclass(frozen=True)
class ConfigOwner:
    """A DeepSpeed config the run was read from, and the TrainingSpec fields it sets: a suggestion changes those in
    the config (its keys named), never as flags, which would contradict it; the ones a config cannot say are not
    suggested."""

    path: str
    fields: frozenset[str]


# TrainingSpec field -> the DeepSpeed config key a suggestion edits (offload: _config_edits spells the devices).
DEEPSPEED_CONFIG_KEYS = {"zero_stage": "zero_optimization.stage", "micro_batch_size": "train_micro_batch_size_per_gpu",
                         "grad_accum": "gradient_accumulation_steps", "offload": "zero_optimization.offload_*.device"}


def _dimensions(spec: TrainingSpec, architecture_known: bool, owner: ConfigOwner | None = None) -> list[_Dimension]:
    """The levers that apply to ``spec``, each with its options (alternatives, or levels for the GPU count);
    with a config ``owner``, none that changes what the config sets in a way no config key expresses."""
    dims: list[_Dimension] = []
    fixed = owner.fields - DEEPSPEED_CONFIG_KEYS.keys() if owner is not None else frozenset()

    def add(name: str, options: list[_Option], ordered: bool = False) -> None:
        options = [o for o in options if not any(key in fixed for key, _ in o.changes)]
        if options:
            dims.append(_Dimension(name, tuple(options), ordered))

    pure = {PrecisionName.bf16: PrecisionName.bf16_pure, PrecisionName.fp16: PrecisionName.fp16_pure,
            PrecisionName.amp_bf16: PrecisionName.bf16_pure, PrecisionName.amp_fp16: PrecisionName.fp16_pure}
    if spec.precision in pure:
        add("precision", [_option({"precision": pure[spec.precision]}, _lever(LEVER_PURE))])
    elif spec.precision == PrecisionName.fp32:
        add("precision", [_option({"precision": PrecisionName.amp_bf16}, _lever(LEVER_AUTOCAST)),
                          _option({"precision": PrecisionName.bf16_pure}, _lever(LEVER_AUTOCAST), _lever(LEVER_PURE))])
    # One dimension: the fused implementation changes nothing for 8-bit AdamW or Adafactor.
    adam_like = (OptimizerName.adamw, OptimizerName.adam, OptimizerName.lion)
    leave = {"amsgrad": False} if spec.amsgrad else {}
    optimizers: list[_Option] = []
    if spec.optimizer in adam_like and spec.optim_impl != OptimImpl.fused:
        optimizers.append(_option({"optim_impl": OptimImpl.fused}, _lever(LEVER_FUSED)))
    if spec.optimizer in adam_like:
        optimizers.append(_option({"optimizer": OptimizerName.adamw_8bit, **leave}, _lever(LEVER_8BIT)))
    if spec.optimizer in (*adam_like, OptimizerName.adamw_8bit):
        optimizers.append(_option({"optimizer": OptimizerName.adafactor, **leave}, _lever(LEVER_ADAFACTOR)))
    add("optimizer", optimizers)
    if not spec.optim_in_backward and spec.grad_accum == 1 and not spec.zero_stage and spec.offload == Offload.none:
        add("optimizer step", [_option({"optim_in_backward": True}, _lever(LEVER_IN_BACKWARD))])
    if architecture_known and spec.lora_rank is None:
        add("lora", [_option({"lora_rank": SUGGESTED_LORA_RANK}, _lever(LEVER_LORA)),
                     _option({"lora_rank": SUGGESTED_LORA_RANK, "qlora": True},
                             _lever(LEVER_LORA), _lever(LEVER_4BIT))])
    elif architecture_known and not spec.qlora:
        add("lora", [_option({"qlora": True}, _lever(LEVER_4BIT))])
    if architecture_known and spec.checkpointing == Checkpointing.none:
        add("checkpointing", [_option({"checkpointing": Checkpointing.full}, _lever(LEVER_CHECKPOINTING))])
    if spec.attention == Attention.eager:
        add("attention", [_option({"attention": Attention.sdpa}, _lever(LEVER_SDPA))])
    if spec.micro_batch_size > 1:
        add("micro_batch", [_option({"micro_batch_size": 1, "grad_accum": spec.grad_accum * spec.micro_batch_size},
                                    _lever(LEVER_BATCH_1))])
    if spec.num_gpus > 1:
        add("zero", [_option({"zero_stage": stage},
                             (LEVER_ZERO[stage], _zero_points(stage) - _zero_points(spec.zero_stage)))
                     for stage in range(spec.zero_stage + 1, 4)])
    if spec.sharding == Sharding.deepspeed and spec.offload == Offload.none:
        # DeepSpeed ZeRO-Offload runs on ZeRO-2 (optimizer) or ZeRO-3 (parameters too)
        add("offload", [
            _option({"offload": Offload.optimizer, "zero_stage": max(spec.zero_stage, 2)},
                    _lever(LEVER_OFFLOAD_OPTIMIZER)),
            _option({"offload": Offload.both, "zero_stage": 3},
                    _lever(LEVER_OFFLOAD_OPTIMIZER), _lever(LEVER_OFFLOAD_PARAMS)),
        ])
    counts = [n for n in SUGGESTED_GPU_COUNTS if n > spec.num_gpus and n % spec.num_nodes == 0]
    # (under HSDP more GPUs are more replicas of the same shard group, whose ranks hold what they held: not offered)
    if counts and spec.dp_replicate == 1:
        extra = {"sharding": Sharding.fsdp} if spec.sharding == Sharding.torch else {}
        zero_3 = (LEVER_ZERO[3], _zero_points(3) - _zero_points(spec.zero_stage))
        add("gpus", [_option({"num_gpus": n, "zero_stage": 3, **extra},
                             (LEVER_MORE_GPUS, COSTS[LEVER_MORE_GPUS].points * (n - spec.num_gpus) / spec.num_gpus),
                             *([zero_3] if zero_3[1] else []))
                     for n in counts], ordered=True)
    return dims


_State = tuple[tuple[int, int], ...]  # (dimension index, option index), sorted by dimension


def _merge(dims: list[_Dimension], state: _State) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for dim, opt in state:
        for key, value in dims[dim].options[opt].changes:
            changes[key] = max(changes.get(key, value), value) if key == "zero_stage" else value
    return changes


def _costs(dims: list[_Dimension], state: _State) -> dict[str, float]:
    parts: dict[str, float] = {}
    for dim, opt in state:
        for lever, points in dims[dim].options[opt].costs:
            parts[lever] = max(parts.get(lever, points), points) if lever in LEVER_ZERO.values() else points
    return parts


# Flags in the order they are printed.
# The fields a change may touch, in the order a command line lists their flags.
_CHANGED_FIELDS = ("precision", "optimizer", "amsgrad", "optim_impl", "optim_in_backward", "lora_rank", "qlora",
                   "checkpointing", "attention",
                   "micro_batch_size", "grad_accum", "sharding", "zero_stage", "num_gpus", "offload")


def _command_line(spec: TrainingSpec, changes: dict[str, Any], owner: ConfigOwner | None = None) -> str:
    """The changes as the command-line flags that make them, e.g. '--lora-rank 16 --qlora --checkpointing full';
    what a config ``owner`` sets, as edits of its keys ('in ds.json: zero_optimization.stage 3')."""
    words, edits = [], []
    for field_name in _CHANGED_FIELDS:
        flag = "--" + setting_of(field_name).replace("_", "-")
        if field_name not in changes or changes[field_name] == getattr(spec, field_name):
            continue
        value = changes[field_name]
        if owner is not None and field_name in owner.fields:
            edits.extend(_config_edits(field_name, value))
        elif isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words.append(f"{flag} {getattr(value, 'value', value)}")
    if edits:
        assert owner is not None
        return "; ".join(part for part in (" ".join(words), f"in {owner.path}: {', '.join(edits)}") if part)
    return " ".join(words)


def _config_edits(field_name: str, value: Any) -> list[str]:
    if field_name == "offload":
        from memcalc.configs.deepspeed import OFFLOAD_DEVICES

        devices = OFFLOAD_DEVICES[Offload(value).value]
        return [f"zero_optimization.offload_optimizer.device {devices[0]}",
                f"zero_optimization.offload_param.device {devices[1]}"]
    return [f"{DEEPSPEED_CONFIG_KEYS[field_name]} {getattr(value, 'value', value)}"]


def _plain(changes: dict) -> dict:
    """JSON-ready spec changes (enums as their values)."""
    return {key: getattr(value, "value", value) for key, value in changes.items()}


class _Estimates:
    """The peak (and its phase) of a changed spec, each spec estimated once; counts the engine runs."""

    def __init__(self, rerun: Callable[[TrainingSpec], Report]) -> None:
        self.rerun = rerun
        self.count = 0
        self._results: dict[TrainingSpec, tuple[int, str] | str] = {}

    def known(self, spec: TrainingSpec) -> bool:
        return spec in self._results

    def remember(self, spec: TrainingSpec, report: Report) -> None:
        phase = report.per_gpu.peak_phase
        self._results[spec] = (report.per_gpu.peak_bytes, getattr(phase, "value", str(phase)))

    def result(self, spec: TrainingSpec) -> tuple[int, str] | str:
        """(per-GPU peak, its phase), or the error message when the engine rejects the spec."""
        if spec not in self._results:
            self.count += 1
            try:
                self.remember(spec, self.rerun(spec))
            except MemcalcError as error:
                self._results[spec] = str(error)
        return self._results[spec]

    def peak(self, spec: TrainingSpec) -> int | str:
        result = self.result(spec)
        return result if isinstance(result, str) else result[0]

    def spec_peak(self, spec: TrainingSpec, changes: dict[str, Any]) -> tuple[TrainingSpec | None, int | str]:
        try:
            changed = _changed(spec, changes)
        except MemcalcError as error:
            return None, str(error)
        return changed, self.peak(changed)


@dataclass
class _Found:
    state: _State
    spec: TrainingSpec
    peak_bytes: int
    fits: bool


def _suggestion(spec: TrainingSpec, dims: list[_Dimension], found: _Found,
                owner: ConfigOwner | None = None) -> FitSuggestion:
    changes = _merge(dims, found.state)
    parts = _costs(dims, found.state)
    return FitSuggestion(
        change=_command_line(spec, changes, owner), peak_bytes=found.peak_bytes, fits=found.fits,
        spec_changes=_plain(changes), cost=float(round(sum(parts.values()), 1)),
        cost_parts={lever: float(round(points, 1)) for lever, points in parts.items()},
    )


def _single_changes(spec: TrainingSpec, dims: list[_Dimension], gpu: GpuTarget, estimates: _Estimates) -> list[_Found]:
    """What each change gives alone; for the GPU count, the fewest GPUs that fit (none listed if none fits)."""
    singles: list[_Found] = []
    for d, dim in enumerate(dims):
        if dim.ordered:  # the peak falls as the count grows: bisect for the first level that fits
            # invariant: level ``low`` does not fit (-1: before the first), level ``high`` fits (past the last)
            low, high = -1, len(dim.options)
            while high - low > 1:
                middle = (low + high) // 2
                changed, peak = estimates.spec_peak(spec, _merge(dims, ((d, middle),)))
                if changed is not None and isinstance(peak, int) and peak <= gpu.usable_for(changed):
                    high = middle
                else:
                    low = middle
            if high < len(dim.options):
                changed, peak = estimates.spec_peak(spec, _merge(dims, ((d, high),)))
                assert changed is not None and isinstance(peak, int)
                singles.append(_Found(((d, high),), changed, peak, True))
            continue
        for o in range(len(dim.options)):
            changed, peak = estimates.spec_peak(spec, _merge(dims, ((d, o),)))
            if changed is not None and isinstance(peak, int):
                singles.append(_Found(((d, o),), changed, peak, peak <= gpu.usable_for(changed)))
    return singles


def _search(spec: TrainingSpec, dims: list[_Dimension], gpu: GpuTarget, estimates: _Estimates,
            budget: int, singles: list[_Found]) -> tuple[list[_Found], bool]:
    """Best-first search over combinations (see the module docstring). Returns the fitting combinations, single
    changes included, and whether the estimate budget stopped the search.

    Besides dominance, one more saving, on the assumption of diminishing returns: a change that lowered the peak
    by less than the dominance tolerance when added to a combination is not added to any larger combination
    whose peak falls in the same phase (8-bit states once LoRA leaves little to optimize; checkpointing while
    the optimizer step is the peak). Where the peak has moved to another phase, it is tried again.
    """
    counter = 0
    # (cost, number of changes, order pushed, combination)
    queue: list[tuple[float, int, int, _State]] = []
    queued: set[_State] = set()
    fitting: list[_Found] = [f for f in singles if f.fits]
    results: dict[_State, tuple[int, str]] = {}  # every combination estimated: (peak, its phase)
    inert: dict[tuple[int, int], list[_State]] = {}  # option -> combinations it hardly lowered when added to
    tolerance = round(gpu.usable_bytes * DOMINANCE_TOLERANCE)

    def without(state: _State, option: tuple[int, int]) -> _State:
        """``state`` less ``option`` (a level of an ordered dimension: the level below)."""
        d, o = option
        rest = dict(state)
        if dims[d].ordered and o > 0:
            rest[d] = o - 1
        else:
            del rest[d]
        return tuple(sorted(rest.items()))

    def blocked(state: _State, option: tuple[int, int]) -> bool:
        """Whether ``option`` hardly helped a combination inside ``state`` whose peak was in ``state``'s phase."""
        phase = results[state][1]
        return any(set(smaller) <= set(state) and results[smaller][1] == phase for smaller in inert.get(option, ()))

    def contains_fitting(state: _State) -> bool:
        return any(set(f.state) <= set(state) for f in fitting)

    def expand(state: _State) -> None:
        nonlocal counter
        chosen = dict(state)
        for d, dim in enumerate(dims):
            if d not in chosen:
                options = range(1) if dim.ordered else range(len(dim.options))
            elif dim.ordered and chosen[d] + 1 < len(dim.options):
                options = range(chosen[d] + 1, chosen[d] + 2)
            else:
                continue
            for o in options:
                following = tuple(sorted({**chosen, d: o}.items()))
                if following in queued or blocked(state, (d, o)) or contains_fitting(following):
                    continue
                queued.add(following)
                counter += 1
                heapq.heappush(queue, (sum(_costs(dims, following).values()), len(following), counter, following))

    base = estimates.result(spec)
    assert not isinstance(base, str)
    results[()] = base
    lowest_unfit = base[0]
    seen_specs: set[TrainingSpec] = {spec}
    expand(())
    while queue:
        cost, _, _, state = heapq.heappop(queue)
        if sum(1 for f in fitting if sum(_costs(dims, f.state).values()) <= cost) >= MAX_FITTING_SUGGESTIONS:
            break  # as many fitting combinations as are reported, none dearer than what is left
        if contains_fitting(state):
            continue  # contains a cheaper fitting combination
        smaller = [(without(state, option), option) for option in state]
        smaller = [(rest, option) for rest, option in smaller if rest in results]
        if any(blocked(rest, option) for rest, option in smaller):
            continue  # adds a change found (nearly) inert in a smaller combination meanwhile
        try:
            changed = _changed(spec, _merge(dims, state))
        except MemcalcError:
            continue  # a combination TrainingSpec rejects (e.g. a ZeRO stage this sharding has not)
        if changed in seen_specs:
            continue  # the same run, reached more cheaply
        if estimates.count >= budget and not estimates.known(changed):
            return fitting, True
        seen_specs.add(changed)
        result = estimates.result(changed)
        if isinstance(result, str):
            continue  # the engine rejects it
        results[state] = result
        peak = result[0]
        for rest, option in smaller:
            if peak > results[rest][0] - tolerance:
                inert.setdefault(option, []).append(rest)
        if peak <= gpu.usable_for(changed):
            fitting.append(_Found(state, changed, peak, True))
            continue
        if peak > lowest_unfit - tolerance:
            continue  # dominated: a cheaper combination that does not fit either peaks no higher (or hardly)
        lowest_unfit = peak
        expand(state)
    return fitting, False


# ---------------------------------------------------------------------------------------------------------
# The largest micro-batch or sequence that fits.

# Why ``largest_fitting`` stopped (``Largest.limit``; Fit.max_*_limit in the JSON).
LIMIT_MEMORY = "memory"  # the next value does not fit
LIMIT_TOKEN_BOUND = "token_bound"  # the next value is beyond TrainingSpec's bound on micro-batch x seq-len
LIMIT_REJECTED = "rejected"  # the next value is refused by the spec or the engine for another reason
LIMIT_NOT_MEMORY = "not_memory"  # the peak does not grow with the value in this estimate: no answer
LIMIT_NONE_FITS = "none_fits"  # not even 1 fits: no answer
LIMIT_BUDGET = "estimate_budget"  # the solver stopped at its estimate budget: the value fits, a larger one may
LIMIT_MODEL = "model_bound"  # the next value is beyond what the model can run (learned position embeddings)


@dataclass(frozen=True)
class Largest:
    value: int | None  # None when memory does not limit it (LIMIT_NOT_MEMORY) or nothing fits (LIMIT_NONE_FITS)
    peak_bytes: int | None  # at ``value``; at 1 for LIMIT_NONE_FITS and LIMIT_NOT_MEMORY; None if 1 is rejected
    limit: str
    reason: str  # the limit in a sentence, without units (render adds the bytes)


def largest_fitting(spec: TrainingSpec, field_name: str, gpu: GpuTarget,
                    rerun: Callable[[TrainingSpec], Report] | _Estimates,
                    budget: int = LARGEST_FITTING_ESTIMATE_BUDGET, cap: tuple[int, str] | None = None,
                    step: int = 1) -> Largest:
    """The largest value of ``field_name`` (micro_batch_size or seq_len) whose peak fits, its peak, and what
    stops it: memory, TrainingSpec's token bound (MAX_TOKENS = micro-batch x seq-len), or nothing at all.

    The peak is a maximum of moments, each close to linear in the micro-batch (and convex in the sequence, with
    eager attention's s^2): interpolating where it crosses the usable memory, with a bisection step whenever
    interpolation moves the same end twice, needs 2-4 estimates for a linear peak and about 2 log2(range)
    at worst (``budget`` bounds them). It stops at what the GPU holds, at the spec's bound, or at ``cap`` (the
    model's own bound and why: GPT-2 learned 1,024 positions), never at an internal cap. ``step``: only its
    multiples are tried (--cp: the sequence cut into 2 cp equal chunks); the search runs on k = value / step.
    """
    estimates = rerun if isinstance(rerun, _Estimates) else _Estimates(rerun)
    label = {"micro_batch_size": "micro-batch", "seq_len": "sequence length"}[field_name]
    other = spec.seq_len if field_name == "micro_batch_size" else spec.micro_batch_size
    bound = MAX_TOKENS // other // step  # TrainingSpec refuses micro-batch x seq-len above MAX_TOKENS
    bound_limit, bound_reason = LIMIT_TOKEN_BOUND, (
        f"{label} {bound * step:,} is the most TrainingSpec accepts here (micro-batch x seq-len <= {MAX_TOKENS:,} "
        "tokens, memcalc/spec.py MAX_TOKENS); the GPU would hold more")
    if cap is not None and cap[0] // step < bound:
        bound, bound_limit, bound_reason = cap[0] // step, LIMIT_MODEL, f"{cap[1]}; the GPU would hold more"
    usable = gpu.usable_for(spec)  # (the layout is the same at every value)
    start = estimates.count
    unit = f" (multiples of {step:,})" if step > 1 else ""

    def probe(k: int) -> int | str:
        return estimates.spec_peak(spec, {field_name: k * step})[1]

    def fits(result: int | str) -> bool:
        return isinstance(result, int) and result <= usable

    if bound < 1:
        return Largest(None, None, LIMIT_REJECTED, f"{label} {step:,} is past the bound: {bound_reason}")
    first = probe(1)
    if not isinstance(first, int):
        return Largest(None, None, LIMIT_REJECTED, f"{label} {step:,} is rejected: {first}")
    if first > usable:
        return Largest(None, first, LIMIT_NONE_FITS, f"not even {label} {step:,} fits")
    top = probe(bound) if bound > 1 else first
    if fits(top):
        assert isinstance(top, int)
        if top == first and bound > 1 and bound_limit != LIMIT_MODEL:
            return Largest(None, first, LIMIT_NOT_MEMORY,
                           f"not limited by memory in this estimate: the peak is the same at {label} {step:,} and "
                           f"{bound * step:,} (nothing in it grows with the {label})")
        return Largest(bound * step, top, bound_limit, bound_reason + unit)
    low, low_peak, high, high_result = 1, first, bound, top
    moved: list[str] = []
    while high - low > 1 and estimates.count - start < budget:
        if isinstance(high_result, int) and moved[-2:] != ["low", "low"] and moved[-2:] != ["high", "high"]:
            crossing = low + (usable - low_peak) * (high - low) / (high_result - low_peak)
            guess = min(max(math.floor(crossing), low + 1), high - 1)
        elif high > 4 * low:
            guess = min(max(math.isqrt(low * high), low + 1), high - 1)  # geometric middle of a wide range
        else:
            guess = (low + high) // 2
        result = probe(guess)
        if fits(result):
            assert isinstance(result, int)
            low, low_peak = guess, result
            moved.append("low")
        else:
            high, high_result = guess, result
            moved.append("high")
    if high - low > 1:  # the budget ran out (a pathological peak): report what is known to fit
        return Largest(low * step, low_peak, LIMIT_BUDGET,
                       f"{label} {low * step:,} fits and {high * step:,} does not; the solver stopped between them "
                       f"after {budget} estimates{unit}")
    if isinstance(high_result, int):
        return Largest(low * step, low_peak, LIMIT_MEMORY, f"{label} {high * step:,} does not fit{unit}")
    return Largest(low * step, low_peak, LIMIT_REJECTED, f"{label} {high * step:,} is rejected: {high_result}")


FIT_ROUNDS = 3  # searches on fitted lengths before the search runs on traced lengths alone


def _longest_sequence(spec: TrainingSpec, gpu: GpuTarget, estimates: _Estimates, cap: tuple[int, str] | None,
                      traced: bool) -> Largest:
    """largest_fitting over the sequence length. With traced activations every new length is a new trace, so the
    search reads lengths off the quadratic through three traced ones (measure.derive.fitted_sequences) and the
    answer is then confirmed with real traces at it and one above it. Where they disagree with the fit (a segment's
    peak moving to another op, a code path changing with the length), the confirming traces become anchors and the
    search runs again on the fit around them; after FIT_ROUNDS it runs on real traces."""
    if not traced:
        return largest_fitting(spec, "seq_len", gpu, estimates, cap=cap, step=2 * spec.cp if spec.cp > 1 else 1)
    from memcalc.measure import derive

    with derive.fitted_sequences():
        for _ in range(FIT_ROUNDS):
            fitted = largest_fitting(spec, "seq_len", gpu, _Estimates(estimates.rerun), cap=cap)
            if fitted.value is None:
                break
            with derive.exact_lengths():
                _, peak = estimates.spec_peak(spec, {"seq_len": fitted.value})
                confirmed = isinstance(peak, int) and peak <= gpu.usable_for(spec)
                if confirmed and fitted.limit == LIMIT_MEMORY:
                    _, above = estimates.spec_peak(spec, {"seq_len": fitted.value + 1})
                    confirmed = isinstance(above, int) and above > gpu.usable_for(spec)
            if confirmed:
                checked = f"{fitted.value:,}" + (f" and {fitted.value + 1:,}" if fitted.limit == LIMIT_MEMORY else "")
                return Largest(fitted.value, peak, fitted.limit,
                               f"{fitted.reason} (searched on traced bytes fitted over the sequence length, then "
                               f"traced at {checked} to confirm)")
    return largest_fitting(spec, "seq_len", gpu, estimates, cap=cap)


# ---------------------------------------------------------------------------------------------------------
# The verdict.

# What HF Trainer runs for memcalc's mixed-precision recipes: TrainingArguments(bf16=True) keeps fp32 weights
# and autocasts (memcalc's amp-bf16); memcalc's bf16 keeps an fp32 master copy (Megatron/DeepSpeed).
HF_TRAINER_RECIPES = {PrecisionName.bf16: PrecisionName.amp_bf16, PrecisionName.fp16: PrecisionName.amp_fp16}


def check_fit(
    report: Report, spec: TrainingSpec, gpu: GpuTarget, rerun: Callable[[TrainingSpec], Report],
    solve_batch: bool = False, solve_seq_len: bool = False, precision_chosen: bool = True,
    seq_len_cap: tuple[int, str] | None = None, config_owner: ConfigOwner | None = None,
) -> Fit:
    """The verdict for ``report``; ``rerun`` re-estimates a changed spec for the suggestions and solvers.

    ``precision_chosen``: whether the user chose the recipe (typed --precision, or a DeepSpeed/trainer config
    set it). When False and the recipe is memcalc's default mixed precision (bf16 or fp16, with an fp32 master
    copy), the verdict also gives the peak of what HF Trainer's bf16=True / fp16=True runs (amp-bf16 /
    amp-fp16: fp32 weights and autocast), since that is what many users mean. ``seq_len_cap``: the longest
    sequence the model can run and why (learned position embeddings), for the --max-seq-len solver.
    ``config_owner``: the DeepSpeed config the run was read from; suggestions edit its keys instead of flags.
    """
    estimates = _Estimates(rerun)
    estimates.remember(spec, report)
    peak = report.per_gpu.peak_bytes
    paged = report.per_gpu.paged_bytes
    if spec.num_gpus > 1:
        gpu.nccl_env.check()  # (a setting no GPU could hold; a one-GPU run has no communicator to refuse it for)
    usable = gpu.usable_for(spec)
    comms, nccl_note = gpu.nccl(spec)
    fits = peak - paged <= usable
    paged_out = max(0, peak - usable) if fits else 0
    suggestions: list[FitSuggestion] = []
    budget_reached = False
    cost_reasons: dict[str, str] = {}
    if not fits:
        dims = _dimensions(spec, report.model.architecture_known, config_owner)
        singles = _single_changes(spec, dims, gpu, estimates)
        fitting, budget_reached = _search(spec, dims, gpu, estimates, SEARCH_ESTIMATE_BUDGET, singles)
        ranked = sorted(fitting, key=lambda f: (sum(_costs(dims, f.state).values()), len(f.state), f.peak_bytes))
        for found in ranked[:MAX_FITTING_SUGGESTIONS]:
            suggestion = _suggestion(spec, dims, found, config_owner)
            best = largest_fitting(found.spec, "micro_batch_size", gpu, estimates, SUGGESTION_BATCH_ESTIMATE_BUDGET)
            suggestion.max_micro_batch_size, suggestion.max_micro_batch_peak_bytes = best.value, best.peak_bytes
            suggestion.max_micro_batch_limit = best.limit
            suggestions.append(suggestion)
        alone = sorted((f for f in singles if not f.fits),
                       key=lambda f: (sum(_costs(dims, f.state).values()), f.peak_bytes))
        suggestions.extend(_suggestion(spec, dims, f, config_owner) for f in alone)
        for suggestion in suggestions:
            for lever in suggestion.cost_parts:
                cost_reasons[lever] = f"{COSTS[lever].kind}: {COSTS[lever].reason}"
    trainer: dict[str, Any] = {}
    trainer_recipe = HF_TRAINER_RECIPES.get(spec.precision)
    if not precision_chosen and trainer_recipe is not None:
        _, trainer_peak = estimates.spec_peak(spec, {"precision": trainer_recipe})
        if isinstance(trainer_peak, int):
            trainer = {"hf_trainer_recipe": trainer_recipe.value, "hf_trainer_peak_bytes": trainer_peak,
                       "hf_trainer_fits": trainer_peak <= usable}
    solved: dict[str, Any] = {}
    if solve_batch:
        best = largest_fitting(spec, "micro_batch_size", gpu, estimates)
        solved.update(max_micro_batch_size=best.value, max_micro_batch_peak_bytes=best.peak_bytes,
                      max_micro_batch_limit=best.limit, max_micro_batch_reason=best.reason)
    if solve_seq_len:
        best = _longest_sequence(spec, gpu, estimates, seq_len_cap, traced=report.training.activations == "trace")
        solved.update(max_seq_len=best.value, max_seq_len_peak_bytes=best.peak_bytes, max_seq_len_limit=best.limit,
                      max_seq_len_reason=best.reason)
    nccl_bytes = gpu.usable_bytes - usable
    return Fit(
        **solved, **trainer,
        gpu=gpu.name, gpu_memory_bytes=gpu.memory_bytes, gpu_memory_source=gpu.source,
        cuda_context_bytes=gpu.cuda_context_bytes, cuda_context_source=gpu.cuda_context_source,
        cublas_workspace_bytes=gpu.workspace_bytes, allocator_reserve_bytes=gpu.reserve_bytes,
        allocator_reserve_predicted=gpu.predicted_reserve_bytes is not None,
        nccl_bytes=nccl_bytes, nccl_communicators=[
            NcclCommunicator(c.group, c.ranks, c.local_ranks, c.runs, c.bytes, dict(c.parts)) for c in comms],
        nccl_note=nccl_note or None,
        usable_bytes=usable, peak_bytes=peak, headroom_bytes=usable - peak, fits=fits,
        nvidia_smi_bytes=(report.per_gpu.reserved_peak_bytes + gpu.cuda_context_bytes + nccl_bytes
                          if report.per_gpu.reserved_peak_bytes is not None
                          else peak - paged_out + gpu.memory_bytes - usable),
        peak_is_lower_bound=not report.model.architecture_known, paged_bytes=paged, paged_out_bytes=paged_out,
        suggestions=suggestions, cost_model=COST_MODEL if suggestions else None, cost_reasons=cost_reasons,
        num_estimates=estimates.count, search_budget_reached=budget_reached,
    )
