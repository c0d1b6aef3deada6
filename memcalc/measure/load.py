"""The load measured: a real ``from_pretrained`` of a checkpoint written from the config with random weights (and for
QLoRA, bitsandbytes' quantization and PEFT's ``prepare_model_for_kbit_training``) under memcalc's tracker, on the CPU.
What memcalc.load estimates for the same run is compared with it (tests/test_load.py, benchmarks/load.py).

On a CPU the checkpoint's tensors and the model's share one memory, so the run is arranged for the tracker to see
what a GPU holds:

- the checkpoint is written in a dtype other than the load dtype, so that each tensor's arrival on the device (on a
  GPU, the copy to the device in the load dtype) is an allocation the tracker sees (``_to_copy``);
- a host read of the checkpoint (``tensor[...]`` of the safetensors slice in ``_materialize_copy``) is host memory:
  counted apart (``host_peak_bytes``), never in the device's bytes;
- meta tensors (transformers builds the model on the meta device first) hold no memory;
- loading is sequential (``HF_DEACTIVATE_ASYNC_LOAD``; a quantizing load is anyway): the tracker is a dispatch mode
  of the calling thread, and what a loading thread materialises becomes the parameter itself.

bitsandbytes' CPU ``quantize_4bit`` returns what its CUDA kernel returns (backends/cuda/ops.py: the packed codes
and the fp32 absmax); what either allocates and frees inside the kernel is not seen.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from memcalc.measure import build
from memcalc.measure import tracker as trk
from memcalc.measure.step import TORCH_DTYPES
from memcalc.model import ModelConfig
from memcalc.precision import get_recipe
from memcalc.spec import TrainingSpec


@dataclass(frozen=True)
class LoadMeasurement:
    """The device's peak while loading (and preparing), what is left at the end, and the host's peak of checkpoint
    reads alive at once."""

    peak_bytes: int
    end_bytes: int
    host_peak_bytes: int
    elapsed_seconds: float


class _LoadTracker(trk.MemoryTracker):
    """memcalc's tracker, with meta tensors left out (they hold no memory)."""

    def _not_memory(self, t: torch.Tensor) -> bool:
        return t.device.type == "meta"


@contextlib.contextmanager
def _reads_on_host(tracker: trk.MemoryTracker) -> Iterator[None]:
    """transformers' ``core_model_loading._materialize_copy`` with its checkpoint read (``tensor[...]`` of the
    safetensors slice) counted as host memory: only the copy in the load dtype is the device's."""
    from transformers import core_model_loading

    original = core_model_loading._materialize_copy

    def materialize(tensor: Any, device: Any = None, dtype: Any = None) -> torch.Tensor:
        with tracker.host():
            tensor = tensor[...]
        return original(tensor, device, dtype)

    core_model_loading._materialize_copy = materialize
    try:
        yield
    finally:
        core_model_loading._materialize_copy = original


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _raw(model_config: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
    return dict(model_config.raw) if isinstance(model_config, ModelConfig) else dict(model_config)


def _skipped_linears(model: torch.nn.Module, quantized: set[str]) -> list[str]:
    """The Linear (and GPT-2's Conv1D) modules memcalc does not count as 4-bit (the head, unless asked;
    --qlora-scope lora-targets: those LoRA does not wrap), as bitsandbytes' ``llm_int8_skip_modules`` names them."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and f"{name}.weight" not in quantized]


def measure(model_config: ModelConfig | Mapping[str, Any], spec: TrainingSpec) -> LoadMeasurement:
    """Load the config's model as the spec's run loads it (memcalc.load's one-process and QLoRA paths) and track it."""
    from memcalc import trainable
    from memcalc.resolve import model_of

    raw = _raw(model_config)
    recipe = get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)
    weight = TORCH_DTYPES[recipe.weight_dtype]
    load_dtype = (weight if weight != torch.float32 else TORCH_DTYPES[recipe.compute_dtype]) if spec.qlora else weight
    written = torch.float32 if load_dtype != torch.float32 else torch.bfloat16
    cls = build.model_class(build.hf_config(raw))
    kwargs: dict[str, Any] = {"dtype": load_dtype, "device_map": "cpu"}
    with tempfile.TemporaryDirectory(prefix="memcalc-load-") as directory:
        model = build.build_model(raw, dtype=written)
        if spec.qlora:
            from transformers import BitsAndBytesConfig

            quantized = set(trainable.apply(model_of(ModelConfig("config", raw, "config")), spec).quantized)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=load_dtype, bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=spec.qlora_double_quant,
                llm_int8_skip_modules=_skipped_linears(model, quantized))
        with build.quiet_transformers():
            model.save_pretrained(directory)
        del model
        if spec.qlora:
            from bitsandbytes import functional

            # (made on the device at a process's first double quantization and kept: as in a fresh process)
            functional.name2qmap.pop("dynamic", None)
        tracker = _LoadTracker()
        start = time.perf_counter()
        with _environment("HF_DEACTIVATE_ASYNC_LOAD", "1"), _environment("HF_HUB_OFFLINE", "1"), \
                build.quiet_transformers(), build.quiet_bitsandbytes(), tracker, _reads_on_host(tracker):
            tracker.start()
            model = cls.from_pretrained(directory, **kwargs)
            if spec.qlora and spec.qlora_upcast:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            end = tracker.live_bytes
        return LoadMeasurement(tracker.peak_bytes, end, tracker.host_peak_bytes, time.perf_counter() - start)


def measure_fsdp2(model_config: ModelConfig | Mapping[str, Any], spec: TrainingSpec, rank: int = 0) -> LoadMeasurement:
    """accelerate's FSDP2 preparation of a loaded model, one rank of ``spec.num_gpus`` on the fake process group under
    FakeTensorMode (full size, no memory): for each unit in memcalc.load's order, its parameters arrive whole on the
    device (``to_empty``: what ``fully_shard``'s ``_move_states_to_device`` does with a model on the host; fp32 for the
    trainable ones under mixed precision, as accelerate casts them on the host first), then torch's own ``fully_shard``
    makes this rank's padded shards, tracked. With ``spec.cpu_ram_efficient_loading`` the units are sharded on the meta
    device and accelerate's own ``fsdp2_load_full_state_dict`` fills them. The host side (the model loaded in each
    process) is not measured."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from memcalc import load, trainable
    from memcalc.errors import UsageError
    from memcalc.resolve import model_of

    if dist.is_initialized():
        raise UsageError("the fake process group needs this process to have no default process group; "
                         "run it in a fresh process")
    if spec.lora_rank or spec.freeze:
        raise UsageError("measure_fsdp2 builds the bare transformers model: drop {lora_rank} and {freeze}")
    raw = _raw(model_config)
    recipe = get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)
    weight = TORCH_DTYPES[recipe.weight_dtype]
    upcast = recipe.master_dtype is not None
    subset = trainable.apply(model_of(ModelConfig("config", raw, "config")), spec)
    units = load.fsdp2_units(subset.tensors)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=spec.num_gpus)
    try:
        mesh = init_device_mesh("cpu", (spec.num_gpus,))
        policy = MixedPrecisionPolicy(param_dtype=weight) if upcast else MixedPrecisionPolicy()
        model = build.build_model(raw, dtype=weight, meta=True)
        if upcast:  # accelerate casts the trainable parameters on the host: fp32 is what arrives (cast here on meta)
            trained = {t.name for t in subset.tensors if t.trainable}
            for name, param in model.named_parameters():
                if name in trained:
                    param.data = param.data.to(torch.float32)
        tracker = _LoadTracker()
        start = time.perf_counter()
        broadcast = spec.cpu_ram_efficient_loading
        with FakeTensorMode(allow_non_fake_inputs=True), build.quiet_transformers(), tracker:
            tracker.start()
            if broadcast and hasattr(model, "tie_weights"):
                model.tie_weights()  # (accelerate re-ties after moving the model to the meta device)
            output = model.get_output_embeddings()
            tied = output is not None and output.weight is model.get_input_embeddings().weight
            for unit in units:
                modules = [model.get_submodule(m) for m in dict.fromkeys(t.module for t in unit)]
                if tied and broadcast and unit is units[-1]:
                    # (accelerate's tail: the final norm, the embedding and the tied head; on the meta device the
                    # head's weight is the embedding's again after tie_weights)
                    modules.append(output)
                _arrive_and_shard(modules,
                                  lambda modules: fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh,
                                                              mp_policy=policy), on_meta=broadcast)
            if broadcast:
                # accelerate's own loading of the sharded meta model, as a process other than the main one (which
                # copies in its host tensors where the others receive them: the same bytes on the device)
                from types import SimpleNamespace

                from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

                fsdp2_load_full_state_dict(SimpleNamespace(is_main_process=False, device=torch.device("cpu")), model,
                                           {})
            end = tracker.live_bytes
        return LoadMeasurement(tracker.peak_bytes, end, 0, time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def _arrive_and_shard(modules: list[torch.nn.Module], shard: Any, on_meta: bool = False) -> None:
    """One unit: its parameters made whole on the device (``on_meta``: left on the meta device, as accelerate's
    cpu_ram_efficient_loading shards them), then ``shard(modules)``. (A function of its own, so that nothing here
    keeps a whole parameter alive after it.)"""
    for module in modules:
        if not on_meta:
            module.to_empty(device="cpu", recurse=False)
    shard(modules)
