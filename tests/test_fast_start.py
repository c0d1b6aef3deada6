"""The estimate path imports neither torch nor transformers (a subprocess, so this process's imports don't count)."""

from __future__ import annotations

import subprocess
import sys

# pydantic.main (BaseModel) and typer._adapters (typer >= 0.29 builds pydantic adapters per option) each
# cost ~80 ms of start-up; benchmarks/startup.py measures the whole.
HEAVY = ("torch", "transformers", "huggingface_hub", "bitsandbytes", "peft", "numpy", "pydantic.main", "typer._adapters")

PROBE = """
import io, sys, contextlib
from memcalc.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(['llama-3-8b', '--precision', 'bf16', '--optim', 'adamw']),
             main(['llama-3-8b', '--json', '--zero', '0,1,2,3', '--gpus', '8', '--gpu', 'h100-80gb']),
             main(['mixtral-8x7b', '--lora-rank', '16', '--qlora', '--explain']),
             main(['presets'])]
loaded = [name for name in {heavy!r} if name in sys.modules]
print(codes, loaded)
"""


def test_estimate_path_imports_no_torch_or_transformers():
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True, check=True)
    codes, loaded = out.stdout.strip().rsplit("] [", 1)
    assert loaded == "]", f"heavy modules imported on the estimate path: [{loaded}"
    assert codes.startswith("[0, 6, 0, 0"), out.stdout


def test_importing_the_package_is_light():
    probe = "import sys, memcalc, memcalc.cli, memcalc.api, memcalc.measure; print(sorted(m for m in {h!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe.format(h=HEAVY)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
