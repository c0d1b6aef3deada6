"""Combine inventory, recipe, optimizer and sharding into named per-GPU terms, phases and a peak.

Pure functions: no printing, no I/O. Every term carries its formula (numbers substituted) and source, and the
phases it is alive in. The peak of a steady-state step (optimizer states exist from the first step on) is
the largest of these moments:
  forward          every forward-phase term, plus the loss transient (logits and their fp32 upcast) and what the
                   model's outputs hold through the loss unsaved (the KV cache's copies)
  checkpointed     a checkpointed layer's own forward: its attention's or its MLP's tensors beside the kept inputs
  backward start   what the forward saved, plus the loss gradients (or, checkpointing, one recomputed layer beside
                   the head's weight gradient)
  last layer       the last layer's backward: its gradient transients beside the saved tensors and the head's
                   gradient
  head's backward  what the forward saved but the loss's log-softmax output, the logits' gradient and the head's
                   V x h weight gradient (under autocast: made in the compute dtype, then cast)
  backward end     weights, master, states and every gradient
  late backward    nearly every gradient, the first layer's activations and gradient transients, at its MLP's
                   backward or at its attention's (each with the first layer's gradients not made yet left out)
  step in backward --optim-in-backward: a parameter's step in its gradient hook (its gradient, the temporaries)
  sharded layer    FSDP2: a layer's backward with its prefetched neighbour and reduce-scatter buffers
  tied sum         a token embedding used twice (tied head, shared stacks): every gradient and the contributions
                   autograd sums when the last use's backward ends
  first tied sum   T5 with a tied head: the head's and the decoder's contributions summed before the encoder's
                   backward, beside the encoder's activations and every gradient but the encoder's
  optimizer step   model states, gradients, the fp32 gradient copy and the optimizer's temporaries
The sum of all terms is not the peak: activations are gone before the optimizer step's temporaries appear.
For a traced model (activations from the model's own code) the forward's and backward's moments are the traced
step's instead (memcalc.measure.timeline, activations.TracedMoment), beside the terms it does not hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from memcalc import activations, expert_parallel, load, megatron, parallel, pipeline, tensor_parallel, trainable
from memcalc.activations import TracedMoment
from memcalc.errors import UsageError
from memcalc.model import (
    ROLE_ATTENTION,
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ROLE_LM_HEAD,
    ROLE_LORA,
    ROLE_MLP,
    ROLE_NORM,
    ROLE_POSITION_EMBEDDING,
    ROLE_ROUTER,
    ParamTensor,
    head_tied_to_embedding,
    token_embedding,
)
from memcalc.optimizers import (
    BNB_MIN_8BIT_SIZE,
    OptimImpl,
    OptimizerName,
    optimizer_notes,
    paged_state_bytes,
    state_bytes_by_kind,
    step_temporary_bytes,
    temporaries_source,
    whole_tensors,
)
from memcalc.parallel import RankHoldings, rank_holdings
from memcalc.precision import BYTES_PER_DTYPE, Dtype, Recipe, get_recipe
from memcalc.report import ModelSummary, PerGpu, PhaseTotal, Report, Totals, TrainingSummary
from memcalc.resolve import ModelInput
from memcalc.spec import Checkpointing, Fp8Recipe, LossKind, Offload, PipelineSchedule, Sharding, TrainingSpec
from memcalc.units import BYTES_PER_FP32
from memcalc.vocab import (
    ALL_PHASES,
    BACKWARD_AND_STEP,
    BACKWARD_ONLY,
    CATEGORY_ACTIVATIONS,
    CATEGORY_CPU_OFFLOAD,
    CATEGORY_MODEL_STATES,
    CATEGORY_TEMPORARIES,
    EXTRA_EXPERTS_ALL_GATHER,
    EXTRA_EXPERTS_GATHERED,
    EXTRA_EXPERTS_REDUCE,
    EXTRA_FSDP_BACKWARD_START,
    EXTRA_FSDP_LAYER_ALL_GATHER,
    EXTRA_HEAD_BACKWARD,
    EXTRA_HEAD_GRADIENT,
    EXTRA_HELD_CAST_GRADIENTS,
    EXTRA_HELD_OUTPUTS,
    EXTRA_INPUT_BACKWARD_RETAINED,
    EXTRA_LATER_EMBEDDING_GRADIENT,
    EXTRA_LAYER_ACTIVATIONS,
    EXTRA_LAYER_GRADIENTS,
    EXTRA_LOSS_GRADIENTS,
    EXTRA_LOSS_LOGITS,
    EXTRA_RECOMPUTED_CASTS,
    EXTRA_RECOMPUTED_LAYER,
    EXTRA_REENTRANT_OUTPUT,
    EXTRA_RING_ATTENTION,
    EXTRA_SHARDED_LAYER,
    EXTRA_SHARED_GRADIENT_SUM,
    EXTRA_STAGE_FIRST_GRADIENT,
    EXTRA_TRACED_STEP,
    FORWARD_BACKWARD,
    FORWARD_ONLY,
    MODEL_STATE_TERMS,
    MOMENT_BACKWARD_END,
    MOMENT_BACKWARD_START,
    MOMENT_CHECKPOINTED_FORWARD,
    MOMENT_EXPERTS_FORWARD,
    MOMENT_EXPERTS_REDUCE,
    MOMENT_FIRST_SHARED_SUM,
    MOMENT_FORWARD,
    MOMENT_HEAD_BACKWARD,
    MOMENT_LAST_LAYER_BACKWARD,
    MOMENT_LATE_BACKWARD,
    MOMENT_LATE_BACKWARD_SECOND,
    MOMENT_RING_FORWARD,
    MOMENT_RING_RECOMPUTE,
    MOMENT_ROOT_REDUCE,
    MOMENT_SECOND_TO_LAST_BACKWARD,
    MOMENT_SHARDED_LAYER,
    MOMENT_SHARED_GRADIENT_SUM,
    MOMENT_STAGE_FORWARD_END,
    MOMENT_STEP,
    MOMENT_STEP_IN_BACKWARD,
    STEP_ONLY,
    TERM_ACTIVATIONS,
    TERM_AUTOCAST_CHECKPOINTED,
    TERM_AUTOCAST_COPIES,
    TERM_FP8_CASTS,
    TERM_FSDP_REDUCE_SCATTER,
    TERM_FSDP_SHARDED_GRADIENTS,
    TERM_FSDP_UNSHARDED,
    TERM_GRADIENTS,
    TERM_LOSS_BUFFERS,
    TERM_MASTER,
    TERM_MASTER_GRAD_COPY,
    TERM_OFFLOADED_PARAMS,
    TERM_OPTIMIZER_STATES,
    TERM_OPTIMIZER_TEMPORARIES,
    TERM_PIPELINE_BUFFERS,
    TERM_PIPELINE_FORWARD_END,
    TERM_PIPELINE_HELD_ACTIVATIONS,
    TERM_PIPELINE_HELD_LOSSES,
    TERM_PIPELINE_LAST_INPUT,
    TERM_PIPELINE_OTHER_STAGES,
    TERM_PIPELINE_OTHER_STAGES_HELD,
    TERM_PIPELINE_OUTPUTS,
    TERM_PIPELINE_PREVIOUS_INPUT,
    TERM_PIPELINE_RECEIVED_GRADIENT,
    TERM_PIPELINE_SENT,
    TERM_PIPELINE_SENT_GRADIENT,
    TERM_PIPELINE_WEIGHT_BACKWARD_INPUTS,
    TERM_WEIGHTS,
    TERM_ZERO3_GATHERED_GRADS,
    Phase,
    Term,
)

ZERO_PAPER = "Rajbhandari et al. 2020 (ZeRO), Fig. 1 and sec. 3.1"


def _bytes_per(dtype: Dtype) -> int:
    return BYTES_PER_DTYPE[dtype]


def _n(value: int) -> str:
    return f"{value:,}"


def _most_loaded_stage(model: ModelInput, spec: TrainingSpec, defaults_used: Sequence[str]) -> Report:
    """--pp: every stage estimated; the report is the stage with the highest peak, its notes naming the others."""
    reports = [estimate(model, spec.replace(pp_stage=stage), defaults_used) for stage in range(spec.pp)]
    ranges = pipeline.spec_ranges(spec, model.arch.num_layers)
    return _most_loaded(reports, spec, f"{spec.pp} stages", "stage", [
        f"stage {i} (layers {start}-{end - 1})" for i, (start, end) in enumerate(ranges)])


def _most_loaded(reports: Sequence[Report], spec: TrainingSpec, layout: str, unit: str, names: Sequence[str]) -> Report:
    """--pp: the report with the highest peak (the first of equal peaks), its totals across the GPUs (each stage's or
    rank's figures times the GPUs that run it: its tensor- and data-parallel ranks) and a note naming every peak."""
    chosen = max(reports, key=lambda report: report.per_gpu.peak_bytes)
    per_position = spec.num_gpus // spec.pp
    chosen.totals.model_states_bytes = per_position * sum(r.per_gpu.model_states_bytes for r in reports)
    chosen.totals.peak_bytes_sum = per_position * sum(r.per_gpu.peak_bytes for r in reports)
    peaks = ", ".join(f"{name} {r.per_gpu.peak_bytes:,} B" for name, r in zip(names, reports, strict=True))
    chosen.notes.append(f"pipeline parallelism: {layout}, {spec.microbatches} micro-batches of "
                        f"{spec.micro_batch_size} ({spec.pp_schedule.value}); shown: the most loaded, {unit} "
                        f"{reports.index(chosen)}; peaks per {unit}: {peaks}")
    return chosen


# What one of a rank's stages holds while another of its stages runs (interleaved schedules): its model states
# (gradients once its first backward has run), its receive buffers and autocast's casts of its weights (cached from
# its first forward to the step's end), and its micro-batches in flight.
_STAGE_STATES = (TERM_WEIGHTS, TERM_MASTER, TERM_OPTIMIZER_STATES, TERM_GRADIENTS)
_STAGE_KEPT = (TERM_PIPELINE_BUFFERS, TERM_AUTOCAST_COPIES, TERM_AUTOCAST_CHECKPOINTED)
_STAGE_HELD = (TERM_ACTIVATIONS, TERM_PIPELINE_HELD_ACTIVATIONS, TERM_LOSS_BUFFERS, TERM_PIPELINE_HELD_LOSSES,
               TERM_PIPELINE_OUTPUTS)


def _interleaved_rank(model: ModelInput, spec: TrainingSpec, defaults_used: Sequence[str]) -> Report:
    """--pp-schedule interleaved-1f1b: one rank's peak over every forward and backward of its stages
    (memcalc.pipeline.rank_moments): the stage running at that moment estimated as a stage of a pp x pp_virtual
    pipeline holding its micro-batches then, beside what the rank's other stages hold; and the optimizer's step,
    one stage's optimizer at a time (torchtitan builds one per model part). Without ``spec.pp_rank``: the most
    loaded rank, its notes naming the others."""
    if spec.pp_rank is None:
        reports = [_interleaved_rank(model, spec.replace(pp_rank=rank), defaults_used) for rank in range(spec.pp)]
        return _most_loaded(reports, spec, f"{spec.pp} ranks of {spec.pp_virtual} stages each ({spec.pp_stages} "
                            f"stages, stage s on rank s mod {spec.pp})", "rank", [f"rank {i}" for i in range(spec.pp)])
    rank, virtual = spec.pp_rank, spec.pp_virtual
    stages = [local * spec.pp + rank for local in range(virtual)]
    ranges = pipeline.spec_ranges(spec, model.arch.num_layers)
    cache: dict[tuple[int, int, bool], Report] = {}

    def at(local: int, held: int, made: bool) -> Report:
        key = (local, held, made)
        if key not in cache:
            cache[key] = _estimate_moment(model, spec.replace(pp_stage=stages[local], pp_held=held,
                                                              pp_grads_made=made), defaults_used)
        return cache[key]

    def beside(local: int, held: int, made: bool, stepping: bool, finished: bool,
               active: bool = True) -> tuple[int, int, int, str]:
        """What stage ``local`` holds while another runs (or steps): its model states, of them its optimizer's
        states, and the rest; and how it is made up. ``finished``: every backward of the stage has run; ``active``:
        FSDP2's runtime keeps its units unsharded then (pipeline.unsharded_window)."""
        terms = {t.name: t.bytes for t in at(local, held, made).per_gpu.terms if not t.in_cpu_ram}
        # FSDP2 (_PipelineScheduleRuntime with _add_unshard_reshard and _add_reduce_grad): before each action the
        # runtime reshards the rank's stages that are not among the next three distinct ones it runs and unshards
        # those that are (``active``): with up to three stages a rank, all of them from the step's start. A stage's
        # gradients accumulate unsharded from its first backward (a reshard frees its gathered parameters, not their
        # .grad: FSDPParam.free_unsharded_param) until its last backward's REDUCE_GRAD (perform_reduce_grad:
        # post_backward reduce-scatters them and reshards), after which it holds only shards.
        fsdp = TERM_FSDP_UNSHARDED in terms
        reduced = fsdp and (stepping or finished)
        states = sum(n for name, n in terms.items() if name in _STAGE_STATES and name != TERM_GRADIENTS)
        states += (terms.get(TERM_FSDP_SHARDED_GRADIENTS, 0) if reduced
                   else terms.get(TERM_GRADIENTS, 0) if made else 0)
        # (its casts are cached from its first forward until the autocast context exits, before the step)
        ran = (held > 0 or made) and not stepping
        kept = sum(n for name, n in terms.items() if name in _STAGE_KEPT and (ran or name == TERM_PIPELINE_BUFFERS))
        unsharded = terms[TERM_FSDP_UNSHARDED] if fsdp and not reduced and active else 0
        in_flight = sum(n for name, n in terms.items() if name in _STAGE_HELD) if held else 0
        start, end = ranges[stages[local]]
        part = (f"stage {stages[local]} (layers {start}-{end - 1}): model states {states:,} B"
                f"{' with its gradients' + (' reduce-scattered' if reduced else '') if made else ''}, buffers and "
                f"casts {kept:,} B{f', its units unsharded {unsharded:,} B' if unsharded else ''}, "
                f"{held} micro-batch{'es' if held != 1 else ''} in flight {in_flight:,} B")
        return states, terms.get(TERM_OPTIMIZER_STATES, 0), kept + unsharded + in_flight, part

    # The runtime waits on its sends only at the step's end (_PipelineScheduleRuntime._step_microbatches: "send ops
    # should be waited on before step() exits"), and a send's work can hold its tensor till then: every output a
    # stage sent on whose micro-batch's backward has run (until then the forward cache holds it), and every input
    # gradient it sent back, counted whole (on gloo ranks some are freed earlier: without them the estimate reads up
    # to 3.5% low, with them up to 4.6% high).
    hidden = _hidden_bytes(model, spec, _recipe(spec))

    def sent(backwards: Sequence[int]) -> int:
        return sum(done * hidden * (int(stages[k] < spec.pp_stages - 1) + int(stages[k] > 0))
                   for k, done in enumerate(backwards))

    zero_bubble = spec.pp_schedule == PipelineSchedule.zero_bubble
    waiting = [_weight_backward_inputs(model, spec.replace(pp_stage=s)) if zero_bubble else 0 for s in stages]

    best: tuple[int, Report, int, int, int, int, list[str]] | None = None
    composite: dict[Phase, PhaseTotal] = {}
    moments = [(m.local, m.kind, m.held, m.backwards, m.weights, m.active)
               for m in pipeline.rank_moments(rank, spec.pp, virtual, spec.microbatches, zero_bubble)]
    # The step: every stage's backward done, its gradients made, its sends waited on; one stage's optimizer steps at
    # a time.
    moments += [(local, "S", (0,) * virtual, (0,) * virtual, (1,) * virtual, (False,) * virtual)
                for local in range(virtual)]
    kinds = {"F": Phase.forward, "B": Phase.backward, "I": Phase.backward, "W": Phase.backward,
             "S": Phase.optimizer_step}
    for local, kind, held, backwards, weights, active in moments:
        made = [done > 0 for done in weights]
        report = at(local, held[local], made[local])
        others = [beside(k, held[k], made[k], kind == "S", weights[k] == spec.microbatches, active[k])
                  for k in range(virtual) if k != local]
        states, optimizer_states, rest = (sum(o[i] for o in others) for i in range(3))
        phase = next(p for p in report.per_gpu.phases if p.phase == kinds[kind])
        in_sends = sent(backwards) if kind != "S" else 0
        # zero-bubble: each micro-batch between its input and its weights' backward keeps what the latter starts
        # from (the gradients at the weights' ops, _backward.stage_backward_input's param_groups), and during an
        # input backward (retain_graph=True) its stage's saved tensors all stay
        pending = [max(0, b - w) for b, w in zip(backwards, weights, strict=True)]
        waited = sum(n * bytes_ for n, bytes_ in zip(pending, waiting, strict=True))
        own = phase.bytes
        if kind == "I":
            waited += waiting[local]
            own = max(own, _input_backward(model, spec.replace(pp_stage=stages[local]), report))
        total = own + states + rest + in_sends + waited
        if phase.phase not in composite or total > composite[phase.phase].bytes:
            start, end = ranges[stages[local]]
            moment = phase.moment or phase.phase.value
            if kind in ("I", "W"):
                moment = f"{'an input' if kind == 'I' else 'a weights'} backward ({moment})"
            extra = {EXTRA_INPUT_BACKWARD_RETAINED: own - phase.bytes} if own > phase.bytes else {}
            composite[phase.phase] = dataclasses.replace(
                phase, bytes=total,
                first_step_bytes=total - phase.bytes + phase.first_step_bytes - optimizer_states,
                moment=f"stage {stages[local]} (layers {start}-{end - 1}): {moment}",
                terms=[*phase.terms, TERM_PIPELINE_OTHER_STAGES, TERM_PIPELINE_OTHER_STAGES_HELD, TERM_PIPELINE_SENT,
                       *([TERM_PIPELINE_WEIGHT_BACKWARD_INPUTS] if zero_bubble else [])],
                breakdown={**phase.breakdown, **extra, TERM_PIPELINE_OTHER_STAGES: states,
                           TERM_PIPELINE_OTHER_STAGES_HELD: rest, TERM_PIPELINE_SENT: in_sends,
                           **({TERM_PIPELINE_WEIGHT_BACKWARD_INPUTS: waited} if zero_bubble else {})})
        if best is None or total > best[0]:
            best = (total, report, states, rest, in_sends, waited, [o[3] for o in others])
    assert best is not None
    total, report, states, rest, in_sends, waited, parts = best
    whole = [at(local, 0, True).model for local in range(virtual)]  # (the rank's tensors: its stages')
    chosen = dataclasses.replace(
        report, per_gpu=dataclasses.replace(report.per_gpu), totals=dataclasses.replace(report.totals),
        notes=list(report.notes), training=dataclasses.replace(report.training, pp_stage=rank),
        model=dataclasses.replace(report.model, num_params=sum(m.num_params for m in whole),
                                  num_trainable_params=sum(m.num_trainable_params for m in whole),
                                  num_tensors=sum(m.num_tensors for m in whole)))
    source = (f"{pipeline.SOURCE}; the rank's order of forwards and backwards from torch's own schedule "
              "(memcalc.pipeline.rank_actions)")
    chosen.per_gpu.terms = [*report.per_gpu.terms, Term(
        name=TERM_PIPELINE_OTHER_STAGES, bytes=states, category=CATEGORY_MODEL_STATES, phases=ALL_PHASES,
        formula="this rank's other stages at the peak: " + "; ".join(parts), source=source), Term(
        name=TERM_PIPELINE_OTHER_STAGES_HELD, bytes=rest, category=CATEGORY_ACTIVATIONS, phases=FORWARD_BACKWARD,
        formula="their receive buffers, autocast casts, unsharded FSDP2 units and micro-batches in flight (see "
                "pipeline_other_stages)",
        source=source), Term(
        name=TERM_PIPELINE_SENT, bytes=in_sends, category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD,
        formula=f"{in_sends // max(1, hidden)} x {hidden:,} B: the hidden states and input gradients this rank's "
                "stages sent whose micro-batch's backward has run, not yet waited on",
        source="torch.distributed.pipelining _PipelineScheduleRuntime._step_microbatches: its sends are waited on "
               "before step() returns, and a send's work can hold its tensor until then; counted whole, an upper "
               "bound on gloo ranks")]
    if zero_bubble:
        chosen.per_gpu.terms.append(Term(
            name=TERM_PIPELINE_WEIGHT_BACKWARD_INPUTS, bytes=waited, category=CATEGORY_TEMPORARIES,
            phases=BACKWARD_ONLY,
            formula="the micro-batches between their input and their weights' backward on this rank's stages, each "
                    "the gradients at its stage's Linear ops and embedding: " + ", ".join(
                        f"stage {s} {n:,} B" for s, n in zip(stages, waiting, strict=True)),
            source="torch.distributed.pipelining _backward.py stage_backward_input (the gradients reaching each "
                   "weight's op kept in param_groups for stage_backward_weight); measured on gloo ranks"))
        chosen.notes.append(pipeline.ZERO_BUBBLE_NOTE)
    chosen.per_gpu.phases = [composite[p.phase] for p in report.per_gpu.phases if p.phase in composite]
    peak = max(chosen.per_gpu.phases, key=lambda p: p.bytes)
    chosen.per_gpu.peak_bytes, chosen.per_gpu.peak_phase = peak.bytes, peak.phase
    chosen.per_gpu.first_step_peak_bytes = max(p.first_step_bytes for p in chosen.per_gpu.phases)
    # (the rank's model states: every stage's, gradients made)
    chosen.per_gpu.model_states_bytes = sum(
        t.bytes for local in range(virtual) for t in at(local, 0, True).per_gpu.terms
        if t.name in MODEL_STATE_TERMS and not t.in_cpu_ram)
    chosen.totals.model_states_bytes = chosen.per_gpu.model_states_bytes * spec.num_gpus
    chosen.totals.peak_bytes_sum = peak.bytes * spec.num_gpus
    start_end = ", ".join(f"{ranges[s][0]}-{ranges[s][1] - 1}" for s in stages)
    chosen.notes.append(f"{spec.pp_schedule.value}: rank {rank} runs stages {', '.join(map(str, stages))} (layers "
                        f"{start_end}); its peak, {total:,} B, is at {peak.moment}")
    return chosen


def _weight_backward_inputs(model: ModelInput, spec: TrainingSpec) -> int:
    """--pp-schedule zero-bubble: what one micro-batch's input backward leaves for its weights' backward on the stage
    ``spec.pp_stage`` (torch.distributed.pipelining _backward.py stage_backward_input: the gradient reaching each
    weight's op, kept in param_groups): a Linear's output gradient, tokens x its output features in the compute
    dtype, and the embedding's, tokens x hidden. (Norm weights' ops add none of their own: measured.)"""
    recipe = _recipe(spec)
    tokens = spec.micro_batch_size * spec.local_seq_len
    total = 0
    for t in pipeline.stage_tensors(model.tensors, spec, model.arch.num_layers):
        if t.trainable and (t.role == ROLE_EMBEDDING or len(t.shape or ()) == 2):
            features = model.arch.hidden_size if t.role == ROLE_EMBEDDING else t.shape[0]
            total += tokens * features * _bytes_per(recipe.compute_dtype)
    return total


def _input_backward(model: ModelInput, spec: TrainingSpec, report: Report) -> int:
    """--pp-schedule zero-bubble, the stage ``spec.pp_stage``'s input backward of a micro-batch: it runs with
    retain_graph=True (stage_backward_input), so none of the stage's saved tensors is released on the way: everything
    its forward and backward terms hold, beside the largest of its backward's transients (a layer's, its attention's,
    a norm's, the loss's first gradients)."""
    act = activations.estimate(model, spec, _recipe(spec))
    alive = sum(t.bytes for t in report.per_gpu.terms
                if Phase.forward in t.phases and Phase.backward in t.phases and not t.in_cpu_ram)
    return alive + max(act.layer_backward_transient_bytes, act.attention_backward_transient_bytes,
                       act.mid_norm_transient_bytes, act.opening_backward_transient_bytes,
                       act.last_opening_backward_transient_bytes,
                       act.backward_start_extra_bytes)


def _pipeline_buffers(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> Term | None:
    """--pp: the stage's receive buffers, one per micro-batch for the activations from the stage before and one for
    the gradients from the stage after (PipelineStage keeps them from the first step on)."""
    stage = spec.pp_stage or 0
    count = spec.microbatches * (int(stage > 0) + int(stage < spec.pp_stages - 1))
    if not count:
        return None
    what = ("activations and gradients" if count > spec.microbatches else "gradients" if stage == 0
            else "activations")
    return _pipeline_term(TERM_PIPELINE_BUFFERS, count, _hidden_bytes(model, spec, recipe),
                          f"buffers ({spec.microbatches} micro-batches x {what}), the hidden state",
                          "PipelineStage._prepare_forward_infra / _prepare_backward_infra: a receive buffer per "
                          "micro-batch, made at the first step and kept", ALL_PHASES)


def _megatron_pipeline_buffers(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> list[Term]:
    """--pp under megatron-core's 1F1B schedule (megatron/core/pipeline_parallel/schedules.py
    forward_backward_pipelining_without_interleaving). A stage's outputs are pseudo-freed once sent
    (deallocate_output_tensor: Megatron's trainer sets deallocate_pipeline_outputs), the last stage's is its loss, and
    every send is waited on before the schedule goes on. What it holds besides the activations:
    - after the first stage, each micro-batch's received input, kept in input_tensors until its backward;
    - before the last, the output gradient a backward starts from, received into a buffer made for it
      (P2PCommunicator._communicate), which the schedule's output_tensor_grad keeps until the next is received, after
      the next forward;
    - once a backward has run on a stage after the first, the input gradient it sent back, which input_tensor_grad
      keeps through the next forward and backward, and, through the next forward, that micro-batch's input, which
      its pseudo-freed output (the schedule's output_tensor until the forward returns) reaches through the autograd
      graph (the input's AccumulateGrad node);
    - past the schedule, through the optimizer step, on a stage after the first: the last input the model was given
      and its gradient (TransformerBlock.set_input_tensor keeps it until the next step's first forward)."""
    stage = spec.pp_stage or 0
    hidden = _hidden_bytes(model, spec, recipe)
    # (a stage with more micro-batches than it holds runs forwards after its first backward)
    forwards_after = spec.microbatches > pipeline.in_flight(stage, spec.pp, spec.microbatches, "1f1b")
    later = spec.pp_later_backward or forwards_after
    terms = []

    def add(name: str, count: int, what: str, why: str, phases: Sequence[Phase]) -> None:
        terms.append(_pipeline_term(name, count, hidden, f"{what}, the hidden state", why, phases, megatron_schedule=True))

    if stage > 0:
        # The stage's first layer saves its input as it is where the layer is checkpointed (the checkpoint keeps its
        # input) or the residual stream is fp32 (RMSNorm's upcast is then the tensor itself, which its ops save): the
        # received input is then counted in the activations already. (Measured: fp32 and checkpointed cells read one
        # hidden state above with it counted apart.)
        start = pipeline.spec_ranges(spec, model.arch.num_layers)[stage][0]
        if not (spec.checkpointed(start) or _fp32_residual(recipe)):
            held = pipeline.held(spec)
            add(TERM_PIPELINE_BUFFERS, held, "the received inputs of the micro-batches in flight",
                "input_tensors keeps each received input until its backward; the stage's first layer saves its fp32 "
                "upcast, not the input", FORWARD_BACKWARD)
        if later:
            add(TERM_PIPELINE_SENT_GRADIENT, 1, "the input gradient the previous backward sent back",
                "input_tensor_grad keeps it until the next backward returns", FORWARD_BACKWARD)
        add(TERM_PIPELINE_LAST_INPUT, 2, "the last micro-batch's input and its gradient",
            "the model chunk keeps the last input it was given (megatron/core/transformer/transformer_block.py "
            "TransformerBlock.set_input_tensor), with its .grad, until the next step's first forward", STEP_ONLY)
        if forwards_after:
            add(TERM_PIPELINE_PREVIOUS_INPUT, 1, "the previous micro-batch's input",
                "output_tensor, its pseudo-freed output, reaches it through the autograd graph until the next "
                "forward returns", FORWARD_ONLY)
    if stage < spec.pp_stages - 1:
        add(TERM_PIPELINE_RECEIVED_GRADIENT, 1, "the output gradient the backward starts from",
            "send_forward_recv_backward and recv_backward make its buffer; output_tensor_grad keeps it until the "
            "next is received, after the next forward", FORWARD_BACKWARD if forwards_after else BACKWARD_ONLY)
    return terms


def _stage_forward_end(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> Term | None:
    """--pp, a stage without the head whose last layer is not checkpointed: its forward's largest moment is that
    layer's last residual add, where the MLP's output and the layer's output exist beside what the layers saved, and,
    with a 16-bit residual stream (which RMSNorm saves as its fp32 upcast, not as itself), the layer's input (the stage's
    loop and the layer's residual keep it) and the attention's residual sum. Under torch.distributed.pipelining the
    output is the cached one (counted there); Megatron's is pseudo-freed only once sent. Measured on gloo ranks (a
    small Llama, three stages, megatron-core's schedule): the middle stage's forward read 4 (bf16, bf16-pure), 2 (fp32)
    and 1.5 (amp-bf16: a 16-bit MLP output) hidden states above without them."""
    stage = spec.pp_stage or 0
    if not _stage_without_head(spec) or spec.interleaved:
        return None
    last = pipeline.spec_ranges(spec, model.arch.num_layers)[stage][1] - 1
    if spec.checkpointed(last):
        return None
    residual = _hidden_bytes(model, spec, recipe)
    mlp = residual // _residual_width(recipe) * _bytes_per(recipe.compute_dtype)  # (autocast: a 16-bit Linear's)
    output = residual if spec.pipeline_runtime == "megatron" else 0
    parts = [("the MLP's output", mlp), ("the layer's output", output),
             ("its input and the attention's residual sum", 0 if _fp32_residual(recipe) else 2 * residual)]
    return Term(name=TERM_PIPELINE_FORWARD_END, bytes=sum(n for _, n in parts),
                formula=" + ".join(f"{n:,} B ({what})" for what, n in parts if n),
                source="the stage's last decoder layer's forward (LlamaDecoderLayer.forward: hidden_states = residual + "
                       "hidden_states after the MLP); measured (memcalc.measure.megatron_pipeline)",
                category=CATEGORY_TEMPORARIES, phases=list(FORWARD_ONLY))


def _residual_width(recipe: Recipe) -> int:
    """Bytes per element of the residual stream: fp32 under autocast (its weights are), else the compute dtype's."""
    return BYTES_PER_FP32 if recipe.autocast else _bytes_per(recipe.compute_dtype)


def _fp32_residual(recipe: Recipe) -> bool:
    """Whether the residual stream is fp32: RMSNorm's upcast is then the input itself, which its ops save."""
    return _residual_width(recipe) == BYTES_PER_FP32


def _stage_without_head(spec: TrainingSpec) -> bool:
    """--pp: a stage before the last (its backward starts from a received gradient, not the head's)."""
    return spec.pp > 1 and (spec.pp_stage or 0) != spec.pp_stages - 1


def _stage_first_gradient(tensors: Sequence[ParamTensor], spec: TrainingSpec, bytes_per_grad: int,
                          grad_phases: Sequence[Phase]) -> int:
    """--pp, a stage without the head whose gradients are not held from an earlier backward: the first weight gradient
    its backward makes, the largest MLP weight of its last layer (down_proj's), beside that layer's transients."""
    if not _stage_without_head(spec) or Phase.forward in grad_phases:
        return 0
    layers = [t.layer for t in tensors if t.layer is not None]
    if not layers:
        return 0
    last = max(layers)
    mlp = [t for t in tensors if t.layer == last and t.role == ROLE_MLP and t.is_linear_weight and t.trainable]
    return max((t.numel for t in mlp), default=0) * bytes_per_grad


def _pipeline_outputs(model: ModelInput, spec: TrainingSpec, recipe: Recipe, logits_bytes: int) -> Term | None:
    """--pp: each micro-batch's output stays in the stage's forward cache until that micro-batch's backward ends
    (PipelineStage.fwd_cache): the hidden state it sent on, or on the last stage the logits."""
    held = pipeline.held(spec)
    last = (spec.pp_stage or 0) == spec.pp_stages - 1
    each = logits_bytes if last else _hidden_bytes(model, spec, recipe)
    if not held or not each:
        return None
    # A stage before the last, at a backward after its first: one more hidden state it sent on, held by a send's
    # work (ScheduleGPipe._step_microbatches keeps its forward sends' works in fwd_sends_to_wait until it returns;
    # Schedule1F1B keeps the last warm-up send it fired in send_work through the 1B1F phase, which has a backward
    # after its first only with more micro-batches than the stage holds). Measured on gloo ranks: one, on the first
    # stage; the input gradients a later stage sent back under GPipe were not held.
    in_flight = pipeline.in_flight(spec.pp_stage or 0, spec.pp, spec.microbatches, "1f1b")
    sent = int(not last and ((spec.pp_schedule.value == "gpipe" and spec.pp_later_backward)
                             or (spec.pp_schedule.value == "1f1b" and spec.microbatches > in_flight >= 2)))
    return _pipeline_term(TERM_PIPELINE_OUTPUTS, held + sent, each,
                          f"micro-batches in flight, {'the logits' if last else 'the hidden state the stage sent on'}"
                          + (", and one more held by its send" if sent else ""),
                          "PipelineStage.forward_one_chunk: the output is cached (fwd_cache) for the micro-batch's "
                          "backward" + ("; the schedule keeps a sent one's send work or ops" if sent else ""),
                          FORWARD_BACKWARD)


def _pipeline_sent_gradient(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> Term | None:
    """--pp under 1F1B, a stage after the first at a backward after its first: the input gradient its previous backward
    sent back is still referenced (Schedule1F1B._step_microbatches: in the 1B1F loop by bwd_sends, which the next
    backward's send ops replace only after that backward, so through the forward between them too; in the cooldown by
    send_work, waited after the next backward). Measured on gloo ranks with 16-bit weights and no autocast (bf16-pure,
    and bf16 under FSDP2): the last stage's later backward held that gradient, an out-of-place sum made by its
    first layer's backward (-0.6% to -0.9% without it). In fp32 it was not there at the peak (counted, the estimate
    read +0.7%; why not is not traced yet), and under autocast the stage already read above: both left as they were."""
    stage = spec.pp_stage or 0
    if (spec.pp_schedule.value != "1f1b" or stage == 0 or spec.microbatches < 2 or recipe.autocast
            or _bytes_per(recipe.compute_dtype) == BYTES_PER_FP32):
        return None
    if not (spec.pp_later_backward or spec.microbatches > pipeline.in_flight(stage, spec.pp, spec.microbatches, "1f1b")):
        return None
    return _pipeline_term(TERM_PIPELINE_SENT_GRADIENT, 1, _hidden_bytes(model, spec, recipe),
                          "the input gradient the previous backward sent back",
                          "Schedule1F1B._step_microbatches: bwd_sends (1B1F) or send_work (cooldown) keeps the previous "
                          "backward's send ops through the next forward and backward", FORWARD_BACKWARD)


def _pipeline_term(name: str, count: int, each: int, what: str, source: str, phases: Sequence[Phase],
                   megatron_schedule: bool = False) -> Term:
    """One of a stage's buffers, ``count`` of ``each`` bytes, read from torch.distributed.pipelining (or
    megatron-core's schedule) at ``source``."""
    return Term(name=name, bytes=count * each, formula=f"{count} x {each:,} B ({what})",
                source=(f"{megatron.PIPELINE_SOURCE}: {source}" if megatron_schedule else
                        f"torch.distributed.pipelining {source}; measured (memcalc.measure.pipeline)"),
                category=CATEGORY_TEMPORARIES, phases=list(phases))


def _hidden_bytes(model: ModelInput, spec: TrainingSpec, recipe: Recipe) -> int:
    """One micro-batch's hidden state between stages: the residual stream's dtype (fp32 under autocast), this rank's
    tokens (--sp: its split of the sequence)."""
    seq = -(-spec.local_seq_len // spec.tp) if spec.sequence_parallel else spec.local_seq_len
    return _residual_width(recipe) * spec.micro_batch_size * seq * model.arch.hidden_size


HSDP_NOTE = ("hybrid sharding (HSDP): {replicas} replicas of {shard} data-parallel ranks; FSDP2 shards the parameters, "
             "gradients and optimizer states over the {shard} ranks of a replica and all-reduces each unit's sharded "
             "gradients across the {replicas} replicas in place (torch fully_shard on a 2-D mesh: _fsdp_collectives.py "
             "foreach_reduce), so a rank holds what FSDP2 over {shard} ranks holds; measured on gloo ranks (2 x 2)")


def _data_parallel_spec(spec: TrainingSpec) -> TrainingSpec:
    """The spec the data-parallel engine sees: its ranks are the GPUs over the tensor- and pipeline-parallel group
    sizes; under HSDP (--dp-replicate R) one replica's shard group, data_parallel / R ranks. What a rank holds under
    HSDP is FSDP2's over the shard group and nothing more (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py
    foreach_reduce: the reduce-scatter over the shard group, then dist.all_reduce(reduce_output, group=
    all_reduce_group) in place on its output, which is the sharded gradient's storage wherever reduce_dtype is the
    sharded parameters' dtype, as in every FSDP2 recipe memcalc models; FSDPParamGroup._all_reduce_state holds that
    same tensor; _partial_reduce_output exists only with set_requires_all_reduce(False), not modelled)."""
    if spec.tp == 1 and spec.pp == 1 and spec.dp_replicate == 1:
        return spec
    # (its nodes: as many as divide both, so the data-parallel ranks split evenly over them, as the layout's do)
    shard = spec.shard_group
    return spec.replace(num_gpus=shard, num_nodes=math.gcd(spec.num_nodes, shard), tp=1, dp_replicate=1,
                        sequence_parallel=False, loss_parallel=False, pp=1,
                        pp_layers=None, microbatches=None, pp_schedule="1f1b", pp_stage=None,
                        pp_later_backward=False, pp_virtual=None, pp_rank=None, pp_held=None, pp_grads_made=None,
                        ep_tp=spec.tp if spec.ep > 1 else 1)


def _tensor_parallel_holdings(holdings: RankHoldings, model: ModelInput, spec: TrainingSpec,
                              notes: list[str]) -> RankHoldings:
    """--tp: the rank's shards are what the data-parallel engine divided; the token embedding's gradient is whole."""
    dp = spec.data_parallel
    notes.append(f"tensor parallelism: {spec.tp} ranks share each layer ({tensor_parallel.SOURCE}); the most loaded "
                 f"rank is reported{f', {dp} data-parallel groups of them' if dp > 1 else ''}")
    if model.model_type in tensor_parallel.MOE_MODEL_TYPES and spec.ep == 1:
        notes.append(tensor_parallel.MOE_NOTE)
    if dp > 1 and (spec.sharding != Sharding.fsdp or spec.pp > 1):
        notes.append(f"data parallelism over tensor-parallel ranks: the {holdings.engine} figures are for each rank's "
                     "shards, composed from the two models (FSDP2 over them is measured; this engine is not)")
    if holdings.effective_stage >= 2 and holdings.engine != parallel.ENGINE_FSDP2_PIPELINE:
        return holdings  # (FSDP2's reduce-scatter leaves each rank its shard of the embedding's gradient: measured)
    if spec.sharding == Sharding.megatron:
        return holdings  # (Megatron's VocabParallelEmbedding: each rank's gradient is its rows' main_grad)
    # (on a pipeline stage FSDP2 accumulates the unsharded gradients to the schedule's end: the whole one counted)
    extra = tensor_parallel.whole_gradient_extra(_whole_tensors(model, spec), spec.tp)
    if not extra:
        return holdings
    return dataclasses.replace(
        holdings, grad_numel=holdings.grad_numel + extra, whole_embedding_grad_extra=extra,
        grads_source=(f"{holdings.grads_source + '; ' if holdings.grads_source else ''}each rank's shards, and the "
                      f"token embedding's gradient whole ({extra:,} elements beyond its shard: DTensor's embedding "
                      "backward returns a Replicate gradient; measured with parallelize_module)"))


def _whole_tensors(model: ModelInput, spec: TrainingSpec) -> Sequence[ParamTensor]:
    """The rank's tensors at their whole shapes: the model's, or with --pp its stage's (a stage without the token
    embedding holds none of its gradient; measured on the fake process group, --tp 2 --pp 2)."""
    return pipeline.stage_tensors(model.tensors, spec, model.arch.num_layers) if spec.pp > 1 else model.tensors


def _megatron_vocabulary(model: ModelInput, tp: int) -> ModelInput:
    """--engine megatron: the model as Megatron builds it, its vocabulary padded (memcalc.megatron.padded_vocab)."""
    arch = model.described.arch
    padded = megatron.padded_vocab(arch.vocab_size, tp)
    if padded == arch.vocab_size:
        return model
    note = (f"--engine megatron: the vocabulary padded from {arch.vocab_size:,} to {padded:,} (a multiple of "
            f"make_vocab_size_divisible_by {megatron.VOCAB_DIVISIBLE_BY} x tp {tp}): the embedding, the output layer "
            "and the logits have those rows")
    described = dataclasses.replace(model.described, arch=dataclasses.replace(arch, vocab_size=padded))
    return dataclasses.replace(model, tensors=tuple(megatron.pad_vocabulary(model.tensors, arch.vocab_size, tp)),
                               described=described, notes=(*model.notes, note))


def estimate(model: ModelInput, spec: TrainingSpec, defaults_used: Sequence[str] = ()) -> Report:
    if spec.sharding == Sharding.megatron and model.described is not None:
        model = _megatron_vocabulary(model, spec.tp)
    if spec.interleaved and spec.pp_held is None:
        return _interleaved_rank(model, spec, defaults_used)
    if spec.pp > 1 and spec.pp_stage is None:
        return _most_loaded_stage(model, spec, defaults_used)
    if spec.pp > 1 and not spec.pp_later_backward and pipeline.later_backward_applies(spec):
        # A stage's peak: with the most micro-batches held (its first backward), or at a later micro-batch's backward
        # with one fewer held and every gradient made
        later = estimate(model, spec.replace(pp_later_backward=True), defaults_used)
        most = _estimate_moment(model, spec, defaults_used)
        return max((most, later), key=lambda report: report.per_gpu.peak_bytes)
    return _estimate_moment(model, spec, defaults_used)


def _recipe(spec: TrainingSpec) -> Recipe:
    return get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)


# What a bare parameter count (--params: one flat tensor, no shapes) cannot be estimated for: bytes that follow each
# tensor's shape or size, which one flat tensor of the whole count would turn into the whole model's.
_SHAPELESS_OPTIMIZERS = {
    OptimizerName.adafactor: "factors each matrix's second moment by its rows and columns",
    OptimizerName.torchao_adamw_8bit: "quantizes each tensor's states by blocks and keeps small tensors in fp32",
    OptimizerName.torchao_adamw_4bit: "quantizes each tensor's states by blocks and keeps small tensors in fp32",
}


def _refuse_shapeless(model: ModelInput, spec: TrainingSpec) -> None:
    """One line where a bare parameter count would give a wrong number (a flat tensor of the whole count, stepped or
    gathered as one): the optimizer's per-tensor work, the for-loop's or optimizer-in-backward's largest tensor, FSDP's
    per-block gathers."""
    if model.architecture_known:
        return
    why = _SHAPELESS_OPTIMIZERS.get(spec.optimizer)
    what = f"{{optim}} {spec.optimizer.value}"
    if why is None and spec.optim_impl == OptimImpl.forloop:
        what, why = "{optim_impl} forloop", "steps one tensor at a time (its temporaries are the largest tensor's)"
    if why is None and spec.optim_in_backward:
        what, why = "{optim_in_backward}", "holds one gradient at a time, the largest tensor's"
    if why is None and spec.sharding == Sharding.fsdp:
        what, why = "FSDP ({fsdp})", "gathers one block's parameters at a time"
    if why is not None:
        raise UsageError(f"{what} {why}: give a MODEL (preset, config.json or hub id), not only {{params}}")


def _estimate_moment(model: ModelInput, spec: TrainingSpec, defaults_used: Sequence[str] = ()) -> Report:
    _refuse_shapeless(model, spec)
    recipe = _recipe(spec)
    notes: list[str] = list(model.notes)
    if not model.architecture_known and spec.optimizer in (OptimizerName.adamw_8bit, OptimizerName.paged_adamw_8bit):
        notes.append(f"--optim {spec.optimizer.value} with --params: every state counted in 8 bits; bitsandbytes keeps "
                     f"a tensor under {BNB_MIN_8BIT_SIZE:,} elements (norms, biases) in fp32, which a bare count "
                     "cannot name (low by 6 B for each such element)")
    if spec.pp > 1:
        notes.append(megatron.PIPELINE_NOTE if spec.pipeline_runtime == "megatron" else pipeline.ACCURACY_NOTE)
        if getattr(model.arch, "num_experts", 0):
            notes.append(pipeline.MOE_NOTE)
    subset = trainable.apply(model, spec)
    notes.extend(subset.notes)
    tensors = subset.tensors
    notes.extend(_moe_notes(model, tensors))
    if spec.ep > 1:
        notes.append(_expert_parallel_note(model, spec))
        if spec.cp > 1:
            notes.append(EP_CP_NOTE)
    bytes_per_weight, bytes_per_grad = _bytes_per(recipe.weight_dtype), _bytes_per(recipe.grad_dtype)
    holdings = rank_holdings(tensors, _data_parallel_spec(spec), recipe.master_dtype, model.architecture_known,
                             bytes_per_weight, bytes_per_grad)
    if spec.pp > 1 and holdings.engine == "fsdp2":
        holdings = parallel.fsdp2_under_pipeline(tensors, _data_parallel_spec(spec), recipe.master_dtype is not None,
                                                 bytes_per_weight)
    notes.extend(holdings.notes)
    if spec.dp_replicate > 1:
        notes[:] = [n for n in notes if not n.startswith(f"{holdings.engine} stage {spec.zero_stage} on 1 GPU")]
        notes.append(HSDP_NOTE.format(replicas=spec.dp_replicate, shard=spec.shard_group))
    if spec.tp > 1:
        holdings = _tensor_parallel_holdings(holdings, model, spec, notes)
    stage, num_gpus = holdings.effective_stage, spec.num_gpus
    sharded = " (this GPU's shard)" if stage else ""
    bytes_per_weight = holdings.bytes_per_weight_override or bytes_per_weight
    bytes_per_grad = holdings.bytes_per_grad_override or bytes_per_grad
    on_cpu = holdings.optimizer_on_cpu

    terms: list[Term] = []
    weight_dtype = "fp32" if holdings.bytes_per_weight_override == BYTES_PER_FP32 else recipe.weight_dtype.value
    terms.append(Term(
        name=TERM_WEIGHTS, bytes=subset.weight_bytes(holdings.weight_numel, bytes_per_weight),
        formula=subset.weight_formula(holdings.weight_numel, bytes_per_weight, weight_dtype, stage == 3,
                                      spec.shard_group if spec.dp_replicate > 1 else num_gpus),
        source=f"{ZERO_PAPER}; per-tensor shapes from the inventory" if stage == 3 else "per-tensor shapes from the inventory",
        category=CATEGORY_MODEL_STATES, phases=ALL_PHASES,
        breakdown=subset.weight_breakdown(holdings.weight_numel, bytes_per_weight),
    ))
    if holdings.master_numel:
        bytes_per_master = _bytes_per(recipe.master_dtype)
        terms.append(Term(
            name=TERM_MASTER, bytes=holdings.master_numel * bytes_per_master,
            formula=f"{_n(holdings.master_numel)} trainable params{sharded} x {bytes_per_master} B ({recipe.master_dtype.value})",
            source=f"{ZERO_PAPER}: fp32 master copy of mixed-precision training (Micikevicius et al. 2018)",
            category=CATEGORY_CPU_OFFLOAD if on_cpu else CATEGORY_MODEL_STATES, phases=[] if on_cpu else ALL_PHASES,
        ))
    # With gradient accumulation, p.grad persists from the first micro-batch to the optimizer step, so the
    # forward and backward of every later micro-batch run beside it (torch accumulates into p.grad in place).
    # (1F1B runs a stage's later micro-batches' forwards after its first backward, where the stage has more
    # micro-batches than it holds at once: the same)
    # (Interleaved schedules: the stage's gradients exist from its first backward on, pp_grads_made.)
    # (Megatron's main-gradient buffer is allocated once and zeroed between steps: alive all step, as accumulating)
    later_1f1b = spec.pp > 1 and spec.pp_schedule.value == "1f1b" and spec.microbatches > pipeline.in_flight(
        spec.pp_stage or 0, spec.pp, spec.microbatches, "1f1b")
    accumulating = (holdings.grads_held == "buffer" or spec.grad_accum > 1 or spec.pp_later_backward
                    or bool(spec.pp_grads_made) or later_1f1b)
    grad_phases = ALL_PHASES if accumulating else BACKWARD_AND_STEP
    if holdings.grads_held == "gpu-backward":
        grad_phases = FORWARD_BACKWARD if accumulating else BACKWARD_ONLY
    if spec.grad_accum > 1:
        notes.append(f"--grad-accum {spec.grad_accum}: gradients stay alive through the forward and backward of "
                     "micro-batches 2 onward (counted); activations are per micro-batch and do not grow")
    grad_dtype = "fp32" if holdings.bytes_per_grad_override == BYTES_PER_FP32 else recipe.grad_dtype.value
    grads_on_cpu = holdings.grads_held == "cpu"
    # (of equal sizes the head's: its step comes first, right after its backward)
    largest = max((t for t in tensors if t.trainable), key=lambda t: (t.numel, t.role == ROLE_LM_HEAD), default=None)
    if spec.optim_in_backward and largest is not None:
        # Each parameter's step runs in its post-accumulate-grad hook and zero_grad(set_to_none) frees its gradient
        # there: one gradient at a time, the largest at most (torchtune training/memory.py
        # register_optim_in_bwd_hooks: one optimizer per parameter, step() then zero_grad() in the hook).
        terms.append(Term(
            name=TERM_GRADIENTS, bytes=largest.numel * bytes_per_grad,
            formula=f"the largest trainable tensor's gradient, {largest.name} {_n(largest.numel)} x {bytes_per_grad} B "
                    f"({grad_dtype}): each gradient is freed by its parameter's step in backward",
            source="torchtune training/memory.py register_optim_in_bwd_hooks (Tensor.register_post_accumulate_grad_hook: "
                   "the parameter's optimizer steps, then zero_grad() sets its gradient to None)",
            category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY,
        ))
        notes.append("--optim-in-backward: each parameter is stepped in its post-accumulate-grad hook, so its gradient "
                     "lives from its accumulation to its step (the largest one counted) and the step's temporaries are "
                     "one tensor's, during backward; there is no separate optimizer step")
    else:
        terms.append(Term(
            name=TERM_GRADIENTS, bytes=holdings.grad_numel * bytes_per_grad,
            formula=f"{_n(holdings.grad_numel)} trainable params{' (partition)' if stage >= 2 else ''} x "
                    f"{bytes_per_grad} B ({grad_dtype}){' in CPU RAM' if grads_on_cpu else ''}",
            source=holdings.grads_source or (ZERO_PAPER if stage >= 2 else
                                             "one gradient per trainable parameter, in the grad dtype (param.grad)"),
            category=CATEGORY_CPU_OFFLOAD if grads_on_cpu else CATEGORY_MODEL_STATES,
            phases=[] if grads_on_cpu else grad_phases,
        ))
    opt = spec.optimizer_settings
    opt_param_dtype = recipe.optimizer_param_dtype
    whole = whole_tensors(opt, tensors, model.arch)  # shapes and names, for the optimizers that need them
    states = state_bytes_by_kind(holdings.optimizer_shapes, opt, recipe.state_dtype, whole)
    notes.extend(optimizer_notes(holdings.optimizer_shapes, opt, recipe.state_dtype, whole))
    terms.append(Term(
        name=TERM_OPTIMIZER_STATES, bytes=sum(states.values()),
        formula=" + ".join(f"{kind} {_n(b)} B" for kind, b in states.items()) or "no state",
        source=_optimizer_source(opt.name.value) + (f"; {holdings.engine} partition of this GPU" if stage else ""),
        category=CATEGORY_CPU_OFFLOAD if on_cpu else CATEGORY_MODEL_STATES, phases=[] if on_cpu else ALL_PHASES, breakdown=states,
    ))
    paged = 0 if on_cpu else paged_state_bytes(holdings.optimizer_shapes, opt)
    # -- working memory of forward and backward ---------------------------------------------------------
    # --fp8: torchao's Float8Linear casts its (fp32, under autocast) weight to float8 itself; autocast casts none of the
    # converted layers' weights (measured on CPU steps with torchao's layers)
    converted = _fp8_converted(tensors) if spec.fp8 != Fp8Recipe.none else []
    converted_layer = max((sum(t.numel for t in converted if t.layer == layer) for layer in {t.layer for t in converted}),
                          default=0)
    if recipe.autocast:
        copy_numel = max(0, subset.autocast_copy_numel - sum(t.numel for t in converted))
        bytes_per_compute = _bytes_per(recipe.compute_dtype)
        terms.append(Term(
            name=TERM_AUTOCAST_COPIES, bytes=copy_numel * bytes_per_compute,
            formula=f"{_n(copy_numel)} Linear weight params x {bytes_per_compute} B ({recipe.compute_dtype.value})",
            source="torch.autocast casts each Linear weight once per forward (weight cache) and linear saves "
                   "the cast copy for backward; seed 004 counts it as 6 B/param (4 fp32 + 2 copy)",
            category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD,
        ))
        in_layers = max(0, subset.autocast_forward_only_numel - sum(t.numel for t in converted if t.layer is not None))
        if in_layers:
            terms.append(Term(
                name=TERM_AUTOCAST_CHECKPOINTED, bytes=in_layers * bytes_per_compute,
                formula=f"{_n(in_layers)} Linear weight params of the checkpointed layers x {bytes_per_compute} B",
                source="torch.autocast's weight cache keeps every cast until the autocast context exits (after the "
                       "loss); checkpointing drops them from the saved tensors, so they are gone in backward"
                       + ("; under --pp the context spans the schedule's step, backward included (torchtitan "
                          "enters it around pp_schedule.step), so they stay" if spec.pp > 1 else ""),
                category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD if spec.pp > 1 else FORWARD_ONLY,
            ))
    if spec.fp8 != Fp8Recipe.none and (spec.zero_stage or spec.offload != Offload.none):
        # (one process: the step is traced with torchao's layers, their casts in its moments; activations.estimate)
        terms.append(_fp8_casts(tensors, spec))
        notes.append(f"--fp8 {spec.fp8.value} under sharding: torchao's float8 Linear saves its bf16 input and weight, "
                     "so the activations are the bf16 recipe's; its float8 casts are counted as a transient "
                     "(fp8_casts) at every moment of the forward and backward, modelled from torchao's code (eager "
                     "casts go through fp32 copies, 8 B per element while they are made, which this leaves out; "
                     "one process traces the real layers instead); FSDP2's float8 all-gather of weights not modelled")
    terms.extend(holdings.buffers)
    if holdings.weights_on_cpu_numel:
        terms.append(Term(
            name=TERM_OFFLOADED_PARAMS, bytes=holdings.weights_on_cpu_numel * bytes_per_weight,
            formula=f"{_n(holdings.weights_on_cpu_numel)} params (this GPU's shard) x {bytes_per_weight} B in CPU RAM",
            source="DeepSpeed ZeRO-3 offload_param: 16-bit parameter partitions live in (pinned) CPU memory",
            category=CATEGORY_CPU_OFFLOAD, phases=[],
        ))
    act = activations.estimate(model, spec, recipe)
    notes.extend(act.notes)
    if spec.data_parallel > spec.cp:
        notes.append(f"data parallelism: each of the {spec.data_parallel // spec.cp} data-parallel groups runs its own "
                     "micro-batch, so activations per GPU do not shrink")
    terms.extend(act.terms)
    if spec.pp > 1 and spec.pipeline_runtime == "megatron":
        terms.extend(_megatron_pipeline_buffers(model, spec, recipe))
    elif spec.pp > 1:
        terms.extend(t for t in (_pipeline_buffers(model, spec, recipe),
                                 _pipeline_outputs(model, spec, recipe, act.logits_bytes),
                                 _pipeline_sent_gradient(model, spec, recipe)) if t is not None)
    if spec.pp > 1 and (end := _stage_forward_end(model, spec, recipe)) is not None:
        terms.append(end)
    # -- optimizer step ------------------------------------------------------------------------------------
    in_backward = spec.optim_in_backward and largest is not None
    if holdings.master_numel and holdings.fp32_grad_copy and recipe.grad_dtype != recipe.master_dtype and in_backward:
        copy = largest.numel * _bytes_per(recipe.master_dtype)
        terms.append(Term(
            name=TERM_MASTER_GRAD_COPY, bytes=copy,
            formula=f"the largest tensor's gradient in fp32 for its master's step: {_n(largest.numel)} x "
                    f"{_bytes_per(recipe.master_dtype)} B",
            source="--optim-in-backward: each master is stepped with its gradient cast to the master dtype, one "
                   "parameter at a time",
            category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY,
        ))
    elif holdings.master_numel and holdings.fp32_grad_copy and recipe.grad_dtype != recipe.master_dtype:
        # (--tp: the token embedding's gradient is whole, and so is its cast: measured on the fake process group, a
        # bf16 rank's optimizer step read 2.5% low with the shard's)
        embedding_extra = holdings.whole_embedding_grad_extra
        copy = (holdings.master_numel + embedding_extra) * _bytes_per(recipe.master_dtype)
        terms.append(Term(
            name=TERM_MASTER_GRAD_COPY, bytes=copy,
            formula=f"{_n(holdings.master_numel)} trainable params{' (partition)' if stage else ''}"
                    f"{f' + {_n(embedding_extra)} (the token embedding gradient whole)' if embedding_extra else ''} x "
                    f"{_bytes_per(recipe.master_dtype)} B",
            source="the optimizer steps the fp32 master with fp32 gradients: DeepSpeed stage_1_and_2.py step() "
                   "casts the rank's 16-bit gradient partition to fp32 for the step and frees it after"
                   + ("; with offload it is a pinned CPU buffer (initialize_optimizer_states)" if on_cpu else ""),
            category=CATEGORY_CPU_OFFLOAD if on_cpu else CATEGORY_TEMPORARIES, phases=[] if on_cpu else STEP_ONLY,
        ))
    if in_backward:
        # One parameter's step at a time: each tensor's temporaries on its own, the largest of them.
        temp, rule = max((step_temporary_bytes([t.shape or (t.numel,)], opt, opt_param_dtype, recipe.state_dtype,
                                               whole) for t in tensors if t.trainable), key=lambda found: found[0])
        rule = f"one parameter's step at a time, in backward: {rule}"
    else:
        temp, rule = step_temporary_bytes(holdings.optimizer_shapes, opt, opt_param_dtype, recipe.state_dtype, whole)
    if on_cpu:
        temp, rule = 0, "the step runs on the CPU (DeepSpeedCPUAdam): no GPU temporaries"
    terms.append(Term(
        name=TERM_OPTIMIZER_TEMPORARIES, bytes=temp, formula=rule,
        source=temporaries_source(opt.name),
        category=CATEGORY_TEMPORARIES, phases=BACKWARD_ONLY if in_backward else STEP_ONLY,
    ))

    # A recomputed layer under autocast also redoes its weight casts.
    # (under --pp the autocast context spans backward: the recomputation finds its casts in the cache)
    autocast_recompute = (max(0, subset.autocast_recompute_numel - converted_layer) * _bytes_per(recipe.compute_dtype)
                          if recipe.autocast and spec.pp == 1 else 0)
    head = _head_gradient(model, tensors, act.vocabulary_head, spec, recipe, holdings, act.backward_start_extra_bytes)
    encoder_grads = encoder_acts = 0
    if head.first_sum:
        # Before the encoder's backward: its layers' gradients are not there yet, its activations still are (its
        # layers' as the first layer's, capped by the activations term).
        num_encoder_layers = getattr(model.arch, "encoder_layers", 0)
        if stage < 2 and spec.grad_accum == 1:
            encoder_grads = sum(t.numel for t in tensors if t.trainable and t.layer is not None
                                and t.layer < num_encoder_layers) * bytes_per_grad
        act_term = next((t for t in act.terms if t.name == TERM_ACTIVATIONS), None)
        encoder_acts = act_term.bytes if act_term is not None else 0
        if act.last_layer_bytes and act_term is not None:
            per_model = sum(n for part, n in act_term.breakdown.items() if part.startswith(activations.MODEL_PREFIX))
            encoder_acts = min(encoder_acts, num_encoder_layers * act.last_layer_bytes + per_model)
    # Late in backward, the gradients still missing are those of the input embeddings (their backward runs
    # last) unless the embedding is tied to the head or shared by two stacks (a contribution already waits for
    # it); ZeRO-2/3 hold flat partitions instead, so not there.
    # (A later micro-batch's backward - gradient accumulation, a pipeline stage's - finds every gradient made.)
    # (FSDP2 on a pipeline stage: its unsharded gradients are made tensor by tensor, as without sharding)
    by_tensor = (stage < 2 or holdings.engine == parallel.ENGINE_FSDP2_PIPELINE) and not in_backward
    whole_grads = by_tensor and not accumulating
    # (--tp: the embedding's gradient whole, as the gradients term counts it; measured on the fake process group, a
    # checkpointed fp32 rank at its first layer's backward read its shard's worth high before)
    missing_grads = ((_embedding_grads_produced_last(tensors, head.shared) + holdings.whole_embedding_grad_extra)
                     * bytes_per_grad if whole_grads else 0)
    if holdings.engine == "fsdp2" and not accumulating:
        # FSDP2 late in backward: the first layer's and the root's sharded gradients are not made yet (measured on
        # gloo ranks)
        missing_grads = holdings.late_unmade_grad_numel * bytes_per_grad
    pending_mlp, pending_attention, pending_layer, pending_mid = (_first_layer_pending(tensors) if by_tensor
                                                                  else (0, 0, 0, 0))
    # (--cp's ring and eager attention make the attention's backward a moment of its own: the gradients made before it)
    made_at_mid_norm, made_at_attention = (n * bytes_per_grad for n in _made_before_last(tensors))
    if not whole_grads:
        made_at_mid_norm = made_at_attention = 0
    elif not (act.after_attention_bytes or act.released_at_scores_bytes):
        made_at_attention = 0
    attention_casts = _attention_casts(tensors)
    # --pp under autocast, a later micro-batch's backward (the stage's gradients exist from an earlier one): the casts
    # come from the cache the first micro-batch's forward filled (EXTRA_HELD_CAST_GRADIENTS)
    last_layer = max((t.layer for t in tensors if t.layer is not None), default=None)
    fsdp_made = _fsdp_layer_made(tensors, holdings, recipe, accumulating)
    held_casts = (0, 0)
    first_layer_casts = head_held_cast = 0
    last_layer_held_casts = (0, 0, 0)
    if spec.pp > 1 and recipe.autocast and accumulating and by_tensor:
        cast = [t for t in trainable.autocast_cast_weights(tensors, subset.quantized) if t.trainable]
        held_casts = (sum(t.numel for t in cast), max((t.numel for t in cast), default=0))
        first_layer = min((t.layer for t in tensors if t.layer is not None), default=None)
        first_layer_casts = sum(t.numel for t in cast if t.layer is not None and t.layer == first_layer)
        # (and at the stage's last layer's backward, the cast gradients of its weights whose backward has run: at its
        # MLP's its output projection's, at its attention's all but q's, k's and v's; measured on gloo ranks)
        last = [t for t in cast if t.layer is not None and t.layer == last_layer]
        last_layer_held_casts = tuple(sum(t.numel for t in last if keep(t)) * _bytes_per(recipe.compute_dtype)
                                      for keep in (_is_output_projection,
                                                   lambda t: _leaf_module(t) not in ("q_proj", "k_proj", "v_proj"),
                                                   lambda t: t.role != ROLE_ATTENTION))
        # (and the head's, on the last stage, at every moment of that layer: its backward ran before the layers';
        # measured, a Mixtral last stage at its last layer's experts' first op, -0.75% before)
        head_held_cast = sum(t.numel for t in cast if t.role == ROLE_LM_HEAD) * _bytes_per(recipe.compute_dtype)
    # --pp, a later micro-batch's backward on the stage with the embedding: its backward, the stage's last, makes a
    # new V x h gradient beside the one held, before adding it in
    later_embedding = (_embedding_grads_produced_last(tensors, head.shared) * bytes_per_grad
                       if spec.pp > 1 and accumulating and by_tensor else 0)
    # Under autocast (one stage: a pipeline's autocast context spans the backward, its cache keeps every cast) the
    # head's cast is released by the head's backward, the last layer's output projection's by its own (unless its layer
    # is checkpointed: then a recomputed cast, EXTRA_RECOMPUTED_CASTS)
    # (a MoE last layer keeps the moment as its block's transients were measured with: the head's cast counted, none
    # of the releases or gradients below)
    dense_last = last_layer is not None and not any(t.layer == last_layer and t.role in (ROLE_EXPERT, ROLE_ROUTER)
                                                    for t in tensors)
    head_cast = last_output_cast = bytes_per_compute_cast = 0
    if recipe.autocast and spec.pp == 1 and dense_last:
        bytes_per_compute_cast = _bytes_per(recipe.compute_dtype)
        cast = trainable.autocast_cast_weights(tensors, subset.quantized)
        heads = [t for t in cast if t.role == ROLE_LM_HEAD]
        if head_tied_to_embedding(tensors):
            heads.append(token_embedding(tensors))
        head_cast = sum(t.numel for t in heads)  # (the output layer is never converted to float8)
        if not spec.checkpointed(last_layer):
            in_float8 = {t.name for t in converted}
            last_output_cast = _output_projection_cast([t for t in cast if t.name not in in_float8], last_layer)
    if in_backward and head.shared is None:
        # An untied head's weight gradient is stepped and freed by its own hook: not held beside later moments.
        head = dataclasses.replace(head, held=0, held_late=0)
    # FSDP2 on a pipeline stage with a reduce dtype of its own, a later micro-batch: the root unit's (the stage's head
    # and final norm) new 16-bit gradients wait for its post-backward, at the stage's backward's end, to be added to
    # the fp32 accumulated ones (FSDPParam.accumulate_unsharded_grad_if_needed; measured on gloo ranks)
    root_waiting = (sum(t.numel for t in tensors if t.trainable and t.layer is None and t.role != ROLE_EMBEDDING)
                    * _bytes_per(recipe.weight_dtype)
                    if holdings.engine == parallel.ENGINE_FSDP2_PIPELINE and accumulating
                    and holdings.bytes_per_grad_override == BYTES_PER_FP32 else 0)
    phases = _phase_totals(terms, _Extras(
        loss_logits=act.forward_transient_extra_bytes, held_outputs=act.held_through_loss_bytes,
        loss_gradients=act.backward_start_extra_bytes,
        recomputed_layer=act.recompute_bytes, recomputed_casts=autocast_recompute,
        reentrant_output=act.reentrant_output_bytes,
        recomputed_forward=act.recompute_forward_extra, layer_input_gradient=act.layer_input_gradient_bytes,
        checkpointed_layer_forward=act.checkpointed_forward_bytes, ring_forward=act.ring_forward_bytes,
        after_attention=act.after_attention_bytes, made_at_attention=made_at_attention,
        made_at_mid_norm=made_at_mid_norm,
        released_at_scores=act.released_at_scores_bytes,
        opening_gradients=act.opening_backward_transient_bytes,
        last_opening_gradients=act.last_opening_backward_transient_bytes,
        released_at_mlp=act.released_at_mlp_bytes, released_at_last_mlp=act.released_at_last_mlp_bytes,
        shifted_labels=act.shifted_labels_bytes,
        head_cast=head_cast * bytes_per_compute_cast, last_output_cast=last_output_cast * bytes_per_compute_cast,
        made_at_last_mlp=(_made_at_last_mlp(tensors) * bytes_per_grad
                          if whole_grads and dense_last and not _stage_without_head(spec) else 0),
        dense_last_layer=dense_last,
        mid_norm=act.mid_norm_transient_bytes,
        received_output_gradient=act.output_gradient_bytes if _stage_without_head(spec) else 0,
        casts_at_attention=min(autocast_recompute, attention_casts[1] * _bytes_per(recipe.compute_dtype)),
        casts_at_mid_norm=min(autocast_recompute, attention_casts[0] * _bytes_per(recipe.compute_dtype)),
        casts_at_mlp=max(0, autocast_recompute - _output_projection_cast(tensors) * _bytes_per(recipe.compute_dtype)),
        layer_activations=act.last_layer_bytes, layer_gradients=act.layer_backward_transient_bytes,
        attention_gradients=act.attention_backward_transient_bytes, layer_mlp=act.layer_mlp_bytes,
        last_layer_mlp=act.last_layer_mlp_bytes,
        first_layer_context=act.first_layer_context_bytes,
        pending_at_mlp=pending_mlp * bytes_per_grad, pending_at_attention=pending_attention * bytes_per_grad,
        pending_at_recompute=pending_layer * bytes_per_grad, pending_at_mid_norm=pending_mid * bytes_per_grad,
        after_layers=act.after_layers_bytes,
        largest_step_copy=(largest.numel * _bytes_per(recipe.compute_dtype) if in_backward and recipe.autocast
                           and largest.role == ROLE_LM_HEAD else 0),
        missing_gradients=missing_grads,
        sharded_layer=holdings.mid_backward_extra_bytes,
        fsdp_last_layer=holdings.last_layer_extra_bytes + root_waiting,
        # (--ep, the last layer's experts in the forward: beside the block's transients the residual stream, the
        # layer's input, its attention's sum and the embedding's output: 3 x r T h, measured on gloo ranks; on a
        # pipeline stage the experts are among the units kept unsharded, nothing gathered beside them)
        experts_forward=(holdings.experts_gathered_bytes + act.layer_forward_transient_bytes
                         + 3 * act.output_gradient_bytes
                         if spec.ep > 1 and any(t.role == ROLE_EXPERT for t in tensors) else 0),
        experts_kept=holdings.experts_kept_bytes, experts_backward=holdings.experts_gathered_bytes,
        layer_all_gather=holdings.layer_all_gather_bytes,
        root_made=holdings.root_made_bytes,
        # (FSDP2 at the second layer's turn under checkpointing: that layer's kept input, one hidden state, beside)
        fsdp_late=holdings.late_extra_bytes + root_waiting + (act.output_gradient_bytes if holdings.late_second_layer
                                               and spec.checkpointing != Checkpointing.none else 0),
        fsdp_late_second=holdings.late_second_layer,
        # (--tp: the root's post-backward copies its gradients before it reshards, and the token embedding's
        # gradient is whole there: DTensor's embedding backward returns it replicated; measured, fake process group)
        fsdp_root_reduce=(holdings.root_reduce_bytes if spec.tp == 1 else holdings.root_reduce_tp_bytes
                          + tensor_parallel.whole_gradient_extra(_whole_tensors(model, spec), spec.tp)
                          * _bytes_per(recipe.weight_dtype)),
        fsdp_root_shards=holdings.root_shard_grad_numel * bytes_per_grad,
        # (FSDP2 under checkpointing, the same moment at the second layer from the top: every lower layer's kept input
        # beside, one layer's sharded gradients made; measured: small-gradient ranks peak there)
        fsdp_top=((max(0, model.arch.num_layers - 3) * act.output_gradient_bytes,
                   holdings.late_top_grad_numel * bytes_per_grad)
                  if holdings.late_top_grad_numel and spec.checkpointing != Checkpointing.none else (0, 0)),
        fsdp_made=fsdp_made,
        # (FSDP2 on a pipeline stage, a later micro-batch: at its last layer's MLP's backward (unless that layer is
        # checkpointed: +0.55% with them there) and its attention's, that layer's 16-bit gradients made so far wait
        # for its post-backward, as the first layer's do; measured under --cp, where the ring's backward makes the
        # attention's moment the stage's peak: -1.9% without them; at the MLP's -0.67% without them)
        # (plain FSDP2 under --cp, a MoE last layer: at its ring backward the same, its gradients made so far waiting
        # for its post-backward, which its block's moments, measured without them, leave out; a tiny Qwen3-MoE peaks
        # there: -3.6% (cp 4) and -1.3% (cp 2) without them. A dense layer's moments hold them already: the toy Llama's
        # fsdp2 ranks read +0.8% to +1.5% higher with them)
        # (plain FSDP2 without --cp, eager attention or CUDA's math path: at the last layer's softmax backward, the
        # layer's MLP and o_proj gradients made so far wait for its post-backward; measured on the fake group, a small
        # Llama on 2 ranks: fp32 -3.4%, bf16-pure -2.3% without them, 0.00% with them; amp-bf16 -1.7% -> +1.7%,
        # Llama-3-8B amp-bf16 eager on 8 ranks -0.12% -> +0.50%)
        # (and at its mid norm's backward, on a stage, its MLP's: fsdp_made's third)
        fsdp_last_made=((0 if last_layer is None or spec.checkpointed(last_layer) else fsdp_made[0], fsdp_made[1],
                         0 if last_layer is None or spec.checkpointed(last_layer) else fsdp_made[2])
                        if holdings.engine == parallel.ENGINE_FSDP2_PIPELINE else
                        (0, fsdp_made[1], 0) if holdings.engine == "fsdp2" and (
                            spec.cp > 1 and not dense_last or spec.cp == 1 and act.attention_backward_transient_bytes)
                        else (0, 0, 0)),
        experts_reduce=(holdings.experts_reduce_bytes + 2 * act.output_gradient_bytes
                        if holdings.experts_reduce_bytes else 0),
        head_backward=head.at_backward, head_gradient=head.held,
        head_gradient_late=head.held_late, shared_gradient_sum=head.shared_sum,
        first_shared_sum=head.first_sum, first_sum_missing_gradients=encoder_grads,
        first_sum_activations=encoder_acts, step=act.step, in_backward=in_backward,
        stage_first_gradient=_stage_first_gradient(tensors, spec, bytes_per_grad, grad_phases),
        held_cast_gradients=held_casts[0] * _bytes_per(recipe.compute_dtype),
        last_layer_held_casts=last_layer_held_casts, head_held_cast=head_held_cast,
        cast_gradient_upcast=held_casts[1] * bytes_per_grad, casts_kept=spec.pp > 1 and recipe.autocast,
        later_embedding_gradient=later_embedding,
        cast_bytes=_bytes_per(recipe.compute_dtype), grad_bytes=bytes_per_grad, gradients_made=accumulating,
        first_layer_cast_numel=first_layer_casts))
    peak = max(phases, key=lambda p: p.bytes)
    # The load before the first step (memcalc.load): the run's peak when it is larger than the step's.
    loaded = load.estimate(
        [t for t in tensors if t.role != ROLE_LORA and trainable.MODULES_TO_SAVE not in t.name], subset, spec,
        next(t.bytes for t in terms if t.name == TERM_WEIGHTS), _bytes_per(recipe.weight_dtype),
        _bytes_per(recipe.compute_dtype),
        holdings.bytes_per_weight_override == BYTES_PER_FP32, model.architecture_known, model.model_type,
        bool(model.described is not None and model.described.family.conv1d))
    if loaded.peak_bytes > peak.bytes:
        peak = PhaseTotal(phase=Phase.load, bytes=loaded.peak_bytes, terms=[TERM_WEIGHTS],
                          first_step_bytes=loaded.peak_bytes, moment=loaded.moment, breakdown=dict(loaded.breakdown))
        phases = [peak, *phases]
    model_states = sum(t.bytes for t in terms if t.name in MODEL_STATE_TERMS and not t.in_cpu_ram)
    cpu_bytes = sum(t.bytes for t in terms if t.in_cpu_ram)
    summary = ModelSummary(
        name=model.name, source=model.source, model_type=model.model_type,
        architecture_known=model.architecture_known,
        num_params=sum(t.numel for t in tensors), num_trainable_params=sum(t.numel for t in tensors if t.trainable),
        num_tensors=len(tensors), params_source="inventory" if model.architecture_known else "--params",
    )
    return Report(
        model=summary,
        training=_training_summary(spec, _as_run(recipe, holdings), opt, defaults_used, act.source),
        per_gpu=PerGpu(
            terms=terms, model_states_bytes=model_states, peak_bytes=peak.bytes, peak_phase=peak.phase,
            phases=phases, first_step_peak_bytes=max(p.first_step_bytes for p in phases), cpu_offload_bytes=cpu_bytes,
            load=loaded, paged_bytes=paged,
        ),
        totals=Totals(num_gpus=num_gpus, num_nodes=spec.num_nodes, cpu_offload_bytes_per_node=cpu_bytes * spec.gpus_per_node,
                      model_states_bytes=model_states * num_gpus,
                      peak_bytes_sum=peak.bytes * num_gpus),
        notes=notes,
    )


def _moe_notes(model: ModelInput, tensors: Sequence[ParamTensor]) -> list[str]:
    expert_numel = sum(t.numel for t in tensors if t.role == ROLE_EXPERT)
    if not expert_numel:
        return []
    num_experts = getattr(model.arch, "num_experts", None)
    per_token = getattr(model.arch, "experts_per_token", None)
    active = f"; only {per_token} of {num_experts} experts run per token, so activations use those" if num_experts and per_token else ""
    return [f"MoE: all experts' weights ({expert_numel:,} params) are held, trained and stepped{active}"]


# Measured (benchmarks/expert_parallel.py --cp: tiny Mixtral and Qwen3-MoE on 2 and 4 gloo ranks, 72 rank steps).
EP_CP_NOTE = ("--ep with --cp against gloo ranks (tiny MoE models, each rank a context-parallel rank too): every pair "
              "routed to one rank -0.0% to +7.5%; with a random router a Qwen3-MoE rank without checkpointing read up "
              "to 0.9% below the estimate at the measured --ep-load (a moment not yet placed): leave margin")


def _expert_parallel_note(model: ModelInput, spec: TrainingSpec) -> str:
    """--ep: the experts this rank holds and the routed pairs its experts run (balanced unless --ep-load)."""
    arch = model.arch
    average = expert_parallel.sent_tokens(spec.micro_batch_size * spec.local_seq_len, spec.tp) * arch.experts_per_token
    return expert_parallel.note(spec.ep, spec.data_parallel * spec.tp, arch.num_experts // spec.ep, average,
                                spec.ep_load, spec.ep_shard_dim, spec.tp)


def _fsdp_layer_made(tensors: Sequence[ParamTensor], holdings: RankHoldings, recipe: Recipe,
                     accumulating: bool = False) -> tuple[int, int, int]:
    """FSDP2: the first layer's unsharded gradients (in the gathered parameters' dtype) its backward has made by its
    MLP's, its attention's and its mid norm's backward (the rest of ``_first_layer_pending``); they wait for the layer's
    reduce-scatter (measured: Llama-3-8B on the fake process group). On a pipeline stage with a reduce dtype of its
    own, a later micro-batch's: they wait for the unit's post-backward to add them to the fp32 accumulated gradients
    (FSDPParam.accumulate_unsharded_grad_if_needed; measured on gloo ranks)."""
    if holdings.engine == parallel.ENGINE_FSDP2_PIPELINE:
        if not (accumulating and holdings.bytes_per_grad_override == BYTES_PER_FP32):
            return (0, 0, 0)
    elif holdings.engine != "fsdp2":
        return (0, 0, 0)
    pending_mlp, pending_attention, total, pending_mid = _first_layer_pending(tensors)
    gathered = _bytes_per(recipe.weight_dtype)
    return tuple((total - pending) * gathered for pending in (pending_mlp, pending_attention, pending_mid))


def _first_layer_pending(tensors: Sequence[ParamTensor]) -> tuple[int, int, int, int]:
    """The first decoder layer's trainable elements whose gradients its backward has not made yet: at its MLP's
    backward all but the MLP's output projection (the layer's last op, first in backward: down_proj, fc2, c_proj;
    Phi-3's fused gate_up projection comes later), at its attention's its q, k and v (all of the attention's but the
    output projection, made before). Stacked experts: their down projection's (made by the product's backward, the
    MoE block's MLP moment; measured: Mixtral's and Qwen3-MoE's checkpointed CPU steps). Also: all of them (while it
    is recomputed) and all but the MLP's (at the norm between its MLP and its attention)."""
    # (a pipeline stage's first layer is its own first: its tensors are the stage's)
    first = min((t.layer for t in tensors if t.layer is not None), default=0)
    layer = [t for t in tensors if t.trainable and t.layer == first]
    mlp = [t for t in layer if t.role in (ROLE_MLP, ROLE_EXPERT)]
    attention = [t for t in layer if t.role == ROLE_ATTENTION]
    outputs = [t for t in mlp if _is_output_projection(t)]
    experts = [t for t in outputs if t.role == ROLE_EXPERT]
    if experts or any(t.role == ROLE_EXPERT for t in mlp):
        outputs = experts or [t for t in mlp if t.role == ROLE_EXPERT]
    made_first = max((t.numel for t in outputs or mlp), default=0)
    total = sum(t.numel for t in layer)
    return (total - made_first, sum(t.numel for t in attention) - _attention_output(attention), total,
            total - sum(t.numel for t in mlp))


_ATTENTION_OUTPUTS = ("o_proj", "out_proj", "c_proj", "dense", "o", "wo")


def _leaf_module(t: ParamTensor) -> str:
    """The last part of the module that owns ``t`` (``self_attn.o_proj`` -> ``o_proj``)."""
    return t.module.rsplit(".", 1)[-1]


def _attention_output(attention: Sequence[ParamTensor]) -> int:
    """Elements of an attention's output projection among its tensors (o_proj, out_proj, c_proj, dense, o: weight and
    bias), whose backward comes before the q, k and v projections'; where none is named so, its largest tensor (equal
    to q's in a Llama layer; a fused qkv projection, Falcon's query_key_value or GPT-2's c_attn, is larger than it)."""
    named = [t.numel for t in attention if _leaf_module(t) in _ATTENTION_OUTPUTS]
    return sum(named) if named else max((t.numel for t in attention), default=0)


def _made_before_last(tensors: Sequence[ParamTensor]) -> tuple[int, int]:
    """The last decoder layer's trainable elements whose gradients exist by the backward of its norm between its MLP
    and its attention (its MLP's and its norms after attention; measured on the fake process group, a --tp 2 --pp 2
    first stage at that norm's backward), and by its attention's (those and its attention's output projection: all but
    q, k and v and the input norm)."""
    layers = [t.layer for t in tensors if t.trainable and t.layer is not None]
    if not layers:
        return 0, 0
    last = max(layers)
    layer = [t for t in tensors if t.trainable and t.layer == last]
    attention = [t for t in layer if t.role == ROLE_ATTENTION]
    norms = [t for t in layer if t.role not in (ROLE_ATTENTION, ROLE_MLP, ROLE_EXPERT)]
    first_norm = min((t.numel for t in norms), default=0)  # (the input norm's weight, made last; of equal sizes any)
    at_mid_norm = sum(t.numel for t in layer) - sum(t.numel for t in attention) - first_norm
    return at_mid_norm, at_mid_norm + _attention_output(attention)


def _attention_casts(tensors: Sequence[ParamTensor]) -> tuple[int, int]:
    """Elements of the first decoder layer's attention Linear weights, all of them (the autocast casts left once its
    MLP's backward has run) and all but its output projection (those its attention's backward holds)."""
    layers = [t.layer for t in tensors if t.layer is not None]
    if not layers:
        return 0, 0
    first = min(layers)
    attention = [t for t in tensors if t.layer == first and t.role == ROLE_ATTENTION and t.is_linear_weight]
    total = sum(t.numel for t in attention)
    return total, total - _attention_output(attention)


def _output_projection_cast(tensors: Sequence[ParamTensor], layer: int | None = None) -> int:
    """Elements of a decoder layer's MLP output projection (``_is_output_projection``) if autocast casts it (of
    ``tensors``, the weights it casts); by default the first layer's."""
    layers = [t.layer for t in tensors if t.layer is not None]
    if not layers:
        return 0
    at = min(layers) if layer is None else layer
    outputs = [t.numel for t in tensors if t.layer == at and t.role == ROLE_MLP and t.is_linear_weight
               and _is_output_projection(t)]
    return max(outputs, default=0)


def _made_at_last_mlp(tensors: Sequence[ParamTensor]) -> int:
    """Trainable elements whose gradients exist at the last decoder layer's MLP's peak in backward: the final norm's
    (the last norm outside the layers, weight and bias) and that layer's dense MLP output projection's, weight and bias
    (its backward runs first)."""
    layers = [t.layer for t in tensors if t.layer is not None]
    if not layers:
        return 0
    last = max(layers)
    modules = [t.module for t in tensors if t.layer is None and t.role == ROLE_NORM]
    norms = [t for t in tensors if t.trainable and modules and t.layer is None and t.role == ROLE_NORM
             and t.module == modules[-1]]
    outputs = [t for t in tensors if t.trainable and t.layer == last and t.role == ROLE_MLP and _is_output_projection(t)]
    return sum(t.numel for t in norms + outputs)


def _is_output_projection(t: ParamTensor) -> bool:
    """An MLP's output projection, its layer's last op (the first in its backward): down_proj, fc2, c_proj,
    dense_4h_to_h."""
    return "down_proj" in t.name or _leaf_module(t) in ("fc2", "c_proj", "dense_4h_to_h")


def _embedding_grads_produced_last(tensors: Sequence[ParamTensor], shared: ParamTensor | None) -> int:
    """Elements of input-embedding gradients, which appear only at the very end of backward.

    A token embedding used twice (``shared``: tied to the head, or shared by an encoder and a decoder) already has a
    V x h contribution from its first use's backward (the head's, the decoder's), held until the last.
    """
    return sum(t.numel for t in tensors if t.trainable and t.layer is None and t is not shared
               and t.role in (ROLE_EMBEDDING, ROLE_POSITION_EMBEDDING))


@dataclass(frozen=True)
class _HeadGradient:
    """The vocabulary head's weight gradient at the moments of backward, beyond what the terms there count.

    at_backward: while the head's backward runs (with the logits' gradient; the loss's saved log-softmax output is
    gone by then); held: from then on, at the start-of-backward moments (no gradient term there);
    held_late: from then on, beside the gradients term (late backward, a sharded layer); shared_sum: at the sum of a
    token embedding's contributions (tied head, or one table for two stacks), beside every gradient; first_sum: an
    encoder-decoder's tied head: the head's and the decoder's contributions summed before the encoder's backward.
    """

    shared: ParamTensor | None = None  # the token embedding, where it is used twice and trains
    at_backward: int = 0
    held: int = 0
    held_late: int = 0
    shared_sum: int = 0
    first_sum: int = 0


def _head_gradient(model: ModelInput, tensors: Sequence[ParamTensor], vocabulary_head: bool, spec: TrainingSpec,
                   recipe: Recipe, holdings: RankHoldings, loss_gradients: int) -> _HeadGradient:
    """What the head's weight gradient (V x h) and a shared token embedding's gradient sum add to the backward moments.

    Following torch's autograd (device-independent code; only kernels' own scratch differs on a GPU):
    - F.linear(x, W) runs matmul(x, W.t()): MmBackward0's gradient for W.t() (column-major) is mm_mat2_backward's
      ``grad.t().mm(mat1).t()``, and TBackward0 transposes it back: a V x h view of mm's fresh result, in the weight's
      dtype (FunctionsManual.cpp mm_mat2_backward; derivatives.yaml mm, t). Under autocast mm makes it in the compute
      dtype and ToCopyBackward0 casts it to the weight's (a fresh tensor). AccumulateGrad steals a gradient that obeys
      the layout contract (accumulate_grad.h accumulateGrad): p.grad is that tensor, no copy; with gradient
      accumulation it adds in place; ZeRO-2/3 and FSDP hand it to their reduce buffers.
    - A weight used twice has one AccumulateGrad node: the engine sums the contributions in its input buffer before
      calling it (input_buffer.cpp InputBuffer::add / accumulate). In place (old_var.add_) only if the buffered one is
      a plain tensor held once with its storage (can_accumulate_inplace); the head's view shares its storage with
      its base, so ``old_var + var`` makes a third V x h tensor. The head's contribution waits in the buffer from the
      head's backward to the embedding's (embedding_dense_backward: a fresh V x h). T5's shared table gets the head's
      and the decoder's contributions before the encoder's backward, then the encoder's, added in place into that
      fresh sum; untied, the decoder's and the encoder's, in place.
    - By the head's backward, LogSoftmaxBackward0 has run and the engine has released its saved output (engine.cpp
      evaluate_function: release_variables unless retain_graph); the logits' gradient (one of the loss's two) is
      MmBackward0's input until it returns, so it meets mm's result but not the cast of it. A chunked loss's
      cross-entropies all run before any chunk's head backward (the engine's ready queue takes the highest sequence
      number first, and every cross-entropy was recorded after every chunk's projection): the chunks' logits
      gradients, in the logits' dtype, wait for their head backward; the first sum of two chunks' views is out of
      place, the later ones in place into it.
    Compared with the CPU allocator's record and the tracker in tests/test_tied_embedding_backward.py.
    """
    embedding = token_embedding(tensors)
    vocab = embedding.shape[0] if embedding is not None else 0
    tied = vocabulary_head and embedding is not None and head_tied_to_embedding(tensors)
    head = embedding if tied else next((t for t in tensors if t.role == ROLE_LM_HEAD and t.is_linear_weight
                                        and t.shape[0] == vocab), None)
    two_stacks = bool(getattr(model.arch, "encoder_decoder", False)) and embedding is not None
    shared = embedding if (tied or two_stacks) and embedding is not None and embedding.trainable else None
    numel = head.numel if head is not None and head.trainable else 0
    bytes_per_grad = _bytes_per(recipe.weight_dtype)  # autograd makes a parameter's gradient in its dtype
    grad = numel * bytes_per_grad
    # What a chunked or fused loss changes: torchtune's chunked output applies the head once per chunk (its chunks'
    # gradients are summed as above: two views, out of place, then in place into that fresh sum); Liger's fused
    # loss computes the weight's gradient in the forward (counted in logits_and_loss) and returns it in backward, where
    # a tied weight's waits in the input buffer like the head's own (measured on an H200: 0.55% low without it).
    fused, chunked = spec.loss == LossKind.fused_linear, spec.loss == LossKind.chunked and spec.loss_chunks > 1
    made = numel * _bytes_per(recipe.compute_dtype) if recipe.autocast else grad  # mm's result
    # The sum becomes p.grad, which the gradients term counts: plain data parallel, one micro-batch per step.
    stolen = ((holdings.effective_stage < 2 or holdings.engine == parallel.ENGINE_FSDP2_PIPELINE)
              and spec.grad_accum == 1 and holdings.grads_held != "cpu")
    # FSDP2's MixedPrecisionPolicy computes with gathered 16-bit parameters: nothing for autocast to cast.
    cast_head = recipe.autocast and holdings.engine not in ("fsdp2", parallel.ENGINE_FSDP2_PIPELINE)
    logits_gradient = loss_gradients // 2  # the loss's: in its log-softmax dtype, at least the logits'
    cast = grad if cast_head else 0  # the head's gradient cast to the weight's dtype, beside mm's result
    if fused:
        at_backward = 0
    elif chunked:  # the first sum, beside the chunks' logits gradients not yet used (torchtune upcasts: fp32 above)
        chunk_logits_gradient = logits_gradient // BYTES_PER_FP32 * _bytes_per(recipe.compute_dtype)
        at_backward = max(3 * made + (spec.loss_chunks - 2) * chunk_logits_gradient, made + cast)
    else:
        at_backward = made + max(logits_gradient, cast)
    if tied:
        held = grad  # in the input buffer (fused: inside logits_and_loss until its backward, then there)
    else:
        held = grad if stolen else 0  # p.grad; or added into a p.grad already counted; or handed to a reduce buffer
    held_late = grad if tied and not stolen else 0
    shared_sum = first_sum = 0
    if shared is not None:
        # At a sum: the buffered contribution and the new one, their sum when out of place, and the result where the
        # gradients term does not count it (it is p.grad only when stolen).
        table = shared.numel * bytes_per_grad
        head_is_view = tied and not cast_head and not chunked  # (fused: assumed a view, the larger)
        first = table * (1 + head_is_view) + (0 if stolen else table)
        if tied and two_stacks:
            first_sum, shared_sum = first, table + (0 if stolen else table)  # the last into the fresh first sum
        else:
            shared_sum = first
    return _HeadGradient(shared=shared, at_backward=at_backward if numel else 0, held=held,
                         held_late=held_late, shared_sum=shared_sum, first_sum=first_sum)


@dataclass(eq=False, repr=False)
class _Extras:
    """Bytes alive at moments of the step that are not whole terms (see the module docstring)."""

    loss_logits: int = 0  # forward: the logits and their fp32 upcast during the loss
    held_outputs: int = 0  # ... beside what the model's outputs keep alive unsaved (the KV cache's copies)
    loss_gradients: int = 0  # start of backward: the loss's gradient buffers
    recomputed_layer: int = 0  # checkpointing: one layer's activations rebuilt during backward
    reentrant_output: int = 0  # --checkpoint-reentrant, full: the recomputed layer's output beside its backward
    checkpointed_layer_forward: int = 0  # checkpointing: a layer's tensors while its forward runs (none kept)
    layer_all_gather: int = 0  # FSDP2 resharding after forward: inside a layer's forward, its kept all-gather output
    ring_forward: int = 0  # --cp: the last layer's ring attention in the forward (beyond what the layer saves)
    recomputed_casts: int = 0  # ... and, under autocast, that layer's weight casts
    recomputed_forward: int = 0  # ... and, while it is recomputed, its forward's transients (Rule.forward_transient)
    layer_input_gradient: int = 0  # ... beside the gradient of its output, waiting (late in backward)
    layer_activations: int = 0  # late backward: the first layer's activations (0: not modelled)
    layer_gradients: int = 0  # late backward: the first layer's gradient transients (at its MLP's backward)
    attention_gradients: int = 0  # ... at its attention's backward (eager softmax's gradients; 0: not beyond)
    layer_mlp: int = 0  # what a layer's MLP saved (released before its attention's backward)
    last_layer_mlp: int = 0  # ... the last layer's (under checkpointing: the recomputed one's)
    after_attention: int = 0  # ... and what else it made after its attention (Rule.after_attention; 0: not counted off)
    released_at_scores: int = 0  # ... or, eager, what its backward released by softmax's (Rule.released_at_scores)
    casts_at_attention: int = 0  # ... and the recomputed weight casts left then (q, k and v's)
    casts_at_mlp: int = 0  # the recomputed weight casts left at its MLP's backward (all but its output projection's)
    casts_at_mid_norm: int = 0  # ... and at the norm between its MLP and its attention (the attention's)
    opening_gradients: int = 0  # a layer's backward transients at its first op (Rule.opening_transient)
    last_opening_gradients: int = 0  # ... the last layer's, first in backward (Rule.last_opening_transient)
    released_at_mlp: int = 0  # what a layer's backward released before its MLP's (Rule.released_at_mlp)
    released_at_last_mlp: int = 0  # ... the last layer's (Rule.released_at_last_mlp)
    shifted_labels: int = 0  # the causal-LM loss's shifted labels, released by its backward's first op
    head_cast: int = 0  # the head weight's autocast cast, released by the head's backward
    last_output_cast: int = 0  # the last layer's output projection's cast (kept from the forward), released by its backward
    made_at_last_mlp: int = 0  # the gradients made by the last layer's MLP's peak: the final norm's, its output projection's
    dense_last_layer: bool = False  # the last layer's MLP is dense (the three above and its recomputed casts apply)
    mid_norm: int = 0  # its norm's backward between its MLP's and attention's (Rule.mid_norm_transient)
    made_at_mid_norm: int = 0  # ... the last layer's gradients made by then (its MLP's, its norms' after attention)
    received_output_gradient: int = 0  # --pp, a stage without the head: its last layer's output gradient is received
    made_at_attention: int = 0  # the last layer's gradients made by its attention's backward (given with after_attention)
    first_layer_context: int = 0  # activations still kept beside the first layer's (per model; its kept input)
    pending_at_mlp: int = 0  # the first layer's gradients not yet made at its MLP's backward (all but the output's)
    pending_at_attention: int = 0  # ... at its attention's backward (q, k, v)
    pending_at_recompute: int = 0  # ... while it is recomputed (all of them)
    pending_at_mid_norm: int = 0  # ... at the norm between its MLP and its attention (all but the MLP's)
    after_layers: int = 0  # what the final norm and the head saved (gone by the last layer's backward)
    largest_step_copy: int = 0  # --optim-in-backward: the autocast copy of the largest tensor, if the head's weight
    missing_gradients: int = 0  # late backward: the input embeddings' gradients, produced last
    in_backward: bool = False  # --optim-in-backward: each gradient stepped and freed by its hook as it is made
    sharded_layer: int = 0  # FSDP2: a layer's prefetched neighbour, unsharded gradients and their copies
    fsdp_last_layer: int = 0  # FSDP2, at the last layer's backward: the previous layer prefetched, the root's gradients
    experts_forward: int = 0  # --ep: the last layer's experts gathered in the forward, and the block's transients
    experts_kept: int = 0  # --ep: their all-gather output beyond a layer's, kept through the loss into the backward
    experts_backward: int = 0  # --ep: a layer's experts gathered again for its backward (late: the first layer's)
    root_made: int = 0  # FSDP2: the root's unsharded gradients (the head's, the final norm's), made by the head's backward
    # FSDP2 late in backward: the prefetched layer, the last reduce-scatter's input, the root's unsharded gradients and
    # (at the second layer's turn, checkpointed) that layer's kept input
    fsdp_late: int = 0
    fsdp_late_second: bool = False  # FSDP2: the late moment is the second layer's turn (RankHoldings.late_second_layer)
    # FSDP2 late in backward: the layer's unsharded gradients made by its MLP's, attention's and mid norm's backward
    fsdp_made: tuple[int, int, int] = (0, 0, 0)
    # At the last layer's MLP's and attention's backward, in a later micro-batch on a pipeline stage: FSDP2's 16-bit
    # gradients of that layer waiting for its post-backward, and under autocast the cast gradients of its weights whose
    # backward has run, held (as held_cast_gradients at the end)
    fsdp_last_made: tuple[int, int, int] = (0, 0, 0)
    last_layer_held_casts: tuple[int, int, int] = (0, 0, 0)
    head_held_cast: int = 0  # ... and the head's, at every moment of the last layer's backward (the last stage)
    fsdp_top: tuple[int, int] = (0, 0)  # FSDP2 late, near the top: more kept inputs, fewer sharded gradients made
    fsdp_root_reduce: int = 0  # FSDP2 at the root's reduce-scatter: its unsharded gradients and their reduce copy
    fsdp_root_shards: int = 0  # ... its sharded gradients, not made yet then
    experts_reduce: int = 0  # --ep: the last layer's experts' reduce-scatter (buffers, prefetch, gradients in flight)
    head_backward: int = 0  # the head's backward: the logits' and its weight gradient (and the cast, autocast)
    head_gradient: int = 0  # after the head's backward, at the start-of-backward moments: its weight gradient
    stage_first_gradient: int = 0  # --pp, a stage without the head: its last layer's first weight gradient
    # --pp under autocast, a micro-batch after the first: the cast weights' gradients (compute dtype) held until the
    # stage's backward ends (EXTRA_HELD_CAST_GRADIENTS); at its end the largest of them cast to the weight dtype; and
    # autocast's cache itself alive to the end (the context spans the schedule's step)
    held_cast_gradients: int = 0
    cast_gradient_upcast: int = 0
    casts_kept: bool = False
    later_embedding_gradient: int = 0  # --pp, a later micro-batch: the embedding's new gradient before it is added
    cast_bytes: int = 0  # (the compute dtype's bytes, and the gradients': pending gradients in cast bytes)
    grad_bytes: int = 1
    first_layer_cast_numel: int = 0  # ... of which the first layer's cast weights' (a MoE layer's experts are not cast)
    gradients_made: bool = False  # a later micro-batch: the pending_* gradients exist (only their casts' are pending)
    head_gradient_late: int = 0  # ... and beside the gradients term, where that term does not hold it
    shared_gradient_sum: int = 0  # end of backward: a shared token embedding's contributions being summed
    first_shared_sum: int = 0  # T5, tied: the first sum (head's and decoder's), before the encoder's backward ...
    first_sum_missing_gradients: int = 0  # ... without the encoder's gradients
    first_sum_activations: int = 0  # ... beside the encoder's activations
    step: tuple[TracedMoment, ...] = ()  # traced: the forward's and backward's moments, op by op (replace those above)


# Terms alive during one unit's backward only (a unit's full gradients before their reduce-scatter): gone at the
# end of backward, and not yet there at its start.
_PER_UNIT_BACKWARD = (TERM_ZERO3_GATHERED_GRADS, TERM_FSDP_REDUCE_SCATTER)
# Terms of one parameter's step, alive in backward only under --optim-in-backward (and the gradients, which build up
# through backward otherwise): not at the start of backward.
_STEPPED_IN_BACKWARD = (TERM_GRADIENTS, TERM_OPTIMIZER_TEMPORARIES, TERM_MASTER_GRAD_COPY)
_FREED_BY_BACKWARD_END = (TERM_ACTIVATIONS, TERM_LOSS_BUFFERS, TERM_AUTOCAST_COPIES, *_PER_UNIT_BACKWARD)


def _alive(terms: Sequence[Term], keep) -> dict[str, int]:
    return {t.name: t.bytes for t in terms if keep(t)}


def _total(moment: str, phase: Phase, parts: dict[str, int], names: set[str]) -> PhaseTotal:
    parts = {name: num_bytes for name, num_bytes in parts.items() if num_bytes}
    total = sum(parts.values())
    states = parts.get(TERM_OPTIMIZER_STATES, 0) if phase != Phase.optimizer_step else 0
    return PhaseTotal(phase=phase, bytes=total, terms=[n for n in parts if n in names], first_step_bytes=total - states,
                      moment=moment, breakdown=parts)


# What a traced step's moments hold (memcalc.measure.timeline): every term of the forward and backward but the
# parameters, the fp32 master and the optimizer's states.
_TRACED_TERMS = (TERM_GRADIENTS, TERM_ACTIVATIONS, TERM_LOSS_BUFFERS, TERM_AUTOCAST_COPIES, TERM_AUTOCAST_CHECKPOINTED)


def _traced(terms: Sequence[Term], moment: TracedMoment, names: set[str], in_backward: bool = False) -> PhaseTotal:
    """A traced moment beside the terms it does not hold (with gradient accumulation every gradient is there
    already: the gradients term, alive in every phase then, replaces the traced step's; with the optimizer step in
    backward the traced step's gradients, which the trace lets accumulate, are one gradient at most: the term's)."""
    parts = _alive(terms, lambda t: moment.phase in t.phases and t.name not in (*_TRACED_TERMS, *_PER_UNIT_BACKWARD))
    accumulated = next((t for t in terms if t.name == TERM_GRADIENTS and Phase.forward in t.phases), None)
    stepped = next((t for t in terms if t.name == TERM_GRADIENTS), None) if in_backward else None
    if stepped is not None:
        parts[TERM_GRADIENTS] = min(stepped.bytes, moment.gradients)
    else:
        parts[TERM_GRADIENTS] = accumulated.bytes if accumulated is not None else moment.gradients
    parts[EXTRA_TRACED_STEP] = moment.bytes - moment.gradients
    return _total(moment.label, moment.phase, parts, names)


# What a moment inside the last layer's forward (its experts, its checkpointed forward, its ring attention) has not
# reached: the loss's buffers, and a pipeline stage's forward end (a moment of its own, at that layer's last add)
_NOT_IN_LAYER = (TERM_LOSS_BUFFERS, TERM_PIPELINE_FORWARD_END)


def _phase_totals(terms: Sequence[Term], x: _Extras) -> list[PhaseTotal]:
    """The largest moment of each phase, with what is alive then. In CPU RAM terms are alive in no phase."""
    names = {t.name for t in terms}
    if x.step:
        return _traced_phase_totals(terms, x, names)
    forward = _alive(terms, lambda t: Phase.forward in t.phases)
    forward[EXTRA_LOSS_LOGITS] = x.loss_logits
    forward[EXTRA_HELD_OUTPUTS] = x.held_outputs
    # Start of backward: what the forward saved (its terms still alive in backward), then either the loss
    # gradients or, a moment later (the head's backward done), buffers kept for the whole backward (DeepSpeed
    # ZeRO-1/2's reduce bucket, set up at the first gradient) beside one recomputed layer under checkpointing.
    start = _alive(terms, lambda t: Phase.forward in t.phases and t.phases != FORWARD_ONLY)
    if TERM_ACTIVATIONS in start:  # (the loss's shifted labels are released by its first backward op)
        start[TERM_ACTIVATIONS] -= min(x.shifted_labels, start[TERM_ACTIVATIONS])
    start_terms = dict(start)
    if x.experts_kept:
        forward[EXTRA_EXPERTS_ALL_GATHER] = start[EXTRA_EXPERTS_ALL_GATHER] = x.experts_kept
    # (Gradients alive in backward only - ZeRO-1-Offload's p.grad - build up through it: not there at its start.)
    whole_backward = _alive(terms, lambda t: t.phases == BACKWARD_ONLY
                            and t.name not in (*_PER_UNIT_BACKWARD, *_STEPPED_IN_BACKWARD))
    # The head's backward makes its V x h weight gradient, which stays (beside the recomputed layer); the loss's saved
    # log-softmax output is gone by then.
    at_head = {name: num_bytes for name, num_bytes in start.items() if name != TERM_LOSS_BUFFERS}
    at_head.update({**whole_backward, EXTRA_HEAD_BACKWARD: x.head_backward})
    later = {**whole_backward, EXTRA_HEAD_GRADIENT: x.head_gradient, EXTRA_RECOMPUTED_LAYER: x.recomputed_layer,
             EXTRA_RECOMPUTED_CASTS: x.recomputed_casts, EXTRA_STAGE_FIRST_GRADIENT: x.stage_first_gradient}
    # (after the head's backward the loss's saved log-softmax output is released: not beside the recomputed layer)
    after_head = {**{name: n for name, n in start.items() if name != TERM_LOSS_BUFFERS}, **later}
    if x.recomputed_forward:  # the first recomputation's forward, at its largest
        # (beside it the gradient the final norm's backward handed the last layer's output, waiting for that layer's
        # backward: on gloo ranks a checkpointed Qwen2-MoE rank under --ep 2 --tp 2 peaks at the recomputation's
        # combine with it among the live tensors, and read -0.81% without it)
        after_head[EXTRA_RECOMPUTED_LAYER] = x.recomputed_layer + x.recomputed_forward + x.layer_input_gradient
        if x.experts_backward:
            # (--ep under FSDP2: the recomputed MoE block runs its experts gathered again, and the head's and final
            # norm's unsharded gradients wait for the root's reduce-scatter; measured on gloo ranks: a checkpointed
            # Qwen2-MoE rank peaks at that recomputation's restore, 0.7% low without them, 2.9% with --tp 2)
            after_head[EXTRA_EXPERTS_GATHERED] = x.experts_backward
            after_head[EXTRA_HEAD_GRADIENT] = max(after_head.get(EXTRA_HEAD_GRADIENT, 0), x.root_made)
    if x.recomputed_layer and TERM_ACTIVATIONS in after_head:
        # (the first recomputation runs at the last layer's backward: the final norm's, the head's and the logit
        # softcapping's saved tensors are released by then)
        after_head[TERM_ACTIVATIONS] -= min(x.after_layers, after_head[TERM_ACTIVATIONS])
    start[EXTRA_LOSS_GRADIENTS] = x.loss_gradients
    if sum(after_head.values()) > sum(start.values()):
        start = after_head
    # End of backward: activations, autocast copies and the units' full gradients are freed, every gradient exists.
    # (--pp under autocast: the copies stay to the schedule's end; a later micro-batch's cast weights' gradients are
    # still held, the first of them cast to the weight's dtype)
    freed = [n for n in _FREED_BY_BACKWARD_END if not (x.casts_kept and n == TERM_AUTOCAST_COPIES)]
    end = _alive(terms, lambda t: Phase.backward in t.phases and t.name not in freed)
    # (the embedding's backward runs before the held casts' gradients are cast and added: its new gradient beside
    # them, or later the first of them cast, whichever is larger)
    upcast = x.cast_gradient_upcast
    if x.later_embedding_gradient > upcast:
        end[EXTRA_LATER_EMBEDDING_GRADIENT], upcast = x.later_embedding_gradient, 0
    if x.held_cast_gradients:
        end[EXTRA_HELD_CAST_GRADIENTS] = x.held_cast_gradients + upcast
    candidates = [(MOMENT_BACKWARD_START, start), (MOMENT_BACKWARD_END, end)]
    if x.layer_activations and x.layer_gradients:
        # The last layer's backward: what the forward saved but the loss's buffers, the head's weight gradient, the
        # recomputed layer (checkpointing) and the gradients its backward makes on the way; the head's autocast cast is
        # released by the head's backward.
        at_attention = x.attention_gradients - x.last_layer_mlp - max(x.after_attention, x.released_at_scores)
        base = {**at_head, **later}
        base.pop(EXTRA_HEAD_BACKWARD, None)
        base.pop(EXTRA_EXPERTS_ALL_GATHER, None)  # (the last layer's all-gather was issued)
        base[EXTRA_FSDP_BACKWARD_START] = x.fsdp_last_layer
        base[EXTRA_REENTRANT_OUTPUT] = x.reentrant_output
        if x.head_held_cast:
            base[EXTRA_HELD_CAST_GRADIENTS] = x.head_held_cast
        if TERM_ACTIVATIONS in base:  # the final norm's and the head's saved tensors are released by then
            base[TERM_ACTIVATIONS] -= min(x.after_layers, base[TERM_ACTIVATIONS])
        if TERM_AUTOCAST_COPIES in base:
            base[TERM_AUTOCAST_COPIES] -= min(x.head_cast, base[TERM_AUTOCAST_COPIES])
        # At its MLP's peak its output projection's backward has run: that projection's saved input and its weight's
        # cast released, its gradients and the final norm's made.
        mlp = {**base, EXTRA_LAYER_GRADIENTS: x.layer_gradients - x.released_at_last_mlp - x.received_output_gradient}
        if x.made_at_last_mlp:
            mlp[TERM_GRADIENTS] = mlp.get(TERM_GRADIENTS, 0) + x.made_at_last_mlp
        if TERM_AUTOCAST_COPIES in mlp:
            mlp[TERM_AUTOCAST_COPIES] -= min(x.last_output_cast, mlp[TERM_AUTOCAST_COPIES])
        if x.dense_last_layer and x.casts_at_mlp and mlp.get(EXTRA_RECOMPUTED_CASTS):
            mlp[EXTRA_RECOMPUTED_CASTS] = min(mlp[EXTRA_RECOMPUTED_CASTS], x.casts_at_mlp)
        others = [{**base, EXTRA_LAYER_GRADIENTS: at_attention},
                  {**base, EXTRA_LAYER_GRADIENTS: x.last_opening_gradients - x.received_output_gradient}]
        if x.mid_norm:
            # the norm between its MLP and its attention (Rule.mid_norm_transient), the MLP's activations released and
            # its gradients made: with --tp the norm's fp32 backward is whole while the MLP's transients are split
            # (measured on the fake process group: a --tp 2 --pp 2 first stage peaks there, beside the other
            # micro-batch's activations)
            mid = {**base, EXTRA_LAYER_GRADIENTS: x.mid_norm - x.last_layer_mlp - x.received_output_gradient}
            if x.made_at_mid_norm:  # (the MLP's gradients and the norms' after attention made by then)
                mid[TERM_GRADIENTS] = mid.get(TERM_GRADIENTS, 0) + x.made_at_mid_norm
                mid.pop(EXTRA_STAGE_FIRST_GRADIENT, None)
            others.append(mid)
        # (at the norm between MLP and attention: the MLP's held cast gradients, and on an FSDP2 stage its unsharded
        # gradients made)
        for name, (in_mlp, in_attention, at_mid) in ((EXTRA_FSDP_BACKWARD_START, x.fsdp_last_made),
                                                     (EXTRA_HELD_CAST_GRADIENTS, x.last_layer_held_casts)):
            if in_mlp or in_attention or at_mid:
                mlp[name] = mlp.get(name, 0) + in_mlp
                others[0][name] = others[0].get(name, 0) + in_attention
                if x.mid_norm:
                    others[-1][name] = others[-1].get(name, 0) + at_mid
        last = max([mlp, *others], key=lambda parts: sum(parts.values()))  # the first of equal moments
        released_casts = x.recomputed_casts - x.casts_at_attention if x.released_at_scores else 0
        if x.made_at_attention:
            # its attention's backward, beside the layer's gradients made by then (eager: without the casts of the
            # weights whose backward has run), where that is the larger: compared whole, as the MLP's moment counts
            # what its output projection's backward made and released
            attention = {**base, EXTRA_LAYER_GRADIENTS: at_attention}
            attention[TERM_GRADIENTS] = attention.get(TERM_GRADIENTS, 0) + x.made_at_attention
            # (--pp, a stage without the head: its first weight gradient, down_proj's, is among those made by then;
            # measured: a 1F1B fp32 stage whose attention backward, with CUDA's softmax temporary, is its peak)
            attention.pop(EXTRA_STAGE_FIRST_GRADIENT, None)
            attention[EXTRA_RECOMPUTED_CASTS] = x.recomputed_casts - released_casts
            if sum(attention.values()) > sum(last.values()):
                last = attention
        candidates.append((MOMENT_LAST_LAYER_BACKWARD, last))
    stepped = _alive(terms, lambda t: t.phases == BACKWARD_ONLY and t.name in _STEPPED_IN_BACKWARD)
    if TERM_OPTIMIZER_TEMPORARIES in stepped:
        # --optim-in-backward: a parameter's step in its gradient hook (its gradient, the step's temporaries), counted
        # as early as the head's, beside everything the forward saved but the loss's buffers (and, when that tensor is
        # the head's weight, its autocast copy, released by the head's backward before the hook runs).
        at_step = {**{k: v for k, v in start_terms.items() if k != TERM_LOSS_BUFFERS}, **whole_backward, **stepped}
        if TERM_AUTOCAST_COPIES in at_step:
            at_step[TERM_AUTOCAST_COPIES] -= min(x.largest_step_copy, at_step[TERM_AUTOCAST_COPIES])
        candidates.append((MOMENT_STEP_IN_BACKWARD, at_step))
    if x.head_backward:
        candidates.append((MOMENT_HEAD_BACKWARD, at_head))
    if x.ring_forward and x.recomputed_layer:
        # --cp, checkpointing: the last layer's recomputation reaches its ring attention (its MLP's part not yet made).
        recomputed = max(0, x.recomputed_layer - x.last_layer_mlp - x.after_attention)
        candidates.append((MOMENT_RING_RECOMPUTE, {**after_head, EXTRA_RECOMPUTED_LAYER: recomputed,
                                                  EXTRA_RING_ATTENTION: x.ring_forward}))
    if x.shared_gradient_sum:
        candidates.append((MOMENT_SHARED_GRADIENT_SUM, {**end, EXTRA_SHARED_GRADIENT_SUM: x.shared_gradient_sum}))
    if x.first_shared_sum:
        first = {**end, TERM_ACTIVATIONS: x.first_sum_activations, EXTRA_SHARED_GRADIENT_SUM: x.first_shared_sum}
        first[TERM_GRADIENTS] = first.get(TERM_GRADIENTS, 0) - x.first_sum_missing_gradients
        candidates.append((MOMENT_FIRST_SHARED_SUM, first))
    # Late in backward, the first layer's turn: nearly every gradient, its activations and gradient transients, at its
    # MLP's backward (every activation of the layer, its gradients but the output projection's not made yet) or at its
    # attention's (the MLP's activations released, its q, k and v gradients not made yet).
    # (Each point: the layer's activations, its gradient transients, its gradients not made yet, its weights' casts,
    # and the sharding's: with --ep its experts gathered, from its recomputation's MoE block to its experts' backward;
    # under FSDP2 its unsharded gradients made so far, reduce-scattered once its backward ends.)
    # (at its MLP's backward the output projection's cast is released with its backward)
    at_mlp, at_attention, at_mid = x.fsdp_made  # (FSDP2: the layer's unsharded gradients made by then)
    points = [(x.layer_activations + x.first_layer_context - x.released_at_mlp, x.layer_gradients, x.pending_at_mlp,
               x.casts_at_mlp, (x.experts_backward, at_mlp))]
    if x.attention_gradients:
        # (eager attention: the casts of the weights whose backward has run, its MLP's and o_proj's, released too)
        casts = x.casts_at_attention if x.released_at_scores else x.recomputed_casts
        points.append((x.layer_activations + x.first_layer_context - x.layer_mlp
                       - max(x.after_attention, x.released_at_scores),
                       x.attention_gradients,
                       x.pending_at_attention, casts, (0, at_attention)))
    if x.recomputed_forward:  # its recomputation's forward, at its largest (Rule.forward_transient)
        points.append((x.layer_activations + x.first_layer_context, x.recomputed_forward + x.layer_input_gradient,
                       x.pending_at_recompute, x.recomputed_casts, (x.experts_backward, 0)))
    if x.mid_norm:
        # the norm between its MLP and its attention (Rule.mid_norm_transient): the MLP's activations released, its
        # gradients made, none of the attention's and norms'
        points.append((x.layer_activations + x.first_layer_context - x.layer_mlp, x.mid_norm, x.pending_at_mid_norm,
                       x.casts_at_mid_norm, (0, at_mid)))
    if x.opening_gradients:  # its backward's first op (Rule.opening_transient): none of its gradients made yet
        points.append((x.layer_activations + x.first_layer_context, x.opening_gradients, x.pending_at_recompute,
                       x.recomputed_casts, (x.experts_backward, 0)))

    def unmade(pending: int) -> int:
        """What a moment lacks for the first layer's gradients not made yet: those gradients, or in a later
        micro-batch (they exist) their held casts' gradients."""
        if not x.gradients_made:
            return pending
        if not x.held_cast_gradients:
            return 0
        # (only cast weights have a cast's gradient: not a MoE layer's experts, which grouped_mm runs uncast)
        return min(pending // max(1, x.grad_bytes), x.first_layer_cast_numel) * x.cast_bytes

    layer_acts, layer_grads, pending, casts, (experts, made) = max(
        points, key=lambda point: point[0] + point[1] - unmade(point[2]) + point[3] + sum(point[4]))
    late_extra = (layer_acts + layer_grads + casts + experts + made + x.fsdp_late + x.head_gradient_late
                  - x.missing_gradients - unmade(pending))
    if x.layer_activations and late_extra > 0:
        late = {**{name: n for name, n in end.items() if name != EXTRA_LATER_EMBEDDING_GRADIENT},
                EXTRA_LAYER_ACTIVATIONS: layer_acts, EXTRA_LAYER_GRADIENTS: layer_grads,
                EXTRA_RECOMPUTED_CASTS: casts, EXTRA_HEAD_GRADIENT: x.head_gradient_late,
                EXTRA_EXPERTS_GATHERED: experts, EXTRA_FSDP_BACKWARD_START: x.fsdp_late + made,
                EXTRA_REENTRANT_OUTPUT: x.reentrant_output}
        if x.held_cast_gradients:  # (but those of the first layer's weights whose backward has not run)
            late[EXTRA_HELD_CAST_GRADIENTS] = max(0, x.held_cast_gradients - unmade(pending))
        late[TERM_GRADIENTS] = max(0, late.get(TERM_GRADIENTS, 0) - x.missing_gradients
                                   - (0 if x.gradients_made else pending))
        candidates.append((MOMENT_LATE_BACKWARD_SECOND if x.fsdp_late_second else MOMENT_LATE_BACKWARD, late))
        if any(x.fsdp_top):
            # (the same moment at the second layer from the top, layer L - 2: its own and the L - 2 lower layers'
            # checkpointed inputs kept, the top layer's sharded gradients made: named for that layer)
            more_inputs, made = x.fsdp_top
            candidates.append((MOMENT_SECOND_TO_LAST_BACKWARD, {**late, TERM_GRADIENTS: made,
                                                                EXTRA_LAYER_ACTIVATIONS: layer_acts + more_inputs}))
    if x.sharded_layer:
        # A sharded layer's backward (FSDP2): model states and the forward's unsharded buffers, that layer's
        # activations, its prefetched neighbour and its gradients being reduce-scattered.
        kept = _alive(terms, lambda t: Phase.forward in t.phases and Phase.backward in t.phases
                      and t.category != CATEGORY_ACTIVATIONS and t.name != TERM_AUTOCAST_COPIES)
        candidates.append((MOMENT_SHARDED_LAYER, {**kept, EXTRA_LAYER_ACTIVATIONS: x.layer_activations,
                                                  EXTRA_SHARDED_LAYER: x.sharded_layer,
                                                  EXTRA_HEAD_GRADIENT: x.head_gradient_late}))
    if x.fsdp_root_reduce:
        # FSDP2's last reduce-scatter, the root's (embeddings, final norm, head), at the end of backward: its parameters
        # resharded, its unsharded gradients and their copy in the reduce dtype beside every layer's sharded gradients
        # (measured: Llama-3-8B on the fake process group peaks there with bf16 recipes)
        root = {**_alive(terms, lambda t: Phase.backward in t.phases and t.name not in freed
                         and t.name != TERM_FSDP_UNSHARDED),
                EXTRA_FSDP_BACKWARD_START: x.fsdp_root_reduce}
        root[TERM_GRADIENTS] = max(0, root.get(TERM_GRADIENTS, 0) - x.fsdp_root_shards)
        candidates.append((MOMENT_ROOT_REDUCE, root))
    if x.experts_reduce:
        # --ep under FSDP2: the last layer's experts reduce-scatter their gradients once its MoE block's backward is done
        # (what that block saved released; its attention's and every earlier layer's still there)
        kept = _alive(terms, lambda t: Phase.forward in t.phases and Phase.backward in t.phases
                      and t.category != CATEGORY_ACTIVATIONS and t.name != TERM_AUTOCAST_COPIES)
        acts = start_terms.get(TERM_ACTIVATIONS, 0)
        kept[TERM_ACTIVATIONS] = max(0, acts - x.after_layers - x.last_layer_mlp)
        kept[EXTRA_EXPERTS_REDUCE] = x.experts_reduce
        candidates.append((MOMENT_EXPERTS_REDUCE, kept))
    if TERM_OPTIMIZER_TEMPORARIES in stepped:
        # The sums of a shared embedding's contributions come before its step's temporaries.
        for moment, parts in candidates:
            if moment in (MOMENT_SHARED_GRADIENT_SUM, MOMENT_FIRST_SHARED_SUM):
                for name in stepped:
                    if name != TERM_GRADIENTS:
                        parts.pop(name, None)
    backward = max((_total(moment, Phase.backward, parts, names) for moment, parts in candidates),
                   key=lambda total: total.bytes)  # the first of equal moments
    step = _alive(terms, lambda t: Phase.optimizer_step in t.phases)
    forward_total = _total(MOMENT_STAGE_FORWARD_END if TERM_PIPELINE_FORWARD_END in forward else MOMENT_FORWARD,
                           Phase.forward, forward, names)
    if x.experts_forward:
        # --ep under FSDP2: the last layer's experts gathered while its block runs (the loss not begun)
        moe = _alive(terms, lambda t: Phase.forward in t.phases and t.name not in _NOT_IN_LAYER)
        if TERM_ACTIVATIONS in moe:
            moe[TERM_ACTIVATIONS] -= min(x.after_layers, moe[TERM_ACTIVATIONS])
        moe[EXTRA_EXPERTS_GATHERED] = x.experts_forward
        forward_total = max(forward_total, _total(MOMENT_EXPERTS_FORWARD, Phase.forward, moe, names),
                            key=lambda total: total.bytes)
    if x.checkpointed_layer_forward:
        # A checkpointed layer's own forward: its tensors exist while it runs though none is kept (the loss's
        # buffers not yet), beside every earlier layer's kept input.
        layer = _alive(terms, lambda t: Phase.forward in t.phases and t.name not in _NOT_IN_LAYER)
        if TERM_ACTIVATIONS in layer:  # (the final norm's, the head's and the softcapping's saves: not made yet)
            layer[TERM_ACTIVATIONS] -= min(x.after_layers, layer[TERM_ACTIVATIONS])
        layer[EXTRA_RECOMPUTED_LAYER] = x.checkpointed_layer_forward
        # (FSDP2: beside the layer's unsharded parameters, the all-gather output they were copied out of, kept until
        # the next unit's; measured on the fake process group, a checkpointed fp32 layer's math-path attention read
        # 4.2% low without it)
        layer[EXTRA_FSDP_LAYER_ALL_GATHER] = x.layer_all_gather
        in_layer = _total(MOMENT_CHECKPOINTED_FORWARD, Phase.forward, layer, names)
        forward_total = max(forward_total, in_layer, key=lambda total: total.bytes)
    if x.ring_forward and not x.checkpointed_layer_forward:
        # --cp: the last layer's ring attention: every earlier layer's activations and its own attention inputs (not
        # yet its MLP's, the final norm's and head's, nor the loss's buffers) beside the ring's buffers. (Checkpointed:
        # the checkpointed layer's forward counts it.)
        ring = _alive(terms, lambda t: Phase.forward in t.phases and t.name not in _NOT_IN_LAYER)
        if TERM_ACTIVATIONS in ring:
            ring[TERM_ACTIVATIONS] -= min(x.after_layers + x.last_layer_mlp + x.after_attention,
                                          ring[TERM_ACTIVATIONS])
        ring[EXTRA_RING_ATTENTION] = x.ring_forward
        ring[EXTRA_FSDP_LAYER_ALL_GATHER] = x.layer_all_gather
        in_ring = _total(MOMENT_RING_FORWARD, Phase.forward, ring, names)
        forward_total = max(forward_total, in_ring, key=lambda total: total.bytes)
    return [forward_total, backward,
            _total(MOMENT_STEP, Phase.optimizer_step, step, names)]


def _traced_phase_totals(terms: Sequence[Term], x: _Extras, names: set[str]) -> list[PhaseTotal]:
    """The forward's and backward's largest moments from the traced step; the end of backward (every gradient) and
    the optimizer step from the terms."""
    forward = max((_traced(terms, m, names, x.in_backward) for m in x.step if m.phase == Phase.forward),
                  key=lambda t: t.bytes)
    end = _alive(terms, lambda t: Phase.backward in t.phases and t.name not in _FREED_BY_BACKWARD_END)
    candidates = [_traced(terms, m, names, x.in_backward) for m in x.step if m.phase == Phase.backward]
    candidates.append(_total(MOMENT_BACKWARD_END, Phase.backward, end, names))
    backward = max(candidates, key=lambda total: total.bytes)  # the first of equal moments
    step = _alive(terms, lambda t: Phase.optimizer_step in t.phases)
    return [forward, backward, _total(MOMENT_STEP, Phase.optimizer_step, step, names)]


FP8_SOURCE = ("torchao float8/float8_linear.py matmul_with_hp_or_float8_args: forward saves input_hp and weight_hp_t "
              "(the activations stay bf16) and casts both to float8; backward casts grad_output (for grad_input and, "
              "again, for grad_weight), the weight and the input; torchtitan's float8 converter leaves the output "
              "layer bf16")


def _fp8_converted(tensors: Sequence[ParamTensor]) -> list[ParamTensor]:
    """The Linear weights torchtitan's float8 converter converts (trainable.float8_converts)."""
    return [t for t in tensors if t.is_linear_weight and trainable.float8_converts(t.shape, t.role == ROLE_LM_HEAD)]


def _fp8_casts(tensors: Sequence[ParamTensor], spec: TrainingSpec) -> Term:
    """--fp8: the float8 copies one converted Linear makes at a time, at the largest (weight plus its input and
    output), counted in forward and backward alike (backward's are the larger: the forward's are a subset)."""
    tokens = spec.micro_batch_size * (spec.decoder_seq_len or spec.seq_len)
    best = 0
    for t in _fp8_converted(tensors):
        out_features, in_features = t.shape
        # backward: grad_output twice (its two layouts), the weight, the input; 1 B each (float8)
        casts = 2 * tokens * out_features + out_features * in_features + tokens * in_features
        if spec.fp8 == Fp8Recipe.rowwise:  # fp32 scales per row of each cast
            casts += BYTES_PER_FP32 * (2 * tokens + out_features + tokens)
        best = max(best, casts)
    return Term(name=TERM_FP8_CASTS, bytes=best,
                formula=f"the largest converted Linear's float8 casts: 2 x tokens x out + out x in + tokens x in "
                        f"x 1 B{' + fp32 row scales' if spec.fp8 == Fp8Recipe.rowwise else ''} ({tokens:,} tokens)",
                source=FP8_SOURCE, category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD)


def _optimizer_source(name: str) -> str:
    return {
        "adamw": "torch/optim/adamw.py + adam.py _init_group (exp_avg, exp_avg_sq = zeros_like(param))",
        "adam": "torch/optim/adam.py Adam._init_group (exp_avg, exp_avg_sq = zeros_like(param))",
        "sgd": "torch/optim/sgd.py: plain SGD keeps no state",
        "sgd-momentum": "torch/optim/sgd.py: momentum_buffer = clone(grad)",
        "lion": "Chen et al. 2023 (Lion), Algorithm 2: one exp_avg",
        "adafactor": "transformers/optimization.py Adafactor.step: factored row/col second moments for >= 2-D "
                     "tensors, full for 1-D, exp_avg only with beta1 (Shazeer & Stern 2018)",
        "adamw-8bit": "bitsandbytes/optim/optimizer.py Optimizer8bit.init_state: uint8 state1/state2 + fp32 "
                      "absmax per 256-element block; fp32 states below 4096 elements (Dettmers et al. 2022)",
        "paged-adamw": "bitsandbytes/optim/optimizer.py Optimizer2State.init_state (optim_bits 32): fp32 state1/state2; "
                       "get_state_buffer pages those of >= 1e5 elements (cudaMallocManaged)",
        "paged-adamw-8bit": "bitsandbytes Optimizer2State.init_state (optim_bits 8) as adamw-8bit; get_state_buffer pages "
                            "state1/state2 of >= 1e5 elements (cudaMallocManaged)",
        "torchao-adamw-8bit": "torchao/optim/adam.py _AdamBase._new_buffer + subclass_8bit.py OptimState8bit.zeros: uint8 "
                              "codes + fp32 scale per 256 elements + 256-entry fp32 qmap per state, for tensors of >= 4096 "
                              "elements divisible by 256; zeros_like(p) otherwise",
        "torchao-adamw-4bit": "torchao/optim/adam.py _AdamBase._new_buffer + subclass_4bit.py OptimState4bit.zeros: packed "
                              "4-bit codes (numel / 2 B) + fp32 scale per 128 elements + 16-entry fp32 qmap per state, for "
                              "tensors of >= 4096 elements divisible by 128; zeros_like(p) otherwise",
        "schedule-free-adamw": "schedulefree/adamw_schedulefree.py AdamWScheduleFree.step: z = clone(p), exp_avg_sq = "
                               "zeros_like(p) (Defazio et al. 2024)",
        "muon": "torch/optim/_muon.py Muon._init_group (momentum_buffer = zeros_like(grad)) for the blocks' 2-D weights; "
                "torch.optim.AdamW (exp_avg, exp_avg_sq) for embeddings, head, norms, biases (Keller Jordan's and "
                "Moonlight's recipes)",
        "adam-mini": "adam_mini 1.1.1 Adam_mini.step: m = zeros_like(p); vmean per head (q/k), per row (embeddings, "
                     "head, v, o, MLP) or per tensor; Adam's v for biases (Zhang et al. 2024)",
        "galore-adamw": "galore_torch 1.0 adamw.py AdamW.step + galore_projector.py: exp_avg, exp_avg_sq of the projected "
                        "r x max(m, n) gradient, the SVD projection (a view of U or Vh for fp32); AdamW elsewhere "
                        "(Zhao et al. 2024)",
        "apollo-adamw": "apollo_torch 1.0.3 apollo.py AdamW.step + random_projector.py: exp_avg, exp_avg_sq of the "
                        "projected r x max(m, n) gradient, a random r x min(m, n) projection, scaled_grad; AdamW "
                        "elsewhere (Zhu et al. 2024)",
        "soap": "nikhilvyas/SOAP soap.py SOAP.step + init_preconditioner: exp_avg, exp_avg_sq; fp32 GG and Q of d x d per "
                "dimension d <= max_precond_dim 10000 of a >= 2-D tensor (Vyas et al. 2024)",
    }[name]


def _as_run(recipe: Recipe, holdings: RankHoldings) -> Recipe:
    """The recipe as the engine runs it: FSDP2 with a MixedPrecisionPolicy keeps fp32 sharded parameters (they are
    the master copy: no separate one), gathers 16-bit copies for compute and reduces gradients in fp32. Megatron keeps
    its main gradients in fp32 (memcalc.megatron)."""
    if holdings.engine in ("megatron-ddp", "megatron-distopt"):
        mixed = recipe.master_dtype is not None
        return dataclasses.replace(recipe, grad_dtype=Dtype.fp32, description=(
            f"Megatron-LM {'--bf16: bf16 weights (Float16Module), ' if mixed else 'fp32: fp32 weights, '}fp32 main "
            f"gradients in one buffer{', fp32 main parameters' if mixed else ''} and fp32 optimizer states"
            + (" (this rank's range: its distributed optimizer)" if holdings.engine == "megatron-distopt" else "")))
    if (holdings.engine not in ("fsdp2", parallel.ENGINE_FSDP2_PIPELINE)
            or holdings.bytes_per_weight_override != BYTES_PER_FP32):
        return recipe
    low = recipe.compute_dtype.value
    return dataclasses.replace(
        recipe, weight_dtype=Dtype.fp32, master_dtype=None, grad_dtype=Dtype.fp32,
        description=f"FSDP2 MixedPrecisionPolicy(param_dtype={low}, reduce_dtype=fp32): the fp32 sharded parameters are "
                    f"the master copy (no separate one), {low} copies are gathered for compute, gradients are reduced "
                    "in fp32, fp32 optimizer states")


def _training_summary(spec: TrainingSpec, recipe: Recipe, opt, defaults_used: Sequence[str],
                      activations_source: str) -> TrainingSummary:
    return TrainingSummary(
        precision=recipe.name, precision_description=recipe.description,
        weight_dtype=recipe.weight_dtype.value,
        master_dtype=recipe.master_dtype.value if recipe.master_dtype else None,
        grad_dtype=recipe.grad_dtype.value, state_dtype=recipe.state_dtype.value,
        compute_dtype=recipe.compute_dtype.value,
        optimizer=opt.name.value, optimizer_description=opt.describe(), optim_impl=opt.impl.value,
        micro_batch_size=spec.micro_batch_size, seq_len=spec.seq_len, grad_accum=spec.grad_accum, checkpointing=spec.checkpointing_label,
        attention=spec.attention.value, activations=activations_source,
        zero_stage=spec.zero_stage, num_gpus=spec.num_gpus, num_nodes=spec.num_nodes,
        sharding=spec.sharding.value, offload=spec.offload.value,
        lora_rank=spec.lora_rank, lora_targets=list(spec.lora_targets) if spec.lora_targets else None,
        qlora=spec.qlora, freeze=list(spec.freeze), defaults_used=list(defaults_used),
        loss=spec.loss_label, optim_in_backward=spec.optim_in_backward, activation_offload=spec.activation_offload.value,
        compile=spec.compile, repeat_kv=spec.repeat_kv, padded=spec.padded, fp8=spec.fp8.value,
        tp=spec.tp, sequence_parallel=spec.sequence_parallel, loss_parallel=spec.loss_parallel,
        pp=spec.pp, pp_schedule=spec.pp_schedule.value, microbatches=spec.microbatches, pp_stage=spec.pp_stage,
        pp_virtual=spec.pp_virtual or 1,
        cp=spec.cp, ep=spec.ep, ep_load=spec.ep_load, ep_shard_dim=spec.ep_shard_dim, dp_replicate=spec.dp_replicate,
    )
