"""Tensor parallelism measured: PyTorch's own parallel APIs on the real transformers model, one rank of a fake (or
gloo) process group.

The plan is torchtitan's for Llama (torchtitan models/llama3/infra/parallelize.py ``apply_tp``), adapted to
transformers' module names:

  embed_tokens                 RowwiseParallel: the vocabulary split (weight Shard(0)), its output all-reduced to
                               every rank (Replicate), or reduce-scattered along the sequence with sequence parallelism
  q_proj, k_proj, v_proj,      ColwiseParallel: output features split (weight and bias Shard(0)), so each rank runs
  gate_proj, up_proj           heads / tp attention heads (kv heads / tp) and intermediate / tp MLP features
  o_proj, down_proj            RowwiseParallel: input features split (weight Shard(1)), the output's partial sums
                               all-reduced (Replicate) or reduce-scattered along the sequence (Shard(1))
  norms (sequence parallel)    SequenceParallel: each rank normalizes its slice of the sequence; attention's and the
                               MLP's inputs are all-gathered first (PrepareModuleInput, Shard(1) -> Replicate)
  lm_head                      ColwiseParallel: the vocabulary split; its output all-gathered (Replicate) unless
                               loss parallelism keeps it split (Shard(-1)) into the loss (``loss_parallel()``)
  mlp (MoE blocks)             torchtitan's apply_moe_ep_tp without expert parallelism (``_moe_plan``,
                               ``_split_experts``): the router replicated, every expert's features split, the block's
                               output the partial sums; with --ep the experts whole, for transformers' EP plan

Each rank runs the same micro-batch (the tensor-parallel group shares it). With sequence parallelism the model is
given ``position_ids`` (transformers would derive them from the embeddings' local, split length).
"""

from __future__ import annotations

import contextlib
from typing import Any

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def _norms_of(layer: Any) -> list[str]:
    import torch

    return [name for name, module in layer.named_children()
            if name.endswith("norm") and not any(isinstance(m, torch.nn.Linear) for m in module.modules())]


def parallelize(model: Any, mesh: Any, sequence_parallel: bool, loss_parallel: bool,
                experts_parallel: bool = False) -> dict[str, Any]:
    """Apply the plan to a transformers causal LM of the Llama layout in place; what was done, for the record.
    ``experts_parallel``: the experts are left whole for transformers' expert-parallel plan (``_moe_plan``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from memcalc.measure.build import decoder_layers

    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # the residual stream between layers
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    top = {
        _path(model, model.get_input_embeddings()): RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                                                    use_local_output=not sp),
        _path(model, model.get_output_embeddings()): ColwiseParallel(
            input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel),
    }
    if sp and hasattr(base, "norm"):
        top[_path(model, base.norm)] = SequenceParallel()
    parallelize_module(model, mesh, top)
    layers = decoder_layers(model)
    moe_layers = 0
    for layer in layers:
        plan: dict[str, Any] = {}
        experts = getattr(layer.mlp, "experts", None)
        for block in ("self_attn", "mlp"):
            inner = getattr(layer, block)
            for name, _module in inner.named_children():
                if name in COLWISE:
                    plan[f"{block}.{name}"] = ColwiseParallel()
                elif name in ROWWISE:
                    plan[f"{block}.{name}"] = RowwiseParallel(output_layouts=stream, use_local_output=not sp)
        if experts is not None:
            moe_layers += 1
            plan.update(_moe_plan(layer.mlp, sp, experts_parallel))
        if sp:
            for name in _norms_of(layer):
                plan[name] = SequenceParallel()
            plan["self_attn"] = PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                   desired_input_kwarg_layouts={"hidden_states": Replicate()})
            if experts is None:
                plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        parallelize_module(layer, mesh, plan)
        if experts is not None and not experts_parallel:
            _split_experts(experts, mesh)
    replicated = _replicate_the_rest(model, mesh, skip=[layer.mlp.experts for layer in layers
                                                        if experts_parallel and hasattr(layer.mlp, "experts")])
    moe = ("" if not moe_layers else ", the experts whole for transformers' EP plan" if experts_parallel
           else ", apply_moe_ep_tp (MoE blocks: TensorParallel experts)")
    return {"plan": f"torchtitan apply_tp (Llama){moe}, transformers' module names",
            "sequence_parallel": sp,
            "replicated": replicated,
            "loss_parallel": loss_parallel, "tp_layers": len(layers), "tp_moe_layers": moe_layers}


def _moe_plan(mlp: Any, sp: bool, experts_parallel: bool) -> dict[str, Any]:
    """torchtitan's plan for a MoE block under tensor parallelism (apply_moe_ep_tp, without expert parallelism), on
    transformers' names: every rank routes all the block's tokens (the router replicated, torchtitan's NoParallel:
    ``_replicate_the_rest``), runs its share of every expert's features and of the shared expert's (colwise gate and
    up, rowwise down with Partial output), and the block's output is the partial sums, all-reduced (Replicate), or
    reduce-scattered along the sequence with sequence parallelism (its input all-gathered first).

    ``experts_parallel`` (--ep with --tp): transformers' layout instead, where the experts' AllToAllEP slices the
    tokens over the tp ranks and all-gathers their outputs (a Replicate result): the shared expert's output is
    all-reduced on its own (RowwiseParallel's default), and with sequence parallelism the block's output is the
    rank's chunk of it."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInputOutput, RowwiseParallel

    output = Replicate() if experts_parallel else Partial()
    plan: dict[str, Any] = {}
    if sp or not experts_parallel:
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1) if sp else Replicate(),), desired_input_layouts=(Replicate(),),
            use_local_input=True, output_layouts=(output,), desired_output_layouts=(Shard(1) if sp else Replicate(),),
            use_local_output=not sp)
    shared = getattr(mlp, "shared_expert", None)
    if shared is not None:
        for name, _module in shared.named_children():
            if name in COLWISE:
                plan[f"mlp.shared_expert.{name}"] = ColwiseParallel()
            elif name in ROWWISE:
                plan[f"mlp.shared_expert.{name}"] = RowwiseParallel(output_layouts=output)
    return plan


def _split_experts(experts: Any, mesh: Any) -> None:
    """torchtitan's TensorParallel on the experts (torchtitan/distributed/expert_parallel.py): each expert's gate and
    up features split (``gate_up_proj`` Shard(1)) and its down projection's inputs (``down_proj`` Shard(2)); the
    experts run on the local shards (GroupedExperts.forward's ``to_local``) and give each rank's partial sums.
    transformers fuses gate and up in one tensor, so its rows are put in the order [gate 0, up 0, gate 1, up 1, ...]
    first: rank r's Shard(1) chunk is then its gate and up features, which the forward's chunk(2) pairs."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    tp = mesh.size()
    with torch.no_grad():
        num_experts, two_i, h = experts.gate_up_proj.shape
        ordered = (experts.gate_up_proj.view(num_experts, 2, tp, two_i // (2 * tp), h).transpose(1, 2)
                   .reshape(num_experts, two_i, h))
        gate_up = torch.nn.Parameter(distribute_tensor(ordered, mesh, [Shard(1)]))
        down = torch.nn.Parameter(distribute_tensor(experts.down_proj.detach(), mesh, [Shard(2)]))
    experts.gate_up_proj, experts.down_proj = gate_up, down
    original = experts.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        from torch.nn.utils.stateless import _reparametrize_module

        local = {name: p.to_local() for name, p in experts.named_parameters(recurse=False)}
        with _reparametrize_module(experts, local):
            return original(*args, **kwargs)

    experts.forward = forward


def _replicate_the_rest(model: Any, mesh: Any, skip: list[Any]) -> list[str]:
    """Modules whose own parameters no style split (the norms without sequence parallelism, per-head q/k norms):
    their parameters become Replicate DTensors, their inputs and outputs stay local tensors (torchtitan's former
    NoParallel style), so the optimizer steps one kind of tensor. ``skip``: modules another plan splits (the experts
    under expert parallelism)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def to_dtensor(_module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                     if _is_plain(x) else x for x in inputs)

    def to_local(_module, outputs, _device_mesh):
        if isinstance(outputs, tuple):  # (a MoE router's logits, weights and indices)
            return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    done = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and any(not isinstance(p, DTensor) for p in own) and not any(module is m for m in skip):
            distribute_module(module, mesh, None, to_dtensor, to_local)
            done.append(name)
    return done


def _is_plain(x: Any) -> bool:
    import torch
    from torch.distributed.tensor import DTensor

    return isinstance(x, torch.Tensor) and not isinstance(x, DTensor)


def _path(model: Any, module: Any) -> str:
    return next(name for name, m in model.named_modules() if m is module)


class Runner:
    """Calls the model as the step does, adding position_ids under sequence parallelism (the distributed measurement
    runs the step inside ``loss_parallel()`` when the loss takes the split logits)."""

    def __init__(self, model: Any, sequence_parallel: bool) -> None:
        self.model, self.sp = model, sequence_parallel

    def __call__(self, **batch: Any) -> Any:
        import torch

        if self.sp and "position_ids" not in batch:
            seq = batch["input_ids"].shape[1]
            batch = {**batch, "position_ids": torch.arange(seq, device=batch["input_ids"].device).unsqueeze(0)}
        return self.model(**batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def wrap(model: Any, setup: Any, mesh: Any, sequence_parallel: bool, loss_parallel: bool,
         dist_info: dict[str, Any]) -> tuple[Any, Any]:
    """The distributed measurement's runner and stepper for a tensor-parallel rank."""
    from memcalc.measure.step import Stepper

    dist_info.update(parallelize(model, mesh, sequence_parallel, loss_parallel))
    return Runner(model, sequence_parallel), Stepper(model, setup)


@contextlib.contextmanager
def untracked_propagation(tracker: Any):
    """While the block runs, the ops DTensor's sharding propagation runs on stand-ins of the global shapes
    (``ShardingPropagator._propagate_tensor_meta_non_cached``: fake tensors of its own on a GPU, which hold no
    memory; under memcalc's FakeTensorMode they would be counted) pass the tracker by."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def untracked(self, *args, **kwargs):
        tracker.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.paused -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = untracked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original
