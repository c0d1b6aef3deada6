"""The pure-Python inventory equals transformers' own ``named_parameters()``, tensor by tensor.

Each config is built with its transformers class on the meta device (no memory, no downloads), the
same way the fallback builds it, and the inventory must match it exactly: the same names, the same
shapes, the same total; no tolerance. Skipped when torch or transformers is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memcalc.errors import UnsupportedModelError
from memcalc.families import SUPPORTED_MODEL_TYPES, describe, family
from memcalc.families import inventory as build_inventory
from memcalc.families.generic import meta_inventory, param_tensors
from memcalc.measure.build import build_meta_model
from memcalc.model import ModelConfig, ParamTensor

SUPPORTED_ARCHITECTURES = {t: tuple(family(t).heads) for t in SUPPORTED_MODEL_TYPES}
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "models"
PRESETS = sorted(PRESET_DIR.glob("*.json"))

# Tiny sizes; every key a family's layout depends on is exercised by at least one case.
DECODER = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
# (key/value heads and experts per token given: the MoE configs' defaults, 16 and 4-8, exceed these tiny sizes)
MOE = {**DECODER, "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_experts_per_tok": 2, "num_key_value_heads": 2}
MLA = {
    **MOE,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 12,
    "v_head_dim": 10,
    "n_routed_experts": 3,
}
GPT2 = {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16}
BERT = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 16,
}
T5 = {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4}
FALCON = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
OPT = {
    "vocab_size": 128,
    "hidden_size": 32,
    "ffn_dim": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}
BLOOM = {"vocab_size": 128, "hidden_size": 32, "n_layer": 2, "n_head": 4}


def _cfg(model_type: str, base: dict, arch: str | None = None, **fields) -> dict:
    raw = {"model_type": model_type, **base, **fields}
    if arch:
        raw["architectures"] = [arch]
    return raw


TINY = {
    # Llama and its copies: GQA, MHA (num_key_value_heads absent), biases, explicit head_dim, heads, tying
    "llama-gqa": _cfg("llama", DECODER, "LlamaForCausalLM", num_key_value_heads=2),
    "llama-mha-biases-tied": _cfg("llama", DECODER, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama-head-dim": _cfg("llama", DECODER, "LlamaForCausalLM", head_dim=32, num_key_value_heads=1),
    "llama-model": _cfg("llama", DECODER, "LlamaModel", num_key_value_heads=2),
    "llama-seq-cls": _cfg("llama", DECODER, "LlamaForSequenceClassification", id2label={"0": "a", "1": "b", "2": "c"}),
    "mistral-default-kv": _cfg("mistral", {**DECODER, "num_attention_heads": 8}, "MistralForCausalLM"),
    "mistral-head-dim": _cfg("mistral", DECODER, "MistralForCausalLM", head_dim=8, num_key_value_heads=2),
    "qwen2-tied": _cfg("qwen2", DECODER, "Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-default-kv": _cfg("qwen2", {**DECODER, "num_attention_heads": 32, "hidden_size": 128}, "Qwen2ForCausalLM"),
    "qwen3-default-head-dim": _cfg("qwen3", DECODER, "Qwen3ForCausalLM", num_key_value_heads=2),
    "qwen3-bias-mqa": _cfg(
        "qwen3", DECODER, "Qwen3ForCausalLM", head_dim=16, num_key_value_heads=1, attention_bias=True
    ),
    # GemmaConfig defaults: 16 key/value heads, head_dim 256 (16 query heads so that the groups divide).
    "gemma-defaults": _cfg("gemma", DECODER, "GemmaForCausalLM", num_attention_heads=16),
    "gemma-untied-mqa": _cfg(
        "gemma", DECODER, "GemmaForCausalLM", head_dim=16, num_key_value_heads=1, tie_word_embeddings=False
    ),
    "gemma2": _cfg("gemma2", DECODER, "Gemma2ForCausalLM", head_dim=16),
    "gemma2-model": _cfg("gemma2", DECODER, "Gemma2Model", head_dim=16, num_key_value_heads=2),
    "gemma3-text": _cfg("gemma3_text", DECODER, "Gemma3ForCausalLM", head_dim=16, num_key_value_heads=1),
    "gemma3-text-seq-cls": _cfg("gemma3_text", DECODER, "Gemma3TextForSequenceClassification", head_dim=16),
    "phi3-gqa": _cfg("phi3", DECODER, "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
    "phi3-tied": _cfg("phi3", DECODER, "Phi3ForCausalLM", tie_word_embeddings=True, pad_token_id=0),
    "phi-qk-layernorm": _cfg("phi", DECODER, "PhiForCausalLM", qk_layernorm=True, num_key_value_heads=2),
    "phi-tied": _cfg("phi", DECODER, "PhiForCausalLM", tie_word_embeddings=True),
    # Mixture of experts: fused 3-D experts, routers, shared experts, dense layers among sparse ones
    "mixtral": _cfg("mixtral", DECODER, "MixtralForCausalLM", num_local_experts=3, num_key_value_heads=2),
    "mixtral-num-experts-alias": _cfg("mixtral", DECODER, "MixtralForCausalLM", num_experts=5, head_dim=8,
                                      num_key_value_heads=4),
    "qwen2-moe": _cfg(
        "qwen2_moe", MOE, "Qwen2MoeForCausalLM", num_experts=3, shared_expert_intermediate_size=40, mlp_only_layers=[1]
    ),
    "qwen2-moe-sparse-step": _cfg(
        "qwen2_moe", MOE, "Qwen2MoeForCausalLM", num_experts=3, decoder_sparse_step=2, qkv_bias=False
    ),
    "qwen3-moe": _cfg("qwen3_moe", MOE, "Qwen3MoeForCausalLM", num_experts=3, head_dim=16, num_key_value_heads=2),
    "qwen3-moe-dense-layer": _cfg(
        "qwen3_moe", MOE, "Qwen3MoeForCausalLM", num_experts=3, mlp_only_layers=[0], attention_bias=True
    ),
    "deepseek-v2-q-lora": _cfg(
        "deepseek_v2", MLA, "DeepseekV2ForCausalLM", q_lora_rank=24, first_k_dense_replace=1, n_shared_experts=2
    ),
    "deepseek-v2-no-q-lora": _cfg(
        "deepseek_v2",
        MLA,
        "DeepseekV2ForCausalLM",
        q_lora_rank=None,
        n_shared_experts=1,
        attention_bias=True,
        mlp_bias=True,
    ),
    # GPT-2 (Conv1D), BERT, T5
    "gpt2": _cfg("gpt2", GPT2, "GPT2LMHeadModel"),
    "gpt2-untied-n-inner": _cfg("gpt2", GPT2, "GPT2LMHeadModel", n_inner=40, tie_word_embeddings=False),
    "gpt2-model-aliases": _cfg(
        "gpt2", {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}, "GPT2Model"
    ),
    "gpt2-seq-cls": _cfg("gpt2", GPT2, "GPT2ForSequenceClassification", num_labels=4),
    "bert-mlm": _cfg("bert", BERT, "BertForMaskedLM"),
    "bert-mlm-untied": _cfg("bert", BERT, "BertForMaskedLM", tie_word_embeddings=False),
    "bert-model": _cfg("bert", BERT, "BertModel", type_vocab_size=3),
    "bert-pretraining": _cfg("bert", BERT, "BertForPreTraining"),
    "bert-lm-head": _cfg("bert", BERT, "BertLMHeadModel", is_decoder=True),
    "bert-seq-cls": _cfg("bert", BERT, "BertForSequenceClassification", id2label={"0": "a", "1": "b", "2": "c"}),
    "bert-token-cls": _cfg("bert", BERT, "BertForTokenClassification", num_labels=5),
    "bert-qa": _cfg("bert", BERT, "BertForQuestionAnswering"),
    "bert-default-arch": _cfg("bert", BERT),
    "t5-relu": _cfg("t5", T5, "T5ForConditionalGeneration", num_decoder_layers=3),
    "t5-gated-untied": _cfg(
        "t5", T5, "T5ForConditionalGeneration", feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
    "t5-legacy-class-name": _cfg("t5", T5, "T5WithLMHeadModel"),
    "t5-model": _cfg("t5", T5, "T5Model", feed_forward_proj="gated-silu"),
    "t5-encoder": _cfg("t5", T5, "T5EncoderModel"),
    # Falcon: new decoder architecture (GQA, two norms), multi-query parallel, sequential with biases
    "falcon-new-arch": _cfg("falcon", FALCON, "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=2),
    "falcon-new-arch-one-ln": _cfg(
        "falcon",
        FALCON,
        "FalconForCausalLM",
        new_decoder_architecture=True,
        num_kv_heads=2,
        num_ln_in_parallel_attn=1,
        ffn_hidden_size=40,
    ),
    "falcon-mqa-parallel": _cfg("falcon", FALCON, "FalconForCausalLM", multi_query=True, parallel_attn=True),
    "falcon-sequential-bias-untied": _cfg(
        "falcon",
        FALCON,
        "FalconForCausalLM",
        multi_query=False,
        parallel_attn=False,
        bias=True,
        tie_word_embeddings=False,
    ),
    "falcon-model-n-embed": _cfg("falcon", {**FALCON, "n_embed": 48}, "FalconModel", num_attention_heads=6),
    # OPT: project_in/out, post-norm, no biases / no affine norms
    "opt-project-in-out": _cfg("opt", OPT, "OPTForCausalLM", word_embed_proj_dim=24),
    "opt-post-norm": _cfg("opt", OPT, "OPTForCausalLM", do_layer_norm_before=False, tie_word_embeddings=False),
    "opt-no-bias-no-affine": _cfg("opt", OPT, "OPTModel", enable_bias=False, layer_norm_elementwise_affine=False),
    "opt-seq-cls": _cfg("opt", OPT, "OPTForSequenceClassification", word_embed_proj_dim=24, num_labels=3),
    "bloom": _cfg("bloom", BLOOM, "BloomForCausalLM"),
    "bloom-model-n-embed": _cfg("bloom", {**BLOOM, "n_embed": 48}, "BloomModel"),
    # A multimodal config: the inventory counts its text_config, as Gemma3ForCausalLM
    "gemma3-multimodal": {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": _cfg("gemma3_text", DECODER, head_dim=16, num_key_value_heads=2),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32},
        "_source": "memcalc test",
    },
}


def _every_class() -> dict[str, dict]:
    """One case per supported class: the family's first tiny case with ``architectures`` swapped."""
    first = {}
    for raw in TINY.values():
        first.setdefault(raw["model_type"], raw)
    return {
        f"class-{arch}": {**first[model_type], "architectures": [arch]}
        for model_type, archs in SUPPORTED_ARCHITECTURES.items()
        for arch in archs
        if model_type in first
    }


TINY.update(_every_class())


def _config(raw: dict, name: str = "test") -> ModelConfig:
    return ModelConfig(name=name, raw=raw, source="tests/test_inventory_exact.py")


def _assert_exact(config: ModelConfig, *, modelled: bool = True) -> None:
    """``modelled``: the family lists the tensors itself; else the generic family's meta-device build must."""
    target = describe(config)
    assert target.modelled_inventory is modelled, target.reason
    got = build_inventory(config)
    model = build_meta_model(target.raw, target.architecture)
    assert type(model).__name__ == target.architecture

    names = [p.name for p in got]
    assert len(names) == len(set(names)), "a tensor is listed twice"
    assert {p.name: p.shape for p in got} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert sum(p.numel for p in got) == sum(p.numel() for p in model.parameters())
    # is_linear_weight from the owning module's class, layer from the name; the fallback's name-based
    # roles agree with the builders' for every family here.
    assert sorted(got, key=lambda p: p.name) == sorted(param_tensors(model), key=lambda p: p.name)
    assert all(p.trainable for p in got)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_inventory_matches_transformers(path: Path) -> None:
    """Hand-modelled families list every tensor themselves; presets of model types without hand rules (olmo2,
    gpt_oss, deepseek_v3, smollm3, granite) go through the meta-device build, which must give the same."""
    raw = json.loads(path.read_text())
    modelled = raw["model_type"] in SUPPORTED_MODEL_TYPES
    _assert_exact(_config(raw, path.stem), modelled=modelled)
    if not modelled:  # the count `memcalc presets` shows without building the model (memcalc.api.presets)
        assert raw["_num_params"] == sum(p.numel() for p in build_meta_model(raw).parameters())


# Presets whose _published_num_params counts the released checkpoint's own tensors, so the inventory must equal it
# (each preset's _published_num_params_source says where the number comes from). The Gemma 2 ones are the paper's
# padded-vocabulary totals and differ on purpose.
EXACT_PUBLISHED = ["gpt2", "llama-2-7b", "llama-3-8b", "llama-3.1-8b", "mistral-7b", "mistral-small-24b",
                   "mixtral-8x7b", "olmo-2-13b", "qwen2.5-7b"]


@pytest.mark.parametrize("name", EXACT_PUBLISHED)
def test_preset_total_equals_the_released_checkpoint(name: str) -> None:
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    assert sum(p.numel for p in build_inventory(_config(raw, name))) == raw["_published_num_params"]


@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_inventory_matches_transformers(case: str) -> None:
    _assert_exact(_config(TINY[case]))


def test_every_supported_family_and_class_is_exercised() -> None:
    families = {describe(_config(raw)).model_type for raw in TINY.values()}
    assert families == set(SUPPORTED_MODEL_TYPES)
    classes = {describe(_config(raw)).architecture for raw in TINY.values()}
    assert {arch for archs in SUPPORTED_ARCHITECTURES.values() for arch in archs} <= classes


def test_fallback_equals_pure_inventory() -> None:
    for case in ("llama-gqa", "deepseek-v2-q-lora", "gpt2", "t5-gated-untied", "opt-project-in-out"):
        config = _config(TINY[case])
        by_name = lambda tensors: sorted(tensors, key=lambda p: p.name)
        assert by_name(meta_inventory(config)) == by_name(build_inventory(config)), case


def test_t5_untied_head_is_what_from_pretrained_loads(tmp_path: Path) -> None:
    """T5Config forces tying, but from_pretrained unties a checkpoint with its own lm_head (flan-t5)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    raw = TINY["t5-gated-untied"]
    config = transformers.T5Config(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})
    assert config.tie_word_embeddings is True  # forced by T5Config
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = torch.randn(raw["vocab_size"], raw["d_model"])
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "tie_word_embeddings": False}))

    transformers.logging.set_verbosity_error()
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    expected = {n: tuple(p.shape) for n, p in loaded.named_parameters()}
    assert "lm_head.weight" in expected
    assert {p.name: p.shape for p in build_inventory(_config(raw))} == expected


def test_text_config_is_used_and_noted() -> None:
    config = _config(TINY["gemma3-multimodal"])
    target = describe(config)
    assert (target.model_type, target.architecture) == ("gemma3_text", "Gemma3ForCausalLM")
    assert any("text_config" in note for note in describe(config).inventory_notes())


def test_unknown_model_type_uses_the_meta_fallback() -> None:
    raw = _cfg("olmo", DECODER, "OlmoForCausalLM", num_key_value_heads=2, _source="memcalc test", _aliases=["x"])
    config = _config(raw)
    got = build_inventory(config)
    model = build_meta_model(raw)
    assert {p.name: p.shape for p in got} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert any("meta device" in note for note in describe(config).inventory_notes())


@pytest.mark.parametrize(
    "raw",
    [
        _cfg("llama", DECODER, "LlamaForTokenClassification", num_labels=3),
        _cfg("gpt2", GPT2, "GPT2LMHeadModel", add_cross_attention=True),
        _cfg("bert", BERT, "BertLMHeadModel", is_decoder=True, add_cross_attention=True),
    ],
    ids=["unmodelled-class", "gpt2-cross-attention", "bert-cross-attention"],
)
def test_unmodelled_variant_of_a_known_family_uses_the_meta_fallback(raw: dict) -> None:
    config = _config(raw)
    assert not describe(config).modelled_inventory
    assert any("meta device" in note for note in describe(config).inventory_notes())
    model = build_meta_model(raw)
    got = build_inventory(config)
    assert {p.name: p.shape for p in got} == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_unknown_model_type_without_torch_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name in ("torch", "transformers") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(UnsupportedModelError) as excinfo:
        build_inventory(_config(_cfg("olmo", DECODER)))
    message = str(excinfo.value)
    assert "\n" not in message
    assert "'olmo'" in message and "llama" in message and "torch" in message
    # a supported family still works without torch
    assert build_inventory(_config(TINY["llama-gqa"]))


def test_pure_inventory_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys; from memcalc.model import ModelConfig; from memcalc.families import inventory as build_inventory; "
        f"build_inventory(ModelConfig('t', {TINY['deepseek-v2-q-lora']!r}, 't')); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_param_tensor_flags_on_a_moe_layer() -> None:
    tensors = {p.name: p for p in build_inventory(_config(TINY["mixtral"]))}
    experts = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts == ParamTensor(experts.name, (3, 192, 64), 0, "expert", is_linear_weight=False)
    assert tensors["model.layers.1.mlp.gate.weight"].role == "router"
    assert tensors["lm_head.weight"].is_linear_weight and tensors["lm_head.weight"].layer is None


def test_a_learned_position_table_found_on_the_meta_device_bounds_the_sequence(tmp_path: Path) -> None:
    """GPT-BigCode has no family module; transformers builds it with a learned wpe of n_positions rows, so a longer
    sequence has no position embedding and is refused, as for GPT-2."""
    from memcalc import api
    from memcalc.errors import UsageError

    raw = {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_embd": 64, "n_layer": 2,
           "n_head": 4, "n_positions": 128, "vocab_size": 300}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    model = api.model_input(str(path), None)
    assert model.arch.learned_positions and model.arch.max_positions == 128
    assert api.estimate(str(path), seq_len=128).training.seq_len == 128
    with pytest.raises(UsageError, match="128 positions"):
        api.estimate(str(path), seq_len=129)
