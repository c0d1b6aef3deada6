"""--compile against real torch.compile'd CPU steps: the table behind docs/accuracy.md's "torch.compile" section.

    python benchmarks/compile.py [--quick] [--chunked]

(--chunked: the same cells with torchtune's chunked loss over a vocabulary of 16,384, its per-chunk cross-entropy
compiled as torchtune's compile_loss compiles it.)

Each cell: a small config (hidden 512, 3 layers, batch 4 x seq 512), each decoder layer compiled with Inductor as
torchtune does (``layer.compile()``, after checkpointing is enabled), one warm-up step (the compilation), then one
forward and backward. Inductor's kernels allocate outside PyTorch's dispatcher, where memcalc's tracker cannot see
them, so the step is measured by the process's resident memory: glibc told to serve every allocation above 64 KiB
by mmap and return it on free (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), the peak (VmHWM, reset
through /proc/self/clear_refs) less the resident memory before the step (weights, batch; no optimizer). On the same
cells run eagerly that measure is within 0.2% of memcalc's tracker (printed as the "eager" column).

The estimate is memcalc's traced step with --compile (memcalc.measure.compiled: AOTAutograd with Inductor's
decompositions and partition_fn, fused intermediates not held) under the CPU's semantics, less the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.tiny import tiny_raw

SHAPE = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4,
         "num_hidden_layers": 3, "vocab_size": 128}
BATCH, SEQ = 4, 512
CHUNKS = 4  # --chunked: torchtune's chunked loss, each chunk's cross-entropy compiled (compile_loss) ...
CHUNKED_VOCAB = 16384  # ... over a vocabulary large enough for the loss to matter
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}

# One step measured in a fresh process: {"forward": bytes, "backward": bytes} above the resident memory before it.
MEASURE = r"""
import json, sys, torch
from memcalc.measure import build
raw, recipe, checkpointing, compiled, chunks = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)
dtype = {"bf16-pure": torch.bfloat16, "fp32": torch.float32, "amp-bf16": torch.float32}[recipe]
model = build.build_model(raw, dtype=dtype, attn_implementation="sdpa")
model.config.use_cache = False
if checkpointing:
    model.gradient_checkpointing_enable()
model.train()
if compiled:
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)),
                 key=lambda ml: sum(p.numel() for p in ml.parameters()))
    for layer in layers:
        layer.compile()
ids = torch.randint(0, raw["vocab_size"], (BATCH, SEQ))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

from memcalc.measure.step import _chunk_cross_entropy
entropy = torch.compile(_chunk_cross_entropy) if compiled else _chunk_cross_entropy  # torchtune's compile_loss

def chunked_loss():
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    logits = [model.get_output_embeddings()(chunk) for chunk in hidden.chunk(chunks, dim=1)]
    del hidden
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]
    total = sum(entropy(c, t.contiguous()) for c, t in zip(logits, labels.chunk(chunks, dim=1)))
    del logits
    return total / (labels != -100).sum()

def step(measure):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "amp-bf16"):
        if measure:
            open("/proc/self/clear_refs", "w").write("5")
        loss = chunked_loss() if chunks else model(input_ids=ids, labels=ids).loss
    forward = status("VmHWM")
    loss.backward()
    del loss
    backward = status("VmHWM")
    for p in model.parameters():
        p.grad = None
    return forward, backward

step(False)
step(False)
import gc; gc.collect()
base = status("VmRSS")
forward, backward = step(True)
print(json.dumps({"forward": forward - base, "backward": max(forward, backward) - base}))
""".replace("BATCH", str(BATCH)).replace("SEQ", str(SEQ))


def measured(raw: dict, recipe: str, checkpointing: bool, compiled: bool, chunks: int = 0) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([raw, recipe, checkpointing, compiled, chunks])],
                         capture_output=True, text=True, env={**os.environ, **ENV}, cwd=HERE.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimated(raw: dict, recipe: str, checkpointing: bool, chunks: int = 0) -> dict[str, int]:
    from memcalc.api import model_of, run
    from memcalc.measure import derive
    from memcalc.model import ModelConfig
    from memcalc.spec import TrainingSpec

    spec = TrainingSpec(precision=recipe, micro_batch_size=BATCH, seq_len=SEQ, compile=True,
                        checkpointing="full" if checkpointing else "none",
                        loss=f"chunked:{chunks}" if chunks else "standard")
    with derive.semantics("cpu"):
        report = run(model_of(ModelConfig("bench", raw, "benchmark")), spec)
    states = sum(t.bytes for t in report.per_gpu.terms if t.name in ("weights", "optimizer_states", "master_weights"))
    return {p.phase.value: p.bytes - states for p in report.per_gpu.phases[:2]}


def main() -> int:
    quick = "--quick" in sys.argv
    families = ("llama",) if quick else ("llama", "qwen2", "mistral", "gemma")
    recipes = ("bf16-pure",) if quick else ("bf16-pure", "amp-bf16")
    losses = (CHUNKS,) if "--chunked" in sys.argv else (0,)
    print("| family | recipe | checkpointing | loss | phase | estimate (--compile) | compiled step | error | eager step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in families:
        raw = {**tiny_raw(family), **SHAPE, "use_cache": False}
        for recipe in recipes:
            for checkpointing in (False, True):
                for chunks in losses:
                    cell = {**raw, "vocab_size": CHUNKED_VOCAB} if chunks else raw
                    estimate = estimated(cell, recipe, checkpointing, chunks)
                    real = measured(cell, recipe, checkpointing, True, chunks)
                    eager = measured(cell, recipe, checkpointing, False, chunks)
                    loss = f"chunked:{chunks}" if chunks else "standard"
                    for phase in ("forward", "backward"):
                        error = (estimate[phase] - real[phase]) / real[phase] * 100
                        print(f"| {family} | {recipe} | {'full' if checkpointing else 'none'} | {loss} | {phase} | "
                              f"{estimate[phase]:,} | {real[phase]:,} | {error:+.2f}% | {eager[phase]:,} |",
                              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
