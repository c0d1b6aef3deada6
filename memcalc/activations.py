"""Activations saved for backward and the logits/loss buffers, as terms, from a family's rule.

Each family module (memcalc.families) says what its forward saves, layer by layer and part by part, derived from
its transformers code and checked against real forwards (tests/test_activations.py); this module turns that rule
into the ``activations`` and ``logits_and_loss`` terms for a run, with checkpointing applied:

Checkpointing full (HF gradient_checkpointing_enable, non-reentrant): each layer keeps only its tensor
arguments - its input (r T h), with eager attention the 4-D causal mask, for T5 the position biases - and one
layer's activations are recomputed at a time during backward.
Loss (families.saved.Loss): causal LMs (loss_utils.ForCausalLMLoss, HF Trainer drops the logits before backward):
log_softmax saves its fp32 output (4TV) until backward. During the loss, the c logits and their fp32 upcast exist
too ((c + 4)TV, forward transient); at the start of backward two fp32 TxV gradients coexist (8TV).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memcalc import context_parallel, pipeline
from memcalc.errors import INSTALL_TORCH, MemcalcError, MissingDependencyError, UnsupportedModelError, UsageError
from memcalc.families.base import CAUSAL_LM, Arch
from memcalc.families.heads import for_head
from memcalc.families.saved import (
    FLASH_PADDED_NOTE,
    PART_FINAL_NORM,
    PART_HEAD,
    PART_LOGIT_SOFTCAP,
    PART_MLP,
    Loss,
    Rule,
    Run,
    installed_transformers,
)
from memcalc.precision import BYTES_PER_DTYPE, Recipe
from memcalc.spec import ActivationOffload, ActivationSource, Attention, Checkpointing, Fp8Recipe, LossKind, Offload
from memcalc.units import BYTES_PER_FP32, BYTES_PER_INT64
from memcalc.vocab import (
    CATEGORY_ACTIVATIONS,
    CATEGORY_CPU_OFFLOAD,
    FORWARD_BACKWARD,
    TERM_ACTIVATIONS,
    TERM_LOSS_BUFFERS,
    TERM_OFFLOADED_ACTIVATIONS,
    TERM_PIPELINE_HELD_ACTIVATIONS,
    TERM_PIPELINE_HELD_LOSSES,
    Phase,
    Term,
)

if TYPE_CHECKING:
    from memcalc.resolve import ModelInput
    from memcalc.spec import TrainingSpec

# Breakdown keys of the activations term: "layers/<part>" summed over the layers, "model/<part>" once.
LAYERS_PREFIX = "layers/"
MODEL_PREFIX = "model/"
KEPT_INPUTS = "layers/inputs kept by checkpointing"
KEPT_SELECTIVE = "layers/inputs and op outputs kept by selective-op (traced)"
KEPT_COMPILED = "saved by the compiled layers and the rest of the step (traced)"
KEPT_ON_DEVICE = "left on the GPU by activation offloading (traced)"
KEPT_LORA = "saved by the step with frozen parts (traced)"


@dataclass(frozen=True)
class TracedMoment:
    """One segment's largest moment of a step traced op by op (memcalc.measure.timeline): the bytes alive beside
    the parameters, master and optimizer states, and the parameter gradients among them."""

    phase: Phase
    label: str
    bytes: int
    gradients: int


@dataclass(eq=False, repr=False)
class ActivationEstimate:
    terms: list[Term] = field(default_factory=list)
    forward_transient_extra_bytes: int = 0
    held_through_loss_bytes: int = 0  # what the model's outputs keep alive through the loss, unsaved (Rule.held)
    backward_start_extra_bytes: int = 0
    recompute_bytes: int = 0  # checkpointing: one layer's activations, rebuilt during backward
    # --checkpoint-reentrant: the recomputed layer's output held through its backward (in recompute_bytes too; this
    # for the moments inside a layer's backward that count its activations apart, under full checkpointing)
    reentrant_output_bytes: int = 0
    recompute_forward_extra: int = 0  # ... and, while its recomputation runs, its forward's transients (Rule.forward_transient)
    layer_input_gradient_bytes: int = 0  # ... and the gradient of its output, waiting for its backward
    # Checkpointing: a layer's tensors while its forward runs (its activations; eager attention also its scores)
    checkpointed_forward_bytes: int = 0
    # What the final norm, the head and the logits' softcap saved: freed by the time the last layer's backward runs
    after_layers_bytes: int = 0
    # Late in backward (the first layer's turn): that layer's activations and its gradient transients (Rule.transient)
    # beside nearly every gradient.
    last_layer_bytes: int = 0
    layer_backward_transient_bytes: int = 0  # ... at its MLP's backward (all its activations still there)
    # ... at its attention's backward (its MLP's activations released by then): eager softmax's gradients
    attention_backward_transient_bytes: int = 0
    layer_mlp_bytes: int = 0  # what the layer's MLP saved (released before its attention's backward)
    last_layer_mlp_bytes: int = 0  # ... the last layer's (under checkpointing: the recomputed one's)
    # --cp: the last layer's ring attention in the forward, beyond the output and log-sum-exp the layer saves (the
    # activations of the layers before it and of its own attention's inputs beside)
    ring_forward_bytes: int = 0
    after_attention_bytes: int = 0  # what a layer makes after its attention beyond its MLP's (Rule.after_attention)
    opening_backward_transient_bytes: int = 0  # a layer's backward at its first op (Rule.opening_transient)
    last_opening_backward_transient_bytes: int = 0  # ... the last layer's (Rule.last_opening_transient)
    layer_forward_transient_bytes: int = 0  # a layer's forward at its largest, beyond what it saves (Rule.forward_transient)
    released_at_mlp_bytes: int = 0  # ... what it released by its MLP's backward (Rule.released_at_mlp)
    released_at_last_mlp_bytes: int = 0  # ... the last layer's (Rule.released_at_last_mlp)
    mid_norm_transient_bytes: int = 0  # its norm's backward between the MLP's and attention's (Rule.mid_norm_transient)
    output_gradient_bytes: int = 0  # the layer's output gradient among its transients (Rule.output_gradient)
    released_at_scores_bytes: int = 0  # what its backward released by softmax's beyond its MLP's (Rule.released_at_scores)
    # ... and beside it the activations still kept then: the per-model ones but the final norm's and head's, and with
    # checkpointing the first layer's kept input
    first_layer_context_bytes: int = 0
    # ForCausalLMLoss's shifted labels (int64 T, saved by nll_loss): released by nll_loss's backward, the step's first,
    # so absent from every backward moment (the log-softmax's backward, where the loss's two gradients meet, comes after)
    shifted_labels_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    source: str = "none"  # TrainingSummary.activations: rules | trace | approximation | none
    # The loss is a cross-entropy over the vocabulary: the model has a language-model head (a V x h Linear, or the
    # token embedding tied to it), whose weight gradient the engine's backward moments count.
    vocabulary_head: bool = False
    logits_bytes: int = 0  # the head's output, in the compute dtype (rows x vocabulary, this rank's)
    # Traced activations: the step's forward and backward moments traced op by op (memcalc.measure.timeline), which
    # the engine takes instead of its moments of the forward and backward; empty where not traced.
    step: tuple[TracedMoment, ...] = ()
    host_bytes: int = 0  # --activation-offload: the host memory the offloaded activations take at most


def _summed_parts(rule: Rule, indices: list[int] | None = None) -> dict[str, int]:
    """The rule's layer parts summed over its layers (or over ``indices``)."""
    totals: dict[str, int] = {}
    seen: dict[int, tuple[dict[str, int], int]] = {}
    chosen = rule.layers if indices is None else [rule.layers[i] for i in indices]
    for layer in chosen:  # layers of one kind share one dict: count each kind once, times its layers
        entry = seen.get(id(layer))
        seen[id(layer)] = (layer, (entry[1] if entry else 0) + 1)
    for layer, count in seen.values():
        for part, num_bytes in layer.items():
            totals[LAYERS_PREFIX + part] = totals.get(LAYERS_PREFIX + part, 0) + count * num_bytes
    return totals


def _reentrant_output(spec: TrainingSpec, run: Run, arch: Arch, layered: bool) -> int:
    """Reentrant checkpointing (torch/utils/checkpoint.py CheckpointFunction.backward): the recomputed layer's output
    stays referenced by its local ``outputs`` while torch.autograd.backward runs through the layer, one hidden state
    in the residual stream's dtype beside the recomputation (measured: tests/test_recipes.py)."""
    return run.residual * run.tokens * arch.hidden_size if spec.checkpoint_reentrant and layered else 0


def _model_parts(rule: Rule) -> dict[str, int]:
    return {MODEL_PREFIX + part: num_bytes for part, num_bytes in rule.per_model.items()}


def _rule(model: ModelInput, spec: TrainingSpec, run: Run) -> tuple[Rule, bool, Run]:
    """The family's hand rule, or the trace of the model's own code (``--activations``: auto takes the rules where
    the family has them and the trace elsewhere); whether it is traced; and the run as counted (a traced class
    without an sdpa path runs eager attention)."""
    described = model.described
    assert described is not None
    arch, family = described.arch, described.family
    source = spec.activations
    # (a padded batch where the family's rules count no padding mask: its causal LM traced, padded, instead)
    unruled = run.padded and not run.flash and not family.counts_padding and arch.head == CAUSAL_LM
    if source == ActivationSource.rules or (source == ActivationSource.auto and described.derived and not unruled):
        return family.activations(arch, run), False, run
    from memcalc.families import fallback_available

    if not fallback_available():
        if source == ActivationSource.trace:
            raise MissingDependencyError(f"{{activations}} trace runs the model's code: install torch and "
                                         f"transformers ({INSTALL_TORCH})")
        rule = family.activations(arch, run)
        rule.notes.append("not traced (torch and transformers are not installed): the approximation above may be "
                          f"low by 30% or more; install them ({INSTALL_TORCH}) for the traced estimate")
        return rule, False, run
    from memcalc.families.traced import traced_rule

    try:
        rule, eager = traced_rule(dict(described.raw), described.architecture, arch, run)
        return rule, True, dataclasses.replace(run, eager=run.eager or eager)
    except Exception as error:
        why = " ".join(str(error).split())[:200] or type(error).__name__
        if source == ActivationSource.trace:
            if isinstance(error, MemcalcError):
                raise
            raise UnsupportedModelError(f"{{activations}} trace: the forward of this model could not be traced ({why})"
                                        ) from None
        rule = family.activations(arch, run)
        rule.notes.append(f"the trace of this model failed ({why}): the approximation above stands and may be low")
        return rule, False, run


def _traced_spec(spec: TrainingSpec) -> TrainingSpec:
    """What the optimizer and the data-parallel ranks do does not change one rank's forward and backward."""
    return dataclasses.replace(spec, optimizer="adamw", optim_impl="foreach", amsgrad=False, adafactor_beta1=None,
                               optim_rank=None, state_dtype=None, num_gpus=1, num_nodes=1, grad_accum=1)


def _traced_step(model: ModelInput, spec: TrainingSpec, run: Run) -> tuple[tuple[TracedMoment, ...], str, Any]:
    """The step traced op by op (memcalc.measure.timeline) for a traced model, where one process can run its forward
    and backward; else none and why the engine's generic moments stand. Also the trace's StepMoments (None when not
    traced)."""
    described = model.described
    assert described is not None
    if spec.zero_stage or spec.offload != Offload.none:
        return (), ("the forward and backward moments follow the generic rule (a layer's activations and c T (I + h) "
                      "of gradient transients): the step is traced op by op only without ZeRO/FSDP sharding"), None
    from memcalc.measure.timeline import step_moments

    try:
        moments, cached = step_moments(dict(described.raw), _traced_spec(spec),
                                       "eager" if run.eager and not run.sdpa_math else "sdpa")
    except Exception as error:  # noqa: BLE001 (any failure of the model's code: the generic moments stand, said)
        why = " ".join(str(error).split())[:200] or type(error).__name__
        why = why.replace("verify does not yet run", "the step trace does not run").replace("; drop it to verify the rest", "")
        return (), (f"the step could not be traced op by op ({why}): the forward and backward moments follow the "
                      "generic rule (a layer's activations and c T (I + h) of gradient transients) and may be low"), None
    accumulated = (f"; with --grad-accum {spec.grad_accum} every gradient is counted beside each moment (the traced "
                   "step starts without them)" if spec.grad_accum > 1 else "")
    found = tuple(TracedMoment(Phase.forward if m.phase == "forward" else Phase.backward, m.label, m.bytes, m.gradients)
                  for m in moments.peaks)
    return found, moments.describe() + (" (from the cache)" if cached else "") + accumulated, moments


SELECTIVE_OP_SOURCE = ("torchtitan distributed/activation_checkpoint.py SelectiveAC (per-op policy), run on the "
                       "model's own code and traced (memcalc.measure.selective, memcalc.measure.timeline)")


OFFLOAD_SOURCE = ("torchtune training/_activation_offloading.py OffloadActivations and get_act_offloading_ctx_manager "
                  "(TRL's copy in trl/models/activation_offloading.py); transformers modeling_utils.py "
                  "_activation_checkpointing_enable(offload=True) with torch.autograd.graph.save_on_cpu; run on the "
                  "model's own code and traced (memcalc.measure.offload, memcalc.measure.timeline)")


TRL_ADDRESS_NOTE = ("--activation-offload trl: TRL keys its storage deduplication by device address, so a tensor "
                    "given the address of an offloaded one already freed is kept on the GPU; which addresses the "
                    "caching allocator reuses is not modelled, so the GPU may hold more than counted here")


def _traced_only(model: ModelInput, spec: TrainingSpec, run: Run
                 ) -> tuple[tuple[TracedMoment, ...], str, int, int]:
    """Recipes no hand rule covers in any family (--checkpointing selective-op: which op outputs torchtitan's policy
    keeps depends on each family's code; --activation-offload: which saved tensors torchtune moves, and when its
    stashes free them; --compile: what Inductor's partitioner saves and its kernels keep): the step is traced with
    the real policy, manager or compiler applied, for every family; where it cannot be, the estimate is refused,
    never guessed. The moments, why, the activations left saved on the device and the host memory offloaded ones
    take."""
    from memcalc.families import fallback_available

    what = " with ".join(name for name, given in (
        ("{checkpointing} selective-op", spec.checkpointing == Checkpointing.selective_op),
        (f"{{activation_offload}} {spec.activation_offload.value}", spec.activation_offload != ActivationOffload.none),
        ("{compile}", spec.compile), (f"{{fp8}} {spec.fp8.value}", spec.fp8 != Fp8Recipe.none)) if given)
    offloaded = spec.activation_offload != ActivationOffload.none
    if not fallback_available():
        raise MissingDependencyError(f"{what} is estimated by tracing the model's own step with it applied: install "
                                     f"torch and transformers ({INSTALL_TORCH})")
    if spec.fp8 != Fp8Recipe.none and importlib.util.find_spec("torchao") is None:
        raise MissingDependencyError(f"{what} is estimated by tracing the step with torchao's float8 layers: "
                                     "pip install torchao (memcalc-train[fp8])")
    if spec.zero_stage or spec.offload != Offload.none:
        raise UsageError(f"{what} is estimated from the step traced op by op, which runs one process without ZeRO/FSDP "
                         "sharding or offload: drop {zero} and {offload}, or drop it"
                         + (" ({activation_offload} none)" if offloaded else ""))
    step, why, moments = _traced_step(model, spec, run)
    if not step:
        reason = why.split(": the forward and backward moments follow")[0]
        raise UnsupportedModelError(f"{what}: {reason}" + ("; give {activation_offload} none to count the run without it"
                                                           if offloaded else ""))
    return step, why, moments.kept or 0, moments.host


COMPILE_OFFLOAD_NOTE = ("--compile with --activation-offload: the offloader's hooks take the compiled layers' saved "
                        "tensors, as autograd hands them over; each was measured alone (CPU steps), the two together "
                        "only traced (offloading needs a GPU to measure)")


LORA_SOURCE = ("peft tuners/lora/layer.py Linear.forward (the base layer, then lora_B(lora_A(dropout(x))) scaled), "
               "on the model's own code, traced (memcalc.measure.step._with_lora, memcalc.measure.timeline)")
LORA_RULES_NOTE = ("{what}: the activations are counted as full fine-tuning's, high: a frozen Linear saves its "
                   "weight, not its input, so the real step saves less (LoRA CPU steps of a small Llama: forward and "
                   "backward 4% to 50% lower)")


QLORA_UPCAST_NOTE = ("QLoRA with PEFT's fp32 upcast: the fp32 embeddings and norms make the residual stream fp32, which "
                     "the rules do not count (CPU steps of a small Llama measured the forward 15% to 18% above them): "
                     "the activations may be low")


# torchao 0.18's LinearNF4 forward and backward peaked 14.0 to 14.1 B per weight element on CPU tensors, 384 x 256 to
# 4096 x 11008 (tests/test_qlora_torchao.py; NF4Tensor.get_original_weight's int64 code indices among them)
TORCHAO_UNTRACED_NOTE = (", and torchao's dequantization, about 14 B per element of the largest quantized weight at "
                         "once (NF4Tensor.get_original_weight), is not counted without the trace")


def _frozen_step(model: ModelInput, spec: TrainingSpec, run: Run, result: ActivationEstimate) -> int | None:
    """LoRA on a frozen base, or frozen parts (--freeze): the step traced with PEFT's adapters and the parts frozen,
    where torch runs it (the forward and backward moments and the activations the forward leaves saved); else the
    rules' full fine-tuning count, said to be high."""
    from memcalc.families import fallback_available

    note = LORA_RULES_NOTE.format(what="LoRA" if spec.lora_rank else "--freeze")
    if spec.qlora and spec.qlora_upcast:
        note = QLORA_UPCAST_NOTE
    if spec.qlora and spec.qlora_quantizer.value == "torchao":
        note += TORCHAO_UNTRACED_NOTE
    if not fallback_available():
        result.notes.append(f"{note}; install torch and transformers ({INSTALL_TORCH}) and peft for the traced step")
        return None
    if spec.lora_modules_to_save:
        # PEFT deep-copies each module to save; under FakeTensorMode the copies crash the process (torch 2.13).
        result.notes.append(f"{note}; with --lora-modules-to-save the step is not traced (PEFT's copies of the "
                            "modules cannot be made of fake tensors)")
        return None
    step, why, moments = _traced_step(model, spec, run)
    if not step:
        result.notes.append(f"{note}; {why.split(': the forward and backward moments follow')[0]}")
        return None
    result.step = step
    result.notes.append(why)
    return moments.kept or 0


CHUNKED_SOURCE = ("torchtune modules/loss/ce_chunked_output_loss.py CEWithChunkedOutputLoss (logits.float() per "
                  "chunk, F.cross_entropy), modules/transformer.py TransformerDecoder.chunked_output")
FUSED_LINEAR_SOURCE = ("Liger-Kernel ops/fused_linear_cross_entropy.py fused_linear_cross_entropy_forward: grad_input "
                       "(zeros_like the hidden states) and grad_weight (zeros_like the head's weight, when it trains) "
                       "computed in the forward and saved; the logits one chunk at a time (chunk_size = "
                       "next_power_of_2(ceil(rows / ceil(V / h))))")


def _fused_linear_loss(result: ActivationEstimate, arch: Arch, spec: TrainingSpec, recipe: Recipe, run: Run,
                       loss: Loss) -> None:
    """--loss fused-linear (Liger's FusedLinearCrossEntropy; Apple's cut-cross-entropy keeps less still): the head's
    matmul, the cross-entropy and its gradients in one function; the full logits never exist."""
    rows, vocab, hidden = loss.rows, loss.vocab, arch.hidden_size
    head_trains = not spec.lora_rank and "lm_head" not in spec.freeze and not (
        arch.tie_word_embeddings and "embeddings" in spec.freeze)
    grad_input = rows * hidden * run.residual  # zeros_like(_input): the final norm's output (fp32 under autocast)
    grad_weight = vocab * hidden * BYTES_PER_DTYPE[recipe.weight_dtype] if head_trains else 0
    chunk = min(1 << max(0, math.ceil(rows / math.ceil(vocab / hidden)) - 1).bit_length(), rows)
    result.forward_transient_extra_bytes = chunk * vocab * run.c + rows * BYTES_PER_FP32  # a logits chunk, loss_1d
    result.backward_start_extra_bytes = 0  # backward scales the saved gradients in place (element_mul_kernel)
    result.notes.append("--loss fused-linear is modelled from Liger-Kernel's code (Triton: it runs on a GPU only); "
                        "measured once, on an H200 (Llama-3.2-1B bf16, 4 x 1024, liger-kernel 0.8.5): 0.11% low, "
                        "16.7 MB, about one rows x h 16-bit tensor not placed; lm_head's saved input is counted as a "
                        "Linear saves it")
    result.terms.append(Term(
        name=TERM_LOSS_BUFFERS, bytes=grad_input + grad_weight,
        formula=f"fused linear cross-entropy: grad_input {rows:,} x {hidden:,} x {run.residual} B"
                + (f" + the head's grad_weight {vocab:,} x {hidden:,} x {BYTES_PER_DTYPE[recipe.weight_dtype]} B "
                   "(its gradient, made in the forward)" if grad_weight else "")
                + f", saved until backward; during the loss one logits chunk ({chunk:,} rows x {vocab:,} x {run.c} B) "
                  f"and the fp32 per-row losses",
        source=FUSED_LINEAR_SOURCE, category=CATEGORY_ACTIVATIONS, phases=FORWARD_BACKWARD,
    ))


def _ring_attention(result: ActivationEstimate, arch: Arch, run: Run, cp: int) -> None:
    """--cp: what torch's ring attention holds while it runs (memcalc.context_parallel.ring_peaks), in the forward
    beyond the output and log-sum-exp it leaves, and in the backward beside the attention output's gradient (o_proj's
    input gradient) and the residual stream's."""
    q, kv, lse = context_parallel.ring_bytes(arch.num_heads // run.tp, arch.num_kv_heads // run.tp, arch.head_dim,
                                             run.tokens, run.c)
    ring = context_parallel.ring_peaks(q, kv, lse, run.c, cp)
    around = q + run.residual * run.tokens * arch.hidden_size
    result.attention_backward_transient_bytes = max(result.attention_backward_transient_bytes, ring.backward + around)
    result.ring_forward_bytes = max(0, ring.forward - q - lse)
    result.notes.append(
        f"--cp {cp}: each rank runs {run.s:,} positions of each sequence; attention is torch's ring "
        f"(context_parallel: keys and values all-gathered, the blocks merged in fp32), {ring.forward:,} B at its "
        f"forward's peak and {ring.backward:,} B at its backward's (rank {ring.rank} of {cp}, the most loaded), walked "
        f"from _templated_ring_attention and its backward line by line; assumed: {context_parallel.ASSUMPTIONS}"
        + ("; with --tp, each rank's heads (measured together under FSDP2 on a (dp, tp) mesh, the ring over dp)"
           if run.tp > 1 else ""))


# torch's CUDA scaled_dot_product_attention on fp32 inputs with grouped key/value heads: transformers passes the
# grouped heads as they are (integrations/sdpa_attention.py use_gqa_in_sdpa: no mask, head dim <= 256 -> enable_gqa),
# flash and cuDNN take only 16-bit inputs, and the memory-efficient kernel refused grouped heads in torch 2.11
# (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, can_use_mem_efficient_attention's dense constraints), so
# select_sdp_backend falls to the math path (_scaled_dot_product_attention_math), which keeps the softmax
# probabilities (b a s^2 fp32), a scaled q and k and v repeated to every head: what eager attention keeps.
# Measured on an H200, torch 2.11 (benchmarks/sdpa_backends.py; docs/accuracy-gpu.md): each kernel refused but math,
# and the math step's peak within 132 B of the eager rule (plus the card's cuBLAS workspaces).
SDPA_MATH_NOTE = ("attention: fp32 with grouped key/value heads ({heads} query, {kv} kv) under sdpa: torch's CUDA "
                  "kernels cannot take it (flash and cuDNN need 16-bit inputs; the memory-efficient kernel takes no "
                  "grouped heads, torch 2.11, sdp_utils.cpp), so SDPA runs its math path, which keeps the b a s^2 "
                  "probabilities like eager attention: counted as eager (measured on an H200, docs/accuracy-gpu.md). "
                  "A torch whose memory-efficient kernel takes grouped heads keeps less (a CPU's flash kernel takes "
                  "fp32: --verify's CPU steps hold sdpa to the math path, as CUDA runs it). bf16 (--precision "
                  "bf16-pure or amp-bf16) avoids it")


# Families whose own attention code hands sdpa k and v already expanded to every head (no enable_gqa), counted by their
# own rules: Falcon (modeling_falcon.py FalconAttention, multi-query; its rule counts the math backend it gets).
OWN_GROUPED_SDPA = frozenset({"falcon"})


def windowed_layers(arch: Arch, seq_len: int) -> list[bool]:
    """Per decoder layer, whether sdpa gets a sliding-window mask: the window shorter than the sequence, in the layers
    that slide (LlamaArch.layer_slides; none for the other families)."""
    slides = getattr(arch, "layer_slides", [False] * arch.num_layers)
    windowed = arch.sliding_window is not None and arch.sliding_window < seq_len
    return [windowed and slide for slide in slides]


def sdpa_runs_math(arch: Arch, spec: TrainingSpec, recipe: Recipe, model_type: str = "") -> bool:
    """Whether CUDA's scaled_dot_product_attention falls back to its math path in any layer of this run
    (SDPA_MATH_NOTE). memcalc's measured CPU steps and traces run it there too
    (memcalc.measure.cuda_semantics.kernels_like_cuda)."""
    # (with --cp, torch's context_parallel runs ring attention over the fused kernels' ops instead: not this path; a
    # layer whose sliding window gives sdpa a mask gets k and v repeated by transformers, no enable_gqa, and the
    # memory-efficient kernel: not this path either, so none where every layer does)
    return (spec.attention == Attention.sdpa and spec.cp == 1 and model_type not in OWN_GROUPED_SDPA
            and arch.supports_sdpa and not spec.repeat_kv
            and BYTES_PER_DTYPE[recipe.compute_dtype] == BYTES_PER_FP32 and not recipe.autocast
            and 0 < arch.num_kv_heads < arch.num_heads and 0 < arch.head_dim <= 256
            and not spec.padding_masked
            and not _every(windowed_layers(arch, spec.local_seq_len)))


# The flash kernel's backward (FlashAttention-2's mha_bwd, PyTorch's aten/src/ATen/native/transformers/cuda/flash_attn/
# flash_api.cpp) allocates, beside its gradients: softmax_d, fp32 (b, heads, s rounded to 128); dq_accum, fp32
# (b, s rounded to 128, heads, head_dim rounded to 32); with fewer kv heads than heads, dk_expanded and dv_expanded
# (b, s, heads, head_dim) in the inputs' dtype, summed into dk and dv after the kernel. Freed when the op returns, so
# never in a FakeTensor trace or a CPU step: not counted, and named where it is large enough to matter.
FLASH_WORKSPACE_NOTED = 256 * 2**20  # (a quarter of a GiB: worth a line on any card)
FLASH_WORKSPACE_NOTE = ("attention: not counted: each layer's flash backward allocates {size} of its own while it runs "
                        "(FlashAttention-2's mha_bwd: an fp32 dq accumulator, and with grouped kv heads k and v gradients "
                        "for every head); a moment inside it is not modelled (cuDNN's attention, where torch picks it, "
                        "has its own workspace); not measured on a GPU yet")


def flash_backward_workspace(arch: Arch, spec: TrainingSpec, run: Run) -> int:
    """The bytes FlashAttention-2's backward allocates for itself in one layer's call (16-bit runs only: flash takes
    no fp32 inputs)."""
    if run.c == BYTES_PER_FP32 or not arch.num_heads or not arch.head_dim or arch.head_dim > 256:
        return 0
    heads, kv_heads = arch.num_heads // spec.tp, max(1, arch.num_kv_heads // spec.tp)
    b, s, d = spec.micro_batch_size, spec.local_seq_len, arch.head_dim
    rounded = -(-s // 128) * 128
    accumulators = BYTES_PER_FP32 * b * heads * rounded * (1 + -(-d // 32) * 32)
    expanded = 2 * run.c * b * s * heads * d if kv_heads != heads else 0
    return accumulators + expanded


def padding_not_counted(arch: Arch, run: Run, traced: bool) -> str:
    """The note for --padded where neither the rules nor the trace count the padding mask, with what the Llama rules
    would count for it: per layer the mask's float bias (c b s^2) and k and v repeated to the query heads."""
    heads, kv_heads = arch.num_heads // run.tp, max(1, arch.num_kv_heads // run.tp)
    per_layer = run.c * run.b * run.s * run.s + 2 * run.c * run.tokens * max(0, heads - kv_heads) * arch.head_dim
    how = ("the trace pads the batch of a causal language model only" if traced else
           "its rules count no mask; its causal LM is traced, padded, where torch and transformers are installed")
    return (f"--padded: not counted for {arch.architecture} ({how}). Each layer's sdpa would keep the padding mask as a "
            f"float bias and k and v repeated to every head: about {per_layer * arch.num_layers / 2**30:,.2f} GiB in "
            f"all as the Llama rules count it ({per_layer:,} B a layer), by which the estimate may be low without "
            "checkpointing")


def _every(flags: list[bool]) -> bool:
    return bool(flags) and all(flags)


def estimate(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> ActivationEstimate:
    result = ActivationEstimate()
    described = model.described
    if described is None:
        result.notes.append("activations need an architecture: with --params only, the peak excludes them")
        return result
    arch, family = described.arch, described.family
    eager = spec.attention == Attention.eager
    if spec.attention == Attention.sdpa and not arch.supports_sdpa:
        eager = True
        result.notes.append(f"attention: {arch.architecture} has no sdpa path in transformers (_supports_sdpa = False), "
                            "so it runs eager attention unless flash_attention_2 is asked for (--attn flash): "
                            "counted eager (b a s^2 scores per layer)")
    # (sdpa's math path keeps what eager keeps, without its mask)
    math_sdpa = sdpa_runs_math(arch, spec, recipe, described.model_type)
    if math_sdpa and not eager:
        eager = True
        result.notes.append(SDPA_MATH_NOTE.format(heads=arch.num_heads, kv=arch.num_kv_heads))
        windowed = sum(windowed_layers(arch, spec.local_seq_len))
        if windowed:
            result.notes.append(
                f"attention: in the {windowed} sliding-window layers (window {arch.sliding_window:,} < seq "
                f"{spec.local_seq_len:,}) sdpa gets a mask, k and v repeated by transformers, and runs the "
                "memory-efficient kernel, which keeps no s^2 probabilities: counted so, the others on the math path")
    run = Run(spec.micro_batch_size, spec.local_seq_len, BYTES_PER_DTYPE[recipe.compute_dtype], recipe.autocast, eager,
              tp=spec.tp, sp=spec.sequence_parallel, loss_parallel=spec.loss_parallel, cp=spec.cp,
              ep=spec.ep, ep_load=spec.ep_load,
              flash=spec.attention == Attention.flash, checkpointing=spec.checkpointing != Checkpointing.none,
              decoder_s=spec.decoder_seq_len, repeat_kv=spec.repeat_kv, sdpa_math=math_sdpa,
              padded=spec.padding_masked,
              transformers=installed_transformers() if family.release_dependent else None)
    if not arch.hidden_size or not arch.num_layers:
        result.notes.append(f"activations not modelled for model_type '{described.model_type}' (no hidden size / "
                            "layers found)")
        return result
    rule, traced, run = _rule(model, spec, run)
    if spec.repeat_kv and not traced and arch.num_kv_heads < arch.num_heads:
        result.notes.append(
            "--repeat-kv: the rules count the repeated k and v each layer saves (the backward exact at Llama-3.2-3B); "
            "the forward's moment, with the copies being made, up to 1.5% low; --activations trace counts it"
            if family.counts_repeat_kv else
            f"--repeat-kv: {arch.architecture}'s rules do not count k and v repeated to every head (low by two "
            "copies per layer of the extra heads' k and v); --activations trace counts them")
    if run.padded and spec.attention != Attention.flash and not eager and not traced and not family.counts_padding:
        result.notes.append(padding_not_counted(arch, run, traced=False))  # (traced: families.traced says it)
    if run.padded and spec.attention == Attention.flash and not family.counts_padding:  # (the Llama rules say it)
        result.notes.append(FLASH_PADDED_NOTE)
    if not traced:
        rule = for_head(rule, arch, run)  # a decoder family's rule is its causal LM's: the head named instead
    if spec.pp > 1:
        rule = pipeline.stage_rule(rule, spec, run)  # one micro-batch on this stage
    result.source = "trace" if traced else ("rules" if described.derived else "approximation")
    result.notes.extend(rule.notes)
    workspace = flash_backward_workspace(arch, spec, run) if not eager else 0
    if workspace >= FLASH_WORKSPACE_NOTED:
        result.notes.append(FLASH_WORKSPACE_NOTE.format(size=f"{workspace / 2**20:,.0f} MiB"))
    selective = spec.checkpointing == Checkpointing.selective_op
    offloaded = spec.activation_offload != ActivationOffload.none
    # (--fp8 on one process: torchao's float8 layers run on the CPU and under FakeTensorMode, so the step is traced
    # with them; sharded, their casts are the engine's modelled fp8_casts term)
    traced_fp8 = spec.fp8 != Fp8Recipe.none and not spec.zero_stage and spec.offload == Offload.none
    traced_only = selective or offloaded or spec.compile or traced_fp8
    if traced_only:
        result.step, why, traced_kept, result.host_bytes = _traced_only(model, spec, run)
        result.notes.append(why)
        if spec.compile and offloaded:
            result.notes.append(COMPILE_OFFLOAD_NOTE)
        if spec.activation_offload == ActivationOffload.trl:
            result.notes.append(TRL_ADDRESS_NOTE)
    elif (spec.lora_rank or spec.freeze) and spec.activations != ActivationSource.rules:
        traced_kept = _frozen_step(model, spec, run, result)
    elif traced:
        result.step, why, _ = _traced_step(model, spec, run)
        result.notes.append(why)
    lora_traced = bool(spec.lora_rank or spec.freeze) and not traced_only and bool(result.step)
    if spec.qlora and spec.qlora_upcast and not lora_traced and spec.activations == ActivationSource.rules:
        result.notes.append(QLORA_UPCAST_NOTE)
    if traced_only or lora_traced:
        result.source = "trace"  # (a hand-ruled family's run too: its step is the traced one)
    per_model = rule.per_model_bytes
    layer_totals = [rule.layer_bytes(i) for i in range(len(rule.layers))]
    layered = described.derived or traced  # layer by layer, from the code: the step's moments apply
    if layered:
        result.last_layer_bytes = layer_totals[0]
        result.layer_backward_transient_bytes = rule.transient
        result.attention_backward_transient_bytes = rule.attention_transient
        result.layer_mlp_bytes = rule.layers[0].get(PART_MLP, 0)
        # The last layer's (under checkpointing the largest, the one counted recomputed; DeepSeek's and Qwen-MoE's
        # layers differ in their MLPs)
        last = (max(range(len(layer_totals)), key=layer_totals.__getitem__)
                if spec.checkpointing == Checkpointing.full else len(layer_totals) - 1)
        result.last_layer_mlp_bytes = rule.layers[last].get(PART_MLP, 0)
        result.after_attention_bytes = rule.after_attention
        result.opening_backward_transient_bytes = rule.opening_transient
        result.last_opening_backward_transient_bytes = (rule.opening_transient if rule.last_opening_transient is None
                                                        else rule.last_opening_transient)
        result.layer_forward_transient_bytes = rule.forward_transient
        result.released_at_mlp_bytes = rule.released_at_mlp
        result.released_at_last_mlp_bytes = (rule.released_at_mlp if rule.released_at_last_mlp is None
                                             else rule.released_at_last_mlp)
        result.mid_norm_transient_bytes = rule.mid_norm_transient
        result.output_gradient_bytes = rule.output_gradient
        result.released_at_scores_bytes = rule.released_at_scores
        result.after_layers_bytes = sum(rule.per_model.get(part, 0) for part in (PART_FINAL_NORM, PART_HEAD,
                                                                                  PART_LOGIT_SOFTCAP))
        result.first_layer_context_bytes = rule.per_model_bytes - result.after_layers_bytes
        if (described.derived and arch.head == CAUSAL_LM and rule.loss is not None and spec.loss == LossKind.standard
                and max(run.tp, spec.pp, spec.cp) == 1):
            # (the decoders' rules count them in PART_IDS; BERT's and T5's heads, named by class, read the labels given)
            result.shifted_labels_bytes = BYTES_PER_INT64 * run.tokens
            result.first_layer_context_bytes -= result.shifted_labels_bytes
        if run.eager and arch.num_heads:
            # Eager attention's backward, after the MLP's (whose activations are released by then): the probabilities'
            # gradient from the second matmul (c b a s^2) beside softmax's fp32 backward output (4 b a s^2) and the
            # saved softmax output. Found by the traced step (memcalc/measure/timeline.py: Mistral-7B, Phi-3-mini and
            # Qwen2.5-7B checkpointed were 1.5% to 5.9% low without it) and measured (Llama-family bf16, OPT and
            # Falcon fp32 eager checkpointed CPU steps were 4% to 7% low with the fp32 one alone).
            # Where the rule says what the layer has released by softmax's backward (Rule.released_at_scores: the
            # probabilities' 16-bit copy among it), the moment itself: softmax's fp32 output, the fp32 gradient
            # arriving at it (the probabilities' gradient cast up by .to()'s backward) and its fp32 output (measured:
            # Llama-family eager checkpointed CPU steps, benchmarks/accuracy.py).
            # On CUDA softmax's backward also makes a temporary of its incoming gradient's size (SoftMax.cu
            # softmax_backward_cuda_out: grad * output; measured on an H200, benchmarks/gpu-runs/2026-12-04-h200-b):
            # in scores_backward_bytes, and an fp32 one beside the probabilities' gradient here.
            released = rule.released_at_scores
            per_score = rule.scores_backward_bytes if released else 2 * BYTES_PER_FP32 + run.c
            scores = per_score * run.b * (arch.num_heads // run.tp) * run.s * run.s + rule.held_at_scores
            result.attention_backward_transient_bytes = max(rule.attention_transient, scores)
    if spec.cp > 1 and layered:
        _ring_attention(result, arch, run, spec.cp)
    if lora_traced:
        total = traced_kept
        breakdown = {KEPT_LORA: total}
        what = "PEFT's LoRA on the frozen base" if spec.lora_rank else f"{', '.join(spec.freeze)} frozen"
        formula = (f"traced with {what} (checkpointing {spec.checkpointing_label}): {total:,} B saved when the "
                   "forward ends (a frozen Linear saves its weight, not its input; an adapter its input and the "
                   "rank-r product)")
    elif offloaded:
        # What the traced forward leaves saved on the device: tensors under 1024 bytes, nn.Parameter objects saved as
        # such (a weight's transposed view is a plain tensor: copied), the head's and the loss's saves, and the forward
        # stash (the last offloaded tensors, until the copy is known done).
        total = traced_kept
        breakdown = {KEPT_ON_DEVICE: total}
        how = ("transformers' checkpoint offloading (save_on_cpu around each checkpoint call)"
               if spec.activation_offload == ActivationOffload.checkpoints
               else f"{spec.activation_offload.value}'s OffloadActivations")
        formula = (f"traced with {how} (checkpointing {spec.checkpointing_label}): {total:,} B saved on the GPU when "
                   f"the forward ends; {result.host_bytes:,} B of copies in host memory at most")
    elif spec.compile:
        total = traced_kept
        breakdown = {KEPT_COMPILED: total}
        formula = (f"{len(layer_totals)} compiled layers (checkpointing {spec.checkpointing_label}), traced: "
                   f"{total:,} B saved when the forward ends (what AOTAutograd's partitioner keeps in each layer, "
                   "beside the embeddings', head's and loss's saves)")
    elif spec.checkpointing == Checkpointing.full:
        kept = rule.kept
        later_masks = 0  # (the masks only later layers hold: released before the first layer's backward)
        if run.eager and not math_sdpa and layered and (traced or family.checkpoint_keeps_causal_mask):
            # masking_utils.create_causal_mask gives eager attention a 4-D additive mask (b, 1, s, s) in the
            # embeddings' dtype (fp32 under autocast); checkpointed layers hold it as an argument until backward.
            mask = run.residual * run.b * run.s * run.s
            kept += rule.eager_masks * mask
            later_masks = (rule.eager_masks - 1) * mask
        kept += rule.checkpoint_arguments
        total = kept + per_model
        breakdown = {KEPT_INPUTS: kept, **_model_parts(rule)}
        result.recompute_bytes = rule.recompute if rule.recompute is not None else max(layer_totals)
        # (a recomputed layer's norm that saves the kept input itself: counted once, with the kept inputs)
        result.recompute_bytes -= rule.recompute_saves_input
        result.reentrant_output_bytes = _reentrant_output(spec, run, arch, layered)
        result.recompute_bytes += result.reentrant_output_bytes
        if layered:
            # In the forward a checkpointed layer keeps nothing, but its tensors exist while it runs: at most its
            # activations, and with eager attention the scores beside softmax's fp32 output (the traced step found
            # the forward up to 12.6% low without this moment: Phi-3-mini, Mistral-7B eager, seq 2048).
            # Its attention's tensors are not kept once its MLP runs: the larger of the two parts.
            scores = run.c * run.b * (arch.num_heads // run.tp) * run.s * run.s if run.eager else 0
            if run.eager and rule.forward_scores is not None:
                scores = rule.forward_scores
            mlp = result.last_layer_mlp_bytes
            # (A MoE block's forward ends with its tensors and the buffers of the restore: Rule.forward_transient.)
            result.checkpointed_forward_bytes = max(result.recompute_bytes - mlp + scores, mlp + rule.forward_transient)
            if rule.forward_transient:
                result.recompute_forward_extra = rule.forward_transient
                # (late in backward, beside the first layer's recomputation: the gradient arriving at it, waiting, as
                # it waits through the MLP's backward: Rule.output_gradient, this rank's split of the sequence under
                # --sp)
                result.layer_input_gradient_bytes = rule.output_gradient
            if result.ring_forward_bytes:  # --cp: the layer's ring attention (its recomputation's: the engine's)
                ring = (result.recompute_bytes - mlp - result.after_attention_bytes) + result.ring_forward_bytes
                result.checkpointed_forward_bytes = max(result.checkpointed_forward_bytes, ring)
            # The first layer's backward: its own kept input (and its eager mask) beside the per-model activations
            result.first_layer_context_bytes += (kept - rule.kept + rule.kept // len(layer_totals)
                                                 - rule.recompute_saves_input - later_masks)
        formula = (f"layer inputs {kept:,} B + per model {per_model:,} B; during backward one layer is "
                   f"recomputed at a time ({result.recompute_bytes:,} B: {rule.formula})")
    elif selective:
        # The traced forward's saved activations: each layer's input and the outputs of the ops the policy saves, and
        # what the layers before and after save (the rule's per-model parts, as under full checkpointing).
        per_model_parts = _model_parts(rule) if traced_kept >= per_model else {}
        total = traced_kept
        breakdown = {KEPT_SELECTIVE: total - sum(per_model_parts.values()), **per_model_parts}
        formula = (f"{len(layer_totals)} layers under torchtitan's per-op policy (each keeps its input and the outputs "
                   f"of matmuls, every other mm recomputed, and of attention), traced: {total:,} B saved when the "
                   "forward ends; during backward one layer at a time recomputes the rest")
    elif spec.checkpointing == Checkpointing.every:
        checkpointed = [i for i in range(len(layer_totals)) if spec.checkpointed(i)]
        kept_per_layer, uneven = divmod(rule.kept, len(layer_totals))
        if uneven or not layered:
            raise UnsupportedModelError(f"{{checkpointing}} {spec.checkpointing_label} is modelled for decoder "
                                        f"layers of one input each; {described.model_type} is not: use full or none")
        saved = [i for i in range(len(layer_totals)) if i not in checkpointed]
        if not checkpointed:
            result.notes.append(f"--checkpointing {spec.checkpointing_label} checkpoints none of the "
                                f"{len(layer_totals)} layers (every N-th, counted from 1): counted as none")
        kept = kept_per_layer * len(checkpointed)
        if checkpointed and run.eager and not math_sdpa and (traced or family.checkpoint_keeps_causal_mask):
            kept += rule.eager_masks * run.residual * run.b * run.s * run.s  # (each mask one tensor, whatever holds it)
        total = kept + sum(layer_totals[i] for i in saved) + per_model
        breakdown = {**({KEPT_INPUTS: kept} if kept else {}), **_summed_parts(rule, saved), **_model_parts(rule)}
        if checkpointed:
            result.recompute_bytes = (rule.recompute if rule.recompute is not None
                                      else max(layer_totals[i] for i in checkpointed))
            result.recompute_bytes += _reentrant_output(spec, run, arch, layered)
        formula = (f"{len(checkpointed)} of {len(layer_totals)} layers checkpointed ({spec.checkpointing_label}, "
                   f"torchtitan's layer-frequency checkpointing): their inputs {kept:,} B; the other {len(saved)} "
                   f"layers keep everything ({rule.formula}); per model {per_model:,} B; during backward one "
                   f"checkpointed layer is recomputed at a time ({result.recompute_bytes:,} B; counted at the start "
                   "of backward, beside every saved layer: at most the bytes of the layers after it high)")
    else:
        total = sum(layer_totals) + per_model
        breakdown = {**_summed_parts(rule), **_model_parts(rule)}
        uniform = all(n == layer_totals[0] for n in layer_totals)
        layers = (f"{len(layer_totals)} layers x {layer_totals[0]:,} B per layer" if uniform else
                  f"{len(layer_totals)} layers, {sum(layer_totals):,} B (first layer {layer_totals[0]:,} B)")
        formula = f"{layers} ({rule.formula}) + per model {per_model:,} B"
    breakdown = {part: num_bytes for part, num_bytes in breakdown.items() if num_bytes}
    assert sum(breakdown.values()) == total, (breakdown, total)  # the parts are the term
    result.terms.append(Term(
        name=TERM_ACTIVATIONS, bytes=total, formula=formula,
        source=LORA_SOURCE if lora_traced else OFFLOAD_SOURCE if offloaded else SELECTIVE_OP_SOURCE if selective else rule.source,
        category=CATEGORY_ACTIVATIONS,
        phases=FORWARD_BACKWARD, breakdown=breakdown,
    ))
    if result.host_bytes:
        result.terms.append(Term(
            name=TERM_OFFLOADED_ACTIVATIONS, bytes=result.host_bytes,
            formula=("each checkpointed layer's saved inputs, copied to host memory as the layer runs and brought "
                     "back for its recomputation; at most, traced"
                     if spec.activation_offload == ActivationOffload.checkpoints else
                     "every saved tensor of at least 1024 B but nn.Parameter objects and the head's, copied to host "
                     "memory as it is saved (a weight's transposed view, which mm saves, too; a tensor saved by several "
                     "ops once for each; TRL's copy skips parameter storages and repeats) and brought back for its "
                     "node's backward; at most, traced"),
            source=OFFLOAD_SOURCE, category=CATEGORY_CPU_OFFLOAD, phases=[],
        ))
    loss = rule.loss
    result.vocabulary_head = loss is not None and bool(loss.vocab) and loss.vocab == arch.vocab_size
    if spec.loss != LossKind.standard:
        if not result.vocabulary_head:
            raise UsageError(f"{{loss}} {spec.loss_label} replaces the cross-entropy over the vocabulary; "
                             f"{arch.architecture or described.model_type} has no language-model head (its loss, if "
                             "any, is over labels): leave {loss} standard")
        if spec.loss == LossKind.fused_linear:
            _fused_linear_loss(result, arch, spec, recipe, run, loss)
            return result
    if spec.loss == LossKind.standard:  # (the chunked and fused losses call the decoder alone: no outputs held)
        result.held_through_loss_bytes = rule.held
    if loss is not None and loss.vocab:
        rows_vocab = loss.rows * loss.vocab
        result.logits_bytes = rows_vocab * run.c
        saved = rows_vocab * loss.bytes_per_log_softmax
        # The logits (compute dtype) and, when the loss upcasts them, their fp32 copy exist during the loss
        # beside the log_softmax output; at the start of backward the gradients of the log_softmax output and
        # of its input coexist, in the log_softmax dtype.
        upcast = loss.bytes_per_log_softmax if loss.bytes_per_log_softmax != run.c else 0
        # chunked:N (torchtune CEWithChunkedOutputLoss.forward and compute_cross_entropy, with the output
        # projection applied per chunk by TransformerDecoder.chunked_output: chunk(N) along the sequence, at most
        # ceil(s / N) positions each): every
        # chunk's logits live through the loss, but only one chunk is upcast at a time; every chunk's log_softmax
        # output is saved as before; backward starts with one chunk's two fp32 gradients.
        chunk_rows = loss.rows
        if spec.loss == LossKind.chunked:
            chunk_rows = run.b * -(-run.s // spec.loss_chunks) if loss.rows == run.tokens else -(-loss.rows // spec.loss_chunks)
        chunk_vocab = chunk_rows * loss.vocab
        result.forward_transient_extra_bytes = rows_vocab * run.c + chunk_vocab * upcast
        result.backward_start_extra_bytes = 2 * chunk_vocab * loss.bytes_per_log_softmax
        if run.tp > 1 and not run.loss_parallel:
            # --tp without loss parallelism: the head's ColwiseParallel output (this rank's vocabulary split) is
            # all-gathered to every rank (DTensor's Shard(-1) -> Replicate, placement_types.py _to_replicate_tensor:
            # all_gather_single into a (tp x rows, V / tp) buffer, then chunk and cat along the vocabulary). At the cat
            # the split, the buffer and the whole logits exist; both are freed before the loss runs, which has not
            # saved its log-softmax output yet. The forward's loss moment is the larger of the two (measured on the
            # fake group: the gathered moment is the larger with fp32 logits, the loss's with 16-bit ones upcast).
            split = loss.rows * run.c * -(-loss.vocab // run.tp)
            gathered = rows_vocab * run.c + run.tp * split + split - saved
            result.forward_transient_extra_bytes = max(result.forward_transient_extra_bytes, gathered)
        elif run.tp > 1:
            # --loss-parallel: torch/distributed/tensor/parallel/loss.py computes the log-softmax on this rank's split
            # (_log_softmax: the shifted logits beside exp() of them, then the result) and its backward with
            # nll_loss's together (_nll_loss_and_log_softmax_backward: zeros_like, exp and their sum at once, beside
            # the targets as int64 indices: safe_target, _MaskPartial's shifted copy of it, arange_1d and a copy made
            # on the way, and the out-of-split mask, 4 x 8 + 1 B per row; measured, memcalc.measure.tensor_parallel).
            # At the result's subtraction, beside the split: three fp32 values a row (the all-reduced max, the
            # all-reduced sum of exp() and its log) and ForCausalLMLoss's padded int64 labels (measured: tiny MoE ranks
            # under autocast with --sp peak there, 0.12% to 0.17% low without them, 0.03% low with them).
            result.forward_transient_extra_bytes += (BYTES_PER_FP32 * loss.rows * loss.vocab
                                                     + (3 * BYTES_PER_FP32 + BYTES_PER_INT64) * loss.rows)
            result.backward_start_extra_bytes = (3 * BYTES_PER_FP32 * loss.rows * loss.vocab
                                                 + (4 * BYTES_PER_INT64 + 1) * loss.rows)
        chunked = (f"; {spec.loss_label}: the logits in {spec.loss_chunks} chunks, one upcast at a time "
                   "(torchtune CEWithChunkedOutputLoss)" if spec.loss == LossKind.chunked else "")
        result.terms.append(Term(
            name=TERM_LOSS_BUFFERS, bytes=saved,
            formula=f"log_softmax output {loss.rows:,} x {loss.vocab:,} x {loss.bytes_per_log_softmax} B (saved until "
                    f"backward); during the loss also the logits{' and their fp32 upcast' if upcast else ''} "
                    f"({result.forward_transient_extra_bytes:,} B), at the start of backward two gradients "
                    f"({result.backward_start_extra_bytes:,} B){chunked}",
            source=loss.source if spec.loss == LossKind.standard else f"{loss.source}; {CHUNKED_SOURCE}",
            category=CATEGORY_ACTIVATIONS, phases=FORWARD_BACKWARD,
        ))
    if spec.pp > 1:
        _in_flight(result, spec)
    return result


def _in_flight(result: ActivationEstimate, spec: TrainingSpec) -> None:
    """--pp: the stage holds several micro-batches' saved activations at once (memcalc.pipeline.held), and the last
    stage under GPipe every micro-batch's loss buffers (each loss is computed in its forward). The activations and loss
    terms stay one micro-batch's, the one whose backward the step's moments follow; the others' are terms of their own,
    alive through that backward."""
    stage = spec.pp_stage or 0
    held = pipeline.held(spec)
    losses = spec.microbatches - int(spec.pp_later_backward) if spec.pp_schedule.value == "gpipe" else 1
    # (After the first stage a micro-batch's input is the stage's receive buffer, counted with the pipeline's buffers;
    # where the first layer keeps that tensor as it is - checkpointing's kept input, RMSNorm's fp32 copy of an fp32
    # residual stream - it is counted twice: r T h per micro-batch held, at most, left in: measured steps differ by
    # schedule.)
    extra = []
    for term in result.terms:
        others = held - 1 if term.name == TERM_ACTIVATIONS else losses - 1 if term.name == TERM_LOSS_BUFFERS else 0
        if others > 0:
            name = TERM_PIPELINE_HELD_ACTIVATIONS if term.name == TERM_ACTIVATIONS else TERM_PIPELINE_HELD_LOSSES
            extra.append(Term(
                name=name, bytes=others * term.bytes,
                formula=f"{others} more micro-batches in flight on pipeline stage {stage} ({spec.pp_schedule.value}, "
                        f"{spec.microbatches} micro-batches) x {term.bytes:,} B ({term.name})",
                source=pipeline.SOURCE, category=term.category, phases=FORWARD_BACKWARD))
    result.terms.extend(extra)
