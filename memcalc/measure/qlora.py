"""QLoRA's frozen 4-bit Linear layers, emulated so that a traced step (FakeTensorMode, where bitsandbytes'
``Params4bit`` cannot wrap a fake tensor) allocates what bitsandbytes allocates.

What bitsandbytes 0.50 does in a training step (bitsandbytes/nn/modules.py ``Linear4bit.forward``,
autograd/_functions.py ``MatMul4Bit``, backends/default/ops.py ``_gemm_4bit_default_impl``):

- forward: the compute dtype is the input's when it is fp32 or bf16 (``set_compute_type``), else the configured
  one; the input is cast to it, the nested absmax is dequantized to fp32 (one value per 64 weights, then plus the
  offset), the weight is dequantized to an (out, in) tensor in the compute dtype, ``F.linear`` runs, and the output is
  cast back to the input's dtype. Nothing but the packed weight is kept for backward (``ctx.tensors = (None, B)``);
- backward: the weight is dequantized again, in the dtype it was quantized from, cast to the gradient's dtype, and
  ``grad_output @ W`` gives the input's gradient.

Here the packed weight is the module's own 16-bit weight (a parameter, which the step's bytes leave out: the
engine counts the NF4 base), and the dequantized tensors are zeros of the same shapes and dtypes. PEFT wraps these
layers as plain Linear layers (peft tuners/lora/bnb.py ``Linear4bit.forward`` also clones the base output, a transient
of the output's size that is not followed). ``prepare_model_for_kbit_training``'s cast of the other 16-bit parameters
to fp32 is ``upcast``.

torchao's NF4 (``--qlora-quantizer torchao``, torchtune's QLoRA) is not emulated: ``quantize_torchao`` runs the
installed torchao's own ``to_nf4`` on each weight (its NF4Tensor is made of plain tensors, which FakeTensorMode
fakes) and the layer's forward is torchao's ``LinearNF4``, as torchtune's LoRALinear(quantize_base=True) runs it
(``linear_nf4``): each forward and backward dequantizes the weight with torchao's ``NF4Tensor.get_original_weight``
and the trace sees what that allocates. ``torchao_build`` and ``torchao_load`` replay what torchtune does before the
first step: each weight made in 16-bit on the device and quantized as its layer is built, then the checkpoint's
tensor moved to the device and quantized again as ``load_state_dict`` copies it in (NF4Tensor's ``copy_``).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

from memcalc.errors import MissingDependencyError
from memcalc.trainable import NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE


class _MatMul4Bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stored_dtype: torch.dtype, double_quant: bool) -> torch.Tensor:
        if double_quant:  # functional.dequantize_4bit: the nested absmax dequantized to fp32, then plus the offset
            absmax = torch.zeros(math.ceil(weight.numel() / NF4_BLOCKSIZE), dtype=torch.float32, device=x.device) + 0.0
            del absmax
        dequantized = torch.zeros(weight.shape, dtype=x.dtype, device=x.device)
        ctx.stored_dtype = stored_dtype
        ctx.weight_shape = weight.shape
        return torch.nn.functional.linear(x, dequantized, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dequantized = torch.zeros(ctx.weight_shape, dtype=ctx.stored_dtype, device=grad_output.device)
        return torch.matmul(grad_output, dequantized.to(grad_output.dtype)), None, None, None, None


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    compute = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else self.compute_dtype
    bias = None if self.bias is None else self.bias.to(compute)
    return _MatMul4Bit.apply(x.to(compute), self.weight, bias, self.stored_dtype, self.double_quant).to(x.dtype)


def quantize(model: torch.nn.Module, names: set[str], compute_dtype: torch.dtype, stored_dtype: torch.dtype,
             double_quant: bool = True) -> set[str]:
    """The Linear layers whose weights ``names`` lists (memcalc.trainable's choice: by default every Linear but the
    output head, which transformers' bnb quantizer leaves unconverted: get_keys_to_not_convert) run as
    bitsandbytes' Linear4bit, quantized from ``stored_dtype`` (the checkpoint's dtype as loaded: QuantState.dtype,
    what backward dequantizes to); the names of their weights."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in names:
            module.compute_dtype, module.stored_dtype, module.double_quant = compute_dtype, stored_dtype, double_quant
            module.forward = types.MethodType(_forward, module)
            found.add(f"{name}.weight")
    return found


def stored_parts(module: torch.nn.Module) -> list[int] | None:
    """The allocations bitsandbytes holds for a 4-bit layer's weight (functional.quantize_4bit): the packed weight, the
    absmax per block (uint8 with double quantization, then its fp32 absmax per 256 blocks and 256-entry code, and the
    fp32 offset; else fp32), and the 16-entry NF4 code. None for a layer ``quantize`` did not convert. Their sum is
    memcalc.trainable.nf4_bytes."""
    if getattr(module, "stored_dtype", None) is None or not isinstance(module, torch.nn.Linear):
        return None
    numel = module.weight.numel()
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if not module.double_quant:
        return [math.ceil(numel / 2), blocks * 4, 16 * 4]
    return [math.ceil(numel / 2), blocks, math.ceil(blocks / NF4_NESTED_BLOCKSIZE) * 4, 256 * 4, 4, 16 * 4]


TORCHAO_INSTALL = "--qlora-quantizer torchao runs torchao's NF4Tensor: pip install torchao (memcalc-train[fp8])"


def _nf4_module() -> Any:
    """torchao's NF4Tensor module, where this torchao keeps it (torchao.dtypes.nf4tensor until 0.16, then
    torchao.quantization.quantize_.workflows.nf4.nf4_tensor)."""
    import importlib

    for name in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(TORCHAO_INSTALL)


def _to_nf4() -> Any:
    """torchao's ``to_nf4``."""
    return _nf4_module().to_nf4


class _LinearNF4(torch.autograd.Function):
    """torchao's ``LinearNF4`` (what torchtune's ``linear_nf4`` applies): the forward is ``F.linear`` of the input and
    the weight dequantized to the input's dtype, nothing saved but the NF4 weight; the backward dequantizes it again
    for ``grad_output @ W``. The dequantization is ``NF4Tensor.get_original_weight`` in every torchao (reached through
    ``weight.to(dtype)``: its ``__torch_function__`` since torchao 0.2, its ``__torch_dispatch__`` before); it is
    called here directly, so that the tracker sees its allocations (a dispatch mode does not see what a tensor
    subclass allocates inside its own ``__torch_dispatch__``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any) -> torch.Tensor:
        ctx.nf4 = weight
        return torch.nn.functional.linear(x, weight.get_original_weight().to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output @ ctx.nf4.get_original_weight().to(grad_output.dtype), None


def _forward_nf4(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # torchtune modules/peft/lora.py LoRALinear.forward with quantize_base: linear_nf4, then the bias added
    out = self.linear_nf4(x, self.nf4)
    return out if self.bias is None else out + self.bias


def quantize_torchao(model: torch.nn.Module, names: set[str]) -> set[str]:
    """The Linear layers whose weights ``names`` lists run as torchtune's quantized LoRALinear: their weight as
    torchao's NF4Tensor (``to_nf4`` of the 16-bit weight; the module's own weight stays as a stand-in the step never
    reads, and is not counted), the forward torchao's ``LinearNF4``: in a traced step ``_LinearNF4`` (the tracker
    sees its dequantization in every torchao), in a measured one torchao's own ``linear_nf4``
    (``measured_dequantization_seen``). The names of their weights."""
    from torch._subclasses.fake_tensor import is_fake

    to_nf4 = _to_nf4()
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in names:
            module.nf4 = to_nf4(module.weight.detach())
            module.linear_nf4 = _LinearNF4.apply if is_fake(module.weight) else _nf4_module().linear_nf4
            module.forward = types.MethodType(_forward_nf4, module)
            found.add(f"{name}.weight")
    return found


MEASURED_NOTE = ("QLoRA's base is torchao's NF4Tensor, made by its to_nf4 and run by its linear_nf4 (torchtune's "
                 "LoRALinear); the 16-bit weight transformers builds stays beside it, not counted")
MEASURED_UNSEEN_NOTE = (MEASURED_NOTE + "; this torchao dequantizes inside NF4Tensor's __torch_dispatch__, which the "
                        "tracker does not see: the measured step leaves out about 14 B per element of the largest "
                        "quantized weight (the estimate's trace counts them)")


def measured_dequantization_seen() -> bool:
    """Whether a measured step's tracker (a dispatch mode) sees torchao's dequantization: torchao 0.2 on reach it
    through NF4Tensor's ``__torch_function__`` (``weight.to(dtype)`` in NF4_TORCH_FUNCTIONS), torchao 0.1 inside its
    ``__torch_dispatch__``."""
    return torch.Tensor.to in getattr(_nf4_module(), "NF4_TORCH_FUNCTIONS", {})


def torchao_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers ``quantize_torchao`` converted, in module order."""
    return [m for m in model.modules() if getattr(m, "nf4", None) is not None]


def torchao_build(layers: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """torchtune's builder under the recipe's default device and dtype (recipes/lora_finetune_single_device.py
    _setup_model), run under the caller's tracker: each layer's weight made in ``dtype`` on the device and quantized
    by LoRALinear (``to_nf4``), the 16-bit weight then dropped."""
    to_nf4 = _to_nf4()
    for module in layers:
        weight = torch.empty(module.nf4.shape, dtype=dtype)
        module.nf4 = to_nf4(weight)
        del weight


def torchao_load(layers: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """The recipe's ``model.load_state_dict`` of the checkpoint (on the host, in ``dtype``), run under the caller's
    tracker: NF4Tensor's ``copy_`` (torchao 0.1 to 0.18 alike) moves each tensor to the device, quantizes it
    (``NF4Tensor.from_tensor``) and copies each of the new NF4's tensors into the layer's; done here step by step
    with torchao's ``to_nf4`` (its ``copy_`` runs inside ``__torch_dispatch__``, where the tracker would not see it)."""
    to_nf4 = _to_nf4()
    for module in layers:
        # (the arrived tensor is dropped as to_nf4 returns, the new NF4 once copied in)
        _copy_into(module.nf4, to_nf4(torch.empty(module.nf4.shape, dtype=dtype)))


def _copy_into(nf4: Any, made: Any) -> None:
    for part, new in zip(torchao_parts_of(nf4), torchao_parts_of(made), strict=True):
        part.copy_(new)


def torchao_parts_of(nf4: Any) -> list[torch.Tensor]:
    """The plain tensors a torchao NF4Tensor is made of (``__tensor_flatten__``)."""
    names, _ = nf4.__tensor_flatten__()
    return [getattr(nf4, n) for n in names]


def torchao_parts(module: torch.nn.Module) -> list[torch.Tensor]:
    """The plain tensors of a converted layer's NF4 weight."""
    return torchao_parts_of(module.nf4)


def upcast(model: torch.nn.Module, quantized: set[str]) -> None:
    """peft utils/other.py prepare_model_for_kbit_training: every fp16/bf16 parameter but the 4-bit ones to fp32."""
    for name, param in model.named_parameters():
        if name not in quantized and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
