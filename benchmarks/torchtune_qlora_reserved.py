"""torchtune's QLoRA recipe on a CUDA GPU: what the caching allocator holds after the model's build and load, and its
peaks over a few steps: the measurement behind docs/accuracy.md's torchtune QLoRA reserved row.

    PYTHONPATH=<torchao>:<torchtune source> python benchmarks/torchtune_qlora_reserved.py --out run.json

It runs torchtune's own code (the source given on PYTHONPATH; its data modules stood in for by
benchmarks/torchtune_standin.py) the way ``recipes/lora_finetune_single_device.py`` ``_setup_model`` sets the model
up (torchtune ff594c231/0914d5cfb, the tutorials' commits, and bd2a0fc alike):
  - the builder under the default dtype bf16 and the device as the default device: ``qlora_llama2_7b`` with
    7B_qlora_single_device.yaml's LoRA (q, k, v, output_proj and the MLP, rank 8, alpha 16), so each LoRALinear
    makes its bf16 weight on the GPU and quantizes it there (``to_nf4``);
  - the adapters trainable, every decoder layer checkpointed;
  - ``model.load_state_dict`` of a bf16 state dict on the host (the checkpointer's), strict=False: each NF4
    weight's copy_ moves the host tensor to the GPU and quantizes it again.
Then ``--steps`` steps of the recipe's loop (batch 2 x ``--seq`` tokens, the logits shifted and made contiguous, torch's
CrossEntropyLoss over the transposed logits, backward, AdamW lr 3e-4 weight decay 0.01, zero_grad(set_to_none=True)).
The checkpoint's values are a constant (the memory does not depend on them).

Recorded (JSON): torch's and torchao's versions, the GPU, the allocator's reserved and allocated bytes and their peaks
(reset after each reading: each phase's own) after the build, after the load (reserved then is "after init", what the
recipe logs: its peak reserved over the build and load) and after each step, and the segments the
allocator holds after init (their sizes and the blocks' sizes, free or not).

``--device cpu --size tiny`` runs the same code on a small model without statistics (a check that it runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torchtune_standin

from memcalc.measure.build import default_dtype

# 7B_qlora_single_device.yaml's model section
LORA = {"lora_attn_modules": ["q_proj", "v_proj", "k_proj", "output_proj"], "apply_lora_to_mlp": True,
        "apply_lora_to_output": False, "lora_rank": 8, "lora_alpha": 16}
TINY = {"vocab_size": 512, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "embed_dim": 256,
        "intermediate_dim": 512, "max_seq_len": 128}


def _memory(torch, device) -> dict:
    """The allocator's reserved and allocated bytes now and their peaks since the last reading (peaks reset)."""
    if device.type != "cuda":
        return {}
    found = {"reserved": torch.cuda.memory_reserved(), "max_reserved": torch.cuda.max_memory_reserved(),
             "allocated": torch.cuda.memory_allocated(), "max_allocated": torch.cuda.max_memory_allocated()}
    torch.cuda.reset_peak_memory_stats()
    return found


def _segments(torch, device) -> list:
    if device.type != "cuda":
        return []
    return [{"size": s["total_size"], "pool": s["segment_type"],
             "blocks": [[b["size"], b["state"]] for b in s["blocks"]]} for s in torch.cuda.memory_snapshot()]


def _checkpointing(model) -> str:
    from torchtune import modules

    layer = getattr(modules, "TransformerSelfAttentionLayer", None) or modules.TransformerDecoderLayer
    try:
        from torchtune.training import set_activation_checkpointing
    except ImportError:
        from torchtune.utils import set_activation_checkpointing
    set_activation_checkpointing(model, auto_wrap_policy={layer})
    return layer.__name__


def run(device_name: str, size: str, steps: int, seq: int) -> dict:
    import torch
    from torchtune.models.llama2 import lora_llama2, qlora_llama2_7b
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    device = torch.device(device_name)
    started = time.perf_counter()
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "size": size, "batch": 2, "seq": seq, "lora": LORA}
    try:
        import torchao

        out["torchao"] = getattr(torchao, "__version__", "0.1 (no __version__)")
    except ImportError:
        out["torchao"] = None
    with default_dtype(torch.bfloat16), device:
        model = (qlora_llama2_7b(**LORA) if size == "7b"
                 else lora_llama2(**LORA, **TINY, quantize_base=True))
    out["after_build"] = _memory(torch, device)
    set_trainable_params(model, get_adapter_params(model))
    # the checkpoint: every base parameter in bf16 on the host, named as before checkpointing wraps the layers (the
    # wrapper's load hook adds its prefix); model.state_dict() would run torchtune's hook that dequantizes the NF4
    # weights
    state = {name: torch.full(tuple(p.shape), 0.01, dtype=torch.bfloat16)
             for name, p in model.named_parameters() if "lora_" not in name}
    out["checkpointed"] = _checkpointing(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # (strict=False, as the recipe: the adapters are the missing keys; every checkpoint tensor must have landed)
    out["loaded"] = {"tensors": len(state), "missing": len(missing), "unexpected": len(unexpected)}
    if unexpected:
        raise RuntimeError(f"the checkpoint's tensors did not land: {sorted(unexpected)[:3]}")
    del state
    out["after_init"] = _memory(torch, device)
    out["segments_after_init"] = _segments(torch, device)
    vocab = 32_000 if size == "7b" else TINY["vocab_size"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    out["steps"] = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (2, seq), device=device)
        labels = torch.randint(0, vocab, (2, seq), device=device)
        logits = model(tokens)
        logits = logits[..., :-1, :].contiguous().transpose(1, 2)
        loss = loss_fn(logits, labels[..., 1:].contiguous())
        del logits
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        out["steps"].append(_memory(torch, device))
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--label", default="", help="what to call this run in the JSON (the torchtune commit)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torchtune_standin.install()
    try:
        result = run(args.device, args.size, args.steps, args.seq)
    except Exception as error:  # noqa: BLE001 (one line in the JSON: the other runs go on)
        result = {"error": f"{type(error).__name__}: {error}"[:2000]}
    result["label"] = args.label
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "segments_after_init"})[:3000])
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
