"""A family rule from the model's own code: the saved bytes of a traced forward (memcalc.measure.derive), layer by
layer and part by part, turned into the same ``Rule`` the hand-written families give, so that checkpointing,
the step's moments and every engine apply unchanged.

What the trace measures: each decoder layer's saved tensors by part (norms, attention, MLP, the residual adds),
what the model saves outside its layers (embeddings, position tables, final norm, output head) and what the loss
saves. What follows the hand rules' shapes instead: the log-softmax output (rows x vocab x 4 B, ForCausalLMLoss)
as the loss term with its transients, the layer inputs checkpointing keeps (r T h per layer), and one layer's
backward transients (c T (I + h)).
"""

from __future__ import annotations

from memcalc.families.base import Arch
from memcalc.families.saved import Loss, Rule, Run
from memcalc.measure.build import SDPA_REPEAT_KV
from memcalc.measure.cuda_semantics import EMULATED, NOT_EMULATED
from memcalc.measure.derive import current_device, traced_saves
from memcalc.units import BYTES_PER_FP32

PART_LOSS_INPUTS = "loss inputs (shifted labels, scalars)"
PART_LOSS = "loss (traced)"


def traced_rule(raw: dict, architecture: str | None, a: Arch, run: Run) -> tuple[Rule, bool]:
    """The rule for ``run`` from a trace of this config's transformers class (cached; see measure.derive), and
    whether its attention ran eager (asked for, or the class has no sdpa path)."""
    weight_dtype = "fp32" if run.autocast or run.c == BYTES_PER_FP32 else "bf16"
    attention = "eager" if run.eager and not run.sdpa_math else SDPA_REPEAT_KV if run.repeat_kv else "sdpa"
    if run.checkpointing:
        # GradientCheckpointingLayer.__call__ (transformers modeling_layers.py) drops the cache of checkpointed
        # layers in training: the recomputed layer saves what a forward without a cache saves.
        raw = {**raw, "use_cache": False}
    traced, cached = traced_saves(raw, architecture, run.s, weight_dtype, run.autocast, attention,
                                  padded=run.padded and not run.flash)  # (flash unpads instead: not modelled)
    saves = traced.at(run.b)
    unpadded = []
    if run.padded and attention != "eager" and not run.flash and not traced.padded:
        from memcalc.activations import padding_not_counted

        unpadded.append(padding_not_counted(a, run, traced=True))
    layers = saves.layers
    if not layers:
        raise ValueError("no decoder layers found")  # the caller falls back to its approximation, and says so
    kinds: dict[tuple, dict[str, int]] = {}
    shared = [kinds.setdefault(tuple(sorted(layer.items())), {k: v for k, v in layer.items() if v}) for layer in layers]
    per_model = {part: n for part, n in saves.model.items() if n}
    loss_bytes = saves.loss
    tokens = run.tokens
    loss = Loss(tokens, a.vocab_size, BYTES_PER_FP32) if a.vocab_size else None
    log_softmax = tokens * a.vocab_size * BYTES_PER_FP32 if loss is not None else 0
    notes = [f"activations traced from transformers {traced.versions.get('transformers', '')} {traced.model_class}'s own "
             + ("code (a padded batch, traced with its padding mask): " if traced.padded and run.padded else
                f"code (no hand rules for model_type '{a.model_type}'): ")
             + "one training forward under FakeTensorMode, "
             f"saved tensors by layer and part{' (from the cache)' if cached else ''}"
             + (f" (read off the quadratic through traces at sequence lengths "
                f"{', '.join(f'{n:,}' for n in traced.fitted_from)})" if traced.fitted_from else "") + "; "
             + (f"{EMULATED}; not emulated: {NOT_EMULATED}" if current_device() == "cuda" else
                "CPU semantics (to compare with a step measured on the CPU)"), *unpadded]
    if loss is not None and loss_bytes >= log_softmax:
        if loss_bytes > log_softmax:
            per_model[PART_LOSS_INPUTS] = loss_bytes - log_softmax
    else:
        loss = None
        if loss_bytes:
            per_model[PART_LOSS] = loss_bytes
        notes.append("the loss is not ForCausalLMLoss's (it saves less than rows x vocab x 4 B): counted as traced, "
                     "without its transients")
    if run.flash and traced.attention != "eager":
        notes.append("--attn flash traced as sdpa (flash_attention_2 needs CUDA): both keep q, k, v, the output and "
                     "the log-sum-exp")
    if traced.attention == "eager" and not run.eager:
        notes.insert(0, f"attention: {traced.model_class} has no sdpa path in transformers (_supports_sdpa = False), "
                        + ("so --attn flash cannot be traced through sdpa: traced eager, above what a flash kernel "
                           "keeps (b a s^2 scores per layer)" if run.flash else
                           "so it runs eager attention unless a flash kernel is asked for: traced eager (b a s^2 "
                           "scores per layer)"))
    first = shared[0]
    formula = " + ".join(f"{part} {n:,}" for part, n in first.items()) or "nothing saved"
    intermediate = a.intermediate_size or 4 * a.hidden_size
    return Rule(
        layers=shared, formula=f"traced: {formula}", per_model=per_model,
        source=f"traced: transformers {traced.versions.get('transformers', '')} {traced.model_class} forward under "
               "FakeTensorMode, every storage autograd saves, by where it was created (memcalc/measure/derive.py)",
        kept=len(layers) * tokens * a.hidden_size * run.residual,
        transient=run.c * tokens * (intermediate + a.hidden_size),
        loss=loss, notes=notes,
    ), traced.attention == "eager" or run.sdpa_math

