"""Per-rank memory of data-parallel training, measured on torch.distributed ranks (issue 7, "How it is measured").

``measure_distributed`` runs the step of ``memcalc.measure.step`` (same model, recipe, optimizer, inputs, phases)
inside a data-parallel engine and measures every rank with the tensor tracker of ``memcalc.measure.tracker``:

  ddp     torch DistributedDataParallel (ZeRO stage 0) with its defaults: 25 MiB gradient buckets,
          ``gradient_as_bucket_view=False`` (the buckets are a second copy of the gradients).
  zero1   torch.distributed.optim.ZeroRedundancyOptimizer over DDP: optimizer states (and fp32 masters, for the
          master-weight recipes) of WHOLE parameters, assigned greedily largest-first to the least-loaded rank,
          so ranks are unbalanced.
  fsdp2   torch.distributed.fsdp.fully_shard on every decoder layer, then on the root model.
          ``reshard_after_forward`` True is ZeRO-3-like, False ZeRO-2-like (the root keeps FSDP2's default: its
          parameters stay unsharded from the end of forward into backward). For ``--precision bf16``/``fp16``
          the parameters are fp32 and ``MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=fp32)``
          casts them at all-gather time: the sharded fp32 parameters are the master copy (no separate one).

Methods:
  gloo    ``world_size`` spawned CPU processes, gloo backend, real tensors; one Measurement per rank.
  fake    one process, the fake process group (``torch.testing._internal.distributed.fake_pg``) and
          ``FakeTensorMode``: the full-size model as one rank sees it, no memory held.

Terms of each rank, beyond the single-process ones: ``comm_buffers`` (DDP gradient buckets; FSDP all-gather
inputs and outputs, i.e. the unsharded parameters, and reduce-scatter inputs) and ``unsharded_gradients``
(FSDP: the gradients autograd computes for the unsharded parameters, freed once copied into the reduce-scatter
input). ``weights`` is the parameter storage the rank holds (FSDP: its padded dim-0 shards), ``gradients`` the
gradients the optimizer reads (FSDP: the sharded reduce-scatter output, padded likewise).

Measured: step 3 for ddp/zero1 (DDP rebuilds its buckets at the start of step 2), step 2 for fsdp2. The
Measurement's ``method`` is ``gloo`` or ``fake-pg``; ``run["distributed"]`` says what ran (engine, rank, world
size, DDP bucket sizes and gradient_as_bucket_view, ZeRO-1's per-rank partition and most loaded rank, FSDP2's
policy and wrapping, timings). Under the fake group three things differ from a real run, none in a rank's step
memory: the device mesh is built before FakeTensorMode, DDP's init_sync and bucket rebuild are skipped (both read
real tensors), and DDP's comm hook returns the bucket itself (the fake group's futures carry no tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from memcalc.errors import UsageError
from memcalc.measure import fsdp
from memcalc.measure.fsdp import UNSHARDED_GRADIENTS
from memcalc.measure.measurement import Measurement
from memcalc.model import ModelConfig
from memcalc.optimizers import OptimizerName
from memcalc.spec import Sharding, TrainingSpec

__all__ = ["COMM_BUFFERS", "DIST_METHODS", "ENGINES", "UNSHARDED_GRADIENTS", "measure_distributed", "zero_stage_of"]

ENGINES = ("ddp", "zero1", "fsdp2", "tp", "pp")
DIST_METHODS = ("gloo", "fake")
METHOD_GLOO = "gloo"
METHOD_FAKE_PG = "fake-pg"  # Measurement.method of a fake-process-group trace
COMM_BUFFERS = "comm_buffers"
# Steps before the measured one. DDP rebuilds its gradient buckets at the start of step 2 (in grad-ready order),
# so DDP and ZeRO-1 measure step 3; FSDP2 is steady from step 2 on (the optimizer state exists after step 1).
WARMUP_STEPS = {"ddp": 2, "zero1": 2, "fsdp2": 1, "tp": 1, "pp": 1}
MAX_GLOO_RANKS = 16
MAX_FAKE_RANKS = 1 << 16
HOST = "127.0.0.1"
DEFAULT_TIMEOUT_S = 600.0
SEED = 0

Progress = Callable[[str], None]


def zero_stage_of(engine: str, reshard_after_forward: bool = True) -> int:
    """The ZeRO stage an engine corresponds to: ddp 0, zero1 1, fsdp2 3 (2 with reshard_after_forward=False)."""
    return {"ddp": 0, "zero1": 1, "tp": 0, "pp": 0}.get(engine, 3 if reshard_after_forward else 2)


@dataclass(frozen=True)
class _Job:
    """Everything a rank needs (picklable: sent to spawned processes)."""

    raw: dict[str, Any]
    name: str
    spec: TrainingSpec
    engine: str
    world_size: int
    reshard_after_forward: bool
    attn_implementation: str
    warmup_steps: int
    fake: bool
    allocator_check: bool = False
    allocation_events: bool = False  # ddp: keep every storage's allocation and free (the replay of --reserved)
    like_cuda: bool = False  # fake: LayerNorm's statistics as CUDA keeps them (memcalc.measure.trace.FakeKernels)
    sequence_parallel: bool = False  # tp: norms (and the residual stream) split along the sequence
    loss_parallel: bool = False  # tp: the head's output stays split over the vocabulary into the loss
    tp: int = 1  # fsdp2: tensor-parallel ranks inside each data-parallel rank (a 2-D mesh, dp x tp)
    stages: tuple[tuple[int, int], ...] = ()  # pp: each stage's decoder layers [start, end)
    pp_schedule: str = "1f1b"  # pp: gpipe | 1f1b | interleaved-1f1b (stage s on rank s mod world_size)
    microbatches: int = 1  # pp: micro-batches per step
    pp_dp: int = 1  # pp: FSDP2 data-parallel ranks per stage (a (pp, dp) mesh, as torchtitan builds it)
    pp_tp: int = 1  # pp: tensor-parallel ranks per stage (a (pp, tp) mesh; memcalc.measure.tensor_parallel's plan)
    pp_runtime: str = "torch"  # pp: torch.distributed.pipelining, or megatron-core's 1F1B schedule (megatron)
    cp: int = 1  # ddp, zero1, fsdp2: every rank a context-parallel rank too (its share of the sequence, the ring)
    ep: int = 1  # fsdp2: the experts split over ep consecutive ranks (memcalc.measure.expert_parallel)
    ep_shard_dim: int = 0  # fsdp2 with ep: the dimension FSDP2 shards the experts on (1: torchtitan's Shard(1))
    # fsdp2: HSDP, a (dp_replicate, dp_shard) mesh of dp_replicate replicas; fully_shard shards over the last dimension
    # and all-reduces across the first (torch/distributed/fsdp/_fully_shard/_fully_shard.py, HSDPMeshInfo)
    dp_replicate: int = 1


# -- the public entry point ----------------------------------------------------------------------------------
def measure_distributed(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, engine: str,
                        world_size: int, method: str = "gloo", reshard_after_forward: bool = True,
                        progress: Progress | None = None, attn_implementation: str | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S, fake_ranks: Sequence[int] = (0,),
                        allocator_check: bool = False, allocation_events: bool = False,
                        like_cuda: bool = False, sequence_parallel: bool = False,
                        loss_parallel: bool = False) -> list[Measurement]:
    """Measure one training step of ``model_config`` + ``spec`` on every data-parallel rank.

    ``method="gloo"``: ``world_size`` CPU processes; returns one Measurement per rank, in rank order.
    ``method="fake"``: one process, fake process group + FakeTensorMode; returns the Measurements of
    ``fake_ranks`` (default rank 0 only), in that order. Raises UsageError (one line) for unsupported
    combinations before anything is built; RuntimeError when a rank fails or the run exceeds ``timeout_s``.
    ``allocator_check`` (gloo): also record the CPU allocator's own allocations during the measured step (torch
    profiler) into ``run["allocator_check"]``, beside the tracker's figures. ``allocation_events`` (ddp): every storage's
    allocation and free from DDP's construction (its gradient buckets) through the warm-up and the measured step, in
    ``Measurement.allocation_events`` (memcalc.allocator.replay). ``like_cuda`` (fake): the fake kernels follow CUDA's
    LayerNorm statistics, as the estimate's traces do (the caller sets CUDA's autocast lists around the call).
    ``engine="tp"``: tensor parallelism over all ``world_size`` ranks (memcalc.measure.tensor_parallel's plan, with
    ``sequence_parallel`` and ``loss_parallel``); every rank runs the same micro-batch.
    """
    job = _plan(model_config, spec, engine=engine, world_size=world_size, method=method,
                reshard_after_forward=reshard_after_forward, attn_implementation=attn_implementation)
    if allocation_events:
        if engine != "ddp":
            raise UsageError(f"the allocation sequence of {engine} ranks is not recorded yet (ddp's is)")
        job = dataclasses.replace(job, allocation_events=True)
    job = dataclasses.replace(job, like_cuda=bool(like_cuda))
    if spec.tp > 1 and engine == "fsdp2":
        if world_size % spec.tp:
            raise UsageError(f"world size {world_size} is not divisible by {{tp}} {spec.tp}")
        job = dataclasses.replace(job, tp=spec.tp)
    if spec.cp > 1 and engine == "pp":
        # each stage's data-parallel ranks are its context-parallel ranks (torchtitan's FSDP mesh spans them)
        if job.pp_dp != spec.cp:
            raise UsageError(f"the pipeline measurement runs {{cp}} {spec.cp} over each stage's FSDP2 data-parallel "
                             f"ranks: give {{gpus}} {spec.pp * spec.cp}")
        job = dataclasses.replace(job, cp=spec.cp)
    elif spec.cp > 1:
        # over every data-parallel rank: torchtitan's FSDP mesh (dp_shard_cp) spans the context-parallel ranks
        if engine not in ("ddp", "zero1", "fsdp2") or spec.cp * job.tp != world_size:
            raise UsageError(f"the context-parallel measurement runs {{cp}} {spec.cp} over every data-parallel rank of "
                             f"ddp, zero1 or fsdp2 (torchtitan's FSDP mesh spans them): give {{gpus}} "
                             f"{spec.cp * job.tp}")
        job = dataclasses.replace(job, cp=spec.cp)
    if spec.ep > 1:
        if engine == "pp":
            if job.pp_dp % spec.ep:
                raise UsageError(f"the pipeline measurement runs {{ep}} {spec.ep} over each stage's FSDP2 "
                                 f"data-parallel ranks ({job.pp_dp}): give {{gpus}} a multiple of {spec.pp * spec.ep}")
        elif engine != "fsdp2" or world_size % spec.ep or spec.ep % job.tp:
            raise UsageError(f"the expert-parallel measurement runs {{ep}} {spec.ep} under fsdp2 (with {{tp}}, ep a "
                             f"multiple of it), over a world size it divides, not {engine} on {world_size} ranks")
        job = dataclasses.replace(job, ep=spec.ep, ep_shard_dim=spec.ep_shard_dim)
    if spec.dp_replicate > 1:
        if engine != "fsdp2" or world_size % spec.dp_replicate or job.tp > 1 or spec.cp > 1 or spec.ep > 1:
            raise UsageError(f"the hybrid-sharding measurement runs {{dp_replicate}} {spec.dp_replicate} replicas under "
                             f"fsdp2 alone (no {{tp}}, {{cp}} or {{ep}}), over a world size it divides, not {engine} on "
                             f"{world_size} ranks")
        job = dataclasses.replace(job, dp_replicate=spec.dp_replicate)
    if job.pp_tp > 1 and (job.pp_dp > 1 or spec.cp > 1 or spec.ep > 1 or sequence_parallel or loss_parallel):
        raise UsageError("pipeline stages over tensor-parallel groups are measured alone: without FSDP2 data-parallel "
                         "ranks, {cp}, {ep}, {sp} or {loss_parallel}")
    if sequence_parallel or loss_parallel:
        if engine != "tp" and job.tp == 1:
            raise UsageError(f"sequence and loss parallelism apply to the tp engine, not {engine}")
        job = dataclasses.replace(job, sequence_parallel=bool(sequence_parallel), loss_parallel=bool(loss_parallel))
    if job.pp_dp > 1 and method == "fake":
        raise UsageError("stages over FSDP2 data-parallel ranks are measured on gloo ranks, not the fake process group")
    if method == "fake":
        ranks = [r for r in fake_ranks if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < world_size]
        if not ranks or len(ranks) != len(fake_ranks):
            raise UsageError(f"fake_ranks must be ranks 0..{world_size - 1}, got {list(fake_ranks)}")
        return [_run_fake(job, rank, progress) for rank in ranks]
    _check_fits_ram(job)
    return _run_gloo(dataclasses.replace(job, allocator_check=bool(allocator_check)), progress, timeout_s)


def _plan(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, engine: str, world_size: int,
          method: str, reshard_after_forward: bool, attn_implementation: str | None) -> _Job:
    from memcalc.measure import ATTN_IMPLEMENTATIONS, _as_config, _require_torch

    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
    if method not in DIST_METHODS:
        raise UsageError(f"distributed method {method!r}: use gloo (spawned CPU ranks) or fake (fake process group)")
    limit = MAX_GLOO_RANKS if method == "gloo" else MAX_FAKE_RANKS
    if not isinstance(world_size, int) or isinstance(world_size, bool) or not 2 <= world_size <= limit:
        raise UsageError(f"world size must be a whole number from 2 to {limit} for method {method}, got {world_size!r}")
    if not isinstance(reshard_after_forward, bool):
        raise UsageError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
    if engine != "fsdp2" and not reshard_after_forward:
        raise UsageError(f"reshard_after_forward=False applies to fsdp2 only, not {engine}")
    stage = zero_stage_of(engine, reshard_after_forward)
    groups = spec.pp * spec.tp  # (pp: the stages' tensor-parallel groups, then FSDP2 over them)
    pp_dp = world_size // groups if engine == "pp" and world_size % groups == 0 else 1
    if engine == "pp" and pp_dp > 1:
        if spec.sharding != Sharding.fsdp or spec.zero_stage < 2:
            raise UsageError(f"the pipeline measurement on {world_size} ranks runs {{pp}} {spec.pp} stages over FSDP2 "
                             "data-parallel ranks: give {sharding} fsdp with {zero} 2 or 3")
        reshard_after_forward = spec.zero_stage == 3
    elif spec.zero_stage and spec.zero_stage != stage:
        raise UsageError(f"{{zero}} {spec.zero_stage} does not match engine {engine} (ZeRO stage {stage}"
                         f"{', reshard_after_forward=' + str(reshard_after_forward) if engine == 'fsdp2' else ''})")
    if spec.num_gpus not in (1, world_size):
        raise UsageError(f"{{gpus}} {spec.num_gpus} does not match the world size {world_size}")
    if spec.grad_accum != 1:
        raise UsageError(f"{{grad_accum}} {spec.grad_accum}: the distributed measurement runs one micro-batch per "
                         "optimizer step (no DDP no_sync / FSDP2 unreduced accumulation yet); drop {grad_accum}")
    if engine == "pp" and groups * pp_dp != world_size:
        raise UsageError("the pipeline measurement runs {pp} x {tp} ranks, or {pp} x the FSDP2 data-parallel ranks")
    if engine == "tp" and spec.tp not in (1, world_size):
        raise UsageError(f"{{tp}} {spec.tp} does not match the world size {world_size}")
    if engine == "fsdp2" and spec.optimizer == OptimizerName.adafactor:
        raise UsageError("{optim} adafactor with fsdp2: transformers' Adafactor mixes plain tensors into updates of "
                         "the DTensor shards and fails; use adamw, adam, sgd or sgd-momentum")
    _require_torch()
    config = _as_config(model_config)
    attn = attn_implementation or ATTN_IMPLEMENTATIONS[spec.attention.value]
    from memcalc.measure.step import resolve_setup

    single = spec.replace(zero_stage=0, num_gpus=1, num_nodes=1, sharding="deepspeed", offload="none", tp=1, cp=1, ep=1, ep_load=1.0, ep_shard_dim=0,
                          dp_replicate=1,
                          seq_len=spec.local_seq_len,  # (--cp: this rank's share of the sequence)
                          sequence_parallel=False, loss_parallel=False, pp=1, pp_layers=None, microbatches=None,
                          pp_schedule="1f1b", pp_virtual=None)
    resolve_setup(single, attn)  # the single-rank checks (QLoRA, freeze, optimizers, dtypes) with their messages
    if spec.lora_rank is not None:
        raise UsageError("verify on several ranks does not yet run LoRA (PEFT's adapters under DDP/FSDP); drop "
                         "{gpus} to verify it on one")
    from memcalc.measure.build import hf_config, model_class

    built = hf_config(config.raw)
    model_class(built)  # an unbuildable config fails here, in one line, not in every rank
    stages: tuple[tuple[int, int], ...] = ()
    if engine == "pp":
        from memcalc import pipeline

        stages = pipeline.spec_ranges(spec, int(built.get_text_config().num_hidden_layers))
    return _Job(raw=dict(config.raw), name=config.name, spec=single, engine=engine, world_size=world_size,
                reshard_after_forward=reshard_after_forward, attn_implementation=attn,
                warmup_steps=WARMUP_STEPS[engine], fake=method == "fake", stages=stages,
                pp_schedule=spec.pp_schedule.value, microbatches=spec.microbatches or 1, pp_dp=pp_dp,
                pp_tp=spec.tp if engine == "pp" else 1,
                pp_runtime=spec.pipeline_runtime)



def _check_fits_ram(job: _Job) -> None:
    """Every gloo rank holds a real model: refuse a run whose ranks together would exceed half the RAM."""
    from memcalc.measure import CPU_RAM_FRACTION, _as_config, estimate_for, ram_bytes
    from memcalc.units import format_bytes

    total = ram_bytes()
    if total is None:
        return
    report = estimate_for(_as_config({**job.raw, "_name": job.name}), job.spec)
    per_rank = report.per_gpu.peak_bytes  # one unsharded rank: an upper bound for zero1 and fsdp2
    if job.engine in ("ddp", "zero1"):
        per_rank += sum(t.bytes for t in report.per_gpu.terms if t.name == "gradients")  # the gradient buckets
    if per_rank * job.world_size > CPU_RAM_FRACTION * total:
        raise UsageError(f"{job.world_size} gloo ranks of about {format_bytes(per_rank)} each would exceed half of "
                         f"this machine's {format_bytes(total)} RAM; use method fake (no memory) or a smaller config")


# -- gloo: spawned CPU ranks ------------------------------------------------------------------------------------
def _run_gloo(job: _Job, progress: Progress | None, timeout_s: float) -> list[Measurement]:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    say = progress or (lambda _msg: None)
    # The parent holds the rendezvous store on a port the OS picks (no free-port race); ranks connect to it.
    store = dist.TCPStore(HOST, 0, job.world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    ctx = _process_context(mp, job)
    results = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(job, rank, store.port, timeout_s, results), daemon=True,
                         name=f"memcalc-gloo-rank{rank}") for rank in range(job.world_size)]
    say(f"spawning {job.world_size} gloo ranks ({job.engine})")
    measured: dict[int, Measurement] = {}
    deadline = time.monotonic() + timeout_s
    try:
        with _main_module_hidden():
            for proc in procs:
                proc.start()
        while len(measured) < job.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"gloo {job.engine} run timed out after {timeout_s:g} s "
                                   f"({len(measured)} of {job.world_size} ranks done)")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"gloo rank process {dead[0].name} exited with code {dead[0].exitcode} "
                                       "before reporting") from None
                continue
            if status == "ok":
                measured[rank] = payload
                say(f"rank {rank} measured")
                continue
            kind, message, trace = payload
            if kind == "UsageError":
                raise UsageError(message)
            error = RuntimeError(f"gloo rank {rank} failed: {kind}: {message}")
            error.add_note(trace)
            raise error
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:  # only the processes started here, by object
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            if proc.pid is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=10)
        results.close()
        results.join_thread()
        del store
    return [measured[rank] for rank in range(job.world_size)]


def _process_context(mp, job: _Job):
    """forkserver where there is one (Linux, macOS): its server imports torch, transformers and the model's
    modelling module once per parent process, and every rank after that is forked from it in milliseconds
    (nothing it forks has run a torch op or started a thread). Elsewhere spawn."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    from memcalc.measure.build import config_fields

    model_type = config_fields(job.raw)[0].replace("-", "_")
    preload = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.optim", "transformers",
               "memcalc.measure.step", __name__]
    if model_type.isidentifier():
        preload.append(f"transformers.models.{model_type}.modeling_{model_type}")
    ctx.set_forkserver_preload(preload)  # used when the server starts (first call); a running one keeps its own
    return ctx


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While ranks are started: spawn re-runs the parent's ``__main__`` in each child unless it cannot find it;
    the ranks need only this module, so an unguarded script or a notebook calling this is not re-executed."""
    import sys
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _gloo_worker(job: _Job, rank: int, port: int, timeout_s: float, results) -> None:
    """One spawned rank: join the gloo group, measure, report (never raises: the parent reads the queue)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(HOST, port, job.world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=job.world_size, timeout=timeout)
        try:
            mesh = _device_mesh(job)
            with _mesh_join(mesh):
                measurement = _measure(job, rank, mesh)
            measurement.method = METHOD_GLOO
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", measurement))
    except BaseException as exc:  # noqa: BLE001 - report everything (KeyboardInterrupt too) to the parent, exit
        results.put((rank, "error", (type(exc).__name__, (str(exc).splitlines() or [""])[0],
                                     traceback.format_exc())))


def _measure(job: _Job, rank: int, mesh, progress: Progress | None = None) -> Measurement:
    """One rank's measured step: a pipeline stage (memcalc.measure.pipeline), or a data/tensor-parallel rank."""
    with _collector_sees_only_the_rank():
        if job.engine == "pp":
            from memcalc.measure.pipeline import measure_stage

            return measure_stage(job, rank, _dist_tracker_class, COMM_BUFFERS, SEED, mesh)
        return _measure_rank(job, rank, mesh, progress=progress)


@contextlib.contextmanager
def _collector_sees_only_the_rank() -> Iterator[None]:
    """While a rank is measured, what existed before it (the imported libraries; in a fake group, the caller's own
    objects) sits in the cyclic collector's permanent generation (``gc.freeze``). The full collection before the
    measured step then walks only what the rank made: its model and the warm-up step's garbage, which is what it is
    there to free. (A process holding torch and transformers has some millions of objects: walking them took a quarter
    to half a second per rank here, and in a rank forked from the server, it also wrote to every page it shares.) Unfrozen
    after: the caller's objects are collectable again. A process that froze objects itself keeps them as it had them:
    nothing is frozen then (its ranks collect everything, as before)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _mesh_join(mesh) -> Iterator[None]:
    """FSDP2 joins its data-parallel mesh with a DTensor parameter's tensor-parallel one (DeviceMesh._concatenate),
    which reads the meshes' rank tensors: joined once here, outside FakeTensorMode, and handed back while the block
    runs."""
    if isinstance(mesh, tuple) and len(mesh) == 2 and getattr(mesh[0], "mesh_dim_names", None) == ("dp", "tp"):
        mesh = mesh[0]  # (--ep with --tp: the dense mesh)
    if mesh is None or isinstance(mesh, tuple) or mesh.mesh_dim_names != ("dp", "tp"):
        yield
        return
    from torch.distributed.device_mesh import DeviceMesh

    joined = DeviceMesh._concatenate([mesh["dp"], mesh["tp"]])
    original = DeviceMesh.__dict__["_concatenate"]

    def concatenate(meshes):
        names = tuple(name for m in meshes for name in (m.mesh_dim_names or ()))
        return joined if names == ("dp", "tp") else original.__func__(meshes)

    DeviceMesh._concatenate = staticmethod(concatenate)
    try:
        yield
    finally:
        DeviceMesh._concatenate = original


def _device_mesh(job: _Job):
    if job.engine not in ("fsdp2", "tp") and job.pp_dp == 1 and job.pp_tp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if job.engine == "pp" and job.pp_tp > 1:  # the stages over the outer dimension, each a tensor-parallel group
        return init_device_mesh("cpu", (job.world_size // job.pp_tp, job.pp_tp), mesh_dim_names=("pp", "tp"))

    if job.engine == "pp" and job.ep > 1:
        # each stage's data-parallel ranks split into (efsdp, ep), the ep ranks consecutive (torchtitan's
        # (pp, dp_shard, ep) order); "dp" the two flattened, FSDP2's mesh for the rest of the stage
        from memcalc.measure.expert_parallel import one_rank_tp_mesh

        stages = init_device_mesh("cpu", (job.world_size // job.pp_dp, job.pp_dp // job.ep, job.ep),
                                  mesh_dim_names=("pp", "efsdp", "ep"))
        named = {name: stages[name] for name in ("pp", "efsdp", "ep")}
        return {**named, "dp": stages["efsdp", "ep"]._flatten("dp")}, one_rank_tp_mesh(job.world_size)
    if job.engine == "pp":  # the stages over the outer dimension, FSDP2 over the inner one (torchtitan's order)
        return init_device_mesh("cpu", (job.world_size // job.pp_dp, job.pp_dp), mesh_dim_names=("pp", "dp"))

    if job.ep > 1 and job.tp > 1:
        # transformers' two views of the world: the dense (fsdp, tp) mesh and the experts' (efsdp, ep), ep spanning
        # whole tp groups (transformers distributed/utils.py TransformersDeviceMesh)
        dense = init_device_mesh("cpu", (job.world_size // job.tp, job.tp), mesh_dim_names=("dp", "tp"))
        experts = init_device_mesh("cpu", (job.world_size // job.ep, job.ep), mesh_dim_names=("efsdp", "ep"))
        return dense, experts
    if job.ep > 1:  # the world's FSDP mesh, and the experts' (efsdp, ep) one
        from memcalc.measure.expert_parallel import meshes

        return meshes(job.world_size, job.ep)
    if job.tp > 1:  # FSDP2 over the data-parallel dimension of a (dp, tp) mesh, as torchtitan builds it
        return init_device_mesh("cpu", (job.world_size // job.tp, job.tp), mesh_dim_names=("dp", "tp"))
    if job.dp_replicate > 1:
        # HSDP: torchtitan's and torchtune's (dp_replicate, dp_shard) mesh, the replicas outermost; fully_shard(mesh=)
        # of a 2-D mesh shards over dimension 1 and replicates over dimension 0
        return init_device_mesh("cpu", (job.dp_replicate, job.world_size // job.dp_replicate),
                                mesh_dim_names=("dp_replicate", "dp_shard"))

    # (outside FakeTensorMode: it reads real rank tensors)
    return init_device_mesh("cpu", (job.world_size,), mesh_dim_names=(job.engine,))


# -- fake: one process, fake process group + FakeTensorMode -----------------------------------------------------
def _run_fake(job: _Job, rank: int, progress: Progress | None) -> Measurement:
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from memcalc.measure.trace import FakeKernels, unpacked_sequences

    if dist.is_initialized():
        raise UsageError("the fake process group needs this process to have no default process group; "
                         "run it in a fresh process")
    say = progress or (lambda _msg: None)
    say(f"fake process group: rank {rank} of {job.world_size} ({job.engine})")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=job.world_size)
    try:
        mesh = _device_mesh(job)
        # allow_non_fake_inputs: module code may mix in real constants (e.g. a scalar made before the mode).
        with _mesh_join(mesh), FakeTensorMode(allow_non_fake_inputs=True), unpacked_sequences(), \
                FakeKernels(job.like_cuda):
            measurement = _measure(job, rank, mesh, progress)
    finally:
        dist.destroy_process_group()
    measurement.method = METHOD_FAKE_PG
    measurement.run["tensors"] = "fake (FakeTensorMode, no memory)"
    return measurement


# -- one rank --------------------------------------------------------------------------------------------------
def _dist_tracker_class():
    """The tracker of memcalc.measure.step, extended for distributed engines (built lazily: imports torch)."""
    import weakref

    import torch
    from torch.distributed.tensor import DTensor

    from memcalc.measure import tracker as trk
    from memcalc.measure.step import _OpNames

    wait_tensor = torch.ops._c10d_functional.wait_tensor.default

    class DistTracker(_OpNames):
        """Adds the ``comm_buffers`` and ``unsharded_gradients`` categories; unwraps DTensors to their local
        shards (DTensor ops are let through to DTensor, whose local ops the tracker then sees); follows
        ``UntypedStorage.resize_``, which FSDP2 uses to free and re-allocate unsharded parameters and which no
        dispatch mode sees; counts what FSDP2's collective functions allocate as ``comm_buffers``."""

        def __init__(self) -> None:
            super().__init__()
            for category in (COMM_BUFFERS, UNSHARDED_GRADIENTS):
                self.by_category[category] = 0
                self.category_max[category] = 0
            self.peak.by_category = dict(self.by_category)
            self._comm_depth = 0
            self.paused = 0  # inside DTensor's sharding propagation (tensor_parallel.untracked_propagation)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented
            if self.paused:
                return func(*args, **(kwargs or {}))
            if func is wait_tensor and args and isinstance(args[0], torch.Tensor):
                return self._waited(func, args, kwargs)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _waited(self, func, args, kwargs):
            """``wait_tensor`` returns its input on a device (the collective's output, now complete); its fake kernel
            returns a new tensor, the input released right after: the new storage takes the input's record over
            instead of counting the same bytes twice."""
            out = func(*args, **(kwargs or {}))
            source, result = trk._storage_of(args[0]), trk._storage_of(out)
            if source is None or result is None or source is result:
                return out
            with self._lock:
                rec = self._records.pop(id(source), None)
                if rec is not None:
                    self._adopt(result, rec)
            return out

        def _adopt(self, storage, rec) -> None:
            key = id(storage)  # (rec.key, the allocation's name in the recorded events, stays)
            rec.ref = weakref.ref(storage, lambda _ref, k=key: self._free(k))
            self._records[key] = rec

        def _classify(self, t, category: str) -> None:
            super()._classify(fsdp.local(t), category)

        def _not_memory(self, t) -> bool:
            # A functional collective's AsyncCollectiveTensor (gloo, NCCL: the result not yet waited on) and the views
            # made of it are wrappers whose own storage is a stand-in: the collective's output tensor inside is what
            # holds the memory, counted when the collective made it. (The fake process group completes at once and
            # returns plain tensors.)
            return type(t).__name__ == "AsyncCollectiveTensor"

        def _category_for_new(self, func, args, kwargs) -> str:
            if self._comm_depth:
                return COMM_BUFFERS
            return super()._category_for_new(func, args, kwargs)

        @contextlib.contextmanager
        def communication(self) -> Iterator[None]:
            with self._lock:
                self._comm_depth += 1
            try:
                yield
            finally:
                with self._lock:
                    self._comm_depth -= 1

        def storage_resized(self, storage) -> None:
            nbytes = int(storage.nbytes())
            with self._lock:
                rec = self._records.get(id(storage))
                if rec is not None:
                    if nbytes != rec.nbytes:
                        self._resize(rec, nbytes)
                elif nbytes:
                    self._add(storage, COMM_BUFFERS if self._comm_depth else self._category_for_new(None, (), {}))

    return DistTracker, trk, torch


class _Parameters:
    """Something with ``parameters()``, as memcalc's Stepper takes a module."""

    def __init__(self, params) -> None:
        self._params = list(params)

    def parameters(self):
        return iter(self._params)


def _shard_optimizer_class():
    import torch

    from memcalc.measure.step import Stepper

    class ShardOptimizer(torch.optim.Optimizer):
        """ZeroRedundancyOptimizer's local optimizer: steps this rank's share of the parameters with memcalc's
        Stepper, so the recipe's fp32 masters exist for the share only (as DeepSpeed stage 1 partitions them)."""

        def __init__(self, params, *, setup) -> None:
            groups = list(params)
            mine = [p for group in groups for p in group["params"]]
            self.stepper = Stepper(_Parameters(mine), setup)
            super().__init__(groups, {})

        def step(self, closure=None):  # ZeroRedundancyOptimizer passes no closure; the loss is not needed
            self.stepper.step()

    return ShardOptimizer


class _ZeroStepper:
    """The one_step interface over ZeroRedundancyOptimizer."""

    def __init__(self, zero, params) -> None:
        self.zero = zero
        self.params = list(params)
        self.inner = zero.optim.stepper
        self.masters = self.inner.masters
        self.optimizer = self.inner.optimizer
        self.fused = self.inner.fused

    @property
    def on_master_grads(self):
        return self.inner.on_master_grads

    @on_master_grads.setter
    def on_master_grads(self, fn) -> None:
        self.inner.on_master_grads = fn

    def step(self) -> None:
        self.zero.step()

    def zero_grad(self) -> None:
        self.zero.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def state_tensors(self):
        return self.inner.state_tensors()


class _RebuildlessReducer:
    """Fake process group only: DDP's bucket rebuild (start of step 2) broadcasts bucket indices through real
    tensors it reads on the host, which fake tensors cannot provide; the rebuild is skipped. The buckets keep
    their construction-time grouping (with find_unused_parameters=False, one bucket of every parameter) instead
    of 25 MiB buckets in grad-ready order: the total, every gradient once, is the same."""

    def __init__(self, reducer) -> None:
        object.__setattr__(self, "_reducer", reducer)

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def _decoder_layers(model) -> list:
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UsageError(f"fsdp2: found no decoder layers in {type(model).__name__} (its _no_split_modules: "
                         f"{sorted(names) or 'none'}) to shard one by one")
    return layers


def _measure_rank(job: _Job, rank: int, mesh, progress: Progress | None = None) -> Measurement:
    DistTracker, trk, torch = _dist_tracker_class()
    import torch.distributed as dist

    from memcalc.measure.step import (
        PhaseClock,
        StepResult,
        _TrackerClock,
        build_model,
        dropout_probabilities,
        make_batch,
        one_step,
        resolve_setup,
        storage_bytes,
        to_measurement,
        watch_step,
    )

    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    setup = resolve_setup(job.spec, job.attn_implementation, "cpu")
    policy = None
    if job.engine == "fsdp2":
        setup, policy = fsdp.fsdp_setup(setup)
    torch.manual_seed(SEED)
    say("building the model")
    model = build_model(job.raw, setup)
    model_class_name = type(model).__name__
    num_params = sum(p.numel() for p in model.parameters())
    dist_info: dict[str, Any] = {"engine": job.engine,
                                 "zero_stage": zero_stage_of(job.engine, job.reshard_after_forward),
                                 "world_size": job.world_size, "rank": rank,
                                 "backend": "fake" if job.fake else "gloo", "warmup_steps": job.warmup_steps,
                                 "measured_step": job.warmup_steps + 1}
    comm_baseline: list = []
    received: list[int] = []  # ep: the (token, expert) pairs this rank received, per experts forward
    ddp = None
    events: list[tuple[int, int, int]] | None = None
    log = contextlib.nullcontext()
    if job.allocation_events:
        # the loaded model, then DDP's construction (its buckets), the batch and the warm-up steps
        log = DistTracker()
        log.events = events = []
        log.register([fsdp.local(p) for p in model.parameters()], trk.WEIGHTS)
        log.register(model.buffers(), trk.OTHER)
    with log:
        if job.engine in ("ddp", "zero1"):
            runner, stepper, ddp = _wrap_ddp(job, model, setup, comm_baseline, dist_info)
        elif job.engine == "tp":
            from memcalc.measure.tensor_parallel import wrap

            runner, stepper = wrap(model, setup, mesh, job.sequence_parallel, job.loss_parallel, dist_info)
        elif job.tp > 1 and job.ep > 1:
            # transformers' layout: the dense part tensor-parallel (memcalc's plan), the experts expert-parallel over
            # ep ranks spanning the tp groups, each tp rank dispatching its slice of the tokens
            from torch.distributed.fsdp import MixedPrecisionPolicy

            from memcalc.measure import expert_parallel
            from memcalc.measure.tensor_parallel import parallelize

            dense, experts_mesh = mesh
            dist_info.update(parallelize(model, dense["tp"], job.sequence_parallel, job.loss_parallel,
                                         experts_parallel=True))
            dist_info.update(expert_parallel.parallelize(
                model, experts_mesh["ep"], dense["tp"], experts_mesh["efsdp"], policy or MixedPrecisionPolicy(),
                dense["dp"].size(), received, job.ep_shard_dim, job.reshard_after_forward))
            runner, stepper = _wrap_fsdp2(job, model, setup, policy, dense["dp"], dist_info)
            if job.sequence_parallel:
                from memcalc.measure.tensor_parallel import Runner

                runner = Runner(runner, True)
        elif job.tp > 1:
            from memcalc.measure.tensor_parallel import parallelize

            dist_info.update(parallelize(model, mesh["tp"], job.sequence_parallel, job.loss_parallel))
            runner, stepper = _wrap_fsdp2(job, model, setup, policy, mesh["dp"], dist_info)
            if job.sequence_parallel:
                from memcalc.measure.tensor_parallel import Runner

                runner = Runner(runner, True)
        elif job.ep > 1:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            from memcalc.measure.expert_parallel import parallelize

            world, experts_mesh, tp_mesh = mesh
            dist_info.update(parallelize(model, experts_mesh["ep"], tp_mesh, experts_mesh["efsdp"],
                                         policy or MixedPrecisionPolicy(), job.world_size, received,
                                         job.ep_shard_dim, job.reshard_after_forward))
            runner, stepper = _wrap_fsdp2(job, model, setup, policy, world, dist_info)
        else:
            runner, stepper = _wrap_fsdp2(job, model, setup, policy, mesh, dist_info)
        batch, batch_notes = make_batch(model, setup)
        timings = {"build": time.perf_counter() - started}
        for step in range(job.warmup_steps):
            say(f"warm-up step {step + 1} of {job.warmup_steps}")
            comm_baseline.clear()  # DDP: the buckets of the last warm-up step are the ones in use
            received.clear()
            with _step_context(job, mesh):
                one_step(runner, stepper, batch, setup, PhaseClock())
    if events is not None:
        log.events = None  # the measured step's tracker records the rest
    timings["warmup"] = time.perf_counter() - started - timings["build"]
    if ddp is not None:
        dist_info["bucket_bytes"] = [int(t.untyped_storage().nbytes()) for t in comm_baseline]
    fsdp_params = fsdp.fsdp_params(model) if job.engine == "fsdp2" else []

    tracker = DistTracker()
    local_params = [fsdp.local(p) for p in model.parameters()]
    tracker.register(local_params, trk.WEIGHTS)
    tracker.register(stepper.masters, trk.MASTER)
    tracker.register(model.buffers(), trk.OTHER)
    tracker.register(batch.values(), trk.OTHER)
    tracker.register(comm_baseline, COMM_BUFFERS)
    if fsdp_params:
        tracker.register([t for fp in fsdp_params for t in fp.all_gather_outputs], COMM_BUFFERS)
        tracker.watch_gradients([fp._unsharded_param for fp in fsdp_params if hasattr(fp, "_unsharded_param")],
                                UNSHARDED_GRADIENTS)
    else:
        tracker.watch_gradients(model.parameters())
    watch_step(tracker, model, stepper)
    grads: dict[str, int] = {}
    params = list(model.parameters())

    def after_backward() -> None:
        local_grads = [fsdp.local(p.grad) for p in params if p.grad is not None]
        tracker.register(local_grads, trk.GRADIENTS)  # FSDP2: the reduce-scatter output, now the sharded grads
        grads[trk.GRADIENTS] = storage_bytes(local_grads)

    instrument = fsdp.instrument_fsdp(tracker) if fsdp_params else contextlib.nullcontext()
    profiler = trk.allocator_profiler() if job.allocator_check else contextlib.nullcontext()
    say("measured step")
    received.clear()
    tracker.events = events
    # Python's cyclic collector runs when its allocation counts say so, which gloo's threads shift from run to run: a
    # buffer in a reference cycle (FSDP2's deferred all-gather state) was freed at varying moments. Collected before
    # the step and paused during it, as the CUDA step does (memcalc.measure.cuda), every run frees the same tensors at
    # the same moments.
    gc.collect()
    gc.disable()
    try:
        with profiler as prof, instrument, _step_context(job, mesh), _untracked(job, tracker), tracker:
            one_step(runner, stepper, batch, setup, _TrackerClock(tracker, None), after_backward)
    finally:
        gc.enable()
        tracker.remove_hooks()
        tracker.events = None
    if job.ep > 1:
        dist_info["ep_received_pairs"] = list(received)
    if job.allocator_check:
        peak, end = trk.allocator_peak_and_end(prof)
        dist_info["allocator_check"] = {"allocator_peak_delta": peak, "allocator_end_delta": end,
                                        "tracker_peak_delta": tracker.peak_bytes - tracker.baseline_bytes,
                                        "tracker_end_delta": tracker.live_bytes - tracker.baseline_bytes}
    timings["measured"] = time.perf_counter() - started - timings["build"] - timings["warmup"]
    dist_info["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    dist.barrier()
    states = stepper.state_tensors()
    model_state = {
        trk.WEIGHTS: storage_bytes(local_params),
        trk.MASTER: storage_bytes(stepper.masters),
        trk.GRADIENTS: grads.get(trk.GRADIENTS, 0),
        trk.OPTIMIZER_STATES: storage_bytes(fsdp.local(t) for ts in states.values() for t in ts),
    }
    result = StepResult(
        setup=setup, tracker=tracker, model_class=model_class_name, num_params=num_params,
        model_state_bytes=model_state,
        optimizer_state_breakdown={k: storage_bytes(fsdp.local(t) for t in v) for k, v in states.items()},
        ops_seen=tracker.ops_seen, dropout=dropout_probabilities(job.raw),
        elapsed_seconds=time.perf_counter() - started, notes=batch_notes, allocation_events=events,
    )
    measurement = to_measurement("trace" if job.fake else "cpu-tracker", result)
    measurement.run["distributed"] = dist_info
    measurement.differences_from_gpu.extend(_differences_from_gpu(job, policy))
    measurement.notes.extend(_notes(job, policy))
    return measurement


def _wrap_ddp(job: _Job, model, setup, comm_baseline: list, dist_info: dict[str, Any]):
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from memcalc.measure.step import Stepper

    # Defaults: bucket_cap_mb=25 (first bucket 1 MiB after the rebuild), gradient_as_bucket_view=False.
    # init_sync (parameter check and broadcast from rank 0) reads real data: skipped under the fake group.
    ddp = DistributedDataParallel(model, init_sync=not job.fake)
    group = dist.group.WORLD

    def hook(_state, bucket):
        # Records each bucket's flat buffer (the tracker counts it as comm_buffers), then reduces it as DDP's
        # built-in allreduce does (torch's allreduce_hook: divide by the world size in place, allreduce).
        buffer = bucket.buffer()
        comm_baseline.append(buffer)
        if not job.fake:
            return default_hooks.allreduce_hook(group, bucket)
        buffer.div_(job.world_size)
        dist.all_reduce(buffer, group=group)
        done = torch.futures.Future()
        done.set_result(buffer)  # the fake group's future carries no tensor
        return done

    ddp.register_comm_hook(None, hook)
    if job.fake:
        ddp.reducer = _RebuildlessReducer(ddp.reducer)
    dist_info.update(gradient_as_bucket_view=bool(ddp.gradient_as_bucket_view),
                     bucket_cap_bytes=int(ddp.bucket_bytes_cap), bucket_rebuild=not job.fake)
    if job.engine == "ddp":
        return ddp, Stepper(model, setup), ddp
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    zero = ZeroRedundancyOptimizer(params, optimizer_class=functools.partial(_shard_optimizer_class(), setup=setup))
    partition = zero._partition_parameters()
    numels = [sum(p.numel() for group in groups for p in group["params"]) for groups in partition]
    dist_info.update(zero_partition_numel=numels, zero_most_loaded_rank=max(range(len(numels)), key=numels.__getitem__),
                     zero_local_params=sum(len(g["params"]) for g in partition[dist.get_rank()]))
    return ddp, _ZeroStepper(zero, params), ddp


def _wrap_fsdp2(job: _Job, model, setup, policy, mesh, dist_info: dict[str, Any]):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from memcalc.measure.step import Stepper

    layers = _decoder_layers(model)
    mp_policy = policy or MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=job.reshard_after_forward, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)  # root: FSDP2's default reshard (none after forward)
    dist_info.update(
        reshard_after_forward=job.reshard_after_forward, wrapped_layers=len(layers),
        wrapped_layer_class=type(layers[0]).__name__,
        mixed_precision_policy=(f"param_dtype={str(policy.param_dtype).removeprefix('torch.')}, "
                                f"reduce_dtype={str(policy.reduce_dtype).removeprefix('torch.')}") if policy else None,
        root="fully_shard(model) after the layers: embeddings, final norm and LM head; not resharded after forward",
    )
    if job.dp_replicate > 1:
        dist_info.update(dp_replicate=job.dp_replicate, dp_shard=job.world_size // job.dp_replicate,
                         mesh="(dp_replicate, dp_shard): sharded over dp_shard, all-reduced across dp_replicate")
    return model, Stepper(model, setup)


def _untracked(job: _Job, tracker):
    """tp: what DTensor's sharding propagation allocates to learn output shapes is not the rank's memory."""
    if job.engine != "tp" and job.tp == 1:
        return contextlib.nullcontext()
    from memcalc.measure.tensor_parallel import untracked_propagation

    return untracked_propagation(tracker)


@contextlib.contextmanager
def _step_context(job: _Job, mesh=None) -> Iterator[None]:
    """What the step runs inside: cp, the ring attention over the data-parallel ranks (the world, or the dp dimension
    of a (dp, tp) mesh; memcalc.measure.context_parallel); tp with loss parallelism, torch's loss_parallel() around
    the loss's forward and backward."""
    with contextlib.ExitStack() as stack:
        if job.cp > 1:
            import torch.distributed as dist

            from memcalc.measure.context_parallel import ring_attention

            dense = mesh[0] if isinstance(mesh, tuple) and job.tp > 1 else mesh  # (--ep with --tp: the dense mesh)
            stack.enter_context(ring_attention(dense["dp"].get_group() if job.tp > 1 else dist.group.WORLD))
        if job.loss_parallel:
            from torch.distributed.tensor.parallel import loss_parallel

            stack.enter_context(loss_parallel())
        yield


def _notes(job: _Job, policy) -> list[str]:
    notes = [("every rank runs the same micro-batch (same seed); data parallelism does not shrink a rank's "
              "activations") if job.cp == 1 else
             (f"every rank runs its {job.spec.seq_len:,} positions of one micro-batch's sequences (context parallelism "
              f"over the {job.cp} ranks: torch's ring attention in place of sdpa, memcalc.measure.context_parallel)"),
             f"measured step {job.warmup_steps + 1} after {job.warmup_steps} warm-up step(s)"]
    if job.engine in ("ddp", "zero1"):
        notes.append("DDP defaults: bucket_cap_mb=25, gradient_as_bucket_view=False, so the gradient buckets "
                     "(comm_buffers) are a second copy of the gradients, alive for the whole run; the buckets are "
                     "found through a comm hook that runs torch's allreduce_hook (what the built-in allreduce does); "
                     "the bucket rebuild at the start of step 2 briefly holds the old and the new buckets (twice the "
                     "gradient size, before that step's forward, outside the measured step)")
        if job.fake:
            notes.append("fake process group: DDP's bucket rebuild is skipped (it reads real tensors), so the "
                         "buckets keep DDP's construction-time grouping, one bucket of every gradient, instead of "
                         "25 MiB buckets; same total bytes. DDP's init_sync (parameter broadcast) is skipped too")
    if job.engine == "zero1":
        notes.append("ZeroRedundancyOptimizer assigns whole parameters, largest first, to the least-loaded rank: "
                     "optimizer states (and fp32 masters for bf16/fp16) differ between ranks; weights and gradients "
                     "are full on every rank")
    if job.engine == "fsdp2":
        notes.append("fsdp2 shards every parameter on dim 0 into world-size chunks padded to ceil(dim0 / world) rows "
                     "(weights and gradients hold the padded shard; optimizer states the unpadded local rows)")
        if policy is not None:
            notes.append("--precision bf16/fp16 with fsdp2: fp32 sharded parameters (the master copy) with "
                         f"MixedPrecisionPolicy({str(policy.param_dtype).removeprefix('torch.')} parameters at "
                         "all-gather, fp32 reduce-scatter); no separate master_weights")
    if job.fake:
        notes.append("fake process group: collectives move no data; the rank's own allocations are traced")
    return notes


def _differences_from_gpu(job: _Job, policy) -> list[str]:
    found = [
        ("gloo vs NCCL, outside the tracker (it sees the tensors a collective is given, not what the backend "
         "allocates inside it): gloo's reduce_scatter_tensor clones its whole input and all-reduces the clone "
         "(an input-sized temporary alive until the work is waited), and its all_gather_into_tensor gathers into "
         "a flat temporary of the output's size on a gloo thread before copying out; gloo's all_reduce and broadcast "
         "(DDP, ZeRO-1) allocate nothing. NCCL reduce-scatters and all-gathers in place, but keeps per-communicator "
         "device buffers (NCCL_BUFFSIZE, about 4 MiB per channel and peer by default) outside PyTorch's caching "
         "allocator, which max_memory_allocated does not show. allocator_check=True reports the CPU allocator's own "
         "peak beside the tracker's"),
        ("CPU has no CUDA streams and no caching allocator: on a GPU FSDP2's all-gather and reduce-scatter tensors "
         "live in the allocator pools of its side streams, a freed block is reused by another stream only once "
         "that stream's work is done, and allocations round up to 512-byte blocks in 2 MiB or larger segments: "
         "more reserved than allocated; the tracker's figure corresponds to max_memory_allocated, not "
         "max_memory_reserved"),
    ]
    if job.engine == "fsdp2":
        found.append("FSDP2 runs the same Python on CPU and CUDA: the all-gather result it keeps until the next "
                     "layer's copy-out (forward) and the next layer it prefetches in backward are live here as on a "
                     "GPU, so two units' unsharded parameters overlap in both")
        found.append("FSDP2 reduce-scatter: on NCCL with fp32/bf16 it averages inside the collective "
                     "(ReduceOp.AVG); the reduce-scatter input and output FSDP2 allocates are the same here")
    if job.engine in ("ddp", "zero1"):
        found.append("DDP on CUDA allocates its buckets on the device as here (one flat tensor per bucket in the "
                     "gradient dtype); with gradient_as_bucket_view=True (not the default) p.grad would view the "
                     "buckets and the second gradient copy would disappear")
    return found
