"""Per-tensor optimizer state rules, checked against the real optimizers' state tensors."""

from __future__ import annotations

import math

import pytest

from memcalc.optimizers import (
    BNB_BLOCKSIZE,
    OptimImpl,
    OptimizerName,
    OptimizerSettings,
    state_bytes_by_kind,
    step_temporary_bytes,
)
from memcalc.precision import Dtype

# Shapes that exercise every rule: matrices, vectors, a 3-D fused expert tensor, a tensor below
# bitsandbytes' 4096-element threshold and one that is not a multiple of its 256-element block.
SHAPES = [(300, 50), (64,), (4, 33, 17), (10, 10), (8193,)]


def _settings(name: str, impl: str = "foreach", **kw) -> OptimizerSettings:
    return OptimizerSettings(name=OptimizerName(name), impl=OptimImpl(impl), **kw)


def test_adam_states_are_two_state_sized_tensors():
    numel = sum(math.prod(s) for s in SHAPES)
    states = state_bytes_by_kind(SHAPES, _settings("adamw"), Dtype.fp32)
    assert states == {"exp_avg": 4 * numel, "exp_avg_sq": 4 * numel}
    amsgrad = state_bytes_by_kind(SHAPES, _settings("adam", amsgrad=True), Dtype.bf16)
    assert amsgrad == {"exp_avg": 2 * numel, "exp_avg_sq": 2 * numel, "max_exp_avg_sq": 2 * numel}


def test_adafactor_factored_shapes():
    states = state_bytes_by_kind([(300, 50)], _settings("adafactor"), Dtype.bf16)
    assert states == {"RMS": 4, "exp_avg_sq_row": 300 * 4, "exp_avg_sq_col": 50 * 4}  # always fp32
    with_beta1 = state_bytes_by_kind([(64,)], _settings("adafactor", adafactor_beta1=0.9), Dtype.bf16)
    assert with_beta1 == {"RMS": 4, "exp_avg": 64 * 4, "exp_avg_sq": 64 * 4}


def test_foreach_forloop_fused_temporaries():
    numel = sum(math.prod(s) for s in SHAPES)
    largest = max(math.prod(s) for s in SHAPES)
    assert step_temporary_bytes(SHAPES, _settings("adamw", "foreach"), Dtype.fp32, Dtype.fp32)[0] == 4 * numel
    assert step_temporary_bytes(SHAPES, _settings("adamw", "forloop"), Dtype.fp32, Dtype.fp32)[0] == 2 * 4 * largest
    assert step_temporary_bytes(SHAPES, _settings("adamw", "fused"), Dtype.fp32, Dtype.fp32)[0] == 0


# ---- against the real implementations -----------------------------------------------------------------

torch = pytest.importorskip("torch")


def _params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in SHAPES]


def _step(optimizer, params):
    sum((p.float() ** 2).sum() for p in params).backward()
    optimizer.step()


def _measured_state_bytes(optimizer, params) -> dict[str, int]:
    """Bytes per state key as the optimizer holds them, counting each distinct storage once."""
    seen: set[int] = set()
    totals: dict[str, int] = {}
    for p in params:
        for key, value in optimizer.state[p].items():
            if not torch.is_tensor(value) or value.device != p.device:
                continue
            ptr = value.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            totals[key] = totals.get(key, 0) + value.nbytes
    return totals


@pytest.mark.parametrize("impl", ["foreach", "fused", "forloop"])
@pytest.mark.parametrize(("dtype", "state_dtype"), [("float32", Dtype.fp32), ("bfloat16", Dtype.bf16)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_matches_torch(impl, dtype, state_dtype, amsgrad):
    params = _params(getattr(torch, dtype))
    kwargs = {"foreach": impl == "foreach", "fused": impl == "fused" or None}
    optimizer = torch.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad, **kwargs)
    _step(optimizer, params)
    expected = state_bytes_by_kind(SHAPES, _settings("adamw", impl, amsgrad=amsgrad), state_dtype)
    measured = _measured_state_bytes(optimizer, params)
    if impl != "fused":
        # Without fused/capturable, torch hosts "step" on the CPU on purpose (adam.py _init_group, "special
        # device hosting for step"): no GPU bytes. On this CPU-only test machine it shares the params'
        # device, so it is set aside here.
        assert all(optimizer.state[p]["step"].device.type == "cpu" for p in params)
        measured.pop("step")
    assert measured == expected


def test_sgd_momentum_matches_torch():
    params = _params(torch.float32)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _step(optimizer, params)
    assert _measured_state_bytes(optimizer, params) == state_bytes_by_kind(SHAPES, _settings("sgd-momentum"), Dtype.fp32)
    plain = torch.optim.SGD(params, lr=0.1)
    _step(plain, params)
    assert _measured_state_bytes(plain, params) == state_bytes_by_kind(SHAPES, _settings("sgd"), Dtype.fp32) == {}


@pytest.mark.parametrize("beta1", [None, 0.9])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adafactor_matches_transformers(beta1, dtype):
    transformers = pytest.importorskip("transformers")
    params = _params(getattr(torch, dtype))
    optimizer = transformers.Adafactor(params, lr=1e-3, beta1=beta1, scale_parameter=False, relative_step=False)
    _step(optimizer, params)
    expected = state_bytes_by_kind(SHAPES, _settings("adafactor", adafactor_beta1=beta1), Dtype(dtype.replace("float32", "fp32").replace("bfloat16", "bf16")))
    assert _measured_state_bytes(optimizer, params) == expected


def test_adamw_8bit_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    params = _params(torch.float32)
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    try:
        _step(optimizer, params)
    except (RuntimeError, NotImplementedError) as exc:  # a build without CPU kernels
        pytest.skip(f"bitsandbytes cannot step on this CPU: {exc}")
    measured = _measured_state_bytes(optimizer, params)
    expected = state_bytes_by_kind(SHAPES, _settings("adamw-8bit"), Dtype.fp32)
    # qmap1/qmap2 are one shared pair per optimizer: the measurement counts their storages once.
    measured_qmaps = measured.pop("qmap1") + measured.pop("qmap2")
    assert measured_qmaps == expected.pop("qmap1+qmap2 (shared)")
    assert measured == expected
    big = optimizer.state[params[0]]
    assert big["absmax1"].numel() == math.ceil(300 * 50 / BNB_BLOCKSIZE)
