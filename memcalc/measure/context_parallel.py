"""Context parallelism measured: PyTorch's ring attention (torch/distributed/tensor/experimental/_context_parallel/
_attention.py ``_templated_ring_attention`` and ``_templated_ring_attention_backward``) run inside the real
transformers model, one rank of a fake (or gloo) process group, on this rank's share of the sequence.

``context_parallel`` itself reaches the ring through DTensor's dispatch of CUDA's sdpa kernels only (flash, memory-
efficient, cuDNN: ``_sdpa_handler``), which a CPU never calls; so here ``F.scaled_dot_product_attention`` is replaced,
as context_parallel's own monkey-patch mode replaces it (``_distribute_function``), by an autograd function that
calls those two ring functions with the CPU's flash kernel as their attention op. What the ring allocates is torch's
own code; what autograd keeps for backward is what the DTensor path keeps: the local q, k, v, the merged output and
log-sum-exp (the saved inputs and outputs of ``_scaled_dot_product_flash_attention``).

Each rank is given ``seq_len / cp`` positions (context_parallel's sharding of the inputs, labels and position ids;
which positions a rank holds changes no size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from memcalc.errors import UsageError


@contextlib.contextmanager
def ring_attention(group: Any) -> Iterator[None]:
    """While the block runs, sdpa (causal, no mask: the only calls context_parallel takes) runs as the ring over
    ``group``, with torch's default options (fp32 merge, load balancing, keys and values all-gathered)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental._context_parallel import _attention as ring

    aten = torch.ops.aten
    forward_op = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward_op = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    class RingSdpa(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, scale):
            out, lse = ring._templated_ring_attention(group, 2, forward_op, query, key, value, is_causal=True,
                                                      dropout_p=0.0, scale=scale)
            ctx.save_for_backward(query, key, value, out, lse)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, grad_out):
            query, key, value, out, lse = ctx.saved_tensors
            grads = ring._templated_ring_attention_backward(
                group, 2, backward_op, grad_out=grad_out, grad_out_name="grad_out", query=query, key=key,
                value=value, out=out, logsumexp=lse, is_causal=True, dropout_p=0.0, scale=ctx.scale)
            return grads[0], grads[1], grads[2], None

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or not is_causal or dropout_p:
            raise UsageError("context parallelism runs causal attention without a mask or attention dropout "
                             "(torch's context_parallel); this model's sdpa call has one: drop {cp}")
        device = query.device.type
        if torch.is_autocast_enabled(device):
            # Autocast casts sdpa's inputs at the dispatcher, before context_parallel's DTensor dispatch sees them
            # (sdpa is in CUDA's lower-precision list); this function is not the dispatcher's op, so it casts as it.
            dtype = torch.get_autocast_dtype(device)
            query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        return RingSdpa.apply(query, key, value, scale)

    options = ring._cp_options
    saved = (options.convert_to_f32, options.enable_load_balance, options.rotate_method)
    options.convert_to_f32, options.enable_load_balance = True, True
    options.rotate_method = ring._RotateMethod.ALL_GATHER
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        options.convert_to_f32, options.enable_load_balance, options.rotate_method = saved
