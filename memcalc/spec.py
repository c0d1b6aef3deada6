"""The training setup being estimated: a frozen dataclass validated on construction.

(Stdlib dataclasses rather than pydantic here: see memcalc/report.py on start-up cost.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

from memcalc import deepspeed_defaults as ds_defaults
from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.optimizers import (
    PROJECTION_OPTIMIZERS,
    WHOLE_TENSOR_OPTIMIZERS,
    OptimImpl,
    OptimizerName,
    OptimizerSettings,
)
from memcalc.precision import Dtype, PrecisionName, get_recipe

DEFAULT_MICRO_BATCH_SIZE = 1
DEFAULT_SEQ_LEN = 2048
MAX_TOKENS = 10**9  # micro-batch x sequence: far past any run, small enough to keep arithmetic instant
MAX_GPUS = 10**6
MAX_LAYERS_CHECKPOINTED = 100_000  # every:N: far past any model's depth
# --pp-schedule zero-bubble under FSDP2: the recipes whose gradients are made in FSDP2's reduce dtype (measured)
_ZERO_BUBBLE_FSDP_RECIPES = (PrecisionName.fp32, PrecisionName.bf16_pure, PrecisionName.amp_bf16)


class Attention(str, Enum):
    """attn_implementation: sdpa is what transformers picks by default; flash = flash_attention_2."""

    sdpa = "sdpa"
    eager = "eager"
    flash = "flash"


class Sharding(str, Enum):
    """Which engine shards model states across GPUs (--zero picks the stage)."""

    deepspeed = "deepspeed"  # DeepSpeed ZeRO 0-3
    fsdp = "fsdp"  # PyTorch FSDP2 fully_shard: --zero 3 reshards after forward, --zero 2 does not
    torch = "torch"  # PyTorch DDP (--zero 0) and ZeroRedundancyOptimizer (--zero 1)
    megatron = "megatron"  # Megatron-LM (--engine megatron): its DDP (--zero 0) and distributed optimizer (--zero 1)


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"  # ZeRO-Offload: fp32 master, optimizer states and step on the CPU
    params = "params"  # ZeRO-3: 16-bit parameter shards on the CPU
    both = "both"


@dataclass(frozen=True)
class ZeroBuffers:
    """DeepSpeed's buffer settings that size memory, in elements, with DeepSpeed's defaults
    (memcalc/deepspeed_defaults.py).

    allgather_bucket_size is not here: it allocates nothing. deepspeed/runtime/utils.py, all_gather_dp_groups
    (called by stage_1_and_2.py step) all-gathers straight into the existing 16-bit flat buffer with
    torch.distributed.all_gather_into_tensor (deepspeed/comm/torch.py picks it whenever torch has it, since 1.13);
    only its fallback for older torch reads the bucket size, to split the same buffer into views.
    """

    reduce_bucket_size: int = ds_defaults.REDUCE_BUCKET_SIZE
    stage3_prefetch_bucket_size: int = ds_defaults.PREFETCH_BUCKET_SIZE
    stage3_max_live_parameters: int = ds_defaults.MAX_LIVE_PARAMETERS
    stage3_param_persistence_threshold: int = ds_defaults.PARAM_PERSISTENCE_THRESHOLD
    stage3_max_reuse_distance: int = ds_defaults.MAX_REUSE_DISTANCE  # not modelled: the report says so
    sub_group_size: int = ds_defaults.SUB_GROUP_SIZE  # ZeRO-3 optimizer sub-groups (stage3.py)
    contiguous_gradients: bool = ds_defaults.CONTIGUOUS_GRADIENTS
    overlap_comm: bool | None = None  # None: DeepSpeed's default, True at stage 3 only


# TrainingSpec field -> the setting a user states it with (Request keyword; flag --the-setting), where they differ.
SETTING_OF_FIELD = {"zero_stage": "zero", "micro_batch_size": "batch_size", "optimizer": "optim", "attention": "attn",
                    "num_gpus": "gpus", "num_nodes": "nodes", "sequence_parallel": "sp"}


def setting_of(field_name: str) -> str:
    return SETTING_OF_FIELD.get(field_name, field_name)


class Checkpointing(str, Enum):
    """none; full: every decoder layer (HF gradient_checkpointing_enable); every: every N-th layer, ``every:N``
    (torchtitan's selective layer checkpointing: ``_apply_ac_to_transformer_block`` counts the blocks from 1 and
    wraps those whose count is a multiple of ``ac_freq``); selective-op: every decoder layer under torchtitan's per-op
    policy (the outputs of matmuls, attention and collectives kept, every other matmul recomputed:
    memcalc.measure.selective)."""

    none = "none"
    full = "full"
    every = "every"
    selective_op = "selective-op"


EVERY_PREFIX = "every:"


class PipelineSchedule(str, Enum):
    """--pp-schedule: torch.distributed.pipelining's ScheduleGPipe (every micro-batch's forward, then every
    backward), Schedule1F1B (one forward, one backward once the pipeline is full), ScheduleInterleaved1F1B
    (--pp-virtual stages per rank, looped) or ScheduleInterleavedZeroBubble (the same, each backward split into the
    inputs' half and the weights' half, run later)."""

    gpipe = "gpipe"
    one_f_one_b = "1f1b"
    interleaved = "interleaved-1f1b"
    zero_bubble = "zero-bubble"  # ScheduleInterleavedZeroBubble: interleaved, each backward split in two


# torch.distributed.pipelining schedules memcalc does not model yet, by the names people give them (torchtitan's
# config names lower-cased and hyphenated)
UNMODELLED_SCHEDULES = frozenset({"zbv", "zbv-zero-bubble", "zbvzerobubble", "dualpipev", "dualpipe-v"})


class ActivationOffload(str, Enum):
    """none; torchtune: OffloadActivations (torchtune/training/_activation_offloading.py) around the model's forward,
    the loss outside it; trl: TRL's copy of it (trl/models/activation_offloading.py) around the training step:
    tensors on a parameter's storage skipped, a storage saved again kept on the GPU, the loss offloaded too;
    checkpoints: transformers' activation_checkpointing_enable(offload=True), each checkpointed layer's saved inputs
    in host memory (torch.autograd.graph.save_on_cpu around each checkpoint call) (memcalc.measure.offload)."""

    none = "none"
    torchtune = "torchtune"
    trl = "trl"
    checkpoints = "checkpoints"


class QloraScope(str, Enum):
    """Which frozen Linear layers QLoRA stores in 4-bit NF4. all-linear: every Linear but the output head, as
    transformers' bitsandbytes quantizer converts them (quantizers/base.py get_modules_to_not_convert: the head
    skipped by get_keys_to_not_convert) and as torchtune's Llama, Mistral, Gemma and Phi-3 builders build them
    (FrozenNF4Linear for the projections LoRA does not wrap); lora-targets: only the Linear layers LoRA wraps, as
    torchtune's Qwen2, Qwen2.5 and Qwen3 builders do (models/qwen2/_component_builders.py: the others plain
    nn.Linear)."""

    all_linear = "all-linear"
    lora_targets = "lora-targets"


class QloraQuantizer(str, Enum):
    """Which library stores QLoRA's 4-bit base. bitsandbytes: transformers' 4-bit loading (Params4bit, Linear4bit;
    HF Trainer, TRL, axolotl, LLaMA-Factory); torchao: torchao's NF4Tensor, as torchtune's QLoRA builders make it
    (modules/peft/lora.py LoRALinear(quantize_base=True): to_nf4 of each weight as the layer is built, again as the
    checkpoint is copied in, and linear_nf4 dequantizing it in each forward and backward)."""

    bitsandbytes = "bitsandbytes"
    torchao = "torchao"


class Fp8Recipe(str, Enum):
    """torchao float8 training (float8/float8_linear.py Float8Linear, torchtitan's float8 converter): none;
    tensorwise: one scale per tensor; rowwise: one scale per row (axiswise)."""

    none = "none"
    tensorwise = "tensorwise"
    rowwise = "rowwise"


class LossKind(str, Enum):
    """standard: logits in full, upcast and cross-entropy (transformers ForCausalLMLoss); chunked: ``chunked:N``,
    torchtune's CEWithChunkedOutputLoss over the output projection applied in N chunks along the sequence
    (torchtune/modules/loss/ce_chunked_output_loss.py, TransformerDecoder.chunked_output); fused-linear: the head's
    matmul and the cross-entropy fused chunk by chunk, the full logits never materialised (Liger-Kernel
    ops/fused_linear_cross_entropy.py fused_linear_cross_entropy_forward)."""

    standard = "standard"
    chunked = "chunked"
    fused_linear = "fused-linear"


CHUNKED_PREFIX = "chunked:"
MAX_LOSS_CHUNKS = 1_000_000


class ActivationSource(str, Enum):
    """Where the activations come from: the family's hand rules, the model's own code traced under FakeTensorMode
    (torch and transformers needed), or auto: the rules where the family has them, else the trace."""

    auto = "auto"
    rules = "rules"
    trace = "trace"


# Settings reentrant checkpoints are not modelled with (measured for full fine-tuning of eager, on-device layers only;
# adapters would need their inputs to require gradients, enable_input_require_grads). TrainingSpec refuses them;
# a trainer's config that pairs them is read as not modelled (memcalc.configs.trainers).
REENTRANT_UNMODELLED = ("lora_rank", "compile", "activation_offload", "fp8")


def is_on(value: object) -> bool:
    """Whether a setting is given: not None, False or "none" (an enum's "none" member too)."""
    return value is not None and value is not False and value != "none"


@dataclass(frozen=True)
class TrainingSpec:
    """Everything about the run except the model. Defaults are printed with every report."""

    precision: PrecisionName = PrecisionName.bf16
    master_dtype: Dtype | None = None
    grad_dtype: Dtype | None = None
    state_dtype: Dtype | None = None
    optimizer: OptimizerName = OptimizerName.adamw
    optim_impl: OptimImpl = OptimImpl.foreach
    amsgrad: bool = False
    optim_in_backward: bool = False  # each parameter stepped in its post-accumulate-grad hook (torchtune optimizer_in_bwd)
    activation_offload: ActivationOffload = ActivationOffload.none  # saved activations moved to host memory
    adafactor_beta1: float | None = None
    optim_rank: int | None = None  # GaLore / APOLLO projection rank (None: HF Trainer's default, 128)
    micro_batch_size: int = DEFAULT_MICRO_BATCH_SIZE
    seq_len: int = DEFAULT_SEQ_LEN
    decoder_seq_len: int | None = None  # encoder-decoder models: decoder tokens per sequence (None: seq_len)
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpointing: Checkpointing = Checkpointing.none
    checkpoint_every: int = 0  # Checkpointing.every: N (given as checkpointing "every:N")
    # torch.utils.checkpoint's reentrant variant (HF gradient_checkpointing_kwargs {"use_reentrant": True}) for full or
    # every:N checkpointing; transformers' default is non-reentrant
    checkpoint_reentrant: bool = False
    loss: LossKind = LossKind.standard
    loss_chunks: int = 0  # LossKind.chunked: N (given as loss "chunked:N")
    attention: Attention = Attention.sdpa
    activations: ActivationSource = ActivationSource.auto
    zero_stage: int = 0
    num_gpus: int = 1
    num_nodes: int = 1
    sharding: Sharding = Sharding.deepspeed
    offload: Offload = Offload.none
    zero_buffers: ZeroBuffers = ZeroBuffers()
    # Trainable subsets (memcalc.trainable): LoRA adapters, QLoRA 4-bit base, frozen parts.
    lora_rank: int | None = None
    lora_dropout: float = 0.0  # PEFT LoraConfig.lora_dropout (its default 0): a dropout of each adapter's input
    dora: bool = False  # PEFT LoraConfig.use_dora: a magnitude vector per adapted Linear (Liu et al. 2024, DoRA)
    lora_modules_to_save: tuple[str, ...] = ()  # PEFT LoraConfig.modules_to_save: trained in full, as copies
    lora_targets: tuple[str, ...] | None = None
    qlora: bool = False
    qlora_upcast: bool = True  # prepare_model_for_kbit_training's fp32 cast of the base's non-quantized tensors
    qlora_scope: QloraScope = QloraScope.all_linear
    qlora_double_quant: bool = True  # BitsAndBytesConfig.bnb_4bit_use_double_quant (absmax quantized again)
    qlora_lm_head: bool = False  # the output head in NF4 too (BitsAndBytesConfig(llm_int8_skip_modules=[]))
    qlora_quantizer: QloraQuantizer = QloraQuantizer.bitsandbytes
    freeze: tuple[str, ...] = ()
    compile: bool = False  # each decoder layer under torch.compile (Inductor), as torchtune and torchtitan compile
    repeat_kv: bool = False  # k and v repeated to every query head before sdpa (torchtune's, litgpt's attention)
    # Rows padded to the longest of the micro-batch (no packing): transformers gives attention a 4-D padding mask
    padded: bool = False
    fp8: Fp8Recipe = Fp8Recipe.none  # torchao float8 training of the Linear layers
    # FSDP2 through accelerate: only the main process loads the model on the host; the others build it on the meta
    # device and receive each parameter by broadcast (memcalc.load)
    cpu_ram_efficient_loading: bool = False
    # Tensor parallelism (memcalc.tensor_parallel): tp ranks share each layer, torchtitan's plan; num_gpus / tp ranks
    # of data parallelism on top. sequence_parallel: the norms' regions split along the sequence (torchtitan's
    # SequenceParallel); loss_parallel: the head's output stays split over the vocabulary into the loss.
    tp: int = 1
    sequence_parallel: bool = False
    loss_parallel: bool = False
    # Pipeline parallelism (memcalc.pipeline): pp stages of consecutive layers (torchtitan's split, or pp_layers per
    # stage), each step microbatches micro-batches of micro_batch_size samples through pp_schedule; figures are the
    # most loaded stage's (pp_stage: one stage's, set internally). interleaved-1f1b: pp_virtual stages per rank
    # (pp x pp_virtual stages, stage s on rank s mod pp; pp_layers per stage); the figures are the most loaded rank's
    # (pp_rank: one rank's; pp_stage with pp_held and pp_grads_made: one of its stages at one moment, internal).
    pp: int = 1
    pp_schedule: PipelineSchedule = PipelineSchedule.one_f_one_b
    microbatches: int | None = None  # None: as many as stages
    pp_layers: tuple[int, ...] | None = None
    pp_stage: int | None = None
    pp_later_backward: bool = False  # (internal) the stage at a later micro-batch's backward (memcalc.pipeline.held)
    pp_virtual: int | None = None  # None: 2 under interleaved-1f1b, else 1
    pp_rank: int | None = None
    pp_held: int | None = None  # (internal) micro-batches the stage holds at the moment
    pp_grads_made: bool | None = None  # (internal) whether the stage's gradients exist from an earlier backward
    # (internal) whose pipeline schedule runs the stages: "" follows the engine (megatron-core's 1F1B under --engine
    # megatron, torch.distributed.pipelining otherwise); "megatron" with another engine's states is how
    # benchmarks/megatron_pipeline.py compares the schedule with megatron-core's on gloo ranks
    pp_runtime: str = ""
    # Context parallelism (memcalc.context_parallel): the sequence split over cp ranks, attention as torch's ring; the
    # cp ranks are inside the data-parallel ones (torchtitan's FSDP mesh spans them).
    cp: int = 1
    # Expert parallelism (memcalc.expert_parallel): a MoE model's experts split over ep data-parallel ranks, tokens
    # exchanged with all-to-alls (transformers' AllToAllEP), the experts FSDP-sharded over data_parallel / ep ranks.
    ep: int = 1
    ep_load: float = 1.0  # the most loaded expert-parallel rank's received (token, expert) pairs over the average
    # The dimension FSDP2 shards each rank's fused experts on: 0, transformers' plan (each rank's chunk padded to whole
    # experts when it holds fewer than the ranks sharding them), or 1 (torchtitan's Shard(1) placement)
    ep_shard_dim: int = 0
    # (internal) the data-parallel engine's view of --ep with --tp: the tensor-parallel ranks each expert-parallel
    # group spans, so the ranks holding the same experts are num_gpus x ep_tp / ep
    ep_tp: int = 1
    # HSDP, hybrid sharding (memcalc.parallel._fsdp2): the data-parallel ranks form a dp_replicate x (data_parallel /
    # dp_replicate) mesh; FSDP2's fully_shard(mesh=<2-D DeviceMesh>) shards over the last dimension and replicates over
    # the first (torch/distributed/fsdp/_fully_shard/_fully_shard.py: HSDPMeshInfo(shard_mesh_dim=1,
    # replicate_mesh_dim=0)); torchtune's data_parallel_replicate_dim, axolotl's dp_replicate_size, accelerate's
    # ParallelismConfig.dp_replicate_size
    dp_replicate: int = 1

    def checkpointed(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) is checkpointed: all under full and selective-op, every N-th
        under every:N (torchtitan counts blocks from 1: layers N-1, 2N-1, ... 0-based)."""
        if self.checkpointing == Checkpointing.every:
            return (layer + 1) % self.checkpoint_every == 0
        return self.checkpointing in (Checkpointing.full, Checkpointing.selective_op)

    @property
    def loss_label(self) -> str:
        """standard | chunked:N | fused-linear, as the flag takes it."""
        return f"{CHUNKED_PREFIX}{self.loss_chunks}" if self.loss == LossKind.chunked else self.loss.value

    @property
    def checkpointing_label(self) -> str:
        """none | full | every:N | selective-op, as the flag takes it."""
        if self.checkpointing == Checkpointing.every:
            return f"{EVERY_PREFIX}{self.checkpoint_every}"
        return self.checkpointing.value

    def _counted(self, name: str, prefix: str, member: Enum, count_name: str, limit: int, rule: str) -> None:
        """A setting given as "<prefix>N" (every:2, chunked:8): the enum member and its count N, checked."""
        given = getattr(self, name)
        if isinstance(given, str) and not isinstance(given, Enum) and given.startswith(prefix):
            count = given[len(prefix):]
            if not count.isdigit() or not 1 <= int(count) <= limit:
                raise UsageError(f"{{{name}}} {given!r}: {rule}")
            object.__setattr__(self, name, member)
            object.__setattr__(self, count_name, int(count))

    def __post_init__(self) -> None:
        self._counted("checkpointing", EVERY_PREFIX, Checkpointing.every, "checkpoint_every", MAX_LAYERS_CHECKPOINTED,
                      "every:N takes a whole number of layers N >= 1 (every:2 checkpoints layers 2, 4, 6, ...)")
        self._counted("loss", CHUNKED_PREFIX, LossKind.chunked, "loss_chunks", MAX_LOSS_CHUNKS,
                      "chunked:N takes a whole number of chunks N >= 1 (torchtune's recipes use chunked:8)")
        if isinstance(self.pp_schedule, str) and self.pp_schedule.lower().replace("_", "-") in UNMODELLED_SCHEDULES:
            raise UnsupportedModelError(
                f"{{pp_schedule}} {self.pp_schedule!r}: the V-shaped schedules (torch's ScheduleZBVZeroBubble and "
                "ScheduleDualPipeV: two stages per rank placed as a V) are not modelled yet: use gpipe, 1f1b, "
                "interleaved-1f1b or zero-bubble (ScheduleInterleavedZeroBubble)")
        for name, enum in (("precision", PrecisionName), ("optimizer", OptimizerName), ("optim_impl", OptimImpl),
                           ("checkpointing", Checkpointing), ("attention", Attention), ("sharding", Sharding),
                           ("pp_schedule", PipelineSchedule),
                           ("offload", Offload), ("activations", ActivationSource), ("loss", LossKind),
                           ("activation_offload", ActivationOffload), ("qlora_scope", QloraScope),
                           ("qlora_quantizer", QloraQuantizer), ("fp8", Fp8Recipe)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(member.value + (":N" if member in (Checkpointing.every, LossKind.chunked) else "")
                                    for member in enum)
                raise UsageError(f"{{{setting_of(name)}}} {value!r} is not one of {choices}") from None
        for name in ("master_dtype", "grad_dtype", "state_dtype"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, Dtype(value))
                except ValueError:
                    raise UsageError(f"{{{name}}} {value!r} is not one of fp32, bf16, fp16") from None
        _check_range("{batch_size}", self.micro_batch_size, 1, MAX_TOKENS)
        _check_range("{seq_len}", self.seq_len, 1, MAX_TOKENS)
        if (self.loss == LossKind.chunked) != (self.loss_chunks > 0):
            raise UsageError("{loss} chunked takes its number of chunks: chunked:N (torchtune's recipes use "
                             "chunked:8)")
        if (self.checkpointing == Checkpointing.every) != (self.checkpoint_every > 0):
            raise UsageError("{checkpointing} every takes its layer count: every:N (every:2 checkpoints layers 2, 4, "
                             "6, ...)")
        if self.micro_batch_size * self.seq_len > MAX_TOKENS:
            raise UsageError(f"{{batch_size}} x {{seq_len}} is above {MAX_TOKENS:.0e} tokens; check the numbers")
        if self.decoder_seq_len is not None:
            _check_range("{decoder_seq_len}", self.decoder_seq_len, 1, MAX_TOKENS)
            if self.micro_batch_size * self.decoder_seq_len > MAX_TOKENS:
                raise UsageError(f"{{batch_size}} x {{decoder_seq_len}} is above {MAX_TOKENS:.0e} tokens; check the "
                                 "numbers")
        _check_range("{grad_accum}", self.grad_accum, 1, 1_000_000)
        _check_range("{zero}", self.zero_stage, 0, 3)
        _check_range("{gpus}", self.num_gpus, 1, MAX_GPUS)
        _check_range("{nodes}", self.num_nodes, 1, MAX_GPUS)
        if self.num_gpus % self.num_nodes:
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{nodes}} {self.num_nodes}: every node runs "
                             "the same number of GPUs")
        self._check_tensor_parallel()
        self._check_pipeline()
        self._check_context_parallel()
        self._check_expert_parallel()
        self._check_hybrid_sharding()
        if self.offload != Offload.none:
            if self.sharding != Sharding.deepspeed:
                raise UsageError("{offload} models DeepSpeed ZeRO-Offload: use it with {sharding} deepspeed")
            if self.zero_stage == 0:
                raise UsageError("{offload} needs ZeRO: add {zero} 1, 2 or 3 (parameter offload needs {zero} 3)")
            if self.offload in (Offload.params, Offload.both) and self.zero_stage != 3:
                raise UsageError("{offload} params/both offloads ZeRO-3 parameter shards: use {zero} 3")
        if self.sharding == Sharding.fsdp and self.zero_stage in (0, 1):
            raise UsageError("{sharding} fsdp shards parameters: {zero} 3 (reshard after forward) or {zero} 2 (keep them)")
        if self.sharding == Sharding.torch and self.zero_stage > 1:
            raise UsageError("{sharding} torch is DDP ({zero} 0) or ZeroRedundancyOptimizer ({zero} 1); "
                             "use {sharding} fsdp for stages 2-3")
        if self.sharding == Sharding.megatron:
            self._check_megatron()
        if self.lora_rank is not None:
            _check_range("{lora_rank}", self.lora_rank, 1, 65536)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"{{lora_dropout}} must be in [0, 1), got {self.lora_dropout}")
        if self.lora_dropout and self.lora_rank is None:
            raise UsageError("{lora_dropout} applies to LoRA's adapters: add {lora_rank} R")
        if self.dora and self.lora_rank is None:
            raise UsageError("{dora} decomposes LoRA's adapted weights: add {lora_rank} R")
        if not self.qlora:
            given = [name for name, default in (("qlora_upcast", True), ("qlora_scope", QloraScope.all_linear),
                                                ("qlora_double_quant", True), ("qlora_lm_head", False),
                                                ("qlora_quantizer", QloraQuantizer.bitsandbytes))
                     if getattr(self, name) != default]
            if given:
                value = getattr(self, given[0])
                shown = value.value if isinstance(value, Enum) else value
                raise UsageError(f"{{{given[0]}}} {shown} sets how QLoRA stores its base: add {{qlora}} (with "
                                 "{lora_rank} R)")
        if self.qlora and self.qlora_quantizer == QloraQuantizer.torchao:
            # torchtune keeps the rest in the model's dtype (no prepare_model_for_kbit_training), its NF4Tensor always
            # quantizes the scalers again, and its builders never quantize the output head
            for given, why in (
                    (self.qlora_upcast, ("torchtune keeps the base's other tensors in the model's dtype (the fp32 cast "
                     "of {qlora_upcast} is PEFT's prepare_model_for_kbit_training): leave {qlora_upcast} out")),
                    (not self.qlora_double_quant, ("its NF4Tensor always quantizes the scalers again: leave "
                     "{qlora_double_quant} on")),
                    (self.qlora_lm_head, ("torchtune's builders leave the output head unquantized: drop "
                     "{qlora_lm_head}"))):
                if given:
                    raise UsageError(f"{{qlora_quantizer}} torchao: {why}")
        if self.cpu_ram_efficient_loading and self.sharding != Sharding.fsdp:
            raise UsageError("{cpu_ram_efficient_loading} is accelerate's FSDP loading: use it with {fsdp}")
        if self.fp8 != Fp8Recipe.none and get_recipe(self.precision, self.master_dtype, self.grad_dtype,
                                                      self.state_dtype).compute_dtype != Dtype.bf16:
            raise UsageError(f"{{fp8}} {self.fp8.value} casts bf16 Linear inputs and weights to float8 (torchao): use "
                             "a bf16 recipe ({precision} bf16-pure, bf16 or amp-bf16)")
        if self.compile and self.checkpointing == Checkpointing.selective_op:
            raise UsageError("{compile} with {checkpointing} selective-op is not modelled (the policy runs inside "
                             "the compiled graph); drop one")
        if self.lora_modules_to_save and self.lora_rank is None:
            raise UsageError("{lora_modules_to_save} trains modules beside LoRA's adapters: add {lora_rank} R")
        if self.adafactor_beta1 is not None and not 0.0 <= self.adafactor_beta1 < 1.0:
            raise UsageError(f"{{adafactor_beta1}} must be in [0, 1), got {self.adafactor_beta1}")
        if self.adafactor_beta1 is not None and self.optimizer != OptimizerName.adafactor:
            raise UsageError("{adafactor_beta1} only applies to {optim} adafactor")
        if self.amsgrad and self.optimizer not in (OptimizerName.adam, OptimizerName.adamw):
            raise UsageError("{amsgrad} only applies to {optim} adam or adamw")
        if self.activation_offload == ActivationOffload.checkpoints and self.checkpointing == Checkpointing.none:
            raise UsageError("{activation_offload} checkpoints moves the inputs checkpointed layers keep to host memory: "
                             "add {checkpointing} full (or every:N)")
        if self.checkpoint_reentrant:
            if self.checkpointing not in (Checkpointing.full, Checkpointing.every):
                raise UsageError("{checkpoint_reentrant} is how transformers checkpoints whole layers: add "
                                 "{checkpointing} full (or every:N)")
            unmodelled = [f"{{{name}}}" for name in REENTRANT_UNMODELLED if is_on(getattr(self, name))]
            if unmodelled:
                raise UsageError(f"{{checkpoint_reentrant}} with {unmodelled[0]} is not modelled (reentrant checkpoints "
                                 "are measured for full fine-tuning of eager layers only): drop {checkpoint_reentrant}, "
                                 "the non-reentrant default")
        if self.optim_in_backward:
            if self.grad_accum > 1:
                raise UsageError("{optim_in_backward} steps each parameter as soon as its gradient exists, so nothing "
                                 "accumulates over micro-batches (torchtune refuses the pair): use {grad_accum} 1")
            if self.zero_stage or self.offload != Offload.none:
                raise UsageError("{optim_in_backward} is modelled without ZeRO/FSDP sharding and offload: drop "
                                 "{optim_in_backward} or use {zero} 0")
            if self.optimizer in WHOLE_TENSOR_OPTIMIZERS:
                # (torchtune's optimizer_in_bwd builds one optimizer per parameter: Muon's AdamW fallback, Adam-mini's
                # blocks, GaLore's and APOLLO's groups and SOAP's preconditioners are set up over the whole model)
                raise UsageError(f"{{optim_in_backward}} with {{optim}} {self.optimizer.value} is not modelled: its "
                                 "states are set up over the model's tensors together, and torchtune's in-backward step "
                                 "makes one optimizer per parameter; drop {optim_in_backward} or use an elementwise "
                                 "optimizer (adamw, sgd, adafactor...)")
        if self.optim_rank is not None:
            _check_range("{optim_rank}", self.optim_rank, 1, 65536)
            if self.optimizer not in PROJECTION_OPTIMIZERS:
                raise UsageError("{optim_rank} only applies to {optim} galore-adamw or apollo-adamw")
        if self.optimizer in WHOLE_TENSOR_OPTIMIZERS and self.zero_stage:
            raise UsageError(f"{{optim}} {self.optimizer.value} is modelled on whole tensors (their shapes and names): "
                             "use it with {zero} 0, not on ZeRO or FSDP partitions")
        if self.optimizer == OptimizerName.schedule_free_adamw and self.optim_impl == OptimImpl.fused:
            raise UsageError("{optim} schedule-free-adamw has foreach and for-loop paths, no fused kernel: "
                             "{optim_impl} foreach or forloop")

    def _check_tensor_parallel(self) -> None:
        _check_range("{tp}", self.tp, 1, MAX_GPUS)
        if self.tp == 1:
            for name in ("sequence_parallel", "loss_parallel"):
                if getattr(self, name):
                    setting = "sp" if name == "sequence_parallel" else name
                    raise UsageError(f"{{{setting}}} splits what tensor parallelism shares out: add {{tp}} N (N > 1)")
            return
        if self.num_gpus % self.tp:
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{tp}} {self.tp}: the GPUs form groups of "
                             f"{self.tp} tensor-parallel ranks (give {{gpus}} a multiple of {self.tp})")
        if self.num_nodes > 1 and self.gpus_per_node % self.tp:
            raise UsageError(f"{{tp}} {self.tp} does not divide the {self.gpus_per_node} GPUs of a node: a tensor-parallel "
                             "group stays inside one node")
        if self.zero_stage and self.sharding == Sharding.deepspeed:
            raise UsageError("DeepSpeed ZeRO with PyTorch tensor parallelism is not modelled: use {sharding} fsdp "
                             "(FSDP2 over the data-parallel ranks, as torchtitan) or {sharding} torch")
        self._only_modelled_with("tp", "tensor parallelism")

    def _check_pipeline(self) -> None:
        _check_range("{pp}", self.pp, 1, MAX_GPUS)
        if self.microbatches is not None:
            _check_range("{microbatches}", self.microbatches, 1, 1_000_000)
        if self.pp == 1:
            given = [name for name, value in (("microbatches", self.microbatches), ("pp_layers", self.pp_layers),
                                              ("pp_virtual", self.pp_virtual)) if value is not None]
            if given or self.pp_schedule != PipelineSchedule.one_f_one_b:
                setting = given[0] if given else "pp_schedule"
                raise UsageError(f"{{{setting}}} sets up pipeline stages: add {{pp}} N (N > 1)")
            return
        if self.num_gpus % (self.tp * self.pp):
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{tp}} x {{pp}} = {self.tp * self.pp}: every "
                             "pipeline stage runs on a tensor-parallel group of the same size")
        if self.microbatches is None:
            object.__setattr__(self, "microbatches", self.pp)
        interleaved = self.pp_schedule in (PipelineSchedule.interleaved, PipelineSchedule.zero_bubble)
        if self.pp_virtual is None:
            object.__setattr__(self, "pp_virtual", 2 if interleaved else 1)
        elif not interleaved and self.pp_virtual != 1:
            raise UsageError("{pp_virtual} gives each rank several stages: add {pp_schedule} interleaved-1f1b (or "
                             "zero-bubble)")
        if self.pp_schedule == PipelineSchedule.zero_bubble and self.checkpointing != Checkpointing.none:
            raise UnsupportedModelError(
                "{pp_schedule} zero-bubble with {checkpointing}: its input backward runs with retain_graph, so every "
                "recomputed layer stays until the weights' backward (measured on gloo ranks: 2.6 times interleaved "
                "1F1B's peak); not modelled yet: drop one of them")
        if interleaved:
            _check_range("{pp_virtual}", self.pp_virtual, 2, 64)
            # ScheduleInterleaved1F1B's own refusal: max(1, M // pp) rounds of whole micro-batches
            rounds = max(1, self.microbatches // self.pp)
            if self.microbatches % rounds:
                raise UsageError(f"{{microbatches}} {self.microbatches} does not split into the {rounds} rounds "
                                 f"{self.pp_schedule.value} runs on {self.pp} ranks (torch's schedule needs a "
                                 f"multiple of {rounds}): give {{microbatches}} {rounds * (self.microbatches // rounds)}"
                                 f" or {rounds * (self.microbatches // rounds + 1)}")
        if self.pp_runtime not in ("", "torch", "megatron"):
            raise UsageError(f"pp_runtime {self.pp_runtime!r}: torch or megatron (or empty: the engine's)")
        # megatron/core/pipeline_parallel/schedules.py get_forward_backward_func: 1F1B
        # (forward_backward_pipelining_without_interleaving), or interleaved with a virtual pipeline size
        if self.pipeline_runtime == "megatron" and self.pp_schedule == PipelineSchedule.gpipe:
            raise UsageError("{engine} megatron with {pp_schedule} gpipe: Megatron-LM has no GPipe schedule (its "
                             "pipeline runs 1F1B); give {pp_schedule} 1f1b")
        if self.pipeline_runtime == "megatron" and self.pp_schedule != PipelineSchedule.one_f_one_b:
            raise UnsupportedModelError(
                f"{{engine}} megatron with {{pp_schedule}} {self.pp_schedule.value}: Megatron-LM runs 1F1B, or its own "
                "interleaved schedule (--num-layers-per-virtual-pipeline-stage), not modelled yet; give {pp_schedule} "
                "1f1b")
        if (self.pp_schedule == PipelineSchedule.one_f_one_b and self.microbatches < self.pp
                and self.pipeline_runtime != "megatron"):  # (Megatron warms up min(pp - rank - 1, M) forwards)
            raise UsageError(f"{{microbatches}} {self.microbatches} is fewer than the {self.pp} stages: 1F1B fills the "
                             f"pipeline with one micro-batch per stage (give {{microbatches}} {self.pp} or more, or "
                             "{pp_schedule} gpipe)")
        if self.grad_accum > 1:
            raise UsageError("{grad_accum} with {pp}: the pipeline's micro-batches are its accumulation; give "
                             "{microbatches} instead")
        if self.pp_layers is not None and (len(self.pp_layers) != self.pp_stages
                                           or any(not isinstance(n, int) or n < 1 for n in self.pp_layers)):
            raise UsageError(f"{{pp_layers}} takes {self.pp_stages} whole numbers of layers >= 1, one per stage, got "
                             f"{','.join(str(n) for n in self.pp_layers)}")
        if self.zero_stage >= 2 and self.sharding != Sharding.fsdp:
            # deepspeed/runtime/pipe/engine.py PipelineEngine.__init__: assert zero stage < 2 ("ZeRO-2 and ZeRO-3 are
            # incompatible with pipeline parallelism")
            raise UsageError("{pp} with DeepSpeed ZeRO-2/3: DeepSpeed's pipeline engine refuses them; use {zero} 0 or 1, "
                             "or {sharding} fsdp (FSDP2 over each stage's data-parallel ranks, as torchtitan)")
        if self.zero_stage >= 2 and self.pp_schedule == PipelineSchedule.zero_bubble and (
                self.zero_stage == 3 or self.precision not in _ZERO_BUBBLE_FSDP_RECIPES
                or any(d is not None for d in (self.master_dtype, self.grad_dtype, self.state_dtype))):
            # Measured on gloo ranks (benchmarks/pipeline.py --zero-bubble --fsdp): with gradients made in the reduce
            # dtype FSDP2 adds nothing to the zero-bubble model's error. With bf16 (fp32 shards, bf16 compute, fp32
            # reduce) the weights' backward (stage_backward_weight) leaves its bf16 gradients outside FSDP2's
            # post-backward upcast (-3.6% and +6.4% with the interleaved rules); --zero 3 reshards between the split
            # backwards (+54% counted as --zero 2)
            raise UnsupportedModelError("{pp_schedule} zero-bubble with FSDP2 is modelled with {zero} 2 and {precision} "
                                        "fp32, bf16-pure or amp-bf16; with bf16's fp32 shards (its weights' backward "
                                        "keeps bf16 gradients outside FSDP2's upcast) or {zero} 3 it is not yet: use "
                                        "{pp_schedule} interleaved-1f1b, or one of those")
        self._only_modelled_with("pp", "pipeline parallelism")

    def _check_context_parallel(self) -> None:
        _check_range("{cp}", self.cp, 1, MAX_GPUS)
        if self.cp == 1:
            return
        if self.data_parallel % self.cp:
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{tp}} x {{pp}} x {{cp}} = "
                             f"{self.tp * self.pp * self.cp}: the context-parallel ranks are data-parallel ranks that "
                             "share each sequence")
        if self.seq_len % (2 * self.cp):
            raise UsageError(f"{{cp}} {self.cp}: context_parallel's load balancing cuts the sequence into 2 x cp = "
                             f"{2 * self.cp} equal chunks; {{seq_len}} {self.seq_len:,} is not divisible by "
                             f"{2 * self.cp}: give a multiple")
        if self.decoder_seq_len is not None:
            raise UsageError("{cp} splits a decoder-only model's sequence; {decoder_seq_len} is an encoder-decoder's")
        if self.zero_stage and self.sharding == Sharding.deepspeed:
            raise UsageError("DeepSpeed ZeRO with PyTorch context parallelism is not modelled: use {sharding} fsdp "
                             "(FSDP2 over the data- and context-parallel ranks, as torchtitan) or {sharding} torch")
        self._only_modelled_with("cp", "context parallelism")

    def _check_expert_parallel(self) -> None:
        _check_range("{ep}", self.ep, 1, MAX_GPUS)
        load = self.ep_load
        if isinstance(load, bool) or not isinstance(load, (int, float)) or not math.isfinite(load):
            raise UsageError(f"{{ep_load}} must be a finite number, got {load!r}")
        if self.ep_shard_dim not in (0, 1) or isinstance(self.ep_shard_dim, bool):
            raise UsageError(f"{{ep_shard_dim}} is 0 (transformers' plan) or 1 (torchtitan's), got {self.ep_shard_dim!r}")
        if self.ep == 1:
            if load != 1:
                raise UsageError("{ep_load} sets how unevenly the experts' ranks receive tokens: add {ep} N (N > 1)")
            if self.ep_shard_dim:
                raise UsageError("{ep_shard_dim} sets how FSDP2 shards each rank's experts: add {ep} N (N > 1)")
            return
        if not 1 <= load <= self.ep:
            raise UsageError(f"{{ep_load}} is the most loaded rank's pairs over the average: at least 1 (balanced "
                             f"routing) and at most {self.ep} (every pair sent to one of the {self.ep} ranks), "
                             f"got {load:g}")
        if self.tp > 1:
            # transformers' expert mesh spans the tensor-parallel ranks (DistributedConfig: ep_size a multiple of
            # tp_size that divides fsdp_size x tp_size; efsdp = fsdp x tp / ep)
            if self.ep % self.tp:
                raise UsageError(f"{{ep}} {self.ep} with {{tp}} {self.tp}: the expert-parallel ranks span whole "
                                 "tensor-parallel groups (transformers' DistributedConfig: ep_size a multiple of "
                                 "tp_size); give an {ep} that is a multiple of {tp}")
            if self.pp > 1:
                raise UsageError("{ep} with {tp} and {pp} is not modelled yet: drop one of them")
        if self.tp > 1 and self.num_gpus % self.ep:
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{ep}} {self.ep}: the expert-parallel "
                             "ranks are data- and tensor-parallel ranks that split the experts (give {gpus} a "
                             "multiple)")
        if self.data_parallel * self.ep_tp % self.ep and self.tp == 1:  # (ep_tp: the data-parallel view of --tp)
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{tp}} x {{pp}} x {{ep}} = "
                             f"{self.tp * self.pp * self.ep}: the expert-parallel ranks are data-parallel ranks that "
                             "split the experts (give {gpus} a multiple)")
        if self.cp > 1 and self.pp > 1:
            raise UsageError("{ep} with {cp} on pipeline stages is not modelled yet: drop one of them")
        if self.pp > 1 and self.pp_schedule == PipelineSchedule.zero_bubble:
            raise UnsupportedModelError("{ep} with {pp_schedule} zero-bubble is not modelled yet: use gpipe, 1f1b or "
                                        "interleaved-1f1b")
        if self.sharding != Sharding.fsdp or self.zero_stage not in (2, 3):
            # (with --pp, FSDP2 over each stage's data-parallel ranks, torchtitan's (pp, dp_shard, ep) mesh, where
            # --zero 2 is torchtitan's default)
            raise UsageError("{ep} is modelled under FSDP2, as transformers and torchtitan run it (the experts "
                             "sharded over the ranks that hold the same ones): add {fsdp} (or {sharding} fsdp with "
                             "{zero} 2, no reshard after forward)")
        self._only_modelled_with("ep", "expert parallelism")

    def _check_hybrid_sharding(self) -> None:
        _check_range("{dp_replicate}", self.dp_replicate, 1, MAX_GPUS)
        if self.dp_replicate == 1:
            return
        if self.sharding != Sharding.fsdp:
            raise UsageError("{dp_replicate} is FSDP2's hybrid sharding (HSDP: shards within a group, replicas across "
                             "groups): add {fsdp} (or {sharding} fsdp with {zero} 2 or 3)")
        if self.data_parallel % (self.dp_replicate * self.cp):
            cp = " x {cp}" if self.cp > 1 else ""
            raise UsageError(f"{{gpus}} {self.num_gpus} is not divisible by {{tp}} x {{pp}}{cp} x {{dp_replicate}} = "
                             f"{self.tp * self.pp * self.cp * self.dp_replicate}: the {self.data_parallel} "
                             f"data-parallel ranks form {self.dp_replicate} replicas of an equal shard group")
        if self.ep > 1:
            raise UsageError("{dp_replicate} with {ep} is not modelled yet (the experts' own shard groups under "
                             "hybrid sharding): drop one of them")

    @property
    def padding_masked(self) -> bool:
        """Whether attention gets a padding mask: --padded over more than one row (one row is its own longest)."""
        return self.padded and self.micro_batch_size > 1

    @property
    def shard_group(self) -> int:
        """The ranks FSDP2 shards over: the data-parallel ones, or one replica's share of them under HSDP."""
        return self.data_parallel // self.dp_replicate

    @property
    def local_seq_len(self) -> int:
        """Positions of each sequence one rank runs: all, or its share with context parallelism."""
        return self.seq_len // self.cp

    def _check_megatron(self) -> None:
        """--engine megatron: Megatron-LM's DDP and distributed optimizer over data parallelism, --tp and --pp (its
        1F1B schedule), full training in its precisions; anything else one line."""
        if self.zero_stage > 1:
            raise UnsupportedModelError("{engine} megatron is its DDP ({zero} 0) or its distributed optimizer ({zero} "
                                        "1); Megatron's own FSDP (--use-megatron-fsdp) is not modelled yet: use {zero} 0 or 1")
        if self.precision not in (PrecisionName.fp32, PrecisionName.bf16) or any(
                d is not None for d in (self.master_dtype, self.grad_dtype, self.state_dtype)):
            raise UsageError(f"{{engine}} megatron with {{precision}} {self.precision.value}: Megatron trains in fp32 "
                             "or bf16 (bf16 weights, fp32 main gradients and parameters; its fp16 is not modelled "
                             "yet); use {precision} bf16 or fp32, without dtype overrides")
        if self.optimizer not in (OptimizerName.adamw, OptimizerName.adam, OptimizerName.sgd):
            raise UsageError(f"{{engine}} megatron with {{optim}} {self.optimizer.value}: Megatron's --optimizer is "
                             "adam (decoupled weight decay, as adamw) or sgd; use one of them")
        if self.optim_impl != OptimImpl.fused:
            raise UsageError("{engine} megatron steps with TransformerEngine's (or apex's) FusedAdam: drop "
                             "{optim_impl}")
        for label, on in (("{cp}", self.cp > 1), ("{ep}", self.ep > 1)):
            if on:
                raise UnsupportedModelError(f"{{engine}} megatron with {label}: Megatron's context and expert "
                                            "parallelism are not modelled yet (memcalc's are torch's): drop one of "
                                            "them")
        if self.checkpointing not in (Checkpointing.none, Checkpointing.full):
            raise UsageError(f"{{engine}} megatron with {{checkpointing}} {self.checkpointing_label}: give none, or "
                             "full (Megatron's --recompute-granularity full, uniform, one layer at a time); its "
                             "selective granularity recomputes core attention, which with flash attention keeps "
                             "what none keeps but the fp32 log-sum-exp: estimate it with none, an upper bound")
        self._only_modelled_with("engine", "Megatron's engine")

    def _only_modelled_with(self, setting: str, what: str) -> None:
        """--tp and --pp cover full training with checkpointing none or full and the standard loss: anything else with
        them is one line."""
        unmodelled = [label for label, on in (
            ("{lora_rank}", self.lora_rank is not None), ("{qlora}", self.qlora), ("{freeze}", bool(self.freeze)),
            ("{compile}", self.compile), ("{fp8}", self.fp8 != Fp8Recipe.none),
            ("{activation_offload}", self.activation_offload != ActivationOffload.none),
            ("{optim_in_backward}", self.optim_in_backward), ("{repeat_kv}", self.repeat_kv),
            (f"{{loss}} {self.loss_label}", self.loss != LossKind.standard),
            (f"{{checkpointing}} {self.checkpointing_label}", self.checkpointing not in (Checkpointing.none,
                                                                                      Checkpointing.full)),
            (f"{{offload}} {self.offload.value}", self.offload != Offload.none),
        ) if on]
        if unmodelled:
            raise UsageError(f"{unmodelled[0]} with {{{setting}}} {getattr(self, setting)} is not modelled yet ({what} "
                             "covers full training, checkpointing none or full, the standard loss): drop one of them")

    @property
    def engine(self) -> str:
        """--engine: megatron (Megatron-LM's DDP and distributed optimizer), or torch (every other engine memcalc
        models: PyTorch's, DeepSpeed's)."""
        return "megatron" if self.sharding == Sharding.megatron else "torch"

    @property
    def pipeline_runtime(self) -> str:
        """Whose schedule runs the stages (pp_runtime): megatron (megatron-core's) or torch (torch.distributed's)."""
        return self.pp_runtime or self.engine

    @property
    def data_parallel(self) -> int:
        """Data-parallel ranks: the GPUs over the tensor- and pipeline-parallel group sizes."""
        return self.num_gpus // (self.tp * self.pp)

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def pp_stages(self) -> int:
        """Pipeline stages: pp, or pp x pp_virtual under an interleaved schedule."""
        return self.pp * (self.pp_virtual or 1)

    @property
    def interleaved(self) -> bool:
        """Several stages per pipeline rank (interleaved-1f1b, zero-bubble)."""
        return self.pp > 1 and self.pp_schedule in (PipelineSchedule.interleaved, PipelineSchedule.zero_bubble)

    def replace(self, **changes) -> TrainingSpec:
        return dataclasses.replace(self, **changes)

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(
            name=self.optimizer, impl=self.optim_impl, amsgrad=self.amsgrad, adafactor_beta1=self.adafactor_beta1, rank=self.optim_rank
        )


def _check_range(setting: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{setting} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise UsageError(f"{setting} must be between {low} and {high:,}, got {value}")
