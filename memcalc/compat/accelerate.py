"""``accelerate estimate-memory`` reproduced (accelerate 1.15, accelerate/commands/estimate.py), and memcalc's terms
beside it. Plain arithmetic; accelerate is never imported (tests/fixtures/peer_figures.json holds what its code
returned). Where accelerate returns -1 ("N/A": int8, int4), these functions return None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from memcalc.compat import ComparisonRow, memcalc_term_bytes
from memcalc.vocab import TERM_GRADIENTS, TERM_MASTER, TERM_MASTER_GRAD_COPY, TERM_OPTIMIZER_STATES, TERM_WEIGHTS

if TYPE_CHECKING:
    from memcalc.model import ParamTensor
    from memcalc.report import Report

COMPONENTS = ("model", "optimizer", "gradients", "step")  # estimate_training_usage's keys, in its order
# estimate_training_usage: "fp8" without an MS-AMP config is counted as 16-bit training.
SIXTEEN_BIT = ("float16", "bfloat16", "fp8")


def accelerate_training_usage(model_bytes: int, mixed_precision: str) -> dict[str, int | None]:
    """estimate_training_usage(bytes, mixed_precision) (no msamp_config): component sizes for batch size 1.

    model_bytes is the fp32 size of the model (estimate-memory builds it with torch_dtype=torch.float32).
    "float32": model 1x, gradients 1x, optimizer 2x, step 4x; "float16"/"bfloat16"/"fp8": model 1x (fp32),
    gradients 1.5x (fp32 + fp16 copy, the fp16 half floored), optimizer 2x, step = optimizer; anything else
    (int8, int4): None for every component (accelerate: -1, shown "N/A").
    """
    fp32_size = model_bytes
    fp16_size = model_bytes // 2
    if mixed_precision == "float32":
        return {"model": fp32_size, "optimizer": fp32_size * 2, "gradients": fp32_size, "step": fp32_size * 4}
    if mixed_precision in SIXTEEN_BIT:
        return {"model": fp32_size, "optimizer": fp32_size * 2, "gradients": fp32_size + fp16_size,
                "step": fp32_size * 2}
    return dict.fromkeys(COMPONENTS)


def accelerate_training_figure(num_params: int, dtype: str = "float32") -> int | None:
    """The "Training using Adam" column of ``accelerate estimate-memory`` (estimate_command): max() of the
    components, not their sum, for a model of num_params fp32 parameters. 16 B/param for float32 (4x the fp32
    model), 8 B/param for float16 (the optimizer states alone); None for int8/int4 (accelerate: "N/A")."""
    sizes = [size for size in accelerate_training_usage(4 * num_params, dtype).values() if size is not None]
    return max(sizes) if sizes else None


def accelerate_counted_params(tensors: Sequence[ParamTensor]) -> int:
    """The parameters ``accelerate estimate-memory`` counts: it builds AutoModel (the base model, no LM head) for a
    transformers model without a custom auto_map (estimate.py, create_empty_model). accelerate also counts buffers
    (calculate_maximum_sizes: rotary inv_freq, 512 B for Llama-3-8B); they are left out here."""
    from memcalc.model import ROLE_LM_HEAD

    return sum(t.numel for t in tensors if t.role != ROLE_LM_HEAD)


def compare_with_accelerate(report: Report, accelerate_params: int | None = None) -> list[ComparisonRow]:
    """memcalc next to ``accelerate estimate-memory``'s training figure (its "float32" row for fp32/autocast
    recipes, its "float16" row for 16-bit ones), component by component. accelerate_params: what it counts
    (``accelerate_counted_params(tensors)``); defaults to memcalc's parameter count."""
    training = report.training
    counted = report.model.num_params if accelerate_params is None else accelerate_params
    dtype = "float16" if training.weight_dtype in ("bf16", "fp16") else "float32"
    sizes = accelerate_training_usage(4 * counted, dtype)
    tail = _scope(report, counted, accelerate_params)
    step_phase = next((p.bytes for p in report.per_gpu.phases if p.phase.value == "optimizer_step"), None)
    rows = (_rows_fp32 if dtype == "float32" else _rows_16bit)(report, sizes, step_phase, tail)
    rows.append(ComparisonRow(
        "training figure (memcalc: peak)", report.per_gpu.peak_bytes, accelerate_training_figure(counted, dtype),
        f"accelerate estimate-memory's 'Training using Adam' ({dtype} row) is the LARGEST of its components, not "
        "their sum, for batch size 1 and without activations; memcalc's peak sums what is alive in the largest "
        "phase" + tail))
    return rows


def _scope(report: Report, counted: int, accelerate_params: int | None) -> str:
    training = report.training
    scope = []
    if accelerate_params is not None and accelerate_params != report.model.num_params:
        scope.append(f"accelerate builds AutoModel (no LM head): {counted:,} of memcalc's "
                     f"{report.model.num_params:,} params")
    if training.num_gpus > 1:
        scope.append(f"accelerate assumes one device; memcalc's figures are per GPU of {training.num_gpus}"
                     f"{f' with ZeRO-{training.zero_stage}' if training.zero_stage else ''}")
    return ("; " + "; ".join(scope)) if scope else ""


def _rows_fp32(report: Report, sizes: dict[str, int | None], step_phase: int | None,
               tail: str) -> list[ComparisonRow]:
    return [
        ComparisonRow("model", memcalc_term_bytes(report, TERM_WEIGHTS), sizes["model"],
                      "accelerate: fp32 model, 4 B/param" + tail),
        ComparisonRow("gradients", memcalc_term_bytes(report, TERM_GRADIENTS), sizes["gradients"],
                      "accelerate: one fp32 gradient per param" + tail),
        ComparisonRow("optimizer", memcalc_term_bytes(report, TERM_OPTIMIZER_STATES), sizes["optimizer"],
                      "accelerate: Adam's two fp32 states, 8 B/param" + tail),
        ComparisonRow("step", step_phase, sizes["step"],
                      "accelerate: 'step' = 4x the model (16 B/param); memcalc: the optimizer-step phase total" + tail),
    ]


def _rows_16bit(report: Report, sizes: dict[str, int | None], step_phase: int | None,
                tail: str) -> list[ComparisonRow]:
    return [
        ComparisonRow("model", memcalc_term_bytes(report, TERM_WEIGHTS, TERM_MASTER), sizes["model"],
                      "accelerate: 4 B/param (fp32 weights; it names fp16 + fp32 copies but counts 4 B); memcalc: "
                      "16-bit weights + fp32 master" + tail),
        ComparisonRow("gradients", memcalc_term_bytes(report, TERM_GRADIENTS, TERM_MASTER_GRAD_COPY),
                      sizes["gradients"],
                      "accelerate: 1.5x the fp32 model (fp32 + fp16 gradient, 6 B/param); memcalc: 16-bit "
                      "gradients + the fp32 copy of the optimizer step" + tail),
        ComparisonRow("optimizer", memcalc_term_bytes(report, TERM_OPTIMIZER_STATES), sizes["optimizer"],
                      "accelerate: Adam's two fp32 states, 8 B/param" + tail),
        ComparisonRow("step", step_phase, sizes["step"],
                      "accelerate: 'step' = the optimizer size again; memcalc: the optimizer-step phase total" + tail),
    ]
