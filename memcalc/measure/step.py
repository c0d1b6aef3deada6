"""Run a real training step for a ModelConfig + TrainingSpec and measure it with the tensor tracker.

The run is exactly the estimate's: recipe (dtypes), optimizer and its implementation (passed explicitly:
CPU and CUDA defaults differ), attention implementation, checkpointing, micro-batch and sequence length.
The model is the transformers class named in the config's ``architectures`` (never remote code), built
from the config with random weights (nothing is downloaded).

A step, as HF Trainer's ``training_step`` runs it: forward (under torch.autocast for amp-*) with the labels the
class's head takes (``make_batch``), so the model computes its own loss; the model output is dropped, only the
loss is kept; ``loss.backward()``; the optimizer step; ``zero_grad(set_to_none=True)``. Step 0 (warm-up) creates
the optimizer state; step 1 is measured.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memcalc.errors import MissingDependencyError, UsageError
from memcalc.measure import build, cuda_semantics
from memcalc.measure import tracker as trk
from memcalc.measure.measurement import Measurement
from memcalc.model import ModelConfig
from memcalc.optimizers import OptimImpl, OptimizerName, OptimizerSettings
from memcalc.precision import Dtype, Recipe, get_recipe
from memcalc.spec import Checkpointing, LossKind, TrainingSpec
from memcalc.trainable import float8_converts
from memcalc.vocab import TERM_OFFLOADED_ACTIVATIONS

TORCH_DTYPES = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}
# The optimizers a verify step builds (build_optimizer); the others are estimated from their code only.
VERIFIED_OPTIMIZERS = (OptimizerName.adamw, OptimizerName.adam, OptimizerName.sgd, OptimizerName.sgd_momentum,
                       OptimizerName.adafactor)
LEARNING_RATE = 1e-3
SGD_MOMENTUM = 0.9
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", build.SDPA_REPEAT_KV)
# Terms whose estimate is what the forward leaves alive for the backward.
FORWARD_LIVE_TERMS = (trk.ACTIVATIONS, trk.LOGITS_AND_LOSS, trk.AUTOCAST_COPIES)
SDPA_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"
SDPA_MATH_OPS = {"_safe_softmax", "_softmax"}  # what SDPA's math path decomposes into

# The tracker is a TorchDispatchMode, and while one is active ATen's isTensorSubclassLike is true for every tensor
# (TensorSubclassLikeUtils.h), so autograd's input buffer never sums two gradient contributions in place
# (torch/csrc/autograd/input_buffer.cpp accumulate, can_accumulate_inplace).
SHARED_WEIGHT_NOTE = ("a weight is used twice (a tied or shared embedding): under the tracker (a TorchDispatchMode) "
                      "autograd sums its gradient contributions out of place, so where an ordinary step adds a fresh "
                      "contribution in place (autocast's cast of the head's, an embedding shared by two stacks) this "
                      "one holds one more V x h tensor at the sum; the estimate follows the ordinary step")

GRAD_SCALER_NOTE = ("amp-fp16 ran with torch.amp.GradScaler, as HF Trainer runs it: the loss scaled before backward, "
                    "the gradients unscaled in place and checked before the optimizer step")

# A CPU step whose backward ran softmax's backward (eager attention, sdpa's math path): it made the temporary CUDA's
# kernel makes (memcalc.measure.cuda_semantics.softmax_backward_like_cuda)
SOFTMAX_TEMPORARY_NOTE = ("softmax's backward made CUDA's temporary here (grad * output, the incoming gradient's size: "
                          "SoftMax.cu softmax_backward_cuda_out makes it, the CPU kernel does not; emulated, "
                          "cuda_semantics.softmax_backward_like_cuda)")

# A CPU step whose sdpa got a v narrower than q and k (DeepSeek's MLA): it ran a fused kernel, as CUDA's
# memory-efficient one takes it, rather than the CPU's math backend (memcalc.measure.cuda_semantics.sdpa_narrow_v)
NARROW_V_NOTE = ("sdpa's v is narrower than q and k (MLA): CUDA's memory-efficient kernel takes it and keeps no s^2 "
                 "weights; the CPU's flash kernel does not take it and its math backend would keep them, so this step "
                 "ran the CPU's flash kernel on v zero-padded to q's width (the same output; v and the output kept at "
                 "q's width, and the output's contiguous copy; cuda_semantics.sdpa_narrow_v)")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StepSetup:
    """The resolved run: what the estimate assumes, as torch objects."""

    recipe: Recipe
    weight_dtype: torch.dtype
    master_dtype: torch.dtype | None
    autocast_dtype: torch.dtype | None
    optimizer: OptimizerSettings
    attn_implementation: str
    checkpointing: bool
    micro_batch_size: int
    seq_len: int
    device: str
    decoder_seq_len: int | None = None  # encoder-decoder models: the target length (None: seq_len)
    checkpoint_every: int = 0  # --checkpointing every:N: only every N-th layer (torchtitan's count from 1)
    checkpoint_reentrant: bool = False  # --checkpoint-reentrant: torch.utils.checkpoint's reentrant variant
    loss_chunks: int = 0  # --loss chunked:N: torchtune's chunked output and cross-entropy
    optim_in_backward: bool = False  # --optim-in-backward: an optimizer per parameter, stepped in its gradient hook
    selective_op: bool = False  # --checkpointing selective-op: torchtitan's per-op policy (measure.selective)
    activation_offload: str = "none"  # --activation-offload torchtune | trl: their OffloadActivations (measure.offload)
    lora_rank: int | None = None  # --lora-rank: PEFT's LoRA on a frozen base (build_model)
    lora_targets: tuple[str, ...] | None = None  # None: the family's default target modules
    freeze: tuple[str, ...] = ()  # --freeze groups: their parameters built with requires_grad False
    lora_dropout: float = 0.0  # LoraConfig.lora_dropout
    dora: bool = False  # LoraConfig.use_dora
    lora_modules_to_save: tuple[str, ...] = ()  # LoraConfig.modules_to_save
    qlora: bool = False  # the frozen Linears as bitsandbytes' 4-bit layers (measure.qlora, traced steps only)
    qlora_upcast: bool = True  # prepare_model_for_kbit_training's fp32 cast of the rest
    qlora_scope: str = "all-linear"  # which Linears are 4-bit (memcalc.trainable decides, by name)
    qlora_double_quant: bool = True  # the absmax quantized again: dequantized in each forward
    qlora_lm_head: bool = False  # the output head 4-bit too
    qlora_quantizer: str = "bitsandbytes"  # or torchao: torchtune's NF4Tensor, run for real (measure.qlora)
    compile: bool = False  # each decoder layer as Inductor compiles it (memcalc.measure.compiled)
    fp8: str = "none"  # --fp8 tensorwise | rowwise: torchao's Float8Linear in place of the converted Linear layers
    padded: bool = False  # --padded: the batch's last row half padding (make_batch), as a padding collator leaves it

    def describe(self) -> dict[str, Any]:
        opt = self.optimizer
        return {
            "precision": self.recipe.name,
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
            "master_dtype": str(self.master_dtype).removeprefix("torch.") if self.master_dtype else None,
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None,
            "optimizer": opt.name.value,
            "optim_impl": "per-tensor loop (transformers Adafactor has no foreach/fused path)"
            if opt.name == OptimizerName.adafactor else opt.impl.value,
            "attn_implementation": self.attn_implementation,
            "checkpointing": ((f"every:{self.checkpoint_every}" if self.checkpoint_every else
                               "selective-op" if self.selective_op else "full")
                              + (" (reentrant)" if self.checkpoint_reentrant else "")) if self.checkpointing else "none",
            **({"loss": f"chunked:{self.loss_chunks}"} if self.loss_chunks else {}),
            **({"activation_offload": "transformers' checkpoint offloading (save_on_cpu)"
                if self.activation_offload == "checkpoints" else f"{self.activation_offload} OffloadActivations"}
               if self.activation_offload != "none" else {}),
            **({"freeze": ",".join(self.freeze)} if self.freeze else {}),
            **({"fp8": f"torchao Float8Linear ({self.fp8}; torchtitan's converter)"} if self.fp8 != "none" else {}),
            **({"compile": "each decoder layer: AOTAutograd with Inductor's decompositions and partition_fn, "
                           "Inductor's buffers as its scheduler plans them (emulated: no kernels built)"}
               if self.compile else {}),
            **({"qlora": f"torchao NF4Tensor layers as torchtune builds them ({self.qlora_scope})"
                         + (", traced as one 16-bit dequantized weight per matmul under compile" if self.compile
                            else "")}
               if self.qlora and self.qlora_quantizer == "torchao" else
               {"qlora": f"bitsandbytes 4-bit layers emulated ({self.qlora_scope}"
                         f"{', the head too' if self.qlora_lm_head else ''}"
                         f"{'' if self.qlora_double_quant else ', no double quantization'})"
                         f"{', the rest upcast to fp32' if self.qlora_upcast else ''}"}
               if self.qlora else {}),
            **({"lora": f"PEFT {'DoRA' if self.dora else 'LoRA'} r={self.lora_rank}"
                        f"{f' dropout {self.lora_dropout}' if self.lora_dropout else ''} on "
                        f"{','.join(self.lora_targets or ('the default targets',))}, adapters in "
                        f"{'fp32' if self.master_dtype is not None else 'the weight dtype'}"}
               if self.lora_rank else {}),
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            **({"decoder_seq_len": self.decoder_seq_len} if self.decoder_seq_len is not None else {}),
            "device": self.device,
        }


def resolve_setup(spec: TrainingSpec, attn_implementation: str = "sdpa", device: str = "cpu",
                  traced: bool = False) -> StepSetup:
    """Check the spec is one a single-process step can run, and resolve its dtypes. ``traced``: for the estimate's
    traced step, which emulates QLoRA's 4-bit layers (memcalc.measure.qlora); a measured step does not."""
    recipe = get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)
    unsupported = []
    if spec.zero_stage or spec.num_gpus > 1:
        unsupported.append(f"{{zero}} {spec.zero_stage} / {{gpus}} {spec.num_gpus} (needs several ranks)")
    if spec.qlora and not traced and spec.qlora_quantizer.value != "torchao":
        unsupported.append("QLoRA (bitsandbytes' 4-bit layers: the estimate's trace emulates them; torchao's, "
                           "{qlora_quantizer} torchao, are measured)")
    elif spec.qlora and not traced and spec.compile:
        unsupported.append("QLoRA under {compile} (torchao's layers are traced as Inductor's fused dequantization, "
                           "not run)")
    if spec.optimizer not in VERIFIED_OPTIMIZERS:
        unsupported.append(f"{{optim}} {spec.optimizer.value}")
    if spec.optim_in_backward and recipe.master_dtype is not None:
        unsupported.append("{optim_in_backward} with a master copy (use a recipe without one: bf16-pure, fp32, "
                           "amp-bf16)")
    if spec.loss == LossKind.fused_linear:
        unsupported.append("{loss} fused-linear (Liger's Triton kernels need a GPU: the estimate models it from "
                           "their code)")
    if unsupported:
        raise UsageError(f"verify does not yet run {', '.join(unsupported)}; drop it to verify the rest")
    if spec.repeat_kv and attn_implementation == "sdpa":
        attn_implementation = build.SDPA_REPEAT_KV
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UsageError(f"attention implementation {attn_implementation!r}: use one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if recipe.grad_dtype != recipe.weight_dtype:
        raise UsageError("verify runs gradients in the weight dtype (as autograd makes them); drop {grad_dtype}")
    if spec.state_dtype is not None and recipe.state_dtype != recipe.optimizer_param_dtype:
        raise UsageError("verify creates optimizer states in the dtype of the tensors it updates (torch.optim "
                         "zeros_like); drop {state_dtype}")
    weight = TORCH_DTYPES[recipe.weight_dtype]
    return StepSetup(
        recipe=recipe, weight_dtype=weight,
        master_dtype=TORCH_DTYPES[recipe.master_dtype] if recipe.master_dtype else None,
        autocast_dtype=TORCH_DTYPES[recipe.compute_dtype] if recipe.autocast else None,
        optimizer=spec.optimizer_settings, attn_implementation=attn_implementation,
        checkpointing=spec.checkpointing != Checkpointing.none, checkpoint_every=spec.checkpoint_every,
        checkpoint_reentrant=spec.checkpoint_reentrant,
        loss_chunks=spec.loss_chunks, optim_in_backward=spec.optim_in_backward,
        selective_op=spec.checkpointing == Checkpointing.selective_op, activation_offload=spec.activation_offload.value,
        lora_rank=spec.lora_rank, lora_targets=spec.lora_targets, freeze=spec.freeze, lora_dropout=spec.lora_dropout,
        dora=spec.dora, lora_modules_to_save=spec.lora_modules_to_save,
        qlora=spec.qlora, qlora_upcast=spec.qlora_upcast, qlora_scope=spec.qlora_scope.value,
        qlora_double_quant=spec.qlora_double_quant, qlora_lm_head=spec.qlora_lm_head,
        qlora_quantizer=spec.qlora_quantizer.value, compile=spec.compile,
        fp8=spec.fp8.value, padded=spec.padding_masked and spec.attention.value != "flash",  # (flash unpads)
        micro_batch_size=spec.micro_batch_size,
        seq_len=spec.seq_len, device=device,
        decoder_seq_len=spec.decoder_seq_len,
    )


# -- model -------------------------------------------------------------------------------------------------
def _raw(model_config: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    return dict(model_config.raw) if isinstance(model_config, ModelConfig) else dict(model_config)


def build_model(model_config: ModelConfig | dict[str, Any], setup: StepSetup) -> torch.nn.Module:
    """The model of the config (memcalc.measure.build, the one builder), in the recipe's weight dtype, on the
    setup's device, checkpointed as the spec says, in training mode."""
    from torch._guards import detect_fake_mode

    # a real GPU step's model is initialised on the GPU (an 8B model's host initialisation and copy take longer than
    # its steps); a traced step's fake CPU tensors stay as built (they cannot be moved)
    direct = (torch.device(setup.device).type == "cuda" and torch.cuda.is_available()
              and detect_fake_mode() is None)
    model = build.build_model(_raw(model_config), dtype=setup.weight_dtype,
                              attn_implementation=setup.attn_implementation, device=setup.device if direct else None)
    if torch.device(setup.device).type != "cpu" and not direct:  # (built on the CPU)
        model = model.to(device=setup.device)
    if setup.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        offload = {"offload": True} if setup.activation_offload == "checkpoints" else {}
        if offload and enable is None:
            raise UsageError("{activation_offload} checkpoints is transformers' activation_checkpointing_enable("
                             "offload=True), which this transformers lacks: upgrade it")
        # transformers passes these keywords on to torch.utils.checkpoint.checkpoint for each decoder layer:
        # torchtitan's SAC contexts (each block in checkpoint_wrapper, non-reentrant) for selective-op, HF's
        # gradient_checkpointing_kwargs {"use_reentrant": True} for reentrant checkpoints, else its own default.
        kwargs: dict[str, Any] | None = None
        if setup.selective_op:
            from memcalc.measure.selective import CHECKPOINT_KWARGS

            kwargs = dict(CHECKPOINT_KWARGS)
        elif setup.checkpoint_reentrant:
            kwargs = {"use_reentrant": True}
        if kwargs is None:
            (enable or model.gradient_checkpointing_enable)(**offload)
        elif enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, **offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if setup.checkpoint_every:
            # every:N: HF's checkpointing left on the layers torchtitan's _apply_ac_to_transformer_block wraps
            # (1-based counts divisible by N), off on the others.
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for index, layer in enumerate(layers):
                layer.gradient_checkpointing = (index + 1) % setup.checkpoint_every == 0
    if setup.freeze:
        _freeze(model, model_config, setup)
    if setup.qlora and setup.qlora_quantizer == "torchao" and not setup.compile:
        from memcalc.measure import qlora

        # torchtune's LoRALinear(quantize_base=True): torchao's NF4Tensor of the model's weight, linear_nf4 in forward
        qlora.quantize_torchao(model, _quantized_names(model_config, setup))
    elif setup.qlora:
        # (torchao's layers under --compile: the compile emulation cannot trace an NF4Tensor; Inductor fuses their
        # dequantization's pointwise ops, leaving one 16-bit weight a matmul, as bitsandbytes' layers make:
        # trainable.TORCHAO_COMPILED_NOTE)
        from memcalc.measure import qlora

        # transformers' bnb 4-bit loading (the compute dtype: the recipe's), then peft's prepare_model_for_kbit_training
        # (quantized from a 16-bit load: the weights' dtype, or under autocast its dtype, as HF loads then upcasts)
        sixteen = setup.weight_dtype if setup.weight_dtype != torch.float32 else setup.autocast_dtype or torch.float32
        quantized = qlora.quantize(model, _quantized_names(model_config, setup), setup.autocast_dtype or setup.weight_dtype,
                                   sixteen, setup.qlora_double_quant)
        if setup.qlora_upcast:
            qlora.upcast(model, quantized)
    if setup.fp8 != "none":
        _float8(model, setup.fp8)
    if setup.lora_rank:
        model = _with_lora(model, model_config, setup)
    if setup.compile:
        # torchtune training/_compile.py compile_model: each decoder layer compiled, after checkpointing is applied
        # and adapters are added; the embeddings, the head and the loss run eager.
        from memcalc.measure.compiled import compile_layer

        if getattr(model, "config", None) is not None:
            model.config.use_cache = False  # no KV cache object through the compiled layers (a training step's)
        for layer in build.decoder_layers(model):
            compile_layer(layer)
    model.train()
    return model


FP8_INSTALL = "--fp8 runs torchao's float8 layers: pip install torchao (memcalc-train[fp8])"


def _float8(model: torch.nn.Module, recipe: str) -> None:
    """torchtitan's float8 converter (components/quantization/float8.py, utils.module_filter_fn): torchao's
    ``convert_to_float8_training`` with the recipe's ``Float8LinearConfig``, on every nn.Linear whose weight's dims are
    multiples of 16, the output layer left out (torchtitan's ``output``, transformers' ``lm_head``). torchao's float8
    ops run on the CPU (torch._scaled_mm) and under FakeTensorMode."""
    try:  # (its import-time logs quieted: build.IMPORT_TIME_LOGGERS)
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise MissingDependencyError(FP8_INSTALL) from None

    def convertible(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and float8_converts(tuple(module.weight.shape), "lm_head" in fqn)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=convertible)


def _quantized_names(model_config: ModelConfig | dict[str, Any], setup: StepSetup) -> set[str]:
    """The weights QLoRA stores in 4-bit, as the estimate's inventory names them (memcalc.trainable: its names are
    transformers' named_parameters), for this model's config (a traced step's fewer layers included)."""
    from memcalc import trainable
    from memcalc.resolve import model_of
    from memcalc.spec import TrainingSpec

    described = model_of(ModelConfig("config", _raw(model_config), "config"))
    spec = TrainingSpec(lora_rank=setup.lora_rank, lora_targets=setup.lora_targets, qlora=True,
                        qlora_scope=setup.qlora_scope, qlora_lm_head=setup.qlora_lm_head)
    return set(trainable.apply(described, spec).quantized)


def _freeze(model: torch.nn.Module, model_config: ModelConfig | dict[str, Any], setup: StepSetup) -> None:
    """--freeze: the parameters the estimate freezes (memcalc.trainable, by role: its inventory's names are
    transformers' named_parameters) get requires_grad False, as a trainer's freezing loop sets it."""
    from memcalc import trainable
    from memcalc.resolve import model_of
    from memcalc.spec import TrainingSpec

    described = model_of(ModelConfig("config", _raw(model_config), "config"))
    frozen = {t.name for t in trainable.apply(described, TrainingSpec(freeze=setup.freeze)).tensors if not t.trainable}
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def _with_lora(model: torch.nn.Module, model_config: ModelConfig | dict[str, Any], setup: StepSetup) -> torch.nn.Module:
    """PEFT's LoRA as HF Trainer, TRL and axolotl apply it: the base frozen, adapters on the target modules (the
    family's defaults, PEFT's own per model type, unless named), the spec's lora_dropout (LoraConfig's default 0). With a
    master recipe (a 16-bit base whose trainable parameters train in fp32) the adapters are fp32, as get_peft_model's
    autocast_adapter_dtype makes them on a bf16 or fp16 base; otherwise they are in the weight dtype."""
    with build.quiet_bitsandbytes():
        from peft import LoraConfig, get_peft_model

    from memcalc import families

    targets = setup.lora_targets
    if not targets:
        targets = families.describe(ModelConfig("config", _raw(model_config), "config")).family.lora_targets
    if not targets:
        raise UsageError("no default LoRA targets for this model type; pass {lora_targets}")
    for param in model.parameters():
        param.requires_grad_(False)
    target_modules: Any = "all-linear" if tuple(targets) == ("all-linear",) else list(targets)
    config = LoraConfig(r=setup.lora_rank, target_modules=target_modules, lora_dropout=setup.lora_dropout,
                        use_dora=setup.dora, modules_to_save=list(setup.lora_modules_to_save) or None)
    # The adapters are made in their final dtype and place directly: PEFT makes them in the default dtype, moves them
    # to the base layer's device and dtype (_move_adapter_to_device_of_base_layer, LoraModel._replace_module) and
    # upcasts them again, and under FakeTensorMode a module's .to() cannot swap fake parameters. Here the moves are
    # skipped (everything is on the one device already) and the default dtype is the adapters': the same tensors in
    # the same dtypes.
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_dtype = setup.master_dtype or setup.weight_dtype
    move, module_to = BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to

    def same_device(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        device, dtype, _non_blocking, _format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and all(device is None or p.device == device for p in module.parameters()):
            return module
        return module_to(module, *args, **kwargs)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda *_args, **_kwargs: None
    torch.nn.Module.to = same_device
    try:
        # (peft asks transformers' deprecated is_gradient_checkpointing: its FutureWarning is not the user's business)
        with build.default_dtype(adapter_dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config, autocast_adapter_dtype=False)
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move
        torch.nn.Module.to = module_to


def dropout_probabilities(model_config: ModelConfig | dict[str, Any]) -> dict[str, float]:
    """Non-zero dropout probabilities of the config, as its family resolves them (class defaults included)."""
    from memcalc import families

    raw = _raw(model_config)
    return dict(families.describe(ModelConfig("config", raw, "config")).arch.dropout)


# -- optimizer -------------------------------------------------------------------------------------------------
def build_optimizer(params: list[torch.Tensor], settings: OptimizerSettings):
    impl = {OptimImpl.foreach: {"foreach": True}, OptimImpl.fused: {"fused": True},
            OptimImpl.forloop: {"foreach": False}}[settings.impl]
    name = settings.name
    if name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=LEARNING_RATE, amsgrad=settings.amsgrad, **impl)
    if name == OptimizerName.adam:
        return torch.optim.Adam(params, lr=LEARNING_RATE, amsgrad=settings.amsgrad, **impl)
    if name == OptimizerName.sgd:
        return torch.optim.SGD(params, lr=LEARNING_RATE, **impl)
    if name == OptimizerName.sgd_momentum:
        return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=SGD_MOMENTUM, **impl)
    if name == OptimizerName.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=LEARNING_RATE, scale_parameter=False, relative_step=False, warmup_init=False,
                         beta1=settings.adafactor_beta1)
    raise UsageError(f"verify does not yet run {{optim}} {name.value}")


class _InBackward:
    """--optim-in-backward as torchtune's recipes run it (training/memory.py register_optim_in_bwd_hooks): one optimizer
    per parameter, stepped in the parameter's post-accumulate-grad hook, which then sets its gradient to None. The
    whole step happens in backward: ``step`` and ``zero_grad`` have nothing left to do."""

    def __init__(self, params: list[torch.Tensor], settings: OptimizerSettings) -> None:
        self.optimizers = {p: build_optimizer([p], settings) for p in params}
        for param in params:
            param.register_post_accumulate_grad_hook(self._step)

    def _step(self, param: torch.Tensor) -> None:
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class Stepper:
    """The optimizer step of the recipe. With a master dtype (bf16/fp16 mixed): fp32 master copies are what
    the optimizer updates; at the step the 16-bit gradients are cast to fp32 (all at once, as DeepSpeed casts a
    rank's partition), the optimizer steps the masters, the fp32 gradients are freed and the masters are copied
    back into the 16-bit parameters."""

    def __init__(self, model: torch.nn.Module, setup: StepSetup) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters: list[torch.Tensor] = []
        if setup.master_dtype is not None:
            self.masters = [p.detach().to(setup.master_dtype, copy=True).requires_grad_(True) for p in self.params]
        if setup.optim_in_backward:
            self.optimizer = _InBackward(self.params, setup.optimizer)
        else:
            self.optimizer = build_optimizer(self.masters or self.params, setup.optimizer)
        self.fused = setup.optimizer.impl == OptimImpl.fused and setup.optimizer.name != OptimizerName.adafactor
        self.on_master_grads: Callable[[list[torch.Tensor]], None] | None = None
        # amp-fp16 as HF Trainer runs it (accelerate's GradScaler): the loss scaled before backward, the gradients
        # unscaled in place and checked before the step. Not on fake tensors: the check reads found_inf's value, which
        # a fake tensor does not have (its tensors are scalars: the trace leaves them out, said).
        self.scaler = None
        if setup.autocast_dtype == torch.float16 and not setup.optim_in_backward and self.params \
                and not _is_fake(self.params[0]):
            self.scaler = torch.amp.GradScaler(self.params[0].device.type)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        if not self.masters:
            self.optimizer.step()
            return
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.to(m.dtype) if p.grad is not None else None
        if self.on_master_grads is not None:
            self.on_master_grads([m.grad for m in self.masters if m.grad is not None])
        self.optimizer.step()
        for m in self.masters:
            m.grad = None
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Optimizer state tensors by state key, without torch.optim's host-side 'step' counters."""
        found: dict[str, list[torch.Tensor]] = {}
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not (key == "step" and not self.fused):
                    found.setdefault(key, []).append(value)
        return found


# -- the step --------------------------------------------------------------------------------------------------
class PhaseClock:
    """Told when each phase of the measured step begins (and when the step ends). Subclassed by the CUDA path."""

    def enter(self, phase: str) -> None:
        pass

    def finish(self) -> None:
        pass


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (shared storages once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[id(s)] = int(s.nbytes())
    return sum(seen.values())


def make_inputs(model: torch.nn.Module, setup: StepSetup) -> torch.Tensor:
    """Token ids (micro_batch, seq_len), uniformly drawn from the vocabulary."""
    vocab = int(model.config.get_text_config().vocab_size)
    return torch.randint(0, vocab, (setup.micro_batch_size, setup.seq_len), device=setup.device)


# -- the batch -------------------------------------------------------------------------------------------------
# What a training batch holds depends on the head. A class's head is the first of these transformers auto mappings
# (models/auto/modeling_auto.py) that lists it for its model type: BartForConditionalGeneration is in the seq2seq,
# masked-LM and pre-training mappings and trains as seq2seq; GPT2LMHeadModel, in causal LM and pre-training, as a
# causal LM.
HEAD_SEQ2SEQ = "seq2seq LM"
HEAD_SEQUENCE_CLASSIFICATION = "sequence classification"
HEAD_NEXT_SENTENCE = "next-sentence prediction"
HEAD_TOKEN_CLASSIFICATION = "token classification"
HEAD_QUESTION_ANSWERING = "question answering"
HEAD_MULTIPLE_CHOICE = "multiple choice"
HEAD_CAUSAL_LM = "causal LM"
HEAD_MASKED_LM = "masked LM"
HEAD_PRETRAINING = "pre-training"
HEAD_NONE = "base model (no head)"
_HEAD_MAPPINGS = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", HEAD_SEQ2SEQ),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", HEAD_SEQUENCE_CLASSIFICATION),
    ("MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES", HEAD_NEXT_SENTENCE),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", HEAD_TOKEN_CLASSIFICATION),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", HEAD_QUESTION_ANSWERING),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", HEAD_MULTIPLE_CHOICE),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", HEAD_CAUSAL_LM),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", HEAD_MASKED_LM),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", HEAD_PRETRAINING),
    ("MODEL_MAPPING_NAMES", HEAD_NONE),
    ("MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES", HEAD_NONE),
)
# The module whose forward produces the logits of a classification head (the tracker counts what is created from
# it on as logits_and_loss, as it does from lm_head on for language models): BERT-likes' classifier, decoders'
# score (modeling_layers.GenericForSequenceClassification), qa_outputs, BART's and T5's classification_head.
_CLASSIFIER_MODULES = ("classifier", "score", "qa_outputs", "classification_head")


def head_kind(class_name: str, model_type: str) -> str | None:
    """The kind of head of a model class (HEAD_*), or None for a class no mapping above lists (a multimodal
    generator, say: it is run as a language model, labels = input_ids)."""
    from transformers.models.auto import modeling_auto

    for mapping, kind in _HEAD_MAPPINGS:
        names = getattr(modeling_auto, mapping, {}).get(model_type, ())
        if class_name in ((names,) if isinstance(names, str) else tuple(names)):
            return kind
    return None


def check_trainable(class_name: str, model_type: str) -> str | None:
    """The head kind of a class verify can train; a base model (no loss) or a multiple-choice head is refused."""
    kind = head_kind(class_name, model_type)
    if kind == HEAD_NONE:
        raise UsageError(f"verify runs a training step with the model's own loss, and {class_name} is a base model (no "
                         "head, no loss): name a class with a head first in the config's architectures")
    if kind == HEAD_MULTIPLE_CHOICE:
        raise UsageError(f"verify does not yet run multiple-choice heads ({class_name}: inputs of batch x choices x "
                         "sequence); name another head in the config's architectures")
    return kind


def _labels_of_classifier(model: torch.nn.Module, setup: StepSetup, shape: tuple[int, ...]) -> torch.Tensor:
    """Labels as the sequence-classification loss reads them (modeling_bert.BertForSequenceClassification.forward,
    loss_utils.ForSequenceClassificationLoss): class indices (int64), or float targets for config.problem_type
    regression (num_labels 1 when unset) and multi_label_classification, in the logits' dtype (the weights')."""
    num_labels = int(model.config.num_labels)
    problem = model.config.problem_type or ("regression" if num_labels == 1 else "single_label_classification")
    if problem == "single_label_classification":
        return torch.randint(0, num_labels, shape, device=setup.device)
    floats = shape if num_labels == 1 else (*shape, num_labels)
    return torch.rand(floats, dtype=setup.weight_dtype, device=setup.device)


def make_batch(model: torch.nn.Module, setup: StepSetup) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The keyword arguments of one training forward for the model's head, following its forward's signature, and
    notes on what was chosen for the run. Inputs are (micro_batch, seq_len) token ids; labels:
      causal / masked LM: the input ids (every position labelled: the loss's size is the same for a real batch)
      seq2seq (T5ForConditionalGeneration.forward): labels (micro_batch, decoder_seq_len); the model builds the
        decoder inputs from them (_shift_right), as from a DataCollatorForSeq2Seq batch
      sequence classification / next-sentence prediction: one label per sequence (micro_batch,)
      token classification: one class per token (micro_batch, seq_len)
      question answering: start_positions and end_positions, one position per sequence (micro_batch,)
      pre-training (BertForPreTraining.forward): token labels and a next_sentence_label per sequence
    A base model has no loss to train with, and multiple choice takes (micro_batch, choices, seq_len): refused."""
    import inspect

    cls = type(model).__name__
    kind = check_trainable(cls, model.config.model_type)
    b, s = setup.micro_batch_size, setup.seq_len
    input_ids = make_inputs(model, setup)
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids}
    notes: list[str] = []
    parameters = inspect.signature(model.forward).parameters
    if kind == HEAD_SEQ2SEQ:
        vocab = int(model.config.get_text_config().vocab_size)
        batch["labels"] = torch.randint(0, vocab, (b, setup.decoder_seq_len or s), device=setup.device)
    elif kind == HEAD_SEQUENCE_CLASSIFICATION:
        batch["labels"] = _labels_of_classifier(model, setup, (b,))
        text = model.config.get_text_config()
        if b > 1 and getattr(text, "pad_token_id", "absent") is None:
            # modeling_layers.GenericForSequenceClassification (and GPT2's) refuse batches > 1 without a pad token: it
            # finds each row's last non-pad token. Which token that is changes no tensor's size.
            text.pad_token_id = 0
            notes.append(f"the config has no pad_token_id, without which {cls} refuses batches of more than one "
                         "sequence: the run used 0 (it picks the last non-pad token of each row; no size changes)")
    elif kind == HEAD_NEXT_SENTENCE:
        batch["labels"] = torch.randint(0, 2, (b,), device=setup.device)
    elif kind == HEAD_TOKEN_CLASSIFICATION:
        batch["labels"] = torch.randint(0, int(model.config.num_labels), (b, s), device=setup.device)
    elif kind == HEAD_QUESTION_ANSWERING:
        batch["start_positions"] = torch.randint(0, s, (b,), device=setup.device)
        batch["end_positions"] = torch.randint(0, s, (b,), device=setup.device)
    elif getattr(setup, "padded", False) and b > 1 and kind not in (HEAD_MASKED_LM, HEAD_PRETRAINING):
        # (one row is its own longest: nothing to pad; the padding of a causal LM's batch only: an encoder's mask is
        # another, not modelled, and its estimate says so)
        from torch._guards import detect_fake_mode

        # What DataCollatorWithPadding / DataCollatorForSeq2Seq hand a causal LM (padding side right): the last row's
        # second half padded, the pad token in input_ids, 0 in attention_mask and -100 in labels (a tensor of its own).
        # A fake batch has no values: its mask is all ones, which masking_utils does not read (under FakeTensorMode
        # is_tracing holds, and _ignore_causal_mask_sdpa keeps the 4-D mask a padded batch gets).
        mask = torch.ones_like(input_ids)
        batch["labels"] = input_ids.clone()
        if detect_fake_mode() is None:
            pad = int(getattr(model.config.get_text_config(), "pad_token_id", None) or 0)
            mask[-1, s // 2:] = 0
            input_ids.masked_fill_(mask == 0, pad)
            batch["labels"].masked_fill_(mask == 0, -100)
        batch["attention_mask"] = mask
    else:
        batch["labels"] = input_ids
        for name in ("next_sentence_label", "sentence_order_label"):  # BertForPreTraining, AlbertForPreTraining
            if kind == HEAD_PRETRAINING and name in parameters:
                batch[name] = torch.randint(0, 2, (b,), device=setup.device)
    return batch, notes


def loss_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module from whose forward on the tracker counts logits and loss: the output embeddings of a language
    model, the classifier of a classification head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head
    return next((module for name in _CLASSIFIER_MODULES if isinstance(module := getattr(model, name, None),
                                                                     torch.nn.Module)), None)


def _autocast(setup: StepSetup):
    if setup.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(setup.device).type, dtype=setup.autocast_dtype)


def _chunk_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CEWithChunkedOutputLoss.compute_cross_entropy: one chunk's logits upcast and its summed cross-entropy."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def _chunked_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], chunks: int,
                  compiled: bool = False) -> torch.Tensor:
    """torchtune's chunked loss on a transformers causal LM: the decoder's last hidden state split along the sequence
    (TransformerDecoder.chunked_output: ``.chunk(num_output_chunks, dim=1)``), the output projection per chunk, then
    CEWithChunkedOutputLoss.forward: each chunk's ``F.cross_entropy(logits.float(), labels, reduction="sum")``
    summed and divided by the labelled tokens; the list of logits is dropped after the loss (the recipes
    ``del logits``). Labels shifted as ForCausalLMLoss shifts them (padded with -100, then one to the left).
    ``compiled``: the per-chunk cross-entropy compiled, as torchtune's compile_loss compiles it."""
    head = model.get_output_embeddings()
    hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    logits = [head(chunk) for chunk in hidden.chunk(chunks, dim=1)]
    del hidden
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    entropy = _chunk_cross_entropy
    if compiled:
        from memcalc.measure.compiled import compile_function

        entropy = compile_function(_chunk_cross_entropy)
    total = sum(entropy(chunk, target) for chunk, target in zip(logits, labels.chunk(chunks, dim=1)))
    del logits
    return total / (labels != -100).sum()


def one_step(model: torch.nn.Module, stepper: Stepper, batch: Mapping[str, torch.Tensor] | torch.Tensor,
             setup: StepSetup, clock: PhaseClock, after_backward: Callable[[], None] | None = None,
             micro_batches: int = 1) -> None:
    """One training step on ``batch`` (make_batch's keyword arguments; bare token ids are a language model's
    input_ids and labels). ``micro_batches``: forward and backward that many times before the optimizer step, the
    gradients accumulating (HF Trainer's gradient accumulation)."""
    from memcalc.measure.cuda_semantics import kernels_like_cuda

    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch, "labels": batch}
    for _ in range(micro_batches):
        # (sdpa's kernel as CUDA's dispatcher picks it, fp32 with grouped heads on the math path; softmax's backward
        # with CUDA's temporary)
        with kernels_like_cuda():
            clock.enter(trk.FORWARD)
            loss = forward_loss(model, batch, setup)
            clock.enter(trk.BACKWARD)
            if isinstance(stepper, Stepper):
                stepper.backward(loss)
            else:
                loss.backward()
            del loss
    if after_backward is not None:
        after_backward()
    clock.enter(trk.OPTIMIZER_STEP)
    stepper.step()
    clock.finish()
    stepper.zero_grad()


def forward_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], setup: StepSetup) -> torch.Tensor:
    """The step's forward and loss on ``batch`` (make_batch's keyword arguments), under the recipe's autocast."""
    # (quiet: transformers' one-time warnings in the forward, such as BertLMHeadModel's default loss_type, are not
    # the user's business here)
    offload = contextlib.nullcontext()
    if setup.activation_offload == "checkpoints":
        from memcalc.measure.offload import checkpoints_offloaded

        offload = checkpoints_offloaded()
    elif setup.activation_offload != "none":
        from memcalc.measure.offload import offloading

        offload = offloading(model, loss_head(model), setup.activation_offload)
    with _autocast(setup), build.quiet_transformers(), offload:
        # use_cache is left to the config, as HF Trainer leaves it: GPT-2 then concatenates k and v into a
        # DynamicCache during training, which memcalc.activations counts.
        if setup.loss_chunks:
            loss = _chunked_loss(model, batch, setup.loss_chunks, compiled=setup.compile)
        else:
            out = model(**batch)
            loss = out.loss
            del out  # as HF Trainer's training_step: only the loss outlives the forward (the logits are freed)
    if loss is None:
        raise UsageError(f"verify: {type(model).__name__} returned no loss for a batch of "
                         f"{', '.join(batch)}; name a class with a head in the config's architectures")
    return loss


class _TrackerClock(PhaseClock):
    def __init__(self, tracker: trk.MemoryTracker, inner: PhaseClock | None) -> None:
        self.tracker, self.inner = tracker, inner

    def enter(self, phase: str) -> None:
        self.tracker.mark(phase)
        if self.inner is not None:
            self.inner.enter(phase)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()


def watch_step(tracker: trk.MemoryTracker, model: torch.nn.Module, stepper: Stepper) -> None:
    """Attribute optimizer state, the loss region (logits, log_softmax) and fp32 gradient copies."""
    tracker.watch_optimizer(stepper.optimizer, stepper.fused)
    head = loss_head(model)
    if head is not None:
        tracker.loss_region(head)
    stepper.on_master_grads = lambda grads: tracker.register(grads, trk.FP32_GRAD_COPY)


@dataclass
class StepResult:
    """What one measured step produced, before a method turns it into a Measurement."""

    setup: StepSetup
    tracker: trk.MemoryTracker
    model_class: str
    num_params: int
    model_state_bytes: dict[str, int]
    optimizer_state_breakdown: dict[str, int]
    ops_seen: set[str] = field(default_factory=set)
    dropout: dict[str, float] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the run chose (make_batch)
    allocation_events: list[tuple[int, int, int]] | None = None  # execute(allocation_events=True)
    allocation_events_loaded: int | None = None  # how many of them are the weights' build and load
    allocation_events_step: int | None = None  # how many come before the first step (the load, the batch, masters)
    grad_scaler: bool = False  # amp-fp16 ran with torch.amp.GradScaler (real tensors)


class _OpNames(trk.MemoryTracker):
    """The tracker, also remembering which op overloads ran (to tell which attention kernel was taken)."""

    def __init__(self, record_timeline: bool = False) -> None:
        super().__init__(record_timeline)
        self.ops_seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops_seen.add(func.__name__.split(".")[0])
        return super().__torch_dispatch__(func, types, args, kwargs)


def execute(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, device: str = "cpu",
            attn_implementation: str = "sdpa", clock: PhaseClock | None = None,
            progress: Progress | None = None, before_measured_step: Callable[[], None] | None = None,
            record_timeline: bool = False, seed: int = 0, allocation_events: bool = False,
            traced: bool = False, micro_batches: int = 1) -> StepResult:
    """Build, warm up and run the measured step under the tracker. The caller chooses the tensor kind by the
    context it calls this in (a FakeTensorMode for traces) and the device. ``allocation_events``: keep every device
    storage's allocation and free from the model's load through the warm-up and the measured step, in order
    (``StepResult.allocation_events``, for ``memcalc.allocator.replay``). ``traced``: the estimate's fake step
    (resolve_setup). ``micro_batches``: gradient accumulation inside each step (one_step)."""
    say = progress or (lambda _msg: None)
    setup = resolve_setup(spec, attn_implementation, device, traced=traced)
    config = build.hf_config(_raw(model_config))
    check_trainable(build.model_class(config).__name__, config.model_type)  # before building anything
    started = time.perf_counter()
    torch.manual_seed(seed)
    say("building the model")
    model = build_model(model_config, setup)
    stepper = Stepper(model, setup)
    batch, notes = make_batch(model, setup)
    if sum(1 for _ in model.named_parameters(remove_duplicate=False)) > sum(1 for _ in model.parameters()):
        notes.append(SHARED_WEIGHT_NOTE)
    if setup.qlora and setup.qlora_quantizer == "torchao" and not traced:
        from memcalc.measure import qlora

        notes.append(qlora.MEASURED_NOTE if qlora.measured_dequantization_seen() else qlora.MEASURED_UNSEEN_NOTE)
    events: list[tuple[int, int, int]] | None = None
    loaded = before_step = None
    say("warm-up step (creates the optimizer state)")
    if allocation_events:
        # the load (weights, master copies, buffers, the batch, in that order) and the warm-up step, whose optimizer
        # state is made while the forward's and backward's freed blocks sit in the allocator's cache
        log = trk.MemoryTracker()
        log.events = events = []
        # (PEFT's fp32 cast of a 16-bit load's other tensors: prepare_model_for_kbit_training)
        upcast = setup.qlora and setup.qlora_upcast and setup.weight_dtype != torch.float32
        loaded = _register_existing(log, model, stepper, batch, nf4=setup.qlora, upcast=upcast)
        before_step = len(events)
        with log:
            one_step(model, stepper, batch, setup, PhaseClock(), micro_batches=micro_batches)
        log.events = None  # the measured step's tracker records the rest (frees of what the log saw included)
    else:
        one_step(model, stepper, batch, setup, PhaseClock(), micro_batches=micro_batches)

    tracker = _OpNames(record_timeline=record_timeline)
    _register_existing(tracker, model, stepper, batch)
    tracker.watch_gradients(model.parameters())
    watch_step(tracker, model, stepper)
    grads: dict[str, int] = {}

    def after_backward() -> None:
        grads[trk.GRADIENTS] = storage_bytes(p.grad for p in stepper.params)

    if before_measured_step is not None:
        before_measured_step()
    say("measured step")
    tracker.events = events  # (what exists now was recorded by the log)
    narrow_v_before = cuda_semantics.NARROW_V_CALLS[0]
    try:
        with tracker:
            one_step(model, stepper, batch, setup, _TrackerClock(tracker, clock), after_backward, micro_batches)
    finally:
        tracker.remove_hooks()
    states = stepper.state_tensors()
    model_state = {
        trk.WEIGHTS: storage_bytes(_weights(model)),
        trk.MASTER: storage_bytes(stepper.masters),
        trk.GRADIENTS: grads.get(trk.GRADIENTS, 0),
        trk.OPTIMIZER_STATES: storage_bytes(t for ts in states.values() for t in ts),
    }
    tracker.events = None
    if device == "cpu" and "_softmax_backward_data" in tracker.ops_seen:
        notes.append(SOFTMAX_TEMPORARY_NOTE)
    if cuda_semantics.NARROW_V_CALLS[0] > narrow_v_before:
        notes.append(NARROW_V_NOTE)
    return StepResult(
        setup=setup, tracker=tracker, model_class=type(model).__name__,
        num_params=sum(p.numel() for p in model.parameters()),
        model_state_bytes=model_state,
        optimizer_state_breakdown={k: storage_bytes(v) for k, v in states.items()},
        ops_seen=tracker.ops_seen, dropout=dropout_probabilities(model_config),
        elapsed_seconds=time.perf_counter() - started, notes=notes, allocation_events=events,
        allocation_events_loaded=loaded, allocation_events_step=before_step,
        grad_scaler=stepper.scaler is not None,
    )


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's weights as memory holds them: its parameters, but for torchao's 4-bit layers (torchtune's QLoRA)
    their NF4Tensor's tensors in place of the 16-bit stand-in."""
    from memcalc.measure import qlora

    layers = qlora.torchao_layers(model)
    return _plain_parameters(model, layers) + [t for m in layers for t in qlora.torchao_parts(m)]


def _plain_parameters(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[torch.Tensor]:
    """The model's parameters but the 16-bit stand-ins of torchao's 4-bit ``layers``."""
    stand_ins = {id(m.weight) for m in layers}
    return [p for p in model.parameters() if id(p) not in stand_ins]


@contextlib.contextmanager
def _logging_into(events: list[tuple[int, int, int]]) -> Iterator[trk.MemoryTracker]:
    """A tracker of its own whose allocations and frees go into ``events`` (another tracker's log)."""
    side = trk.MemoryTracker()
    side.events = events
    with side:
        yield side


def _register_existing(tracker: trk.MemoryTracker, model: torch.nn.Module, stepper: Stepper,
                       batch: Mapping[str, torch.Tensor], nf4: bool = False, upcast: bool = False) -> int | None:
    """What exists before the step, in load order. ``nf4`` (an allocation log of a QLoRA step): the log holds the
    load as it runs, its freed blocks included: for bitsandbytes' layers (whose emulation keeps a 16-bit stand-in)
    transformers' load (``_bitsandbytes_load``; ``upcast``: then PEFT's fp32 casts), for torchao's (torchtune's QLoRA)
    torchtune's build and load. torchao's layers count their NF4Tensor's tensors, never the stand-in. Returns how many
    of the log's events the weights' build and load are (None without a log)."""
    from memcalc.measure import qlora, torchtune_build

    layers = qlora.torchao_layers(model)
    logged = nf4 and tracker.events is not None
    if tracker.events is not None and torchtune_build.active():
        # torchtune's build and load as its releases before 0.3 ran them (a published run of one: the module)
        torchtune_build.register(tracker, model, _logging_into, trk.WEIGHTS)
    elif logged and layers:
        # torchtune's build (each weight quantized as its layer is made), the rest of the model, then its
        # load_state_dict (each quantized again as it is copied in): torchao's own allocations, logged
        dtype = layers[0].weight.dtype
        with _logging_into(tracker.events):
            qlora.torchao_build(layers, dtype)
        tracker.register(_plain_parameters(model, layers), trk.WEIGHTS)
        with _logging_into(tracker.events):
            qlora.torchao_load(layers, dtype)
    elif logged:
        _bitsandbytes_load(tracker, model, upcast)
    else:
        tracker.register(_weights(model), trk.WEIGHTS)  # (the parameters, where no layer is torchao's)
    loaded = len(tracker.events) if tracker.events is not None else None
    tracker.register(stepper.masters, trk.MASTER)
    tracker.register(model.buffers(), trk.OTHER)
    tracker.register(batch.values(), trk.OTHER)
    return loaded


def _bitsandbytes_load(tracker: trk.MemoryTracker, model: torch.nn.Module, upcast: bool) -> None:
    """transformers' load with a bitsandbytes 4-bit config into ``tracker``'s log, as memcalc.load models it (its
    moments measured on real CPU loads): one checkpoint tensor at a time in the checkpoint's order
    (load.dot_natural_key); a 4-bit layer's weight arrives in 16-bit, quantize_4bit makes its stored parts (and with
    double quantization the fp32 absmax and absmax - offset, freed once quantize_blockwise returns), and the 16-bit
    tensor is freed; ``upcast``: every other parameter arrives in 16-bit and PEFT's prepare_model_for_kbit_training
    then casts each to fp32 in parameter order, freeing the 16-bit one. PEFT's adapters are made after the load."""
    import itertools

    from memcalc.allocator import ALLOC, FREE
    from memcalc.load import DYNAMIC_MAP_BYTES, dot_natural_key
    from memcalc.measure import qlora
    from memcalc.trainable import NF4_BLOCKSIZE
    from memcalc.units import BYTES_PER_FP32

    events = tracker.events
    assert events is not None
    keys = itertools.count(1)  # (keys below zero: never a storage's id)
    quantized = {id(m.weight): m for m in model.modules() if qlora.stored_parts(m) is not None}
    order = {id(p): i for i, p in enumerate(model.parameters())}

    def checkpoint_name(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".base_layer.", ".")

    loaded = sorted(((n, p) for n, p in model.named_parameters() if "lora_" not in n),
                    key=lambda item: dot_natural_key(checkpoint_name(item[0])))
    waiting, mapped = [], False
    for _name, p in loaded:
        module = quantized.get(id(p))
        if module is not None:
            if module.double_quant and not mapped:  # (quantize_blockwise's dynamic map, made once and kept)
                events.append((ALLOC, -next(keys), DYNAMIC_MAP_BYTES))
                mapped = True
            arrived = -next(keys)
            events.append((ALLOC, arrived, p.numel() * module.stored_dtype.itemsize))
            events.extend((ALLOC, -next(keys), n) for n in qlora.stored_parts(module))
            if module.double_quant:  # (load._arrivals' scratch: the fp32 absmax and absmax - offset)
                scratch = [-next(keys), -next(keys)]
                blocks = -(-p.numel() // NF4_BLOCKSIZE)
                events.extend((ALLOC, k, blocks * BYTES_PER_FP32) for k in scratch)
                events.extend((FREE, k, 0) for k in reversed(scratch))
            events.append((FREE, arrived, 0))
        elif upcast and p.dtype == torch.float32:
            sixteen = -next(keys)
            events.append((ALLOC, sixteen, p.numel() * 2))
            waiting.append((order[id(p)], p, sixteen))
        else:
            tracker.register([p], trk.WEIGHTS)
    for _index, p, sixteen in sorted(waiting, key=lambda item: item[0]):
        tracker.register([p], trk.WEIGHTS)
        events.append((FREE, sixteen, 0))
    tracker.register((p for p in model.parameters() if id(p) not in quantized), trk.WEIGHTS)


def differences_from_gpu(result: StepResult) -> list[str]:
    """Where this CPU run's memory differs from what the same step does on a CUDA GPU."""
    setup, ops = result.setup, result.ops_seen
    found: list[str] = []
    if setup.autocast_dtype is not None:
        found.append("CPU autocast keeps pow, softmax, log_softmax and layer_norm in the 16-bit input dtype where "
                     "CUDA autocast runs them in fp32: 16-bit inputs to those ops save 16-bit tensors here, fp32 "
                     "on a GPU")
    drops = result.dropout
    if drops:
        names = ", ".join(f"{k}={v}" for k, v in drops.items())
        found.append(f"dropout ({names}): CPU dropout saves a noise tensor in the input dtype where CUDA keeps a "
                     "1-byte mask")
    if setup.attn_implementation == "sdpa":
        if SDPA_CPU_FLASH in ops:
            if setup.weight_dtype == torch.float32 and setup.autocast_dtype is None:
                found.append("fp32 SDPA: CPU runs its flash kernel (output + fp32 logsumexp saved); CUDA has no fp32 "
                             "flash kernel and runs memory-efficient attention (logsumexp padded to 32 rows)")
        elif ops & SDPA_MATH_OPS and setup.weight_dtype == torch.float32 and setup.autocast_dtype is None \
                and not drops:
            found.append("SDPA ran its math kernel, as CUDA does for fp32 with grouped kv heads (no fused kernel takes "
                         "the call there: memcalc holds sdpa to CUDA's choice, cuda_semantics.kernels_like_cuda)")
        elif ops & SDPA_MATH_OPS:
            why = " (attention dropout > 0)" if drops else ""
            found.append(f"SDPA ran the math kernel on CPU{why}: attention scores and probabilities are materialized "
                         "and saved; a GPU run takes flash / memory-efficient attention")
    if setup.autocast_dtype == torch.float16 and not result.grad_scaler:
        found.append("amp-fp16 runs without a GradScaler in this traced step (its found_inf check reads a value a fake "
                     "tensor does not have); a GPU run's scaler adds a few scalar tensors and unscale_ works in place")
    found.append("kernel-internal scratch (CPU flash-attention buffers here; cuBLAS workspaces, caching-allocator "
                 "rounding to 512-byte blocks on a GPU) is not a tensor and is not counted")
    return found


def to_measurement(method: str, result: StepResult) -> Measurement:
    tracker = result.tracker
    run = {"model_class": result.model_class, "num_params": result.num_params, **result.setup.describe(),
           "tensors": "fake (FakeTensorMode, no memory)" if method == "trace" else "real"}
    peak_terms = {k: v for k, v in tracker.peak.by_category.items() if v}
    entry = tracker.phase_entries.get(trk.BACKWARD)
    forward_end = {k: v for k, v in entry.by_category.items() if v} if entry is not None else {}
    term_bytes = {k: v for k, v in tracker.category_max.items() if v}
    for name in FORWARD_LIVE_TERMS:
        term_bytes[name] = forward_end.get(name, 0)
    term_bytes.update(result.model_state_bytes)
    term_bytes[TERM_OFFLOADED_ACTIVATIONS] = tracker.host_peak_bytes  # (booked apart from the device's bytes)
    term_bytes = {k: v for k, v in term_bytes.items() if v}
    return Measurement(
        method=method,
        measured_peak_bytes=tracker.peak_bytes,
        measured_peak_phase=tracker.peak_phase,
        per_phase_peak_bytes=tracker.phase_peak_bytes(),
        per_term_bytes=peak_terms,
        term_bytes=term_bytes,
        term_max_bytes={k: v for k, v in tracker.category_max.items() if v},
        forward_end_bytes=forward_end,
        model_state_bytes=result.model_state_bytes,
        optimizer_state_breakdown=result.optimizer_state_breakdown,
        differences_from_gpu=differences_from_gpu(result) if result.setup.device == "cpu" else [],
        run=run,
        baseline_bytes=tracker.baseline_bytes,
        tracker_peak_bytes=tracker.peak_bytes,
        elapsed_seconds=round(result.elapsed_seconds, 3),
        allocation_events=result.allocation_events,
        notes=["the model output (logits) is dropped before backward, as HF Trainer's training_step does",
               ("torch.optim's host-side 'step' counters are not counted as optimizer state (fused keeps them "
                "on the device and they are)"), *result.notes,
               *([GRAD_SCALER_NOTE] if result.grad_scaler else [])],
    )


def measure_cpu(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, attn_implementation: str = "sdpa",
                progress: Progress | None = None, record_timeline: bool = False) -> Measurement:
    """cpu-tracker: real tensors on the CPU."""
    result = execute(model_config, spec, device="cpu", attn_implementation=attn_implementation, progress=progress,
                     record_timeline=record_timeline, allocation_events=True)
    return to_measurement("cpu-tracker", result)
