"""Output models. Memory is integer bytes everywhere; units are applied only in ``render``.

Plain dataclasses, not pydantic models: building pydantic models costs about 80 ms of start-up,
which the estimate path cannot afford (the start-up benchmark). ``memcalc.schema`` derives the JSON
Schema of this contract with pydantic, lazily (``memcalc schema``).

The JSON contract (``schema_version`` 2): ``model``, ``training``, ``per_gpu`` (``terms``,
``model_states_bytes``, ``peak_bytes``, ``peak_phase``, ``phases``), ``totals``, ``fit`` when a GPU is
given, and ``notes``. Model-state terms are named ``weights``, ``master_weights``, ``gradients`` and
``optimizer_states``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memcalc.vocab import Phase, Term

SCHEMA_VERSION = 3  # 2: typed verify result, phase moments and breakdowns, activation parts, fit solvers (None, not 0);
# 3: per_gpu.load (the load before the first step) and the "load" phase when it is the peak
VERDICT_FITS, VERDICT_MAY_FIT, VERDICT_DOES_NOT_FIT = "FITS", "MAY FIT", "DOES NOT FIT"


@dataclass(eq=False, repr=False)
class PhaseTotal:
    """The largest moment of one phase: its bytes, what is alive then (``breakdown``: each term's bytes at that
    moment, and the named moments' extras such as the loss's logits, summing to ``bytes``), and which moment of
    the phase it is (``moment``: e.g. "start of backward")."""

    phase: Phase
    bytes: int
    terms: list[str]  # the terms alive at that moment
    first_step_bytes: int  # step 0: no optimizer state exists before the first optimizer step
    moment: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, repr=False)
class ModelSummary:
    name: str
    source: str
    model_type: str | None
    architecture_known: bool
    num_params: int
    num_trainable_params: int
    num_tensors: int
    params_source: str  # "inventory" | "--params"


@dataclass(eq=False, repr=False)
class TrainingSummary:
    precision: str
    precision_description: str
    weight_dtype: str
    master_dtype: str | None
    grad_dtype: str
    state_dtype: str
    compute_dtype: str
    optimizer: str
    optimizer_description: str
    optim_impl: str
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    checkpointing: str
    attention: str
    zero_stage: int
    num_gpus: int
    num_nodes: int
    sharding: str
    offload: str
    lora_rank: int | None = None
    lora_targets: list[str] | None = None
    qlora: bool = False
    freeze: list[str] = field(default_factory=list)
    defaults_used: list[str] = field(default_factory=list)
    # What produced the activations: rules (the family's, from its code), trace (the model's code run under
    # FakeTensorMode), approximation (Korthikanti's formula) or none (no architecture).
    activations: str = "rules"
    loss: str = "standard"  # standard | chunked:N | fused-linear
    optim_in_backward: bool = False  # each parameter stepped in its gradient hook during backward
    activation_offload: str = "none"  # none | torchtune | trl | checkpoints: saved activations moved to host memory
    compile: bool = False  # each decoder layer under torch.compile (Inductor)
    repeat_kv: bool = False  # k and v repeated to every query head before sdpa
    padded: bool = False  # rows padded to the longest: attention gets the batch's padding mask
    fp8: str = "none"  # none | tensorwise | rowwise: torchao float8 training of the Linear layers
    tp: int = 1  # tensor-parallel group size (the figures are one rank's)
    sequence_parallel: bool = False  # tp: norms split along the sequence
    loss_parallel: bool = False  # tp: the loss over the head's vocabulary split
    pp: int = 1  # pipeline stages (the figures are one stage's: pp_stage, the most loaded)
    pp_schedule: str = "1f1b"
    microbatches: int | None = None
    pp_stage: int | None = None  # (interleaved-1f1b: the rank shown)
    pp_virtual: int = 1  # stages per pipeline rank (interleaved-1f1b)
    cp: int = 1  # context-parallel ranks sharing each sequence (the figures are the most loaded rank's)
    ep: int = 1  # expert-parallel ranks splitting each MoE layer's experts (the figures are the most loaded rank's)
    ep_load: float = 1.0  # ep: the most loaded rank's received (token, expert) pairs per layer over the average
    ep_shard_dim: int = 0  # ep: the dimension FSDP2 shards each rank's experts on (0 transformers', 1 torchtitan's)
    dp_replicate: int = 1  # HSDP: replicas of the data-parallel ranks, each FSDP2-sharding over data_parallel / this


@dataclass(eq=False, repr=False)
class AllocatorReplay:
    """The step's allocations replayed through PyTorch's CUDA caching allocator (memcalc.allocator, ``--reserved``),
    in ``torch.cuda.memory_stats`` terms: reserved (segments held), allocated (blocks handed out: rounding and unsplit
    remainders included) and requested (the tensors' bytes) peaks. ``capacity_bytes``: the GPU's memory less the CUDA
    context, where a GPU was given; the ``bounded_*`` figures replay the step within it (a full device makes the
    allocator free its cached segments and retry; an allocation it still cannot place is an out-of-memory)."""

    alloc_conf: str  # the PYTORCH_ALLOC_CONF string replayed ("" = the defaults)
    alloc_conf_source: str  # --alloc-conf, PYTORCH_ALLOC_CONF, PYTORCH_CUDA_ALLOC_CONF or default
    reserved_peak_bytes: int
    allocated_peak_bytes: int
    requested_peak_bytes: int
    segments_peak: int
    num_events: int
    source: str  # what was replayed and how it was obtained
    capacity_bytes: int | None = None
    bounded_reserved_peak_bytes: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    cublas_workspace_bytes: int | None = None  # one workspace, replayed once per handle; None: the card is not known
    notes: list[str] = field(default_factory=list)
    # reserved once the model's weights are built and loaded, before anything else (what a recipe logs "after init");
    # None where the replay does not know that moment (DDP ranks)
    reserved_after_load_bytes: int | None = None


@dataclass(eq=False, repr=False)
class LoadPhase:
    """The model's load and preparation before the first step (memcalc.load): the GPU's largest moment on this rank
    (``peak_bytes`` at ``moment``, ``breakdown`` summing to it) and the host memory the load takes per process and
    per node. ``path`` names how the model is loaded (host-then-gpu, qlora, zero3, fsdp2, sharded), ``description``
    says what runs, ``accuracy`` whether that path is measured. When ``peak_bytes`` exceeds the step's peak it is the
    run's peak (``per_gpu.peak_phase`` "load")."""

    path: str
    peak_bytes: int
    moment: str
    breakdown: dict[str, int]
    host_bytes: int
    host_bytes_per_node: int
    description: str
    accuracy: str


@dataclass(eq=False, repr=False)
class PerGpu:
    terms: list[Term]
    model_states_bytes: int
    peak_bytes: int
    peak_phase: Phase
    phases: list[PhaseTotal]
    first_step_peak_bytes: int
    cpu_offload_bytes: int = 0  # CPU RAM this GPU's process uses for offloaded states (ZeRO-Offload)
    # --reserved: the caching allocator's reserved peak (max_memory_reserved) for this step, predicted by replay; None
    # when not asked (the fit then assumes a reserve fraction)
    reserved_peak_bytes: int | None = None
    allocator: AllocatorReplay | None = None
    load: LoadPhase | None = None  # the load before the first step (memcalc.load)
    # Of the steady-state peak, the optimizer states a bitsandbytes paged optimizer keeps in CUDA unified memory,
    # outside PyTorch's allocator: torch.cuda.max_memory_allocated() of a steady-state step shows peak_bytes - paged_bytes.
    paged_bytes: int = 0

    def step_peak(self) -> PhaseTotal:
        """The training step's largest moment (the load left out): what a measured step is compared with."""
        return max((p for p in self.phases if p.phase != Phase.load), key=lambda p: p.bytes)


@dataclass(eq=False, repr=False)
class Totals:
    """Across all GPUs: per-GPU figures times the number of GPUs (replicas and shards alike)."""

    num_gpus: int
    model_states_bytes: int
    peak_bytes_sum: int
    num_nodes: int = 1
    cpu_offload_bytes_per_node: int = 0


@dataclass(eq=False, repr=False)
class FitSuggestion:
    """One change (or combination of changes) to the run, its per-GPU peak, and its rough cost."""

    change: str  # the command-line change, e.g. "--lora-rank 16 --qlora --checkpointing full"
    peak_bytes: int
    fits: bool
    spec_changes: dict[str, Any] = field(default_factory=dict)  # the same change as TrainingSpec fields
    # Rough relative cost in points (memcalc/fit.py COSTS; Fit.cost_model says what a point is), the sum of
    # cost_parts: lever -> points, e.g. {"full checkpointing": 33, "4-bit base": 10}. Not a measurement.
    cost: float = 0.0
    cost_parts: dict[str, float] = field(default_factory=dict)
    # Fitting suggestions: the largest micro-batch that fits with the change, its peak, and what limits it
    # (Fit.max_micro_batch_limit's values); None for suggestions that do not fit.
    max_micro_batch_size: int | None = None
    max_micro_batch_peak_bytes: int | None = None
    max_micro_batch_limit: str | None = None


@dataclass(eq=False, repr=False)
class NcclCommunicator:
    """One process group's NCCL communicator on the most loaded rank (memcalc.nccl): its ranks, how many of them share
    this rank's node, what it runs (collectives, send/recv, all-to-all, barriers), and the device bytes NCCL holds for
    it, by part (at init, ring, tree, NVLS, peers, network pools)."""

    group: str
    ranks: int
    local_ranks: int
    runs: str
    bytes: int
    parts: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, repr=False)
class Fit:
    gpu: str
    gpu_memory_bytes: int
    gpu_memory_source: str
    cuda_context_bytes: int
    allocator_reserve_bytes: int
    usable_bytes: int
    peak_bytes: int
    headroom_bytes: int  # usable - peak; negative when it does not fit
    fits: bool
    # True when the model has no architecture (--params only): the peak leaves out activations and the per-layer
    # working buffers, so "fits" (here and in the suggestions) means the counted part fits: a lower bound.
    peak_is_lower_bound: bool = False
    # Of peak_bytes, the optimizer states a bitsandbytes paged optimizer keeps in CUDA unified memory (PerGpu.paged_bytes).
    # The run fits when the rest does: the driver pages out what does not fit beside it (to CPU RAM, slower steps),
    # which is what paged optimizers are for; paged_out_bytes is that part (peak - usable), the verdict MAY FIT.
    paged_bytes: int = 0
    paged_out_bytes: int = 0
    # where cuda_context_bytes comes from: measured for this GPU generation (memcalc.fit.MEASURED_CUDA_CONTEXTS),
    # assumed, or given (--cuda-context)
    cuda_context_source: str = "assumed"
    # the cuBLAS workspaces the allocator keeps beside the tensors (GpuTarget.workspace_bytes), deducted from usable_bytes
    # with the context and the reserve; 0 under --reserved (its replayed reserve holds them)
    cublas_workspace_bytes: int = 0
    # NCCL's buffers on the most loaded rank (outside PyTorch's allocator; memcalc.nccl), deducted from usable_bytes:
    # their sum, each communicator, and a note (the card's channel counts and their source, what is a bound or not
    # modelled, NCCL_* settings read); 0 on one GPU
    nccl_bytes: int = 0
    nccl_communicators: list[NcclCommunicator] = field(default_factory=list)
    nccl_note: str | None = None
    # When it does not fit: the fitting changes ranked by cost (cheapest first), then each change alone that
    # does not fit. cost_model says what the points mean; cost_reasons gives the reason for each lever used.
    suggestions: list[FitSuggestion] = field(default_factory=list)
    cost_model: str | None = None
    cost_reasons: dict[str, str] = field(default_factory=dict)
    num_estimates: int = 0  # engine estimates this verdict ran (search, suggestions' micro-batches, solvers)
    search_budget_reached: bool = False  # the change search stopped at its estimate budget, not on its own
    # --max-batch / --max-seq-len (None: not asked): the largest value that fits and its peak, and the limit:
    #   "memory" the next value does not fit; "token_bound" the next value is beyond TrainingSpec's bound on
    #   micro-batch x seq-len; "model_bound" the next value is beyond what the model runs (learned positions);
    #   "rejected" the next value is refused for another reason (see the reason);
    #   "not_memory" the peak does not grow with it in this estimate (value None, peak at 1);
    #   "none_fits" not even 1 fits (value None, peak at 1).
    # *_reason says the same in a sentence.
    max_micro_batch_size: int | None = None
    max_micro_batch_peak_bytes: int | None = None
    max_micro_batch_limit: str | None = None
    max_micro_batch_reason: str | None = None
    max_seq_len: int | None = None
    max_seq_len_peak_bytes: int | None = None
    max_seq_len_limit: str | None = None
    max_seq_len_reason: str | None = None
    # When the recipe was not chosen and is memcalc's default bf16/fp16 (fp32 master copy): what HF Trainer's
    # bf16=True / fp16=True runs (amp-bf16 / amp-fp16: fp32 weights, autocast), its peak and whether it fits.
    hf_trainer_recipe: str | None = None
    hf_trainer_peak_bytes: int | None = None
    hf_trainer_fits: bool | None = None
    # How allocator_reserve_bytes was obtained: False, assumed (--reserve-fraction of the GPU's memory); True, predicted
    # (--reserved: the caching allocator's reserved peak less the tensors' bytes, from the replayed step)
    allocator_reserve_predicted: bool = False
    # What nvidia-smi would show for this process (per GPU) at the step's peak: the caching allocator's reserved memory
    # (under --reserved the replayed reserved peak, its cuBLAS workspaces in it; else the peak, the workspaces and the
    # assumed reserve, less what paged optimizer states the driver holds in CPU RAM), the CUDA context and NCCL's
    # buffers.
    nvidia_smi_bytes: int = 0

    @property
    def verdict(self) -> str:
        """FITS, DOES NOT FIT, or MAY FIT when what is counted fits but is a lower bound (--params only) or fits only
        with paged optimizer states paged out to CPU RAM."""
        if not self.fits:
            return VERDICT_DOES_NOT_FIT
        return VERDICT_MAY_FIT if self.peak_is_lower_bound or self.paged_out_bytes else VERDICT_FITS


@dataclass(eq=False, repr=False)
class VerifyRow:
    """Estimate beside measurement for one term, ``phase:<phase>`` or ``peak``; ``error_pct`` is
    (estimate - measured) / measured x 100, None when nothing was measured."""

    term: str
    estimate_bytes: int
    measured_bytes: int | None
    error_pct: float | None


@dataclass(eq=False, repr=False)
class VerifyResult:
    """A measured training step beside the estimate (``--verify``, ``memcalc.measure``).

    method: cuda | cpu-tracker | trace; per_term_bytes: what each estimator term is compared with;
    checked_peak_bytes: the estimate of the configuration that ran (a scaled-down copy when ``scaled`` lists
    changes); run: what ran (model class, dtypes, kernel, device...); reserved_peak_bytes and cuda_context_bytes:
    on a GPU only.
    """

    method: str
    measured_peak_bytes: int
    measured_peak_phase: str
    per_term_bytes: dict[str, int]
    per_phase_peak_bytes: dict[str, int]
    checked_peak_bytes: int
    checked_peak_phase: str
    rows: list[VerifyRow]
    scaled: list[str]
    differences_from_gpu: list[str]
    run: dict[str, str | int | float | bool | None]
    reserved_peak_bytes: int | None
    cuda_context_bytes: int | None
    elapsed_seconds: float
    notes: list[str] = field(default_factory=list)
    # the measured step's own allocations and frees (load, warm-up, measured step) replayed through the caching
    # allocator model (memcalc.allocator) with alloc_conf: its reserved, allocated and requested peaks; on CUDA beside
    # the allocator's own figures (allocator_stats: torch.cuda.memory_stats peaks and counters)
    replayed_reserved_peak_bytes: int | None = None
    replayed_allocated_peak_bytes: int | None = None
    replayed_requested_peak_bytes: int | None = None
    alloc_conf: str | None = None
    allocator_stats: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, repr=False)
class Report:
    model: ModelSummary
    training: TrainingSummary
    per_gpu: PerGpu
    totals: Totals
    fit: Fit | None = None
    notes: list[str] = field(default_factory=list)
    verify: VerifyResult | None = None  # a measured step beside the estimate (--verify)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, ``schema_version`` first. Enums are ``str`` subclasses and dump as their values."""
        data = dataclasses.asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    def to_json(self) -> str:
        import json  # only for JSON output (a few ms of the start-up budget)

        return json.dumps(self.to_dict(), indent=2)

    def with_fit(self, fit: Fit) -> Report:
        return dataclasses.replace(self, fit=fit)

    def with_verify(self, verify: VerifyResult) -> Report:
        return dataclasses.replace(self, verify=verify)

    def term(self, name: str) -> Term:
        for term in self.per_gpu.terms:
            if term.name == name:
                return term
        raise KeyError(name)
