"""Activations: the bytes transformers saves for backward, tensor by tensor, against the formula.

Measured with torch.autograd.graph.saved_tensors_hooks on tiny models on the CPU: every distinct storage a
forward pass saves for backward (parameters, registered buffers and autocast weight copies excluded: those are
model state or other terms). Where a CPU forward saves something else than a CUDA one (LayerNorm statistics in
bf16, dropout noise in the input dtype instead of a 1-byte mask, ops CPU autocast leaves in bf16) each test says
so and corrects for it explicitly; configs whose CPU kernels differ wholesale (T5 or DeepSeek sdpa: the math
kernel) are checked with eager attention.
"""

from __future__ import annotations

import pytest

from memcalc.api import model_of
from memcalc.families.falcon import REWRITTEN
from memcalc.families.saved import installed_transformers
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec
from tests.tiny import BASE, FAMILIES, GEMMA2, GEMMA3, GPT2, LAYER_NORM_FAMILIES, estimated_saved_bytes, tiny_raw

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RECIPES = {"bf16-pure": (torch.bfloat16, False), "fp32": (torch.float32, False), "amp-bf16": (torch.float32, True)}



def measure_saved_bytes(raw: dict, recipe: str, batch: int, seq: int, checkpointing: bool | int = False,
                        attention: str = "sdpa", sdpa_like_cuda: bool = True) -> int:
    """Bytes a real CPU forward saves for backward. ``checkpointing``: True for every layer; N for every N-th
    (HF's checkpointing kept on the layers torchtitan's ac_freq N wraps: 1-based counts divisible by N).
    ``sdpa_like_cuda``: sdpa's kernel as CUDA picks it (the math path for fp32 with grouped heads), as memcalc's
    measured steps run it; else the CPU's own (its flash kernel takes fp32)."""
    import contextlib

    from memcalc.measure.cuda_semantics import kernels_like_cuda

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
        if checkpointing is not True:
            for index, layer in enumerate(model.model.layers):
                layer.gradient_checkpointing = (index + 1) % checkpointing == 0
    # Parameters, and autocast's low-precision copies of them (the autocast_weight_copies term), are not
    # activations: the copies are recognised as the outputs of a dtype cast whose input is a parameter.
    # Registered buffers (BERT's position_ids, sliced and saved by the position embedding) are model state too.
    excluded = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    parameter_ptrs = set(excluded)
    saved: dict[int, object] = {}

    copies = []

    class WeightCopies(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in parameter_ptrs:
                excluded.add(out.untyped_storage().data_ptr())
                # Held, so that its address is not handed to a later activation once a temporary copy (Gemma's
                # weight.float() in 1 + weight) is freed: that activation would be taken for a copy.
                copies.append(out)
            return out

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            # Keep the storage alive: a saved tensor whose node dies at once (an unused topk's indices) must
            # not hand its address to a later one and be counted as that one.
            saved[storage.data_ptr()] = storage
        return tensor

    ids = torch.randint(1, raw["vocab_size"], (batch, seq))
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), WeightCopies(),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
          kernels_like_cuda() if sdpa_like_cuda else contextlib.nullcontext()):
        model(input_ids=ids, labels=ids)
    return sum(storage.nbytes() for storage in saved.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_activations_match_exactly(family, recipe, attention):
    raw = tiny_raw(family)
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    print(f"{family:8s} {recipe:9s} {attention:5s} estimated {estimated:>10,} measured {measured:>10,} "
          f"error {100 * (estimated - measured) / measured:+.2f}%")
    assert estimated == measured


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_grouped_heads_count_cudas_math_sdpa(family):
    """fp32 with grouped kv heads under sdpa: CUDA's kernels refuse it (measured on an H200, torch 2.11:
    benchmarks/sdpa_backends.py) and torch runs _scaled_dot_product_attention_math. The estimate equals, to the byte,
    what a CPU forward saves with SDPA held to that math path, and is above what the CPU's own flash kernel keeps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from memcalc.activations import SDPA_MATH_NOTE

    raw = tiny_raw(family)
    estimated, report = estimated_saved_bytes(raw, "fp32", batch=2, seq=48)
    if not any(SDPA_MATH_NOTE.split("(")[0] in note for note in report.notes):
        pytest.skip(f"{family}: no grouped kv heads in its tiny config, or no sdpa path")
    like_cuda = measure_saved_bytes(raw, "fp32", batch=2, seq=48)
    with sdpa_kernel(SDPBackend.MATH):
        math = measure_saved_bytes(raw, "fp32", batch=2, seq=48, sdpa_like_cuda=False)
    flash = measure_saved_bytes(raw, "fp32", batch=2, seq=48, sdpa_like_cuda=False)
    print(f"{family}: estimated {estimated:,} math measured {math:,} (the CPU's flash: {flash:,})")
    assert estimated == like_cuda == math and math > flash


@pytest.mark.parametrize("softcaps", [(50.0, 30.0), (50.0, None), (None, 30.0), (None, None)])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gemma2_softcapping_and_sandwich_norms(recipe, softcaps):
    """Gemma2 runs eager attention (no sdpa path); attention softcapping saves tanh's (b, a, s, s) output per layer,
    final-logit softcapping tanh's (b, s, vocab) output; the two post-norms feed residual adds (nothing saves
    their output)."""
    attn_cap, final_cap = softcaps
    raw = {**GEMMA2, "attn_logit_softcapping": attn_cap, "final_logit_softcapping": final_cap}
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, attention="eager")
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48)  # sdpa asked: counted eager
    print(f"gemma2 {recipe} {softcaps}: estimated {estimated:,} measured {measured:,}")
    assert estimated == measured


def test_gemma2_without_sdpa_is_counted_eager_and_says_so():
    eager, _ = estimated_saved_bytes(GEMMA2, "bf16-pure", batch=2, seq=48, attention="eager")
    asked_sdpa, report = estimated_saved_bytes(GEMMA2, "bf16-pure", batch=2, seq=48, attention="sdpa")
    assert asked_sdpa == eager
    assert any("no sdpa path" in note for note in report.notes)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gemma3_qk_norms_and_sandwich_norms(recipe, attention):
    """Gemma3RMSNorm on q and k saves x.float() and the fp32 product whatever the compute dtype, and (1 + weight).
    The window (4096) is longer than the sequence: sliding layers run like full ones (no explicit mask)."""
    measured = measure_saved_bytes(GEMMA3, recipe, batch=2, seq=48, attention=attention)
    estimated, _ = estimated_saved_bytes(GEMMA3, recipe, batch=2, seq=48, attention=attention)
    print(f"gemma3 {recipe} {attention}: estimated {estimated:,} measured {measured:,}")
    assert estimated == measured


def test_sliding_window_is_counted_only_where_the_kernel_needs_a_mask():
    """Gemma3's sliding layers with sdpa get an explicit mask (counted, and said); flash_attention_2 and eager need
    none beyond what they keep anyway."""
    _, report = estimated_saved_bytes({**GEMMA3, "sliding_window": 16}, "bf16-pure", batch=2, seq=48)
    assert any(note.startswith("sliding window 16 < seq 48") for note in report.notes)
    for attention in ("flash", "eager"):
        _, other = estimated_saved_bytes({**GEMMA3, "sliding_window": 16}, "bf16-pure", batch=2, seq=48,
                                         attention=attention)
        assert not any("sliding window" in note for note in other.notes)




@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gpt2_saved_activations(recipe, attention, use_cache):
    """GPT-2 with dropout off. CPU-vs-CUDA differences, explicitly: bf16: CUDA's layer_norm keeps mean/rstd in fp32,
    the CPU kernel in bf16 (5 LayerNorms x 2 x T x 2 B); amp-bf16: CUDA autocast runs NewGELU's pow in fp32 (its
    input cast, tanh and 1 + tanh saved in fp32, c_proj saving a cast of the fp32 output), CPU autocast in bf16:
    (12 + 2c - 5c) T I per layer."""
    raw = {**GPT2, "use_cache": use_cache}
    tokens, inner = 2 * 48, 4 * 96
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, attention=attention)
    cpu = {"bf16-pure": 5 * 2 * tokens * (4 - 2), "fp32": 0,
           "amp-bf16": 2 * (12 + 2 * 2 - 5 * 2) * tokens * inner}[recipe]
    print(f"gpt2 {recipe} {attention}: estimated {estimated:,} (CPU differences -{cpu}) measured {measured:,}")
    assert estimated - cpu == measured


@pytest.mark.parametrize("recipe", ["bf16-pure", "amp-bf16"])
def test_checkpointing_keeps_layer_inputs(recipe):
    """During the forward only each layer's input is saved; one layer is recomputed at a time in backward."""
    raw = tiny_raw("llama")
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, checkpointing=True)
    checkpointed, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, checkpointing=True)
    from memcalc import activations
    from memcalc.precision import get_recipe

    config = ModelConfig("tiny", raw, "test")
    model = model_of(config)
    spec = TrainingSpec(precision=recipe, micro_batch_size=2, seq_len=48, checkpointing="full")
    per_layer = activations.estimate(model, spec, get_recipe(spec.precision)).recompute_bytes
    two_layers, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48)
    one_layer, _ = estimated_saved_bytes({**raw, "num_hidden_layers": 1}, recipe, batch=2, seq=48)
    # A recomputed layer saves what the layer saves without checkpointing, but under autocast its input norm's
    # .to(float32) of the fp32 residual stream is the kept input itself, counted once, with the kept inputs
    # (Rule.recompute_saves_input; in bf16-pure the norm saves its own fp32 copy).
    kept_input = 4 * 2 * 48 * BASE["hidden_size"] if recipe == "amp-bf16" else 0
    assert per_layer + kept_input == two_layers - one_layer
    # Rotary cos/sin (2 x s x head_dim) and position_ids (int64 s) are arguments of the checkpointed layers: alive,
    # but held by the checkpoint rather than saved through the hooks this measurement sees.
    dtype_bytes = 4 if recipe == "amp-bf16" else 2
    rotary = 2 * 48 * (BASE["hidden_size"] // BASE["num_attention_heads"]) * dtype_bytes
    position_ids = 8 * 48
    print(f"checkpointing {recipe}: estimate {checkpointed - per_layer:,} (+ {per_layer:,} recomputed) "
          f"measured {measured:,}")
    assert checkpointed - rotary - position_ids == measured


@pytest.mark.parametrize("recipe", ["bf16-pure", "amp-bf16"])
@pytest.mark.parametrize(("every", "layers"), [(2, 4), (3, 4), (4, 4)])
def test_checkpointing_every_nth_layer(every, layers, recipe):
    """--checkpointing every:N (torchtitan's layer frequency): checkpointed layers keep their input, the others
    everything; measured with HF's checkpointing on those layers only. Layer 0 is never checkpointed here, so the
    rotary tables are saved through the hooks as without checkpointing."""
    raw = {**tiny_raw("llama"), "num_hidden_layers": layers}
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, checkpointing=every)
    estimated, report = estimated_saved_bytes(raw, recipe, batch=2, seq=48, checkpointing=f"every:{every}")
    assert report.training.checkpointing == f"every:{every}"
    assert estimated == measured


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_aux_loss(family, recipe):
    """output_router_logits: load_balancing_loss_func's softmax over each layer's router logits is saved too.

    Two differences from what stays alive, both explicit here: CUDA autocast runs that softmax in fp32, CPU
    autocast in bf16 (2 bytes less per element); and the topk it takes per layer saves its int64 indices
    through the hooks (8 T k), but the topk values are discarded, so that node and its indices die at once.
    """
    raw = {**tiny_raw(family), "output_router_logits": True}
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


T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 96, "d_ff": 160, "d_kv": 24,
      "num_layers": 2, "num_decoder_layers": 1, "num_heads": 4, "vocab_size": 300, "dropout_rate": 0.0,
      "decoder_start_token_id": 0, "pad_token_id": 0}


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu", "gated-silu"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_t5_saved_activations(recipe, feed_forward_proj):
    """T5ForConditionalGeneration with eager attention (on the CPU, sdpa with the relative-position bias as a mask
    that needs a gradient takes the math kernel; CUDA's memory-efficient kernel takes it as the formula says).
    The encoder and decoder inputs have the same length. CPU-vs-CUDA differences, explicitly:
    - labels=input_ids: one int64 tensor where a real batch has two (8 T);
    - amp-bf16: the cross-attention scores (bf16, zero bias in bf16) go through softmax in bf16 on the CPU, in fp32 on
      CUDA, which then casts them for the matmul (4 b a s^2 per decoder layer)."""
    batch, seq = 2, 48
    tokens = batch * seq
    raw = {**T5, "feed_forward_proj": feed_forward_proj}
    measured = measure_saved_bytes(raw, recipe, batch=batch, seq=seq, attention="eager")
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=batch, seq=seq, attention="eager")
    cpu = 8 * tokens + (1 * 4 * batch * 4 * seq * seq if recipe == "amp-bf16" else 0)
    print(f"t5 {recipe} {feed_forward_proj}: estimated {estimated:,} (CPU differences -{cpu:,}) measured {measured:,} "
          f"diff {estimated - cpu - measured:,}")
    assert estimated - cpu == measured


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
@pytest.mark.parametrize("recipe", ["bf16-pure", "fp32"])
def test_t5_dropout_masks(recipe, feed_forward_proj):
    """dropout_rate 0.1 (eager): 1-byte CUDA masks where the CPU saves noise in c. Masks: 4 T h per model
    (embedding and final dropout of both stacks); per layer T I (feed-forward inner), T h per sub-layer output
    (2 encoder, 3 decoder) and b a s^2 per attention (1 encoder, 2 decoder)."""
    batch, seq, c = 2, 48, 2 if recipe == "bf16-pure" else 4
    tokens, enc, dec = batch * seq, 2, 1
    raw = {**T5, "feed_forward_proj": feed_forward_proj, "dropout_rate": 0.1}
    measured = measure_saved_bytes(raw, recipe, batch=batch, seq=seq, attention="eager")
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=batch, seq=seq, attention="eager")
    masks = (4 * tokens * 96 + (enc + dec) * tokens * 160 + (2 * enc + 3 * dec) * tokens * 96
             + (enc + 2 * dec) * batch * 4 * seq * seq)
    assert estimated - 8 * tokens + (c - 1) * masks == measured


DEEPSEEK = {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 96,
            "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 300, "max_position_embeddings": 256, "kv_lora_rank": 32, "q_lora_rank": 48,
            "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
            "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "first_k_dense_replace": 1,
            "n_group": 2, "topk_group": 1}


@pytest.mark.parametrize("variant", [{"topk_method": "greedy"}, {"topk_method": "group_limited_greedy"},
                                     {"q_lora_rank": None}])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_deepseek_v2_saved_activations(recipe, variant):
    """MLA + MoE (layer 0 dense, layer 1 MoE with a shared expert), eager attention: on the CPU, sdpa with
    qk_head_dim != v_head_dim takes the math kernel (CUDA: memory-efficient attention, as the formula says)."""
    raw = {**DEEPSEEK, **variant}
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48, attention="eager")
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=2, seq=48, attention="eager")
    # group_limited_greedy: the max over expert groups and the topk over group scores save int64 indices through the
    # hooks, but only the topk's indices are used: both nodes die when the router returns (8 T (n_group + topk_group)).
    dead = 8 * 2 * 48 * (2 + 1) if variant.get("topk_method") == "group_limited_greedy" else 0
    assert estimated == measured - dead


LAYER_NORM_CASES = [(name, attention) for name, (_, _, attentions) in LAYER_NORM_FAMILIES.items()
                    for attention in attentions]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize(("family", "attention"), LAYER_NORM_CASES)
def test_layer_norm_decoders_saved_activations(family, attention, recipe):
    """OPT, BLOOM (eager only in transformers), Phi, Falcon (Falcon-7B multi-query: its sdpa runs the math
    backend, upcast to fp32, on the CPU as on CUDA), dropout off. CPU-vs-CUDA differences, explicitly:
    - bf16: CPU LayerNorm statistics in bf16, CUDA in fp32 (LayerNorms x 2 x T x 2 B);
    - amp-bf16, Phi: CUDA autocast runs NewGELU's pow in fp32 (the fp32 input, tanh and 1 + tanh saved in fp32
      and fc2 saving a cast), CPU autocast keeps it in bf16: (12 + 2c - 5c) T I per layer."""
    raw, layer_norms, _ = LAYER_NORM_FAMILIES[family]
    batch, seq = 2, 48
    tokens = batch * seq
    measured = measure_saved_bytes(raw, recipe, batch=batch, seq=seq, attention=attention)
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=batch, seq=seq, attention=attention)
    cpu = layer_norms * 2 * tokens * (4 - 2) if recipe == "bf16-pure" else 0
    if recipe == "amp-bf16" and family == "phi":
        cpu += 2 * (12 + 2 * 2 - 5 * 2) * tokens * 160
    print(f"{family} {recipe} {attention}: estimated {estimated:,} (CPU differences -{cpu:,}) measured {measured:,}")
    assert estimated - cpu == measured


@pytest.mark.parametrize("recipe", ["bf16-pure", "fp32"])
@pytest.mark.parametrize("family", ["opt", "bloom", "phi", "falcon-sequential"])
def test_layer_norm_decoders_dropout_masks(family, recipe):
    """Dropout on, eager attention (attention dropout too): 1-byte CUDA masks where the CPU saves c-byte noise.
    Masks per layer: 2 T h (after attention and after the MLP) and b a s^2 (Falcon's rotary eager attention drops
    no probabilities before transformers 5.25, modeling_falcon.py FalconAttention.forward; 5.25's
    eager_attention_forward does); Phi also T h per model (embd_pdrop).
    (The dropped probs replace the c copy of the fp32 softmax as the matmul's saved input: new bytes only in fp32.)"""
    raw, layer_norms, _ = LAYER_NORM_FAMILIES[family]
    keys = {"opt": ("dropout", "attention_dropout"), "bloom": ("hidden_dropout", "attention_dropout"),
            "phi": ("resid_pdrop", "attention_dropout", "embd_pdrop"),
            "falcon-sequential": ("hidden_dropout", "attention_dropout")}[family]
    raw = {**raw, **{key: 0.1 for key in keys}}
    batch, seq, c = 2, 48, 2 if recipe == "bf16-pure" else 4
    tokens = batch * seq
    measured = measure_saved_bytes(raw, recipe, batch=batch, seq=seq, attention="eager")
    estimated, _ = estimated_saved_bytes(raw, recipe, batch=batch, seq=seq, attention="eager")
    dropped = not family.startswith("falcon") or (installed_transformers() or REWRITTEN) >= REWRITTEN
    scores = batch * 4 * seq * seq if dropped else 0
    masks = 2 * (2 * tokens * 96 + scores) + (tokens * 96 if family == "phi" else 0)
    cpu = (layer_norms * 2 * tokens * (4 - 2) if recipe == "bf16-pure" else 0) - (c - 1) * masks
    assert estimated - cpu == measured


@pytest.mark.parametrize("recipe", ["bf16-pure", "amp-bf16"])
@pytest.mark.parametrize(("family", "toggle"), [
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 1}),
    ("mixtral", {"sliding_window": 16}),
    ("phi3", {"use_cache": False}),
    ("phi3", {"sliding_window": 16}),
])
def test_config_paths_that_change_what_attention_saves(family, toggle, recipe):
    """A sliding window shorter than the sequence gives sdpa an explicit mask: transformers then repeats k and v to
    every head (no enable_gqa) and sdpa keeps the mask as a float bias, in the sliding layers only (qwen2: from
    max_window_layers on). Phi-3 without a cache saves v as a view of the fused qkv output, keeping all of it."""
    raw = {**tiny_raw(family), **toggle}
    measured = measure_saved_bytes(raw, recipe, batch=2, seq=48)
    estimated, report = estimated_saved_bytes(raw, recipe, batch=2, seq=48)
    print(f"{family} {toggle} {recipe}: estimated {estimated:,} measured {measured:,}")
    assert estimated == measured
    if "sliding_window" in toggle:
        assert any(note.startswith("sliding window 16 < seq 48") for note in report.notes)



def test_the_flash_backward_s_own_workspace_is_named_where_large():
    """FlashAttention-2's mha_bwd (flash_api.cpp) allocates softmax_d (fp32 b x heads x s rounded to 128), dq_accum
    (fp32 b x s rounded x heads x head_dim rounded to 32) and, with grouped kv heads, dk/dv for every head (16-bit
    b x s x heads x head_dim each). Llama-3-8B (32 heads, 8 kv heads, head_dim 128), b1 s8192 bf16:
    4 x 32 x 8192 x (1 + 128) + 2 x 2 x 8192 x 32 x 128 = 269,484,032 B, 257 MiB: named, not counted."""
    from memcalc import api

    notes = api.estimate("llama-3-8b", seq_len=8192, precision="bf16-pure").notes
    assert any(n.startswith("attention: not counted: each layer's flash backward allocates 257 MiB") for n in notes)
    # fp32 takes no flash kernel; 2,048 tokens allocate 64 MiB, below the line; eager has no flash backward
    for settings in ({"seq_len": 8192, "precision": "fp32"}, {"seq_len": 2048, "precision": "bf16-pure"},
                     {"seq_len": 8192, "precision": "bf16-pure", "attn": "eager"}):
        assert not any("flash backward" in n for n in api.estimate("llama-3-8b", **settings).notes), settings
