"""--padded against real CPU steps of padded batches: the table behind docs/accuracy.md's "Padded batches" section.

    python benchmarks/padded.py

Each hand-modelled decoder family of tests/tiny.py (2 layers, batch 2 x seq 128; Gemma-3 with a 64-token window, so
its sliding and full layers get two masks) in three recipes, the LayerNorm decoders whose rules count no mask (traced,
padded) and OLMo-2 (no rules: traced) in two, and LoRA on Llama (its step traced), the batch's last row half padding
(memcalc.measure.step make_batch), measured by memcalc's tracker (--verify cpu-tracker); printed: the estimate's error
per phase and at the peak, and the same cells unpadded for comparison.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc.api import verify
from tests.test_traced import WITHOUT_RULES
from tests.tiny import FAMILIES, GEMMA3, GPT2, LAYER_NORM_FAMILIES, tiny_raw

RECIPES = ({"precision": "bf16-pure"}, {"precision": "amp-bf16", "checkpointing": "full"}, {"precision": "fp32"})
TRACED_RECIPES = RECIPES[:2]


def errors(path: str, padded: bool, settings: dict) -> dict[str, float]:
    report = verify(path, "cpu-tracker", batch_size=2, seq_len=128, padded=padded, **settings)
    return {row.term: row.error_pct for row in report.verify.rows
            if row.error_pct is not None and (row.term == "peak" or row.term.startswith("phase:"))}


def main() -> None:
    configs = {**{name: (tiny_raw(name), RECIPES) for name in FAMILIES},
               "gemma3 (window 64)": ({**GEMMA3, "sliding_window": 64}, RECIPES),
               "gpt2 (traced)": (GPT2, TRACED_RECIPES),
               **{f"{name} (traced)": (LAYER_NORM_FAMILIES[name][0], TRACED_RECIPES) for name in ("opt", "phi", "falcon")},
               "olmo2 (traced)": ({"model_type": "olmo2", **WITHOUT_RULES["olmo2"]}, TRACED_RECIPES),
               "llama LoRA r8": (tiny_raw("llama"), ({"precision": "amp-bf16", "lora_rank": 8},
                                                    {"precision": "bf16-pure", "lora_rank": 8, "checkpointing": "full"}))}
    print("| config | recipe | forward | backward | optimizer step | peak | peak unpadded |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (raw, recipes) in configs.items():
            path = Path(folder) / f"{name.split()[0]}.json"
            path.write_text(json.dumps(raw))
            for settings in recipes:
                padded, plain = errors(str(path), True, settings), errors(str(path), False, settings)
                recipe = settings["precision"] + (" ckpt" if "checkpointing" in settings else "")
                cells = [f"{padded[f'phase:{p}']:+.2f}%" for p in ("forward", "backward", "optimizer_step")]
                print(f"| {name} | {recipe} | {' | '.join(cells)} | {padded['peak']:+.2f}% | {plain['peak']:+.2f}% |",
                      flush=True)


if __name__ == "__main__":
    main()
