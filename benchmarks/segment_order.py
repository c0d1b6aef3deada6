"""Where cudaMalloc puts a new segment, and what it does to the reserved peak: every kept GPU row's own tracked
allocations (benchmarks/gpu-runs/*/events.jsonl.gz) replayed through memcalc.allocator with each new segment below the
earlier ones (memcalc's placement, read from the H200's snapshots) and above them (the placement it assumed before),
beside the reserved peak the GPU measured.

    python benchmarks/segment_order.py            # a markdown table; --all adds the small models' rows

The placement only decides ties: of two cached blocks of one size the allocator takes the one at the lower address
(c10/cuda/CUDACachingAllocator.cpp, BlockComparatorSize). A row's tracked allocations lack what kernels allocate
inside one op (CUDA's softmax backward makes a temporary the size of its input), so the eager rows are also replayed
from the trace memcalc's --reserved makes of them, where one is kept (trace-events.json.gz, written by
benchmarks/replay_vs_gpu_sequence.py --save).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_validation import held_beyond_workspaces, kept_traces, replay_measured
from memcalc.allocator import CUBLAS_HANDLES_PER_STEP

RUNS = Path(__file__).resolve().parent / "gpu-runs"
GIB = 2**30
LARGE = 2 * GIB  # rows whose reserved peak is at least this: the full-size models


def kept_rows(runs: Path = RUNS, min_reserved: int = 0, run: str | None = None) -> list[dict]:
    """Each (label, measured reserved) once, of at least ``min_reserved`` bytes (and of the one ``run`` folder, if
    named): the row's tracked events, its workspaces and where it was kept."""
    rows, seen = [], set()
    for events_path in sorted(runs.glob("**/events.jsonl.gz")):
        if run is not None and events_path.parent != runs / run:
            continue
        by_label = {r["label"]: r for r in json.loads((events_path.parent / "rows.json").read_text())["rows"]}
        with gzip.open(events_path, "rt") as handle:
            for line in handle:
                label = json.loads(line[:line.index(', "events"')] + "}")["label"]  # (the events parsed if kept)
                row = by_label.get(label)
                if (not row or (row.get("reserved_bytes") or 0) < max(min_reserved, 1)
                        or (label, row["reserved_bytes"]) in seen):
                    continue
                seen.add((label, row["reserved_bytes"]))
                data = json.loads(line)
                rows.append({"label": data["label"], "events": [tuple(e) for e in data["events"]],
                             "reserved": row["reserved_bytes"], "workspace": row.get("workspace_bytes") or 0,
                             "held": held_beyond_workspaces(row.get("allocated_at_start_bytes"),
                                                            row.get("workspace_bytes")),
                             "run": str(events_path.parent.relative_to(runs)),
                             "trace": kept_traces(events_path.parent).get(label)})
    return rows


def replayed(events: list[tuple[int, int, int]], label: str, workspace: int, held: int, segments_below: bool) -> int:
    """The reserved peak of ``events`` replayed as gpu_validation replays a row (``workspace``: the row's cuBLAS
    workspaces together; ``held``: what its process held beyond them when it began)."""
    per_handle = workspace // CUBLAS_HANDLES_PER_STEP if workspace else None
    return replay_measured(events, label, per_handle, held, segments_below).reserved_peak_bytes


def pct(value: int, measured: int) -> str:
    return f"{100 * (value / measured - 1):+.2f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="the small models' rows too")
    args = parser.parse_args(argv)
    print("| run | configuration | reserved (GPU) | segments below | error | segments above | error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    errors: dict[bool, list[float]] = {True: [], False: []}
    for row in kept_rows(min_reserved=0 if args.all else LARGE):
        sources = [("tracked", row["events"])] + ([("trace", row["trace"])] if row["trace"] else [])
        for source, events in sources:
            below, above = (replayed(events, row["label"], row["workspace"], row["held"], flag)
                            for flag in (True, False))
            if source == sources[-1][0]:  # (the summary counts a row once: its trace where one is kept)
                for flag, value in ((True, below), (False, above)):
                    errors[flag].append(abs(100 * (value / row["reserved"] - 1)))
            print(f"| {row['run']} | {row['label']} ({source}) | {row['reserved'] / GIB:.3f} GiB | "
                  f"{below / GIB:.3f} GiB | {pct(below, row['reserved'])} | {above / GIB:.3f} GiB | "
                  f"{pct(above, row['reserved'])} |")
    for flag, name in ((True, "below"), (False, "above")):
        values = sorted(errors[flag])
        print(f"\nsegments {name}: {len(values)} rows, median |error| {values[len(values) // 2]:.2f}%, "
              f"worst {values[-1]:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
