"""Combine inventory, recipe, optimizer and sharding into named per-GPU terms, phases and a peak.

Pure functions: no printing, no I/O. Every term carries its formula (numbers substituted) and source, and the
phases it is alive in. The peak of a steady-state step (optimizer states exist from the first step on) is
the largest of these moments:
  forward          every forward-phase term, plus the loss transient (logits and their fp32 upcast)
  backward start   what the forward saved, plus the loss gradients (or, checkpointing, one recomputed layer)
  backward end     weights, master, states and every gradient
  late backward    nearly every gradient, the first layer's activations and gradient transients
  sharded layer    FSDP2: a layer's backward with its prefetched neighbour and reduce-scatter buffers
  optimizer step   model states, gradients, the fp32 gradient copy and the optimizer's temporaries
The sum of all terms is not the peak: activations are gone before the optimizer step's temporaries appear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from memcalc import activations, trainable
from memcalc.model import (
    ROLE_EMBEDDING,
    ROLE_EXPERT,
    ROLE_POSITION_EMBEDDING,
    ParamTensor,
    head_tied_to_embedding,
    token_embedding,
)
from memcalc.optimizers import state_bytes_by_kind, step_temporary_bytes
from memcalc.parallel import RankHoldings, rank_holdings
from memcalc.precision import BYTES_PER_DTYPE, Dtype, Recipe, get_recipe
from memcalc.report import ModelSummary, PerGpu, PhaseTotal, Report, Totals, TrainingSummary
from memcalc.resolve import ModelInput
from memcalc.spec import TrainingSpec
from memcalc.units import BYTES_PER_FP32
from memcalc.vocab import (
    ALL_PHASES,
    BACKWARD_AND_STEP,
    BACKWARD_ONLY,
    CATEGORY_ACTIVATIONS,
    CATEGORY_CPU_OFFLOAD,
    CATEGORY_MODEL_STATES,
    CATEGORY_TEMPORARIES,
    EXTRA_LAYER_ACTIVATIONS,
    EXTRA_LAYER_GRADIENTS,
    EXTRA_LOSS_GRADIENTS,
    EXTRA_LOSS_LOGITS,
    EXTRA_RECOMPUTED_CASTS,
    EXTRA_RECOMPUTED_LAYER,
    EXTRA_SHARDED_LAYER,
    FORWARD_BACKWARD,
    FORWARD_ONLY,
    MODEL_STATE_TERMS,
    MOMENT_BACKWARD_END,
    MOMENT_BACKWARD_START,
    MOMENT_FORWARD,
    MOMENT_LATE_BACKWARD,
    MOMENT_SHARDED_LAYER,
    MOMENT_STEP,
    STEP_ONLY,
    TERM_ACTIVATIONS,
    TERM_AUTOCAST_CHECKPOINTED,
    TERM_AUTOCAST_COPIES,
    TERM_FSDP_REDUCE_SCATTER,
    TERM_GRADIENTS,
    TERM_LOSS_BUFFERS,
    TERM_MASTER,
    TERM_MASTER_GRAD_COPY,
    TERM_OFFLOADED_PARAMS,
    TERM_OPTIMIZER_STATES,
    TERM_OPTIMIZER_TEMPORARIES,
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


def estimate(model: ModelInput, spec: TrainingSpec, defaults_used: Sequence[str] = ()) -> Report:
    recipe = get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)
    notes: list[str] = list(model.notes)
    subset = trainable.apply(model, spec)
    notes.extend(subset.notes)
    tensors = subset.tensors
    notes.extend(_moe_notes(model, tensors))
    bytes_per_weight, bytes_per_grad = _bytes_per(recipe.weight_dtype), _bytes_per(recipe.grad_dtype)
    holdings = rank_holdings(tensors, spec, recipe.master_dtype, model.architecture_known, bytes_per_weight, bytes_per_grad)
    notes.extend(holdings.notes)
    stage, num_gpus = holdings.effective_stage, spec.num_gpus
    sharded = " (this GPU's shard)" if stage else ""
    bytes_per_weight = holdings.bytes_per_weight_override or bytes_per_weight
    bytes_per_grad = holdings.bytes_per_grad_override or bytes_per_grad
    on_cpu = holdings.optimizer_on_cpu

    terms: list[Term] = []
    weight_dtype = "fp32" if holdings.bytes_per_weight_override == BYTES_PER_FP32 else recipe.weight_dtype.value
    terms.append(Term(
        name=TERM_WEIGHTS, bytes=subset.weight_bytes(holdings.weight_numel, bytes_per_weight),
        formula=subset.weight_formula(holdings.weight_numel, bytes_per_weight, weight_dtype, stage == 3, num_gpus),
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
    grad_phases = ALL_PHASES if spec.grad_accum > 1 else BACKWARD_AND_STEP
    if holdings.grads_held == "gpu-backward":
        grad_phases = FORWARD_BACKWARD if spec.grad_accum > 1 else BACKWARD_ONLY
    if spec.grad_accum > 1:
        notes.append(f"--grad-accum {spec.grad_accum}: gradients stay alive through the forward and backward of "
                     "micro-batches 2 onward (counted); activations are per micro-batch and do not grow")
    grad_dtype = "fp32" if holdings.bytes_per_grad_override == BYTES_PER_FP32 else recipe.grad_dtype.value
    grads_on_cpu = holdings.grads_held == "cpu"
    terms.append(Term(
        name=TERM_GRADIENTS, bytes=holdings.grad_numel * bytes_per_grad,
        formula=f"{_n(holdings.grad_numel)} trainable params{' (partition)' if stage >= 2 else ''} x {bytes_per_grad} B "
                f"({grad_dtype}){' in CPU RAM' if grads_on_cpu else ''}",
        source=holdings.grads_source or (ZERO_PAPER if stage >= 2 else
                                         "one gradient per trainable parameter, in the grad dtype (param.grad)"),
        category=CATEGORY_CPU_OFFLOAD if grads_on_cpu else CATEGORY_MODEL_STATES,
        phases=[] if grads_on_cpu else grad_phases,
    ))
    opt = spec.optimizer_settings
    opt_param_dtype = recipe.optimizer_param_dtype
    states = state_bytes_by_kind(holdings.optimizer_shapes, opt, recipe.state_dtype)
    terms.append(Term(
        name=TERM_OPTIMIZER_STATES, bytes=sum(states.values()),
        formula=" + ".join(f"{kind} {_n(b)} B" for kind, b in states.items()) or "no state",
        source=_optimizer_source(opt.name.value) + (f"; {holdings.engine} partition of this GPU" if stage else ""),
        category=CATEGORY_CPU_OFFLOAD if on_cpu else CATEGORY_MODEL_STATES, phases=[] if on_cpu else ALL_PHASES, breakdown=states,
    ))
    # -- working memory of forward and backward ---------------------------------------------------------
    if recipe.autocast:
        copy_numel = subset.autocast_copy_numel
        bytes_per_compute = _bytes_per(recipe.compute_dtype)
        terms.append(Term(
            name=TERM_AUTOCAST_COPIES, bytes=copy_numel * bytes_per_compute,
            formula=f"{_n(copy_numel)} Linear weight params x {bytes_per_compute} B ({recipe.compute_dtype.value})",
            source="torch.autocast casts each Linear weight once per forward (weight cache) and linear saves "
                   "the cast copy for backward; seed 004 counts it as 6 B/param (4 fp32 + 2 copy)",
            category=CATEGORY_TEMPORARIES, phases=FORWARD_BACKWARD,
        ))
        if subset.autocast_forward_only_numel:
            in_layers = subset.autocast_forward_only_numel
            terms.append(Term(
                name=TERM_AUTOCAST_CHECKPOINTED, bytes=in_layers * bytes_per_compute,
                formula=f"{_n(in_layers)} Linear weight params of the checkpointed layers x {bytes_per_compute} B",
                source="torch.autocast's weight cache keeps every cast until the autocast context exits (after the "
                       "loss); checkpointing drops them from the saved tensors, so they are gone in backward",
                category=CATEGORY_TEMPORARIES, phases=FORWARD_ONLY,
            ))
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
    if num_gpus > 1:
        notes.append(f"data parallelism: each of the {num_gpus} GPUs runs its own micro-batch, so activations per "
                     "GPU do not shrink (tensor and pipeline parallelism are not modelled)")
    terms.extend(act.terms)
    # -- optimizer step ------------------------------------------------------------------------------------
    if holdings.master_numel and holdings.fp32_grad_copy and recipe.grad_dtype != recipe.master_dtype:
        copy = holdings.master_numel * _bytes_per(recipe.master_dtype)
        terms.append(Term(
            name=TERM_MASTER_GRAD_COPY, bytes=copy,
            formula=f"{_n(holdings.master_numel)} trainable params{' (partition)' if stage else ''} x {_bytes_per(recipe.master_dtype)} B",
            source="the optimizer steps the fp32 master with fp32 gradients: DeepSpeed stage_1_and_2.py step() "
                   "casts the rank's 16-bit gradient partition to fp32 for the step and frees it after"
                   + ("; with offload it is a pinned CPU buffer (initialize_optimizer_states)" if on_cpu else ""),
            category=CATEGORY_CPU_OFFLOAD if on_cpu else CATEGORY_TEMPORARIES, phases=[] if on_cpu else STEP_ONLY,
        ))
    temp, rule = step_temporary_bytes(holdings.optimizer_shapes, opt, opt_param_dtype, recipe.state_dtype)
    if on_cpu:
        temp, rule = 0, "the step runs on the CPU (DeepSpeedCPUAdam): no GPU temporaries"
    terms.append(Term(
        name=TERM_OPTIMIZER_TEMPORARIES, bytes=temp, formula=rule,
        source="torch/optim/adam.py (_multi_tensor_adam, _single_tensor_adam); transformers Adafactor.step",
        category=CATEGORY_TEMPORARIES, phases=STEP_ONLY,
    ))

    # A recomputed layer under autocast also redoes its weight casts.
    autocast_recompute = subset.autocast_recompute_numel * _bytes_per(recipe.compute_dtype) if recipe.autocast else 0
    # Late in backward, the gradients still missing are those of the input embeddings (their backward runs
    # last) unless the embedding is tied to the head; ZeRO-2/3 hold flat partitions instead, so not there.
    missing_grads = _embedding_grads_produced_last(tensors) * bytes_per_grad if stage < 2 and spec.grad_accum == 1 else 0
    phases = _phase_totals(terms, _Extras(
        loss_logits=act.forward_transient_extra_bytes, loss_gradients=act.backward_start_extra_bytes,
        recomputed_layer=act.recompute_bytes, recomputed_casts=autocast_recompute,
        layer_activations=act.last_layer_bytes, layer_gradients=act.layer_backward_transient_bytes,
        missing_gradients=missing_grads,
        sharded_layer=holdings.mid_backward_extra_bytes))
    peak = max(phases, key=lambda p: p.bytes)
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


def _embedding_grads_produced_last(tensors: Sequence[ParamTensor]) -> int:
    """Elements of input-embedding gradients, which appear only at the very end of backward.

    A token embedding tied to the head already has its gradient from the head's backward, first of all.
    """
    tied = token_embedding(tensors) if head_tied_to_embedding(tensors) else None
    return sum(t.numel for t in tensors if t.trainable and t.layer is None and t is not tied
               and t.role in (ROLE_EMBEDDING, ROLE_POSITION_EMBEDDING))


@dataclass(eq=False, repr=False)
class _Extras:
    """Bytes alive at moments of the step that are not whole terms (see the module docstring)."""

    loss_logits: int = 0  # forward: the logits and their fp32 upcast during the loss
    loss_gradients: int = 0  # start of backward: the loss's gradient buffers
    recomputed_layer: int = 0  # checkpointing: one layer's activations rebuilt during backward
    recomputed_casts: int = 0  # ... and, under autocast, that layer's weight casts
    layer_activations: int = 0  # late backward: the first layer's activations (0: not modelled)
    layer_gradients: int = 0  # late backward: the first layer's gradient transients
    missing_gradients: int = 0  # late backward: the input embeddings' gradients, produced last
    sharded_layer: int = 0  # FSDP2: a layer's prefetched neighbour, unsharded gradients and their copies


# Terms alive during one unit's backward only (a unit's full gradients before their reduce-scatter): gone at the
# end of backward, and not yet there at its start.
_PER_UNIT_BACKWARD = (TERM_ZERO3_GATHERED_GRADS, TERM_FSDP_REDUCE_SCATTER)
_FREED_BY_BACKWARD_END = (TERM_ACTIVATIONS, TERM_LOSS_BUFFERS, TERM_AUTOCAST_COPIES, *_PER_UNIT_BACKWARD)


def _alive(terms: Sequence[Term], keep) -> dict[str, int]:
    return {t.name: t.bytes for t in terms if keep(t)}


def _total(moment: str, phase: Phase, parts: dict[str, int], names: set[str]) -> PhaseTotal:
    parts = {name: num_bytes for name, num_bytes in parts.items() if num_bytes}
    total = sum(parts.values())
    states = parts.get(TERM_OPTIMIZER_STATES, 0) if phase != Phase.optimizer_step else 0
    return PhaseTotal(phase=phase, bytes=total, terms=[n for n in parts if n in names], first_step_bytes=total - states,
                      moment=moment, breakdown=parts)


def _phase_totals(terms: Sequence[Term], x: _Extras) -> list[PhaseTotal]:
    """The largest moment of each phase, with what is alive then. In CPU RAM terms are alive in no phase."""
    names = {t.name for t in terms}
    forward = _alive(terms, lambda t: Phase.forward in t.phases)
    forward[EXTRA_LOSS_LOGITS] = x.loss_logits
    # Start of backward: what the forward saved (its terms still alive in backward), then either the loss
    # gradients or, a moment later (the head's backward done), buffers kept for the whole backward (DeepSpeed
    # ZeRO-1/2's reduce bucket, set up at the first gradient) beside one recomputed layer under checkpointing.
    start = _alive(terms, lambda t: Phase.forward in t.phases and t.phases != FORWARD_ONLY)
    # (Gradients alive in backward only - ZeRO-1-Offload's p.grad - build up through it: not there at its start.)
    whole_backward = _alive(terms, lambda t: t.phases == BACKWARD_ONLY
                            and t.name not in (*_PER_UNIT_BACKWARD, TERM_GRADIENTS))
    later = {**whole_backward, EXTRA_RECOMPUTED_LAYER: x.recomputed_layer, EXTRA_RECOMPUTED_CASTS: x.recomputed_casts}
    start.update(later if sum(later.values()) > x.loss_gradients else {EXTRA_LOSS_GRADIENTS: x.loss_gradients})
    # End of backward: activations, autocast copies and the units' full gradients are freed, every gradient exists.
    end = _alive(terms, lambda t: Phase.backward in t.phases and t.name not in _FREED_BY_BACKWARD_END)
    candidates = [(MOMENT_BACKWARD_START, start), (MOMENT_BACKWARD_END, end)]
    late_extra = x.layer_activations + x.layer_gradients + x.recomputed_casts - x.missing_gradients
    if x.layer_activations and late_extra > 0:
        # Late in backward: nearly every gradient, the first layer's activations and gradient transients.
        late = {**end, EXTRA_LAYER_ACTIVATIONS: x.layer_activations, EXTRA_LAYER_GRADIENTS: x.layer_gradients,
                EXTRA_RECOMPUTED_CASTS: x.recomputed_casts}
        late[TERM_GRADIENTS] = late.get(TERM_GRADIENTS, 0) - x.missing_gradients
        candidates.append((MOMENT_LATE_BACKWARD, late))
    if x.sharded_layer:
        # A sharded layer's backward (FSDP2): model states and the forward's unsharded buffers, that layer's
        # activations, its prefetched neighbour and its gradients being reduce-scattered.
        kept = _alive(terms, lambda t: Phase.forward in t.phases and Phase.backward in t.phases
                      and t.category != CATEGORY_ACTIVATIONS and t.name != TERM_AUTOCAST_COPIES)
        candidates.append((MOMENT_SHARDED_LAYER, {**kept, EXTRA_LAYER_ACTIVATIONS: x.layer_activations,
                                                  EXTRA_SHARDED_LAYER: x.sharded_layer}))
    backward = max((_total(moment, Phase.backward, parts, names) for moment, parts in candidates),
                   key=lambda total: total.bytes)  # the first of equal moments
    step = _alive(terms, lambda t: Phase.optimizer_step in t.phases)
    return [_total(MOMENT_FORWARD, Phase.forward, forward, names), backward,
            _total(MOMENT_STEP, Phase.optimizer_step, step, names)]


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
    }[name]


def _as_run(recipe: Recipe, holdings: RankHoldings) -> Recipe:
    """The recipe as the engine runs it: FSDP2 with a MixedPrecisionPolicy keeps fp32 sharded parameters (they are
    the master copy: no separate one), gathers 16-bit copies for compute and reduces gradients in fp32."""
    if holdings.engine != "fsdp2" or holdings.bytes_per_weight_override != BYTES_PER_FP32:
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
        micro_batch_size=spec.micro_batch_size, seq_len=spec.seq_len, grad_accum=spec.grad_accum, checkpointing=spec.checkpointing.value,
        attention=spec.attention.value, activations=activations_source,
        zero_stage=spec.zero_stage, num_gpus=spec.num_gpus, num_nodes=spec.num_nodes,
        sharding=spec.sharding.value, offload=spec.offload.value,
        lora_rank=spec.lora_rank, lora_targets=list(spec.lora_targets) if spec.lora_targets else None,
        qlora=spec.qlora, freeze=list(spec.freeze), defaults_used=list(defaults_used),
    )
