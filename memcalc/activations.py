"""Activations saved for backward, and the logits/loss buffers.

For Llama-style decoders (llama, mistral, qwen2/3, gemma*, phi3, mixtral, qwen*_moe) the per-layer bytes
are derived below from what transformers' modeling code saves for backward (modeling_llama.py:
LlamaRMSNorm, LlamaAttention + sdpa/eager attention, LlamaMLP; loss/loss_utils.py ForCausalLMLoss).
Other families use Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", eq. 2): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, without the 5as/h score term for fused
attention. Neither is yet checked against a measured step; a later issue measures and refines them.

Notation: T = micro_batch * seq_len tokens, h hidden, I intermediate, a heads, g kv heads, d head_dim,
V vocab, c bytes of the compute dtype. Per Llama-style layer, non-checkpointed, sdpa attention (checked
tensor by tensor with torch.autograd.graph.saved_tensors_hooks on tiny models, tests/test_activations.py):
  each RMSNorm     fp32 copy of its input 4Th, rsqrt 4T, normalized input in c (cTh), output in c (cTh)
                   (Gemma keeps the fp32 normalized product instead: see _norm_bytes)
  q, k, v          rotary outputs and v as sdpa saves them: cT(a*d) + 2 cT(g*d)
  attention        sdpa output cT(a*d) (o_proj reads it in place: it is laid out (b, s, a, d)) + logsumexp 4Ta;
                   eager: q, k, v for all a heads 3 cT(a*d), fp32 softmax 4 b a s^2, probs c b a s^2, o_proj copy
  MLP (gated)      gate out, act out, up out, product: 4 cTI (MoE: top-k experts per token)
  autocast         each Linear saves its own cast of an fp32 input: 5 cTh (q, k, v, gate, up)
Per model: rotary cos and sin 2*s*d (fp32 under autocast, else c), token ids and labels 2 x 8T, the final
norm, and under autocast the lm_head input cast cTh.
Causal-LM loss (loss_utils.ForCausalLMLoss, HF Trainer drops the logits before backward): log_softmax
saves its fp32 output (4TV) until backward. During the loss, the c logits and their fp32 upcast exist too
((c + 4)TV, forward transient); at the start of backward two fp32 TxV gradients coexist (8TV).
Checkpointing full (HF gradient_checkpointing_enable): each layer keeps only its input (cTh, fp32 under
autocast); one layer's activations are recomputed at a time during backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memcalc.precision import DTYPE_BYTES, Recipe
from memcalc.report import TERM_ACTIVATIONS, TERM_LOSS_BUFFERS, Phase, Term
from memcalc.spec import Attention, Checkpointing

if TYPE_CHECKING:
    from memcalc.engine import ModelInput
    from memcalc.spec import TrainingSpec

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
               "qwen2_moe", "qwen3_moe")
GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")
FOUR_NORMS = ("gemma2", "gemma3_text")  # pre/post attention and pre/post feed-forward norms
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
QK_NORMS = ("qwen3", "qwen3_moe", "gemma3_text")
FP32_BYTES = 4
SOURCE_LLAMA = ("derived from transformers modeling_llama.py (RMSNorm, attention, MLP) and "
                "loss_utils.ForCausalLMLoss; equal to the saved tensors of a CPU forward (sdpa) in the tests")
SOURCE_GPT2 = ("derived from transformers modeling_gpt2.py (LayerNorm, Conv1D, sdpa/eager attention, NewGELU) "
               "and checked against the saved tensors of a CPU forward in the tests")
SOURCE_MOE = ("MoE blocks from modeling_mixtral.py / modeling_qwen*_moe.py routers and integrations/moe.py "
              "grouped_mm_experts_forward; tokens per expert summed over experts as T x num_experts_per_tok")
SOURCE_BERT = ("derived from transformers modeling_bert.py (BertEmbeddings, BertSelfAttention sdpa/eager, BertSelfOutput, "
               "BertIntermediate, BertOutput, BertLMPredictionHead) and checked against the saved tensors of a CPU forward")
SOURCE_KORTHIKANTI = "Korthikanti et al. 2022, eq. 2 (GPT-style layer, 16-bit); first approximation"


@dataclass
class ActivationEstimate:
    terms: list[Term] = field(default_factory=list)
    forward_transient_extra_bytes: int = 0
    backward_start_extra_bytes: int = 0
    recompute_bytes: int = 0  # checkpointing: one layer's activations, rebuilt during backward
    # Late in backward (the first layer's turn): that layer's activations and its gradient transients
    # (the MLP intermediate's and the residual's gradients, c*T*(I + h)) beside nearly every gradient.
    last_layer_bytes: int = 0
    layer_backward_transient_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _text_config(raw: dict[str, Any]) -> dict[str, Any]:
    if "hidden_size" not in raw and isinstance(raw.get("text_config"), dict):
        return {**raw["text_config"], "model_type": raw["text_config"].get("model_type", raw.get("model_type"))}
    return raw


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


@dataclass(frozen=True)
class _Run:
    """The shapes and dtypes of one micro-batch's forward."""

    b: int
    s: int
    c: int  # bytes of the compute dtype
    autocast: bool
    eager: bool  # --attn eager (else sdpa/flash)

    @property
    def tokens(self) -> int:
        return self.b * self.s

    @property
    def residual(self) -> int:
        """Bytes of the residual stream: fp32 under autocast (fp32 weights), else the compute dtype."""
        return FP32_BYTES if self.autocast else self.c


@dataclass
class _Loss:
    """The logits and the cross-entropy over them: rows x vocab, and the dtype log_softmax saves."""

    rows: int
    vocab: int
    log_softmax_bytes: int  # 4: the loss upcasts (ForCausalLMLoss, CUDA autocast); else the logits' dtype
    source: str = ("transformers loss_utils.ForCausalLMLoss: logits.float() then cross_entropy; log_softmax saves "
                   "its output. HF Trainer drops the model output (and its logits) before backward")


@dataclass
class _Rule:
    """What one family's forward saves: per layer (forward order), per model, and the loss."""

    layers: list[int]
    formula: str  # the first layer's bytes, part by part
    model_level: int
    source: str
    kept: int  # checkpointing full: what the forward keeps instead of the layers' activations (their inputs)
    transient: int  # late in backward: the first layer's gradient transients (its widest gradients)
    loss: _Loss | None
    notes: list[str] = field(default_factory=list)


def estimate(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> ActivationEstimate:
    result = ActivationEstimate()
    if model.config is None:
        result.notes.append("activations need an architecture: with --params only, the peak excludes them")
        return result
    raw = _text_config(model.config.raw)
    model_type = str(raw.get("model_type", ""))
    run = _Run(spec.micro_batch_size, spec.seq_len, DTYPE_BYTES[recipe.compute_dtype], recipe.autocast,
               spec.attention == Attention.eager)
    h = int(_first(raw, "hidden_size", "n_embd", "d_model", default=0))
    num_layers = int(_first(raw, "num_hidden_layers", "n_layer", "num_layers", default=0))
    if not h or not num_layers:
        result.notes.append(f"activations not modelled for model_type '{model_type}' (no hidden size / layers found)")
        return result
    family = _FAMILIES.get(model_type)
    rule = family(raw, model_type, run) if family else _korthikanti(raw, model_type, run, h, num_layers)
    result.notes.extend(rule.notes)
    per_model = rule.model_level
    if family is not None:
        result.last_layer_bytes = rule.layers[0]
        result.layer_backward_transient_bytes = rule.transient
    if spec.checkpointing == Checkpointing.full:
        total = rule.kept + per_model
        result.recompute_bytes = max(rule.layers)
        formula = (f"layer inputs {rule.kept:,} B + per model {per_model:,} B; during backward one layer is "
                   f"recomputed at a time ({max(rule.layers):,} B: {rule.formula})")
    else:
        total = sum(rule.layers) + per_model
        uniform = all(n == rule.layers[0] for n in rule.layers)
        layers = (f"{len(rule.layers)} layers x {rule.layers[0]:,} B per layer" if uniform else
                  f"{len(rule.layers)} layers, {sum(rule.layers):,} B (first layer {rule.layers[0]:,} B)")
        formula = f"{layers} ({rule.formula}) + per model {per_model:,} B"
    result.terms.append(Term(
        name=TERM_ACTIVATIONS, bytes=total, formula=formula, source=rule.source, category="activations",
        phases=[Phase.forward, Phase.backward],
    ))
    loss = rule.loss
    if loss is not None and loss.vocab:
        rows_vocab = loss.rows * loss.vocab
        kept = rows_vocab * loss.log_softmax_bytes
        # The logits (compute dtype) and, when the loss upcasts them, their fp32 copy exist during the loss
        # beside the log_softmax output; at the start of backward the gradients of the log_softmax output and
        # of its input coexist, in the log_softmax dtype.
        upcast = loss.log_softmax_bytes if loss.log_softmax_bytes != run.c else 0
        result.forward_transient_extra_bytes = rows_vocab * (run.c + upcast)
        result.backward_start_extra_bytes = 2 * rows_vocab * loss.log_softmax_bytes
        result.terms.append(Term(
            name=TERM_LOSS_BUFFERS, bytes=kept,
            formula=f"log_softmax output {loss.rows:,} x {loss.vocab:,} x {loss.log_softmax_bytes} B (saved until "
                    f"backward); during the loss also the logits{' and their fp32 upcast' if upcast else ''} "
                    f"({result.forward_transient_extra_bytes:,} B), at the start of backward two gradients "
                    f"({result.backward_start_extra_bytes:,} B)",
            source=loss.source, category="activations", phases=[Phase.forward, Phase.backward],
        ))
    return result


def _korthikanti(raw: dict[str, Any], model_type: str, run: _Run, h: int, num_layers: int) -> _Rule:
    # Korthikanti eq. 2 counts 16-bit activations; fused attention (sdpa default) drops 5as/h.
    per_layer = run.tokens * h * 34 * run.c // 2
    vocab = int(_first(raw, "vocab_size", default=0))
    note = (f"activations for model_type '{model_type}' use Korthikanti's GPT formula: an approximation, not derived "
            "from its transformers code")
    return _Rule([per_layer] * num_layers, f"s*b*h*34 (x c/2) = {run.tokens:,} x {h:,} x 34 x {run.c}/2", 0,
                 SOURCE_KORTHIKANTI, num_layers * run.tokens * h * run.residual, 0,
                 _Loss(run.tokens, vocab, FP32_BYTES), [note])


def _llama(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """Llama-style decoders: layers from _llama_layers; per model rotary, ids, scalars, final norm, head input."""
    h, tokens, c = int(raw["hidden_size"]), run.tokens, run.c
    a = int(_first(raw, "num_attention_heads", default=1))
    num_layers = int(raw["num_hidden_layers"])
    layers, formula = _llama_layers(raw, model_type, num_layers, run, h, a)
    d = int(_first(raw, "head_dim", default=h // a))
    rotary = 2 * run.s * d * (FP32_BYTES if run.autocast else c)
    ids = 2 * 8 * tokens  # int64 input_ids (embedding) and shifted labels (nll_loss)
    # 0-dim tensors: the loss divisor (fixed_cross_entropy) in fp32; Gemma's embedding scale in c.
    embed_scale = (FP32_BYTES if run.autocast else c) if model_type in GEMMA_NORMS else 0
    scalars = FP32_BYTES + embed_scale
    final_norm = _norm_bytes(model_type, tokens, h, c, run.autocast) + (c * tokens * h if run.autocast else 0)
    model_level = rotary + ids + scalars + final_norm
    notes = []
    if model_type in MOE_TYPES:
        model_level += _moe_aux_loss_model_bytes(raw, model_type)
    if not run.eager:
        notes.append("attention: sdpa/flash kernels keep no s^2 scores (--attn eager keeps them)")
    source = SOURCE_LLAMA + ("; " + SOURCE_MOE if model_type in MOE_TYPES else "")
    intermediate = int(_first(raw, "intermediate_size", default=4 * h))
    return _Rule(layers, formula, model_level, source, num_layers * tokens * h * run.residual,
                 c * tokens * (intermediate + h), _Loss(tokens, int(raw.get("vocab_size") or 0), FP32_BYTES), notes)


def _gpt2(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    h, a, num_layers = int(raw["n_embd"]), int(raw["n_head"]), int(raw["n_layer"])
    per_layer, formula, model_level = _gpt2_bytes(raw, run.tokens, run.b, run.s, h, a, run.c, run.autocast, run.eager)
    intermediate = int(_first(raw, "n_inner", default=None) or 4 * h)
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_GPT2,
                 num_layers * run.tokens * h * run.residual, run.c * run.tokens * (intermediate + h),
                 _Loss(run.tokens, int(raw.get("vocab_size") or 0), FP32_BYTES))


def _llama_layers(raw: dict[str, Any], model_type: str, num_layers: int, run: _Run, h: int,
                  a: int) -> tuple[list[int], str]:
    """Bytes each Llama-style layer saves (attention part + dense MLP or MoE block), and the first's formula."""
    tokens, b, s, c, autocast, eager = run.tokens, run.b, run.s, run.c, run.autocast, run.eager
    g = int(_first(raw, "num_key_value_heads", default=a))
    d = int(_first(raw, "head_dim", default=h // a))
    num_norms = 4 if model_type in FOUR_NORMS else 2
    norms = num_norms * _norm_bytes(model_type, tokens, h, c, autocast)
    qkv = c * tokens * (a * d + 2 * g * d)  # q_embed, k_embed, v as sdpa saves them
    o_proj_copy = 0
    if model_type == "phi3" and not eager:
        # Phi3Attention slices q, k, v out of one fused qkv_proj output; with v a strided view, sdpa's
        # output is not laid out (b, s, a, d) and o_proj saves a contiguous copy of it (measured on the
        # CPU, tests/test_activations.py; not yet checked on CUDA).
        o_proj_copy = c * tokens * a * d
    # Qwen3/Gemma3 per-head q/k RMSNorm: fp32 copy of the input, rsqrt, normalized in c.
    qk_norm = (4 + c) * tokens * (a + g) * d + FP32_BYTES * tokens * (a + g) if model_type in QK_NORMS else 0
    attention = c * tokens * a * d + FP32_BYTES * tokens * a  # sdpa output (o_proj reads it in place) + logsumexp
    if eager:
        # modeling_llama.eager_attention_forward: repeat_kv materialises k and v for every head; the two
        # matmuls save q, k (a heads), probs in c and v (a heads); softmax(dtype=fp32) saves its fp32
        # output (4 b a s^2) and .to(c) the probs (c b a s^2); o_proj saves a contiguous copy of the
        # (b, a, s, d) output.
        qkv = 3 * c * tokens * a * d
        probs_copy = c if c != FP32_BYTES else 0  # .to(fp32) of an fp32 softmax is the same tensor
        attention = c * tokens * a * d + (FP32_BYTES + probs_copy) * b * a * s * s
    # Under autocast each Linear saves its own low-precision cast of an fp32 input: q, k, v (phi3: one fused
    # qkv_proj); the MLP's are counted with it. o_proj and down_proj get 16-bit inputs already.
    attention_casts = (1 if model_type == "phi3" else 3) * c * tokens * h if autocast else 0
    attention_part = norms + attention_casts + qkv + qk_norm + attention + o_proj_copy
    layers, first = [], ""
    for i in range(num_layers):
        mlp, mlp_formula = _mlp_bytes(raw, model_type, i, run, h)
        layers.append(attention_part + mlp)
        if i == 0:
            first = (f"norms {norms:,}{f' + autocast input casts {attention_casts:,}' if attention_casts else ''} + "
                     f"q/k/v {qkv:,}{f' + q/k norms {qk_norm:,}' if qk_norm else ''} + attention {attention:,}"
                     f"{f' + o_proj input copy {o_proj_copy:,}' if o_proj_copy else ''} + {mlp_formula}")
    return layers, first


def _mlp_bytes(raw: dict[str, Any], model_type: str, layer: int, run: _Run, h: int) -> tuple[int, str]:
    """A Llama-style layer's MLP: LlamaMLP (gate out, act out, up out, product: 4 cTI) or the MoE block."""
    if model_type in MOE_TYPES and _is_sparse_layer(raw, model_type, layer):
        return _moe_bytes(raw, model_type, run, h)
    intermediate = int(_first(raw, "intermediate_size", default=4 * h))
    # Under autocast gate_proj and up_proj (phi3: one gate_up_proj) each save their own cast of the fp32 input.
    casts = (1 if model_type == "phi3" else 2) * run.c * run.tokens * h if run.autocast else 0
    mlp = 4 * run.c * run.tokens * intermediate
    return mlp + casts, f"MLP {mlp:,}{f' + MLP input casts {casts:,}' if casts else ''}"


def _is_sparse_layer(raw: dict[str, Any], model_type: str, layer: int) -> bool:
    """Which layers get the MoE block: every Mixtral layer; Qwen2Moe/Qwen3MoeDecoderLayer: not in
    mlp_only_layers and (layer + 1) % decoder_sparse_step == 0."""
    if model_type == "mixtral":
        return True
    step = int(raw.get("decoder_sparse_step") or 1)
    return layer not in (raw.get("mlp_only_layers") or []) and _num_experts(raw) > 0 and (layer + 1) % step == 0


def _num_experts(raw: dict[str, Any]) -> int:
    return int(_first(raw, "num_local_experts", "num_experts", "n_routed_experts", default=8))


def _moe_bytes(raw: dict[str, Any], model_type: str, run: _Run, h: int) -> tuple[int, str]:
    """One MoE block: the router, the experts as grouped_mm_experts_forward runs them, the shared expert.

    Router (MixtralTopKRouter / Qwen*MoeTopKRouter): F.linear on the post-attention norm output (saved by the
    norm's count), softmax in fp32 saves its output (4 T E), topk saves its int64 indices (8 T k); when the
    top-k weights are renormalised (Mixtral always, Qwen with norm_topk_prob) the in-place division keeps
    the weights before division and their sum (4 T k + 4 T).
    Experts (integrations/moe.py grouped_mm_experts_forward, transformers' default experts_implementation;
    F.grouped_mm on CUDA SM80+, and on the CPU with torch 2.13): S = T k token-expert pairs. Three int64
    permutations (the gather of the tokens, of their weights, the restoring gather: 3 x 8 S), the int32 group
    offsets (4 E), the gathered tokens (e S h, the up projection's input), the gate_up output (2 e S I: silu
    and the product read its halves), silu's output and the product (e S I each, the product is the down
    projection's input), the down output (e S h, multiplied by the routing weights) and the gathered routing
    weights (S, fp32 for Mixtral, the router logits' dtype c for Qwen). grouped_mm has no autocast rule: under
    amp-* the experts run in the fp32 of the norm output and the weights (e = 4), else e = c.
    The split of S over the experts depends on the routing; the total S = T k is exact, so the bytes are.
    Qwen2Moe's shared expert (Qwen2MoeMLP on every token): 4 c T I_shared as LlamaMLP, its output c T h and
    the sigmoid gate c T (both saved by the product).
    """
    tokens, c = run.tokens, run.c
    k = int(_first(raw, "num_experts_per_tok", default=2))
    num_experts = _num_experts(raw)
    intermediate = int(_first(raw, "moe_intermediate_size", "intermediate_size", default=4 * h))
    pairs = tokens * k
    e = FP32_BYTES if run.autocast else c
    renormalise = model_type == "mixtral" or bool(raw.get("norm_topk_prob", False))
    router = FP32_BYTES * tokens * num_experts + 8 * pairs + ((FP32_BYTES * pairs + FP32_BYTES * tokens) if renormalise else 0)
    weights_bytes = FP32_BYTES if model_type == "mixtral" else c
    experts = 3 * 8 * pairs + 4 * num_experts + e * pairs * (2 * h + 4 * intermediate) + weights_bytes * pairs
    casts = c * tokens * h if run.autocast else 0  # the router's F.linear casts the fp32 norm output
    shared = 0
    if model_type == "qwen2_moe":
        shared_intermediate = int(_first(raw, "shared_expert_intermediate_size", default=intermediate))
        shared = 4 * c * tokens * shared_intermediate + c * tokens * h + c * tokens
        if run.autocast:
            casts += 3 * c * tokens * h  # shared_expert.gate_proj, up_proj and shared_expert_gate
    aux = _moe_aux_loss_layer_bytes(raw, run, num_experts)
    total = router + experts + shared + casts + aux
    formula = (f"MoE router {router:,} + experts ({k} of {num_experts} per token) {experts:,}"
               f"{f' + shared expert {shared:,}' if shared else ''}{f' + autocast input casts {casts:,}' if casts else ''}"
               f"{f' + aux-loss softmax {aux:,}' if aux else ''}")
    return total, formula


def _moe_aux_loss_layer_bytes(raw: dict[str, Any], run: _Run, num_experts: int) -> int:
    """output_router_logits (load_balancing_loss_func): per MoE layer softmax(router_logits) saves its output, in
    the logits' dtype c (CUDA autocast runs softmax in fp32)."""
    if not raw.get("output_router_logits"):
        return 0
    return (FP32_BYTES if run.autocast else run.c) * run.tokens * num_experts


def _moe_aux_loss_model_bytes(raw: dict[str, Any], model_type: str) -> int:
    """load_balancing_loss_func's final product saves tokens_per_expert (fp32, E)."""
    return FP32_BYTES * _num_experts(raw) if raw.get("output_router_logits") else 0


# CUDA's native_layer_norm keeps mean and rstd in fp32 (opmath) whatever the input dtype; the CPU kernel keeps
# them in the input dtype (a CPU/GPU difference the tests account for).
LAYER_NORM_STAT_BYTES = FP32_BYTES
# Activation functions transformers computes with several saved elementwise ops (NewGELUActivation:
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))): the input, tanh, 1 + tanh and the product are saved.
PYTHON_GELUS = ("gelu_new",)


def _gpt2_bytes(raw: dict[str, Any], tokens: int, b: int, s: int, h: int, a: int, c: int, autocast: bool,
                eager: bool) -> tuple[int, str, int]:
    """GPT-2 per layer and per model.

    Per layer: two LayerNorms (input cTh + mean and rstd), their outputs as Conv1D inputs (cTh each),
    attention (sdpa: the c_attn output 3cTh that q, k, v view, k and v copies in the KV cache when
    use_cache is on, output cTh (c_proj reads it in place), logsumexp 4Ta; eager: q, k, v cTh each, softmax output c*b*a*s^2, c_proj input copy cTh), and the
    MLP: c_fc output, NewGELU's tanh, 1 + tanh and product, c_proj input (5 cTI; a fused gelu keeps 2 cTI).
    """
    intermediate = int(_first(raw, "n_inner", default=None) or 4 * h)
    d = h // a
    residual = FP32_BYTES if autocast else c
    layer_norm = residual * tokens * h + 2 * LAYER_NORM_STAT_BYTES * tokens
    linear_inputs = 2 * c * tokens * h  # ln outputs (or, under autocast, their casts) read by c_attn and c_fc
    if eager:
        attention = 3 * c * tokens * h + c * b * a * s * s + c * tokens * h
    else:
        # With config.use_cache (GPT2Config default True; HF Trainer leaves it on) DynamicLayer.update
        # torch.cat's k and v into the cache, and sdpa saves those copies beside the c_attn output.
        cache_copies = 2 * c * tokens * h if raw.get("use_cache", True) else 0
        attention = cache_copies + 3 * c * tokens * h + c * tokens * h + FP32_BYTES * tokens * a
    activation = str(raw.get("activation_function", "gelu_new"))
    mlp = (5 if activation in PYTHON_GELUS else 2) * c * tokens * intermediate
    # Dropout as CUDA stores it (GPT2Config defaults 0.1): native_dropout keeps a 1-byte bool mask. The
    # residual dropouts after attention and MLP keep T*h each; sdpa's fused dropout keeps only RNG state;
    # eager attention dropout keeps a b*a*s^2 mask and its output in c (saved by the second matmul).
    dropout = 0
    if float(raw.get("resid_pdrop", 0.1)) > 0:
        dropout += 2 * tokens * h
    if eager and float(raw.get("attn_pdrop", 0.1)) > 0:
        dropout += (1 + c) * b * a * s * s
    per_layer = 2 * layer_norm + linear_inputs + attention + mlp + dropout
    formula = (f"layer norms {2 * layer_norm:,} + Conv1D inputs {linear_inputs:,} + attention {attention:,} + "
               f"MLP {mlp:,}{f' + dropout masks {dropout:,}' if dropout else ''}")
    ids = 8 * tokens + 8 * s + 8 * tokens  # input_ids, position_ids, shifted labels (int64)
    model_level = ids + FP32_BYTES + layer_norm + c * tokens * h  # + loss divisor, ln_f, lm_head input
    if float(raw.get("embd_pdrop", 0.1)) > 0:
        model_level += tokens * h  # embedding dropout mask
    del d
    return per_layer, formula, model_level


def _act_bytes(activation: str, c: int, numel: int) -> int:
    """An activation between two Linears: what it saves plus its output (saved by the next Linear).

    ReLU saves its result, the tensor the next Linear saves too (1 x); fused F.gelu / silu save their input
    beside the output (2 x); NewGELUActivation (gelu_new) saves input, tanh, 1 + tanh and product, and the
    next Linear the output (5 x, as in _gpt2_bytes).
    """
    if activation == "relu":
        return c * numel
    return (5 if activation in PYTHON_GELUS else 2) * c * numel


def _dropout_masks(raw: dict[str, Any], key: str, default: float, numel: int) -> int:
    """CUDA native_dropout keeps a 1-byte bool mask per element (the CPU saves noise in the input dtype: the
    tests account for it); 0 when the probability is 0."""
    return numel if float(raw.get(key, default) or 0) > 0 else 0


def _bert(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """BertForMaskedLM (modeling_bert.py), as the forward saves it on CUDA.

    Per BertLayer (r: residual bytes, fp32 under autocast; c compute bytes; CUDA LayerNorm stats 2 x 4 T):
      layer input as q/k/v read it   c T h (under autocast each of the three Linears saves its own cast: 3 c T h)
      attention (sdpa)               q, k, v (views of the Linear outputs) 3 c T h + output c T h (the dense layer
                                     reads it in place) + logsumexp 4 T a
      attention (eager)              contiguous copies of q, k^T, v for the matmuls 3 c T h, softmax output c b a s^2
                                     (CUDA autocast: softmax in fp32 then cast for the matmul: (4 + c) b a s^2),
                                     the output's contiguous copy c T h
      BertSelfOutput LayerNorm       input (dense + residual) r T h + stats
      BertIntermediate               its input c T h (the LayerNorm output, or its cast), GELU input and output 2 c T I
      BertOutput LayerNorm           input r T h + stats (its output is the next layer's input)
      dropout (CUDA masks)           after the attention output and the FFN output 2 T h; eager attention probs
                                     b a s^2 + the dropped probs c b a s^2 (sdpa's fused dropout keeps RNG state)
    Per model: input_ids, labels (int64; a real batch has both) and the gathered token_type_ids (8 s); the embedding
    LayerNorm (input r T h + stats; its dropout mask T h); the MLM head: its dense input c T h, GELU input c T h,
    LayerNorm input (c T h; CUDA autocast keeps the fp32 cast it normalises, 4 T h) + stats, decoder input c T h;
    nll_loss's total_weight scalar. Position ids are a slice of a registered buffer (model state, not counted).
    Loss: nn.CrossEntropyLoss on the logits as they are: log_softmax saves c T V (fp32 under CUDA autocast).
    """
    h, num_layers, a = int(raw.get("hidden_size", 768)), int(raw.get("num_hidden_layers", 12)), int(raw.get("num_attention_heads", 12))
    intermediate = int(raw.get("intermediate_size", 4 * h))
    b, s, tokens, c, r = run.b, run.s, run.tokens, run.c, run.residual
    stats = 2 * LAYER_NORM_STAT_BYTES * tokens
    th = tokens * h
    qkv_input = (3 if run.autocast else 1) * c * th
    if run.eager:
        softmax = (FP32_BYTES + c) if run.autocast else c
        attention = 3 * c * th + softmax * b * a * s * s + c * th
    else:
        attention = 4 * c * th + FP32_BYTES * tokens * a
    layer_norms = 2 * (r * th + stats)
    ffn = c * th + _act_bytes(str(raw.get("hidden_act", "gelu")), c, tokens * intermediate)
    dropout = 2 * _dropout_masks(raw, "hidden_dropout_prob", 0.1, th)
    if run.eager:
        dropout += _dropout_masks(raw, "attention_probs_dropout_prob", 0.1, (1 + c) * b * a * s * s)
    per_layer = qkv_input + attention + layer_norms + ffn + dropout
    formula = (f"q/k/v input {qkv_input:,} + attention {attention:,} + layer norms {layer_norms:,} + FFN {ffn:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    ids = 2 * 8 * tokens + 8 * s
    embeddings = r * th + stats + _dropout_masks(raw, "hidden_dropout_prob", 0.1, th)
    head_norm_input = FP32_BYTES if run.autocast else c
    head = c * th + (_act_bytes(str(raw.get("hidden_act", "gelu")), c, th) - c * th) + head_norm_input * th + stats + c * th
    total_weight = FP32_BYTES if run.autocast else c
    model_level = ids + embeddings + head + total_weight
    vocab = int(raw.get("vocab_size", 30522))
    log_softmax = FP32_BYTES if run.autocast else c
    loss = _Loss(tokens, vocab, log_softmax, "transformers modeling_bert.BertForMaskedLM: nn.CrossEntropyLoss on the "
                 "logits in the compute dtype (fp32 under CUDA autocast); log_softmax saves its output")
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_BERT, num_layers * th * r,
                 c * tokens * (intermediate + h), loss)


def _norm_bytes(model_type: str, tokens: int, h: int, c: int, autocast: bool) -> int:
    """Bytes one RMSNorm saves for backward (modeling_llama.LlamaRMSNorm / modeling_gemma.GemmaRMSNorm).

    Llama: x.to(fp32) (4Th; pow and mul save it), rsqrt (4T), the normalized input cast back to the input
    dtype (cTh, saved by the weight multiply) and the output (cTh, saved by the next Linear).
    Gemma: x.float(), rsqrt, the fp32 normalized product (weight multiply in fp32), (1 + weight) in fp32
    (4h) and the output in c. Under autocast the input is fp32, the normalized product stays fp32 and the
    fp32 output is not saved (each Linear saves its own cast instead).
    """
    gemma = model_type in GEMMA_NORMS
    extra = FP32_BYTES * h if gemma else 0
    if autocast:
        return 8 * tokens * h + FP32_BYTES * tokens + extra
    if gemma:
        return (8 + c) * tokens * h + FP32_BYTES * tokens + extra
    return (4 + 2 * c) * tokens * h + FP32_BYTES * tokens


_FAMILIES = {**{t: _llama for t in LLAMA_STYLE}, "gpt2": _gpt2, "bert": _bert}
