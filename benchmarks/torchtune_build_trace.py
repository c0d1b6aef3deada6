"""torchtune 0914d5cfb's QLoRA run (the QLoRA tutorial's; benchmarks/gpu-runs/2026-12-04-h200-d/tt0914.json ran it
on an H200) replayed: its build and load (memcalc.measure.torchtune_build) and its steps, traced with torchao 0.1 as
the run had it, through the caching allocator with the H200's cuBLAS workspaces (made as the step begins, as --reserved places them). Prints the replay beside the H200's
reserved after the build, after init and over the steps; ``--save`` keeps the trace beside the run
(tt0914-trace-events.json.gz, which tests/test_torchtune_build.py replays).

    pip install --no-deps --target /tmp/ao01 torchao==0.1
    PYTHONPATH=/tmp/ao01 python benchmarks/torchtune_build_trace.py [--save]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from reserved import TORCHTUNE_QLORA, _torchao_version

from memcalc import api
from memcalc.allocator import cublas_workspace_bytes, replay
from memcalc.measure import torchtune_build
from memcalc.measure.reserved import step_allocations, with_workspaces

RUN = HERE / "gpu-runs" / "2026-12-04-h200-d"
H200_COMPUTE_CAPABILITY = "9.0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", action="store_true", help="keep the trace beside the H200 run")
    args = parser.parse_args()
    torchao = _torchao_version()
    measured = json.loads((RUN / "tt0914.json").read_text())
    plan = api.plan_of("llama-2-7b", **TORCHTUNE_QLORA)
    with torchtune_build.releases_before_0_3():
        allocations, _cached = step_allocations(plan.model.config.raw, plan.specs[0])
    workspace = cublas_workspace_bytes(H200_COMPUTE_CAPABILITY)
    after_build_and_load = replay(allocations.events[:allocations.loaded])
    steps = replay(with_workspaces(allocations, workspace))  # (as --reserved --gpu h200 replays it)
    gpu_steps = max(step["max_reserved"] for step in measured["steps"])
    print(f"torchtune 0914d5cfb's QLoRA build, load and steps, replayed with torchao {torchao} "
          f"({len(allocations.events):,} allocations and frees; {allocations.loaded:,} of them the build and load)")
    print("| moment | H200 (tt0914.json) | replay | error |\n|---|---:|---:|---:|")
    # (on the H200 the load added no segment: reserved after the build is reserved after init)
    for moment, gpu, ours in (("reserved after init (built, the checkpoint loaded)", measured["after_init"]["reserved"],
                               after_build_and_load.reserved_peak_bytes),
                              ("peak reserved over three steps", gpu_steps, steps.reserved_peak_bytes)):
        print(f"| {moment} | {gpu:,} B | {ours:,} B | {100 * (ours - gpu) / gpu:+.3f}% |")
    if args.save:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE.parent, check=False).stdout.strip()
        kept = {"label": "torchtune 0914d5cfb QLoRA (tt0914.json)", "torchao": torchao, "memcalc_commit": commit,
                "loaded": allocations.loaded, "step": allocations.step, "cublas_workspace_bytes": workspace,
                "events": [list(e) for e in allocations.events]}
        path = RUN / "tt0914-trace-events.json.gz"
        with gzip.open(path, "wt") as handle:
            json.dump(kept, handle, separators=(",", ":"))
        print(f"kept: {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
