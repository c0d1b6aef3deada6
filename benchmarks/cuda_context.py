"""The CUDA context memcalc's fit deducts for each GPU preset, and the published bare contexts its estimate for
unmeasured generations rests on (memcalc.fit.cuda_context_for).

    python benchmarks/cuda_context.py     # two markdown tables for docs/accuracy.md

First table: each published bare context (a process's first CUDA call, no kernel launched) beside what the per-thread
rule gives for that card (its SMs x resident threads per SM x memcalc.fit.BYTES_PER_RESIDENT_THREAD, the largest of the
readings' per-thread figures). Second: each preset's context as the fit takes it, with CUDA_MODULE_LOADING unset
(lazy) and EAGER.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc.catalog import gpu_presets
from memcalc.fit import BYTES_PER_RESIDENT_THREAD, PUBLISHED_BARE_CONTEXTS, cuda_context_for

MIB = 2**20


def main() -> int:
    print("| card | SMs x resident threads | published bare context | per thread | the rule's bare part | error | "
          "source |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for card, sms, threads, mib, source in PUBLISHED_BARE_CONTEXTS:
        rule = sms * threads * BYTES_PER_RESIDENT_THREAD
        print(f"| {card} | {sms} x {threads:,} | {mib} MiB | {mib * MIB / (sms * threads):,.0f} B | {rule / MIB:,.0f} "
              f"MiB | {100 * (rule / (mib * MIB) - 1):+.1f}% | {source} |")
    print("\n| preset | compute capability | SMs | context (lazy) | context (CUDA_MODULE_LOADING=EAGER) | source |")
    print("|---|---|---:|---:|---:|---|")
    for gpu in gpu_presets():
        lazy, source = cuda_context_for(gpu.compute_capability, gpu.sms)
        eager, _eager_source = cuda_context_for(gpu.compute_capability, gpu.sms, "EAGER")
        print(f"| {gpu.name} | {gpu.compute_capability} | {gpu.sms or '-'} | {lazy / MIB:,.0f} MiB | "
              f"{eager / MIB:,.0f} MiB | {source.split(':')[0]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
