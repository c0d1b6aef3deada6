"""Optimizer state bytes per parameter tensor, and the temporaries an optimizer step allocates.

Every rule follows the implementation named next to it; the state dtype is the recipe's except where the
implementation fixes it (Adafactor, 8-bit and 4-bit states, bitsandbytes' 32-bit states, SOAP's preconditioners).
Elementwise optimizers take any tensors (a ZeRO rank's flat partition is one); those in ``WHOLE_TENSOR_OPTIMIZERS``
need each tensor's shape, name and role (``WholeTensors``): Muon, Adam-mini, GaLore, APOLLO and SOAP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from memcalc.errors import UsageError
from memcalc.model import (
    ROLE_ATTENTION,
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ROLE_LM_HEAD,
    ROLE_MLP,
    ROLE_NORM,
    ROLE_POSITION_EMBEDDING,
    ROLE_ROUTER,
    ParamTensor,
)
from memcalc.precision import BYTES_PER_DTYPE, Dtype
from memcalc.units import BYTES_PER_FP32, BYTES_PER_GIB, BYTES_PER_INT64


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    lion = "lion"
    adafactor = "adafactor"
    adamw_8bit = "adamw-8bit"
    paged_adamw = "paged-adamw"
    paged_adamw_8bit = "paged-adamw-8bit"
    torchao_adamw_8bit = "torchao-adamw-8bit"
    torchao_adamw_4bit = "torchao-adamw-4bit"
    schedule_free_adamw = "schedule-free-adamw"
    muon = "muon"
    adam_mini = "adam-mini"
    galore_adamw = "galore-adamw"
    apollo_adamw = "apollo-adamw"
    soap = "soap"


class OptimImpl(str, Enum):
    foreach = "foreach"
    fused = "fused"
    forloop = "forloop"


# Optimizers that need each tensor's shape and name (not a flat ZeRO/FSDP partition), and the ones that run their own
# per-tensor loop (--optim-impl does not apply to them; Muon's applies to its AdamW part).
WHOLE_TENSOR_OPTIMIZERS = frozenset({OptimizerName.muon, OptimizerName.adam_mini, OptimizerName.galore_adamw,
                                     OptimizerName.apollo_adamw, OptimizerName.soap})
PROJECTION_OPTIMIZERS = frozenset({OptimizerName.galore_adamw, OptimizerName.apollo_adamw})
_OWN_LOOP = frozenset({OptimizerName.adafactor, OptimizerName.adamw_8bit, OptimizerName.paged_adamw,
                       OptimizerName.paged_adamw_8bit, OptimizerName.torchao_adamw_8bit,
                       OptimizerName.torchao_adamw_4bit, OptimizerName.adam_mini, OptimizerName.galore_adamw,
                       OptimizerName.apollo_adamw, OptimizerName.soap})
# transformers trainer_optimizer.py _get_galore_optimizer / _get_apollo_optimizer: optim_args rank defaults to 128,
# update_proj_gap to 200 (GaLore's README and APOLLO's scripts use the same gap).
DEFAULT_PROJECTION_RANK = 128
UPDATE_PROJ_GAP = 200


@dataclass(frozen=True, eq=False, repr=False)
class OptimizerSettings:
    name: OptimizerName = OptimizerName.adamw
    impl: OptimImpl = OptimImpl.foreach
    amsgrad: bool = False
    adafactor_beta1: float | None = None  # transformers Adafactor default: None (no first moment)
    rank: int | None = None  # GaLore / APOLLO projection rank (None: DEFAULT_PROJECTION_RANK)

    @property
    def projection_rank(self) -> int:
        return self.rank if self.rank is not None else DEFAULT_PROJECTION_RANK

    def describe(self) -> str:
        rank = self.projection_rank
        text = {
            OptimizerName.adamw: "AdamW (torch.optim.AdamW: exp_avg + exp_avg_sq)",
            OptimizerName.adam: "Adam (torch.optim.Adam: exp_avg + exp_avg_sq)",
            OptimizerName.sgd: "SGD without momentum (no state)",
            OptimizerName.sgd_momentum: "SGD with momentum (torch.optim.SGD: momentum_buffer)",
            OptimizerName.lion: "Lion (one exp_avg)",
            OptimizerName.adafactor: "Adafactor (transformers.optimization.Adafactor: factored second moment)",
            OptimizerName.adamw_8bit: "8-bit AdamW (bitsandbytes AdamW8bit: block-wise quantized states)",
            OptimizerName.paged_adamw: "paged AdamW (bitsandbytes PagedAdamW: fp32 state1 + state2, large ones in "
                                       "CUDA unified memory)",
            OptimizerName.paged_adamw_8bit: "paged 8-bit AdamW (bitsandbytes PagedAdamW8bit: block-wise quantized "
                                            "states, large ones in CUDA unified memory)",
            OptimizerName.torchao_adamw_8bit: "8-bit AdamW (torchao.optim.AdamW8bit: uint8 codes + fp32 scale per "
                                              "256 elements)",
            OptimizerName.torchao_adamw_4bit: "4-bit AdamW (torchao.optim.AdamW4bit: packed 4-bit codes + fp32 scale "
                                              "per 128 elements)",
            OptimizerName.schedule_free_adamw: "schedule-free AdamW (schedulefree.AdamWScheduleFree: z + exp_avg_sq)",
            OptimizerName.muon: "Muon (torch.optim.Muon: momentum_buffer) for the blocks' 2-D weight matrices, AdamW "
                                "for the rest",
            OptimizerName.adam_mini: "Adam-mini (adam_mini.Adam_mini 1.1.1: m + one second moment per block)",
            OptimizerName.galore_adamw: f"GaLore AdamW (galore_torch.GaLoreAdamW: rank-{rank} projections of "
                                        "attention and MLP weights, AdamW states in the projected space)",
            OptimizerName.apollo_adamw: f"APOLLO AdamW (apollo_torch.APOLLOAdamW: rank-{rank} random projections of "
                                        "attention and MLP weights, AdamW states in the projected space)",
            OptimizerName.soap: "SOAP (nikhilvyas/SOAP: Adam in the eigenbasis of Shampoo's preconditioners)",
        }[self.name]
        if self.amsgrad and self.name in (OptimizerName.adam, OptimizerName.adamw):
            text += " + amsgrad max_exp_avg_sq"
        if self.name == OptimizerName.adafactor and self.adafactor_beta1 is not None:
            text += f" + first moment (beta1={self.adafactor_beta1})"
        if self.name in _OWN_LOOP - {OptimizerName.adafactor}:
            return f"{text}, its own implementation"
        if self.name == OptimizerName.muon:
            return f"{text}, AdamW {self.impl.value} implementation"
        return f"{text}, {self.impl.value} implementation"


# bitsandbytes/optim/optimizer.py, Optimizer8bit.init_state: tensors with fewer elements than
# min_8bit_size (default 4096) keep two fp32 states; larger ones get uint8 codes plus one fp32 absmax per
# 256-element block (blocksize = 256) for each of the two states.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
# The two 256-entry fp32 quantization maps ("dynamic" signed, "udynamic" unsigned) are created once per
# optimizer (fill_qmap) and shared by every tensor's state (state["qmap1"] = self.name2qmap["dynamic"]).
BNB_QMAP_BYTES = 2 * 256 * BYTES_PER_FP32
# bitsandbytes/optim/optimizer.py Optimizer8bit.get_state_buffer: on a CUDA device a paged optimizer allocates
# state1/state2 with F.get_paged (cudaMallocManaged) for tensors of at least 1e5 elements; smaller ones and every
# absmax/qmap are ordinary tensors (torch.zeros_like). On the CPU it never pages.
BNB_PAGED_MIN_NUMEL = 100_000
# torchao/optim/adam.py _AdamBase._new_buffer: "follow bitsandbytes, only quantize tensors >= 4096 values", and only
# when numel % block_size == 0; otherwise torch.zeros_like(p). AdamW8bit block_size=256, AdamW4bit block_size=128.
# subclass_8bit.py OptimState8bit.zeros: codes uint8 of the tensor's shape, scale fp32 numel / block_size, qmap a
# 256-entry fp32 tensor made per state (get_qmap_signed / unsigned). subclass_4bit.py OptimState4bit.zeros: codes
# uint8 numel / 2 (two 4-bit codes per byte), scale fp32 numel / 128, a 16-entry fp32 qmap per state.
TORCHAO_MIN_QUANT_NUMEL = 4096
TORCHAO_8BIT_BLOCK, TORCHAO_8BIT_QMAP = 256, 256
TORCHAO_4BIT_BLOCK, TORCHAO_4BIT_QMAP = 128, 16
# torchao _AdamBase.step always runs single_param_adam through torch.compile (fullgraph, one tensor at a time). For a
# quantized state, the code Inductor generates for it (torch 2.13, torchao 0.18, read with TORCH_LOGS=output_code)
# keeps, beside the in-place updates, the dequantized fp32 exp_avg and exp_avg_sq (each read by its block's amax and
# again by its re-quantization): 2 x 4 B per element; 4-bit adds, per state, its codes unpacked to one uint8 each
# (aten.cat of the two nibbles) and the new codes as int64 before packing: 2 x (1 + 4 + 8) B. The parameter's dtype
# does not change them; a tensor with plain states (too small, or not a multiple of the block) compiles to one fused
# kernel without buffers. Measured on compiled CPU steps by ``python benchmarks/torchao_optim.py``.
TORCHAO_COMPILED_BYTES_PER_ELEMENT = {OptimizerName.torchao_adamw_8bit: 2 * 4,
                                      OptimizerName.torchao_adamw_4bit: 2 * (1 + 4 + 8)}
# nikhilvyas/SOAP soap.py SOAP.__init__ defaults: max_precond_dim=10000, precondition_frequency=10.
SOAP_MAX_PRECOND_DIM = 10_000
SOAP_PRECONDITION_FREQUENCY = 10


def _adafactor_is_factored(shape: Sequence[int]) -> bool:
    # transformers Adafactor._get_options: factored = len(param_shape) >= 2
    return len(shape) >= 2


# -- whole tensors: shapes, names and roles ------------------------------------------------------------------------

@dataclass(frozen=True)
class WholeTensors:
    """The trainable tensors an optimizer of ``WHOLE_TENSOR_OPTIMIZERS`` steps, whole and in ``named_parameters``
    order, and the sizes Adam-mini splits queries and keys by (its ``dim`` and ``n_heads``)."""

    tensors: tuple[ParamTensor, ...]
    hidden_size: int
    num_heads: int


def whole_tensors(settings: OptimizerSettings, tensors: Sequence[ParamTensor], arch: Any) -> WholeTensors | None:
    """What a shape-aware optimizer needs from the model (None for the elementwise ones). ``arch``: the model's
    resolved config (``memcalc.families.base.Arch``), None for a bare parameter count, which such an optimizer cannot
    be estimated for: its states depend on each tensor's shape and name."""
    if settings.name not in WHOLE_TENSOR_OPTIMIZERS:
        return None
    if arch is None:
        raise UsageError(f"{{optim}} {settings.name.value} keeps states by each tensor's shape and name: give a MODEL "
                         "(preset, config.json or hub id), not only {params}")
    return WholeTensors(tuple(t for t in tensors if t.trainable), arch.hidden_size, arch.num_heads)


def muon_steps(tensor: ParamTensor) -> bool:
    """Whether Muon steps this tensor in the usual recipe: a 2-D weight matrix inside a transformer block.

    torch/optim/_muon.py Muon.__init__ refuses any parameter with ndim != 2 and its docstring sends "bias, and
    embedding" to "a standard method such as AdamW"; Keller Jordan's recipe (modded-nanogpt, KellerJordan/Muon
    README) and Moonlight's (MoonshotAI/Moonlight, ndim >= 2 except embed_tokens and lm_head) run AdamW for the
    embeddings, the output head, norms and biases. 3-D tensors (fused MoE experts) go to AdamW too: torch.optim.Muon
    cannot take them.
    """
    return (len(tensor.shape) == 2 and tensor.layer is not None
            and tensor.role not in (ROLE_EMBEDDING, ROLE_POSITION_EMBEDDING, ROLE_LM_HEAD, ROLE_NORM)
            and "embed" not in tensor.name.lower())


def projection_targets(tensor: ParamTensor) -> bool:
    """Whether GaLore / APOLLO project this tensor: the 2-D weight of an nn.Linear in attention or the MLP.

    galore_torch's README and torchrun_main.py pick nn.Linear modules whose name contains "attn" or "mlp"; HF Trainer
    (trainer_optimizer.py _setup_low_rank_optimizer) takes the nn.Linear weights ``optim_target_modules`` names, and
    puts every other parameter in a plain AdamW group. Roles stand for the names (BERT's "attention" has no "attn").
    """
    return (tensor.is_linear_weight and len(tensor.shape) == 2
            and tensor.role in (ROLE_ATTENTION, ROLE_MLP, ROLE_EXPERT, ROLE_ROUTER))


def _projection(shape: tuple[int, ...], name: OptimizerName, rank: int, state_bytes: int) -> tuple[int, int, int]:
    """(elements of exp_avg, bytes of the projection matrix, elements of the projection) for a projected m x n weight.

    proj_type "std" (the default): m >= n projects on the right, G @ P.T with P of r x n; m < n on the left, P.T @ G
    with P of m x r, so each state is r x max(m, n).
    GaLore (galore_torch 1.0 galore_projector.py GaLoreProjector.get_orthogonal_matrix): P is the first r rows of Vh
    (right) or columns of U (left) of torch.linalg.svd(G, full_matrices=False), r clipped to min(m, n). With fp32
    gradients it is a view and keeps the whole factor alive: Vh or U of min(m, n)^2 fp32 elements; otherwise
    ``.type(original_type)`` copies the r x min(m, n) slice in the gradient's dtype.
    APOLLO (apollo_torch 1.0.3 random_projector.py GradientProjector.get_orthogonal_matrix): P is stable_randn of
    (r, n) or (m, r), r not clipped, fp32 or cast to the gradient's dtype.
    """
    m, n = shape
    small, large = min(m, n), max(m, n)
    if name == OptimizerName.galore_adamw:
        r = min(rank, small)
        if state_bytes == BYTES_PER_FP32:
            return r * large, small * small * BYTES_PER_FP32, small * small
        return r * large, r * small * state_bytes, r * small
    return rank * large, rank * small * state_bytes, rank * small


def _adam_mini_block(tensor: ParamTensor, whole: WholeTensors) -> tuple[str, int]:
    """(branch, elements of its second-moment state) for one tensor, as adam_mini 1.1.1 Adam_mini.step picks it from
    the lowercased parameter name, in this order: "bias" -> Adam (v of the tensor's size); a query/key name -> one
    value per head (m.view(-1, head_numel), head_numel = dim * dim // n_heads); an embedding, output, value, attention
    output or MLP name -> one value per row (m[0:rows, 0:1]); anything else -> one value (vmean = sum(p * p))."""
    name = tensor.name.lower()
    numel = tensor.numel
    if "bias" in name:
        return "v", numel
    if any(key in name for key in ("k_proj", "q_proj", "wq", "wk", "query", "key")):
        head_numel = whole.hidden_size * whole.hidden_size // whole.num_heads
        if head_numel <= 0 or numel % head_numel:
            raise UsageError(f"Adam-mini 1.1.1 views {tensor.name} ({numel:,} elements) as heads of hidden_size^2 / "
                             f"num_attention_heads = {head_numel:,} elements, which does not divide it: the library's "
                             "step fails on this model")
        return "vmean", numel // head_numel
    if any(key in name for key in ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv",
                                   "value", "o_proj", "wo", "attn.proj", "feed_forward", "linear", "mlp")):
        if len(tensor.shape) < 2:
            raise UsageError(f"Adam-mini 1.1.1 slices {tensor.name} (1-D) as m[0:rows, 0:1] because its name matches a "
                             "per-row block: the library's step fails on this model")
        return "vmean", tensor.shape[0] * math.prod(tensor.shape[2:])
    return "vmean", 1


def _soap_dims(shape: tuple[int, ...]) -> list[int]:
    """The dimensions SOAP keeps a d x d preconditioner (GG) and eigenbasis (Q) for: every dimension of a >= 2-D
    tensor up to max_precond_dim; none for a 1-D tensor (precondition_1d=False). soap.py init_preconditioner."""
    if len(shape) < 2:
        return []
    return [d for d in shape if d <= SOAP_MAX_PRECOND_DIM]


def state_bytes_by_kind(
    shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings, state_dtype: Dtype,
    whole: WholeTensors | None = None,
) -> dict[str, int]:
    """Bytes of each optimizer state kind, summed over the given parameter tensors (those it updates).

    The keys are the names the implementation uses in ``optimizer.state[p]``. ``whole`` is required for
    ``WHOLE_TENSOR_OPTIMIZERS`` (its tensors are ``shapes``).
    """
    state_bytes = BYTES_PER_DTYPE[state_dtype]
    totals: dict[str, int] = {}

    def add(kind: str, num_bytes: int) -> None:
        totals[kind] = totals.get(kind, 0) + num_bytes

    name = settings.name
    if name in WHOLE_TENSOR_OPTIMIZERS:
        return _whole_tensor_states(shapes, settings, state_dtype, whole)
    for shape in shapes:
        numel = math.prod(shape)
        if name in (OptimizerName.adam, OptimizerName.adamw):
            # torch/optim/adam.py Adam._init_group: exp_avg, exp_avg_sq = zeros_like(p); amsgrad adds
            # max_exp_avg_sq. "step" is a CPU scalar unless fused/capturable, then a 4-byte fp32 on device.
            add("exp_avg", numel * state_bytes)
            add("exp_avg_sq", numel * state_bytes)
            if settings.amsgrad:
                add("max_exp_avg_sq", numel * state_bytes)
            if settings.impl == OptimImpl.fused:
                add("step", BYTES_PER_FP32)
        elif name == OptimizerName.sgd_momentum:
            # torch/optim/sgd.py: momentum_buffer = clone(grad) on the first step.
            add("momentum_buffer", numel * state_bytes)
        elif name == OptimizerName.lion:
            # Lion (Chen et al. 2023, Algorithm 2): a single moving average, exp_avg.
            add("exp_avg", numel * state_bytes)
        elif name == OptimizerName.adafactor:
            # transformers/optimization.py Adafactor.step: states are created .to(grad) after a 16-bit grad
            # is upcast with grad.float(), so they are fp32 whatever the recipe; state["RMS"] = self._rms(p)
            # is a 0-dim fp32 tensor on the parameter's device (found by the verify tracker).
            add("RMS", BYTES_PER_FP32)
            if settings.adafactor_beta1 is not None:
                add("exp_avg", numel * BYTES_PER_FP32)
            if _adafactor_is_factored(shape):
                add("exp_avg_sq_row", math.prod(shape[:-1]) * BYTES_PER_FP32)
                add("exp_avg_sq_col", math.prod(shape[:-2] + shape[-1:]) * BYTES_PER_FP32)
            else:
                add("exp_avg_sq", numel * BYTES_PER_FP32)
        elif name in (OptimizerName.adamw_8bit, OptimizerName.paged_adamw_8bit):
            if numel < BNB_MIN_8BIT_SIZE:
                add("state1", numel * BYTES_PER_FP32)
                add("state2", numel * BYTES_PER_FP32)
            else:
                num_blocks = math.ceil(numel / BNB_BLOCKSIZE)
                add("state1", numel)  # uint8 codes
                add("state2", numel)
                add("absmax1", num_blocks * BYTES_PER_FP32)
                add("absmax2", num_blocks * BYTES_PER_FP32)
        elif name == OptimizerName.paged_adamw:
            # bitsandbytes Optimizer2State.init_state with optim_bits=32: state1, state2 = get_state_buffer(p,
            # dtype=torch.float32): fp32 whatever the parameter's dtype.
            add("state1", numel * BYTES_PER_FP32)
            add("state2", numel * BYTES_PER_FP32)
        elif name in (OptimizerName.torchao_adamw_8bit, OptimizerName.torchao_adamw_4bit):
            for kind in ("exp_avg", "exp_avg_sq"):
                add(kind, _torchao_state_bytes(numel, name, state_bytes))
        elif name == OptimizerName.schedule_free_adamw:
            # schedulefree/adamw_schedulefree.py AdamWScheduleFree.step: state["z"] = torch.clone(p),
            # state["exp_avg_sq"] = torch.zeros_like(p): the parameter's dtype; no first moment.
            add("z", numel * state_bytes)
            add("exp_avg_sq", numel * state_bytes)
        # OptimizerName.sgd: no state.
    if name in (OptimizerName.adamw_8bit, OptimizerName.paged_adamw_8bit) and any(
            math.prod(s) >= BNB_MIN_8BIT_SIZE for s in shapes):
        add("qmap1+qmap2 (shared)", BNB_QMAP_BYTES)
    return totals


def _torchao_quantizes(numel: int, name: OptimizerName) -> bool:
    block = TORCHAO_8BIT_BLOCK if name == OptimizerName.torchao_adamw_8bit else TORCHAO_4BIT_BLOCK
    return numel >= TORCHAO_MIN_QUANT_NUMEL and not numel % block


def _torchao_state_bytes(numel: int, name: OptimizerName, state_bytes: int) -> int:
    block, qmap = ((TORCHAO_8BIT_BLOCK, TORCHAO_8BIT_QMAP) if name == OptimizerName.torchao_adamw_8bit
                   else (TORCHAO_4BIT_BLOCK, TORCHAO_4BIT_QMAP))
    if not _torchao_quantizes(numel, name):
        return numel * state_bytes  # torch.zeros_like(p)
    codes = numel if name == OptimizerName.torchao_adamw_8bit else numel // 2
    return codes + (numel // block) * BYTES_PER_FP32 + qmap * BYTES_PER_FP32


def _checked(shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings,
             whole: WholeTensors | None) -> WholeTensors:
    if whole is None or tuple(t.shape for t in whole.tensors) != tuple(tuple(s) for s in shapes):
        raise ValueError(f"{settings.name.value} needs the whole trainable tensors it steps (WholeTensors)")
    return whole


def _whole_tensor_states(shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings, state_dtype: Dtype,
                         whole: WholeTensors | None) -> dict[str, int]:
    whole = _checked(shapes, settings, whole)
    state_bytes = BYTES_PER_DTYPE[state_dtype]
    totals: dict[str, int] = {}

    def add(kind: str, num_bytes: int) -> None:
        totals[kind] = totals.get(kind, 0) + num_bytes

    name = settings.name
    if name == OptimizerName.soap and state_dtype != Dtype.fp32:
        raise UsageError("{optim} soap (nikhilvyas/SOAP) needs fp32 gradients: its fp32 preconditioners cannot take "
                         f"{state_dtype.value} ones (GG.lerp_ fails); use a recipe that steps an fp32 master (bf16, "
                         "amp-bf16, fp32)")
    for tensor in whole.tensors:
        numel = tensor.numel
        if name == OptimizerName.muon:
            if muon_steps(tensor):
                # torch/optim/_muon.py Muon._init_group: momentum_buffer = torch.zeros_like(p.grad).
                add("momentum_buffer", numel * state_bytes)
            else:
                _add_adamw(add, numel, settings, state_bytes)
        elif name == OptimizerName.adam_mini:
            # adam_mini 1.1.1 Adam_mini.step: state["m"] = torch.zeros_like(p) for every branch; the second moment
            # as _adam_mini_block says ("v" a zeros_like(p), "vmean" a zeros_like slice); "step" is a Python int.
            kind, elements = _adam_mini_block(tensor, whole)
            add("m", numel * state_bytes)
            add(kind, elements * state_bytes)
        elif name in PROJECTION_OPTIMIZERS:
            if projection_targets(tensor):
                states, proj_bytes, _ = _projection(tensor.shape, name, settings.projection_rank, state_bytes)
                # AdamW.step: exp_avg, exp_avg_sq = torch.zeros_like(grad) of the projected gradient;
                # state["projector"].ortho_matrix is the projection.
                add("exp_avg", states * state_bytes)
                add("exp_avg_sq", states * state_bytes)
                add("projector.ortho_matrix", proj_bytes)
                if name == OptimizerName.apollo_adamw:
                    # apollo.py AdamW.step (Norm-Growth Limiter): state["scaled_grad"] = torch.norm(scaled_grad),
                    # a 0-dim tensor in the gradient's dtype.
                    add("scaled_grad", state_bytes)
            else:
                add("exp_avg", numel * state_bytes)
                add("exp_avg_sq", numel * state_bytes)
        elif name == OptimizerName.soap:
            # soap.py SOAP.step: exp_avg, exp_avg_sq = torch.zeros_like(grad); init_preconditioner:
            # GG[i] = torch.zeros(d, d) (fp32, the default dtype) per preconditioned dimension; Q[i] from
            # torch.linalg.eigh of it (fp32). "step" and the frequencies are Python numbers.
            add("exp_avg", numel * BYTES_PER_FP32)
            add("exp_avg_sq", numel * BYTES_PER_FP32)
            dims = _soap_dims(tensor.shape)
            if dims:
                add("GG", sum(d * d for d in dims) * BYTES_PER_FP32)
                add("Q", sum(d * d for d in dims) * BYTES_PER_FP32)
    return totals


def _add_adamw(add, numel: int, settings: OptimizerSettings, state_bytes: int) -> None:
    """torch.optim.AdamW's states for one tensor (Muon's AdamW part)."""
    add("exp_avg", numel * state_bytes)
    add("exp_avg_sq", numel * state_bytes)
    if settings.impl == OptimImpl.fused:
        add("step", BYTES_PER_FP32)


def paged_state_bytes(shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings) -> int:
    """Bytes of the states a bitsandbytes paged optimizer puts in CUDA unified memory (cudaMallocManaged): state1 and
    state2 of every tensor of at least 1e5 elements (uint8 codes for PagedAdamW8bit, fp32 for PagedAdamW)."""
    if settings.name not in (OptimizerName.paged_adamw, OptimizerName.paged_adamw_8bit):
        return 0
    bytes_per_element = 1 if settings.name == OptimizerName.paged_adamw_8bit else BYTES_PER_FP32
    return sum(2 * math.prod(s) * bytes_per_element for s in shapes if math.prod(s) >= BNB_PAGED_MIN_NUMEL)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / BYTES_PER_GIB:,.2f} GiB"


def optimizer_notes(shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings, state_dtype: Dtype,
                    whole: WholeTensors | None = None) -> list[str]:
    """What the output says about the optimizer: how a mixed optimizer split the tensors, where states live outside
    PyTorch's allocator, and what is derived from code without a measurement."""
    name = settings.name
    notes: list[str] = []
    if name in (OptimizerName.paged_adamw, OptimizerName.paged_adamw_8bit):
        paged = paged_state_bytes(shapes, settings)
        if paged:
            notes.append(
                f"{name.value}: {_gib(paged)} of the optimizer states (state1/state2 of tensors of >= 100,000 elements) "
                "are paged: bitsandbytes allocates them with cudaMallocManaged, outside PyTorch's caching allocator. "
                "They are counted in optimizer_states, but torch.cuda.max_memory_allocated() does not show them, and "
                "under GPU memory pressure the driver pages them to CPU RAM (slower steps instead of an OOM); paging "
                "itself is not modelled (measured on the CPU, where bitsandbytes does not page)")
    if name in (OptimizerName.torchao_adamw_8bit, OptimizerName.torchao_adamw_4bit):
        notes.append(f"{name.value}: torchao compiles its step per tensor (torch.compile); the step temporaries are the "
                     "buffers Inductor's code keeps for the largest quantized tensor, measured on compiled CPU steps; "
                     "not measured on CUDA, where Triton may fuse differently")
    if whole is None:
        return notes
    tensors = whole.tensors
    if name == OptimizerName.muon:
        muon = [t for t in tensors if muon_steps(t)]
        rest = [t for t in tensors if not muon_steps(t)]
        notes.append(
            f"muon: torch.optim.Muon steps the {len(muon)} 2-D weight matrices inside the transformer blocks "
            f"({sum(t.numel for t in muon):,} params, one momentum_buffer); torch.optim.AdamW ({settings.impl.value}) "
            f"steps the other {len(rest)} tensors ({sum(t.numel for t in rest):,} params: embeddings, output head, "
            "norms, biases), as Keller Jordan's and Moonlight's recipes do")
        cubes = [t for t in rest if len(t.shape) > 2]
        if cubes:
            notes.append(f"muon: torch.optim.Muon takes only 2-D parameters, so the {len(cubes)} tensors of 3 or more "
                         f"dimensions (fused experts, {sum(t.numel for t in cubes):,} params) are counted under AdamW")
    elif name in PROJECTION_OPTIMIZERS:
        targets = [t for t in tensors if projection_targets(t)]
        label = "GaLore" if name == OptimizerName.galore_adamw else "APOLLO"
        notes.append(
            f"{name.value}: {label} projects the {len(targets)} 2-D Linear weights of attention and the MLP "
            f"({sum(t.numel for t in targets):,} params) at rank {settings.projection_rank} (update_proj_gap "
            f"{UPDATE_PROJ_GAP}); the other {len(tensors) - len(targets)} tensors keep full AdamW states, as HF Trainer "
            "builds it (optim_target_modules the attention and MLP Linears)")
        if name == OptimizerName.galore_adamw and state_dtype == Dtype.fp32 and targets:
            kept = sum(_projection(t.shape, name, settings.projection_rank, BYTES_PER_FP32)[1] for t in targets)
            sliced = sum(min(settings.projection_rank, *t.shape) * min(t.shape) * BYTES_PER_FP32 for t in targets)
            notes.append(f"galore-adamw: with fp32 gradients each projection is a view of the whole SVD factor (U or "
                         f"Vh), which stays alive: {_gib(kept)} of projections instead of {_gib(sliced)} for the "
                         "rank-r slices (galore_projector.py get_orthogonal_matrix returns Vh[:rank, :] or U[:, :rank])")
        if name == OptimizerName.galore_adamw:
            notes.append("galore-adamw: the SVD every update_proj_gap steps is counted by its outputs (U, S, Vh); "
                         "torch.linalg.svd's own solver workspace is not")
    elif name == OptimizerName.adam_mini:
        notes.append(f"adam-mini: blocks by parameter name with dim={whole.hidden_size}, n_heads={whole.num_heads} "
                     "(Adam-mini's own arguments): one second moment per head for q/k, per row for embeddings, head, "
                     "v, o and MLP weights, per tensor for norms; biases keep Adam's full v")
    elif name == OptimizerName.soap:
        big = sorted({d for t in tensors if len(t.shape) >= 2 for d in t.shape if d > SOAP_MAX_PRECOND_DIM})
        text = (f"soap: fp32 GG and Q of d x d for every dimension d <= {SOAP_MAX_PRECOND_DIM:,} of each >= 2-D tensor "
                "(max_precond_dim), none for 1-D ones; the step peaks at the eigenbasis refresh (QR) every "
                f"{SOAP_PRECONDITION_FREQUENCY} steps")
        if big:
            text += f"; dimensions {', '.join(f'{d:,}' for d in big)} are above max_precond_dim and not preconditioned"
        notes.append(text)
    return notes


# -- the step's temporaries ------------------------------------------------------------------------------------------

class _Frame:
    """Bytes held by an optimizer step's Python locals while it runs, above its states, weights and gradients.

    As CPython frees them: ``name = expression`` creates the new value (and whatever the expression holds only while
    it runs) while the old value of ``name`` is still alive, then releases the old one; a local lives on into the
    next iteration of the loop over tensors until it is assigned again; a called function's locals go when it
    returns. ``peak`` is the most alive at once.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._scopes: list[dict[str, int]] = [{}]

    def assign(self, name: str, num_bytes: int, transient: int = 0, outermost: bool = False) -> None:
        """``name = <expression>`` (in the step's own frame with ``outermost``, from inside a call)."""
        self.peak = max(self.peak, self.live + num_bytes + transient)
        scope = self._scopes[0 if outermost else -1]
        self.live += num_bytes - scope.get(name, 0)
        scope[name] = num_bytes

    def temp(self, num_bytes: int) -> None:
        """A value that only exists while one statement runs."""
        self.peak = max(self.peak, self.live + num_bytes)

    def keep(self, num_bytes: int) -> None:
        """A new value held by a container (a list the scope returns) until the scope ends."""
        self.assign(f"#kept {len(self._scopes[-1])}", num_bytes)

    @contextmanager
    def call(self) -> Iterator[None]:
        self._scopes.append({})
        try:
            yield
        finally:
            self.live -= sum(self._scopes.pop().values())


def step_temporary_bytes(
    shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings, param_dtype: Dtype, state_dtype: Dtype,
    whole: WholeTensors | None = None,
) -> tuple[int, str]:
    """Peak bytes the optimizer step allocates beyond states and gradients, and the rule used.

    ``shapes`` are the tensors the optimizer updates (a ZeRO rank's flat partition is one tensor).
    """
    if not shapes:
        return 0, "no trainable tensors"
    state_bytes = BYTES_PER_DTYPE[state_dtype]
    largest_numel = max(math.prod(s) for s in shapes)
    total_numel = sum(math.prod(s) for s in shapes)
    name, impl = settings.name, settings.impl

    if name in WHOLE_TENSOR_OPTIMIZERS:
        return _whole_tensor_temporaries(_checked(shapes, settings, whole), settings, state_bytes)
    if name in (OptimizerName.adam, OptimizerName.adamw):
        return _adam_temporaries(total_numel, largest_numel, impl, state_bytes)
    if name == OptimizerName.lion:
        if impl == OptimImpl.foreach:
            # lion-pytorch foreach path: updates = [exp_avg.clone() ...] then in-place foreach ops.
            return total_numel * state_bytes, "foreach: one cloned update per tensor, all at once"
        if impl == OptimImpl.forloop:
            # exp_avg.clone().mul_(beta1).add(grad, ...): the clone and the sum coexist.
            return 2 * largest_numel * state_bytes, "for-loop: clone and sum of the largest tensor"
        return 0, "fused kernel (bitsandbytes Lion32bit): no temporaries"
    if name == OptimizerName.adafactor:
        # transformers Adafactor.step runs per tensor: grad**2 and its +eps sum coexist (2 x fp32), or
        # later the old update and _approx_sq_grad's full-size product; 16-bit params add grad.float()
        # and p.float() copies.
        upcast = 2 * BYTES_PER_FP32 if BYTES_PER_DTYPE[param_dtype] < BYTES_PER_FP32 else 0
        per_element = 2 * BYTES_PER_FP32 + upcast
        return largest_numel * per_element, "per tensor (Adafactor has no foreach path): fp32 update buffers"
    if name in (OptimizerName.adamw_8bit, OptimizerName.paged_adamw_8bit, OptimizerName.paged_adamw):
        return 0, "bitsandbytes fused 8-bit / 32-bit CUDA kernels: no temporaries"
    if name in (OptimizerName.torchao_adamw_8bit, OptimizerName.torchao_adamw_4bit):
        quantized = [n for n in (math.prod(s) for s in shapes) if _torchao_quantizes(n, name)]
        per_element = TORCHAO_COMPILED_BYTES_PER_ELEMENT[name]
        rule = (f"torchao single_param_adam compiled, one tensor at a time: {per_element} B per element of the "
                "largest quantized tensor (Inductor's buffers for its dequantized fp32 states"
                f"{' and their codes' if name == OptimizerName.torchao_adamw_4bit else ''}; measured on the CPU)")
        return max(quantized, default=0) * per_element, rule
    if name == OptimizerName.schedule_free_adamw:
        if impl == OptimImpl.forloop:
            # adamw_schedulefree.py step, foreach=False: denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
            # per tensor (grad.div_(denom) reuses the gradient); the local denom lives on until the next tensor's.
            frame = _Frame()
            for shape in shapes:
                frame.assign("denom", math.prod(shape) * state_bytes)
            return frame.peak, "for-loop: denom of one tensor beside the previous tensor's"
        # foreach=True (its default): denom = torch._foreach_div(exp_avg_sq, bias_correction2) for all tensors.
        return total_numel * state_bytes, "foreach: _foreach_div(exp_avg_sq) over all tensors at once"
    # SGD (torch/optim/sgd.py) with weight_decay=0 updates in place; momentum_buffer is state.
    return 0, "in-place update: no temporaries"


def temporaries_source(name: OptimizerName) -> str:
    """Where the step-temporaries rule of an optimizer comes from."""
    return {
        OptimizerName.muon: "torch/optim/_muon.py _single_tensor_muon, _zeropower_via_newtonschulz; torch/optim/adam.py",
        OptimizerName.adam_mini: "adam_mini 1.1.1 adam_mini.py Adam_mini.step",
        OptimizerName.galore_adamw: "galore_torch 1.0 adamw.py AdamW.step, galore_projector.py GaLoreProjector",
        OptimizerName.apollo_adamw: "apollo_torch 1.0.3 apollo.py AdamW.step, random_projector.py GradientProjector",
        OptimizerName.soap: "nikhilvyas/SOAP soap.py SOAP.step, update_preconditioner, get_orthogonal_matrix_QR",
        OptimizerName.schedule_free_adamw: "schedulefree 1.4.1 adamw_schedulefree.py AdamWScheduleFree.step",
        OptimizerName.torchao_adamw_8bit: "torchao 0.18 torchao/optim/adam.py single_param_adam",
        OptimizerName.torchao_adamw_4bit: "torchao 0.18 torchao/optim/adam.py single_param_adam",
        OptimizerName.paged_adamw: "bitsandbytes optimizer_update_32bit (one fused CUDA kernel)",
        OptimizerName.paged_adamw_8bit: "bitsandbytes optimizer_update_8bit_blockwise (one fused CUDA kernel)",
    }.get(name, "torch/optim/adam.py (_multi_tensor_adam, _single_tensor_adam); transformers Adafactor.step")


def _adam_temporaries(total_numel: int, largest_numel: int, impl: OptimImpl, state_bytes: int) -> tuple[int, str]:
    if impl == OptimImpl.foreach:
        # torch/optim/adam.py _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)
        # materializes one state-sized tensor per parameter, all alive until _foreach_addcdiv_.
        return total_numel * state_bytes, "foreach: _foreach_sqrt(exp_avg_sq) over all tensors at once"
    if impl == OptimImpl.forloop:
        # _single_tensor_adam: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps):
        # the sqrt and the quotient coexist for one tensor at a time.
        return 2 * largest_numel * state_bytes, "for-loop: sqrt and quotient of the largest tensor"
    return 0, "fused kernel (torch._fused_adamw_): no temporaries"


def _whole_tensor_temporaries(whole: WholeTensors, settings: OptimizerSettings, state_bytes: int) -> tuple[int, str]:
    name = settings.name
    tensors = whole.tensors
    if name == OptimizerName.muon:
        muon = [t for t in tensors if muon_steps(t)]
        rest = [t for t in tensors if not muon_steps(t)]
        frame = _Frame()
        for t in muon:
            # torch/optim/_muon.py _single_tensor_muon (Muon has no foreach path): update = grad.lerp(buf, momentum)
            # (nesterov); _zeropower_via_newtonschulz: a bf16 copy X of n elements, then per iteration
            # gram = X @ X.T and gram_update (s x s, s = min(rows, cols)) and the next X, beside the previous X;
            # the bf16 result replaces update.
            n, s = t.numel, min(t.shape)
            frame.assign("update", n * state_bytes)
            frame.assign("update", 2 * n, transient=2 * n + 4 * s * s)
        adamw, adamw_rule = _adam_temporaries(sum(t.numel for t in rest), max((t.numel for t in rest), default=0),
                                              settings.impl, state_bytes)
        rule = ("the larger of Muon's per-tensor Newton-Schulz buffers (update, two bf16 iterates, two s x s Gram "
                f"matrices) and its AdamW part's ({adamw_rule}); the two optimizers step one after the other")
        return max(frame.peak, adamw), rule
    if name == OptimizerName.adam_mini:
        rule = ("adam_mini 1.1.1 Adam_mini.step, tensor by tensor: update = m * stepsize and -update, beside the "
                "per-block tmp_lr, h and stepsize; locals live on into the next tensor")
        return _adam_mini_temporaries(whole, state_bytes), rule
    if name in PROJECTION_OPTIMIZERS:
        regular = _projection_temporaries(whole, settings, state_bytes, refresh=False)
        refresh = _projection_temporaries(whole, settings, state_bytes, refresh=True)
        what = "SVD" if name == OptimizerName.galore_adamw else "random projection"
        rule = ("tensor by tensor, the projected gradient, denom and update in the low-rank space, the full-size "
                f"update (two m x n buffers), locals living on into the next tensor; every {UPDATE_PROJ_GAP} steps the "
                f"{what} that renews the projection")
        return max(regular, refresh), rule
    rule = ("soap.py SOAP.step, tensor by tensor: the gradient projected to the eigenbasis, denom, the update projected "
            "back (each tensordot a new tensor), the d x d outer products, and every "
            f"{SOAP_PRECONDITION_FREQUENCY} steps the power iteration and QR of each preconditioner")
    return _soap_temporaries(whole), rule


def _adam_mini_temporaries(whole: WholeTensors, state_bytes: int) -> int:
    frame = _Frame()
    for tensor in whole.tensors:
        numel = tensor.numel
        kind, blocks = _adam_mini_block(tensor, whole)
        frame.assign("grad", 0)  # p.grad
        if kind == "v":
            # h = (state["v"].sqrt() / bias_correction_2_sqrt).add_(eps): the sqrt, then the quotient.
            frame.assign("h", numel * state_bytes, transient=numel * state_bytes)
            continue
        # tmp_lr = torch.mean(grad * grad, dim=1, keepdim=True) (or torch.sum(grad * grad) / block_numel)
        frame.assign("tmp_lr", blocks * state_bytes, transient=numel * state_bytes)
        frame.assign("h", blocks * state_bytes, transient=blocks * state_bytes)
        frame.assign("stepsize", blocks * state_bytes)
        frame.assign("update", numel * state_bytes)  # update = (state["m"] * stepsize).view(p.size())
        frame.temp(numel * state_bytes)  # p.add_(-update)
    return frame.peak


def _projection_temporaries(whole: WholeTensors, settings: OptimizerSettings, state_bytes: int, refresh: bool) -> int:
    """GaLore / APOLLO AdamW.step over the groups HF Trainer builds: [non-targets, targets]."""
    name, rank = settings.name, settings.projection_rank
    frame = _Frame()
    tensors = whole.tensors
    ordered = [t for t in tensors if not projection_targets(t)] + [t for t in tensors if projection_targets(t)]
    for tensor in ordered:
        numel = tensor.numel
        if not projection_targets(tensor):
            # grad = p.grad; denom = exp_avg_sq.sqrt().add_(eps); norm_grad = exp_avg / denom; p.add_(norm_grad)
            frame.assign("grad", 0)
            frame.assign("denom", numel * state_bytes)
            frame.assign("norm_grad", numel * state_bytes)
            continue
        m, n = tensor.shape
        large = max(m, n)
        low, _, proj_numel = _projection(tensor.shape, name, rank, state_bytes)
        if refresh:
            frame.temp(_refresh_bytes(name, m, n, rank, state_bytes, proj_numel))
        frame.assign("grad", low * state_bytes)  # grad = state["projector"].project(grad, step)
        frame.assign("denom", low * state_bytes)
        frame.assign("norm_grad", low * state_bytes)  # exp_avg / denom
        if name == OptimizerName.galore_adamw:
            # project_back: matmul back to m x n, then * self.scale: two m x n buffers.
            frame.assign("norm_grad", numel * state_bytes, transient=numel * state_bytes)
        else:
            # APOLLO channel scaling: norms over the low-rank gradient and update (one value per row of the larger
            # side), scaled_grad = p.grad * grad_scaling_factor, then scaled_grad / limiter (the Norm-Growth
            # Limiter, from the second step); norm_grad = scaled_grad shares its storage.
            frame.assign("grad_scaling_factor", large * state_bytes, transient=2 * large * state_bytes)
            frame.assign("scaled_grad", numel * state_bytes)
            frame.assign("scaled_grad", numel * state_bytes)
            frame.assign("norm_grad", 0)
    return frame.peak


def _refresh_bytes(name: OptimizerName, m: int, n: int, rank: int, state_bytes: int, proj_numel: int) -> int:
    """What renewing one projection allocates beside the step's live buffers (its outputs; solver workspace aside).

    GaLore (galore_projector.py get_orthogonal_matrix, galore_torch 1.0): matrix = grad.float() unless fp32;
    U, s, Vh = torch.linalg.svd(matrix, full_matrices=False) (m x k, k, k x n, k = min(m, n), fp32); then for the
    right projection A = U[:, :r] @ diag(s[:r]) (r x r and m x r), for the left B = diag(s[:r]) @ Vh[:r, :]
    (r x r and r x n); a 16-bit gradient's projection is cast to its dtype (a copy).
    APOLLO (random_projector.py get_orthogonal_matrix): matrix = grad.float() unless fp32 (made though unused);
    stable_randn(...) / sqrt(rank): two fp32 projections.
    """
    upcast = m * n * BYTES_PER_FP32 if state_bytes != BYTES_PER_FP32 else 0
    if name == OptimizerName.apollo_adamw:
        return upcast + 2 * proj_numel * BYTES_PER_FP32
    k = min(m, n)
    r = min(rank, k)
    product = m * r if m >= n else r * n
    cast = proj_numel * state_bytes if state_bytes != BYTES_PER_FP32 else 0
    return upcast + (m * k + k + k * n + r * r + product) * BYTES_PER_FP32 + cast


def _soap_temporaries(whole: WholeTensors) -> int:
    """soap.py SOAP.step (fp32 throughout), for a regular step and for a step that refreshes the eigenbases."""
    peaks = []
    for refresh in (False, True):
        frame = _Frame()
        for tensor in whole.tensors:
            numel_bytes = tensor.numel * BYTES_PER_FP32
            dims = _soap_dims(tensor.shape)
            # project / project_back: one tensordot per preconditioned dimension, each a new tensor (the previous
            # one freed after); with none, a view of the input.
            projected = numel_bytes if dims else 0
            chain = numel_bytes if len(dims) >= 2 else 0
            frame.assign("grad", 0)  # grad = p.grad
            frame.assign("grad_projected", projected, transient=chain)
            # exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]: the step's locals now hold this tensor's
            # states, releasing the previous tensor's replaced ones.
            frame.assign("exp_avg", 0)
            frame.assign("exp_avg_sq", 0)
            frame.temp(numel_bytes)  # exp_avg_sq.mul_(beta2).add_(grad_projected.square(), ...)
            frame.assign("denom", numel_bytes)  # exp_avg_sq.sqrt().add_(eps)
            # norm_grad = project_back(exp_avg / denom): the quotient lives through the call.
            if dims:
                frame.assign("norm_grad", numel_bytes, transient=numel_bytes + chain)
            else:
                frame.assign("norm_grad", numel_bytes)
            # update_preconditioner: state["exp_avg"] = project_back(state["exp_avg"]) is a new tensor; the old one
            # stays alive through the step's local exp_avg until the next tensor.
            frame.assign("exp_avg", projected, transient=chain)
            with frame.call():
                for d in dims:  # outer_product = tensordot(grad, grad, all dimensions but one): d x d
                    frame.assign("outer_product", d * d * BYTES_PER_FP32)
                if refresh and dims:
                    with frame.call():  # get_orthogonal_matrix_QR
                        for d in dims:
                            d2 = d * d * BYTES_PER_FP32
                            frame.assign("o", 0)  # for ind, (m, o) in ...: the loop rebinds o to the state's Q
                            # est_eig = torch.diag(o.T @ m @ o); sort_idx = argsort (int64)
                            frame.assign("est_eig", d * BYTES_PER_FP32, transient=2 * d2)
                            frame.assign("sort_idx", d * BYTES_PER_INT64)
                            frame.assign("exp_avg_sq", numel_bytes)  # exp_avg_sq.index_select(ind, sort_idx)
                            frame.assign("o", d2)  # o[:, sort_idx]
                            frame.assign("power_iter", d2)  # m @ o
                            # Q, _ = torch.linalg.qr(power_iter); final.append(Q): each Q stays in the returned list
                            frame.assign("R", d2, transient=d2)
                            frame.keep(d2)
                        # state["exp_avg_sq"] = the sorted copy; the old one stays alive through the step's local.
                        frame.assign("exp_avg_sq", numel_bytes, outermost=True)
                # state["exp_avg"] = project(state["exp_avg"]): a new tensor while the current one is alive.
                frame.temp(projected + chain)
        peaks.append(frame.peak)
    return max(peaks)
