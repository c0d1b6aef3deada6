"""Checkpointed steps of the hand-ruled families against measured CPU steps (memcalc's tracker), one cell per backward
moment the rules model (benchmarks/accuracy.py's families matrix, its small configs at batch 2 x seq 256; every cell
of it in docs/accuracy.md).

Held to the any-architecture issue's targets: no under-estimate beyond 1%, no error beyond 2%, the peak phase right.
Before these moments were modelled (docs/accuracy.md, the families matrix of 2026-12-02) the same cells were: Llama
amp eager +6.82%, Gemma-3 bf16 sdpa -1.89%, Gemma-2 fp32 eager +6.33%, Mixtral fp32 sdpa +3.82%, Qwen2-MoE fp32 sdpa
+0.67% (its peak then at another moment), GPT-2 fp32 sdpa +9.57%, OPT fp32 eager +4.68%, BLOOM fp32 eager +6.37%,
Falcon amp sdpa +2.98%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy

# The issue's targets (issue 12, "Targets"): no under-estimate beyond 1%, worst 2%.
LOWEST_PCT, HIGHEST_PCT = -1.0, 2.0

CASES = [
    ("llama", "amp-bf16", "eager"),  # eager softmax's backward: what the layer released by then, what waits there;
    # (and, as the whole families matrix shows, the layer's output gradient and the kept input saved once)
    ("gemma3_text", "bf16-pure", "sdpa"),  # the post-feed-forward norm's backward opening the layer's, released after
    ("gemma2", "fp32", "eager"),  # the final norm's, head's and softcapping's saves gone at the first recomputation;
    # (both kinds' eager masks, sliding and full, held to the last layer's backward: was -0.24%)
    ("gemma3_text", "amp-bf16", "eager"),  # the same two masks (was -0.60%)
    ("mixtral", "fp32", "sdpa"),  # the experts' product backward, their down_proj gradient made first
    ("qwen2_moe", "fp32", "sdpa"),  # the restore's backward beside the shared expert's gradients; the recomputed
    # (MoE) layer's own MLP at the last layer's moments
    ("gpt2", "fp32", "sdpa"),  # no cache under checkpointing; c_proj's input released in NewGELU's backward
    ("opt", "fp32", "eager"),  # eager softmax's backward in a LayerNorm family
    ("bloom", "fp32", "eager"),  # the GeLU's output released in GeLUFunction's backward
    ("falcon", "amp-bf16", "sdpa"),  # the multi-query math backend's softmax backward (5.24); the kept mask
    ("bloom", "fp32", "sdpa"),  # sdpa asked of a class without an sdpa path: counted eager, its mask kept (was -2.6%)
    # Falcon's other layouts at eager softmax's backward: the norm feeding only the MLP released by then, the fused
    # query_key_value's gradient not yet made (read as the output projection before: +1% to +5.5% at 5.25)
    ("falcon-sequential", "fp32", "eager"),
    ("falcon-40b-layout", "bf16-pure", "eager"),
]
LAYOUTS = {"falcon-sequential": {"multi_query": False, "parallel_attn": False},
           "falcon-40b-layout": {"new_decoder_architecture": True, "num_kv_heads": 2}}


@pytest.mark.parametrize(("family", "recipe", "attention"), CASES, ids=lambda v: v)
def test_checkpointed_step_within_the_issue_targets(family, recipe, attention):
    from memcalc.measure import run_verify

    base = family.split("-")[0]
    case = accuracy.FamilyCase(base, recipe, attention, "full")
    config, model = accuracy._model({**accuracy.FAMILY_CONFIGS[base], **LAYOUTS.get(family, {})})
    report = accuracy.run(model, case.spec())
    assert report.training.activations == "rules"
    measured = run_verify(config, case.spec(), "cpu-tracker")
    error = 100 * (report.per_gpu.peak_bytes / measured.measured_peak_bytes - 1)
    print(f"{case.label}: {error:+.2f}%")
    assert LOWEST_PCT <= error <= HIGHEST_PCT, error
    assert report.per_gpu.peak_phase.value == measured.measured_peak_phase


@pytest.mark.parametrize(("family", "checkpointing"), [("mistral", "none"), ("gemma3_text", "none"),
                                                       ("gemma3_text", "full"), ("llama", "full")])
def test_fp32_grouped_heads_on_cudas_math_path(family, checkpointing):
    """fp32 with grouped kv heads under sdpa: the math path CUDA falls to (memcalc.activations.sdpa_runs_math), the
    measured CPU step held to it call by call. Mistral's window (shorter than the sequence in every layer) gives every
    call a mask and the memory-efficient kernel; Gemma-3's only its sliding layers'. Measured 2026-12-04: Mistral
    -0.00% (+11.67% while every layer was counted on the math path), Gemma-3 -0.22% / -0.37% (+4.90% / +1.94%)."""
    from memcalc.measure import run_verify

    case = accuracy.FamilyCase(family, "fp32", "sdpa", checkpointing)
    config, model = accuracy._model(accuracy.FAMILY_CONFIGS[family])
    report = accuracy.run(model, case.spec())
    measured = run_verify(config, case.spec(), "cpu-tracker")
    error = 100 * (report.per_gpu.peak_bytes / measured.measured_peak_bytes - 1)
    print(f"{case.label}: {error:+.2f}%")
    assert LOWEST_PCT <= error <= HIGHEST_PCT, error
    assert report.per_gpu.peak_phase.value == measured.measured_peak_phase
