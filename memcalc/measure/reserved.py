"""A training step's allocations and frees at full size, in order: what memcalc.allocator replays to predict reserved
memory.

The step is the one ``--verify`` runs (memcalc.measure.step.execute): the model's load (weights, master copies,
buffers, the batch), a warm-up step that creates the optimizer state while the forward's and backward's freed blocks
sit in the allocator's cache, and a second step (two micro-batches each under gradient accumulation). It runs under FakeTensorMode at the config's full depth with CUDA's
semantics (memcalc.measure.cuda_semantics, as the traced activations), and memcalc's tracker keeps every storage's
allocation and free (``MemoryTracker.events``). Not in it: memory a kernel allocates and frees inside one op (it goes
through the same allocator on a GPU, and is small beside a layer's tensors) and what is not the caching allocator's
(the CUDA context). Results are cached (memcalc.cache) like the traces, keyed by the config's content, the whole
TrainingSpec, the attention path and the torch and transformers versions.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memcalc import cache
from memcalc.allocator import (
    ALLOC,
    CUBLAS_HANDLES_PER_STEP,
    FREE,
    MIN_BLOCK_SIZE,
    AllocatorConfig,
    replay,
    workspace_allocations,
)
from memcalc.errors import MemcalcError, UnsupportedModelError, UsageError
from memcalc.measure.derive import current_device
from memcalc.report import AllocatorReplay

# Bump when what is recorded changes: older cache entries are then not read.
CACHE_FORMAT = 6  # 6: the CPU's semantics too give a v narrower than q a fused kernel; 5: where the weights' load and the step begin; 4: QLoRA's load in the log; 3: softmax backward
# with CUDA's temporary; 2: CUDA semantics run fp32 grouped-head sdpa on its math path
# Where cudaMalloc puts a new segment decides which of two cached blocks of one size is reused (memcalc.allocator)
SEGMENT_PLACEMENT_NOTE = ("each new segment placed below the earlier ones, as cudaMalloc placed them on an H200 (CUDA "
                          "13.0): of two cached blocks of one size the allocator reuses the lower (memcalc/allocator.py)")
# Micro-batches per step replayed under gradient accumulation: from the second on, each is alike.
ACCUMULATED_MICRO_BATCHES = 2
CACHE_KIND = "allocations"


@dataclass(frozen=True)
class StepAllocations:
    """The allocation sequence (memcalc.allocator events; keys renumbered from 0) and where it came from."""

    events: tuple[tuple[int, int, int], ...]
    model_class: str
    attention: str
    elapsed_seconds: float
    versions: Mapping[str, str]
    loaded: int = 0  # how many of the events are the weights' build and load (0: not known, DDP ranks)
    step: int = 0  # how many come before the first step (0: not known)

    def to_json(self) -> dict[str, Any]:
        # one list each: the key, and the size (a free is -1), so an 8B model's ~20,000 events stay a few hundred KB
        return {"format": CACHE_FORMAT, "keys": [key for _kind, key, _size in self.events],
                "sizes": [size if kind == ALLOC else -1 for kind, _key, size in self.events],
                "model_class": self.model_class, "attention": self.attention,
                "elapsed_seconds": self.elapsed_seconds, "versions": dict(self.versions), "loaded": self.loaded,
                "step": self.step}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepAllocations:
        keys, sizes = data["keys"], data["sizes"]
        loaded, step = data["loaded"], data["step"]
        if len(keys) != len(sizes) or not all(isinstance(v, int) for v in (*keys, *sizes, loaded, step)) or not (
                0 <= loaded <= step <= len(keys)):
            raise ValueError("malformed allocation events")
        events = tuple((FREE, key, 0) if size < 0 else (ALLOC, key, size) for key, size in zip(keys, sizes))
        return cls(events, str(data["model_class"]), str(data["attention"]), float(data["elapsed_seconds"]),
                   dict(data["versions"]), loaded, step)


def _renumbered(events: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int], ...]:
    """Storage ids (memory addresses, reused once freed) as small integers, one per allocation."""
    numbers = itertools.count()
    current: dict[int, int] = {}
    out = []
    for kind, key, size in events:
        if kind == ALLOC:
            current[key] = number = next(numbers)
            out.append((ALLOC, number, size))
        elif key in current:
            out.append((FREE, current.pop(key), 0))
    return tuple(out)


def is_ddp(spec: Any) -> bool:
    """Data parallelism without sharding: DistributedDataParallel (--sharding torch --zero 0 --gpus N)."""
    return spec.num_gpus > 1 and spec.zero_stage == 0 and spec.sharding.value == "torch"


def step_allocations(raw: Mapping[str, Any], spec: Any, attention: str = "sdpa") -> tuple[StepAllocations, bool]:
    """The allocation sequence of ``spec``'s step (a TrainingSpec one process runs: measure.step.resolve_setup says
    which) at the config's full depth, from the cache or traced now; and whether it came from the cache."""
    from memcalc.measure import torchtune_build

    settings = {"spec": dataclasses.asdict(spec), "attention": attention, "device": current_device(),
                # (torchao's own NF4 code runs in the trace: its version is the step's)
                **({"torchao": cache.version_of("torchao")} if spec.qlora and spec.qlora_quantizer.value == "torchao"
                   else {}),
                **({"torchtune_build": "before 0.3"} if torchtune_build.active() else {})}
    key = cache.key_of(raw, CACHE_FORMAT, **settings)
    found = cache.read_as(CACHE_KIND, key, CACHE_FORMAT, StepAllocations.from_json)
    if found is not None:
        return found, True
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memcalc.measure import build, cuda_semantics
    from memcalc.measure.step import execute
    from memcalc.measure.trace import FakeKernels, unpacked_sequences

    if attention == "sdpa" and not build.sdpa_supported(raw):
        attention = "eager"
    like_cuda = current_device() == "cuda"
    started = time.perf_counter()
    # (sdpa's kernel as CUDA picks it either way: memcalc's measured CPU steps run it so too)
    semantics = cuda_semantics.like_cuda() if like_cuda else cuda_semantics.kernels_like_cuda()
    if is_ddp(spec):
        # one rank of DistributedDataParallel over a fake process group (memcalc.measure.distributed): its gradient
        # buckets made at construction, then the steps
        from memcalc.measure.distributed import measure_distributed

        with semantics:
            [rank] = measure_distributed(dict(raw), spec, engine="ddp", world_size=spec.num_gpus, method="fake",
                                         attn_implementation=attention, allocation_events=True, like_cuda=like_cuda)
        events, model_class, loaded, step = rank.allocation_events, str(rank.run.get("model_class", "")), 0, 0
    else:
        with FakeTensorMode(allow_non_fake_inputs=True), unpacked_sequences(), build.quiet_fake_tensor_log(), \
                semantics, FakeKernels(like_cuda):
            # with gradient accumulation, two micro-batches per step: the second runs its forward and backward beside
            # the first one's gradients, as every later one does
            result = execute(dict(raw), spec, device="cpu", attn_implementation=attention, allocation_events=True,
                             traced=True, micro_batches=min(spec.grad_accum, ACCUMULATED_MICRO_BATCHES))
        events, model_class = result.allocation_events, result.model_class
        loaded, step = result.allocation_events_loaded, result.allocation_events_step
    assert events is not None
    allocations = StepAllocations(_renumbered(events), model_class, attention,
                                  round(time.perf_counter() - started, 3), cache.versions(), loaded or 0, step or 0)
    cache.write(CACHE_KIND, key, allocations.to_json())
    return allocations, False


def with_workspaces(allocations: StepAllocations, workspace_bytes: int | None) -> list[tuple[int, int, int]]:
    """The step's events with its cuBLAS workspaces, one per handle (torch's CublasHandlePool.cpp, through the caching
    allocator): where the load's end is known, as the step begins (a handle's workspace is allocated at its first
    matmul, the forward's and then autograd's; the load's cached free blocks can hold them, as torchtune's QLoRA build
    left them on the H200), else first."""
    sizes = workspace_allocations(workspace_bytes)
    made = [(ALLOC, -1 - handle, size) for handle, size in enumerate(sizes)]
    return [*allocations.events[:allocations.step], *made, *allocations.events[allocations.step:]]


def predict_reserved(raw: Mapping[str, Any], spec: Any, config: AllocatorConfig, source: str,
                     capacity_bytes: int | None, workspace_bytes: int | None = None) -> AllocatorReplay:
    """The step's allocations (``step_allocations``) replayed through the caching allocator with ``config``: once
    without a bound (what ``max_memory_reserved`` reports on a GPU large enough) and, with ``capacity_bytes``, within
    it (the allocator frees its cache and retries on a full device; what it still cannot place is an OOM).
    ``workspace_bytes``: one cuBLAS workspace for the card (memcalc.allocator.cublas_workspace_bytes), allocated once
    per handle before the step; None when the card is not known."""
    attention = "sdpa" if spec.attention.value == "flash" else spec.attention.value
    try:
        allocations, cached = step_allocations(raw, spec, attention)
    except MemcalcError as error:
        template = str(error.args[0]) if error.args else str(error)  # (its {settings} unspelled: the caller spells)
        message = template.replace("verify does not yet run", "{reserved} replays a step that does not yet run")
        message = message.replace("verify on several ranks does not yet run",
                                  "{reserved} replays DDP ranks that do not yet run")
        message = message.replace("to verify it on one", "to replay one process")
        raise UsageError(message.replace("; drop it to verify the rest", "; drop it, or drop {reserved}")) from None
    except Exception as error:  # noqa: BLE001 (any failure of the model's code: one line, said)
        why = " ".join(str(error).split())[:200] or type(error).__name__
        raise UnsupportedModelError(f"{{reserved}}: the model's step could not be traced ({why})") from None
    events = with_workspaces(allocations, workspace_bytes)
    free = replay(events, config)
    bounded = replay(events, config, capacity_bytes) if capacity_bytes is not None else None
    # (before the step no matmul has run: no cuBLAS workspace yet)
    after_load = replay(allocations.events[:allocations.loaded], config) if allocations.loaded else None
    how = "from the cache" if cached else f"traced in {allocations.elapsed_seconds:.1f} s"
    notes = [*free.notes]
    if spec.attention.value == "flash":
        notes.append("flash_attention_2 does not run on a CPU: the step was traced with sdpa, which also keeps no "
                     "s x s scores")
    if spec.fp8.value != "none":
        notes.append(f"--fp8 {spec.fp8.value}: the replay runs torchao's float8 layers as they run eagerly (their "
                     "casts' fp32 copies included; torch.compile fuses them away, which is not replayed)")
    if is_ddp(spec):
        notes.append("DDP rebuilds its buckets after the first step in the order gradients became ready; over the fake "
                     "process group the first step's buckets stay (the same sizes for a model whose layers run in "
                     "order); NCCL's own buffers are outside the caching allocator and not in the replay")
    if spec.grad_accum > 1:
        notes.append(f"gradient accumulation ({spec.grad_accum} micro-batches): the replay runs two per step, the "
                     "second beside the first one's gradients, as every later one runs")
    if workspace_bytes:
        notes.append(f"in the replay: {CUBLAS_HANDLES_PER_STEP} cuBLAS workspaces of {workspace_bytes / 2**20:g} MiB "
                     "(torch's CublasHandlePool.cpp: one per thread running matmuls, the forward's and autograd's)")
    else:
        notes.append("not in the replay: the cuBLAS workspaces (torch's CublasHandlePool.cpp: one per thread running "
                     "matmuls; 32 MiB each on compute capability 9.0 to 12.x, 8 MiB + 128 KiB on others): name the "
                     "card with --gpu to count them")
    notes.append("not in the replay: scratch a kernel allocates and frees inside one op")
    notes.append(SEGMENT_PLACEMENT_NOTE)
    if spec.qlora:
        notes.append("in the replay: QLoRA's load, whose freed blocks the allocator keeps into the step ("
                     + ("torchtune's build and load_state_dict, each weight quantized by torchao's to_nf4 twice"
                        if spec.qlora_quantizer.value == "torchao" else
                        "transformers' with bitsandbytes, each 16-bit checkpoint tensor quantized on arrival"
                        + (", then PEFT's fp32 casts" if spec.qlora_upcast else ""))
                     + ")")
    if bounded is not None:
        notes.extend(n for n in bounded.notes if n not in notes)
    return AllocatorReplay(
        alloc_conf=config.text, alloc_conf_source=source, reserved_peak_bytes=free.reserved_peak_bytes,
        allocated_peak_bytes=free.allocated_peak_bytes, requested_peak_bytes=free.requested_peak_bytes,
        segments_peak=free.segments_peak, num_events=len(allocations.events),
        source=(f"{allocations.model_class} at full size under FakeTensorMode ({allocations.attention} attention, "
                f"CUDA's semantics): the load, "
                + (f"DistributedDataParallel's construction on rank 0 of {spec.num_gpus} (a fake process group), two "
                   "warm-up steps, a measured step" if is_ddp(spec) else
                   "a warm-up step creating the optimizer state, a second step") + f" ({how})"),
        capacity_bytes=capacity_bytes,
        bounded_reserved_peak_bytes=bounded.reserved_peak_bytes if bounded is not None else None,
        num_alloc_retries=bounded.num_alloc_retries if bounded is not None else None,
        num_ooms=bounded.num_ooms if bounded is not None else None, cublas_workspace_bytes=workspace_bytes,
        notes=notes, reserved_after_load_bytes=after_load.reserved_peak_bytes if after_load is not None else None)


def predicted_reserve(replayed: AllocatorReplay, peak_bytes: int) -> int:
    """The fit's allocator reserve from a replay: what the allocator holds beyond the tensors at its reserved peak.
    Where the bounded replay fit (retries freed enough), never more than the room left beside ``peak_bytes``; where it
    ran out of memory, at least one block more than that room, so the verdict says so."""
    # (the cuBLAS workspaces are requested bytes but not in the estimate's peak: they are part of the reserve)
    tensors = replayed.requested_peak_bytes - CUBLAS_HANDLES_PER_STEP * (replayed.cublas_workspace_bytes or 0)
    overhead = max(0, replayed.reserved_peak_bytes - tensors)
    if replayed.capacity_bytes is None:
        return overhead
    room = replayed.capacity_bytes - peak_bytes
    if replayed.num_ooms:
        return max(overhead, room + MIN_BLOCK_SIZE)
    return max(0, min(overhead, room))
