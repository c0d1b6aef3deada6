"""torchao's low-bit AdamW steps, compiled as torchao always runs them, beside memcalc's step-temporaries rule.

    python benchmarks/torchao_optim.py       # a markdown table for docs/accuracy.md (needs torch, torchao, a C++ compiler)

torchao.optim's ``_AdamBase.step`` runs ``single_param_adam`` through ``torch.compile`` for each tensor; what its
compiled code keeps beside the states is Inductor's. Each cell steps one tensor in a fresh process: two warm-up steps
(the first compiles; Inductor's C++ kernels built by this machine's compiler), then one step measured by the process's
resident memory (with ``MALLOC_MMAP_THRESHOLD_=65536`` glibc serves every allocation above 64 KiB by mmap and returns
it on free, so freed buffers leave the count as a caching allocator's free blocks leave allocated bytes; the peak
reset through ``/proc/self/clear_refs``), less what is resident before it. The estimate is memcalc's ``step_temporary_bytes`` for
that tensor. Inductor on CUDA schedules Triton kernels, which may fuse differently: not measured (no GPU lent).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc.optimizers import OptimImpl, OptimizerName, OptimizerSettings, step_temporary_bytes
from memcalc.precision import Dtype

# (name, torchao class); shapes: a large matrix, and one whose states torchao leaves plain (not a multiple of the
# block: torch.zeros_like(p)).
OPTIMIZERS = (("torchao-adamw-8bit", "AdamW8bit"), ("torchao-adamw-4bit", "AdamW4bit"))
SHAPES = ((8192, 4096), (16385, 1001))
DTYPES = (("bfloat16", Dtype.bf16), ("float32", Dtype.fp32))

CHILD = """
import re, sys, warnings
warnings.filterwarnings("ignore")
import torch, torchao.optim as optim
rows, cols, dtype, cls = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), getattr(optim, sys.argv[4])
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
p = torch.nn.Parameter(torch.randn(rows, cols, dtype=dtype))
p.grad = torch.randn_like(p)
optimizer = cls([p], lr=1e-3)
for _ in range(2):
    optimizer.step()
resting = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
optimizer.step()
print(status("VmHWM") - resting)
"""


def measured(shape: tuple[int, int], dtype: str, cls: str) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, str(shape[0]), str(shape[1]), dtype, cls],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return int(result.stdout.split()[-1])


def main() -> None:
    print("| optimizer | parameter | tensor | estimate (B) | compiled step (B) | B per element | error |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, cls in OPTIMIZERS:
        settings = OptimizerSettings(name=OptimizerName(name), impl=OptimImpl.fused)
        for dtype, memcalc_dtype in DTYPES:
            for shape in SHAPES:
                estimate, _ = step_temporary_bytes([shape], settings, memcalc_dtype, memcalc_dtype)
                step = measured(shape, dtype, cls)
                numel = shape[0] * shape[1]
                # a page or two of noise either way: the error is against the tensor's size where nothing is kept
                error = f"{100 * (estimate - step) / step:+.2f}%" if estimate else f"{step / numel:.3f} B/element"
                print(f"| {name} | {dtype} | {shape[0]} x {shape[1]} | {estimate:,} | {step:,} | "
                      f"{step / numel:.2f} | {error} |", flush=True)


if __name__ == "__main__":
    main()
