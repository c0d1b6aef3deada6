"""Which Linear layers torchtune's QLoRA builders store in NF4, beside memcalc's --qlora-scope choice, and the bytes of
torchao's NF4Tensor beside bitsandbytes' layout that memcalc counts: the figures behind docs/accuracy.md's
"QLoRA's 4-bit base" section.

    pip install --no-deps --target /tmp/tt torchtune==0.6.1 torchao==0.11.0
    PYTHONPATH=/tmp/tt python benchmarks/qlora_torchtune.py

torchtune is not one of memcalc's extras. Its package imports its data modules (datasets, PIL, torchdata...) on the
way to the model builders; benchmarks/torchtune_standin.py stands in empty modules for those it cannot find (the
builders never call them), and builds each model small (one layer, hidden 256) with quantize_base=True.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torchtune_standin

# torchtune's module names -> transformers' (memcalc's inventory names).
RENAME = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
          "attn.output_proj": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj",
          "mlp.w3": "mlp.up_proj"}
SIZE = {"vocab_size": 512, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 256,
        "intermediate_dim": 512, "max_seq_len": 64, "lora_rank": 4, "lora_alpha": 8, "quantize_base": True}


def _short(names: set[str]) -> str:
    return ", ".join(sorted(name.split(".")[-2] for name in names))


def main() -> int:
    torchtune_standin.install()
    try:
        import torch
        from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
        from torchtune.models.llama3._component_builders import lora_llama3
        from torchtune.models.qwen2._component_builders import lora_qwen2
    except ImportError as error:
        print(f"needs torchtune and torchao ({error}); see the docstring")
        return 1
    from memcalc import trainable
    from memcalc.api import model_of
    from memcalc.model import ModelConfig
    from memcalc.spec import TrainingSpec

    raw = {"hidden_size": SIZE["embed_dim"], "intermediate_size": SIZE["intermediate_dim"], "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    print("| torchtune builder (LoRA on q_proj, v_proj; MLP not adapted) | NF4 in torchtune | memcalc's scope | "
          "memcalc's NF4 | equal |")
    print("|---|---|---|---|---|")
    for builder, model_type, scope in ((lora_llama3, "llama", "all-linear"), (lora_qwen2, "qwen2", "lora-targets")):
        built = builder(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, **SIZE)
        theirs = set()
        for name, module in built.named_modules():
            if isinstance(getattr(module, "weight", None), NF4Tensor):
                layer, _, rest = name.removeprefix("layers.").partition(".")
                theirs.add(f"model.layers.{layer}.{RENAME[rest]}.weight")
        described = model_of(ModelConfig("tiny", {**raw, "model_type": model_type}, "benchmark"))
        spec = TrainingSpec(lora_rank=4, lora_targets=("q_proj", "v_proj"), qlora=True, qlora_scope=scope)
        ours = set(trainable.apply(described, spec).quantized)
        print(f"| {builder.__name__} | {_short(theirs)} | {scope} | {_short(ours)} | {theirs == ours} |")
    print()
    print("| weight shape | torchao NF4Tensor bytes | bitsandbytes NF4 (double quant) bytes, counted | counted - torchao |")
    print("|---|---|---|---|")
    for shape in ((4096, 4096), (1024, 4096), (14336, 4096)):
        nf4 = to_nf4(torch.zeros(shape, dtype=torch.bfloat16))
        names, _ = nf4.__tensor_flatten__()
        held = sum(getattr(nf4, n).nbytes for n in names)
        counted = trainable.nf4_bytes(shape[0] * shape[1])
        print(f"| {shape[0]} x {shape[1]} | {held:,} | {counted:,} | {counted - held:+,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
