"""Falcon (models/falcon/modeling_falcon.py): fused query_key_value in three layouts (multi-head, multi-query,
new_decoder_architecture with grouped key/value heads), parallel attention and MLP, rotary (or ALiBi)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc.families.base import (
    BASE,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_VOCAB,
    Arch,
    Family,
    Fields,
)
from memcalc.families.saved import (
    Loss,
    Rule,
    Run,
    act_bytes,
    dropout_mask,
    final_hidden_held,
    fp32_softmax_dropout,
    layer_norm,
    linear_input,
    parts,
    unsaved_cache_copies,
)
from memcalc.families.tensors import Params, decoder_heads, simple_head
from memcalc.model import ROLE_ATTENTION, ROLE_MLP, ParamTensor
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64

SOURCE = ("derived from transformers 5.24 modeling_falcon.py (FalconDecoderLayer, FalconAttention sdpa/eager); "
          "checked against a CPU forward")
SOURCE_525 = ("derived from transformers 5.25 modeling_falcon.py (FalconDecoderLayer, FalconAttention.forward with "
              "sdpa_attention_forward / eager_attention_forward); checked against a CPU forward")
# The first release whose FalconAttention differs: 5.25 moved it onto the shared attention functions (repeat_kv, an
# fp32 softmax, dropout on the probabilities) and FalconModel always materialises the causal mask.
REWRITTEN = (5, 25)

_DEFAULTS = {  # models/falcon/configuration_falcon.py: FalconConfig
    "vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
    "num_ln_in_parallel_attn": None, "num_kv_heads": None, "new_decoder_architecture": False,
    "multi_query": True, "parallel_attn": True, "bias": False, "ffn_hidden_size": None, "tie_word_embeddings": True,
    "alibi": False, "activation": "gelu", "hidden_dropout": 0.0, "attention_dropout": 0.0, "use_cache": True,
}  # fmt: skip


@dataclass(eq=False, repr=False, kw_only=True)
class FalconArch(Arch):
    new_decoder_architecture: bool
    multi_query: bool  # the config's flag (ignored by the new architecture)
    parallel_attn: bool
    num_ln_in_parallel_attn: int | None
    bias: bool
    alibi: bool
    use_cache: bool  # config.use_cache: training forwards build a DynamicCache unless it is False


def resolve(raw: Mapping[str, Any], architecture: str) -> FalconArch:
    f = Fields(raw, _DEFAULTS, {"n_embed": "hidden_size"})  # FalconConfig.__post_init__ pops n_embed
    hidden = f.dim("hidden_size", MAX_HIDDEN)
    num_heads, _ = f.heads(kv_key=None)
    new_arch, multi_query = f.flag("new_decoder_architecture"), f.flag("multi_query", True)
    if new_arch:
        num_kv = f.dim_or("num_kv_heads", num_heads, MAX_HEADS)
    else:
        num_kv = 1 if multi_query else num_heads
    return FalconArch(
        model_type="falcon", architecture=architecture, head=HEADS[architecture], hidden_size=hidden,
        num_layers=f.dim("num_hidden_layers", MAX_LAYERS), num_heads=num_heads, num_kv_heads=num_kv,
        head_dim=f.head_dim(hidden, num_heads, key=None),
        intermediate_size=f.dim_or("ffn_hidden_size", 4 * hidden, MAX_INTERMEDIATE),
        vocab_size=f.dim("vocab_size", MAX_VOCAB), tie_word_embeddings=f.flag("tie_word_embeddings"),
        num_labels=f.num_labels(), norm="layernorm", hidden_act=f.text("activation", "gelu"),
        dropout=f.dropouts({"hidden_dropout": 0.0, "attention_dropout": 0.0}),
        new_decoder_architecture=new_arch, multi_query=multi_query, parallel_attn=f.flag("parallel_attn", True),
        num_ln_in_parallel_attn=f.dim("num_ln_in_parallel_attn", 2) if f.given("num_ln_in_parallel_attn") else None,
        bias=f.flag("bias"), alibi=f.flag("alibi"), use_cache=f.flag("use_cache", True),
    )


def _qkv_out(a: FalconArch) -> int:
    """FalconAttention: fused query_key_value width for the three layouts."""
    if a.new_decoder_architecture:
        return (2 * a.num_kv_heads + a.num_heads) * a.head_dim
    return a.hidden_size + 2 * a.head_dim if a.multi_query else 3 * a.hidden_size


def _norms(p: Params, h: str, i: int, a: FalconArch) -> None:
    """FalconDecoderLayer: two norms for sequential blocks, ln_attn/ln_mlp for new_decoder_architecture."""
    num_ln = a.num_ln_in_parallel_attn
    if num_ln is None and a.new_decoder_architecture:
        num_ln = 2
    if not a.parallel_attn:
        p.norm(f"{h}post_attention_layernorm", a.hidden_size, i, bias=True)
        p.norm(f"{h}input_layernorm", a.hidden_size, i, bias=True)
    elif num_ln == 2:
        p.norm(f"{h}ln_attn", a.hidden_size, i, bias=True)
        p.norm(f"{h}ln_mlp", a.hidden_size, i, bias=True)
    else:
        p.norm(f"{h}input_layernorm", a.hidden_size, i, bias=True)


def inventory(a: FalconArch) -> list[ParamTensor]:  # FalconForCausalLM
    hidden, vocab, bias, ffn = a.hidden_size, a.vocab_size, a.bias, a.intermediate_size
    base, p = ("" if a.head == BASE else "transformer."), Params()
    p.embedding(f"{base}word_embeddings", vocab, hidden)
    for i in range(a.num_layers):
        h = f"{base}h.{i}."
        p.linear(f"{h}self_attention.query_key_value", hidden, _qkv_out(a), ROLE_ATTENTION, i, bias)
        p.linear(f"{h}self_attention.dense", hidden, hidden, ROLE_ATTENTION, i, bias)
        p.linear(f"{h}mlp.dense_h_to_4h", hidden, ffn, ROLE_MLP, i, bias)
        p.linear(f"{h}mlp.dense_4h_to_h", ffn, hidden, ROLE_MLP, i, bias)
        _norms(p, h, i, a)
    p.norm(f"{base}ln_f", hidden, None, bias=True)
    simple_head(p, a.head, a.tie_word_embeddings, hidden, vocab, a.num_labels)
    return p.tensors


def _norm_layout(a: FalconArch, run: Run) -> tuple[bool, bool, int]:
    """A FalconDecoderLayer's norms (FalconDecoderLayer.forward, the same in every release): whether ln_attn and ln_mlp
    normalise the same input (new_decoder_architecture), whether attention and MLP run in parallel, and the bytes the
    norms save: each LayerNorm's input and statistics, and their outputs as the Linears read them."""
    new_arch = a.new_decoder_architecture
    two_norms = new_arch and (a.num_ln_in_parallel_attn or 2) == 2
    parallel = a.parallel_attn or new_arch
    th = run.tokens * a.hidden_size
    if two_norms:
        norms = 2 * layer_norm(run, th) - run.residual * th + 2 * run.c * th  # one shared input, two outputs
    elif parallel:
        norms = layer_norm(run, th) + linear_input(run, th, 2)
    else:
        norms = 2 * layer_norm(run, th) + 2 * run.c * th
    return two_norms, parallel, norms


def _mlp_norm(run: Run, th: int, two_norms: bool, parallel: bool) -> int:
    """What the norm feeding only the MLP saved, released by the norm's backward before attention's: the sequential
    layout's post_attention_layernorm (its input, statistics and output), new_decoder_architecture's ln_mlp (its
    statistics and output: it shares ln_attn's input); none with one norm for both (found by the traced step: Falcon
    eager checkpointed steps of those layouts read +1% to +5.5% at the attention's backward without it)."""
    if not parallel:
        return layer_norm(run, th) + run.c * th
    return layer_norm(run, th) - run.residual * th + run.c * th if two_norms else 0


def _mlp_and_dropout(a: FalconArch, run: Run, parallel: bool) -> tuple[int, int]:
    """FalconMLP (nn.GELU saves its input, dense_4h_to_h the output) and the layer's dropout masks: hidden_dropout
    after the block, and in the sequential layout attention_dropout on the attention output first (dropout_add)."""
    th = run.tokens * a.hidden_size
    dropout = dropout_mask(a.dropout.get("hidden_dropout", 0.0), th)
    if not parallel:
        dropout += dropout_mask(a.dropout.get("attention_dropout", 0.0), th)
    return act_bytes(a.hidden_act, run.c, run.tokens * a.intermediate_size), dropout


def _mlp_transient(a: FalconArch, run: Run) -> int:
    """Rule.transient: at the MLP's backward (dense_4h_to_h's input gradient, then GELU's: c T ffn, net of the GELU
    output released), beside it the layer's output gradient and the 16-bit gradient the block's branches read.

    FalconDecoderLayer.forward ends ``output = dropout_add(mlp_output, residual, hidden_dropout)``: ``residual +
    F.dropout(mlp_output)``. Its AddBackward0 hands the output gradient (r T h, _output_gradient) to the residual, the
    layer's input, where it waits for input_layernorm's backward to be summed with it (the end of the layer's backward).
    The branch's gradient beside it, c T h:
    - with hidden_dropout, dropout_add's backward output, the gradient times the mask, a new tensor (found by the traced
      step: Falcon fp32 eager steps with dropout peak there);
    - else under autocast, its cast: mlp_output is 16-bit, the residual stream fp32, so the sum is fp32 and autograd's
      engine casts the gradient to the operand's dtype (torch/csrc/autograd/engine.cpp validate_outputs: a _to_copy
      in AddBackward0), c T h beside the fp32 r T h; ``mlp_output += attention_output``'s backward hands that one
      tensor to both branches, so it lives to the attention's dense backward (measured 2026-12-05: tests/tiny.py's
      Falcon amp-bf16 checkpointed, sdpa, b2 x s128, peaks in the first layer's MLP backward with both alive, -2.09%
      without the fp32 one);
    - else (fp32, bf16-pure) none: the output gradient itself is the branch's."""
    th = run.tokens * a.hidden_size
    branch = run.c * th if a.dropout.get("hidden_dropout", 0.0) > 0 or run.autocast else 0
    return run.c * run.tokens * a.intermediate_size + _output_gradient(run, th) + branch


def _output_gradient(run: Run, th: int) -> int:
    """Rule.output_gradient: the layer's output gradient in the residual stream's dtype (r T h), held by the skip
    connection through the MLP's backward (_mlp_transient)."""
    return run.residual * th


def _recompute_end(a: FalconArch, run: Run, two_norms: bool, parallel: bool) -> int:
    """Rule.opening_transient, checkpointed: the end of a layer's recomputation (torch.utils.checkpoint stops once the
    last saved tensor is packed: dense_4h_to_h's input and weight cast, or with hidden_dropout dropout_add's mask), every
    activation of the layer alive and none of its gradients made, and beside them what no op saves:
    - the layer's output gradient (r T h) and, under autocast, its 16-bit cast (c T h; _mlp_transient), made before the
      recomputation (AddBackward0 runs first and saves nothing);
    - FalconDecoderLayer.forward's locals: ``attention_output`` (dense's output, c T h, read only by
      ``mlp_output += attention_output``), and under autocast the norms' fp32 outputs (r T h each), which the Linears
      save only as 16-bit casts: attention_layernorm_out and mlp_layernorm_out with two norms (new_decoder_architecture)
      or the sequential layout's post_attention_layernorm, one with a single norm for both;
    - with hidden_dropout, dense_4h_to_h's output (mlp_output) and dropout's output (c T h each), before the mask.
    Measured 2026-12-05 (tests/tiny.py's falcon-40b-layout and falcon-sequential, amp-bf16, sdpa, b2 x s256): their
    first layer's recomputation peaks there, -0.39% and -0.36% without it. 0 unless checkpointed."""
    if not run.checkpointing:
        return 0
    th = run.tokens * a.hidden_size
    norm_outputs = (2 if two_norms or not parallel else 1) * run.residual * th if run.autocast else 0
    dropout = 2 * run.c * th if a.dropout.get("hidden_dropout", 0.0) > 0 else 0
    cast = run.c * th if run.autocast else 0
    return _output_gradient(run, th) + cast + run.c * th + norm_outputs + dropout


def _checkpoint_arguments(run: Run) -> int:
    """Rule.checkpoint_arguments: what checkpointed layers keep as arguments beside their inputs, FalconModel's
    boolean causal mask (1, 1, s, s) that sdpa gets (eager's additive one the engine counts) and position_ids (int64 s)
    (found by the traced step: Falcon sdpa checkpointed steps read -0.5% to -0.7% without them)."""
    return (0 if run.eager else run.s * run.s) + BYTES_PER_INT64 * run.s if run.checkpointing else 0


def _per_model(a: FalconArch, run: Run) -> dict[str, int]:
    """Rotary cos and sin, input_ids and labels, the loss divisor, ln_f and the lm_head input."""
    th = run.tokens * a.hidden_size
    return parts(rotary=2 * run.s * a.head_dim * (BYTES_PER_FP32 if run.autocast else run.c),
                 ids=2 * BYTES_PER_INT64 * run.tokens, loss_scalars=BYTES_PER_FP32, final_norm=layer_norm(run, th),
                 head=run.c * th)


def _notes(a: FalconArch) -> list[str]:
    return ["Falcon with alibi (falcon-rw) is counted as the rotary layout: an approximation"] if a.alibi else []


def activations(a: FalconArch, run: Run) -> Rule:
    """The rule for the transformers release the step runs (Run.transformers; not installed: the newest): 5.25 rewrote
    FalconAttention onto the shared eager and sdpa attention functions."""
    if run.transformers is not None and run.transformers < REWRITTEN:
        return _activations_524(a, run)
    return _activations_525(a, run)


def _activations_524(a: FalconArch, run: Run) -> Rule:
    """FalconForCausalLM as transformers 5.24 and earlier run it, rotary (alibi false), parallel attention and MLP.

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
    MLP: nn.GELU saves its input, dense_4h_to_h the output (2 c T ffn). Dropout: hidden_dropout after the block (T h);
    the sequential layout (parallel_attn false) also drops the attention output with attention_dropout (T h).
    Per model: rotary cos and sin 2 s d, ln_f and the lm_head input, input_ids and labels, the loss divisor.
    """
    h, heads = a.hidden_size, a.num_heads
    new_arch = a.new_decoder_architecture
    multi_query = a.multi_query and not new_arch
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * heads * s * s
    two_norms, parallel, norms = _norm_layout(a, run)
    out_copy = c * th
    if run.eager:
        softmax = (BYTES_PER_FP32 + c) if run.autocast else c
        attention = 3 * c * th + softmax * scores + out_copy
    elif multi_query:
        attention = 3 * BYTES_PER_FP32 * th + BYTES_PER_FP32 * scores + out_copy
    else:
        # Plus the boolean causal mask FalconModel passes, which scaled_dot_product_attention converts to an additive
        # mask in q's dtype on every call and saves (c b s^2 per layer).
        attention = 4 * c * th + BYTES_PER_FP32 * tokens * heads + c * b * s * s
        if not new_arch and not a.use_cache or not new_arch and run.checkpointing:
            # _split_heads without multi_query returns views of the fused qkv output; reshape keeps v a view, so
            # without a cache (use_cache false, or checkpointing, which turns it off) sdpa's saved v keeps all of
            # it alive (3 c T h, not c T h). With a cache, DynamicLayer.update's torch.cat copies v.
            attention += 2 * c * th
    mlp, dropout = _mlp_and_dropout(a, run, parallel)
    # _split_heads picks k and v with a one-element index list ([-2], [-1]): each index saves its int64 tensor.
    split_indices = 2 * BYTES_PER_INT64 if multi_query or new_arch else 0
    formula = (f"layer norms and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout mask {dropout:,}' if dropout else ''}")
    per_model, notes = _per_model(a, run), _notes(a)
    layer = parts(norms=norms, attention=attention + split_indices, mlp=mlp, dropout=dropout)
    # A layer's backward transients: the MLP's (c T (ffn + h)), and where sdpa runs its math backend (multi_query) at
    # the attention's backward the probabilities' gradient from the bmm and softmax's backward output, both fp32
    # (2 x 4 b a s^2, beside the saved fp32 softmax): found by the traced step, measured on the CPU (checkpointed:
    # -5.7% to -14.5% without).
    math_backend = 2 * BYTES_PER_FP32 * scores if multi_query and not run.eager else 0
    # Eager, checkpointed forward (FalconAttention.forward, rotary): at softmax the scores (c) and the masked scores (in
    # the hidden dtype) are alive beside its output, and FalconModel.forward's ``outputs`` still holds the previous
    # block's returned probabilities (the hidden dtype) until the block's call returns; not yet made, the
    # probabilities' cast for the second matmul (autocast) and dense's input copy (measured: Falcon checkpointed eager
    # CPU steps peak there, in the forward).
    forward_scores = ((c + (2 if a.num_layers > 1 else 1) * run.residual - (c if run.autocast else 0)) * scores
                      - out_copy - (c * th if run.autocast and not two_norms else 0))  # (and dense_h_to_4h's input cast)
    released_at_scores = held_at_scores = 0
    if run.eager and not a.alibi:
        # Eager (FalconAttention.forward, rotary): softmax runs in the hidden dtype; at its backward dense's input copy,
        # v (the second matmul's), the probabilities' cast for that matmul (autocast) and, under autocast with one
        # norm, dense_h_to_4h's input cast are released; the residual stream's gradient and the attention branch's (in
        # the residual's dtype, the sum's) wait, and v's, summed over its broadcast (measured: Falcon checkpointed eager
        # CPU steps; v's, a kv-head tensor, is left out: the fp32 step peaks in its forward, a hair above).
        released_at_scores = (out_copy + c * tokens * a.num_kv_heads * a.head_dim
                              + (c * scores if run.autocast else 0) + (c * th if run.autocast and not two_norms else 0))
        held_at_scores = 2 * run.residual * th
    if math_backend:
        # There (measured: Falcon checkpointed CPU steps): dense's input copy and the fp32 v broadcast to every head
        # released (and, under autocast with one norm, dense_h_to_4h's input cast); waiting beside softmax's
        # gradients, the residual stream's and the attention output's in fp32.
        released_at_scores = c * th + BYTES_PER_FP32 * th + (c * th if run.autocast and not two_norms else 0)
        math_backend += (run.residual + BYTES_PER_FP32) * th + BYTES_PER_FP32 * tokens * a.head_dim
    return Rule([layer] * a.num_layers, formula, per_model, SOURCE, a.num_layers * th * run.residual,
                _mlp_transient(a, run), Loss(tokens, a.vocab_size, BYTES_PER_FP32), notes,
                held=final_hidden_held(run, h), attention_transient=math_backend,
                released_at_scores=released_at_scores, forward_scores=forward_scores,
                # (softmax's gradient in and out and CUDA's temporary: in the hidden dtype)
                held_at_scores=held_at_scores, scores_backward_bytes=3 * run.residual,
                # (the input norm saves the layer's input itself, LayerNorm keeping its input: under checkpointing,
                # the layer's kept input)
                recompute_saves_input=run.residual * th if run.checkpointing else 0,
                checkpoint_arguments=_checkpoint_arguments(run), output_gradient=_output_gradient(run, th),
                opening_transient=_recompute_end(a, run, two_norms, parallel),
                # (hidden_dropout's mask: dropout_add's backward, the layer's first, has used and released it by the
                # MLP's; measured 2026-12-05, tests/tiny.py's Falcon layouts with hidden_dropout 0.1, checkpointed sdpa,
                # b2 x s128/s256: +0.4% to +1.3% with it held)
                released_at_mlp=dropout_mask(a.dropout.get("hidden_dropout", 0.0), run.tokens * h))


def _activations_525(a: FalconArch, run: Run) -> Rule:
    """FalconForCausalLM as transformers 5.25 runs it (modeling_falcon.py FalconAttention.forward), rotary.

    Norms, MLP and dropout after the block as in 5.24 (FalconDecoderLayer did not change). Attention: q, k and v are
    views of the fused query_key_value output (new_decoder_architecture: q a flatten of a strided slice, a copy);
    apply_rotary_pos_emb makes q and k anew; then ALL_ATTENTION_FUNCTIONS, the functions Llama uses. g key/value heads
    (1 for multi_query), a heads. repeat_kv copies k and v for 1 < g < a only: with one kv head its expand-reshape
    stays a view (stride 0 over the heads), with g == a it returns its input.
      sdpa: FalconModel.forward always materialises the causal mask (create_causal_mask, allow_is_causal_skip=False),
        so sdpa_attention_forward repeats k and v (use_gqa_in_sdpa wants no mask) and torch's sdpa keeps the boolean
        mask as a float bias: q and the output (dense reads it in place) 2 c T h, k and v (c T h each when repeated;
        else k's rotated copy, or its cast under autocast, laid out for every head, and v a view of the fused output
        that keeps all of it alive without a cache, the cache's copy with one), logsumexp 4 T a, the mask c b s^2.
      eager (eager_attention_forward): q, and k and v for every head (the matmuls copy what they cannot view as one
        batch) 3 c T h, softmax(dtype=fp32) saves its fp32 output and .to(q's dtype) the matmul's copy
        ((4 + c) b a s^2; fp32: one tensor), attention dropout's mask (applied since 5.25), the output's copy c T h.
      With a cache DynamicLayer.update's torch.cat copies k and v: Rule.held, the copies attention does not save.
    Per model as in 5.24 (cos and sin, ids, ln_f and the head's input).
    """
    h, heads, g = a.hidden_size, a.num_heads, a.num_kv_heads
    b, s, tokens, c = run.b, run.s, run.tokens, run.c
    th, scores = tokens * h, b * heads * s * s
    two_norms, parallel, norms = _norm_layout(a, run)
    out_copy = c * th
    no_cache = not a.use_cache or run.checkpointing
    copies = 1 < g < heads  # repeat_kv's copies
    if run.eager:
        probs_copy = c if c != BYTES_PER_FP32 else 0  # .to(fp32) of the fp32 softmax is the same tensor
        attention = (3 * c * th + (BYTES_PER_FP32 + probs_copy) * scores + out_copy
                     + fp32_softmax_dropout(a.dropout.get("attention_dropout", 0.0), run, scores))
    else:
        kv = c * tokens * g * a.head_dim
        # k: the rotated copy, or its cache copy (one per kv head), unless repeated, or cast by autocast (the cast of
        # an expanded view is laid out whole: every head)
        k = c * th if copies or run.autocast else kv
        # v: a view of the fused output, which sdpa then keeps whole without a cache; with one, the cache's copy
        v = c * th if copies else c * tokens * _qkv_out(a) if no_cache else kv
        attention = 2 * c * th + k + v + BYTES_PER_FP32 * tokens * heads + c * b * s * s
    mlp, dropout = _mlp_and_dropout(a, run, parallel)
    formula = (f"layer norms and Linear inputs {norms:,} + attention {attention:,} + MLP {mlp:,}"
               f"{f' + dropout mask {dropout:,}' if dropout else ''}")
    layer = parts(norms=norms, attention=attention, mlp=mlp, dropout=dropout)
    held = final_hidden_held(run, h)
    if not no_cache:
        held += a.num_layers * unsaved_cache_copies(run, heads, g, a.head_dim, copies or run.eager)
    released_at_scores = held_at_scores = 0
    forward_scores = None
    if run.eager:
        # At softmax's backward (eager_attention_forward's, as Llama's): the second matmul's backward has released the
        # probabilities' copy and v (every head), dense's input copy and, under autocast with one norm,
        # dense_h_to_4h's input cast; waiting: v's gradient and the residual stream's and the attention branch's.
        probs_released = c * scores if c != BYTES_PER_FP32 or run.autocast else 0
        mlp_cast = c * th if run.autocast and parallel and not two_norms else 0
        mlp_norm = _mlp_norm(run, th, two_norms, parallel)
        released_at_scores = out_copy + c * th + probs_released + mlp_cast + mlp_norm
        # (sequential: the attention output's gradient is the residual stream's, dropout_add's sum handing it on)
        held_at_scores = c * th + (2 if parallel else 1) * run.residual * th
        # A checkpointed layer's forward at softmax: its input, the masked scores (fp32 under autocast: the mask is in
        # the embeddings' dtype), and FalconModel.forward's ``outputs`` holding the previous block's returned
        # probabilities (r: the fp32 softmax output under autocast) are alive; not yet made, the probabilities' copy,
        # dense's input copy, dense_h_to_4h's input cast and the sequential layout's post_attention_layernorm.
        forward_scores = (((2 if a.num_layers > 1 else 1) * run.residual - (c if c != BYTES_PER_FP32 else 0)) * scores
                          - out_copy - mlp_cast - (0 if parallel else mlp_norm))
    return Rule([layer] * a.num_layers, formula, _per_model(a, run), SOURCE_525, a.num_layers * th * run.residual,
                _mlp_transient(a, run), Loss(tokens, a.vocab_size, BYTES_PER_FP32), _notes(a), held=held,
                released_at_scores=released_at_scores, forward_scores=forward_scores,
                held_at_scores=held_at_scores,
                recompute_saves_input=run.residual * th if run.checkpointing else 0,
                checkpoint_arguments=_checkpoint_arguments(run), output_gradient=_output_gradient(run, th),
                opening_transient=_recompute_end(a, run, two_norms, parallel),
                # (hidden_dropout's mask: dropout_add's backward, the layer's first, has used and released it by the
                # MLP's; measured 2026-12-05, tests/tiny.py's Falcon layouts with hidden_dropout 0.1, checkpointed sdpa,
                # b2 x s128/s256: +0.4% to +1.3% with it held)
                released_at_mlp=dropout_mask(a.dropout.get("hidden_dropout", 0.0), run.tokens * h))


HEADS = decoder_heads("Falcon")
FAMILIES = {"falcon": Family("falcon", HEADS, resolve, inventory, activations, lora_targets=("query_key_value",),
                             release_dependent=True)}
