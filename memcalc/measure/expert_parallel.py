"""Expert parallelism on measured ranks: transformers' own EP styles on the real MoE class, under FSDP2.

transformers (distributed/expert_parallel.py, distributed/fsdp.py) runs a MoE model's experts expert-parallel as:
``grouped_gemm`` (MoEParamShard) shards each experts module's ``gate_up_proj`` and ``down_proj`` on dim 0, the
expert dimension, over the ``ep`` mesh; ``ep_dispatch_experts`` (EpDispatchExpertsParallel with AllToAllEP, what
``ep_implementation="auto"`` runs in training) sends each (token, expert) pair to the rank owning the expert with an
all-to-all and the outputs back with a second one; then FSDP2 shards each experts module over ``efsdp`` (the ranks
holding the same experts: world / ep) and every other unit over the whole world. memcalc applies the same styles
and the same ``fully_shard`` of the experts here, on memcalc's FSDP2 layout of the rest (every decoder layer, then
the root: memcalc.measure.distributed), so the measured rank is the estimate's rank.

The ranks are ``(efsdp, ep)``: the ep ranks of a group are consecutive (transformers' mesh: ep groups {0..ep-1},
{ep..2ep-1}, ...). Which rank receives how many routed tokens depends on the router; the step records, per MoE
layer, the pairs each rank received (``run["distributed"]["ep_received_pairs"]``), so the estimate can be set to
the routing that ran.
"""

from __future__ import annotations

from typing import Any

from memcalc.errors import UsageError


def meshes(world_size: int, ep: int) -> tuple[Any, Any, Any]:
    """(the world's FSDP mesh, the (efsdp, ep) mesh, a one-rank tensor-parallel mesh): read outside FakeTensorMode."""
    from torch.distributed.device_mesh import init_device_mesh

    world = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp2",))
    experts = init_device_mesh("cpu", (world_size // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return world, experts, one_rank_tp_mesh(world_size)


def one_rank_tp_mesh(world_size: int) -> Any:
    """The tensor-parallel mesh transformers' EP plan takes, of one rank (no tensor parallelism: every rank its own
    batch)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("ranks", "tp"))["tp"]


def experts_modules(model: Any) -> list[tuple[str, Any]]:
    """The fused experts modules (transformers' ``mlp.experts``, 3-D gate_up_proj and down_proj)."""
    found = [(name, module) for name, module in model.named_modules()
             if name.endswith("mlp.experts") and hasattr(module, "gate_up_proj") and hasattr(module, "num_experts")]
    if not found:
        raise UsageError(f"{{ep}}: {type(model).__name__} has no fused experts modules (mlp.experts) to split")
    return found


def parallelize(model: Any, ep_mesh: Any, tp_mesh: Any, efsdp_mesh: Any, mp_policy: Any, world_size: int,
                received: list[int], shard_dim: int = 0, reshard_after_forward: bool = True) -> dict[str, Any]:
    """Apply transformers' EP plan (grouped_gemm on the expert weights, ep_dispatch_experts with all_to_all on the
    experts modules) and fully_shard each experts module over efsdp, as apply_fully_sharded_data_parallelism does
    (``shard_dim`` 1: on dim 1, torchtitan's Shard(1) placement, torchtitan/models/llama4/infra/parallelize.py
    apply_fsdp). ``received`` collects, per forward of an experts module, the (token, expert) pairs this rank
    received. ``world_size``: the data-parallel ranks the gradients are averaged over (a pipeline stage's);
    ``reshard_after_forward``: the experts' as the rest's (under a pipeline torchtitan's default is False)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from transformers.distributed import expert_parallel as ep_module

    found = experts_modules(model)
    plan: dict[str, str] = {}
    for name, _module in found:
        plan[f"{name}.gate_up_proj"] = "grouped_gemm"
        plan[f"{name}.down_proj"] = "grouped_gemm"
        plan[name] = "ep_dispatch_experts"
    _record_received(ep_module.AllToAllEP, received)
    ep_module.apply_expert_parallelism(model, ep_mesh, tp_mesh, plan, ep_implementation="all_to_all")
    for _name, module in found:
        placement = {"shard_placement_fn": lambda _param: Shard(1)} if shard_dim else {}
        fully_shard(module, mesh=efsdp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                    **placement)
        module.set_gradient_divide_factor(float(world_size))
        if efsdp_mesh.size() > 1:  # (transformers: PREMUL_SUM is refused by gloo; sum, then divide)
            module.set_force_sum_reduction_for_comms(True)
    return {"expert_parallel": ep_mesh.size(), "expert_fsdp": efsdp_mesh.size(), "experts_modules": len(found),
            "local_experts": found[0][1].num_experts, "ep_implementation": "all_to_all (transformers AllToAllEP)",
            "experts_shard_dim": shard_dim}


def _record_received(cls: Any, received: list[int]) -> None:
    """Wrap AllToAllEP._dispatch_tokens (once per process) to note how many pairs each call received."""
    current = cls.__dict__["_dispatch_tokens"]
    if hasattr(current, "memcalc_received"):
        current.memcalc_received = received
        return

    def dispatch(self, hidden_states, top_k_index, top_k_weights):
        out = current(self, hidden_states, top_k_index, top_k_weights)
        dispatch.memcalc_received.append(int(out[0].shape[0]))
        return out

    dispatch.memcalc_received = received
    cls._dispatch_tokens = dispatch
