"""The step's moments from the model's own code: a per-op trace of the training step, extrapolated in depth.

The forward-saves trace (memcalc.measure.derive) gives what a layer saves; what a recomputed layer's backward
holds at its worst op (the recomputed activations, the gradients it makes on the way, the parameter gradients
made so far) no hand formula gets right for every family (issue 12: the checkpointed backward's peak moves with
depth and with the layer's op order). This module runs the real training step - forward, loss and backward of the
real transformers class, checkpointed as the spec says - under ``FakeTensorMode`` with memcalc's tensor-lifetime
tracker, and records the largest live bytes of each segment of the step:

  forward   before the layers (embeddings), the first layer, the last layer, after the layers (norm, head, loss)
  backward  after the layers (loss, head and norm backward), the last layer's backward (with its recomputation),
            the first layer's, before the layers (the embeddings' backward)

Segments are told apart by forward hooks on the decoder layers and gradient hooks on their input and output
hidden states. Between two depths of a homogeneous stack, every op of a segment sees the same change (one more
layer's saved tensors, or one more layer's gradients), so each segment's peak is affine in the depth, and a middle
layer's peak lies between the first's and the last's. The stack is traced at depths 2, 3 and 4: where the three
points are not on a line (dense-first MoE stacks, say) or the config lists differing layer types, or checkpointing
skips layers, the step is traced at full depth instead. The optimizer's step is not traced: its moment is
the engine's, exact from the inventory.

Bytes are reported beside the parameters (weights, the fp32 master and the optimizer's states are the engine's
terms): gradients made so far, saved activations, the loss's buffers, autocast copies, the step's transients,
the model's buffers and the batch. The trace follows CUDA's semantics (memcalc.measure.cuda_semantics) unless
inside ``derive.semantics("cpu")``. Results are cached like the forward traces.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memcalc import cache
from memcalc.measure import derive
from memcalc.measure.derive import current_device

CACHE_FORMAT = 7  # 7: the CPU's semantics too give a v narrower than q a fused kernel; 6: softmax backward with
# CUDA's temporary (cuda_semantics.softmax_backward_like_cuda); 5: CUDA semantics run fp32 grouped-head sdpa on its
# math path
CACHE_KIND = "timelines"
DEPTHS = (2, 3, 4)  # traced depths of a homogeneous stack (three points: the line is checked, not assumed)
FORWARD, BACKWARD = "forward", "backward"
BEFORE, FIRST, MIDDLE, LAST, AFTER = "before the layers", "first layer", "a middle layer", "last layer", "after the layers"
END = "end"  # (forward, END): not a peak but the activations the forward leaves saved for backward (``StepMoments.kept``)
HOST = "host"  # (forward, HOST): not a peak but the host memory offloaded activations take (``StepMoments.host``)
ROLES = (BEFORE, FIRST, LAST, AFTER)  # the segments a full-depth peak can be in (a middle layer's lies between)


@dataclass(frozen=True)
class Moment:
    """The largest live bytes of one segment of the step, beside the parameters."""

    phase: str  # forward | backward
    where: str  # ROLES
    bytes: int
    gradients: int  # of which parameter gradients (in p.grad when the peak op ran)

    @property
    def label(self) -> str:
        """What the step is doing then, as the report names a moment."""
        return f"{_LABELS.get((self.phase, self.where), self.where)} (traced step)"


_LABELS = {
    (FORWARD, BEFORE): "embeddings", (FORWARD, FIRST): "first layer", (FORWARD, LAST): "last layer",
    (FORWARD, AFTER): "norm, head and loss", (BACKWARD, AFTER): "loss, head and norm backward",
    (BACKWARD, LAST): "last layer's backward", (BACKWARD, FIRST): "first layer's backward",
    (BACKWARD, BEFORE): "embeddings' backward",
}


@dataclass(frozen=True)
class StepMoments:
    """A config's step moments at one shape and recipe, at the model's full depth."""

    moments: tuple[Moment, ...]
    num_layers: int
    traced_depths: tuple[int, ...]  # (num_layers,) where traced at full depth
    model_class: str
    attention: str
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    fitted_from: tuple[int, ...] = ()  # inside derive.fitted_sequences: read off the traces at these lengths

    def largest(self, phase: str) -> Moment:
        return max((m for m in self.peaks if m.phase == phase), key=lambda m: m.bytes)

    @property
    def peaks(self) -> tuple[Moment, ...]:
        """The segments' largest moments."""
        return tuple(m for m in self.moments if m.where not in (END, HOST))

    @property
    def host(self) -> int:
        """The largest host memory offloaded activations took (--activation-offload; 0 otherwise)."""
        return next((m.bytes for m in self.moments if m.where == HOST), 0)

    @property
    def kept(self) -> int | None:
        """The activations saved for backward when the forward (and the loss) has run: the tracker's activations
        category then, without the loss's buffers, autocast copies, the batch and the model's buffers."""
        return next((m.bytes for m in self.moments if m.where == END), None)

    @property
    def extrapolated(self) -> bool:
        return self.traced_depths != (self.num_layers,)

    def describe(self) -> str:
        how = (f"depths {', '.join(map(str, self.traced_depths))} extrapolated to {self.num_layers} layers (each "
               "segment's peak is affine in depth)" if self.extrapolated else f"all {self.num_layers} layers")
        fitted = (f"; read off the quadratic through the traces at sequence lengths "
                  f"{', '.join(f'{n:,}' for n in self.fitted_from)}" if self.fitted_from else "")
        return (f"the step's forward and backward traced op by op ({self.model_class}, {self.attention} attention, "
                f"{how}{fitted}): each phase's peak is the traced step's, beside the engine's weights, master and "
                "optimizer states")

    def to_json(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "moments": [[m.phase, m.where, m.bytes, m.gradients] for m in self.moments],
                "num_layers": self.num_layers, "traced_depths": list(self.traced_depths),
                "model_class": self.model_class, "attention": self.attention, "seconds": self.seconds,
                "versions": self.versions}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepMoments:
        return cls(tuple(Moment(str(p), str(w), int(b), int(g)) for p, w, b, g in data["moments"]),
                   int(data["num_layers"]), tuple(int(d) for d in data["traced_depths"]), str(data["model_class"]),
                   str(data["attention"]), float(data["seconds"]), dict(data.get("versions", {})))


# -- depth ---------------------------------------------------------------------------------------------------------
def _depth_key(raw: Mapping[str, Any]) -> tuple[str, int]:
    """The config's layer-count key (n_layer, num_layers, ... by the config class's attribute map) and its value."""
    from memcalc.measure import build

    config = build.hf_config(raw)
    key = type(config).attribute_map.get("num_hidden_layers", "num_hidden_layers")
    return key, int(config.num_hidden_layers)


def _homogeneous(raw: Mapping[str, Any], num_layers: int) -> bool:
    """Whether the config describes one kind of layer repeated: no per-layer list with differing entries (its own,
    or the layer_types its config class derives from a pattern), and one stack (an encoder-decoder's segments would
    be cut in one of its two stacks only: traced at full depth)."""
    from memcalc.measure import build

    config = build.hf_config(raw)
    if getattr(config, "is_encoder_decoder", False):
        return False
    lists = [v for v in raw.values() if isinstance(v, list) and len(v) == num_layers]
    derived = getattr(config, "layer_types", None)
    if isinstance(derived, (list, tuple)):
        lists.append(list(derived))
    return all(len({repr(item) for item in values}) <= 1 for values in lists)


def _at_depth(raw: Mapping[str, Any], key: str, num_layers: int, depth: int) -> dict[str, Any]:
    cut = {k: (v[:depth] if isinstance(v, list) and len(v) == num_layers else v) for k, v in raw.items()}
    cut[key] = depth
    return cut


# -- one traced step -------------------------------------------------------------------------------------------
def _segment_peaks(raw: Mapping[str, Any], setup: Any) -> tuple[str, dict[tuple[str, str], tuple[int, int]]]:
    """One forward and backward of the config's model under FakeTensorMode: (model class, the largest live bytes
    beside the parameters and the gradients among them, by (phase, segment))."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memcalc.measure import cuda_semantics
    from memcalc.measure import tracker as trk
    from memcalc.measure.build import decoder_layers, quiet_fake_tensor_log
    from memcalc.measure.step import build_model, forward_loss, loss_head, make_batch
    from memcalc.measure.trace import FakeKernels, unpacked_sequences

    like_cuda = current_device() == "cuda"

    class Segments(trk.MemoryTracker):
        def __init__(self) -> None:
            super().__init__()
            self.segment = (trk.SETUP, "")
            self.peaks: dict[tuple[str, str], trk.Snapshot] = {}

        def _change(self, category: str, delta: int) -> None:
            super()._change(category, delta)
            if delta > 0:
                best = self.peaks.get(self.segment)
                if best is None or self.live_bytes > best.total_bytes:
                    self.peaks[self.segment] = self._snapshot()

        def _kept_snapshots(self) -> tuple[trk.Snapshot, ...]:
            return (*super()._kept_snapshots(), *self.peaks.values())

    # (sdpa's kernel as CUDA picks it either way: memcalc's measured CPU steps run it so too)
    semantics = cuda_semantics.like_cuda() if like_cuda else cuda_semantics.kernels_like_cuda()
    with FakeTensorMode(allow_non_fake_inputs=True), unpacked_sequences(), quiet_fake_tensor_log():
        model = build_model(dict(raw), setup)
        layers = decoder_layers(model)
        if not layers:
            raise ValueError("no decoder layers found")
        batch, _ = make_batch(model, setup)
        tracker = Segments()
        tracker.register(model.parameters(), trk.WEIGHTS)
        tracker.register(model.buffers(), trk.OTHER)
        tracker.register(batch.values(), trk.OTHER)
        tracker.watch_gradients(p for p in model.parameters() if p.requires_grad)
        head = loss_head(model)
        if head is not None:
            tracker.loss_region(head)
        last = len(layers) - 1

        def role(index: int) -> str:
            return FIRST if index == 0 else LAST if index == last else MIDDLE

        def into(segment: tuple[str, str]):
            def hook(_grad: Any) -> None:
                tracker.segment = segment
            return hook

        def hidden_of(value: Any) -> Any:
            found = value[0] if isinstance(value, (tuple, list)) and value else value
            return found if isinstance(found, torch.Tensor) and found.requires_grad else None

        def before_layer(index: int):
            def hook(_module: Any, args: Any, kwargs: Any) -> None:
                if tracker.phase != trk.FORWARD:
                    return  # a checkpointed layer recomputed in backward
                tracker.segment = (FORWARD, role(index))
                hidden = hidden_of(args) if args else hidden_of(kwargs.get("hidden_states"))
                if hidden is not None:  # its gradient ends this layer's backward
                    hidden.register_hook(into((BACKWARD, role(index - 1) if index else BEFORE)))
            return hook

        def after_layer(index: int):
            def hook(_module: Any, _args: Any, output: Any) -> None:
                if tracker.phase != trk.FORWARD:
                    return
                tracker.segment = (FORWARD, AFTER)
                hidden = hidden_of(output)
                if index == last and hidden is not None:  # its gradient starts the last layer's backward
                    hidden.register_hook(into((BACKWARD, LAST if last else FIRST)))
            return hook

        handles = []
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before_layer(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(after_layer(index)))
        try:
            with semantics, FakeKernels(like_cuda), tracker:
                tracker.mark(trk.FORWARD)
                tracker.segment = (FORWARD, BEFORE)
                loss = forward_loss(model, batch, setup)
                kept = tracker._snapshot().by_category.get(trk.ACTIVATIONS, 0)
                tracker.mark(trk.BACKWARD)
                tracker.segment = (BACKWARD, AFTER)
                loss.backward()
                del loss
        finally:
            tracker.remove_hooks()
            for handle in handles:
                handle.remove()
    peaks = {}
    for segment, snap in tracker.peaks.items():
        if segment[0] in (FORWARD, BACKWARD) and segment[1] != MIDDLE:
            peaks[segment] = (snap.total_bytes - snap.by_category.get(trk.WEIGHTS, 0),
                              snap.by_category.get(trk.GRADIENTS, 0))
    peaks[(FORWARD, END)] = (kept, 0)
    if tracker.host_peak_bytes:
        peaks[(FORWARD, HOST)] = (tracker.host_peak_bytes, 0)
    return type(model).__name__, peaks


# -- the step at full depth ---------------------------------------------------------------------------------------
def step_moments(raw: Mapping[str, Any], spec: Any, attention: str) -> tuple[StepMoments, bool]:
    """The step's moments for ``spec`` (a TrainingSpec the single-process step runs: measure.step.resolve_setup
    says which) at the config's full depth, from the cache or traced now; and whether it came from the cache.
    ``attention``: sdpa | eager (a class without an sdpa path runs eager)."""
    from memcalc.measure import build  # (no torch at import)
    from memcalc.precision import get_recipe

    # The key from the spec alone, so that a repeat imports neither torch nor transformers.
    recipe = get_recipe(spec.precision, spec.master_dtype, spec.grad_dtype, spec.state_dtype)
    if spec.repeat_kv and attention == "sdpa":
        attention = build.SDPA_REPEAT_KV
    settings = {"seq_len": spec.seq_len, "batch": spec.micro_batch_size, "decoder_seq_len": spec.decoder_seq_len,
                "weight_dtype": recipe.weight_dtype.value, "grad_dtype": recipe.grad_dtype.value,
                "autocast": recipe.compute_dtype.value if recipe.autocast else None, "attention": attention,
                "checkpointing": spec.checkpointing.value, "every": spec.checkpoint_every,
                "loss_chunks": spec.loss_chunks, "device": current_device(),
                **({"activation_offload": spec.activation_offload.value} if spec.activation_offload.value != "none"
                   else {}),
                **({"lora": [spec.lora_rank, list(spec.lora_targets or ()), recipe.master_dtype is not None,
                             spec.lora_dropout, spec.dora, list(spec.lora_modules_to_save)]}
                   if spec.lora_rank else {}),
                **({"freeze": sorted(spec.freeze)} if spec.freeze else {}),
                **({"compile": True} if spec.compile else {}),
                **({"reentrant": True} if spec.checkpoint_reentrant else {}),
                **({"fp8": spec.fp8.value} if spec.fp8.value != "none" else {}),
                # (a padded batch: the step traced with its padding mask, measure.step.make_batch)
                **({"padded": True} if spec.padding_masked and spec.attention.value != "flash" else {}),
                **({"qlora": [spec.qlora_upcast, spec.qlora_scope.value, spec.qlora_double_quant, spec.qlora_lm_head]}
                   if spec.qlora else {}),
                # (torchao's own NF4 code runs in the trace: its version is the step's)
                **({"qlora_quantizer": ["torchao", cache.version_of("torchao")]}
                   if spec.qlora and spec.qlora_quantizer.value == "torchao" else {})}
    key = cache.key_of(raw, CACHE_FORMAT, **settings)
    anchors = derive.anchors_of(CACHE_KIND + cache.key_of(raw, CACHE_FORMAT, **{**settings, "seq_len": None}),
                                spec.seq_len)
    found = cache.read_as(CACHE_KIND, key, CACHE_FORMAT, StepMoments.from_json)
    if found is not None:
        if anchors is not None:
            anchors[spec.seq_len] = found
        return found, True
    if derive.may_fit(anchors):
        return _fitted(anchors, spec.seq_len), False
    from memcalc.measure.step import resolve_setup

    started = time.perf_counter()
    if attention in ("sdpa", build.SDPA_REPEAT_KV) and not build.sdpa_supported(raw):
        attention = "eager"  # (eager attention repeats k and v itself)
    setup = resolve_setup(spec, attention, "cpu", traced=True)
    depth_key, num_layers = _depth_key(raw)
    traced: dict[int, dict[tuple[str, str], tuple[int, int]]] = {}
    model_class = ""
    depths: tuple[int, ...] = (num_layers,)
    if num_layers > DEPTHS[-1] and not setup.checkpoint_every and _homogeneous(raw, num_layers):
        for depth in DEPTHS:
            model_class, traced[depth] = _segment_peaks(_at_depth(raw, depth_key, num_layers, depth), setup)
        if _linear(traced):
            depths = DEPTHS
    if depths == DEPTHS:
        moments = _extrapolated(traced, num_layers)
    else:
        model_class, peaks = _segment_peaks(raw, setup)
        moments = tuple(Moment(phase, where, b, g) for (phase, where), (b, g) in sorted(peaks.items()))
    result = StepMoments(moments, num_layers, depths, model_class, attention,
                         round(time.perf_counter() - started, 3), cache.versions())
    cache.write(CACHE_KIND, key, result.to_json())
    if anchors is not None:
        anchors[spec.seq_len] = result
    return result, False


def _fitted(anchors: Mapping[int, StepMoments], seq_len: int) -> StepMoments:
    """Each moment (and its gradients) at ``seq_len`` off the quadratic through the three nearest traced lengths: a
    segment's peak op keeps its place while the code path does (fit.check_fit confirms with real traces)."""
    lengths = sorted(anchors, key=lambda n: (abs(n - seq_len), n))[:derive.FIT_ANCHORS]
    first = anchors[lengths[0]]
    by_key = [{(m.phase, m.where): m for m in anchors[n].moments} for n in lengths]

    def at(values: list[int]) -> int:
        return derive.quadratic(list(zip(lengths, values)), seq_len)

    moments = []
    for key in sorted(set.intersection(*(set(found) for found in by_key))):
        found = [moments_at[key] for moments_at in by_key]
        moments.append(Moment(*key, at([m.bytes for m in found]), at([m.gradients for m in found])))
    return StepMoments(tuple(moments), first.num_layers, first.traced_depths, first.model_class, first.attention, 0.0,
                       first.versions, fitted_from=tuple(sorted(lengths)))


def _linear(traced: Mapping[int, Mapping[tuple[str, str], tuple[int, int]]]) -> bool:
    """Whether every segment's peak (and its gradients) changes by the same amount from each depth to the next."""
    first, second, third = (traced[d] for d in DEPTHS)
    if not (set(first) == set(second) == set(third)):
        return False
    return all(c[i] - b[i] == b[i] - a[i] for k in first for a, b, c in [(first[k], second[k], third[k])]
               for i in (0, 1))


def _extrapolated(traced: Mapping[int, Mapping[tuple[str, str], tuple[int, int]]], num_layers: int
                  ) -> tuple[Moment, ...]:
    low, high = traced[DEPTHS[0]], traced[DEPTHS[1]]
    steps = num_layers - DEPTHS[0]
    return tuple(Moment(phase, where, low[k][0] + steps * (high[k][0] - low[k][0]),
                        low[k][1] + steps * (high[k][1] - low[k][1]))
                 for k in sorted(low) for phase, where in [k])
