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
  interleaved-1f1b
         ScheduleInterleaved1F1B: ``--pp-virtual V`` stages per rank (``V x pp`` stages, stage s on rank s mod pp, as
         torchtitan's looped split); each rank runs its stages' forwards and backwards in the order
         ``rank_actions`` reproduces, and holds at each moment what its stages' micro-batches in flight saved
  zero-bubble
         ScheduleInterleavedZeroBubble: the same stages, each backward split into the inputs' half (retain_graph) and
         the weights' half, run later: a micro-batch is held until its weights' half, with the gradients it starts
         from; not with checkpointing (every recomputed layer would stay)
Gradients accumulate over the micro-batches of the step (as gradient accumulation), the optimizer steps once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from memcalc.context_parallel import CP_MODEL_TYPES
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

SOURCE = ("torch.distributed.pipelining (PipelineStage, ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, "
          "ScheduleInterleavedZeroBubble) with torchtitan's layer split (generate_llm_fqn_per_model_part), measured on "
          "gloo ranks and the fake process group (memcalc.measure.pipeline)")


# Measured (benchmarks/pipeline.py: a 4- and a 6-layer Llama on 2 and 3 gloo ranks, GPipe and 1F1B, 2 to 5
# micro-batches, fp32, bf16-pure and amp-bf16, 96 stage steps; --interleaved: 6- and 10-layer Llamas on 2 and 3 ranks
# of 2 or 3 stages, 54 rank steps; --fsdp, --interleaved --fsdp and --cp: 18 stage, 21 and 14 rank steps): what the
# output says about a --pp estimate.
ACCURACY_NOTE = ("pipeline stages against torch.distributed.pipelining on gloo ranks (a small Llama): GPipe and 1F1B "
                 "(96 stage steps) -0.1% to +6.1%, under FSDP2 (18) -0.0% to +2.9%, interleaved 1F1B (54 rank steps) "
                 "-0.0% to +3.1% (a later stage's input buffer and its first layer's copy of it counted apart), "
                 "interleaved 1F1B under FSDP2 (21) -0.0% to +2.7%, with --cp (14) -0.0% to +1.5% (+8.4% with --zero "
                 "3, an upper bound), over tensor-parallel groups (--tp 2, 64) -0.1% to +4.9%: leave margin")
# Measured (benchmarks/pipeline.py --moe: a small Mixtral, 4 layers on 2 gloo ranks, GPipe and 1F1B, 2 and 4
# micro-batches, fp32, bf16-pure and amp-bf16, checkpointing none and full, 48 stage steps; --moe --ep: 2 stages
# each over 2 or 4 FSDP2 ranks splitting the experts 2 ways, 20 stage steps)
MOE_NOTE = ("MoE pipeline stages against gloo ranks (a small Mixtral): 48 stage steps -0.0% to +4.7%; with --ep at "
            "--ep-load the measured routing's, every pair routed to "
            "one rank (10 stage steps) -0.0% to +2.8%, random routing (10) +3.2% to +20.8% (--ep-load is the most "
            "loaded layer's, applied to every layer and micro-batch): leave margin")
ZERO_BUBBLE_NOTE = ("zero-bubble (ScheduleInterleavedZeroBubble) against gloo ranks of a small Llama (27 rank steps): "
                    "-2.0% to +2.4%, the 16-bit recipes' first ranks low (a norm's backward inside a retained input "
                    "backward, not yet placed): leave margin")


def megatron_ends(num_layers: int, pp: int) -> int:
    """--engine megatron, pp not dividing the layers: the first and last stages' layer count that leaves the others
    num_layers / pp rounded up each (Megatron's --decoder-first-pipeline-num-layers and --decoder-last-..., which
    need the middle stages' layers to divide evenly); 0 when pp divides them or no such count exists."""
    if pp < 3 or num_layers % pp == 0:
        return 0
    per = -(-num_layers // pp)
    short = per * pp - num_layers
    return per - short // 2 if short % 2 == 0 and short // 2 < per else 0


def megatron_uneven(num_layers: int, pp: int) -> tuple[int, ...] | None:
    """Each stage's layer count with megatron_ends' first and last stages (None where there is no such split)."""
    ends = megatron_ends(num_layers, pp)
    return (ends, *[(num_layers - 2 * ends) // (pp - 2)] * (pp - 2), ends) if ends else None


def stage_ranges(num_layers: int, pp: int, pp_layers: Sequence[int] | None = None,
                 named: str | None = None, megatron: bool = False) -> tuple[tuple[int, int], ...]:
    """Each stage's decoder layers as [start, end) (``pp`` stages; ``named``: how the refusals name that count, by
    default "{pp} N"; ``megatron``: Megatron-LM's split, num_layers / pp each)."""
    smaller = "{pp}" if named is None else "{pp} or {pp_virtual}"
    named = named or f"{{pp}} {pp}"
    if pp_layers is None and megatron:
        # megatron/core/transformer/transformer_block.py get_num_layers_to_build: the decoder layers evenly, the
        # embedding and the output layer beside the first and last stages' (without
        # --account-for-embedding-in-pipeline-split), which it asserts divides
        if num_layers % pp:
            counts = megatron_uneven(num_layers, pp)
            uneven = (f" (its first and last stages taking fewer: {{pp_layers}} {','.join(map(str, counts))})"
                      if counts else "")
            raise UsageError(f"{{engine}} megatron splits the {num_layers} layers evenly over the stages, and {named} "
                             f"does not divide them: give a {{pp}} that does, or {{pp_layers}}{uneven} (Megatron's "
                             "--decoder-first/last-pipeline-num-layers or --pipeline-model-parallel-layout)")
        pp_layers = [num_layers // pp] * pp
    if pp_layers is not None:
        if sum(pp_layers) != num_layers:
            raise UsageError(f"{{pp_layers}} {','.join(str(n) for n in pp_layers)} adds up to {sum(pp_layers)} layers; "
                             f"the model has {num_layers}")
        counts = list(pp_layers)
    else:
        effective = num_layers + 2  # the embedding and the norm with the head weigh one layer each
        if pp > num_layers or pp > effective // 2:
            raise UsageError(f"{named} is more stages than this model's {num_layers} layers can fill (torchtitan "
                             "splits the layers, the embedding and the head as evenly as it can): give a smaller "
                             f"{smaller}")
        per, extra = divmod(effective, pp)
        counts, left = [], num_layers
        for stage in range(pp):
            share = per + (1 if stage < extra else 0) - (1 if stage in (0, pp - 1) else 0)
            take = min(share, left) if stage < pp - 1 else left
            counts.append(take)
            left -= take
        if any(n < 1 for n in counts):
            raise UsageError(f"{named} leaves a stage without a decoder layer: give a smaller {smaller} or "
                             "{pp_layers}")
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return tuple(ranges)


def spec_ranges(spec, num_layers: int) -> tuple[tuple[int, int], ...]:
    """Each of the spec's stages' decoder layers (every stage of every rank under an interleaved schedule)."""
    return stage_ranges(num_layers, spec.pp_stages, spec.pp_layers, stages_named(spec),
                        spec.pipeline_runtime == "megatron")


def stages_named(spec) -> str | None:
    """How the refusals name the spec's stage count: "--pp N", or under an interleaved schedule its product."""
    return f"{{pp}} {spec.pp} x {{pp_virtual}} {spec.pp_virtual} = {spec.pp_stages}" if spec.interleaved else None


def held(spec) -> int:
    """Micro-batches whose activations the stage ``spec.pp_stage`` holds at the moment the spec describes: at most
    (``in_flight``), or, ``spec.pp_later_backward``, one fewer with every gradient made (a later micro-batch's
    backward)."""
    if spec.pp_held is not None:
        return spec.pp_held
    most = in_flight(spec.pp_stage or 0, spec.pp, spec.microbatches, spec.pp_schedule.value)
    return most - 1 if spec.pp_later_backward else most


def later_backward_applies(spec) -> bool:
    """Whether a later micro-batch's backward is a moment of its own on this stage: every gradient made and one
    micro-batch fewer held, where no forward follows the stage's first backward (1F1B with no more micro-batches than
    it holds, and GPipe)."""
    if spec.microbatches < 2 or spec.pp_held is not None:
        return False
    most = in_flight(spec.pp_stage or 0, spec.pp, spec.microbatches, spec.pp_schedule.value)
    return spec.pp_schedule.value == "gpipe" or spec.microbatches <= most


def in_flight(stage: int, pp: int, microbatches: int, schedule: str) -> int:
    """Micro-batches whose activations a stage holds at once."""
    if schedule == "gpipe":
        return microbatches
    return min(microbatches, pp - stage)


def rank_actions(rank: int, pp: int, virtual: int, microbatches: int,
                 zero_bubble: bool = False) -> list[tuple[int, str, int]]:
    """The forwards ("F") and backwards ("B") rank ``rank`` runs in one step of ScheduleInterleaved1F1B, in order, as
    (local stage, kind, micro-batch): the rank's stages are ``local x pp + rank``. torch 2.13
    torch/distributed/pipelining/schedules.py: ``ScheduleInterleaved1F1B._calculate_single_rank_operations`` with
    ``_get_warmup_ops`` (the last rank warms up ``(V - 1)`` rounds of micro-batches, each rank before it two more)
    and ``_get_1f1b_rank_ops`` (warm-up forwards, then a forward and a backward at a time, then the backwards left;
    its idle slots are left out: they hold nothing). Forwards take the rank's stages in rounds of micro-batches
    first to last, backwards last to first. ``zero_bubble``: ScheduleInterleavedZeroBubble's order (one more warm-up
    forward per rank before the last instead of two; each backward split into its input half, "I", and its weights'
    half, "W", which rank r runs r backwards later, the rest at the end)."""
    rounds = max(1, microbatches // pp)
    per_round = microbatches // rounds
    total = virtual * microbatches
    warmup = min((virtual - 1) * per_round + (1 if zero_bubble else 2) * (pp - 1 - rank), total)

    def forward_stage(step: int) -> int:
        return (step // per_round) % virtual

    def backward_stage(step: int) -> int:
        return virtual - 1 - ((step - warmup) // per_round) % virtual

    forwards, backwards, weights = [0] * virtual, [0] * virtual, [0] * virtual
    actions: list[tuple[int, str, int]] = []
    backward_steps: list[int] = []

    def run(kind: str, local: int, done: list[int]) -> None:
        actions.append((local, kind, done[local]))
        done[local] += 1

    def backward(step: int) -> None:
        run("I" if zero_bubble else "B", backward_stage(step), backwards)
        backward_steps.append(step)
        if zero_bubble and step - warmup >= rank:  # (the weights' half of an earlier backward)
            run("W", backward_stage(backward_steps[sum(weights)]), weights)

    for step in range(total):  # warm-up and steady state: one forward each
        run("F", forward_stage(step), forwards)
        if step >= warmup:
            backward(step)
    for step in range(total, total + warmup):  # cool-down: the backwards left
        backward(step)
    while zero_bubble and sum(weights) < len(backward_steps):
        run("W", backward_stage(backward_steps[sum(weights)]), weights)
    return actions


@dataclasses.dataclass(frozen=True)
class RankMoment:
    """One forward, backward or (zero-bubble) input or weight backward of a rank's local stage ``local``: the
    micro-batches each of the rank's stages holds then (``held``: the one running counted; zero-bubble: until its
    weights' backward), how many backwards (or input backwards) each has run before (the tensors those sent are still
    held) and how many have made its weights' gradients (``weights``: its gradients exist from the first); ``active``:
    the stages FSDP2's units are unsharded for (unsharded_window)."""

    local: int
    kind: str  # "F" | "B" | "I" | "W"
    held: tuple[int, ...]
    backwards: tuple[int, ...]
    weights: tuple[int, ...]
    active: tuple[bool, ...] = ()


# torch/distributed/pipelining/schedules.py _add_unshard_reshard(max_active_stages=3): how many of a rank's stages the
# pipeline runtime keeps unsharded under FSDP2
FSDP_ACTIVE_STAGES = 3


def unsharded_window(actions: Sequence[tuple[int, str, int]], index: int, virtual: int) -> tuple[bool, ...]:
    """Which of a rank's stages are unsharded while its action ``index`` runs: ``_add_unshard_reshard`` reshards, before
    each compute action, the stages that are not among the next FSDP_ACTIVE_STAGES distinct stages from that action on,
    then unshards those that are not yet."""
    upcoming: list[int] = []
    for local, _kind, _mb in actions[index:]:
        if local not in upcoming:
            upcoming.append(local)
            if len(upcoming) == FSDP_ACTIVE_STAGES:
                break
    return tuple(local in upcoming for local in range(virtual))


def rank_moments(rank: int, pp: int, virtual: int, microbatches: int,
                 zero_bubble: bool = False) -> list[RankMoment]:
    """Each action of ``rank_actions`` with what the rank holds then, once per distinct state."""
    held, done, weights = [0] * virtual, [0] * virtual, [0] * virtual
    seen: dict[RankMoment, None] = {}
    actions = rank_actions(rank, pp, virtual, microbatches, zero_bubble)
    for index, (local, kind, _) in enumerate(actions):
        if kind == "F":
            held[local] += 1
        seen.setdefault(RankMoment(local, kind, tuple(held), tuple(done), tuple(weights),
                                   unsharded_window(actions, index, virtual)))
        if kind in ("B", "I"):
            done[local] += 1
        if kind in ("B", "W"):
            held[local] -= 1
            weights[local] += 1
    return list(seen)


# The Llama layout's decoders and the MoE ones whose layers take the same call (MixtralDecoderLayer,
# Qwen2MoeDecoderLayer, Qwen3MoeDecoderLayer: hidden states, position ids and embeddings), as context parallelism's
MODEL_TYPES = CP_MODEL_TYPES


def check(described, pp: int, pp_layers: Sequence[int] | None = None, named: str | None = None,
          megatron: bool = False) -> None:
    """One line for a model the stages cannot be cut from (exit 5), or a split that does not fit it (exit 2)."""
    if pp == 1:
        return
    if described is None:
        raise UsageError("{pp} cuts the model's layers into stages: give a model name or config.json, not only {params}")
    if described.model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{{pp}} is modelled for decoders of the Llama layout ({', '.join(MODEL_TYPES)}); "
            f"{described.model_type} is not yet: drop {{pp}}")
    if getattr(described.arch, "output_router_logits", False):
        raise UnsupportedModelError(
            "{pp} with output_router_logits: a stage runs its layers alone and collects no router logits, so the "
            "auxiliary load-balancing loss has no stage to run on (torchtitan's MoE balances without it); set "
            "output_router_logits false in the config, or drop {pp}")
    if described.arch.tie_word_embeddings:
        raise UnsupportedModelError(
            "{pp} with a head tied to the input embeddings is not modelled (the first and the last stage would each "
            f"hold the tensor): {described.arch.architecture or described.model_type} ties them; drop {{pp}}")
    stage_ranges(described.arch.num_layers, pp, pp_layers, named, megatron)


def stage_tensors(tensors: Sequence[ParamTensor], spec, num_layers: int) -> list[ParamTensor]:
    """The tensors of the stage ``spec.pp_stage``: its layers, the token embedding on the first stage, the final norm
    and the head on the last."""
    stage = spec.pp_stage or 0
    start, end = spec_ranges(spec, num_layers)[stage]
    first, last = stage == 0, stage == spec.pp_stages - 1
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
    start, end = spec_ranges(spec, num_layers)[stage]
    first, last = stage == 0, stage == spec.pp_stages - 1
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
    # (held: nothing. Rule.held is what the whole model's outputs keep through the loss, the DynamicCache's copies and
    # under autocast the final norm's fp32 output; a stage calls its layers without a cache and hands the final norm's
    # output to the head, which returns the logits alone: measured on gloo ranks, benchmarks/pipeline.py)
    return dataclasses.replace(
        rule, layers=rule.layers[start:end], per_model={k: v for k, v in per_model.items() if v},
        kept=rule.kept * (end - start) // num_layers, loss=rule.loss if last else None, held=0)
