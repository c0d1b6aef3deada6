"""Start-up cost of the estimate path against importing its three dependencies.

    python benchmarks/startup.py [--runs 15]

Prints the median wall time of `memcalc llama-3-8b --precision bf16 --optim adamw` (the installed console
script, a fresh interpreter) and of `python -c "import typer, pydantic, rich"`, and their
ratio. The target is a ratio <= 1.5 (issue: the estimate must start about as fast as its imports).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

BASELINE = [sys.executable, "-c", "import typer, pydantic, rich"]
# The installed console script, as a user runs it (python -m memcalc adds runpy's cost).
_SCRIPT = shutil.which("memcalc", path=os.path.dirname(sys.executable))
ESTIMATE = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "memcalc"]
ESTIMATE += ["llama-3-8b", "--precision", "bf16", "--optim", "adamw"]


# An installed package has its bytecode cached (pip compiles on install, Python writes __pycache__ on first
# import). This sandbox sets PYTHONDONTWRITEBYTECODE=1, which would recompile memcalc on every start; the
# benchmark measures the normal case.
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, env=ENV)
    return time.perf_counter() - start


def medians(runs: int) -> tuple[float, float]:
    """Interleaved runs, so that drifting machine load hits both commands alike."""
    seconds(BASELINE), seconds(ESTIMATE)  # warm the file cache and __pycache__
    pairs = [(seconds(BASELINE), seconds(ESTIMATE)) for _ in range(runs)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    baseline, estimate = medians(args.runs)
    print(f"import typer, pydantic, rich : {baseline * 1000:7.1f} ms (median of {args.runs})")
    print(f"memcalc llama-3-8b ...       : {estimate * 1000:7.1f} ms (median of {args.runs})")
    print(f"ratio                        : {estimate / baseline:7.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
