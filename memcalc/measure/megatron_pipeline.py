"""Megatron-LM's 1F1B pipeline schedule measured (``--engine megatron --pp``): megatron-core's own
``forward_backward_pipelining_without_interleaving`` (megatron/core/pipeline_parallel/schedules.py) and its
``P2PCommunicator`` (p2p_communication.py) run on gloo ranks of this CPU, over the stages memcalc.measure.pipeline
cuts from the transformers model, with the settings Megatron's trainer gives them (megatron/training/arguments.py
``core_transformer_config_from_args``: ``deallocate_pipeline_outputs`` on, ``batch_p2p_comm`` on without
``--overlap-p2p-communication``, ``pipeline_dtype`` the parameters' dtype).

What the schedule holds is Megatron's: the received inputs of the micro-batches in flight (``input_tensors``), their
outputs pseudo-freed once sent (``deallocate_output_tensor``), a receive buffer made for each receive
(``_communicate``), every send waited on before the schedule goes on. The model states are the torch recipe's
(memcalc.measure.step.Stepper): Megatron's DDP buffers and its optimizer check for CUDA tensors and do not run on a
CPU, so its main-gradient buffer and fp32 main parameters are memcalc.megatron's rules, not measured here.

megatron-core assumes CUDA in three places the schedule reaches (``torch.cuda.current_device()`` as the receive
buffers' device, ``torch.cuda.synchronize()`` after a batched exchange, a token count made with ``device="cuda"``):
while the step runs, the two modules see a ``torch`` whose CUDA device is this CPU (``_cpu_torch``). The layouts are
HF's (batch, sequence, hidden), so the exchanged shape is given as that (``adjust_tensor_shapes_fn``); Megatron's own
is (sequence, batch, hidden), the same bytes.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any


def available() -> bool:
    """Whether megatron-core is installed (found, not imported: its import takes seconds; the test extras pin 0.16.1)."""
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


def _cpu_torch() -> Any:
    """``torch`` as megatron-core's schedule and communicator see it during the measured step: its CUDA device is the
    CPU, a synchronize is nothing, a tensor made on "cuda" is made here."""
    import torch

    def on_cpu(device: Any) -> Any:
        return "cpu" if device == "cuda" or (isinstance(device, int) and not isinstance(device, bool)) else device

    cuda = types.SimpleNamespace(current_device=lambda: "cpu", synchronize=lambda *_a, **_k: None)

    class CpuTorch(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    shim = CpuTorch("torch")
    shim.cuda = cuda
    shim.zeros = lambda *a, device=None, **k: torch.zeros(*a, device=on_cpu(device), **k)
    shim.tensor = lambda *a, device=None, **k: torch.tensor(*a, device=on_cpu(device), **k)
    shim.ones = lambda *a, device=None, **k: torch.ones(*a, device=on_cpu(device), **k)
    return shim


@contextlib.contextmanager
def _on_cpu() -> Iterator[None]:
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    saved = (schedules.torch, p2p_communication.torch)
    schedules.torch = p2p_communication.torch = _cpu_torch()
    try:
        yield
    finally:
        schedules.torch, p2p_communication.torch = saved


def megatron_runner(modules: list[Any], ids: Any, microbatches: int, micro_batch_size: int, hidden: int,
                    dtype: Any, first: bool, last: bool, loss_fn: Any) -> Any:
    """A function that runs one step of Megatron's 1F1B schedule over this rank's stage (``modules[0]``), its
    micro-batches cut from ``ids`` (every micro-batch's tokens on the first stage, its labels on the last)."""
    import torch
    import torch.distributed as dist
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    [stage] = modules
    world = dist.get_world_size()
    # (a group of one rank each for tensor and context parallelism, which the schedule asks the size of: every rank
    # makes every group, in the same order, as new_group requires)
    singles = [dist.new_group([r]) for r in range(world)]
    alone = singles[dist.get_rank()]
    # (the fields of a TransformerConfig the schedule reads: its layer count and heads only satisfy its checks)
    config = TransformerConfig(num_layers=world, hidden_size=hidden, num_attention_heads=1,
                               pipeline_model_parallel_size=world, pipeline_dtype=dtype,
                               deallocate_pipeline_outputs=True, batch_p2p_comm=True)
    seq_len = ids.shape[1]

    class Chunk(torch.nn.Module):
        """The model chunk the schedule runs: the stage with what it reads from a Megatron model (``config``,
        ``model_type``, ``set_input_tensor``, which keeps the input it is given, as TransformerBlock's does)."""

        def __init__(self) -> None:
            super().__init__()
            self.module = stage
            self.config = config
            self.model_type = ModelType.encoder_or_decoder
            self.input_tensor: Any = None

        def set_input_tensor(self, tensors: list[Any]) -> None:
            self.input_tensor = tensors[0]

        def forward(self, tokens: Any) -> Any:
            return self.module(tokens if first else self.input_tensor)

    chunk = Chunk()
    groups = ProcessGroupCollection()
    groups.tp, groups.cp, groups.pp, groups.embd, groups.pos_embd, groups.dp_cp = (
        alone, alone, dist.group.WORLD, None, None, alone)
    communicator = P2PCommunicator(pp_group=dist.group.WORLD, config=config)
    shape = [(micro_batch_size, seq_len, hidden)]

    def forward_step(data: Any, model: Any) -> Any:
        tokens = next(data) if data is not None else None
        output = model(tokens)
        if not last:
            return output, None
        return output, lambda logits: (loss_fn(logits, tokens), {})

    def run() -> None:
        data = iter(ids.chunk(microbatches)) if first or last else None
        forward_backward_pipelining_without_interleaving(
            forward_step_func=forward_step, data_iterator=data, model=[chunk], num_microbatches=microbatches,
            seq_length=seq_len, micro_batch_size=micro_batch_size, p2p_communicator=communicator,
            pg_collection=groups, adjust_tensor_shapes_fn=lambda _recv, _send: (shape, shape))

    def step() -> None:
        with _on_cpu():
            run()

    return step
