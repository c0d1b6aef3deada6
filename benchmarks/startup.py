"""Start-up cost of the estimate path against importing its three dependencies.

    python benchmarks/startup.py [--runs 15]

Prints the median wall time of `memcalc llama-3-8b --precision bf16 --optim adamw` (the installed console
script's module, run as a fresh interpreter) and of `python -c "import typer, pydantic, rich"`, and their
ratio. The target is a ratio <= 1.5 (issue: the estimate must start about as fast as its imports).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

BASELINE = [sys.executable, "-c", "import typer, pydantic, rich"]
ESTIMATE = [sys.executable, "-m", "memcalc", "llama-3-8b", "--precision", "bf16", "--optim", "adamw"]


# An installed package has its bytecode cached (pip compiles on install, Python writes __pycache__ on first
# import). This sandbox sets PYTHONDONTWRITEBYTECODE=1, which would recompile memcalc on every start; the
# benchmark measures the normal case.
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def median_seconds(command: list[str], runs: int) -> float:
    subprocess.run(command, capture_output=True, check=True, env=ENV)  # warm the file cache and __pycache__
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=ENV)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    baseline = median_seconds(BASELINE, args.runs)
    estimate = median_seconds(ESTIMATE, args.runs)
    print(f"import typer, pydantic, rich : {baseline * 1000:7.1f} ms (median of {args.runs})")
    print(f"memcalc llama-3-8b ...       : {estimate * 1000:7.1f} ms (median of {args.runs})")
    print(f"ratio                        : {estimate / baseline:7.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
