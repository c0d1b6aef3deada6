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

from memcalc.api import model_of, run
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec

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


# tests/tiny.py's Falcon layouts under autocast, checkpointed, sdpa (the cells benchmarks/padded.py's "peak unpadded"
# column read -2.09% on 2026-12-05): (layout, seq, the error before the fix, measured 2026-12-05 on this machine)
FALCON_AUTOCAST = [
    ("falcon", 128, -2.09),  # the first layer's MLP backward: the output gradient in fp32 beside its bf16 cast
    ("falcon", 256, -3.20),
    # (and the end of the first layer's recomputation, Rule.opening_transient: -0.39% / -0.36% with the MLP's alone)
    ("falcon-40b-layout", 256, -3.53),
    ("falcon-sequential", 256, -3.19),
]


@pytest.mark.parametrize(("layout", "seq", "before"), FALCON_AUTOCAST, ids=lambda v: str(v))
def test_falcon_autocast_checkpointed_not_low(layout, seq, before):
    """Falcon amp-bf16, checkpointed, sdpa, batch 2: the estimate against the measured CPU step (memcalc's tracker).

    FalconDecoderLayer.forward's last add (``residual + mlp_output``: fp32 + bf16 under autocast) hands the fp32 output
    gradient (r T h) to the residual and its bf16 cast (c T h, autograd's engine casting to the operand's dtype) to the
    block; both wait through the MLP's backward. The rule counted one c T h, so the first layer's MLP backward, the
    peak, read low; with two norms or the sequential layout the end of the layer's recomputation (the norms' fp32
    outputs and dense's output alive as locals) peaks at seq 256, a moment the rule did not have. Measured 2026-12-05:
    before -2.09% / -3.20% / -3.53% / -3.19% (-0.39% / -0.36% with the MLP's moment alone fixed), after -0.003% on each
    (160 to 176 bytes, not traced further). Tolerance: no lower than -0.1%, at most +0.5%.
    """
    from memcalc.measure import run_verify
    from tests.tiny import LAYER_NORM_FAMILIES

    raw = LAYER_NORM_FAMILIES[layout][0]
    spec = TrainingSpec(precision="amp-bf16", micro_batch_size=2, seq_len=seq, checkpointing="full", attention="sdpa")
    report = run(model_of(ModelConfig("tiny", raw, "test")), spec)
    measured = run_verify(raw, spec, "cpu-tracker")
    error = 100 * (report.per_gpu.peak_bytes / measured.measured_peak_bytes - 1)
    print(f"{layout} amp-bf16 sdpa ckpt=full b2xs{seq}: {error:+.3f}% (before the fix {before:+.2f}%)")
    assert -0.1 <= error <= 0.5, error
    assert measured.measured_peak_phase == report.per_gpu.peak_phase.value == "backward"


def test_falcon_mlp_backward_transient_by_hand():
    """Rule.transient of tests/tiny.py's Falcon (hidden 96, ffn 384) at amp-bf16, b2 x s128 (T = 256), from the live
    tensors at the measured peak (the first layer's dense_4h_to_h input-gradient mm, 2026-12-05): GELU output's gradient
    2 x 256 x 384 = 196,608, the fp32 output gradient 4 x 256 x 96 = 98,304, its bf16 cast 2 x 256 x 96 = 49,152."""
    from memcalc.families.falcon import activations, resolve
    from memcalc.families.saved import Run
    from tests.tiny import LAYER_NORM_FAMILIES

    arch = resolve(LAYER_NORM_FAMILIES["falcon"][0], "FalconForCausalLM")
    rule = activations(arch, Run(b=2, s=128, c=2, autocast=True, eager=False, checkpointing=True))
    assert rule.transient == 196_608 + 98_304 + 49_152
    assert rule.output_gradient == 98_304
    # bf16-pure: the output gradient is the block's (no cast): 196,608 + 49,152, as before
    rule = activations(arch, Run(b=2, s=128, c=2, autocast=False, eager=False, checkpointing=True))
    assert rule.transient == 196_608 + 49_152
