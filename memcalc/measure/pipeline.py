"""Pipeline parallelism measured: ``torch.distributed.pipelining`` stages of the real transformers model, on real gloo
ranks of this CPU exchanging real tensors, or each stage alone on the fake process group under FakeTensorMode (a
preset at full size; see ``measure_stage``).

Each rank builds the whole model, keeps its stage (torchtitan's split, memcalc.pipeline.stage_ranges: the first stage
the token embedding and its layers, the last its layers, the final norm and the head) inside a small module that runs
the stage as the transformers class runs those parts (the rotary tables from the positions on every stage, causal
attention without a mask), wraps it in a ``PipelineStage`` and runs a warm-up and a measured step of the schedule
(``ScheduleGPipe`` or ``Schedule1F1B``: ``n_microbatches`` micro-batches of ``micro_batch_size`` samples) and the
optimizer under memcalc's tensor tracker. The loss is transformers' ForCausalLMLoss on the last stage.
``ScheduleInterleaved1F1B``: each rank keeps several stages (stage s on rank s mod ranks, torchtitan's looped
split), one ``PipelineStage`` and one optimizer each (torchtitan's optimizers container: one per model part, stepped
in turn).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
             "zero-bubble": "ScheduleInterleavedZeroBubble"}


def stage_module(model: Any, start: int, end: int, first: bool, last: bool) -> Any:
    """The part of a Llama-layout causal LM one stage runs: [embedding] + layers[start:end] + [norm, head]."""
    import torch

    from memcalc.measure.build import decoder_layers

    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = decoder_layers(model)

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = model.get_input_embeddings() if first else None
            self.layers = torch.nn.ModuleList(layers[start:end])
            self.rotary = base.rotary_emb
            self.norm = base.norm if last else None
            self.head = model.get_output_embeddings() if last else None
            self.scale = getattr(base, "normalizer", None)  # (a Gemma-style embedding scale, where there is one)

        def forward(self, hidden: Any) -> Any:
            if self.embed is not None:
                hidden = self.embed(hidden)
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            position_embeddings = self.rotary(hidden, positions)
            for layer in self.layers:
                out = layer(hidden, attention_mask=None, position_ids=positions,
                            position_embeddings=position_embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
            if self.head is not None:
                hidden = self.head(self.norm(hidden))
            return hidden

    return Stage()


def causal_lm_loss(model: Any):
    """The last stage's loss_fn: transformers' ForCausalLMLoss on the stage's logits and the labels."""
    vocab = int(model.config.get_text_config().vocab_size)

    def loss_fn(logits: Any, labels: Any) -> Any:
        return model.loss_function(logits=logits, labels=labels, vocab_size=vocab)

    return loss_fn


def schedule_for(stages: list[Any], name: str, microbatches: int, loss_fn: Any) -> Any:
    from torch.distributed import pipelining

    schedule = getattr(pipelining, SCHEDULES[name])
    return schedule(stages if len(stages) > 1 or name in ("interleaved-1f1b", "zero-bubble") else stages[0], n_microbatches=microbatches,
                    loss_fn=loss_fn)


def measure_stage(job: Any, rank: int, tracker_class: Any, comm_buffers: str, seed: int, mesh: Any = None) -> Any:
    """One rank of the pipeline: its stage's warm-up and measured step (memcalc.measure.distributed's job, its
    tracker class, its category for communication buffers and its seed). On gloo ranks the stages exchange real
    tensors; on the fake process group (``job.fake``, under FakeTensorMode) each rank runs alone: its stage is given
    the shapes it sends and receives (``PipelineStage``'s static ``input_args``/``output_args`` and gradients, so no
    metadata is exchanged), the schedule's warm-up vote is skipped for the static mode it would choose, and the
    sends and receives move nothing. ``job.pp_dp`` > 1: a (pp, dp) ``mesh``; each stage's layers and the stage itself
    are FSDP2 units over its dp ranks (torchtitan's apply_fsdp), the stage's sends over the pp group. ``job.ep`` > 1:
    ``mesh`` is (the meshes by name: pp, efsdp, ep and dp, their flattening; a one-rank tensor-parallel mesh), and
    each stage's experts modules are split over ep and FSDP2 units over efsdp first (memcalc.measure.expert_parallel)."""
    import dataclasses
    import time

    import torch

    from memcalc.measure import fsdp
    from memcalc.measure.step import Stepper as StepperClass
    from memcalc.measure.step import (
        StepResult,
        _autocast,
        build_model,
        make_inputs,
        resolve_setup,
        storage_bytes,
        to_measurement,
    )

    DistTracker, trk, _ = tracker_class()
    started = time.perf_counter()
    spec = job.spec
    setup = resolve_setup(spec, job.attn_implementation, "cpu")
    policy = None
    sharded = job.pp_dp > 1
    if sharded:
        setup, policy = fsdp.fsdp_setup(setup)
    torch.manual_seed(seed)
    model = build_model(job.raw, setup)
    tp_info: dict[str, Any] = {}
    if job.pp_tp > 1:  # --tp: the whole model split over the stage's tensor-parallel group, then cut into stages
        from memcalc.measure.tensor_parallel import parallelize

        tp_info = parallelize(model, mesh["tp"], sequence_parallel=False, loss_parallel=False)
    num_stages = len(job.stages)
    pp_rank, pp_ranks = (rank // (job.pp_dp * job.pp_tp), job.world_size // (job.pp_dp * job.pp_tp))
    mine = list(range(pp_rank, num_stages, pp_ranks))  # (one stage per rank, or interleaved: looped)
    first, last = 0 in mine, num_stages - 1 in mine
    modules = [stage_module(model, *job.stages[s], s == 0, s == num_stages - 1) for s in mine]
    # (build_model has turned on transformers' checkpointing of each layer, as the spec says)
    received: list[int] = []  # --ep: the (token, expert) pairs this rank received, per experts forward
    ep_info: dict[str, Any] = {}
    if job.ep > 1:  # transformers' EP plan on each of the rank's stages, its experts FSDP2 units over efsdp
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from memcalc.measure.expert_parallel import parallelize

        mesh, tp_mesh = mesh
        for module in modules:
            if not any(name.endswith("mlp.experts") for name, _ in module.named_modules()):
                continue  # (a stage of dense layers only: Qwen2-MoE's mlp_only_layers)
            ep_info = parallelize(module, mesh["ep"], tp_mesh, mesh["efsdp"], policy or MixedPrecisionPolicy(),
                                  job.pp_dp, received, job.ep_shard_dim, job.reshard_after_forward)
    if sharded:
        _fully_shard_stages(modules, mesh["dp"], policy, job.reshard_after_forward)
    microbatches = job.microbatches
    ids = make_inputs(model, dataclasses.replace(setup, micro_batch_size=setup.micro_batch_size * microbatches))
    megatron = None
    if job.pp_runtime == "megatron":  # megatron-core's 1F1B schedule over the stage (no PipelineStage)
        from memcalc.measure.megatron_pipeline import megatron_runner

        stages: list[Any] = []
        weight = next(modules[0].parameters())
        megatron = megatron_runner(modules, ids, microbatches, setup.micro_batch_size,
                                   int(model.config.get_text_config().hidden_size), weight.dtype, first, last,
                                   causal_lm_loss(model))
    else:
        from torch.distributed.pipelining import PipelineStage

        group = {"group": mesh["pp"].get_group()} if sharded or job.pp_tp > 1 else {}
        stages = [PipelineStage(module, s, num_stages, torch.device("cpu"), **group,
                                **(_static_shapes(model, setup, s == 0, s == num_stages - 1) if job.fake else {}))
                  for module, s in zip(modules, mine, strict=True)]
        # (every rank gets the loss function: a schedule without one runs no backward)
        schedule = schedule_for(stages, job.pp_schedule, microbatches, causal_lm_loss(model))
    steppers = [StepperClass(module, setup) for module in modules]

    def ring() -> Any:
        """--cp: the stage's data-parallel ranks share each sequence, its attention the ring over them."""
        if job.cp == 1:
            return contextlib.nullcontext()
        from memcalc.measure.context_parallel import ring_attention

        return ring_attention(mesh["dp"].get_group())

    from memcalc.measure.cuda_semantics import kernels_like_cuda

    def run_schedule() -> None:
        # (return_outputs=False, as torchtitan's trainer steps: the last stage keeps no micro-batch's output for a
        # merged return)
        with _autocast(setup), ring(), kernels_like_cuda():
            if megatron is not None:
                megatron()
            elif first:
                schedule.step(ids, return_outputs=False)
            elif last:
                schedule.step(target=ids, return_outputs=False)
            else:
                schedule.step(return_outputs=False)

    def step() -> None:
        for stepper in steppers:
            stepper.step()

    def zero_grad() -> None:
        for stepper in steppers:
            stepper.zero_grad()

    with _static_warmup(job.fake):
        run_schedule()
    step()
    zero_grad()
    tracker = DistTracker()
    params = [fsdp.local(p) for module in modules for p in module.parameters()]
    masters = [m for stepper in steppers for m in stepper.masters]
    tracker.register(params, trk.WEIGHTS)
    tracker.register(masters, trk.MASTER)
    fsdp_params = [fp for module in modules for fp in fsdp.fsdp_params(module)] if sharded else []
    if fsdp_params:
        tracker.register([t for fp in fsdp_params for t in fp.all_gather_outputs], comm_buffers)
    tracker.register([b for module in modules for b in module.buffers()], trk.OTHER)
    tracker.register([ids], trk.OTHER)
    # The stage's receive buffers, one per micro-batch for the activations from the stage before and one for the
    # gradients from the stage after, made at the first step and kept (PipelineStage._prepare_forward_infra and
    # _prepare_backward_infra).
    tracker.register([b for stage in stages for b in recv_buffers(stage)], comm_buffers)
    if fsdp_params:
        tracker.watch_gradients([fp._unsharded_param for fp in fsdp_params if hasattr(fp, "_unsharded_param")],
                                fsdp.UNSHARDED_GRADIENTS)
    else:
        tracker.watch_gradients([p for module in modules for p in module.parameters()])
    for stepper in steppers:
        tracker.watch_optimizer(stepper.optimizer, stepper.fused)
    if last:
        tracker.loss_region(modules[-1].head)
    def mark_backward(_module: Any, _args: Any, output: Any) -> None:
        # (a hook on the output tensor, not a full backward hook: that one hands the schedule a view of the output,
        # which the zero-bubble schedule's stage_backward_input cannot detach in place)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda _grad: tracker.mark(trk.BACKWARD))

    hooks = [hook for module in modules for hook in (
        module.register_forward_pre_hook(lambda *_: tracker.mark(trk.FORWARD)),
        module.register_forward_hook(mark_backward))]
    grads: dict[str, int] = {}
    instrument = fsdp.instrument_fsdp(tracker) if fsdp_params else contextlib.nullcontext()
    if job.pp_tp > 1:  # (DTensor's sharding propagation allocates nothing on a device)
        from memcalc.measure.tensor_parallel import untracked_propagation

        instrument = untracked_propagation(tracker)
    # (as memcalc.measure.distributed's ranks do: Python's cyclic collector paused during the step, so every run frees
    # at the same moments)
    gc.collect()
    gc.disable()
    try:
        with _static_warmup(job.fake), instrument, tracker:
            run_schedule()
            local_grads = [fsdp.local(p.grad) for module in modules for p in module.parameters()
                           if p.grad is not None]
            if sharded:  # (the reduce-scatter outputs, made at the schedule's end: the sharded gradients)
                tracker.register(local_grads, trk.GRADIENTS)
            grads[trk.GRADIENTS] = storage_bytes(local_grads)
            tracker.mark(trk.OPTIMIZER_STEP)
            step()
            tracker.mark(trk.SETUP)
            zero_grad()
    finally:
        gc.enable()
        tracker.remove_hooks()
        for hook in hooks:
            hook.remove()
    states: dict[str, list[Any]] = {}
    for stepper in steppers:
        for key, tensors in stepper.state_tensors().items():
            states.setdefault(key, []).extend(tensors)
    result = StepResult(
        setup=setup, tracker=tracker, model_class=type(model).__name__,
        num_params=sum(p.numel() for module in modules for p in module.parameters()),  # (FSDP2: whole, not shards)
        model_state_bytes={trk.WEIGHTS: storage_bytes(params), trk.MASTER: storage_bytes(masters),
                           trk.GRADIENTS: grads.get(trk.GRADIENTS, 0),
                           trk.OPTIMIZER_STATES: storage_bytes(fsdp.local(t) for ts in states.values()
                                                               for t in ts)},
        optimizer_state_breakdown={k: storage_bytes(fsdp.local(t) for t in v) for k, v in states.items()},
        ops_seen=tracker.ops_seen, elapsed_seconds=time.perf_counter() - started,
    )
    measurement = to_measurement("cpu-tracker", result)
    layers = ", ".join(f"{job.stages[s][0]}-{job.stages[s][1] - 1}" for s in mine)
    measurement.run["distributed"] = {"engine": "pp", "stage": pp_rank, "stages": num_stages, "rank_stages": mine,
                                      "layers": [list(job.stages[s]) for s in mine] if len(mine) > 1
                                      else list(job.stages[pp_rank]),
                                      "schedule": job.pp_schedule, "microbatches": microbatches,
                                      "backend": "fake" if job.fake else "gloo", "rank": rank, "dp": job.pp_dp}
    if job.ep > 1:
        measurement.run["distributed"].update(ep_info, ep_received_pairs=list(received))
    if job.pp_tp > 1:
        measurement.run["distributed"].update(tp_info, engine="pp+tp", tp=job.pp_tp)
    if sharded:
        measurement.run["distributed"].update(
            engine="pp+fsdp2+ep" if job.ep > 1 else "pp+fsdp2", reshard_after_forward=job.reshard_after_forward,
            mixed_precision_policy=(f"param_dtype={str(policy.param_dtype).removeprefix('torch.')}, reduce_dtype="
                                    f"{str(policy.reduce_dtype).removeprefix('torch.')}") if policy else None)
    measurement.notes.append(f"pipeline rank {pp_rank}{f' (data-parallel rank {rank % job.pp_dp})' if sharded else ''}: stage{'s' if len(mine) > 1 else ''} "
                             f"{', '.join(map(str, mine))} of {num_stages}, decoder layers {layers}"
                             f"{', the embedding' if first else ''}{', the final norm, head and loss' if last else ''}")
    return measurement


def _fully_shard_stages(modules: list[Any], mesh: Any, policy: Any, reshard_after_forward: bool) -> None:
    """torchtitan's apply_fsdp on each model part: every decoder layer an FSDP2 unit, then the part itself (its
    embedding, or its final norm and head); reshard_after_forward as --zero says (torchtitan's default under PP:
    False, --zero 2)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = policy or MixedPrecisionPolicy()
    for module in modules:
        for layer in module.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)


def recv_buffers(stage: Any) -> list[Any]:
    """The tensors a PipelineStage keeps to receive into: activations and gradients, per micro-batch."""
    import torch

    found = []
    for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()):
        for info in infos:
            buffer = getattr(info, "buffer", None)
            if isinstance(buffer, torch.Tensor):
                found.append(buffer)
    return found


def _static_shapes(model: Any, setup: Any, first: bool, last: bool) -> dict[str, Any]:
    """What a stage receives and sends, and the gradients of both, as example tensors: token ids on the first stage,
    the hidden state between stages (in the residual stream's dtype: fp32 under autocast, else the weights'), the
    logits from the last (the head's output dtype)."""
    import torch

    config = model.config.get_text_config()
    b, s, h = setup.micro_batch_size, setup.seq_len, int(config.hidden_size)
    hidden = torch.empty(b, s, h, dtype=setup.weight_dtype, device=setup.device)
    logits_dtype = setup.autocast_dtype or setup.weight_dtype
    shapes = {"input_args": (torch.zeros(b, s, dtype=torch.long, device=setup.device) if first else hidden,),
              "output_args": (torch.empty(b, s, int(config.vocab_size), dtype=logits_dtype, device=setup.device)
                              if last else hidden,)}
    if not last:
        shapes["output_grads"] = (hidden,)
    if not first:
        shapes["input_grads"] = (hidden,)
    return shapes


@contextlib.contextmanager
def _static_warmup(fake: bool):
    """On the fake process group: the schedule's warm-up vote between neighbours (which reads the votes' values)
    replaced by the static mode a stage given its shapes would vote for."""
    if not fake:
        yield
        return
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining._utils import InferenceMode

    original = schedules._PipelineSchedule._warmup_p2p

    def static(_self, stages, _has_backward, _p2p_done):
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedules._PipelineSchedule._warmup_p2p = static
    try:
        yield
    finally:
        schedules._PipelineSchedule._warmup_p2p = original
