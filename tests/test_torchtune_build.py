"""memcalc.measure.torchtune_build: torchtune's build and load as releases before 0.3 ran them (one decoder layer
built, then deep-copied per layer), the replay behind the torchtune rows of benchmarks/reserved.py. The H200 ran
torchtune 0914d5cfb's own build (benchmarks/gpu-runs/2026-12-04-h200-d/tt0914.json); the kept trace of its replay is
checked against that run here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import load_log
from tests.tiny import tiny_raw

H200_RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu-runs" / "2026-12-04-h200-d"
# a tiny Llama whose Linear weights are whole blocks of torchao's NF4 (64 x 256 elements)
TINY = {**tiny_raw("llama"), "hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4}


def _build_log(raw: dict, **settings):
    """The log of the weights' build and load under torchtune's build before 0.3 (conftest.load_log)."""
    pytest.importorskip("torch")
    from memcalc.measure import torchtune_build
    from memcalc.spec import TrainingSpec

    spec = TrainingSpec(precision="bf16-pure", micro_batch_size=1, seq_len=8, activations="rules", **settings)
    with torchtune_build.releases_before_0_3():
        return load_log(raw, spec, nf4=spec.qlora)


def _live(events) -> list[int]:
    """The bytes alive after each event."""
    from memcalc.allocator import ALLOC

    live, sizes, out = 0, {}, []
    for kind, key, nbytes in events:
        if kind == ALLOC:
            sizes[key] = nbytes
            live += nbytes
        else:
            live -= sizes.pop(key, 0)
        out.append(live)
    return out


def _rope_bytes(raw: dict) -> int:
    """One layer's rotary buffers in torchtune 0914d5cfb (modules/position_embeddings.py _rope_init): theta, head_dim /
    2 fp32 values, and the cache, max_seq_len x head_dim / 2 x 2 fp32."""
    half = raw["hidden_size"] // raw["num_attention_heads"] // 2
    return half * 4 + raw["max_position_embeddings"] * half * 2 * 4


def test_the_template_layer_is_made_first_and_freed_after_the_copies():
    """LoRA on q and v: the template layer's tensors come first, then the copies; once loaded the model holds its own
    weights and a rotary cache per layer, and at the build's peak the template's layer and its rotary buffers beside
    them."""
    raw = {**TINY, "max_position_embeddings": 256}
    events, loaded, model = _build_log(raw, lora_rank=8, lora_targets=("q_proj", "v_proj"))
    from memcalc.allocator import ALLOC

    named = list(model.named_parameters())
    attention = [p.untyped_storage().nbytes() for n, p in named if ".layers.0.self_attn." in n]
    rest = [p.untyped_storage().nbytes() for n, p in named if ".layers.0." in n and ".self_attn." not in n]
    layer0 = attention + rest
    weights = sum(p.untyped_storage().nbytes() for _, p in named)
    layers = raw["num_hidden_layers"]
    # the attention's weights, its RotaryPositionalEmbeddings (theta; positions, their product with theta, its cosine
    # and sine, the stacked cache: fp32), the MLP's and the norms' weights
    half, positions = raw["hidden_size"] // raw["num_attention_heads"] // 2, raw["max_position_embeddings"]
    rope = [half * 4, positions * 4, positions * half * 4, positions * half * 4, positions * half * 4,
            positions * half * 2 * 4]
    made = [size for kind, _key, size in events if kind == ALLOC]
    assert made[:len(layer0) + len(rope)] == attention + rope + rest
    live = _live(events[:loaded])
    assert live[-1] == weights + layers * _rope_bytes(raw)
    assert max(live) == weights + (layers + 1) * _rope_bytes(raw) + sum(layer0)


def test_a_loaded_nf4_weight_replaces_the_copy_s_tensors():
    """QLoRA (torchao's NF4): each layer's NF4 weight is a copy of the template's (dequantized and quantized again),
    then replaced by the checkpoint's (torchtune's copy_): once loaded the model holds one NF4 weight per Linear, its
    other weights and the rotary caches, nothing of the copies the load replaced."""
    pytest.importorskip("torchao")
    from memcalc.measure import qlora

    events, loaded, model = _build_log(TINY, lora_rank=8, qlora=True, qlora_quantizer="torchao", qlora_upcast=False,
                                       lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"))
    layers = qlora.torchao_layers(model)
    nf4 = sum(t.untyped_storage().nbytes() for m in layers for t in qlora.torchao_parts(m))
    stand_ins = {id(m.weight) for m in layers}
    others = sum(p.untyped_storage().nbytes() for p in model.parameters() if id(p) not in stand_ins)
    assert len(layers) == 7 * TINY["num_hidden_layers"]
    assert _live(events[:loaded])[-1] == nf4 + others + TINY["num_hidden_layers"] * _rope_bytes(TINY)


def test_the_kept_trace_of_torchtune_0914d5cfb_s_qlora_replays_the_h200_s_reserved_to_the_byte():
    """The replay of Llama-2-7B QLoRA (7B_qlora_single_device: batch 2 x 512, every layer checkpointed) with torchtune
    0914d5cfb's build and load and torchao 0.1, traced by benchmarks/torchtune_build_trace.py: the same build and load
    and three steps ran on the H200 (tt0914.json). Reserved after init and over the steps, to the byte."""
    from memcalc.allocator import replay
    from memcalc.measure.reserved import StepAllocations, with_workspaces

    measured = json.loads((H200_RUN / "tt0914.json").read_text())
    with gzip.open(H200_RUN / "tt0914-trace-events.json.gz", "rt") as handle:
        kept = json.load(handle)
    events = [tuple(e) for e in kept["events"]]
    after_init = replay(events[:kept["loaded"]])
    assert after_init.reserved_peak_bytes == measured["after_init"]["reserved"] == measured["after_build"]["reserved"]
    # (the steps' matmuls each use a cuBLAS workspace: 32 MiB on the H200, one per handle, made as the step begins)
    allocations = StepAllocations(tuple(events), "", "", 0.0, {}, kept["loaded"], kept["step"])
    steps = replay(with_workspaces(allocations, kept["cublas_workspace_bytes"]))
    assert steps.reserved_peak_bytes == max(step["max_reserved"] for step in measured["steps"])
