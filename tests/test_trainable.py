"""LoRA / QLoRA / --freeze: adapter tensors checked against PEFT, NF4 bytes against bitsandbytes."""

from __future__ import annotations

import re

import pytest

from memcalc import families, trainable
from memcalc.api import model_input, model_of, run
from memcalc.errors import UsageError
from memcalc.model import ModelConfig
from memcalc.resolve import ModelInput
from memcalc.spec import TrainingSpec

TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 48, "n_layer": 2, "n_head": 4,
             "n_positions": 64, "vocab_size": 100},
    "bert": {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 90, "max_position_embeddings": 64},
}


def _model(raw: dict) -> ModelInput:
    config = ModelConfig(name="tiny", raw=raw, source="test")
    return model_of(config)


def test_lora_freezes_base_and_adds_adapters():
    model = model_input("llama-3-8b", None)
    # (activations by the rules: these are model states; tests/test_lora_traced.py checks the traced step)
    full = run(model, TrainingSpec(activations="rules"))
    lora = run(model, TrainingSpec(lora_rank=16, activations="rules"))
    # Per targeted q_proj/v_proj (out, in): r*(in + out). Llama-3-8B: q (4096, 4096), v (1024, 4096), 32 layers.
    expected_adapters = 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert lora.model.num_trainable_params == expected_adapters
    assert lora.model.num_params == full.model.num_params + expected_adapters
    assert lora.term("gradients").bytes == 2 * expected_adapters  # bf16 grads of adapters only
    assert lora.term("optimizer_states").bytes == 8 * expected_adapters
    assert lora.term("weights").bytes == 2 * lora.model.num_params  # frozen base still held in bf16


def test_qlora_base_in_nf4():
    report = run(model_input("llama-3-8b", None), TrainingSpec(lora_rank=16, qlora=True, qlora_upcast=False,
                                                               activations="rules"))
    parts = report.term("weights").breakdown
    assert set(parts) == {"16-bit (not quantized)", "nf4 base"}
    linear = [t for t in model_input("llama-3-8b", None).tensors if t.is_linear_weight and t.role != "lm_head"]
    assert parts["nf4 base"] == sum(trainable.nf4_bytes(t.numel) for t in linear)
    # About 0.5 B/param + 0.127 bits/param of constants (QLoRA paper, sec. 3 "Double Quantization").
    numel = sum(t.numel for t in linear)
    assert numel * (0.5 + 0.127 / 8) < parts["nf4 base"] < numel * (0.5 + 0.13 / 8)


def test_unknown_lora_target_and_missing_defaults():
    model = model_input("llama-3-8b", None)
    with pytest.raises(UsageError, match="matches no Linear"):
        run(model, TrainingSpec(lora_rank=8, lora_targets=("nonexistent",)))
    with pytest.raises(UsageError, match="no default LoRA targets"):
        run(model_input("deepseek-v2-lite", None), TrainingSpec(lora_rank=8))
    all_linear = run(model, TrainingSpec(lora_rank=8, lora_targets=("all-linear",), activations="rules"))
    default = run(model, TrainingSpec(lora_rank=8, activations="rules"))
    assert all_linear.model.num_trainable_params > default.model.num_trainable_params


def test_freeze_embeddings():
    model = model_input("llama-3-8b", None)
    report = run(model, TrainingSpec(freeze=("embeddings",), activations="rules"))
    assert report.model.num_params - report.model.num_trainable_params == 128256 * 4096  # embed_tokens


# ---- against PEFT and bitsandbytes --------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("rank", [4, 8])
def test_lora_matches_peft(family, rank):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    raw = TINY[family]
    config = transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(0)
    base = getattr(transformers, raw["architectures"][0])(config)
    # PEFT's own default targets per model type (peft/utils/constants.py); phi3 is not in PEFT's table.
    peft_defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    targets = list(peft_defaults.get(raw["model_type"]) or families.family(raw["model_type"]).lora_targets)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=rank, target_modules=targets))
    theirs = {re.sub(r"^base_model\.model\.|\.default", "", name): tuple(p.shape)
              for name, p in peft_model.named_parameters() if p.requires_grad}
    subset = trainable.apply(_model(raw), TrainingSpec(lora_rank=rank))  # memcalc's defaults, not told the targets
    ours = {t.name: t.shape for t in subset.tensors if t.trainable}
    assert ours == theirs
    assert sum(t.numel for t in subset.tensors) == sum(p.numel() for p in peft_model.parameters())


def test_lora_on_the_output_head_when_named_matches_peft():
    """PEFT's target_modules=["lm_head"] (torchtune's apply_lora_to_output) wraps the untied head too; all-linear
    does not (PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND skips the output embeddings)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    raw = TINY["llama"]
    config = transformers.AutoConfig.for_model("llama", **{k: v for k, v in raw.items() if k != "model_type"})
    for targets in (["q_proj", "v_proj", "lm_head"], "all-linear"):
        torch.manual_seed(0)
        peft_model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                         peft.LoraConfig(r=4, target_modules=targets))
        theirs = {re.sub(r"^base_model\.model\.|\.default", "", name): tuple(p.shape)
                  for name, p in peft_model.named_parameters() if p.requires_grad}
        named = tuple(targets) if isinstance(targets, list) else (targets,)
        subset = trainable.apply(_model(raw), TrainingSpec(lora_rank=4, lora_targets=named))
        assert {t.name: t.shape for t in subset.tensors if t.trainable} == theirs
        assert any(name.startswith("lm_head.") for name in theirs) == (targets != "all-linear")


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(double_quant):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    for shape in [(1000, 300), (4096, 1024), (14336, 64), (77, 13)]:
        weight = torch.randn(*shape, dtype=torch.bfloat16)
        try:
            packed, state = functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant,
                                                     blocksize=64)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"bitsandbytes cannot quantize on this CPU: {exc}")
        held = [packed, state.absmax, state.code]
        if double_quant:
            held += [state.offset, state.state2.absmax, state.state2.code]
        assert state.nested == double_quant
        assert trainable.nf4_bytes(weight.numel(), double_quant) == sum(t.nbytes for t in held)


def test_qlora_base_as_transformers_quantizes_it_without_double_quant_and_with_the_head():
    """BitsAndBytesConfig(bnb_4bit_use_double_quant=False, llm_int8_skip_modules=[]) on this CPU: transformers
    converts every Linear, the output head too, and keeps an fp32 absmax per 64 weights. The estimate's NF4 part
    (--no-qlora-double-quant --qlora-lm-head) equals the bytes bitsandbytes holds, and its 4-bit tensors are the
    layers transformers converted; by default (head skipped, double quantization) likewise."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    from tests.real_steps import bnb_4bit_model
    from tests.tiny import tiny_raw

    raw = {**tiny_raw("llama"), "num_hidden_layers": 2, "vocab_size": 512}
    for double_quant, head in ((False, True), (True, False)):
        loaded = bnb_4bit_model(raw, double_quant=double_quant, skip_modules=[] if head else None)
        held, names = 0, set()
        for name, module in loaded.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                state = module.weight.quant_state
                names.add(f"{name}.weight")
                held += module.weight.nbytes + state.absmax.nbytes + state.code.nbytes
                if state.nested:
                    held += state.offset.nbytes + state.state2.absmax.nbytes + state.state2.code.nbytes
        spec = TrainingSpec(precision="bf16", lora_rank=8, qlora=True, qlora_double_quant=double_quant,
                            qlora_lm_head=head)
        subset = trainable.apply(_model(raw), spec)
        assert set(subset.quantized) == names and ("lm_head.weight" in names) == head
        assert run(_model(raw), spec).term("weights").breakdown["nf4 base"] == held


def test_qlora_scope_lora_targets_is_torchtune_s_qwen2_builder():
    """torchtune 0.6.1's lora_qwen2(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False,
    quantize_base=True) holds NF4Tensor weights in q_proj and v_proj only (k_proj, output_proj, the MLP and the
    output plain bf16 Parameters: models/qwen2/_component_builders.py), while lora_llama3 with the same arguments
    quantizes every projection of the layers (measured with benchmarks/qlora_torchtune.py; docs/accuracy.md).
    --qlora-scope lora-targets and all-linear pick those layers."""
    raw = {**TINY["llama"], "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    targets = ("q_proj", "v_proj")
    chosen = {scope: trainable.apply(_model(raw), TrainingSpec(lora_rank=8, lora_targets=targets, qlora=True,
                                                               qlora_scope=scope)).quantized
              for scope in ("lora-targets", "all-linear")}
    projections = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert chosen["lora-targets"] == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in targets}
    assert chosen["all-linear"] == projections
    narrow = run(_model(raw), TrainingSpec(lora_rank=8, lora_targets=targets, qlora=True, qlora_upcast=False,
                                           qlora_scope="lora-targets")).term("weights").breakdown
    wide = run(_model(raw), TrainingSpec(lora_rank=8, lora_targets=targets, qlora=True, qlora_upcast=False)
               ).term("weights").breakdown
    assert narrow["16-bit (not quantized)"] > wide["16-bit (not quantized)"]


def test_qlora_options_need_qlora_and_an_untied_head():
    for option in ({"qlora_scope": "lora-targets"}, {"qlora_double_quant": False}, {"qlora_lm_head": True},
                   {"qlora_upcast": False}):
        with pytest.raises(UsageError, match="sets how QLoRA stores its base: add qlora "):
            TrainingSpec(lora_rank=8, **option)
    with pytest.raises(UsageError, match="is not one of all-linear, lora-targets"):
        TrainingSpec(lora_rank=8, qlora=True, qlora_scope="everything")
    tied = {**TINY["llama"], "tie_word_embeddings": True}
    with pytest.raises(UsageError, match="tied"):
        trainable.apply(_model(tied), TrainingSpec(lora_rank=8, qlora=True, qlora_lm_head=True))


def test_default_lora_targets_are_peft_defaults():
    """Every family's default LoRA targets are PEFT's for its model type, where PEFT has an entry."""
    peft = pytest.importorskip("peft")
    peft_defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    checked = 0
    for model_type in families.SUPPORTED_MODEL_TYPES:
        ours = families.family(model_type).lora_targets
        if model_type in peft_defaults:
            assert ours == tuple(peft_defaults[model_type]), model_type
            checked += 1
        else:
            assert ours is None or model_type == "phi3", model_type  # phi3: its fused qkv_proj, documented
    assert checked >= 15


def test_qlora_upcast_is_what_prepare_model_for_kbit_training_leaves():
    """PEFT's prepare_model_for_kbit_training casts every 16-bit parameter but the 4-bit ones to fp32. On a real
    bitsandbytes 4-bit model (transformers' from_pretrained with BitsAndBytesConfig, on this CPU) the fp32 bytes it
    leaves equal the estimate's upcast part; without the upcast they are the 16-bit part, halved."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from memcalc.model import ModelConfig
    from memcalc.resolve import model_of
    from tests.real_steps import bnb_4bit_model
    from tests.tiny import tiny_raw

    raw = {**tiny_raw("llama"), "num_hidden_layers": 2, "vocab_size": 512}
    quantized = bnb_4bit_model(raw)
    quantized = peft.prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    fp32 = sum(p.numel() * 4 for p in quantized.parameters() if p.dtype == torch.float32)
    model = model_of(ModelConfig("tiny", raw, "test"))
    upcast = run(model, TrainingSpec(precision="bf16", lora_rank=8, qlora=True)).term("weights").breakdown
    assert upcast[trainable.UPCAST_PART] == fp32
    plain = run(model, TrainingSpec(precision="bf16", lora_rank=8, qlora=True, qlora_upcast=False))
    # (the adapters are in the 16-bit part of both)
    assert plain.term("weights").breakdown["16-bit (not quantized)"] - upcast["16-bit (not quantized)"] == fp32 // 2
