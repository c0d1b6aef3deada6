"""``--compile``: each decoder layer as torch.compile with Inductor runs it, for the step's trace and its measurement.

torchtune compiles each layer of the model (training/_compile.py ``compile_model``: ``layer.compile()`` per
decoder layer) and torchtitan each transformer block (``apply_compile``); the embeddings, the head and the loss stay
outside. What a compiled layer keeps for backward is decided by AOTAutograd: the layer's forward and backward are
traced into one joint graph of ATen ops, decomposed with Inductor's table
(torch/_inductor/decomposition.py ``select_decomp_table``), rewritten by Inductor's joint-graph passes and cut in two
by the min-cut partitioner (torch/_inductor/compile_fx.py ``partition_fn``: ``_recursive_joint_graph_passes`` then
``min_cut_rematerialization_partition``): the forward graph's extra outputs are the tensors saved for backward,
everything else is recomputed in backward.

Here those two graphs come from the same functions (``aot_function`` with Inductor's decompositions and its
``partition_fn``; a checkpointed layer traced with its checkpoint inside, tagged as Dynamo tags it), and each is
lowered and scheduled by Inductor itself (``GraphLowering``, ``Scheduler``: its fusion decisions) without
generating code. Its own memory model then says which buffers exist and for how long (memory.py
``compute_memory_timeline``: from the kernel that writes a buffer to the last kernel that reads it), less the
buffers its code generation keeps inside one kernel and those a kernel overwrites in place. At run time the graph's
ops are computed out of the tracker's sight, the graph's outputs excepted (the saved tensors and gradients, which
outlive it), while those buffers are allocated and freed as tracked bytes kernel by kernel, and each input is let
go after its last reader. Measured against real Inductor-compiled CPU steps (benchmarks/compile.py;
docs/accuracy.md). Inductor is scheduled for the device the traced tensors are on (the CPU's C++ backend); on an
H200 three Triton-compiled Llama-3.2-1B steps (plain, chunked loss, checkpointed) came within 256 B of the estimate
(benchmarks/gpu_validation.py, docs/accuracy-gpu.md).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten

_VIEW_NAMES = ("view", "reshape", "permute", "transpose", "aten.t.", "expand", "slice", "select", "unsqueeze",
               "squeeze", "alias", "as_strided", "split", "unbind", "diagonal", "unfold")


def _rng_wrapped(node: torch.fx.Node) -> tuple[Any, int] | None:
    """(the op, where its arguments start) of a node running an op with a saved RNG state
    (torch/_prims/rng_prims.py run_and_save_rng_state(op, ...), run_with_rng_state(state, op, ...): how the
    partitioner replays a random op it recomputes), else None."""
    name = getattr(node.target, "__name__", "")
    if name == "run_and_save_rng_state":
        return node.args[0], 1
    if name == "run_with_rng_state":
        return node.args[1], 2
    return None


def _is_view(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    name = f"{node.target}."
    return any(view in name for view in _VIEW_NAMES)


def _outputs_and_bases(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The graph's outputs (the saved tensors, the gradients) and, for those that are views, their bases: the nodes
    computed as tensors the tracker sees (they outlive the graph)."""
    nodes = list(graph.nodes)
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(nodes[-1].args, found.append)
    kept = set(found)
    for node in reversed(nodes):
        if node in kept and _is_view(node) and node.all_input_nodes:
            kept.add(node.all_input_nodes[0])
    return kept


@dataclass
class Schedule:
    """Inductor's memory timeline of one graph: its kernels in order, the bytes its buffers take as each kernel
    runs and after it (memory.py ``compute_memory_timeline``: a buffer lives from the kernel that writes it to the
    last kernel that reads it; a multi-output kernel's outputs allocated with it and freed one by one), the inputs
    freed after their last reader, and the step at which each FX node is computed (the first kernel whose origins
    include it). The graph's outputs are not in the bytes: they are computed as tensors the tracker sees."""

    steps: int
    allocated: dict[int, int] = field(default_factory=dict)
    freed: dict[int, int] = field(default_factory=dict)
    inputs_freed: dict[int, list[str]] = field(default_factory=dict)
    step_of: dict[str, int] = field(default_factory=dict)


def _in_place(scheduler: Any, step_of_kernel: dict[Any, int], outputs: Any) -> dict[str, str]:
    """Buffer -> the dying input buffer whose memory it takes: the kernel reads that buffer for the last time and
    writes one of its size and dtype (scheduler.py ``BaseSchedulerNode.decide_inplace_update``'s conditions: the
    read its only remaining use, an in-place-able user, no aliasing or multi-output layouts, not a graph output)."""
    from torch._inductor import ir
    from torch._inductor.codegen.wrapper import can_match_buffer_size
    from torch._inductor.scheduler import SchedulerNode

    taken: dict[str, str] = {}
    donors: set[str] = set()
    for kernel in scheduler.nodes:
        step = step_of_kernel[kernel]
        for part in kernel.get_nodes():
            if not isinstance(part, SchedulerNode):
                continue
            for out in part.get_outputs():
                node = out.node
                if (node is None or not node.should_allocate() or node.get_inputs_that_alias_output()
                        or node.get_mutation_names() or out.get_name() in outputs):
                    continue
                for read in part.read_writes.reads:
                    given = scheduler.name_to_buf.get(read.name)
                    if given is None or read.name in donors or read.name in outputs or given.node is None:
                        continue
                    remaining = [u for u in given.users
                                 if step_of_kernel.get(scheduler.name_to_fused_node.get(u.node.get_name()), -1) >= step]
                    if (len(remaining) == 1 and remaining[0].can_inplace and remaining[0].node is part
                            and not isinstance(given.node.get_output_spec(), (ir.NoneLayout, ir.MultiOutputLayout))
                            and can_match_buffer_size(given.node, node)):
                        taken[out.get_name()] = read.name
                        donors.add(read.name)
                        break
    return taken


def schedule_of(module: torch.fx.GraphModule, example_inputs: list[Any]) -> Schedule:
    """Lower ``module`` with Inductor and schedule its kernels (fusion included: torch/_inductor/graph.py
    GraphLowering, scheduler.py Scheduler), without generating code; Inductor's own buffer lifetimes
    (memory.py prepare_planning_info, compute_memory_timeline), with its in-place reuse of dying buffers."""
    import copy

    from torch._guards import detect_fake_mode
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.memory import FreeableInputBuffer, compute_memory_timeline, prepare_planning_info
    from torch._inductor.scheduler import Scheduler
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._ordered_set import OrderedSet

    mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x
                for x in example_inputs]
    graph = GraphLowering(copy.deepcopy(module), example_inputs=fake)
    names = {node.name for node in module.graph.nodes}
    allow, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True  # (the graph's constants are real)
    try:
        with DebugContext(), V.set_graph_handler(graph), V.set_fake_mode(mode):
            graph.run(*fake)
            scheduler = Scheduler(graph.operations)
            outputs = OrderedSet(graph.get_output_names())
            _peak, freeable = prepare_planning_info(scheduler.nodes, scheduler.name_to_buf,
                                                    scheduler.name_to_fused_node,
                                                    OrderedSet(graph.graph_inputs.keys()), outputs)
            buffers, step_of_kernel, _ = compute_memory_timeline(scheduler.nodes, freeable, outputs)
            taken = _in_place(scheduler, step_of_kernel, outputs)
            schedule = Schedule(len(scheduler.nodes))
            for step, kernel in enumerate(scheduler.nodes):
                for part in kernel.get_nodes():
                    for origin in getattr(part.node, "origins", None) or ():
                        if origin.name in names:
                            schedule.step_of.setdefault(origin.name, step)
            donors = set(taken.values())

            def kernel_local(buffer: Any) -> bool:
                # scheduler.py remove_kernel_local_buffers: every user inside the writing fused kernel
                kernel = scheduler.name_to_fused_node.get(buffer.defining_op_name())
                users = [u.node for u in buffer.users]
                return kernel is not None and bool(users) and all(
                    scheduler.name_to_fused_node.get(u.get_name()) is kernel for u in users
                    if hasattr(u, "get_name"))

            for info in buffers:
                name = info.buffer.get_name()
                if isinstance(info.buffer, FreeableInputBuffer):
                    if info.end_step >= 0:
                        schedule.inputs_freed.setdefault(info.end_step, []).append(name)
                    continue
                if name in outputs:  # computed as a tracked tensor; a multi-output kernel's share of it too
                    if not info.size_alloc and info.size_free:
                        schedule.freed[info.start_step] = schedule.freed.get(info.start_step, 0) + info.size_free
                    continue
                if info.end_step == info.start_step and kernel_local(info.buffer):
                    continue  # read only inside the fused kernel that writes it: a local, never allocated
                if name not in taken:
                    schedule.allocated[info.start_step] = schedule.allocated.get(info.start_step, 0) + info.size_alloc
                if info.end_step >= 0 and name not in donors:
                    schedule.freed[info.end_step] = schedule.freed.get(info.end_step, 0) + info.size_free
    finally:
        mode.allow_non_fake_inputs = allow
    return schedule


def _untracked_like(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    with _disable_current_modes():
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def _runner(module: torch.fx.GraphModule, schedule: Schedule) -> Callable[[list[Any]], Any]:
    """A boxed function running ``module``'s graph with Inductor's memory: each op computed out of the tracker's
    sight (modes off) but the graph's outputs and their bases; as the schedule's steps pass, each of Inductor's
    buffers allocated (as bytes the tracker sees) at the kernel that writes it and freed after its last reader, and
    each input released after its last reader (kept, untracked, where a later op still reads it)."""
    nodes = list(module.graph.nodes)
    tracked = _outputs_and_bases(module.graph)
    placeholders = {node.name: node for node in nodes if node.op == "placeholder"}
    last_use: dict[torch.fx.Node, int] = {}
    for index, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = index
    dropped_after: dict[int, list[torch.fx.Node]] = {}
    for used, index in last_use.items():
        dropped_after.setdefault(index, []).append(used)

    def run(args: list[Any]) -> Any:
        env: dict[torch.fx.Node, Any] = {}
        given = list(args)
        args.clear()  # the boxed convention: the inputs are freed as the graph stops using them
        device = next((a.device for a in given if isinstance(a, torch.Tensor)), None)
        given.reverse()
        pool: list[torch.Tensor] = []  # Inductor's live buffers, as tracked bytes
        clock = {"step": -1}

        def free(size: int) -> None:
            while size > 0 and pool:
                size -= pool.pop().numel()
            if size < 0:  # (freed past a chunk: the rest back, after the free)
                pool.append(torch.empty(-size, dtype=torch.uint8, device=device))

        def release(step: int) -> None:
            free(schedule.freed.get(step, 0))
            for name in schedule.inputs_freed.get(step, ()):
                node = placeholders.get(name)
                if node is not None and node in env:
                    env[node] = _untracked_like(env[node])

        def advance(to: int) -> None:
            while clock["step"] < to:
                if clock["step"] >= 0:
                    release(clock["step"])
                clock["step"] += 1
                size = schedule.allocated.get(clock["step"], 0)
                if size:
                    pool.append(torch.empty(size, dtype=torch.uint8, device=device))

        result = None
        for index, node in enumerate(nodes):
            if node.op == "placeholder":
                env[node] = given.pop()
            elif node.op == "get_attr":
                env[node] = getattr(module, str(node.target))
            elif node.op == "call_function":
                step = schedule.step_of.get(node.name)
                if step is not None:
                    advance(step)
                call_args, call_kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                target, wrapped = node.target, _rng_wrapped(node)
                if wrapped is not None:  # the op itself (its memory; the RNG state's values do not matter here)
                    target, call_args = wrapped[0], call_args[wrapped[1]:]
                if node in tracked:
                    value = target(*call_args, **call_kwargs)
                else:
                    with _disable_current_modes():
                        value = target(*call_args, **call_kwargs)
                if wrapped is not None and wrapped[1] == 1:  # run_and_save_rng_state's (state, result)
                    value = (torch.empty(0, dtype=torch.uint8), value)
                env[node] = value
            elif node.op == "output":
                advance(schedule.steps - 1)
                release(schedule.steps - 1)
                result = torch.fx.node.map_arg(node.args[0], env.__getitem__)
            for used in dropped_after.get(index, ()):
                env.pop(used, None)
        pool.clear()
        return result

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


_AC_GRAPH_IDS = iter(range(1, 1 << 62))


def _checkpointed(function: Callable[..., Any], *args: Any) -> Any:
    """A checkpointed layer as Dynamo hands it to AOTAutograd (torch/_higher_order_ops/wrap.py
    ``tag_activation_checkpoint_impl``): non-reentrant checkpoint with a policy that prefers recomputing every op,
    traced, so each op of the region is tagged ``recompute`` with the region's ``ac_graph_id`` and the partitioner
    saves the region's inputs and recomputes the rest inside the backward graph."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    graph_id = next(_AC_GRAPH_IDS)

    def contexts() -> Any:
        forward_context, recompute_context = create_selective_checkpoint_contexts(
            lambda *_args, **_kwargs: CheckpointPolicy.PREFER_RECOMPUTE)
        forward_context.ac_graph_id = graph_id
        return forward_context, recompute_context

    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, early_stop=False,
                      context_fn=contexts)


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    # (made under the compilation's own FakeTensorMode: no values, so no integer input's values matter either)
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                               device=tensor.device).requires_grad_(tensor.requires_grad)


def _aot_compiled(function: Callable[..., Any], *example: Any) -> Callable[..., Any]:
    """``function`` through AOTAutograd as Inductor calls it (its decompositions and partition_fn; each graph run by
    ``_runner``), compiled on stand-ins for ``example`` (tensors in lists and dicts), made and run out of the
    tracker's sight: the compilation's own forward is not the step's. The stand-ins are fresh fake tensors of a
    FakeTensorMode of their own, not views of the step's (AOTAutograd keeps its example inputs, which would keep the
    step's tensors alive), and hold no memory: a real warm-up call of a layer at full size would compute it (minutes
    on a CPU at Llama-3.2-3B x 8,192 tokens). Identity saved-tensor hooks keep a checkpoint's or an offloader's hooks around
    the call from seeing their saved tensors. AOTAutograd refuses fake parameters inside its graph, which the traced
    step has by design: that check is off while compiling."""
    import torch._dynamo.utils as dynamo_utils
    from functorch.compile import aot_function
    from torch._inductor.compile_fx import partition_fn
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    compiled = aot_function(function, fw_compiler=_compiled, bw_compiler=_compiled, partition_fn=partition_fn,
                            decompositions=select_decomp_table())
    refuse = dynamo_utils.assert_no_fake_params_or_buffers
    dynamo_utils.assert_no_fake_params_or_buffers = lambda _graph: None
    try:
        with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(_same, _same), \
                FakeTensorMode(allow_non_fake_inputs=True):  # (the graphs' own constants are real)
            compiled(*pytree.tree_map_only(torch.Tensor, _stand_in, example))
    finally:
        dynamo_utils.assert_no_fake_params_or_buffers = refuse
    return compiled


def compile_function(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function`` of tensors as torch.compile with Inductor runs it (the same partition and buffers as a compiled
    layer): torchtune's compile_loss compiles CEWithChunkedOutputLoss.compute_cross_entropy, each chunk's upcast and
    cross-entropy, this way."""
    compiled: dict[Any, Callable[..., torch.Tensor]] = {}

    def call(*given: torch.Tensor) -> torch.Tensor:
        # (a compiled graph is traced for its inputs' strides; a strided view, a chunk of the labels, is made dense)
        tensors = [t if t.is_contiguous() else t.contiguous() for t in given]
        key = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        found = compiled.get(key)
        if found is None:
            found = compiled[key] = _aot_compiled(function, *tensors)
        return found(*tensors)

    return call


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# Schedules by graph: the layers of a stack compile to the same graphs, which Inductor schedules alike.
_SCHEDULES: dict[tuple[str, tuple[Any, ...]], Schedule] = {}


def _compiled(module: torch.fx.GraphModule, example_inputs: Any) -> Callable[[list[Any]], Any]:
    inputs = list(example_inputs)
    key = (module.code, tuple((tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type)
                              if isinstance(t, torch.Tensor) else repr(t) for t in inputs))
    schedule = _SCHEDULES.get(key)
    if schedule is None:
        # (AOTAutograd compiles the backward graph at the first backward, inside the step: the step's modes off)
        with _disable_current_modes():
            schedule = _SCHEDULES[key] = schedule_of(module, inputs)
    return _runner(module, schedule)


def compile_layer(layer: torch.nn.Module) -> None:
    """Replace ``layer``'s forward with its AOTAutograd-partitioned graphs (one compilation per distinct call
    signature, as torch.compile guards on it), run as ``_runner`` does. A layer transformers checkpoints
    (modeling_layers.py GradientCheckpointingLayer wraps the class's forward) is compiled with its checkpoint inside,
    as torchtune compiles a checkpoint-wrapped layer: the forward graph saves the layer's inputs and the backward
    graph recomputes what it needs."""
    import types

    from torch.nn.utils.stateless import _reparametrize_module

    class_forward = type(layer).forward
    # transformers' checkpointing wrapper (functools.wraps) keeps the layer's own forward as __wrapped__.
    original = types.MethodType(getattr(class_forward, "__wrapped__", class_forward), layer)
    compiled: dict[Any, Callable[..., Any]] = {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        state = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
        checkpointed = bool(getattr(layer, "gradient_checkpointing", False)) and layer.training
        key = (spec, tuple(at), repr(constants), checkpointed)
        function = compiled.get(key)
        if function is None:
            def functional(state: dict[str, torch.Tensor], tensors: list[torch.Tensor]) -> Any:
                values = list(constants)
                for index, tensor in zip(at, tensors, strict=True):
                    values[index] = tensor
                call_args, call_kwargs = pytree.tree_unflatten(values, spec)
                # The layer's own forward on these tensors, not through its __call__: the hooks on the layer (the
                # trace's segment hooks, say) fire around the compiled call, as they do around a compiled module.
                with _reparametrize_module(layer, state):
                    if not checkpointed:
                        return original(*call_args, **call_kwargs)
                    return _checkpointed(functools.partial(original, **call_kwargs), *call_args)

            function = compiled[key] = _aot_compiled(functional, state, [leaves[i] for i in at])
        return function(state, [leaves[i] for i in at])

    layer.forward = forward
