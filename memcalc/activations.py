"""Activations saved for backward, and the logits/loss buffers.

Every modelled family's bytes are derived from what its transformers (5.24) modeling code saves for backward,
tensor by tensor, in the dtypes CUDA uses, and equal the saved storages of a real CPU forward measured with
torch.autograd.graph.saved_tensors_hooks on tiny models (tests/test_activations.py), up to the CPU-vs-CUDA
differences those tests name (LayerNorm statistics, dropout noise, CPU autocast ops). One function per family:
  _llama    llama, mistral, qwen2/3, gemma*, phi3 and the MoE decoders mixtral, qwen2_moe, qwen3_moe
            (modeling_llama.py; MoE blocks in _moe_bytes: router, grouped_mm experts, shared experts)
  _deepseek_v2  MLA attention + MoE (modeling_deepseek_v2.py)
  _gpt2, _opt, _bloom, _phi, _falcon  LayerNorm decoders
  _bert     BertForMaskedLM (modeling_bert.py)      _t5  T5ForConditionalGeneration (modeling_t5.py)
Other model types fall back to Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 2): s*b*h*34 bytes per layer in 16-bit (no 5as/h score term for fused attention),
flagged as an approximation in the notes.

Notation: T = micro_batch * seq_len tokens, h hidden, I intermediate, a heads, g kv heads, d head_dim,
V vocab, c bytes of the compute dtype, r bytes of the residual stream (fp32 under autocast, else c).
Per Llama-style layer, non-checkpointed, sdpa attention:
  each RMSNorm     fp32 copy of its input 4Th, rsqrt 4T, normalized input in c (cTh), output in c (cTh)
                   (Gemma keeps the fp32 normalized product instead: see _norm_bytes)
  q, k, v          rotary outputs and v as sdpa saves them: cT(a*d) + 2 cT(g*d)
  attention        sdpa output cT(a*d) (o_proj reads it in place: it is laid out (b, s, a, d)) + logsumexp 4Ta;
                   eager: q, k, v for all a heads 3 cT(a*d), fp32 softmax 4 b a s^2, probs c b a s^2, o_proj copy
  MLP (gated)      gate out, act out, up out, product: 4 cTI (MoE: _moe_bytes, T x top-k token-expert pairs)
  autocast         each Linear saves its own cast of an fp32 input: 5 cTh (q, k, v, gate, up)
Per model: rotary cos and sin 2*s*d (fp32 under autocast, else c), token ids and labels 2 x 8T, the final
norm, and under autocast the lm_head input cast cTh.
Dropout is counted as CUDA keeps it: native_dropout's 1-byte bool mask per element; sdpa's fused dropout keeps
only RNG state. Registered buffers (position ids, inv_freq, Gemma's embedding scale) are model state, not counted.
Loss (_Loss): causal LMs (loss_utils.ForCausalLMLoss, HF Trainer drops the logits before backward): log_softmax
saves its fp32 output (4TV) until backward. During the loss, the c logits and their fp32 upcast exist too
((c + 4)TV, forward transient); at the start of backward two fp32 TxV gradients coexist (8TV). BERT and T5 call
nn.CrossEntropyLoss on the logits as they are: log_softmax in c (fp32 under CUDA autocast).
Checkpointing full (HF gradient_checkpointing_enable, non-reentrant): each layer keeps only its tensor
arguments - its input (r T h), with eager attention the 4-D causal mask, for T5 the position biases - and one
layer's activations are recomputed at a time during backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memcalc.inventory import inventory_target
from memcalc.precision import DTYPE_BYTES, Recipe
from memcalc.report import Term
from memcalc.spec import Attention, Checkpointing
from memcalc.vocab import FORWARD_BACKWARD, TERM_ACTIVATIONS, TERM_LOSS_BUFFERS

if TYPE_CHECKING:
    from memcalc.model import ModelInput
    from memcalc.spec import TrainingSpec

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
               "qwen2_moe", "qwen3_moe")
GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")
FOUR_NORMS = ("gemma2", "gemma3_text")  # pre/post attention and pre/post feed-forward norms
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")
NO_CAUSAL_MASK_KEPT = ("bert", "t5")  # BERT: no mask without padding; T5 counts its own (with its biases)
QK_NORMS = ("qwen3", "qwen3_moe", "gemma3_text")
FP32_BYTES = 4
SOURCE_LLAMA = ("derived from transformers modeling_llama.py (RMSNorm, attention, MLP) and "
                "loss_utils.ForCausalLMLoss; equal to the saved tensors of a CPU forward (sdpa) in the tests")
SOURCE_GPT2 = ("derived from transformers modeling_gpt2.py (LayerNorm, Conv1D, sdpa/eager attention, NewGELU) "
               "and checked against the saved tensors of a CPU forward in the tests")
SOURCE_MOE = ("MoE blocks from modeling_mixtral.py / modeling_qwen*_moe.py routers and integrations/moe.py "
              "grouped_mm_experts_forward; tokens per expert summed over experts as T x num_experts_per_tok")
SOURCE_BERT = ("derived from transformers modeling_bert.py (BertEmbeddings, BertSelfAttention sdpa/eager, "
               "BertSelfOutput, BertIntermediate, BertOutput, BertLMPredictionHead) and checked against the saved "
               "tensors of a CPU forward")
SOURCE_T5 = ("derived from transformers modeling_t5.py (T5LayerNorm, T5Attention eager/sdpa with the relative position "
             "bias, T5DenseActDense / T5DenseGatedActDense, both stacks) and checked against a CPU forward (eager)")
SOURCE_DEEPSEEK = ("derived from transformers modeling_deepseek_v2.py (DeepseekV2Attention MLA, DeepseekV2TopkRouter, "
                   "DeepseekV2Moe) and integrations/moe.py; checked against a CPU forward (eager attention)")
SOURCE_OPT = "derived from transformers modeling_opt.py (OPTDecoderLayer, OPTAttention); checked against a CPU forward"
SOURCE_BLOOM = ("derived from transformers modeling_bloom.py (BloomBlock, BloomAttention, BloomGelu); checked against "
                "a CPU forward")
SOURCE_PHI = ("derived from transformers modeling_phi.py (PhiDecoderLayer, PhiAttention, NewGELU); checked against a "
              "CPU forward")
SOURCE_FALCON = ("derived from transformers modeling_falcon.py (FalconDecoderLayer, FalconAttention sdpa/eager); "
                 "checked against a CPU forward")
NOTE_MOE = ("MoE activations: how many tokens each expert gets depends on the routing; their total, T x "
            "num_experts_per_tok token-expert pairs, does not, so the sum over experts is exact")
SOURCE_KORTHIKANTI = "Korthikanti et al. 2022, eq. 2 (GPT-style layer, 16-bit); first approximation"


@dataclass(eq=False, repr=False)
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


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


@dataclass(frozen=True, eq=False, repr=False)
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


@dataclass(eq=False, repr=False)
class _Loss:
    """The logits and the cross-entropy over them: rows x vocab, and the dtype log_softmax saves."""

    rows: int
    vocab: int
    log_softmax_bytes: int  # 4: the loss upcasts (ForCausalLMLoss, CUDA autocast); else the logits' dtype
    source: str = ("transformers loss_utils.ForCausalLMLoss: logits.float() then cross_entropy; log_softmax saves "
                   "its output. HF Trainer drops the model output (and its logits) before backward")


@dataclass(eq=False, repr=False)
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
    recompute: int | None = None  # checkpointing: the largest recompute in backward (default: the largest layer)


def estimate(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> ActivationEstimate:
    result = ActivationEstimate()
    if model.config is None:
        result.notes.append("activations need an architecture: with --params only, the peak excludes them")
        return result
    target = inventory_target(model.config)  # the config dict the inventory counted (a text_config, say)
    raw, model_type = {**target.raw, "model_type": target.model_type}, target.model_type
    run = _Run(spec.micro_batch_size, spec.seq_len, DTYPE_BYTES[recipe.compute_dtype], recipe.autocast,
               spec.attention == Attention.eager)
    h = int(_first(raw, "hidden_size", "n_embd", "n_embed", "d_model", default=0))
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
        kept = rule.kept
        if run.eager and family is not None and model_type not in NO_CAUSAL_MASK_KEPT:
            # masking_utils.create_causal_mask gives eager attention a 4-D additive mask (b, 1, s, s) in the
            # embeddings' dtype (fp32 under autocast); checkpointed layers hold it as an argument until backward.
            kept += run.residual * run.b * run.s * run.s
        total = kept + per_model
        result.recompute_bytes = rule.recompute if rule.recompute is not None else max(rule.layers)
        formula = (f"layer inputs {kept:,} B + per model {per_model:,} B; during backward one layer is "
                   f"recomputed at a time ({result.recompute_bytes:,} B: {rule.formula})")
    else:
        total = sum(rule.layers) + per_model
        uniform = all(n == rule.layers[0] for n in rule.layers)
        layers = (f"{len(rule.layers)} layers x {rule.layers[0]:,} B per layer" if uniform else
                  f"{len(rule.layers)} layers, {sum(rule.layers):,} B (first layer {rule.layers[0]:,} B)")
        formula = f"{layers} ({rule.formula}) + per model {per_model:,} B"
    result.terms.append(Term(
        name=TERM_ACTIVATIONS, bytes=total, formula=formula, source=rule.source, category="activations",
        phases=FORWARD_BACKWARD,
    ))
    loss = rule.loss
    if loss is not None and loss.vocab:
        rows_vocab = loss.rows * loss.vocab
        saved = rows_vocab * loss.log_softmax_bytes
        # The logits (compute dtype) and, when the loss upcasts them, their fp32 copy exist during the loss
        # beside the log_softmax output; at the start of backward the gradients of the log_softmax output and
        # of its input coexist, in the log_softmax dtype.
        upcast = loss.log_softmax_bytes if loss.log_softmax_bytes != run.c else 0
        result.forward_transient_extra_bytes = rows_vocab * (run.c + upcast)
        result.backward_start_extra_bytes = 2 * rows_vocab * loss.log_softmax_bytes
        result.terms.append(Term(
            name=TERM_LOSS_BUFFERS, bytes=saved,
            formula=f"log_softmax output {loss.rows:,} x {loss.vocab:,} x {loss.log_softmax_bytes} B (saved until "
                    f"backward); during the loss also the logits{' and their fp32 upcast' if upcast else ''} "
                    f"({result.forward_transient_extra_bytes:,} B), at the start of backward two gradients "
                    f"({result.backward_start_extra_bytes:,} B)",
            source=loss.source, category="activations", phases=FORWARD_BACKWARD,
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
    # A 0-dim tensor: the loss divisor (fixed_cross_entropy) in fp32. (Gemma's embedding scale is a registered
    # buffer in the weights' dtype, model state like the rotary inv_freq: not an activation.)
    scalars = FP32_BYTES
    final_norm = _norm_bytes(model_type, tokens, h, c, run.autocast) + (c * tokens * h if run.autocast else 0)
    model_level = rotary + ids + scalars + final_norm
    notes = []
    if model_type in MOE_TYPES:
        model_level += _moe_aux_loss_model_bytes(raw)
    if not run.eager:
        notes.append("attention: sdpa/flash kernels keep no s^2 scores (--attn eager keeps them)")
    if model_type in MOE_TYPES:
        notes.append(NOTE_MOE)
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
    if model_type == "deepseek_v2":  # DeepseekV2DecoderLayer: dense below first_k_dense_replace
        return layer >= int(raw.get("first_k_dense_replace") or 0)
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
    weights (S, fp32 for Mixtral and DeepSeek, the router logits' dtype c for Qwen). grouped_mm has no autocast
    rule: under amp-* the experts run in the fp32 of the norm output and the weights (e = 4), else e = c.
    (experts_implementation="eager", the per-expert loop, saves the same per pair but int64 token indices instead of
    the permutations.)
    DeepseekV2TopkRouter: F.linear(x.type(fp32)) saves an fp32 copy of a 16-bit input (4 T h), group_limited_greedy
    a bool mask over the scores (T E); no renormalisation; DeepseekV2MLP shared experts 4 c T (n_shared x I).
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
    router = FP32_BYTES * tokens * num_experts + 8 * pairs
    if renormalise:
        router += FP32_BYTES * pairs + FP32_BYTES * tokens
    if model_type == "deepseek_v2":
        # DeepseekV2TopkRouter: F.linear(x.type(fp32), fp32 weight) saves an fp32 copy of a 16-bit input (under
        # autocast the Linear casts instead, counted below); group_limited_greedy masks the scores (bool, T E).
        router += FP32_BYTES * tokens * h if c != FP32_BYTES and not run.autocast else 0
        router += tokens * num_experts if raw.get("topk_method", "greedy") == "group_limited_greedy" else 0
    weights_bytes = FP32_BYTES if model_type in ("mixtral", "deepseek_v2") else c
    experts = 3 * 8 * pairs + 4 * num_experts + e * pairs * (2 * h + 4 * intermediate) + weights_bytes * pairs
    casts = c * tokens * h if run.autocast else 0  # the router's F.linear casts the fp32 norm output
    shared = 0
    if model_type == "qwen2_moe":
        shared_intermediate = int(_first(raw, "shared_expert_intermediate_size", default=intermediate))
        shared = 4 * c * tokens * shared_intermediate + c * tokens * h + c * tokens
        if run.autocast:
            casts += 3 * c * tokens * h  # shared_expert.gate_proj, up_proj and shared_expert_gate
    if model_type == "deepseek_v2":  # DeepseekV2MLP over n_shared_experts x moe_intermediate_size, added unweighted
        shared = 4 * c * tokens * intermediate * int(raw.get("n_shared_experts") or 0)
        if run.autocast and shared:
            casts += 2 * c * tokens * h
    aux = _moe_aux_loss_layer_bytes(raw, run, num_experts)
    total = router + experts + shared + casts + aux
    formula = (f"MoE router {router:,} + experts ({k} of {num_experts} per token) {experts:,}"
               f"{f' + shared expert {shared:,}' if shared else ''}"
               f"{f' + autocast input casts {casts:,}' if casts else ''}"
               f"{f' + aux-loss softmax {aux:,}' if aux else ''}")
    return total, formula


def _moe_aux_loss_layer_bytes(raw: dict[str, Any], run: _Run, num_experts: int) -> int:
    """output_router_logits (load_balancing_loss_func): per MoE layer softmax(router_logits) saves its output, in
    the logits' dtype c (CUDA autocast runs softmax in fp32)."""
    if not raw.get("output_router_logits"):
        return 0
    return (FP32_BYTES if run.autocast else run.c) * run.tokens * num_experts


def _moe_aux_loss_model_bytes(raw: dict[str, Any]) -> int:
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
    use_cache is on, output cTh (c_proj reads it in place), logsumexp 4Ta; eager: q, k, v cTh each, softmax output
    c*b*a*s^2, c_proj input copy cTh), and the
    MLP: c_fc output, NewGELU's tanh, 1 + tanh and product, c_proj input (5 cTI; a fused gelu keeps 2 cTI).
    """
    intermediate = int(_first(raw, "n_inner", default=None) or 4 * h)
    d = h // a
    residual = FP32_BYTES if autocast else c
    layer_norm = residual * tokens * h + 2 * LAYER_NORM_STAT_BYTES * tokens
    linear_inputs = 2 * c * tokens * h  # ln outputs (or, under autocast, their casts) read by c_attn and c_fc
    if eager:
        # softmax in the scores' dtype, then .type(c): under autocast the fp32 causal mask makes the scores fp32,
        # so the fp32 softmax output and its c copy are both saved.
        probs = (FP32_BYTES + c) if autocast else c
        attention = 3 * c * tokens * h + probs * b * a * s * s + c * tokens * h
    else:
        # With config.use_cache (GPT2Config default True; HF Trainer leaves it on) DynamicLayer.update
        # torch.cat's k and v into the cache, and sdpa saves those copies beside the c_attn output.
        cache_copies = 2 * c * tokens * h if raw.get("use_cache", True) else 0
        attention = cache_copies + 3 * c * tokens * h + c * tokens * h + FP32_BYTES * tokens * a
    activation = str(raw.get("activation_function", "gelu_new"))
    mlp = (5 if activation in PYTHON_GELUS else 2) * c * tokens * intermediate
    if autocast and activation in PYTHON_GELUS:
        # CUDA autocast runs NewGELU's pow in fp32: the fp32 cast of the input, tanh and 1 + tanh are fp32, 0.5 x
        # stays in c and c_proj saves a c cast of the fp32 output (as _phi; CPU autocast keeps pow in bf16).
        mlp = (12 + 2 * c) * tokens * intermediate
    # Dropout as CUDA stores it (GPT2Config defaults 0.1): native_dropout keeps a 1-byte bool mask. The
    # residual dropouts after attention and MLP keep T*h each; sdpa's fused dropout keeps only RNG state;
    # eager attention dropout keeps a b*a*s^2 mask and its output in c (saved by the second matmul).
    dropout = 0
    if float(raw.get("resid_pdrop", 0.1)) > 0:
        dropout += 2 * tokens * h
    if eager and float(raw.get("attn_pdrop", 0.1)) > 0:
        dropout += (1 if autocast else 1 + c) * b * a * s * s  # the dropped probs replace the c copy under autocast
    per_layer = 2 * layer_norm + linear_inputs + attention + mlp + dropout
    formula = (f"layer norms {2 * layer_norm:,} + Conv1D inputs {linear_inputs:,} + attention {attention:,} + "
               f"MLP {mlp:,}{f' + dropout masks {dropout:,}' if dropout else ''}")
    ids = 8 * tokens + 8 * s + 8 * tokens  # input_ids, position_ids, shifted labels (int64)
    model_level = ids + FP32_BYTES + layer_norm + c * tokens * h  # + loss divisor, ln_f, lm_head input
    if float(raw.get("embd_pdrop", 0.1)) > 0:
        model_level += tokens * h  # embedding dropout mask
    del d
    return per_layer, formula, model_level


def _deepseek_v2(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """DeepseekV2ForCausalLM (modeling_deepseek_v2.py): MLA attention, then a dense MLP (layers below
    first_k_dense_replace) or the MoE block (_moe_bytes: fp32 router, grouped_mm experts, shared experts).

    MLA per layer (a heads, qk = qk_nope + qk_rope, v = v_head_dim, ranks r_q and r_kv):
      input RMSNorm and post-attention RMSNorm as Llama's (_norm_bytes); q_a_layernorm over r_q and kv_a_layernorm
      over r_kv the same way ((4 + 2c) T r + 4 T; under autocast their 16-bit input gives the same bytes, the
      next Linear's cast standing for the output); without q_lora_rank q_proj reads the input norm directly.
      Rotary (apply_rotary_emb: complex multiply) saves only freqs_cis (per model, complex64: 4 s qk_rope).
      query_states (torch.cat) and key_states (new_empty + copy_) c T a qk each.
      eager: v's contiguous copy for the matmul c T a v, softmax in fp32 4 b a s^2 and its c copy, the output's
      contiguous copy c T a v.
      sdpa: the head dims differ (qk != v), so CUDA runs memory-efficient attention: it saves q, k, v (a view of
      kv_b_proj's output: its whole storage c T a (qk_nope + v)), the output c T a v (o_proj reads it in place) and
      logsumexp 4 b a s (rows padded to 32). The CPU takes the math kernel here: the tests check eager.
      Under autocast q_a_proj (or q_proj) and kv_a_proj_with_mqa save their own casts of the fp32 norm output.
    """
    h, a = int(raw.get("hidden_size", 4096)), int(raw.get("num_attention_heads", 32))
    num_layers = int(raw.get("num_hidden_layers", 30))
    nope, rope = int(raw.get("qk_nope_head_dim", 128)), int(raw.get("qk_rope_head_dim", 64))
    v, kv_rank = int(raw.get("v_head_dim", 128)), int(raw.get("kv_lora_rank", 512))
    q_rank = raw.get("q_lora_rank", 1536)
    qk = nope + rope
    b, s, tokens, c, autocast = run.b, run.s, run.tokens, run.c, run.autocast
    norms = 2 * _norm_bytes(model_type, tokens, h, c, autocast)
    ranks = [kv_rank] + ([int(q_rank)] if q_rank else [])
    lora_norms = sum(_norm_bytes(model_type, tokens, rank, c, False) for rank in ranks)
    if c == FP32_BYTES and not autocast:
        # kv_a_layernorm's input is a strided split of kv_a_proj_with_mqa's output: in fp32 .to(fp32) keeps the view,
        # so pow and mul save that whole output (r_kv + qk_rope wide) rather than a contiguous fp32 copy.
        lora_norms += FP32_BYTES * tokens * rope
    qk_states = 2 * c * tokens * a * qk
    if run.eager:
        probs = (FP32_BYTES + (c if c != FP32_BYTES else 0)) * b * a * s * s
        attention = qk_states + 2 * c * tokens * a * v + probs
    else:
        attention = (qk_states + c * tokens * a * (nope + v) + c * tokens * a * v
                     + FP32_BYTES * b * a * (-(-s // 32) * 32))
    casts = 2 * c * tokens * h if autocast else 0
    attention_part = norms + lora_norms + attention + casts
    layers, mlps = [], {}
    for i in range(num_layers):
        mlp, mlp_formula = _mlp_bytes(raw, model_type, i, run, h)
        layers.append(attention_part + mlp)
        mlps.setdefault(_is_sparse_layer(raw, model_type, i), mlp_formula)
    formula = (f"norms {norms:,} + q/kv low-rank norms {lora_norms:,} + MLA attention {attention:,}"
               f"{f' + autocast input casts {casts:,}' if casts else ''} + {' | '.join(mlps.values())}")
    freqs = 4 * s * rope
    final_norm = _norm_bytes(model_type, tokens, h, c, autocast) + (c * tokens * h if autocast else 0)
    model_level = freqs + 2 * 8 * tokens + FP32_BYTES + final_norm + _moe_aux_loss_model_bytes(raw)
    intermediate = int(raw.get("intermediate_size", 4 * h))
    return _Rule(layers, formula, model_level, SOURCE_DEEPSEEK, num_layers * tokens * h * run.residual,
                 c * tokens * (intermediate + h), _Loss(tokens, int(raw.get("vocab_size", 102400)), FP32_BYTES),
                 [NOTE_MOE])


def _layer_norm(run: _Run, th: int, input_bytes: int | None = None) -> int:
    """nn.LayerNorm: its input (the residual stream: fp32 under autocast) and mean/rstd (CUDA: fp32, 2 x 4 T)."""
    return (run.residual if input_bytes is None else input_bytes) * th + 2 * LAYER_NORM_STAT_BYTES * run.tokens


def _linear_input(run: _Run, th: int, readers: int) -> int:
    """A norm output read by `readers` Linears: saved once in c; under autocast (an fp32 output) each Linear
    saves its own c cast."""
    return (readers if run.autocast else 1) * run.c * th


def _eager_probs(run: _Run, scores: int, fp32_softmax: bool) -> int:
    """Saved softmax output: softmax(dtype=fp32).to(c) keeps the fp32 output and its c copy (in fp32 the same
    tensor); a softmax in the compute dtype keeps its c output."""
    if fp32_softmax:
        return (FP32_BYTES + (run.c if run.c != FP32_BYTES else 0)) * scores
    return run.c * scores


def _fp32_softmax_dropout(raw: dict[str, Any], key: str, default: float, run: _Run, scores: int) -> int:
    """Attention dropout after softmax(dtype=fp32).to(c) (eager): the mask (1 B on CUDA), and the dropped probs the
    matmul saves instead of the c copy - new bytes only where that copy was the fp32 softmax output itself."""
    if not float(raw.get(key, default) or 0) > 0:
        return 0
    return scores + (FP32_BYTES * scores if run.c == FP32_BYTES and not run.autocast else 0)


def _opt(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """OPTForCausalLM (modeling_opt.py), pre-LayerNorm (do_layer_norm_before, every size but 350m).

    Per OPTDecoderLayer: self_attn_layer_norm and final_layer_norm (input r T h + stats each), their outputs as
    q/k/v and fc1 read them (c T h; under autocast one cast per Linear); attention: sdpa saves q (q_proj output x
    scaling, a new tensor), k and v (views of their projections) and the output (out_proj reads it in place):
    4 c T h + logsumexp 4 T a; eager: contiguous copies of q, k^T, v and of the output 4 c T h, softmax(fp32) and
    its c copy (4 + c) b a s^2; fc1's ReLU result, which fc2 saves too (c T I). Dropout (CUDA masks): after the
    attention and after fc2 (2 T h); eager attention_dropout b a s^2 (_fp32_softmax_dropout).
    Per model: input_ids, position ids (b x s, from the attention mask's cumsum) and shifted labels (3 x 8 T),
    the decoder's final LayerNorm and the lm_head input, the loss divisor. (project_in/out, used when
    word_embed_proj_dim != hidden_size, are not counted.)
    """
    h = int(raw.get("hidden_size", 768))
    num_layers = int(raw.get("num_hidden_layers", 12))
    a = int(raw.get("num_attention_heads", 12))
    ffn = int(raw.get("ffn_dim", 3072))
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * a * s * s
    norms = 2 * _layer_norm(run, th) + _linear_input(run, th, 3) + _linear_input(run, th, 1)
    attention = 4 * c * th + (_eager_probs(run, scores, True) if run.eager else FP32_BYTES * tokens * a)
    mlp = _act_bytes(str(raw.get("activation_function", "relu")), c, tokens * ffn)
    dropout = 2 * _dropout_masks(raw, "dropout", 0.1, th)
    if run.eager:
        dropout += _fp32_softmax_dropout(raw, "attention_dropout", 0.0, run, scores)
    per_layer = norms + attention + mlp + dropout
    formula = (f"layer norms and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    model_level = 3 * 8 * tokens + FP32_BYTES + _layer_norm(run, th) + c * th
    notes = [] if raw.get("do_layer_norm_before", True) else [
        "OPT with do_layer_norm_before false (350m) is counted as the pre-LayerNorm layout: an approximation"]
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_OPT, num_layers * th * run.residual,
                 c * tokens * (ffn + h), _Loss(tokens, int(raw.get("vocab_size", 50272)), FP32_BYTES), notes)


def _bloom(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """BloomForCausalLM (modeling_bloom.py). transformers has no sdpa path for BLOOM: attention is always eager.

    Per BloomBlock: input_layernorm and post_attention_layernorm (input r T h + stats each) and their outputs as
    query_key_value and dense_h_to_4h read them (c T h each); attention: alibi.baddbmm saves contiguous copies of
    q and k^T, softmax(fp32) and its c copy (4 + c) b a s^2, the matmul a copy of v, dense a copy of the merged
    heads (4 c T h); BloomGelu (a custom autograd Function) saves its input, dense_4h_to_h the output (2 c T 4h).
    Dropout (CUDA masks): dropout_add after attention and MLP (2 T h), attention_dropout b a s^2
    (_fp32_softmax_dropout).
    Per model: word_embeddings_layernorm (input r T h + stats; its output is layer 0's input), ln_f and the lm_head
    input, input_ids and shifted labels, the loss divisor. The alibi bias needs no gradient: not saved.
    """
    h = int(_first(raw, "hidden_size", "n_embed", default=64))
    num_layers = int(_first(raw, "n_layer", "num_hidden_layers", default=2))
    a = int(_first(raw, "n_head", "num_attention_heads", default=8))
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * a * s * s
    norms = 2 * _layer_norm(run, th) + 2 * _linear_input(run, th, 1)
    attention = 4 * c * th + _eager_probs(run, scores, True)
    mlp = 2 * c * tokens * 4 * h
    dropout = (2 * _dropout_masks(raw, "hidden_dropout", 0.0, th)
               + _fp32_softmax_dropout(raw, "attention_dropout", 0.0, run, scores))
    per_layer = norms + attention + mlp + dropout
    formula = (f"layer norms and Linear inputs {norms:,} + attention (eager) {attention:,} + MLP {mlp:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    model_level = 2 * 8 * tokens + FP32_BYTES + 2 * _layer_norm(run, th) + c * th
    notes = [] if run.eager else ["BLOOM has no sdpa attention in transformers: counted as eager (b a s^2 scores)"]
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_BLOOM, num_layers * th * run.residual,
                 c * tokens * 5 * h, _Loss(tokens, int(raw.get("vocab_size", 250880)), FP32_BYTES), notes)


def _phi(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """PhiForCausalLM (modeling_phi.py): a parallel block, one LayerNorm read by attention and MLP.

    Per PhiDecoderLayer: input_layernorm (input r T h + stats) and its output as q, k, v and fc1 read it (c T h; under
    autocast four casts); partial rotary: q and k are torch.cat((rotated, pass)) results (c T h each, laid out
    (b, a, s, d)), v a view of v_proj's output (c T h); sdpa saves q, k, v and its output, whose (b, a, s, d) layout
    (it follows q's) makes the dense layer save a contiguous copy: 5 c T h + logsumexp 4 T a; eager: q and k as
    they are, v's contiguous copy, softmax(fp32) and its c copy, the output's copy (4 c T h + (4 + c) b a s^2).
    MLP: NewGELUActivation (gelu_new) saves input, tanh, 1 + tanh and 0.5 x, fc2 the output (5 c T I); under
    CUDA autocast pow runs in fp32, so the fp32 cast of the input, tanh and 1 + tanh are fp32, 0.5 x in c and fc2 a
    c cast of the fp32 output ((12 + 2c) T I). Dropout (CUDA masks): resid_pdrop after attention and MLP (2 T h),
    embd_pdrop T h per model, attention_dropout (eager) b a s^2 (_fp32_softmax_dropout).
    Per model: rotary cos and sin 2 s rot (fp32 under autocast), final_layernorm and the lm_head input, input_ids and
    shifted labels, the loss divisor. (qk_layernorm is not counted.)
    """
    h = int(raw.get("hidden_size", 2048))
    num_layers = int(raw.get("num_hidden_layers", 24))
    a = int(raw.get("num_attention_heads", 32))
    inter = int(raw.get("intermediate_size", 8192))
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, ti, scores = tokens * h, tokens * inter, b * a * s * s
    norms = _layer_norm(run, th) + _linear_input(run, th, 4)
    attention = 4 * c * th + (_eager_probs(run, scores, True) if run.eager else c * th + FP32_BYTES * tokens * a)
    activation = str(raw.get("hidden_act", "gelu_new"))
    mlp = ((12 + 2 * c) * ti if run.autocast and activation in PYTHON_GELUS else _act_bytes(activation, c, ti))
    dropout = 2 * _dropout_masks(raw, "resid_pdrop", 0.0, th)
    if run.eager:
        dropout += _fp32_softmax_dropout(raw, "attention_dropout", 0.0, run, scores)
    per_layer = norms + attention + mlp + dropout
    formula = (f"layer norm and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout masks {dropout:,}' if dropout else ''}")
    d = h // a
    rot = int(d * float(raw.get("partial_rotary_factor", 0.5)))
    rotary = 2 * s * rot * (FP32_BYTES if run.autocast else c)
    model_level = (rotary + 2 * 8 * tokens + FP32_BYTES + _layer_norm(run, th) + c * th
                   + _dropout_masks(raw, "embd_pdrop", 0.0, th))
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_PHI, num_layers * th * run.residual,
                 c * tokens * (inter + h), _Loss(tokens, int(raw.get("vocab_size", 51200)), FP32_BYTES))


def _falcon(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """FalconForCausalLM (modeling_falcon.py), rotary (alibi false), parallel attention and MLP.

    Per FalconDecoderLayer: one input_layernorm (Falcon-7B layout) or ln_attn and ln_mlp (new_decoder_architecture:
    both normalise the same input, saved once) - input r T h + stats per norm - and their outputs as
    query_key_value and dense_h_to_4h read them (c T h each, one shared when a single norm feeds both in 16 bit);
    q (and k) are rotated copies. Attention, g key/value heads (1 for multi_query):
      sdpa, g == a or new_decoder_architecture (k and v are broadcast to every head and copied by flatten):
        q, k, v and the output (dense reads it in place) 4 c T h + logsumexp 4 T a + the additive mask sdpa makes
        of FalconModel's boolean causal mask on each call (c b s^2). (A mask rules out flash attention on CUDA: the
        memory-efficient kernel saves the same, its logsumexp rows padded to 32.)
      sdpa, multi_query (k, v with one head): no fused kernel takes unequal head counts without enable_gqa, so the
        math backend runs, upcast to fp32 for 16-bit inputs: the scaled q and k and v broadcast to every head
        (3 x 4 T h) and the fp32 softmax (4 b a s^2), plus dense's copy of the output (c T h).
      eager: q, k and v for every head (broadcast and copied by the matmuls) 3 c T h, softmax in the hidden
        dtype (under autocast fp32, then cast for the matmul), the output's copy c T h.
    MLP: nn.GELU saves its input, dense_4h_to_h the output (2 c T ffn). Dropout: hidden_dropout after the block (T h).
    Per model: rotary cos and sin 2 s d, ln_f and the lm_head input, input_ids and labels, the loss divisor.
    """
    h = int(raw.get("hidden_size", 4544))
    num_layers = int(raw.get("num_hidden_layers", 32))
    a = int(raw.get("num_attention_heads", 71))
    ffn = int(raw.get("ffn_hidden_size") or 4 * h)
    new_arch = bool(raw.get("new_decoder_architecture", False))
    multi_query = bool(raw.get("multi_query", True)) and not new_arch
    two_norms = new_arch and int(raw.get("num_ln_in_parallel_attn") or 2) == 2
    parallel = bool(raw.get("parallel_attn", True)) or new_arch
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * a * s * s
    if two_norms:
        norms = 2 * _layer_norm(run, th) - run.residual * th + 2 * c * th  # one shared input, two outputs
    elif parallel:
        norms = _layer_norm(run, th) + _linear_input(run, th, 2)
    else:
        norms = 2 * _layer_norm(run, th) + 2 * c * th
    out_copy = c * th
    if run.eager:
        softmax = (FP32_BYTES + c) if run.autocast else c
        attention = 3 * c * th + softmax * scores + out_copy
    elif multi_query:
        attention = 3 * FP32_BYTES * th + FP32_BYTES * scores + out_copy
    else:
        # Plus the boolean causal mask FalconModel passes, which scaled_dot_product_attention converts to an additive
        # mask in q's dtype on every call and saves (c b s^2 per layer).
        attention = 4 * c * th + FP32_BYTES * tokens * a + c * b * s * s
    mlp = _act_bytes(str(raw.get("activation", "gelu")), c, tokens * ffn)
    dropout = _dropout_masks(raw, "hidden_dropout", 0.0, th)
    # _split_heads picks k and v with a one-element index list ([-2], [-1]): each index saves its int64 tensor.
    split_indices = 2 * 8 if multi_query or new_arch else 0
    per_layer = norms + attention + mlp + dropout + split_indices
    formula = (f"layer norms and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout mask {dropout:,}' if dropout else ''}")
    d = h // a
    rotary = 2 * s * d * (FP32_BYTES if run.autocast else c)
    model_level = rotary + 2 * 8 * tokens + FP32_BYTES + _layer_norm(run, th) + c * th
    notes = ["Falcon with alibi (falcon-rw) is counted as the rotary layout: an approximation"] if raw.get("alibi") \
        else []
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_FALCON, num_layers * th * run.residual,
                 c * tokens * (ffn + h), _Loss(tokens, int(raw.get("vocab_size", 65024)), FP32_BYTES), notes)


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
    h = int(raw.get("hidden_size", 768))
    num_layers = int(raw.get("num_hidden_layers", 12))
    a = int(raw.get("num_attention_heads", 12))
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
    gelu_saved = _act_bytes(str(raw.get("hidden_act", "gelu")), c, th) - c * th  # without its output (the norm input)
    head = c * th + gelu_saved + head_norm_input * th + stats + c * th
    total_weight = FP32_BYTES if run.autocast else c
    model_level = ids + embeddings + head + total_weight
    vocab = int(raw.get("vocab_size", 30522))
    log_softmax = FP32_BYTES if run.autocast else c
    loss = _Loss(tokens, vocab, log_softmax, "transformers modeling_bert.BertForMaskedLM: nn.CrossEntropyLoss on the "
                 "logits in the compute dtype (fp32 under CUDA autocast); log_softmax saves its output")
    return _Rule([per_layer] * num_layers, formula, model_level, SOURCE_BERT, num_layers * th * r,
                 c * tokens * (intermediate + h), loss, _head_note(raw, "BertForMaskedLM"))


def _t5(raw: dict[str, Any], model_type: str, run: _Run) -> _Rule:
    """T5ForConditionalGeneration (modeling_t5.py). The encoder input and the decoder input (labels shifted right)
    both have seq_len tokens here, so cross-attention attends over seq_len encoder positions.

    T5LayerNorm: x.to(fp32).pow(2) saves the fp32 copy (4 T h, the input itself when it is fp32), x * rsqrt saves
    the input (c T h) and rsqrt (4 T), weight * normalized.to(c) saves the normalized (c T h), the next Linear the
    output (c T h): (4 + 3c) T h + 4 T in 16 bit, 3 c T h + 4 T in fp32. Under autocast the stream is fp32: 8 T h + 4 T,
    and every Linear saves its own cast of the fp32 output.
    Attention (self and cross, inner = heads x d_kv): eager: contiguous copies of q, k^T, v for the matmuls
    3 c T inner, softmax output c b a s^2 (under autocast the fp32 relative bias makes the scores and softmax fp32,
    then the matmul saves a c cast: (4 + c) b a s^2), the output's contiguous copy c T inner.
    sdpa: a float mask (the relative position bias) rules out flash attention; CUDA's memory-efficient kernel saves
    q, k, v and the output (4 c T inner), logsumexp (4 b a s, rows padded to 32) and the bias it adds (c a s^2:
    each layer's contiguous copy of the encoder bias, each decoder layer's causal where(); the cross-attention's
    zero bias is one tensor shared by all layers).
    Feed-forward (T5DenseActDense / T5DenseGatedActDense): relu saves its result, which wo saves too (c T I); gated:
    the activation's saved tensors and output, wi_1's output, the product (wo's input). Under autocast the
    activation output is cast back to fp32 (to wo's weight dtype) and wo saves its own c cast.
    Per model: input_ids, decoder_input_ids, labels (3 x 8 T), the relative-position buckets of each stack (2 x 8 s^2),
    both final norms (the decoder's output, scaled by d_model^-0.5 when scale_decoder_outputs, is the lm_head input),
    nll_loss's total_weight. Loss: nn.CrossEntropyLoss on the c logits (fp32 under CUDA autocast).
    Dropout (CUDA masks, 1 byte): embedding and final dropouts of both stacks 4 T h; per layer each sub-layer's
    output dropout (T h) and the feed-forward's inner dropout (T I; relu's dropped output is saved besides its
    result); eager attention dropout b a s^2 per attention (+ the dropped probs in c, outside autocast).
    """
    h = int(raw.get("d_model", 512))
    a, d_kv = int(raw.get("num_heads", 8)), int(raw.get("d_kv", 64))
    inner, ff = a * d_kv, int(raw.get("d_ff", 2048))
    enc_layers = int(raw.get("num_layers", 6))
    dec_layers = int(raw.get("num_decoder_layers") or enc_layers)
    b, s, tokens, c, autocast = run.b, run.s, run.tokens, run.c, run.autocast
    th, ti, scores = tokens * h, tokens * ff, b * a * s * s
    proj = str(raw.get("feed_forward_proj", "relu"))
    gated, act = proj.startswith("gated-"), proj.split("-")[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    dropout = float(raw.get("dropout_rate", 0.1) or 0) > 0

    if autocast:
        norm = 8 * th + FP32_BYTES * tokens
    else:
        norm = ((FP32_BYTES if c != FP32_BYTES else 0) + 3 * c) * th + FP32_BYTES * tokens
    if run.eager:
        softmax = (FP32_BYTES + c) if autocast else c
        self_attention = 4 * c * tokens * inner + softmax * scores
        # Cross-attention adds a zero bias in c: under CUDA autocast softmax runs in fp32 all the same.
        cross_attention = self_attention
        if dropout:
            extra = scores * (1 if autocast else 1 + c)
            self_attention += extra
            cross_attention += extra
    else:
        lse = FP32_BYTES * b * a * (-(-s // 32) * 32)
        self_attention = 4 * c * tokens * inner + lse + c * a * s * s
        cross_attention = 4 * c * tokens * inner + lse
        # The decoder's where(causal, bias, min) also saves its boolean condition (s^2).
        decoder_where = s * s
    if gated:
        # act(wi_0 out) saves what the activation saves; the product saves act out and wi_1 out; wo its input.
        act_saved = _act_bytes(act, c, ti) - c * ti  # without the activation's output
        feed_forward = act_saved + 3 * c * ti
    else:
        feed_forward = _act_bytes(act, c, ti) + (c * ti if autocast else 0)  # relu result (+ wo's cast)
    wi_casts = 2 if gated else 1
    if dropout:
        feed_forward += ti + 2 * th  # inner mask, sub-layer output masks (attention and feed-forward)
        if not gated and not autocast:
            feed_forward += c * ti  # relu's dropped output, saved by wo beside relu's result
    enc_casts = (3 + wi_casts) * c * th if autocast else 0
    dec_casts = (6 + wi_casts) * c * th if autocast else 0  # self q, k, v; cross q, k, v (the encoder output)
    encoder_layer = 2 * norm + self_attention + feed_forward + enc_casts
    decoder_layer = (3 * norm + self_attention + cross_attention + feed_forward + dec_casts + (th if dropout else 0)
                     + (0 if run.eager else decoder_where))
    formula = (f"encoder layer: norms {2 * norm:,} + attention {self_attention:,} + feed-forward {feed_forward:,}"
               f"{f' + casts {enc_casts:,}' if enc_casts else ''} = {encoder_layer:,}; decoder layer: norms "
               f"{3 * norm:,} + self-attention {self_attention:,} + cross-attention {cross_attention:,} + "
               f"feed-forward {feed_forward:,}{f' + casts {dec_casts:,}' if dec_casts else ''}"
               f"{f' + cross dropout mask {th:,}' if dropout else ''}")
    ids = 3 * 8 * tokens + 2 * 8 * s * s
    shared_cross_bias = 0 if run.eager else c * a * s * s
    model_level = (ids + 2 * norm + (c * th if autocast else 0) + (FP32_BYTES if autocast else c) + shared_cross_bias
                   + (4 * th if dropout else 0))
    vocab = int(raw.get("vocab_size", 32128))
    loss = _Loss(tokens, vocab, FP32_BYTES if autocast else c,
                 "transformers modeling_t5.T5ForConditionalGeneration: nn.CrossEntropyLoss on the decoder logits in "
                 "the compute dtype (fp32 under CUDA autocast); log_softmax saves its output")
    residual = FP32_BYTES if autocast else c
    # Checkpointing (non-reentrant): each T5Block keeps its tensor arguments. Besides the layer inputs those are the
    # position biases the first block of each stack computes and hands to the others: the encoder's and the
    # decoder's relative bias (fp32 under autocast: an fp32 embedding) and the cross-attention's zero bias (c; it
    # requires grad under checkpointing), and, with eager attention, the decoder's 4-D causal mask (b s^2, in the
    # embeddings' dtype). The bucket indices are computed inside the first blocks: recomputed, not kept.
    bias = (FP32_BYTES if autocast else c) * a * s * s
    zero_bias = c * a * s * s
    causal_mask = (FP32_BYTES if autocast else c) * b * s * s if run.eager else 0
    kept = (enc_layers + dec_layers) * th * residual + 2 * bias + zero_bias + causal_mask - 2 * 8 * s * s
    # The first decoder block is the largest to recompute: it rebuilds its biases beside the kept ones, while the
    # gradients of the decoder's two biases (both inputs of every decoder block) accumulate.
    recompute = decoder_layer + 2 * (bias + zero_bias)
    return _Rule([encoder_layer] * enc_layers + [decoder_layer] * dec_layers, formula, model_level, SOURCE_T5, kept,
                 c * tokens * (ff + h), loss, _head_note(raw, "T5ForConditionalGeneration"), recompute=recompute)


def _head_note(raw: dict[str, Any], modelled: str) -> list[str]:
    arch = (raw.get("architectures") or [modelled])[0]
    if arch == modelled:
        return []
    return [f"activations follow {modelled} (its head and loss); {arch} has another head: an approximation"]


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


_FAMILIES = {**{t: _llama for t in LLAMA_STYLE}, "gpt2": _gpt2, "bert": _bert, "t5": _t5, "deepseek_v2": _deepseek_v2,
             "opt": _opt, "bloom": _bloom, "phi": _phi, "falcon": _falcon}
