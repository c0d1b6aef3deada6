"""Pipeline parallelism (``--pp N``, ``--pp-schedule``, ``--microbatches M``, ``--pp-layers``): what one stage holds.

Stages are consecutive decoder layers. The split is torchtitan's (torchtitan/experiments/transformers_modeling_backend/
pipeline.py ``generate_llm_fqn_per_model_part``, input and output weights 1): the embedding counts as one layer and
the final norm with the head as another, the ``L + 2`` spread as evenly as possible with the first stages taking the
remainder; ``--pp-layers`` gives each stage's layer count instead.

A step runs M micro-batches of ``--batch-size`` samples through the stages (torch.distributed.pipelining):
  gpipe  ScheduleGPipe: every micro-batch's forward, then every backward: a stage holds all M micro-batches'
         activations at the end of its forwards (and the last stage M losses' saved tensors)
  1f1b   Schedule1F1B: stage i (0-based) runs ``pp - i - 1`` warm-up forwards, then one forward and one backward at a
         time: at most ``min(M, pp - i)`` micro-batches' activations at once; stage 0 holds the most
Gradients accumulate over the micro-batches of the step (as gradient accumulation), the optimizer steps once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.families.saved import (
    PART_EMBEDDINGS,
    PART_FINAL_NORM,
    PART_HEAD,
    PART_IDS,
    PART_LOGIT_SOFTCAP,
    PART_LOSS_SCALARS,
    PART_ROUTING,
    Rule,
)
from memcalc.model import ROLE_EMBEDDING, ParamTensor
from memcalc.units import BYTES_PER_INT64

SOURCE = ("torch.distributed.pipelining (PipelineStage, ScheduleGPipe, Schedule1F1B) with torchtitan's layer split "
          "(generate_llm_fqn_per_model_part), measured on gloo ranks and the fake process group "
          "(memcalc.measure.pipeline)")


# Measured (benchmarks/pipeline.py: a 4- and a 6-layer Llama on 2 and 3 gloo ranks, GPipe and 1F1B, 2 to 5
# micro-batches, fp32, bf16-pure and amp-bf16; 96 stage steps): what the output says about a --pp estimate.
ACCURACY_NOTE = ("pipeline stages against torch.distributed.pipelining on gloo ranks (96 stage steps of a small Llama): "
                 "without checkpointing -1.4% to +5.4% (a later stage's input buffer and its first layer's fp32 copy "
                 "of it counted apart), with full checkpointing -3.9% to +6.5% (amp-bf16 stages before the last low): "
                 "leave margin")


def stage_ranges(num_layers: int, pp: int, pp_layers: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """Each stage's decoder layers as [start, end)."""
    if pp_layers is not None:
        if sum(pp_layers) != num_layers:
            raise UsageError(f"{{pp_layers}} {','.join(str(n) for n in pp_layers)} adds up to {sum(pp_layers)} layers; "
                             f"the model has {num_layers}")
        counts = list(pp_layers)
    else:
        effective = num_layers + 2  # the embedding and the norm with the head weigh one layer each
        if pp > num_layers or pp > effective // 2:
            raise UsageError(f"{{pp}} {pp} is more stages than this model's {num_layers} layers can fill (torchtitan "
                             "splits the layers, the embedding and the head as evenly as it can): give a smaller {pp}")
        per, extra = divmod(effective, pp)
        counts, left = [], num_layers
        for stage in range(pp):
            share = per + (1 if stage < extra else 0) - (1 if stage in (0, pp - 1) else 0)
            take = min(share, left) if stage < pp - 1 else left
            counts.append(take)
            left -= take
        if any(n < 1 for n in counts):
            raise UsageError(f"{{pp}} {pp} leaves a stage without a decoder layer: give a smaller {{pp}} or {{pp_layers}}")
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return tuple(ranges)


def held(spec) -> int:
    """Micro-batches whose activations the stage ``spec.pp_stage`` holds at the moment the spec describes: at most
    (``in_flight``), or, ``spec.pp_later_backward``, one fewer with every gradient made (a later micro-batch's
    backward)."""
    most = in_flight(spec.pp_stage or 0, spec.pp, spec.microbatches, spec.pp_schedule.value)
    return most - 1 if spec.pp_later_backward else most


def later_backward_applies(spec) -> bool:
    """Whether a later micro-batch's backward is a moment of its own on this stage: every gradient made and one
    micro-batch fewer held, where no forward follows the stage's first backward (1F1B with no more micro-batches than
    it holds, and GPipe)."""
    if spec.microbatches < 2:
        return False
    most = in_flight(spec.pp_stage or 0, spec.pp, spec.microbatches, spec.pp_schedule.value)
    return spec.pp_schedule.value == "gpipe" or spec.microbatches <= most


def in_flight(stage: int, pp: int, microbatches: int, schedule: str) -> int:
    """Micro-batches whose activations a stage holds at once."""
    if schedule == "gpipe":
        return microbatches
    return min(microbatches, pp - stage)


def check(described, pp: int, pp_layers: Sequence[int] | None = None) -> None:
    """One line for a model the stages cannot be cut from (exit 5), or a split that does not fit it (exit 2)."""
    from memcalc import tensor_parallel

    if pp == 1:
        return
    if described is None:
        raise UsageError("{pp} cuts the model's layers into stages: give a model name or config.json, not only {params}")
    if described.model_type not in tensor_parallel.MODEL_TYPES:
        raise UnsupportedModelError(
            f"{{pp}} is modelled for decoders of the Llama layout ({', '.join(tensor_parallel.MODEL_TYPES)}); "
            f"{described.model_type} is not yet: drop {{pp}}")
    if described.arch.tie_word_embeddings:
        raise UnsupportedModelError(
            "{pp} with a head tied to the input embeddings is not modelled (the first and the last stage would each "
            f"hold the tensor): {described.arch.architecture or described.model_type} ties them; drop {{pp}}")
    stage_ranges(described.arch.num_layers, pp, pp_layers)


def stage_tensors(tensors: Sequence[ParamTensor], spec, num_layers: int) -> list[ParamTensor]:
    """The tensors of the stage ``spec.pp_stage``: its layers, the token embedding on the first stage, the final norm
    and the head on the last."""
    stage = spec.pp_stage or 0
    start, end = stage_ranges(num_layers, spec.pp, spec.pp_layers)[stage]
    first, last = stage == 0, stage == spec.pp - 1
    kept = []
    for t in tensors:
        if t.layer is not None:
            if start <= t.layer < end:
                kept.append(t)
        elif t.role == ROLE_EMBEDDING:
            if first:
                kept.append(t)
        elif last:
            kept.append(t)
    return kept


# Per-model activation parts by the stage that holds them (memcalc.families.saved's part names): every stage computes
# the rotary tables from the positions; the first holds the input ids, the last the labels, the final norm, the head's
# input and the loss.
FIRST_STAGE_PARTS = (PART_EMBEDDINGS,)
LAST_STAGE_PARTS = (PART_FINAL_NORM, PART_HEAD, PART_LOSS_SCALARS, PART_LOGIT_SOFTCAP, PART_ROUTING)


def stage_rule(rule: Rule, spec, run) -> Rule:
    """A family's rule cut to the stage ``spec.pp_stage`` (one micro-batch)."""
    num_layers = len(rule.layers)
    stage = spec.pp_stage or 0
    start, end = stage_ranges(num_layers, spec.pp, spec.pp_layers)[stage]
    first, last = stage == 0, stage == spec.pp - 1
    per_model = {}
    for part, num_bytes in rule.per_model.items():
        if part == PART_IDS:
            per_model[part] = BYTES_PER_INT64 * run.tokens * (int(first) + int(last))  # input ids, labels
        elif part in LAST_STAGE_PARTS:
            if last:
                per_model[part] = num_bytes
        elif part in FIRST_STAGE_PARTS:
            if first:
                per_model[part] = num_bytes
        else:
            per_model[part] = num_bytes
    return dataclasses.replace(
        rule, layers=rule.layers[start:end], per_model={k: v for k, v in per_model.items() if v},
        kept=rule.kept * (end - start) // num_layers, loss=rule.loss if last else None,
        held=rule.held if last else 0)
