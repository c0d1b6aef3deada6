"""CUDA's choices of dtypes and kernels, emulated on CPU tensors, so that a trace on a machine without a GPU saves
what a CUDA training step saves.

A CPU-only torch cannot run a model on fake CUDA tensors: ``torch.empty(..., device="cuda")`` works under
FakeTensorMode, but building modules there initialises weights with CUDA random kernels, and composite ops such as
``embedding`` take a CUDA device guard, which a build without CUDA aborts on (measured with torch 2.13: the process
terminates). So the trace runs CPU tensors, and where CUDA decides differently from the CPU the CPU is made to
decide as CUDA does (``like_cuda``):

1. Autocast (aten/src/ATen/autocast_mode.h, the ``AT_FORALL_*`` lists that AutocastCUDA registers): CUDA runs
   softmax, log_softmax, layer_norm, pow, exp, rsqrt, sum, the norms and losses in fp32 and einsum, addmv, mv and
   addr in the lower precision; CPU autocast lists none of those. Each op CUDA lists and the CPU does not get a
   Python kernel at the ``AutocastCPU`` dispatch key with CUDA's policy (cast the eligible floating inputs, then
   redispatch with autocast excluded), so the casts precede autograd as CUDA's do and the dtypes saved for
   backward are CUDA's. Ops both devices list are left to the CPU's own kernel (tests check their policy agrees).
2. LayerNorm statistics: CUDA's ``layer_norm`` kernel (aten/src/ATen/native/cuda/layer_norm_kernel.cu) returns
   mean and rstd in the op-math type (fp32 for bf16 and fp16 inputs); the CPU kernel returns them in the input
   dtype. ``native_layer_norm`` of a 16-bit input gives fp32 statistics here (``layer_norm_stats``; the trace
   runs only the forward, which is where the statistics are created).
3. Dropout: ``at::native::dropout`` (aten/src/ATen/native/Dropout.cpp) takes the fused ``native_dropout`` on CUDA,
   which saves a 1-byte bool mask; on the CPU it multiplies by a noise tensor in the input dtype and saves that.
   Here ``dropout`` in training runs ``native_dropout``. Attention dropout inside sdpa: CUDA's flash and
   memory-efficient kernels apply it in the kernel (saving only the RNG seed and offset), the CPU's math kernel
   materialises the s^2 scores; here sdpa runs with its dropout inside the kernel too (the CPU flash kernel, no
   dropout: the same saved q, k, v, output and log-sum-exp).
4. softmax's backward: CUDA's kernel (SoftMax.cu ``softmax_backward_cuda_out``) computes ``grad * output`` into a
   temporary of the incoming gradient's size; the CPU's needs none. Here the CPU makes it too
   (``softmax_backward_like_cuda``, inside ``kernels_like_cuda``, which memcalc's measured CPU steps also run).
5. sdpa with a v narrower than q and k (DeepSeek's MLA): CUDA's memory-efficient kernel takes the head dims as they
   are (sdp_utils.cpp ``check_head_dim_size_mem_efficient`` asks q's and k's equal and each a multiple of the GEMM
   alignment, v's free; flash asks all three equal); the CPU has no fused kernel for it and its math backend keeps the s^2 weights. Here v is zero-padded
   to q's width through the CPU's flash kernel (``sdpa_narrow_v``, inside ``kernels_like_cuda``: the traces and the
   measured CPU steps alike, so ``--verify`` measures the kernel the estimate counts).

Not emulated (named in ``NOT_EMULATED``): which sdpa kernel CUDA picks (fp32 inputs or masks take the
memory-efficient kernel, whose log-sum-exp is padded to a multiple of 32 rows: the same bytes when the sequence
is a multiple of 32) and the RNG state tensors of attention dropout (16 B per layer).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

LOWER = "lower_precision_fp"
FP32 = "fp32"
FP32_SET_OPT_DTYPE = "fp32_set_opt_dtype"
PROMOTE = "promote"

# AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE
# (aten/src/ATen/autocast_mode.h, torch 2.13), as "op.overload" names. Convolutions, RNN cells and upsampling are
# left out: no transformer LM runs them.
CUDA_AUTOCAST: dict[str, str] = {
    **dict.fromkeys((
        "addmm.default", "addmv.default", "addr.default", "matmul.default", "einsum.default", "mm.default",
        "mv.default", "linalg_vecdot.default", "linear.default", "addbmm.default", "baddbmm.default", "bmm.default",
        "chain_matmul.default", "linalg_multi_dot.default", "prelu.default",
        "_scaled_dot_product_flash_attention.default", "scaled_dot_product_attention.default",
    ), LOWER),
    **dict.fromkeys((
        "acos.default", "asin.default", "cosh.default", "erfinv.default", "exp.default", "expm1.default",
        "log.default", "log10.default", "log2.default", "log1p.default", "reciprocal.default", "rsqrt.default",
        "sinh.default", "tan.default", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus.default",
        "layer_norm.default", "native_layer_norm.default", "rms_norm.default", "group_norm.default",
        "frobenius_norm.dim", "nuclear_norm.default", "nuclear_norm.dim", "cosine_similarity.default",
        "poisson_nll_loss.default", "cosine_embedding_loss.default", "nll_loss.default", "nll_loss2d.default",
        "hinge_embedding_loss.default", "kl_div.default", "l1_loss.default", "smooth_l1_loss.default",
        "huber_loss.default", "mse_loss.default", "margin_ranking_loss.default", "multilabel_margin_loss.default",
        "soft_margin_loss.default", "triplet_margin_loss.default", "multi_margin_loss.default",
        "binary_cross_entropy_with_logits.default", "dist.default", "pdist.default", "cdist.default",
        "renorm.default", "logsumexp.default",
    ), FP32),
    **dict.fromkeys((
        "prod.default", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod.default", "cumsum.default",
        "linalg_vector_norm.default", "linalg_matrix_norm.default", "linalg_matrix_norm.str_ord", "sum.default",
        "sum.dim_IntList",
    ), FP32_SET_OPT_DTYPE),
    **dict.fromkeys((
        "addcdiv.default", "addcmul.default", "atan2.default", "bilinear.default", "cross.default", "dot.default",
        "vdot.default", "grid_sampler.default", "index_put.default", "tensordot.default", "scatter_add.default",
    ), PROMOTE),
}
NOT_EMULATED = (
    "sdpa's kernel choice (fp32 inputs or an explicit mask take CUDA's memory-efficient kernel, whose log-sum-exp "
    "is padded to 32 rows; the same bytes when the sequence is a multiple of 32; a v narrower than q runs the CPU's "
    "flash kernel on a zero-padded v: v and the output kept at q's width, the output's sliced view copied by "
    "transformers' contiguous()) and attention dropout's RNG state (16 B per layer)"
)
EMULATED = ("CUDA's autocast op lists, fp32 LayerNorm statistics, 1-byte dropout masks, a fused sdpa kernel for a v "
            "narrower than q and softmax backward's temporary emulated on the CPU (memcalc/measure/cuda_semantics.py)")


def _overload(name: str) -> Any:
    import torch

    op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


def cpu_has_own(name: str) -> bool:
    """Whether CPU autocast already has a kernel for this op (then its own policy stands)."""
    import torch

    op, overload = name.split(".")
    qualified = f"aten::{op}" + ("" if overload == "default" else f".{overload}")
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "AutocastCPU")


def _kernel(op: Any, policy: str) -> Any:
    """A Python autocast kernel with CUDA's policy (autocast_mode.h WrapFunction_): cast the eligible inputs
    (floating, not fp64), then call the op with autocast excluded."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_map

    lower_types = (torch.float16, torch.bfloat16)
    names = [argument.name for argument in op._schema.arguments]
    dtype_at = names.index("dtype") if "dtype" in names else len(names)

    def eligible(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64

    def call(*args: Any, **kwargs: Any) -> Any:
        excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            if policy == LOWER:
                lower = torch.get_autocast_dtype("cpu")
                args, kwargs = tree_map(lambda x: x.to(lower) if eligible(x) and x.dtype == torch.float32 else x,
                                        (args, kwargs))
            elif policy == FP32:
                args, kwargs = tree_map(lambda x: x.to(torch.float32) if eligible(x) and x.dtype in lower_types
                                        else x, (args, kwargs))
            elif policy == FP32_SET_OPT_DTYPE and args and eligible(args[0]):
                if len(args) > dtype_at:
                    if args[dtype_at] is None:
                        args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1:])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            elif policy == PROMOTE:
                floats = [x.dtype for x in tree_flatten((args, kwargs))[0] if eligible(x)]
                widest = max(floats, key=lambda d: torch.finfo(d).bits, default=None)
                if widest is not None:
                    args, kwargs = tree_map(lambda x: x.to(widest) if eligible(x) else x, (args, kwargs))
            return op(*args, **kwargs)

    return call


@contextlib.contextmanager
def autocast_lists() -> Iterator[list[str]]:
    """CUDA's autocast policy for each op CUDA lists and CPU autocast does not, while the block runs; yields the
    names registered. Applies only where CPU autocast is on (the kernels sit at the AutocastCPU key)."""
    import torch

    library = torch.library.Library("aten", "IMPL")
    registered = []
    try:
        for name, policy in CUDA_AUTOCAST.items():
            if cpu_has_own(name):
                continue
            library.impl(name.replace(".default", ""), _kernel(_overload(name), policy), "AutocastCPU")
            registered.append(name)
        yield registered
    finally:
        library._destroy()


@contextlib.contextmanager
def _cuda_functions() -> Iterator[None]:
    """Torch functions CUDA runs through another kernel: dropout (fused: a bool mask) and sdpa's attention dropout
    (inside the kernel; a v narrower than q: ``kernels_like_cuda``, which traces run too). The functions are replaced
    for the block rather than intercepted by a TorchFunctionMode, which a checkpointed layer's recomputation in
    backward does not see (measured, torch 2.13): the recomputed layer must decide as its forward did."""
    import torch

    functional = torch.nn.functional
    original_dropout, original_sdpa, original_torch_dropout = (functional.dropout,
                                                               functional.scaled_dot_product_attention, torch.dropout)

    def fused(input: Any, p: float, training: bool, inplace: bool) -> Any:
        return training and 0 < p < 1 and not inplace and input.numel() > 0

    def dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if fused(input, p, training, inplace):
            return torch.native_dropout(input, p, True)[0]
        return original_dropout(input, p, training, inplace)

    def torch_dropout(input: Any, p: float, train: bool) -> Any:
        if fused(input, p, train, False):
            return torch.native_dropout(input, p, True)[0]
        return original_torch_dropout(input, p, train)

    def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False) -> Any:
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale,
                             enable_gqa=enable_gqa)

    functional.dropout, functional.scaled_dot_product_attention, torch.dropout = dropout, sdpa, torch_dropout
    try:
        yield
    finally:
        functional.dropout, functional.scaled_dot_product_attention = original_dropout, original_sdpa
        torch.dropout = original_torch_dropout


def runs_math_on_cuda(query: Any, key: Any, enable_gqa: bool) -> bool:
    """Whether CUDA's scaled_dot_product_attention runs this call on its math path: fp32 inputs with grouped key/value
    heads passed as they are (enable_gqa). Flash and cuDNN take only 16-bit inputs and the memory-efficient kernel
    refused grouped heads (torch 2.11 on an H200: benchmarks/sdpa_backends.py, docs/accuracy-gpu.md;
    memcalc.activations.sdpa_runs_math). The CPU's flash kernel takes the call and keeps less."""
    import torch

    device = query.device.type
    # under autocast the call runs in the autocast dtype (scaled_dot_product_attention is on CUDA's lower-precision
    # list, emulated on the CPU by autocast_lists)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return bool(enable_gqa) and dtype == torch.float32 and query.size(-3) != key.size(-3)


@contextlib.contextmanager
def kernels_like_cuda() -> Iterator[None]:
    """For a CPU step measured (or traced) as a GPU's, while the block runs:
    - scaled_dot_product_attention held to its math path where CUDA's dispatcher would fall to it
      (``runs_math_on_cuda``), and given a fused kernel where CUDA's memory-efficient kernel takes a v narrower than
      q that the CPU would run on its math path (``sdpa_narrow_v``); replaced for the block (forward and backward: a
      checkpointed layer's recomputation calls it again);
    - softmax's backward with CUDA's temporary (``softmax_backward_like_cuda``)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def sdpa(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        if runs_math_on_cuda(query, key, kwargs.get("enable_gqa", False)):
            with sdpa_kernel([SDPBackend.MATH]):
                return original(query, key, value, *args, **kwargs)
        if value.size(-1) < query.size(-1) and query.device.type == "cpu":  # (a CUDA step runs CUDA's own choice)
            return sdpa_narrow_v(original, query, key, value, *args, **kwargs)
        return original(query, key, value, *args, **kwargs)

    functional.scaled_dot_product_attention = sdpa
    try:
        with softmax_backward_like_cuda():
            yield
    finally:
        functional.scaled_dot_product_attention = original


def sdpa_narrow_v(sdpa: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``sdpa`` on a v narrower than q and k (DeepSeek's MLA: 128 against 192) through a fused kernel, as CUDA runs it.
    CUDA's memory-efficient kernel takes unequal head dims (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp,
    ``check_head_dim_size_mem_efficient``: q's and k's equal, each dim a multiple of the GEMM alignment, v's free), so
    it saves no s^2 weights; the CPU's flash kernel asks all three equal (sdp_utils_cpp.cpp
    ``check_head_dim_size_cpp``) and the call falls to the math backend, which keeps the weights. v zero-padded to q's
    width runs the CPU's flash kernel instead: the same output in its first columns (as transformers pads v for flash
    attention). What this keeps differs from CUDA's by c (2 qk - (qk_nope + v) - v) per token and head (the padded v
    and output at q's width; kv_b_proj's output, which v views, freed), 0 for DeepSeek-V2/V3's dims (qk_nope = v =
    2 qk_rope), and by the output's contiguous copy, c v per token and head: the sliced output is not contiguous when
    transformers' sdpa_attention_forward calls contiguous(), where CUDA's is laid out (b, s, a, v) already
    (torch/_meta_registrations.py meta__scaled_dot_product_efficient_attention). The deepseek_v2 rule counts that copy
    too, so it matches this emulation; on CUDA, by torch's code, the copy is not made (not yet measured on a GPU).
    Counted in ``NARROW_V_CALLS``."""
    import torch

    width = value.size(-1)
    NARROW_V_CALLS[0] += 1
    value = torch.nn.functional.pad(value, (0, query.size(-1) - width))
    return sdpa(query, key, value, *args, **kwargs)[..., :width]


# How many sdpa calls ran sdpa_narrow_v (a measured step reads it before and after to say so)
NARROW_V_CALLS = [0]


@contextlib.contextmanager
def softmax_backward_like_cuda() -> Iterator[None]:
    """softmax's backward on CPU tensors with CUDA's temporary. CUDA's kernel (aten/src/ATen/native/cuda/SoftMax.cu,
    ``softmax_backward_cuda_out``) first computes ``tmp = grad * output`` into a tensor of its own, the incoming
    gradient's size, then reduces it into the op's output; the tmp is freed when the op returns. The CPU's kernel
    (softmax_backward_cpu_out) needs none. Inside the C++ kernel the tmp is no op a dispatch mode sees, but the caching
    allocator holds it beside the output: an eager attention's (or sdpa math path's) s^2 scores' gradient once more,
    at softmax's backward (measured on an H200: 27 checkpointed steps of twelve families, eager or sdpa's math path,
    above their tracked tensors by that block; benchmarks/gpu-runs/2026-12-04-h200-b). Here a Python kernel at the AutogradCPU
    key makes the same tmp (a mul a dispatch mode sees) beside the CPU kernel's output. log_softmax's backward has
    no tmp on CUDA (log_softmax_backward_cuda_out) and is left alone."""
    import torch

    op = torch.ops.aten._softmax_backward_data.default

    def backward(grad_output: Any, output: Any, dim: int, input_dtype: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            tmp = torch.ops.aten.mul.Tensor(grad_output, output)
            result = op(grad_output, output, dim, input_dtype)
            del tmp
        return result

    if _SOFTMAX_BACKWARD_DEPTH[0]:  # nested (a trace's semantics around a step's own): registered once, outermost
        _SOFTMAX_BACKWARD_DEPTH[0] += 1
        try:
            yield
        finally:
            _SOFTMAX_BACKWARD_DEPTH[0] -= 1
        return
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # (torch 2.13 warns that the op's AutogradCPU kernel is overridden: it is)
            warnings.simplefilter("ignore", UserWarning)
            library.impl("_softmax_backward_data", backward, "AutogradCPU")
        _SOFTMAX_BACKWARD_DEPTH[0] = 1
        yield
    finally:
        _SOFTMAX_BACKWARD_DEPTH[0] = 0
        library._destroy()


# How deep softmax_backward_like_cuda is entered: a second registration of the same kernel is an error in torch 2.11
# (measured on the GPU machine: --reserved's trace runs a step that enters it again), a warning in 2.13
_SOFTMAX_BACKWARD_DEPTH = [0]


def layer_norm_stats(func: Any, args: Any, out: Any) -> Any:
    """``native_layer_norm``'s outputs as CUDA returns them: mean and rstd in fp32 for a 16-bit input."""
    import torch

    if func is torch.ops.aten.native_layer_norm.default and args[0].dtype in (torch.float16, torch.bfloat16):
        output, mean, rstd = out
        return output, mean.to(torch.float32), rstd.to(torch.float32)
    return out


@contextlib.contextmanager
def like_cuda() -> Iterator[None]:
    """CUDA's autocast lists, dropout, sdpa dropout, sdpa's math fallback and softmax backward's temporary while the
    block runs (LayerNorm statistics: the trace's dispatch mode calls ``layer_norm_stats``)."""
    with autocast_lists(), _cuda_functions(), kernels_like_cuda():
        yield
