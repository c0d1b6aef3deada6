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
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

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


def upcast(model: torch.nn.Module, quantized: set[str]) -> None:
    """peft utils/other.py prepare_model_for_kbit_training: every fp16/bf16 parameter but the 4-bit ones to fp32."""
    for name, param in model.named_parameters():
        if name not in quantized and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
