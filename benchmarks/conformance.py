"""Conformance of the hand rules with the trace: every hand-modelled decoder family (RMSNorm and LayerNorm), each
config option that changes a code path toggled (and full checkpointing), each recipe and attention kernel; the
rules' saved bytes (activations and loss) against the trace of the same config, and the rules' step peak and its
phase against the traced step (the real forward and backward op by op, memcalc/measure/timeline.py). The tables
behind docs/accuracy.md's "Conformance" section.

    python benchmarks/conformance.py [--markdown]

The rules follow CUDA; the trace emulates CUDA's choices on the CPU (memcalc/measure/cuda_semantics.py: autocast's
op lists, fp32 LayerNorm statistics, 1-byte dropout masks, attention dropout inside sdpa), so the two compare
directly. Encoders and encoder-decoders (bert, t5) are compared with real forwards in tests/test_activations.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tiny import BASE, GEMMA2, GEMMA3, GPT2, LAYER_NORM_FAMILIES, estimated_saved_bytes
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
# LayerNorm decoders (tests/tiny.py LAYER_NORM_FAMILIES and GPT-2): the toggles their configs have.
LAYER_NORM = {"gpt2": GPT2, **{name: raw for name, (raw, _, _) in LAYER_NORM_FAMILIES.items()}}
DROPOUT_KEYS = {"gpt2": ("attn_pdrop", "resid_pdrop", "embd_pdrop"), "opt": ("dropout", "attention_dropout"),
                "bloom": ("hidden_dropout", "attention_dropout"), "phi": ("resid_pdrop", "attention_dropout", "embd_pdrop"),
                "falcon": ("hidden_dropout", "attention_dropout")}
LAYER_NORM_TOGGLES = {
    "gpt2": {"reorder_and_upcast_attn": {"reorder_and_upcast_attn": True},
             "scale by layer": {"scale_attn_by_inverse_layer_idx": True}},
    "opt": {"post-norm (350m)": {"do_layer_norm_before": False, "_remove_final_layer_norm": True},
            "projected embeddings": {"word_embed_proj_dim": 64}, "norms without affine": {"layer_norm_elementwise_affine": False}},
    "phi": {"partial rotary 0.25": {"partial_rotary_factor": 0.25}, "qk layernorm": {"qk_layernorm": True}},
    "bloom": {"post-norm residual": {"apply_residual_connection_post_layernorm": True}},
}
NO_SDPA = {"bloom"}  # transformers has no sdpa path for it
RECIPES = ("bf16-pure", "fp32", "amp-bf16")
ATTENTION = ("sdpa", "eager")
BATCH, SEQ = 2, 48


def saved(raw: dict, recipe: str, attention: str, activations: str) -> int:
    return estimated_saved_bytes(raw, recipe, BATCH, SEQ, attention=attention, activations=activations)[0]


class Comparison(NamedTuple):
    """The rules against the trace for one config, recipe and kernel: what the forward saves for backward
    (activations and loss), and the step's peak and its phase (the trace's: memcalc/measure/timeline.py, the real
    forward and backward op by op)."""

    rules_saved: int
    traced_saved: int
    rules_peak: int
    traced_peak: int
    rules_phase: str
    traced_phase: str

    @property
    def saved_error_pct(self) -> float:
        return 100 * (self.rules_saved - self.traced_saved) / self.traced_saved

    @property
    def peak_error_pct(self) -> float:
        return 100 * (self.rules_peak - self.traced_peak) / self.traced_peak

    @property
    def same_phase(self) -> bool:
        return self.rules_phase == self.traced_phase


def compare(raw: dict, recipe: str, attention: str, checkpointing: bool = False) -> Comparison:
    rules, by_rules = estimated_saved_bytes(raw, recipe, BATCH, SEQ, checkpointing, attention=attention,
                                            activations="rules")
    traced, by_trace = estimated_saved_bytes(raw, recipe, BATCH, SEQ, checkpointing, attention=attention,
                                             activations="trace")
    return Comparison(rules, traced, by_rules.per_gpu.peak_bytes, by_trace.per_gpu.peak_bytes,
                      by_rules.per_gpu.peak_phase.value, by_trace.per_gpu.peak_phase.value)


def _layer_norm_cases() -> Iterator[tuple[str, str, dict]]:
    for family, raw in LAYER_NORM.items():
        base = family.split("-")[0]
        toggles = {"default": {}, "dropout": dict.fromkeys(DROPOUT_KEYS[base], 0.1), "use_cache false": {"use_cache": False},
                   "tied head": {"tie_word_embeddings": True}, "untied head": {"tie_word_embeddings": False},
                   **LAYER_NORM_TOGGLES.get(family, {})}
        for name, toggle in toggles.items():
            yield family, name, {**raw, **toggle}


def cases(families: dict = FAMILIES, toggles: dict = TOGGLES, layer_norm: bool = True
          ) -> Iterator[tuple[str, str, dict]]:
    for family, (architecture, extra) in families.items():
        for name, toggle in toggles.items():
            if name == "softcaps off" and family != "gemma2":
                continue
            yield family, name, {"model_type": family, "architectures": [architecture], **BASE, **extra, **toggle}
    if layer_norm:
        yield from _layer_norm_cases()


CHECKPOINTED = "checkpointing full"  # a toggle of the step only (the saved bytes are the layers' inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the family x toggle tables")
    args = parser.parse_args()
    saved: dict[tuple[str, str], float] = {}
    peaks: dict[tuple[str, str], tuple[float, bool]] = {}
    compared = phases_differ = 0
    runs = [(family, toggle, raw, False) for family, toggle, raw in cases()]
    runs += [(family, CHECKPOINTED, raw, True) for family, toggle, raw in cases() if toggle == "default"]
    for family, toggle, raw, checkpointing in runs:
        for recipe in RECIPES:
            for attention in ATTENTION:
                if attention == "sdpa" and family in NO_SDPA:
                    continue
                found = compare(raw, recipe, attention, checkpointing)
                compared += 1
                phases_differ += not found.same_phase
                key = (family, toggle)
                if not checkpointing and abs(found.saved_error_pct) >= abs(saved.get(key, 0.0)):
                    saved[key] = found.saved_error_pct
                lowest, highest, same = peaks.get(key, (found.peak_error_pct, found.peak_error_pct, True))
                peaks[key] = (min(lowest, found.peak_error_pct), max(highest, found.peak_error_pct),
                              same and found.same_phase)
    low = min(error for error, _, _ in peaks.values())
    print(f"{compared} comparisons ({len(RECIPES)} recipes x sdpa and eager); saved bytes: worst |error| "
          f"{max(abs(e) for e in saved.values()):.2f}%; the step's peak: lowest {low:+.2f}%, highest "
          f"{max(error for _, error, _ in peaks.values()):+.2f}%, peak phase differs in {phases_differ}.")
    if args.markdown:
        toggles = list(TOGGLES)
        print("\nSaved for backward (activations and loss), worst error of the rules against the trace:")
        print("\n| RMSNorm family | " + " | ".join(toggles) + " |")
        print("|---|" + "---|" * len(toggles))
        for family in FAMILIES:
            cells = [f"{saved[(family, t)]:+.2f}%" if (family, t) in saved else "-" for t in toggles]
            print(f"| {family} | " + " | ".join(cells) + " |")
        print("\n| LayerNorm family | toggle: worst error |")
        print("|---|---|")
        for family in LAYER_NORM:
            cells = [f"{t} {e:+.2f}%" for (f, t), e in saved.items() if f == family]
            print(f"| {family} | " + "; ".join(cells) + " |")
        print("\nThe step's peak, the rules' lowest and highest error against the traced step over the recipes and "
              "kernels (**bold**: the peak phase differs in one of them):")
        toggles = [*toggles, CHECKPOINTED]
        print("\n| family | " + " | ".join(toggles) + " |")
        print("|---|" + "---|" * len(toggles))
        for family in [*FAMILIES, *LAYER_NORM]:
            cells = []
            for toggle in toggles:
                found = peaks.get((family, toggle))
                text = "-" if found is None else f"{found[0]:+.2f}% / {found[1]:+.2f}%"
                cells.append(text if found is None or found[2] else f"**{text}**")
            print(f"| {family} | " + " | ".join(cells) + " |")
        # The LayerNorm families' own toggles (not columns above): their step's peak too.
        print("\n| LayerNorm family | its own toggles: the step's peak, lowest / highest (**bold**: the phase differs) |")
        print("|---|---|")
        for family in LAYER_NORM:
            cells = []
            for (f, toggle), (lowest, highest, same) in peaks.items():
                if f == family and toggle not in toggles:
                    text = f"{lowest:+.2f}% / {highest:+.2f}%"
                    cells.append(f"{toggle} {text if same else f'**{text}**'}")
            print(f"| {family} | " + "; ".join(cells) + " |")
    else:
        for (family, toggle), error in sorted(saved.items()):
            low_peak, high_peak, same = peaks[(family, toggle)]
            print(f"{family:18s} {toggle:22s} saved {error:+.2f}%  peak {low_peak:+.2f}% to {high_peak:+.2f}%"
                  f"{'' if same else ' (phase)'}")


if __name__ == "__main__":
    main()
