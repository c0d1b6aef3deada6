"""Which tensors train: full fine-tuning, LoRA adapters on a frozen base, QLoRA's 4-bit base, --freeze.

LoRA (Hu et al. 2021) as PEFT builds it: for a targeted nn.Linear with weight (out, in), lora_A (r, in)
and lora_B (out, r) train; the base weight is frozen (weights only: no gradient, master or state).
QLoRA (Dettmers et al. 2023) stores the frozen base Linear weights in 4-bit NF4 as bitsandbytes does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from memcalc import context_parallel, expert_parallel, pipeline, tensor_parallel
from memcalc.errors import UsageError
from memcalc.model import (
    ROLE_ATTENTION,
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ROLE_LM_HEAD,
    ROLE_LORA,
    ROLE_MLP,
    ROLE_NORM,
    ROLE_POSITION_EMBEDDING,
    ROLE_ROUTER,
    ParamTensor,
    head_tied_to_embedding,
    token_embedding,
)
from memcalc.precision import get_recipe
from memcalc.spec import QloraQuantizer, QloraScope
from memcalc.units import BYTES_PER_FP32

if TYPE_CHECKING:
    from memcalc.resolve import ModelInput
    from memcalc.spec import TrainingSpec

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear except the output head

# bitsandbytes 4-bit (functional.quantize_4bit, QLoRA defaults: nf4, blocksize 64, double quantization):
# packed codes 2 per byte; one absmax per 64-element block, itself quantized to uint8 with an fp32 absmax
# per 256 absmax values (QLoRA paper sec. 3: 8/64 + 32/(64*256) = 0.127 bits per parameter of constants),
# plus per tensor: the 16-entry fp32 NF4 code, the 256-entry fp32 code of the nested quantization and an
# fp32 offset (bitsandbytes QuantState fields code, state2.code, offset).
NF4_BLOCKSIZE = 64
# PEFT's modules_to_save copies are named <module>.modules_to_save.default.<leaf>
MODULES_TO_SAVE = ".modules_to_save."
NF4_NESTED_BLOCKSIZE = 256
NF4_PER_TENSOR_BYTES = 16 * 4 + 256 * 4 + 4
# Without double quantization (bnb_4bit_use_double_quant False, compress_statistics=False): an fp32 absmax per
# block and the 16-entry fp32 code (functional.quantize_4bit: QuantState(absmax, code=code, ...), no state2).
NF4_SINGLE_PER_TENSOR_BYTES = 16 * 4
UPCAST_PART = "fp32 (upcast by prepare_model_for_kbit_training)"
# torchao's NF4Tensor (torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py NF4Tensor.from_tensor, torchao 0.18;
# torchtune's QLoRA): codes 2 per byte (quantized_data); an int8 scaler per 64-element block (quantized_scalers); a
# bf16 quantization_factor per 256 blocks; per tensor a bf16 scaler_mean and the 16-entry bf16 nf4 code.
TORCHAO_SCALER_BLOCKSIZE = 256
TORCHAO_PER_TENSOR_BYTES = 2 + 16 * 2
# NF4Tensor.convert_to_norm_float_weight compares each element with the 16 codes in chunks of this many elements
# (CHUNK_SIZE, torchao 0.2 on; torchao 0.1 compared the whole tensor at once)
TORCHAO_NF4_CHUNK = 1024**2

FREEZE_GROUPS: dict[str, tuple[str, ...]] = {
    "embeddings": (ROLE_EMBEDDING, ROLE_POSITION_EMBEDDING),
    "lm_head": (ROLE_LM_HEAD,),
    "norms": (ROLE_NORM,),
    "attention": (ROLE_ATTENTION,),
    "mlp": (ROLE_MLP, ROLE_EXPERT, ROLE_ROUTER),
}


# benchmarks/gpu-runs/2026-12-04-h200-d/tthead.json against the estimate of the same run (docs/accuracy.md)
TORCHTUNE_MODULES_NOTE = (
    "torchtune's QLoRA: memcalc counts transformers' modules with torchao's NF4 layers; torchtune's own model holds "
    "more: its LoRA builders make a RoPE table per layer (fp32, max_seq_len x head_dim: 2 MiB each for Llama-2), and "
    "its recipe copies the shifted logits. Llama-2-7B's step with torchtune's own modules measured 1.5% above this "
    "estimate on an H200 (its peak allocated less the cuBLAS workspaces)")


TORCHAO_COMPILED_NOTE = (
    "QLoRA under --compile: torchao's layers are traced as one 16-bit dequantized weight per matmul (bitsandbytes' "
    "layers' emulation), what Inductor's fusion of NF4Tensor.get_original_weight's pointwise ops leaves: modelled, "
    "not measured (eager, torchao's dequantization holds about 14 B per weight element at once)")


def nf4_bytes(numel: int, double_quant: bool = True, torchao: bool = False) -> int:
    """Bytes bitsandbytes holds for one NF4 tensor, with double quantization or without; ``torchao``: torchao's
    NF4Tensor's (always double-quantized)."""
    num_blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if torchao:
        # (double_quantize_scalers keeps quantization_factor[:, 0] of its (scaler blocks, 256) factors: for a single
        # scaler block that view is contiguous, its .contiguous() copies nothing, and all 256 stay)
        scaler_blocks = math.ceil(num_blocks / TORCHAO_SCALER_BLOCKSIZE)
        factors = TORCHAO_SCALER_BLOCKSIZE if scaler_blocks == 1 else scaler_blocks
        return math.ceil(numel / 2) + num_blocks + factors * 2 + TORCHAO_PER_TENSOR_BYTES
    if not double_quant:
        return math.ceil(numel / 2) + num_blocks * BYTES_PER_FP32 + NF4_SINGLE_PER_TENSOR_BYTES
    return math.ceil(numel / 2) + num_blocks + math.ceil(num_blocks / NF4_NESTED_BLOCKSIZE) * 4 + NF4_PER_TENSOR_BYTES


@dataclass(frozen=True, eq=False, repr=False)
class TrainableSubset:
    tensors: tuple[ParamTensor, ...]
    quantized: frozenset[str] = field(default_factory=frozenset)  # names of NF4-stored base weights
    # QLoRA through PEFT's prepare_model_for_kbit_training: the base's other 16-bit tensors, cast to fp32
    upcast: frozenset[str] = field(default_factory=frozenset)
    autocast_copy_numel: int = 0  # Linear weights autocast casts and keeps from forward to backward
    autocast_recompute_numel: int = 0  # with checkpointing: one layer's casts, redone during backward
    autocast_forward_only_numel: int = 0  # with checkpointing: the layers' casts, cached until autocast exits
    notes: tuple[str, ...] = ()
    double_quant: bool = True  # the NF4 base's absmax quantized again (bnb_4bit_use_double_quant)
    torchao: bool = False  # the NF4 base is torchao's NF4Tensor (torchtune's QLoRA), not bitsandbytes'

    @property
    def _num_all(self) -> int:
        return sum(t.numel for t in self.tensors)

    def _split(self) -> tuple[int, int, int]:
        """(elements in the recipe's dtype, elements upcast to fp32, bytes of the NF4 base)."""
        quantized = [t for t in self.tensors if t.name in self.quantized]
        upcast = sum(t.numel for t in self.tensors if t.name in self.upcast)
        return (self._num_all - sum(t.numel for t in quantized) - upcast, upcast,
                sum(nf4_bytes(t.numel, self.double_quant, self.torchao) for t in quantized))

    def weight_bytes(self, weight_numel_on_rank: int, bytes_per_weight: int) -> int:
        if not self.quantized:
            return weight_numel_on_rank * bytes_per_weight
        plain_numel, upcast_numel, nf4_total = self._split()
        on_rank, whole = weight_numel_on_rank, self._num_all  # ZeRO-3: this GPU's share; else all of it
        upcast_bytes = upcast_numel * max(bytes_per_weight, BYTES_PER_FP32)
        return (plain_numel * bytes_per_weight + upcast_bytes + nf4_total) * on_rank // whole

    def weight_breakdown(self, weight_numel_on_rank: int, bytes_per_weight: int) -> dict[str, int]:
        if not self.quantized:
            return {}
        plain_numel, upcast_numel, nf4_total = self._split()
        on_rank, whole = weight_numel_on_rank, self._num_all  # ZeRO-3: this GPU's share; else all of it
        parts = {"16-bit (not quantized)": plain_numel * bytes_per_weight * on_rank // whole,
                 "nf4 base": nf4_total * on_rank // whole}
        if upcast_numel:
            parts[UPCAST_PART] = upcast_numel * max(bytes_per_weight, BYTES_PER_FP32) * on_rank // whole
        return parts

    def weight_formula(self, weight_numel_on_rank: int, bytes_per_weight: int, dtype: str, sharded: bool, num_gpus: int) -> str:
        shard = f" (ZeRO-3 shard of {num_gpus} GPUs)" if sharded else ""
        if not self.quantized:
            return f"{weight_numel_on_rank:,} params{shard} x {bytes_per_weight} B ({dtype})"
        plain_numel, upcast_numel, nf4_total = self._split()
        upcast = (f" + {upcast_numel:,} params x {max(bytes_per_weight, BYTES_PER_FP32)} B (the base's other tensors, "
                  "upcast by prepare_model_for_kbit_training)" if upcast_numel else "")
        layout = (f"0.5 B/param + 1 B per 64 + 4 B per 64x256 + {NF4_PER_TENSOR_BYTES} B per tensor"
                  if self.double_quant else f"0.5 B/param + 4 B per 64 + {NF4_SINGLE_PER_TENSOR_BYTES} B per tensor, "
                  "no double quantization")
        return (f"{plain_numel:,} params x {bytes_per_weight} B ({dtype}){upcast} + NF4 base {nf4_total:,} B "
                f"({layout}){shard}")


def _is_targeted(tensor: ParamTensor, targets: tuple[str, ...]) -> bool:
    """Whether LoRA wraps this weight's Linear: every Linear but the output head for all-linear (PEFT's
    INCLUDE_LINEAR_LAYERS_SHORTHAND skips the output embeddings), else the named modules, the head too when named
    (PEFT's target_modules=["lm_head"]; torchtune's apply_lora_to_output)."""
    if not tensor.is_linear_weight:
        return False
    module = tensor.module
    if targets == (ALL_LINEAR,):
        return tensor.role != ROLE_LM_HEAD
    return any(module == target or module.endswith("." + target) for target in targets)


def _lora_adapters(tensor: ParamTensor, rank: int, conv1d: bool, dora: bool = False) -> tuple[ParamTensor, ...]:
    """PEFT's lora_A (r, in) and lora_B (out, r); with DoRA its lora_magnitude_vector (out,) (peft tuners/lora/dora.py
    DoraLinearLayer.weight)."""
    out_features, in_features = tensor.shape if not conv1d else tensor.shape[::-1]
    module = tensor.module
    lora_a = ParamTensor(f"{module}.lora_A.weight", (rank, in_features), tensor.layer, ROLE_LORA, True)
    lora_b = ParamTensor(f"{module}.lora_B.weight", (out_features, rank), tensor.layer, ROLE_LORA, True)
    if not dora:
        return lora_a, lora_b
    magnitude = ParamTensor(f"{module}.lora_magnitude_vector.weight", (out_features,), tensor.layer, ROLE_LORA, True)
    return lora_a, lora_b, magnitude


def _modules_to_save(frozen: list[ParamTensor], names: tuple[str, ...]) -> list[ParamTensor]:
    """PEFT's modules_to_save (peft utils/other.py ModulesToSaveWrapper): the named module stays as original_module,
    frozen, beside a trainable deep copy, modules_to_save.default, in the same dtype. A head tied to the token embedding
    has no tensor of its own: its copy is the embedding's shape (the copy unties them)."""
    copies: list[ParamTensor] = []
    tied = head_tied_to_embedding(frozen)
    for name in names:
        found = [t for t in frozen if t.module == name or t.module.endswith("." + name)]
        if not found and tied and name == "lm_head":
            embedding = token_embedding(frozen)
            found = [replace(embedding, name="lm_head.weight", role=ROLE_LM_HEAD)] if embedding is not None else []
        if not found:
            raise UsageError(f"{{lora_modules_to_save}} {name}: no module of this model has that name; name modules "
                             "such as lm_head or embed_tokens")
        for t in found:
            leaf = t.name[len(t.module) + 1:]
            copies.append(replace(t, name=f"{t.module}{MODULES_TO_SAVE}default.{leaf}", trainable=True))
    return copies


def float8_converts(shape: Sequence[int], output_layer: bool) -> bool:
    """Whether torchtitan's float8 converter converts a Linear with this weight shape (components/quantization/utils.py
    module_filter_fn: both dims multiples of 16; the output layer stays bf16)."""
    return not output_layer and len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0


def autocast_cast_weights(tensors: Sequence[ParamTensor], quantized: set[str] | frozenset[str]) -> list[ParamTensor]:
    """The weights torch.autocast casts to the compute dtype: every Linear weight (MoE routers' bare F.linear
    weights and LoRA's matrices too), not QLoRA's 4-bit base (dequantized on the fly)."""
    return [t for t in tensors if (t.is_linear_weight or (t.role == ROLE_LORA and len(t.shape) == 2) or
                                   (t.role == ROLE_ROUTER and len(t.shape) == 2)) and t.name not in quantized]


def _autocast_copy_numel(tensors: list[ParamTensor], quantized: set[str],
                         checkpointed: Callable[[int], bool], whole_model: bool = True) -> tuple[int, int, int]:
    """Elements of the weights torch.autocast keeps low-precision copies of from forward to backward.

    Every Linear weight is cast once per forward (autocast's weight cache) and the cast is saved for
    backward. A head tied to the input embedding is a Linear too: its weight is the embedding tensor.
    QLoRA's 4-bit base is dequantized on the fly and saves the 4-bit weight, so no copy persists. With
    checkpointing, the casts made inside checkpointed layers stay in autocast's cache until the forward's
    autocast context exits (after the loss) but are not saved for backward, which redoes one layer's at a
    time. MoE routers apply a bare weight with F.linear: cast too.
    Returns (copies alive from forward to backward, the largest layer's copies redone in backward, the
    checkpointed layers' copies alive in the forward only).
    """
    cast = autocast_cast_weights(tensors, quantized)
    # gpt2, qwen2.5-0.5b, gemma, bert's MLM decoder (a pipeline stage's tensors are not the whole model: a stage
    # without the head has no head to tie)
    if whole_model and head_tied_to_embedding(tensors):
        cast.append(token_embedding(tensors))
    per_layer: dict[int, int] = {}  # checkpointed layers' copies
    kept = 0
    for t in cast:
        if t.layer is not None and checkpointed(t.layer):
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.numel
        else:
            kept += t.numel
    return kept, max(per_layer.values(), default=0), sum(per_layer.values())


# The last few models' shards by (tensor list, tp, ep): an interleaved pipeline's rank is estimated at every moment of
# its schedule (engine._interleaved_rank: hundreds of estimates of one model), each sharding the same tensors. The list
# is held with its shards, so its id is not reused while cached; the shards are read, never changed.
_SHARDS: dict[tuple[int, int, int], tuple[Sequence[ParamTensor], list[ParamTensor]]] = {}
_SHARDS_KEPT = 4


def _sharded(tensors: Sequence[ParamTensor], tp: int, ep: int) -> list[ParamTensor]:
    key = (id(tensors), tp, ep)
    hit = _SHARDS.get(key)
    if hit is not None and hit[0] is tensors:
        return hit[1]
    sharded = expert_parallel.shard(tensor_parallel.shard(tensors, tp, experts=ep == 1), ep)
    if len(_SHARDS) >= _SHARDS_KEPT:
        del _SHARDS[next(iter(_SHARDS))]
    _SHARDS[key] = (tensors, sharded)
    return sharded


def apply(model: ModelInput, spec: TrainingSpec) -> TrainableSubset:
    """The tensors one GPU trains with (its tensor-parallel shards under --tp), which are trained, and autocast's
    copies of them."""
    tensor_parallel.check(model.described, spec.tp, spec.sharding.value == "megatron", spec.ep)
    pipeline.check(model.described, spec.pp_stages, spec.pp_layers, pipeline.stages_named(spec),
                   spec.pipeline_runtime == "megatron")
    context_parallel.check(model.described, spec)
    expert_parallel.check(model.described, spec.ep)
    tensors = _sharded(model.tensors, spec.tp, spec.ep)
    if spec.pp > 1:
        tensors = pipeline.stage_tensors(tensors, spec, model.described.arch.num_layers)
    notes: list[str] = []
    if (spec.lora_rank or spec.qlora or spec.freeze) and not model.architecture_known:
        raise UsageError("{lora_rank}, {qlora} and {freeze} need an architecture: give a model name or config.json, "
                         "not only {params}")
    if spec.qlora and not spec.lora_rank:
        raise UsageError("{qlora} trains LoRA adapters on a 4-bit base: add {lora_rank} R (e.g. {lora_rank} 16)")
    frozen_roles = {role for group in spec.freeze for role in FREEZE_GROUPS[group]}
    if frozen_roles:
        tensors = [replace(t, trainable=False) if t.role in frozen_roles else t for t in tensors]
    quantized: set[str] = set()
    upcast: set[str] = set()
    if spec.lora_rank:
        family = model.described.family if model.described is not None else None
        # PEFT's default target modules per model type (the family's), unless the user named them.
        targets = spec.lora_targets or (family.lora_targets if family is not None else None)
        if not targets:
            raise UsageError(
                f"no default LoRA targets for model_type '{model.model_type or ''}'; pass {{lora_targets}} "
                "q_proj,v_proj (module names) or {lora_targets} all-linear"
            )
        # GPT-2 uses transformers' Conv1D, whose weight is stored (in, out) rather than nn.Linear's (out, in).
        conv1d = family is not None and family.conv1d
        adapters: list[ParamTensor] = []
        frozen: list[ParamTensor] = []
        num_targeted = 0
        for t in tensors:
            if _is_targeted(t, tuple(targets)):
                num_targeted += 1
                adapters.extend(_lora_adapters(t, spec.lora_rank, conv1d, spec.dora))
            frozen.append(replace(t, trainable=False))
        if not num_targeted:
            raise UsageError(
                f"{{lora_targets}} {','.join(targets)} matches no Linear layer of this model; "
                "use module names such as q_proj,v_proj or all-linear"
            )
        tensors = frozen + adapters + _modules_to_save(frozen, spec.lora_modules_to_save)
        notes.append(f"{'DoRA' if spec.dora else 'LoRA'} r={spec.lora_rank} on {num_targeted} Linear layers "
                     f"({','.join(targets)}); base frozen")
        if spec.qlora:
            quantized = _quantized(frozen, tuple(targets), spec)
            stored = (f"{'all Linear' if spec.qlora_scope == QloraScope.all_linear else 'the LoRA-wrapped Linear'} "
                      f"weights{' and the output head' if spec.qlora_lm_head else ''} in NF4 "
                      + ("as torchao's NF4Tensor (torchtune)" if spec.qlora_quantizer == QloraQuantizer.torchao else
                         f"{'with' if spec.qlora_double_quant else 'without'} double quantization"))
            if spec.qlora_upcast:
                # peft utils/other.py prepare_model_for_kbit_training: every fp16/bf16 parameter but Params4bit to
                # fp32, before the adapters are added (HF Trainer's, TRL's and axolotl's QLoRA path).
                upcast = {t.name for t in frozen if t.name not in quantized}
                notes.append(f"QLoRA: {stored}; the base's other tensors (embeddings, norms, "
                             f"{'' if spec.qlora_lm_head else 'lm_head, '}unquantized Linear layers) in fp32, as "
                             "PEFT's prepare_model_for_kbit_training casts them (HF Trainer, TRL, axolotl; "
                             "--no-qlora-upcast keeps them 16-bit, as torchtune does)")
            else:
                notes.append(f"QLoRA: {stored}; the base's other tensors stay 16-bit")
            if spec.qlora_quantizer == QloraQuantizer.torchao:
                notes.append(TORCHTUNE_MODULES_NOTE)
                if spec.compile:
                    notes.append(TORCHAO_COMPILED_NOTE)
    if model.architecture_known:
        autocast_numel, recompute_numel, forward_only_numel = _autocast_copy_numel(
            tensors, quantized, spec.checkpointed, whole_model=spec.pp == 1)
    else:
        autocast_numel, recompute_numel, forward_only_numel = sum(t.numel for t in tensors), 0, 0
        if get_recipe(spec.precision).autocast:
            notes.append("without an architecture, every parameter is assumed to be a Linear weight for autocast copies")
    return TrainableSubset(tuple(tensors), frozenset(quantized), frozenset(upcast), autocast_numel, recompute_numel,
                           forward_only_numel, tuple(notes), spec.qlora_double_quant,
                           spec.qlora and spec.qlora_quantizer == QloraQuantizer.torchao)


def _quantized(frozen: list[ParamTensor], targets: tuple[str, ...], spec: TrainingSpec) -> set[str]:
    """The names of the weights QLoRA stores in NF4. all-linear: every Linear weight but the output head's
    (transformers' bitsandbytes quantizer skips the output embeddings: get_keys_to_not_convert); lora-targets: the
    Linear weights LoRA wraps (torchtune's Qwen2/Qwen3 builders). The head too with qlora_lm_head (an explicit
    llm_int8_skip_modules without it), which bitsandbytes cannot do to a head tied to the input embedding."""
    scope = targets if spec.qlora_scope == QloraScope.lora_targets else (ALL_LINEAR,)
    chosen = {t.name for t in frozen if _is_targeted(t, scope) and t.role != ROLE_LM_HEAD}
    if spec.qlora_lm_head:
        if head_tied_to_embedding(frozen):
            raise UsageError("{qlora_lm_head}: this model's output head is its input embedding (tied), which "
                             "bitsandbytes does not quantize (an Embedding, not a Linear); drop {qlora_lm_head}")
        chosen |= {t.name for t in frozen if t.is_linear_weight and t.role == ROLE_LM_HEAD}
    return chosen
