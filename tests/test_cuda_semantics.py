"""CUDA's choices emulated on CPU tensors (memcalc/measure/cuda_semantics.py), each checked on real CPU tensors.

The expectations are CUDA's documented behaviour: the autocast op lists of aten/src/ATen/autocast_mode.h (the
"CUDA Ops that can autocast to float32 / to lower precision" tables of the torch.amp documentation), CUDA's
layer_norm returning op-math (fp32) statistics for 16-bit inputs, and at::native::dropout taking the fused
native_dropout (a bool mask) on CUDA. The emulation's agreement with the hand rules, which were derived for CUDA,
is checked in tests/test_traced.py (the conformance sample).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from memcalc.measure import cuda_semantics
from memcalc.measure.cuda_semantics import CUDA_AUTOCAST, FP32, LOWER, cpu_has_own

BF16, FP32_DTYPE = torch.bfloat16, torch.float32

# Ops in CUDA's lists that CPU autocast has a kernel for itself, with the CPU's policy as measured below. A torch
# release that adds another CPU kernel fails test_the_cpu_kernels_kept_are_known until it is looked at.
CPU_OWN = {
    "addbmm.default", "addmm.default", "baddbmm.default", "bmm.default", "linalg_vecdot.default", "linear.default",
    "matmul.default", "mm.default", "prelu.default", "scaled_dot_product_attention.default",
    "binary_cross_entropy_with_logits.default", "cdist.default", "cosine_embedding_loss.default",
    "hinge_embedding_loss.default", "huber_loss.default", "kl_div.default", "l1_loss.default",
    "margin_ranking_loss.default", "mse_loss.default", "multi_margin_loss.default", "multilabel_margin_loss.default",
    "nll_loss.default", "nll_loss2d.default", "poisson_nll_loss.default", "smooth_l1_loss.default",
    "soft_margin_loss.default", "triplet_margin_loss.default", "prod.default", "prod.dim_int",
    "grid_sampler.default",  # CPU: fp32, CUDA: promote; no language model samples grids
}


def test_the_cpu_kernels_kept_are_known():
    assert {name for name in CUDA_AUTOCAST if cpu_has_own(name)} == CPU_OWN


def _cpu_autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize(("call", "expected"), [
    (lambda x, w: torch.mm(x, w), BF16),
    (lambda x, w: torch.nn.functional.linear(x, w), BF16),
    (lambda x, w: torch.matmul(x, w), BF16),
    (lambda x, w: torch.bmm(x[None], w[None]), BF16),
    (lambda x, w: torch.nn.functional.mse_loss(x.to(BF16), w.to(BF16)), FP32_DTYPE),
    (lambda x, w: torch.nn.functional.l1_loss(x.to(BF16), w.to(BF16)), FP32_DTYPE),
    (lambda x, w: torch.prod(x.to(BF16)), FP32_DTYPE),
])
def test_the_ops_both_devices_list_already_follow_cuda_on_the_cpu(call, expected):
    """The CPU's own autocast kernels left in place give CUDA's dtypes for the ops language models run."""
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    with _cpu_autocast():
        assert call(x, w).dtype == expected


@pytest.mark.parametrize(("call", "cpu_dtype", "cuda_dtype"), [
    (lambda x: torch.softmax(x, -1), BF16, FP32_DTYPE),
    (lambda x: torch.nn.functional.softmax(x, dim=-1), BF16, FP32_DTYPE),
    (lambda x: torch.log_softmax(x, -1), BF16, FP32_DTYPE),
    (lambda x: torch.softmax(x, -1, dtype=BF16), BF16, BF16),  # an explicit dtype stands (fp32_set_opt_dtype)
    (lambda x: x.sum(), BF16, FP32_DTYPE),
    (lambda x: x.sum(-1), BF16, FP32_DTYPE),
    (lambda x: x.pow(2), BF16, FP32_DTYPE),
    (lambda x: x ** 3, BF16, FP32_DTYPE),
    (lambda x: torch.exp(x), BF16, FP32_DTYPE),
    (lambda x: torch.rsqrt(x.abs() + 1), BF16, FP32_DTYPE),
    (lambda x: torch.nn.functional.layer_norm(x, (4,)), BF16, FP32_DTYPE),
    (lambda x: torch.nn.functional.rms_norm(x, (4,)), BF16, FP32_DTYPE),
    (lambda x: torch.cumsum(x, 0), BF16, FP32_DTYPE),
    (lambda x: torch.einsum("ij,jk->ik", x.float(), x.float()), BF16, BF16),  # the CPU casts at its bmm
    (lambda x: torch.mv(x.float(), x[0].float()), FP32_DTYPE, BF16),
    (lambda x: torch.addcmul(x, x.float(), x), FP32_DTYPE, FP32_DTYPE),  # promote: the widest input
    (lambda x: x.mean(), BF16, BF16),  # mean is in no list: the input's dtype on both
])
def test_cuda_autocast_lists_on_the_cpu(call, cpu_dtype, cuda_dtype):
    x = torch.randn(4, 4, dtype=BF16)
    with _cpu_autocast():
        assert call(x).dtype == cpu_dtype  # the CPU's own choice, without the emulation
        with cuda_semantics.autocast_lists() as registered:
            assert call(x).dtype == cuda_dtype
    assert "softmax.int" in registered
    with _cpu_autocast():
        assert call(x).dtype == cpu_dtype  # the kernels are gone after the block


def test_the_emulated_lists_apply_only_under_autocast():
    x = torch.randn(4, 4, dtype=BF16)
    with cuda_semantics.autocast_lists():
        assert torch.softmax(x, -1).dtype == BF16
        with torch.autocast("cpu", dtype=BF16, enabled=False), _cpu_autocast():
            assert torch.softmax(x, -1).dtype == FP32_DTYPE
        with _cpu_autocast(), torch.autocast("cpu", enabled=False):
            assert torch.softmax(x, -1).dtype == BF16  # transformers' maybe_autocast(enabled=False) regions


def test_the_casts_precede_autograd_so_backward_saves_fp32():
    """As CUDA's autocast wrappers do (autocast_mode.h: casts are autograd-exposed): softmax saves its fp32 output."""
    saved = []
    x = torch.randn(4, 8, dtype=BF16, requires_grad=True)
    with cuda_semantics.autocast_lists(), _cpu_autocast(), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        torch.softmax(x, -1).sum().backward()
    assert FP32_DTYPE in saved and x.grad is not None and x.grad.dtype == BF16


def _saved(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        fn(*inputs)
    return saved


def test_dropout_saves_a_bool_mask_as_cuda_does():
    x = torch.randn(8, 16, dtype=BF16, requires_grad=True)
    drop = lambda t: torch.nn.functional.dropout(t, p=0.1, training=True)
    assert _saved(drop, x) == [(BF16, (8, 16))]  # the CPU: noise in the input dtype
    with cuda_semantics.like_cuda():
        assert _saved(drop, x) == [(torch.bool, (8, 16))]
        assert _saved(lambda t: torch.nn.functional.dropout(t, p=0.1, training=False), x) == []
        assert _saved(lambda t: torch.nn.Dropout(0.1)(t), x) == [(torch.bool, (8, 16))]


def test_attention_dropout_stays_inside_sdpa_as_cuda_does():
    """CUDA's flash and memory-efficient kernels drop inside the kernel; the CPU's math kernel keeps s^2 tensors."""
    q = torch.randn(1, 2, 32, 8, dtype=BF16, requires_grad=True)
    attend = lambda t: torch.nn.functional.scaled_dot_product_attention(t, t, t, dropout_p=0.1, is_causal=True)
    scores = (1, 2, 32, 32)
    assert any(shape == scores for _, shape in _saved(attend, q))
    with cuda_semantics.like_cuda():
        assert not any(shape == scores for _, shape in _saved(attend, q))


@pytest.mark.parametrize("semantics", ["like_cuda", "kernels_like_cuda"])
def test_a_narrower_v_takes_a_fused_kernel_as_cuda_does(semantics):
    """CUDA's memory-efficient kernel takes a v narrower than q and k (DeepSeek's MLA); the CPU runs the math backend
    on it and keeps s^2 weights. Emulated with a zero-padded v through the CPU's flash kernel: the same output. In the
    traces (like_cuda) and in the measured CPU steps (kernels_like_cuda) alike: --verify's step ran the math backend
    before (DeepSeek-V2 read -20.94% at seq 512), while the estimate and the traces counted the fused kernel."""
    q, k = (torch.randn(1, 2, 32, 24, dtype=BF16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 32, 16, dtype=BF16, requires_grad=True)
    attend = lambda t: torch.nn.functional.scaled_dot_product_attention(t, k, v, is_causal=True)
    scores = (1, 2, 32, 32)
    plain = attend(q)
    assert any(shape == scores for _, shape in _saved(attend, q))
    calls = cuda_semantics.NARROW_V_CALLS[0]
    with getattr(cuda_semantics, semantics)():
        emulated = attend(q)
        saved = _saved(attend, q)
    assert not any(shape == scores for _, shape in saved)
    assert (BF16, (1, 2, 32, 24)) in saved  # v zero-padded to q's width, as the flash kernel saves it
    assert cuda_semantics.NARROW_V_CALLS[0] == calls + 2
    assert emulated.shape == plain.shape == (1, 2, 32, 16)
    torch.testing.assert_close(emulated, plain, atol=2e-2, rtol=2e-2)  # two bf16 kernels
    emulated.sum().backward()  # the padded kernel's backward runs, and gives v a gradient of v's own shape
    assert v.grad.shape == v.shape


def test_layer_norm_statistics_in_fp32_for_16_bit_inputs():
    x = torch.randn(4, 8, dtype=BF16)
    op = torch.ops.aten.native_layer_norm.default
    out = op(x, [8], None, None, 1e-5)
    assert [t.dtype for t in out] == [BF16, BF16, BF16]  # the CPU kernel
    assert [t.dtype for t in cuda_semantics.layer_norm_stats(op, (x,), out)] == [BF16, FP32_DTYPE, FP32_DTYPE]
    x32 = x.float()
    out32 = op(x32, [8], None, None, 1e-5)
    assert cuda_semantics.layer_norm_stats(op, (x32,), out32) is out32


def test_policies_cover_lower_and_fp32_lists():
    assert CUDA_AUTOCAST["einsum.default"] == LOWER and CUDA_AUTOCAST["layer_norm.default"] == FP32


def _backward_peak(fn, x: torch.Tensor) -> int:
    """The tracker's peak over the backward of ``fn(x).float().sum()``, above what was live when it began."""
    from memcalc.measure import tracker as trk

    loss = fn(x).float().sum()
    x.grad = None
    with trk.MemoryTracker() as tracker:
        start = tracker.live_bytes
        loss.backward()
        return tracker.peak_bytes - start


@pytest.mark.parametrize("dtype", [FP32_DTYPE, BF16])
def test_softmax_backward_makes_cudas_temporary(dtype):
    """SoftMax.cu softmax_backward_cuda_out computes grad * output into a tensor of its own, the incoming gradient's
    size, beside the op's output; the CPU kernel (softmax_backward_cpu_out) makes none. Emulated, a softmax's backward
    peaks higher by that tensor: here x's bytes (4 x 64 x 64 in x's dtype, the softmax's and its gradient's)."""
    x = torch.randn(4, 64, 64, dtype=dtype, requires_grad=True)
    softmax = lambda t: torch.softmax(t, dim=-1)
    cpu_peak = _backward_peak(softmax, x)
    with cuda_semantics.like_cuda():
        assert _backward_peak(softmax, x) - cpu_peak == 4 * 64 * 64 * x.element_size()
    with cuda_semantics.kernels_like_cuda():  # (memcalc's measured CPU steps run under this one)
        assert _backward_peak(softmax, x) - cpu_peak == 4 * 64 * 64 * x.element_size()
    # log_softmax's backward has no temporary on CUDA (log_softmax_backward_cuda_out): left as it is
    log_softmax = lambda t: torch.log_softmax(t, dim=-1)
    plain = _backward_peak(log_softmax, x)
    with cuda_semantics.kernels_like_cuda():
        assert _backward_peak(log_softmax, x) == plain


def test_softmax_backward_emulation_nests():
    """A trace's CUDA semantics around a step that enters them again (--reserved's trace): the kernel is registered
    once, by the outermost block, and stays until it ends; torch 2.11 refuses a second registration of the same
    kernel (measured on the GPU machine), torch 2.13 warns."""
    import warnings

    x = torch.randn(4, 64, 64, requires_grad=True)
    softmax = lambda t: torch.softmax(t, dim=-1)
    cpu_peak = _backward_peak(softmax, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no override warning either)
        with cuda_semantics.like_cuda():
            with cuda_semantics.kernels_like_cuda():
                assert _backward_peak(softmax, x) - cpu_peak == x.nbytes
            assert _backward_peak(softmax, x) - cpu_peak == x.nbytes  # (the inner block's end left it registered)
    assert _backward_peak(softmax, x) == cpu_peak  # (and the outer's removed it)
