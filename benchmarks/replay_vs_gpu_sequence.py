"""A kept GPU row's tracked allocation sequence beside the trace of the same configuration, both replayed through
memcalc.allocator: whether a reserved-memory miss comes from the allocations (what the trace makes) or from the
allocator model (what it reserves for them).

    python benchmarks/replay_vs_gpu_sequence.py benchmarks/gpu-runs/2026-12-04-h200-d/eager-s8192/events.jsonl.gz
    ... --save    # also keep the trace's sequence beside the row (trace-events.json.gz, read by segment_order.py)

The row's label says the configuration (gpu_validation.py's preset rows). Printed: the first place the two sequences'
allocations and frees of at least 1 GiB differ, and each sequence's replayed reserved peak. The trace runs at full
size on this CPU (a minute or two for the 8192-token row; cached afterwards).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_validation import PARTS, cases

from memcalc.allocator import ALLOC, parse_alloc_conf, replay
from memcalc.catalog import presets_dir
from memcalc.measure.reserved import step_allocations

LARGE = 2**30


def _large(events: list[tuple[int, int, int]]) -> list[tuple[str, int]]:
    sizes: dict[int, int] = {}
    out = []
    for kind, key, size in events:
        if kind == ALLOC and size >= LARGE:
            sizes[key] = size
            out.append(("alloc", size))
        elif kind != ALLOC and key in sizes:
            out.append(("free", sizes.pop(key)))
    return out


def main() -> int:
    path = Path(sys.argv[1])
    save = "--save" in sys.argv[2:]
    with gzip.open(path, "rt") as handle:
        row = json.loads(handle.readline())
    case = next(c for c in cases(parts=PARTS) if c.label == row["label"])
    raw = (json.loads((presets_dir() / "models" / f"{case.model}.json").read_text()) if isinstance(case.model, str)
           else case.model)
    attention = case.spec.attention.value
    traced, _ = step_allocations(raw, case.spec, "sdpa" if attention == "flash" else attention)
    gpu = [tuple(e) for e in row["events"]]
    ours = list(traced.events)
    if save:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        kept = {"label": row["label"], "memcalc_commit": commit, "versions": dict(traced.versions),
                "source": "memcalc.measure.reserved.step_allocations, as --reserved traces the row",
                "events": ours}
        with gzip.open(path.parent / "trace-events.json.gz", "wt") as handle:
            json.dump(kept, handle, separators=(",", ":"))
    theirs, mine = _large(gpu), _large(ours)
    first = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), None)
    print(f"{row['label']}: {len(theirs)} large events on the GPU, {len(mine)} in the trace")
    if first is not None:
        print(f"first difference at large event {first}:\n  GPU   {theirs[first:first + 8]}\n  trace {mine[first:first + 8]}")
    conf = parse_alloc_conf("")
    for name, events in (("the GPU's tracked allocations", gpu), ("the trace's", ours)):
        result = replay(events, conf)
        print(f"{name} replayed: reserved {result.reserved_peak_bytes / 2**30:.2f} GiB, requested "
              f"{result.requested_peak_bytes / 2**30:.2f} GiB, {result.segments_peak} segments")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
