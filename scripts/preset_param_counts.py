"""Print a markdown table of parameter counts for every model preset.

Each preset in presets/models/*.json is built by memcalc.measure.build (keys starting with "_"
are memcalc metadata and are dropped; only model classes of the config's model_type), the class
named in ``architectures[0]`` on the meta device (no memory is allocated, nothing is downloaded, no remote code),
and its parameters are counted. memcalc's own pure-Python inventory count is shown beside it
(they must be equal), and ``_published_num_params`` when the preset has one.

Usage: python scripts/preset_param_counts.py [PRESET_DIR]
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "presets" / "models"


def count_params(raw: dict) -> int:
    from memcalc.measure.build import build_meta_model  # the one builder memcalc uses everywhere

    return sum(p.numel() for p in build_meta_model(raw).parameters())


def main(argv: list[str]) -> int:
    preset_dir = Path(argv[1]) if len(argv) > 1 else DEFAULT_DIR
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    rows = []
    failures = 0
    seen_names: dict[str, str] = {}
    for path in sorted(preset_dir.glob("*.json")):
        raw = json.loads(path.read_text())
        name = path.stem
        for alias in [name, *raw.get("_aliases", [])]:
            key = alias.strip().lower().replace("_", "-").replace(" ", "-")  # as memcalc looks names up
            if key in seen_names and seen_names[key] != name:
                print(f"duplicate alias {alias!r}: {seen_names[key]} and {name}", file=sys.stderr)
                failures += 1
            seen_names[key] = name
        published = raw.get("_published_num_params")
        from memcalc.families import inventory as build_inventory
        from memcalc.model import ModelConfig

        ours = sum(t.numel for t in build_inventory(ModelConfig(name=name, raw=raw, source=str(path))))
        try:
            n = count_params(raw)
            count = f"{n:,}"
            if n != ours:
                failures += 1
            if published:
                diff = (n - published) / published * 100
                match = "exact" if n == published else f"{diff:+.3f}%"
            else:
                match = ""
        except Exception as exc:  # report and keep going
            failures += 1
            count, match = f"ERROR: {type(exc).__name__}: {exc}", ""
        rows.append((name, raw.get("model_type", ""), raw["architectures"][0], f"{ours:,}", count,
                     "yes" if count == f"{ours:,}" else "NO", f"{published:,}" if published else "", match))

    header = ("preset", "model_type", "architecture", "memcalc inventory", "transformers (meta device)", "equal",
              "published", "vs published")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
