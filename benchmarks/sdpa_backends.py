"""Which kernel torch's scaled_dot_product_attention picks on this CUDA GPU, and what its forward keeps for backward.

    python benchmarks/sdpa_backends.py [--out FILE]

transformers' sdpa attention (integrations/sdpa_attention.py) calls torch's scaled_dot_product_attention with
``is_causal`` and, with no mask, ``enable_gqa`` (grouped key/value heads not repeated). Which kernel runs then depends on
the dtype, the card and the torch build (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, select_sdp_backend):
flash and cuDNN keep the output and a log-sum-exp, the math fallback keeps the s x s probabilities. For each dtype and
head layout this prints, per backend, whether it accepts the call and the bytes its forward keeps beyond the output
(memory allocated after the forward, the output and inputs excluded), and the same for the default choice; the backend
whose bytes the default's match is the one that ran. One GPU second; needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def probe(batch: int = 2, heads: int = 8, kv_heads: int = 4, seq: int = 256, head_dim: int = 32) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for kv in (heads, kv_heads):
            gqa = kv != heads
            q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(batch, kv, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(batch, kv, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            kept = {}
            for name, backend in [*backends.items(), ("default", None)]:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                try:
                    if backend is None:
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                    else:
                        with sdpa_kernel(backend):
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                    torch.cuda.synchronize()
                    kept[name] = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
                    del out
                except RuntimeError as error:
                    kept[name] = f"refused ({' '.join(str(error).split())[:60]})"
            ran = [name for name in backends if kept[name] == kept["default"]]
            rows.append({"dtype": str(dtype).removeprefix("torch."), "heads": heads, "kv_heads": kv,
                         "shape": f"b{batch} s{seq} d{head_dim}", **kept, "ran": "/".join(ran) or "?"})
    return rows


def markdown(rows: list[dict], env: str) -> str:
    keys = ["dtype", "heads", "kv_heads", "shape", "flash", "efficient", "cudnn", "math", "default", "ran"]
    lines = [f"SDPA on {env}: bytes each forward keeps beyond its output", "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("sdpa_backends: no CUDA GPU here; nothing was measured", file=sys.stderr)
        return 1
    env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    text = markdown(probe(), env)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
