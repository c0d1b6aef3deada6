"""Precision recipes: which dtype each kind of training state has.

Why the seeds disagree (7-8B models quoted at 56, 112, 120, 128 and 132.8 GB) is mostly this table:
each post silently assumes one row of it. memcalc names the row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from memcalc.errors import UsageError
from memcalc.units import BYTES_PER_16BIT, BYTES_PER_FP32


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


BYTES_PER_DTYPE: dict[Dtype, int] = {Dtype.fp32: BYTES_PER_FP32, Dtype.bf16: BYTES_PER_16BIT, Dtype.fp16: BYTES_PER_16BIT}


class PrecisionName(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    bf16_pure = "bf16-pure"
    fp16_pure = "fp16-pure"
    amp_bf16 = "amp-bf16"
    amp_fp16 = "amp-fp16"


@dataclass(frozen=True, eq=False, repr=False)
class Recipe:
    """Dtypes of one recipe. ``master_dtype`` is None when the optimizer updates the weights in place."""

    name: str
    weight_dtype: Dtype
    master_dtype: Dtype | None
    grad_dtype: Dtype
    state_dtype: Dtype
    compute_dtype: Dtype  # dtype of activations and matmuls
    autocast: bool  # torch.autocast: low-precision copies of Linear weights live from forward to backward
    description: str

    @property
    def optimizer_param_dtype(self) -> Dtype:
        """The dtype of the tensors the optimizer updates (the master copy when there is one)."""
        return self.master_dtype or self.weight_dtype


_RECIPES: dict[PrecisionName, Recipe] = {
    # Seed 000: "fp32: 28 GB + 28 GB + 56 GB = 112 GB" for 7e9 params with Adam.
    PrecisionName.fp32: Recipe(
        "fp32", Dtype.fp32, None, Dtype.fp32, Dtype.fp32, Dtype.fp32, False,
        "fp32 everywhere: fp32 weights, gradients and optimizer states",
    ),
    # ZeRO paper (Rajbhandari et al. 2020, sec. 3.1): 2+2+(4+4+4) = 16 bytes/param for mixed-precision Adam;
    # seed 001 (7.5B -> 120 GB) and seed 002 (8B -> 16+32+16+32+32 GB) use this recipe.
    PrecisionName.bf16: Recipe(
        "bf16", Dtype.bf16, Dtype.fp32, Dtype.bf16, Dtype.fp32, Dtype.bf16, False,
        "mixed precision with an fp32 master copy (Megatron/DeepSpeed style): bf16 weights and gradients, "
        "fp32 master weights and optimizer states",
    ),
    PrecisionName.fp16: Recipe(
        "fp16", Dtype.fp16, Dtype.fp32, Dtype.fp16, Dtype.fp32, Dtype.fp16, False,
        "mixed precision with an fp32 master copy (Megatron/DeepSpeed style): fp16 weights and gradients, "
        "fp32 master weights and optimizer states",
    ),
    # Seed 000: "bf16: 14 + 14 + 28 = 56 GB": model cast to bf16, torch.optim states created zeros_like(param).
    PrecisionName.bf16_pure: Recipe(
        "bf16-pure", Dtype.bf16, None, Dtype.bf16, Dtype.bf16, Dtype.bf16, False,
        "pure bf16: model cast to bf16, so weights, gradients and optimizer states are all bf16 (no master copy)",
    ),
    PrecisionName.fp16_pure: Recipe(
        "fp16-pure", Dtype.fp16, None, Dtype.fp16, Dtype.fp16, Dtype.fp16, False,
        "pure fp16: model cast to fp16, so weights, gradients and optimizer states are all fp16 (no master copy)",
    ),
    # torch.autocast keeps parameters fp32; HF Trainer's bf16=True does this. Seed 004 counts the
    # low-precision copies as "6 bytes per parameter" of weights (4 fp32 + 2 for the 16-bit copy).
    PrecisionName.amp_bf16: Recipe(
        "amp-bf16", Dtype.fp32, None, Dtype.fp32, Dtype.fp32, Dtype.bf16, True,
        "torch.autocast to bf16 (HF Trainer bf16=True): fp32 weights, gradients and optimizer states; "
        "bf16 copies of Linear weights live from forward to backward",
    ),
    PrecisionName.amp_fp16: Recipe(
        "amp-fp16", Dtype.fp32, None, Dtype.fp32, Dtype.fp32, Dtype.fp16, True,
        "torch.autocast to fp16 (HF Trainer fp16=True): fp32 weights, gradients and optimizer states; "
        "fp16 copies of Linear weights live from forward to backward",
    ),
}


def get_recipe(
    name: PrecisionName,
    master_dtype: Dtype | None = None,
    grad_dtype: Dtype | None = None,
    state_dtype: Dtype | None = None,
) -> Recipe:
    """The named recipe, with single dtypes overridden where the user asked."""
    recipe = _RECIPES[PrecisionName(name)]
    if master_dtype is not None:
        if recipe.master_dtype is None:
            raise UsageError(
                f"{{master_dtype}} needs a recipe with a master copy (bf16 or fp16); '{recipe.name}' has none"
            )
        recipe = replace(recipe, master_dtype=master_dtype)
    if grad_dtype is not None:
        recipe = replace(recipe, grad_dtype=grad_dtype)
    if state_dtype is not None:
        recipe = replace(recipe, state_dtype=state_dtype)
    overridden = [
        f"{flag}={value.value}"
        for flag, value in (("master", master_dtype), ("grads", grad_dtype), ("states", state_dtype))
        if value is not None
    ]
    if overridden:
        recipe = replace(recipe, description=f"{recipe.description} (overridden: {', '.join(overridden)})")
    return recipe
