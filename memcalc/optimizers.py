"""Optimizer state bytes per parameter tensor, and the temporaries an optimizer step allocates.

Every rule follows the implementation named next to it; the state dtype is the recipe's except where the
implementation fixes it (Adafactor and 8-bit states).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from memcalc.precision import BYTES_PER_DTYPE, Dtype
from memcalc.units import BYTES_PER_FP32


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    lion = "lion"
    adafactor = "adafactor"
    adamw_8bit = "adamw-8bit"


class OptimImpl(str, Enum):
    foreach = "foreach"
    fused = "fused"
    forloop = "forloop"


@dataclass(frozen=True, eq=False, repr=False)
class OptimizerSettings:
    name: OptimizerName = OptimizerName.adamw
    impl: OptimImpl = OptimImpl.foreach
    amsgrad: bool = False
    adafactor_beta1: float | None = None  # transformers Adafactor default: None (no first moment)

    def describe(self) -> str:
        text = {
            OptimizerName.adamw: "AdamW (torch.optim.AdamW: exp_avg + exp_avg_sq)",
            OptimizerName.adam: "Adam (torch.optim.Adam: exp_avg + exp_avg_sq)",
            OptimizerName.sgd: "SGD without momentum (no state)",
            OptimizerName.sgd_momentum: "SGD with momentum (torch.optim.SGD: momentum_buffer)",
            OptimizerName.lion: "Lion (one exp_avg)",
            OptimizerName.adafactor: "Adafactor (transformers.optimization.Adafactor: factored second moment)",
            OptimizerName.adamw_8bit: "8-bit AdamW (bitsandbytes AdamW8bit: block-wise quantized states)",
        }[self.name]
        if self.amsgrad and self.name in (OptimizerName.adam, OptimizerName.adamw):
            text += " + amsgrad max_exp_avg_sq"
        if self.name == OptimizerName.adafactor and self.adafactor_beta1 is not None:
            text += f" + first moment (beta1={self.adafactor_beta1})"
        return f"{text}, {self.impl.value} implementation"


# bitsandbytes/optim/optimizer.py, Optimizer8bit.init_state: tensors with fewer elements than
# min_8bit_size (default 4096) keep two fp32 states; larger ones get uint8 codes plus one fp32 absmax per
# 256-element block (blocksize = 256) for each of the two states.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
# The two 256-entry fp32 quantization maps ("dynamic" signed, "udynamic" unsigned) are created once per
# optimizer (fill_qmap) and shared by every tensor's state (state["qmap1"] = self.name2qmap["dynamic"]).
BNB_QMAP_BYTES = 2 * 256 * BYTES_PER_FP32


def _adafactor_is_factored(shape: Sequence[int]) -> bool:
    # transformers Adafactor._get_options: factored = len(param_shape) >= 2
    return len(shape) >= 2


def state_bytes_by_kind(
    shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings, state_dtype: Dtype
) -> dict[str, int]:
    """Bytes of each optimizer state kind, summed over the given parameter tensors (those it updates).

    The keys are the names the implementation uses in ``optimizer.state[p]``.
    """
    state_bytes = BYTES_PER_DTYPE[state_dtype]
    totals: dict[str, int] = {}

    def add(kind: str, num_bytes: int) -> None:
        totals[kind] = totals.get(kind, 0) + num_bytes

    name = settings.name
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
        elif name == OptimizerName.adamw_8bit:
            if numel < BNB_MIN_8BIT_SIZE:
                add("state1", numel * BYTES_PER_FP32)
                add("state2", numel * BYTES_PER_FP32)
            else:
                num_blocks = math.ceil(numel / BNB_BLOCKSIZE)
                add("state1", numel)  # uint8 codes
                add("state2", numel)
                add("absmax1", num_blocks * BYTES_PER_FP32)
                add("absmax2", num_blocks * BYTES_PER_FP32)
        # OptimizerName.sgd: no state.
    if name == OptimizerName.adamw_8bit and any(math.prod(s) >= BNB_MIN_8BIT_SIZE for s in shapes):
        add("qmap1+qmap2 (shared)", BNB_QMAP_BYTES)
    return totals


def step_temporary_bytes(
    shapes: Sequence[tuple[int, ...]], settings: OptimizerSettings, param_dtype: Dtype, state_dtype: Dtype
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

    if name in (OptimizerName.adam, OptimizerName.adamw):
        if impl == OptimImpl.foreach:
            # torch/optim/adam.py _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)
            # materializes one state-sized tensor per parameter, all alive until _foreach_addcdiv_.
            return total_numel * state_bytes, "foreach: _foreach_sqrt(exp_avg_sq) over all tensors at once"
        if impl == OptimImpl.forloop:
            # _single_tensor_adam: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps):
            # the sqrt and the quotient coexist for one tensor at a time.
            return 2 * largest_numel * state_bytes, "for-loop: sqrt and quotient of the largest tensor"
        return 0, "fused kernel (torch._fused_adamw_): no temporaries"
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
    if name == OptimizerName.adamw_8bit:
        return 0, "bitsandbytes fused 8-bit kernels: no temporaries"
    # SGD (torch/optim/sgd.py) with weight_decay=0 updates in place; momentum_buffer is state.
    return 0, "in-place update: no temporaries"
