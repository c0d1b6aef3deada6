"""Run a real training step for a ModelConfig + TrainingSpec and measure it with the tensor tracker.

The run is exactly the estimate's: recipe (dtypes), optimizer and its implementation (passed explicitly:
CPU and CUDA defaults differ), attention implementation, checkpointing, micro-batch and sequence length.
The model is the transformers class named in the config's ``architectures`` (never remote code), built
from the config with random weights (nothing is downloaded).

A step, as HF Trainer's ``training_step`` runs it: forward (under torch.autocast for amp-*) with labels, so the
model computes its own loss; the model output is dropped, only the loss is kept; ``loss.backward()``; the
optimizer step; ``zero_grad(set_to_none=True)``. Step 0 (warm-up) creates the optimizer state;
step 1 is measured.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from memcalc.errors import UsageError
from memcalc.measure import build
from memcalc.measure import tracker as trk
from memcalc.measure.measurement import Measurement
from memcalc.model import ModelConfig
from memcalc.optimizers import OptimImpl, OptimizerName, OptimizerSettings
from memcalc.precision import Dtype, Recipe, get_recipe
from memcalc.spec import Checkpointing, TrainingSpec

TORCH_DTYPES = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}
LEARNING_RATE = 1e-3
SGD_MOMENTUM = 0.9
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
# Terms whose estimate is what the forward leaves alive for the backward.
FORWARD_LIVE_TERMS = (trk.ACTIVATIONS, trk.LOGITS_AND_LOSS, trk.AUTOCAST_COPIES)
SDPA_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"
SDPA_MATH_OPS = {"_safe_softmax", "_softmax"}  # what SDPA's math path decomposes into

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StepSetup:
    """The resolved run: what the estimate assumes, as torch objects."""

    recipe: Recipe
    weight_dtype: torch.dtype
    master_dtype: torch.dtype | None
    autocast_dtype: torch.dtype | None
    optimizer: OptimizerSettings
    attn_implementation: str
    checkpointing: bool
    micro_batch_size: int
    seq_len: int
    device: str

    def describe(self) -> dict[str, Any]:
        opt = self.optimizer
        return {
            "precision": self.recipe.name,
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
            "master_dtype": str(self.master_dtype).removeprefix("torch.") if self.master_dtype else None,
            "autocast_dtype": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None,
            "optimizer": opt.name.value,
            "optim_impl": "per-tensor loop (transformers Adafactor has no foreach/fused path)"
            if opt.name == OptimizerName.adafactor else opt.impl.value,
            "attn_implementation": self.attn_implementation,
            "checkpointing": "full" if self.checkpointing else "none",
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            "device": self.device,
        }


def resolve_setup(spec: TrainingSpec, attn_implementation: str = "sdpa", device: str = "cpu") -> StepSetup:
    """Check the spec is one a single-process step can run, and resolve its dtypes."""
    unsupported = []
    if spec.zero_stage or spec.num_gpus > 1:
        unsupported.append(f"{{zero}} {spec.zero_stage} / {{gpus}} {spec.num_gpus} (needs several ranks)")
    if spec.lora_rank is not None or spec.qlora:
        unsupported.append("LoRA / QLoRA")
    if spec.freeze:
        unsupported.append("{freeze}")
    if spec.optimizer in (OptimizerName.lion, OptimizerName.adamw_8bit):
        unsupported.append(f"{{optim}} {spec.optimizer.value}")
    if unsupported:
        raise UsageError(f"verify does not yet run {', '.join(unsupported)}; drop it to verify the rest")
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UsageError(f"attention implementation {attn_implementation!r}: use one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    recipe = get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)
    if recipe.grad_dtype != recipe.weight_dtype:
        raise UsageError("verify runs gradients in the weight dtype (as autograd makes them); drop {grad_dtype}")
    if spec.state_dtype is not None and recipe.state_dtype != recipe.optimizer_param_dtype:
        raise UsageError("verify creates optimizer states in the dtype of the tensors it updates (torch.optim "
                         "zeros_like); drop {state_dtype}")
    weight = TORCH_DTYPES[recipe.weight_dtype]
    return StepSetup(
        recipe=recipe, weight_dtype=weight,
        master_dtype=TORCH_DTYPES[recipe.master_dtype] if recipe.master_dtype else None,
        autocast_dtype=TORCH_DTYPES[recipe.compute_dtype] if recipe.autocast else None,
        optimizer=spec.optimizer_settings, attn_implementation=attn_implementation,
        checkpointing=spec.checkpointing == Checkpointing.full,
        micro_batch_size=spec.micro_batch_size, seq_len=spec.seq_len, device=device,
    )


# -- model -------------------------------------------------------------------------------------------------
def _raw(model_config: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    return dict(model_config.raw) if isinstance(model_config, ModelConfig) else dict(model_config)


def build_model(model_config: ModelConfig | dict[str, Any], setup: StepSetup) -> torch.nn.Module:
    """The model of the config (memcalc.measure.build, the one builder), in the recipe's weight dtype, on the
    setup's device, checkpointed as the spec says, in training mode."""
    model = build.build_model(_raw(model_config), dtype=setup.weight_dtype,
                              attn_implementation=setup.attn_implementation)
    if torch.device(setup.device).type != "cpu":  # (built on the CPU; fake CPU tensors cannot be moved)
        model = model.to(device=setup.device)
    if setup.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    return model


def dropout_probabilities(model_config: ModelConfig | dict[str, Any]) -> dict[str, float]:
    """Non-zero dropout probabilities of the config, as its family resolves them (class defaults included)."""
    from memcalc import families

    raw = _raw(model_config)
    return dict(families.describe(ModelConfig("config", raw, "config")).arch.dropout)


# -- optimizer -------------------------------------------------------------------------------------------------
def build_optimizer(params: list[torch.Tensor], settings: OptimizerSettings):
    impl = {OptimImpl.foreach: {"foreach": True}, OptimImpl.fused: {"fused": True},
            OptimImpl.forloop: {"foreach": False}}[settings.impl]
    name = settings.name
    if name == OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=LEARNING_RATE, amsgrad=settings.amsgrad, **impl)
    if name == OptimizerName.adam:
        return torch.optim.Adam(params, lr=LEARNING_RATE, amsgrad=settings.amsgrad, **impl)
    if name == OptimizerName.sgd:
        return torch.optim.SGD(params, lr=LEARNING_RATE, **impl)
    if name == OptimizerName.sgd_momentum:
        return torch.optim.SGD(params, lr=LEARNING_RATE, momentum=SGD_MOMENTUM, **impl)
    if name == OptimizerName.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=LEARNING_RATE, scale_parameter=False, relative_step=False, warmup_init=False,
                         beta1=settings.adafactor_beta1)
    raise UsageError(f"verify does not yet run {{optim}} {name.value}")


class Stepper:
    """The optimizer step of the recipe. With a master dtype (bf16/fp16 mixed): fp32 master copies are what
    the optimizer updates; at the step the 16-bit gradients are cast to fp32 (all at once, as DeepSpeed casts a
    rank's partition), the optimizer steps the masters, the fp32 gradients are freed and the masters are copied
    back into the 16-bit parameters."""

    def __init__(self, model: torch.nn.Module, setup: StepSetup) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters: list[torch.Tensor] = []
        if setup.master_dtype is not None:
            self.masters = [p.detach().to(setup.master_dtype, copy=True).requires_grad_(True) for p in self.params]
        self.optimizer = build_optimizer(self.masters or self.params, setup.optimizer)
        self.fused = setup.optimizer.impl == OptimImpl.fused and setup.optimizer.name != OptimizerName.adafactor
        self.on_master_grads: Callable[[list[torch.Tensor]], None] | None = None

    def step(self) -> None:
        if not self.masters:
            self.optimizer.step()
            return
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.to(m.dtype) if p.grad is not None else None
        if self.on_master_grads is not None:
            self.on_master_grads([m.grad for m in self.masters if m.grad is not None])
        self.optimizer.step()
        for m in self.masters:
            m.grad = None
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Optimizer state tensors by state key, without torch.optim's host-side 'step' counters."""
        found: dict[str, list[torch.Tensor]] = {}
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not (key == "step" and not self.fused):
                    found.setdefault(key, []).append(value)
        return found


# -- the step --------------------------------------------------------------------------------------------------
class PhaseClock:
    """Told when each phase of the measured step begins (and when the step ends). Subclassed by the CUDA path."""

    def enter(self, phase: str) -> None:
        pass

    def finish(self) -> None:
        pass


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (shared storages once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[id(s)] = int(s.nbytes())
    return sum(seen.values())


def make_inputs(model: torch.nn.Module, setup: StepSetup) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    return torch.randint(0, vocab, (setup.micro_batch_size, setup.seq_len), device=setup.device)


def _autocast(setup: StepSetup):
    if setup.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(setup.device).type, dtype=setup.autocast_dtype)


def one_step(model: torch.nn.Module, stepper: Stepper, input_ids: torch.Tensor, setup: StepSetup,
             clock: PhaseClock, after_backward: Callable[[], None] | None = None) -> None:
    clock.enter(trk.FORWARD)
    with _autocast(setup):
        # use_cache is left to the config, as HF Trainer leaves it: GPT-2 then concatenates k and v into a
        # DynamicCache during training, which memcalc.activations counts.
        out = model(input_ids=input_ids, labels=input_ids)
    loss = out.loss
    del out  # as HF Trainer's training_step: only the loss outlives the forward (the logits are freed)
    clock.enter(trk.BACKWARD)
    loss.backward()
    if after_backward is not None:
        after_backward()
    del loss
    clock.enter(trk.OPTIMIZER_STEP)
    stepper.step()
    clock.finish()
    stepper.zero_grad()


class _TrackerClock(PhaseClock):
    def __init__(self, tracker: trk.MemoryTracker, inner: PhaseClock | None) -> None:
        self.tracker, self.inner = tracker, inner

    def enter(self, phase: str) -> None:
        self.tracker.mark(phase)
        if self.inner is not None:
            self.inner.enter(phase)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()


def watch_step(tracker: trk.MemoryTracker, model: torch.nn.Module, stepper: Stepper) -> None:
    """Attribute optimizer state, the loss region (logits, log_softmax) and fp32 gradient copies."""
    tracker.watch_optimizer(stepper.optimizer, stepper.fused)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        tracker.loss_region(head)
    stepper.on_master_grads = lambda grads: tracker.register(grads, trk.FP32_GRAD_COPY)


@dataclass
class StepResult:
    """What one measured step produced, before a method turns it into a Measurement."""

    setup: StepSetup
    tracker: trk.MemoryTracker
    model_class: str
    num_params: int
    model_state_bytes: dict[str, int]
    optimizer_state_breakdown: dict[str, int]
    ops_seen: set[str] = field(default_factory=set)
    dropout: dict[str, float] = field(default_factory=dict)
    elapsed_seconds: float = 0.0


class _OpNames(trk.MemoryTracker):
    """The tracker, also remembering which op overloads ran (to tell which attention kernel was taken)."""

    def __init__(self, record_timeline: bool = False) -> None:
        super().__init__(record_timeline)
        self.ops_seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops_seen.add(func.__name__.split(".")[0])
        return super().__torch_dispatch__(func, types, args, kwargs)


def execute(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, device: str = "cpu",
            attn_implementation: str = "sdpa", clock: PhaseClock | None = None,
            progress: Progress | None = None, before_measured_step: Callable[[], None] | None = None,
            record_timeline: bool = False, seed: int = 0) -> StepResult:
    """Build, warm up and run the measured step under the tracker. The caller chooses the tensor kind by the
    context it calls this in (a FakeTensorMode for traces) and the device."""
    say = progress or (lambda _msg: None)
    setup = resolve_setup(spec, attn_implementation, device)
    started = time.perf_counter()
    torch.manual_seed(seed)
    say("building the model")
    model = build_model(model_config, setup)
    stepper = Stepper(model, setup)
    input_ids = make_inputs(model, setup)
    say("warm-up step (creates the optimizer state)")
    one_step(model, stepper, input_ids, setup, PhaseClock())

    tracker = _OpNames(record_timeline=record_timeline)
    tracker.register(model.parameters(), trk.WEIGHTS)
    tracker.register(stepper.masters, trk.MASTER)
    tracker.register(model.buffers(), trk.OTHER)
    tracker.register([input_ids], trk.OTHER)
    tracker.watch_gradients(model.parameters())
    watch_step(tracker, model, stepper)
    grads: dict[str, int] = {}

    def after_backward() -> None:
        grads[trk.GRADIENTS] = storage_bytes(p.grad for p in stepper.params)

    if before_measured_step is not None:
        before_measured_step()
    say("measured step")
    try:
        with tracker:
            one_step(model, stepper, input_ids, setup, _TrackerClock(tracker, clock), after_backward)
    finally:
        tracker.remove_hooks()
    states = stepper.state_tensors()
    model_state = {
        trk.WEIGHTS: storage_bytes(model.parameters()),
        trk.MASTER: storage_bytes(stepper.masters),
        trk.GRADIENTS: grads.get(trk.GRADIENTS, 0),
        trk.OPTIMIZER_STATES: storage_bytes(t for ts in states.values() for t in ts),
    }
    return StepResult(
        setup=setup, tracker=tracker, model_class=type(model).__name__,
        num_params=sum(p.numel() for p in model.parameters()),
        model_state_bytes=model_state,
        optimizer_state_breakdown={k: storage_bytes(v) for k, v in states.items()},
        ops_seen=tracker.ops_seen, dropout=dropout_probabilities(model_config),
        elapsed_seconds=time.perf_counter() - started,
    )


def differences_from_gpu(result: StepResult) -> list[str]:
    """Where this CPU run's memory differs from what the same step does on a CUDA GPU."""
    setup, ops = result.setup, result.ops_seen
    found: list[str] = []
    if setup.autocast_dtype is not None:
        found.append("CPU autocast keeps pow, softmax, log_softmax and layer_norm in the 16-bit input dtype where "
                     "CUDA autocast runs them in fp32: 16-bit inputs to those ops save 16-bit tensors here, fp32 "
                     "on a GPU")
    drops = result.dropout
    if drops:
        names = ", ".join(f"{k}={v}" for k, v in drops.items())
        found.append(f"dropout ({names}): CPU dropout saves a noise tensor in the input dtype where CUDA keeps a "
                     "1-byte mask")
    if setup.attn_implementation == "sdpa":
        if SDPA_CPU_FLASH in ops:
            if setup.weight_dtype == torch.float32 and setup.autocast_dtype is None:
                found.append("fp32 SDPA: CPU runs its flash kernel (output + fp32 logsumexp saved); CUDA has no fp32 "
                             "flash kernel and runs memory-efficient attention (logsumexp padded to 32 rows)")
        elif ops & SDPA_MATH_OPS:
            why = " (attention dropout > 0)" if drops else ""
            found.append(f"SDPA ran the math kernel on CPU{why}: attention scores and probabilities are materialized "
                         "and saved; a GPU run takes flash / memory-efficient attention")
    if setup.autocast_dtype == torch.float16:
        found.append("amp-fp16 runs without a GradScaler here (a GPU run's scaler adds a few scalar tensors; "
                     "unscale_ works in place)")
    found.append("kernel-internal scratch (CPU flash-attention buffers here; cuBLAS workspaces, caching-allocator "
                 "rounding to 512-byte blocks on a GPU) is not a tensor and is not counted")
    return found


def to_measurement(method: str, result: StepResult) -> Measurement:
    tracker = result.tracker
    run = {"model_class": result.model_class, "num_params": result.num_params, **result.setup.describe(),
           "tensors": "fake (FakeTensorMode, no memory)" if method == "trace" else "real"}
    peak_terms = {k: v for k, v in tracker.peak.by_category.items() if v}
    entry = tracker.phase_entries.get(trk.BACKWARD)
    forward_end = {k: v for k, v in entry.by_category.items() if v} if entry is not None else {}
    term_bytes = {k: v for k, v in tracker.category_max.items() if v}
    for name in FORWARD_LIVE_TERMS:
        term_bytes[name] = forward_end.get(name, 0)
    term_bytes.update(result.model_state_bytes)
    term_bytes = {k: v for k, v in term_bytes.items() if v}
    return Measurement(
        method=method,
        measured_peak_bytes=tracker.peak_bytes,
        measured_peak_phase=tracker.peak_phase,
        per_phase_peak_bytes=tracker.phase_peak_bytes(),
        per_term_bytes=peak_terms,
        term_bytes=term_bytes,
        term_max_bytes={k: v for k, v in tracker.category_max.items() if v},
        forward_end_bytes=forward_end,
        model_state_bytes=result.model_state_bytes,
        optimizer_state_breakdown=result.optimizer_state_breakdown,
        differences_from_gpu=differences_from_gpu(result) if result.setup.device == "cpu" else [],
        run=run,
        baseline_bytes=tracker.baseline_bytes,
        tracker_peak_bytes=tracker.peak_bytes,
        elapsed_seconds=round(result.elapsed_seconds, 3),
        notes=["the model output (logits) is dropped before backward, as HF Trainer's training_step does",
               "torch.optim's host-side 'step' counters are not counted as optimizer state (fused keeps them "
               "on the device and they are)"],
    )


def measure_cpu(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, attn_implementation: str = "sdpa",
                progress: Progress | None = None, record_timeline: bool = False) -> Measurement:
    """cpu-tracker: real tensors on the CPU."""
    result = execute(model_config, spec, device="cpu", attn_implementation=attn_implementation, progress=progress,
                     record_timeline=record_timeline)
    return to_measurement("cpu-tracker", result)
