"""Activations: the bytes transformers saves for backward, tensor by tensor, against the formula.

Measured with torch.autograd.graph.saved_tensors_hooks on tiny models on the CPU: every distinct storage a
forward pass saves for backward (parameters and autocast weight copies excluded: those are other terms).
"""

from __future__ import annotations

import pytest

from memcalc.api import run
from memcalc.engine import ModelInput
from memcalc.inventory import build_inventory
from memcalc.model import ModelConfig
from memcalc.report import TERM_ACTIVATIONS, TERM_LOSS_BUFFERS
from memcalc.spec import TrainingSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256, "pad_token_id": 0}
FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma": ("GemmaForCausalLM", {"head_dim": 32}),
    "phi3": ("Phi3ForCausalLM", {}),
    # MoE: 4 experts, 2 per token; which expert gets which token depends on the routing, the total does not.
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 64, "norm_topk_prob": True}),
    # decoder_sparse_step 2: layer 0 is dense (intermediate_size), layer 1 sparse with the shared expert.
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                          "shared_expert_intermediate_size": 112, "decoder_sparse_step": 2}),
}
RECIPES = {"bf16-pure": (torch.bfloat16, False), "fp32": (torch.float32, False), "amp-bf16": (torch.float32, True)}


def _raw(family: str) -> dict:
    arch, extra = FAMILIES[family]
    return {"model_type": family, "architectures": [arch], **BASE, **extra}


def measure_saved_bytes(raw: dict, recipe: str, batch: int, seq: int, checkpointing: bool = False,
                        attention: str = "sdpa") -> int:
    dtype, autocast = RECIPES[recipe]
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(raw["model_type"], **fields)
    config._attn_implementation = attention
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = getattr(transformers, raw["architectures"][0])(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    # Parameters, and autocast's low-precision copies of them (the autocast_weight_copies term), are not
    # activations: the copies are recognised as the outputs of a dtype cast whose input is a parameter.
    # Registered buffers (BERT's position_ids, sliced and saved by the position embedding) are model state too.
    excluded = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    parameter_ptrs = set(excluded)
    saved: dict[int, int] = {}

    class WeightCopies(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in parameter_ptrs:
                excluded.add(out.untyped_storage().data_ptr())
            return out

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(1, raw["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), WeightCopies():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids)
    return sum(saved.values())


def estimated_saved_bytes(raw: dict, recipe: str, batch: int, seq: int, checkpointing: bool = False,
                          attention: str = "sdpa") -> tuple[int, int]:
    config = ModelConfig("tiny", raw, "test")
    model = ModelInput("tiny", "test", raw["model_type"], tuple(build_inventory(config)), True, config)
    spec = TrainingSpec(precision=recipe, micro_batch_size=batch, seq_len=seq,
                        checkpointing="full" if checkpointing else "none", attention=attention)
    report = run(model, spec)
    return report.term(TERM_ACTIVATIONS).bytes + report.term(TERM_LOSS_BUFFERS).bytes, report


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_activations_match_exactly(family, recipe, attention):
    raw = _raw(family)
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    print(f"{family:8s} {recipe:9s} {attention:5s} estimated {estimated:>10,} measured {measured:>10,} "
          f"error {100 * (estimated - measured) / measured:+.2f}%")
    assert estimated == measured


GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 96, "n_layer": 2, "n_head": 4,
        "vocab_size": 300, "n_positions": 128, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", ["bf16-pure", "fp32"])
def test_gpt2_saved_activations(recipe, attention, use_cache):
    """GPT-2 with dropout off. Autocast is left out: CPU autocast runs layer_norm in bf16, CUDA in fp32."""
    raw = {**GPT2, "use_cache": use_cache}
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    # CUDA's layer_norm keeps mean/rstd in fp32; the CPU kernel in the input dtype: 5 LayerNorms x 2 x T.
    cpu_stats = 0 if recipe == "fp32" else 5 * 2 * 96 * (4 - 2)
    print(f"gpt2 {recipe} {attention}: estimated {estimated:,} (CPU layer-norm stats -{cpu_stats}) measured {measured:,}")
    assert estimated - cpu_stats == measured


@pytest.mark.parametrize("recipe", ["bf16-pure", "amp-bf16"])
def test_checkpointing_keeps_layer_inputs(recipe):
    """During the forward only each layer's input is saved; one layer is recomputed at a time in backward."""
    raw = _raw("llama")
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, checkpointing=True)
    checkpointed, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, checkpointing=True)
    from memcalc import activations
    from memcalc.precision import get_recipe

    config = ModelConfig("tiny", raw, "test")
    model = ModelInput("tiny", "test", "llama", tuple(build_inventory(config)), True, config)
    spec = TrainingSpec(precision=recipe, micro_batch_size=2, seq_len=48, checkpointing="full")
    per_layer = activations.estimate(model, spec, get_recipe(spec.precision)).recompute_bytes
    two_layers, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48)
    one_layer, _ = estimated_saved_bytes({**raw, "num_hidden_layers": 1}, recipe, batch=2, seq=48)
    assert per_layer == two_layers - one_layer
    # Rotary cos/sin (2 x s x head_dim) are arguments of the checkpointed layers: alive, but held by the
    # checkpoint rather than saved through the hooks this measurement sees.
    dtype_bytes = 4 if recipe == "amp-bf16" else 2
    rotary = 2 * 48 * (BASE["hidden_size"] // BASE["num_attention_heads"]) * dtype_bytes
    print(f"checkpointing {recipe}: estimate {checkpointed - per_layer:,} (+ {per_layer:,} recomputed) measured {measured:,}")
    assert checkpointed - rotary == measured


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_aux_loss(family, recipe):
    """output_router_logits: load_balancing_loss_func's softmax over each layer's router logits is saved too.

    Two differences from what stays alive, both explicit here: CUDA autocast runs that softmax in fp32, CPU
    autocast in bf16 (2 bytes less per element); and the topk it takes per layer saves its int64 indices
    through the hooks (8 T k), but the topk values are discarded, so that node and its indices die at once.
    """
    raw = {**_raw(family), "output_router_logits": True}
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48)
    layers, tokens, experts, top_k = 2, 2 * 48, 4, 2
    cpu_softmax = layers * tokens * experts * (4 - 2) if recipe == "amp-bf16" else 0
    discarded_topk = layers * tokens * top_k * 8
    assert estimated - cpu_softmax == measured - discarded_topk


BERT = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 96, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 128,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_bert_saved_activations(recipe, attention):
    """BertForMaskedLM, dropout off (test_dropout_masks covers it). CPU-vs-CUDA differences, explicitly:
    - the test passes labels=input_ids, one int64 tensor where a real batch has two (8 T);
    - bf16: the CPU LayerNorm keeps mean/rstd in bf16, CUDA in fp32 (6 LayerNorms x 2 x T x 2 B);
    - amp-bf16: the head LayerNorm gets the bf16 GELU output; CPU autocast normalises it as it is (with fp32 stats,
      weights being fp32), CUDA autocast saves an fp32 copy ((4 - 2) T h); eager: CUDA autocast runs the softmax in
      fp32 and casts it for the matmul, CPU autocast keeps it in bf16 (4 b a s^2 per layer)."""
    batch, seq = 2, 48
    tokens = batch * seq
    measured = measure_saved_bytes(BERT, recipe, batch=batch, seq=seq, attention=attention)
    estimated, _ = estimated_saved_bytes(BERT, recipe, batch=batch, seq=seq, attention=attention)
    cpu = 8 * tokens
    if recipe == "bf16-pure":
        cpu += 6 * 2 * tokens * (4 - 2)
    if recipe == "amp-bf16":
        cpu += (4 - 2) * tokens * 96
        if attention == "eager":
            cpu += 2 * 4 * batch * 4 * seq * seq
    print(f"bert {recipe} {attention}: estimated {estimated:,} (CPU differences -{cpu:,}) measured {measured:,}")
    assert estimated - cpu == measured


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", ["bf16-pure", "fp32"])
def test_bert_dropout_masks(recipe, attention):
    """Dropout on: CUDA's native_dropout keeps a 1-byte mask per element, the CPU multiplies by a noise tensor
    it saves in the input dtype (c - 1 bytes more per element). Masks: embeddings T h, per layer 2 T h, and
    with eager attention b a s^2 per layer. (sdpa with attention dropout runs the math kernel on the CPU; on
    CUDA the fused kernel keeps only RNG state: attention dropout is tested with eager.)"""
    batch, seq, c = 2, 48, 2 if recipe == "bf16-pure" else 4
    tokens = batch * seq
    raw = {**BERT, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1 if attention == "eager" else 0.0}
    measured = measure_saved_bytes(raw, recipe, batch=batch, seq=seq, attention=attention)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=batch, seq=seq, attention=attention)
    masks = tokens * 96 * (1 + 2 * 2) + (2 * batch * 4 * seq * seq if attention == "eager" else 0)
    cpu = 8 * tokens + (6 * 2 * tokens * (4 - 2) if recipe == "bf16-pure" else 0) - (c - 1) * masks
    assert estimated - cpu == measured
