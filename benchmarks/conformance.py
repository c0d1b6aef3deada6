"""Conformance of the hand rules with the trace: every hand-modelled RMSNorm family, each config option that
changes a code path toggled, each recipe and attention kernel; the rules' saved bytes (activations and loss)
against the trace of the same config. The table behind docs/accuracy.md's "Conformance" section.

    python benchmarks/conformance.py [--markdown]

The trace runs CPU kernels; where CUDA's differ and the rules follow CUDA (attention dropout), the named
difference is taken out before comparing (``cpu_difference``), and sdpa with attention dropout is left out (on the
CPU it runs the math kernel, which keeps s^2 tensors CUDA's flash kernel does not). LayerNorm families (gpt2, opt,
bloom, phi, falcon, bert, t5) are compared with a real forward, named corrections included, in
tests/test_activations.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tiny import BASE, GEMMA2, GEMMA3, estimated_saved_bytes
from tests.tiny import FAMILIES as TESTED_FAMILIES

# The tiny configs the activation tests measure (tests/tiny.py), and the Gemma-2/3 layouts (without their window).
FAMILIES = {
    **TESTED_FAMILIES,
    "gemma2": (GEMMA2["architectures"][0], {k: GEMMA2[k] for k in ("head_dim", "query_pre_attn_scalar")}),
    "gemma3_text": (GEMMA3["architectures"][0], {k: GEMMA3[k] for k in ("head_dim", "query_pre_attn_scalar")}),
}
# Options that change a code path, each as config keys. The sequence is 48: a window of 16 is shorter.
TOGGLES = {
    "default": {},
    "window < seq": {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 0},
    "use_cache false": {"use_cache": False},
    "tied head": {"tie_word_embeddings": True},
    "untied head": {"tie_word_embeddings": False},
    "head_dim 48": {"head_dim": 48},
    "attention bias": {"attention_bias": True},
    "attention dropout": {"attention_dropout": 0.1},
    "softcaps off": {"attn_logit_softcapping": None, "final_logit_softcapping": None},
}
RECIPES = ("bf16-pure", "fp32", "amp-bf16")
ATTENTION = ("sdpa", "eager")
BATCH, SEQ = 2, 48


def saved(raw: dict, recipe: str, attention: str, activations: str) -> int:
    return estimated_saved_bytes(raw, recipe, BATCH, SEQ, attention=attention, activations=activations)[0]


def cpu_difference(raw: dict, recipe: str, attention: str) -> int | None:
    """Bytes the CPU trace saves beyond what the rules (CUDA) count, named; None where the CPU run is not
    comparable. Attention dropout, eager: CUDA's native_dropout keeps a 1-byte mask per score, the CPU kernel
    saves its noise in the probabilities' dtype (bf16: 2 B; under CPU autocast fp32: 4 B). With sdpa, CUDA's flash
    kernel applies dropout inside; the CPU runs the math kernel, which keeps the s^2 scores."""
    if not raw.get("attention_dropout"):
        return 0
    if attention == "sdpa":
        return None
    noise = {"bf16-pure": 2, "fp32": 4, "amp-bf16": 4}[recipe]
    scores = BATCH * raw["num_attention_heads"] * SEQ * SEQ
    return raw["num_hidden_layers"] * scores * (noise - 1)  # the noise, less CUDA's 1-byte mask


def cases(families: dict = FAMILIES, toggles: dict = TOGGLES) -> Iterator[tuple[str, str, dict]]:
    for family, (architecture, extra) in families.items():
        for name, toggle in toggles.items():
            if name == "softcaps off" and family != "gemma2":
                continue
            yield family, name, {"model_type": family, "architectures": [architecture], **BASE, **extra, **toggle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the family x toggle table")
    args = parser.parse_args()
    worst: dict[tuple[str, str], float] = {}
    compared = 0
    for family, toggle, raw in cases():
        for recipe in RECIPES:
            for attention in ATTENTION:
                difference = cpu_difference(raw, recipe, attention)
                if difference is None:
                    continue
                rules = saved(raw, recipe, attention, "rules")
                traced = saved(raw, recipe, attention, "trace") - difference
                error = 100 * (rules - traced) / traced
                compared += 1
                key = (family, toggle)
                if abs(error) >= abs(worst.get(key, 0.0)):
                    worst[key] = error
    toggles = [name for name in TOGGLES]
    print(f"{compared} comparisons; worst error of the rules against the trace per family and toggle "
          "(all recipes and kernels):")
    if args.markdown:
        print("| family | " + " | ".join(toggles) + " |")
        print("|---|" + "---|" * len(toggles))
        for family in FAMILIES:
            cells = [f"{worst[(family, t)]:+.2f}%" if (family, t) in worst else "-" for t in toggles]
            print(f"| {family} | " + " | ".join(cells) + " |")
    else:
        for (family, toggle), error in sorted(worst.items()):
            print(f"{family:12s} {toggle:18s} {error:+.2f}%")


if __name__ == "__main__":
    main()
