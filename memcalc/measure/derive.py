"""Activations traced from the model's own code, for models no family module has hand rules for.

The real transformers class is built at full size under ``FakeTensorMode`` (shapes and dtypes, no memory: an
8B model builds in a fraction of a second) and one training forward runs with ``saved_tensors_hooks``: every
distinct storage autograd saves for backward is recorded with where it was created (a decoder layer and the
part of it, the model outside its layers, or the loss after the output head). Parameters, buffers and the
autocast copies of weights are excluded: those are other terms. What a storage costs is what a real run's would:
a fake storage reports its bytes.

Saved bytes are affine in the micro-batch from 2 on (every activation has a batch dimension except position tables
and scalars; at micro-batch 1 a few scalars share storage differently, measured: 8 B for Llama), so each (sequence
length, recipe) is traced at micro-batch 1, 2 and 3 on one fake model, and any micro-batch follows.
Results are cached (memcalc.cache), keyed by the config's content, the run's shape and dtypes and the torch and
transformers versions: a repeat reads a file and imports neither.

CUDA semantics: the fake tensors are CPU tensors (a CPU-only torch cannot run a module on a fake CUDA device),
and where CUDA decides differently from the CPU (autocast's op lists, LayerNorm statistics, dropout masks) the
trace decides as CUDA does (memcalc.measure.cuda_semantics). Inside ``semantics("cpu")`` traces follow plain CPU
semantics instead, to compare with a step measured on this machine (the tests and benchmarks/accuracy.py do).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from memcalc import cache

# Bump when what is recorded changes: older cache entries are then not read.
CACHE_FORMAT = 7  # 7: the CPU's semantics too give a v narrower than q a fused kernel (cuda_semantics.sdpa_narrow_v);
# 6: CUDA semantics run fp32 grouped-head sdpa on its math path
CACHE_KIND = "traces"
LOSS = "loss"  # where: created after the output head (the loss and its inputs)
MODEL = "model"  # where: created outside the decoder layers (embeddings, position tables, final norm, head)
OUTSIDE = "outside the layers"
DEVICES = ("cuda", "cpu")  # whose semantics a trace follows
_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("memcalc_trace_device", default="cuda")


@contextlib.contextmanager
def semantics(device: str) -> Iterator[None]:
    """Traces in this block follow ``device``'s semantics (DEVICES); outside, CUDA's."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}")
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def current_device() -> str:
    """Whose semantics a trace follows here (``semantics``)."""
    return _DEVICE.get()


@dataclass(frozen=True)
class Saves:
    """Bytes autograd saves in one training forward, by where the storage was created: one dict of parts per
    decoder layer (in order), the model outside its layers, and the loss."""

    layers: tuple[Mapping[str, int], ...]
    model: Mapping[str, int]
    loss: int

    def to_json(self) -> dict[str, Any]:
        return {"layers": [dict(layer) for layer in self.layers], "model": dict(self.model), "loss": self.loss}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Saves:
        return cls(tuple(data["layers"]), dict(data["model"]), int(data["loss"]))


@dataclass(frozen=True)
class TracedSaves:
    """A config's saved bytes at micro-batch 1, 2 and 3; any micro-batch of 2 or more follows affinely."""

    model_class: str
    by_batch: Mapping[int, Saves]  # 1, 2, 3
    versions: Mapping[str, str]
    attention: str = "sdpa"  # the attention traced: eager where the class has no sdpa path (gpt-oss)
    fitted_from: tuple[int, ...] = ()  # read off traces at these lengths (fitted_sequences), not traced itself
    padded: bool = False  # its batches of more than one row carried a padding mask (measure.step.make_batch)

    def at(self, batch: int) -> Saves:
        if batch in self.by_batch:
            return self.by_batch[batch]
        two, three = self.by_batch[2], self.by_batch[3]
        steps = batch - 2
        return Saves(
            layers=tuple(_affine(a, b, steps) for a, b in zip(two.layers, three.layers)),
            model=_affine(two.model, three.model, steps),
            loss=two.loss + steps * (three.loss - two.loss),
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "model_class": self.model_class, "versions": dict(self.versions),
                "attention": self.attention, "padded": self.padded,
                "by_batch": {str(batch): saves.to_json() for batch, saves in self.by_batch.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TracedSaves:
        return cls(data["model_class"], {int(b): Saves.from_json(s) for b, s in data["by_batch"].items()},
                   data["versions"], str(data["attention"]), padded=bool(data.get("padded", False)))


TRACED_BATCHES = (1, 2, 3)


def _affine(at_2: Mapping[str, int], at_3: Mapping[str, int], steps: int) -> dict[str, int]:
    """at micro-batch 2 + steps, from 2 and 3."""
    return {part: at_2.get(part, 0) + steps * (at_3.get(part, 0) - at_2.get(part, 0)) for part in {*at_2, *at_3}}


# Inside fitted_sequences(): per run (the cache key without the sequence length), the lengths traced so far (their
# TracedSaves, or memcalc.measure.timeline's StepMoments).
_TRACED_LENGTHS: contextvars.ContextVar[dict[str, dict[int, Any]] | None] = contextvars.ContextVar(
    "memcalc_traced_lengths", default=None)
FIT_ANCHORS = 3  # traced lengths a fitted one is read from (saved bytes are quadratic in the length)
FIT_MIN_LENGTH = 2  # at length 1 sdpa runs without is_causal: another code path, never an anchor


@contextlib.contextmanager
def fitted_sequences() -> Iterator[None]:
    """Within the block, once three lengths (>= 2) of a run have been traced, another length is read off the
    quadratic through the three nearest instead of traced (not cached). Every saved tensor's size is a polynomial of
    degree <= 2 in the sequence length (s^2: eager scores and masks) while the code path stays the same; where
    it changes (a sliding window the sequence crosses) the fit is wrong, so whoever searches with it confirms the
    answer with real traces (fit.check_fit does)."""
    token = _TRACED_LENGTHS.set({})
    try:
        yield
    finally:
        _TRACED_LENGTHS.reset(token)


_EXACT: contextvars.ContextVar[bool] = contextvars.ContextVar("memcalc_exact_lengths", default=False)


@contextlib.contextmanager
def exact_lengths() -> Iterator[None]:
    """Inside fitted_sequences: lengths in this block are traced (or read from the cache), never read off a fit, and
    become anchors of the fits after it (to confirm a fitted answer, then refine the fit around it)."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def anchors_of(run_key: str, seq_len: int) -> dict[int, Any] | None:
    """Inside fitted_sequences: the lengths of this run (a cache key without the length) traced so far, to read
    another off (None outside it, or for a length that is never an anchor)."""
    traced_lengths = _TRACED_LENGTHS.get()
    if traced_lengths is None or seq_len < FIT_MIN_LENGTH:
        return None
    return traced_lengths.setdefault(run_key, {})


def may_fit(anchors: Mapping[int, Any] | None) -> bool:
    """Whether a length may be read off these anchors instead of traced."""
    return anchors is not None and len(anchors) >= FIT_ANCHORS and not _EXACT.get()


def quadratic(points: list[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the polynomial of degree <= 2 through three (length, bytes) points, exactly."""
    from fractions import Fraction

    total = Fraction(0)
    for i, (xi, yi) in enumerate(points):
        term = Fraction(yi)
        for j, (xj, _) in enumerate(points):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return max(0, round(total))


def _fitted(anchors: dict[int, TracedSaves], seq_len: int) -> TracedSaves:
    lengths = sorted(anchors, key=lambda n: (abs(n - seq_len), n))[:FIT_ANCHORS]
    first = anchors[lengths[0]]

    def fit(values: list[Mapping[str, int]]) -> dict[str, int]:
        return {part: quadratic([(n, v.get(part, 0)) for n, v in zip(lengths, values)], seq_len)
                for part in set().union(*values)}

    by_batch = {}
    for batch in TRACED_BATCHES:
        saves = [anchors[n].by_batch[batch] for n in lengths]
        by_batch[batch] = Saves(
            layers=tuple(fit(list(layer)) for layer in zip(*(s.layers for s in saves))),
            model=fit([s.model for s in saves]),
            loss=quadratic([(n, s.loss) for n, s in zip(lengths, saves)], seq_len),
        )
    return TracedSaves(first.model_class, by_batch, first.versions, first.attention, fitted_from=tuple(sorted(lengths)),
                       padded=first.padded)


def traced_saves(raw: Mapping[str, Any], architecture: str | None, seq_len: int, weight_dtype: str,
                 autocast: bool, attention: str, padded: bool = False) -> tuple[TracedSaves, bool]:
    """The saved bytes of one training forward of this config, from the cache or traced now (or, inside
    ``fitted_sequences``, read off traces at three other lengths); and whether it came from the cache.
    ``weight_dtype``: fp32 | bf16 (16-bit: the same bytes as fp16); ``autocast``: bf16 autocast over fp32 weights;
    ``attention``: sdpa | eager; ``padded``: the batches of more than one row padded (measure.step.make_batch: the
    padding mask every layer's attention then gets). CUDA's semantics unless inside ``semantics("cpu")``."""
    device = current_device()
    settings = {"architecture": architecture, "weight_dtype": weight_dtype, "autocast": autocast,
                "attention": attention, "device": device, **({"padded": True} if padded else {})}
    key = cache.key_of(raw, CACHE_FORMAT, seq_len=seq_len, **settings)
    anchors = anchors_of(cache.key_of(raw, CACHE_FORMAT, **settings), seq_len)
    saves = cache.read_as(CACHE_KIND, key, CACHE_FORMAT, TracedSaves.from_json)
    if saves is not None:
        if anchors is not None:
            anchors[seq_len] = saves
        return saves, True
    if may_fit(anchors):
        return _fitted(anchors, seq_len), False
    model_class, by_batch, traced_attention, masked = _trace(raw, architecture, TRACED_BATCHES, seq_len, weight_dtype,
                                                             autocast, attention, device, padded)
    saves = TracedSaves(model_class=model_class, by_batch=by_batch, versions=cache.versions(),
                        attention=traced_attention, padded=masked)
    cache.write(CACHE_KIND, key, saves.to_json())
    if anchors is not None:
        anchors[seq_len] = saves
    return saves, False


def part_of(child_name: str) -> str:
    """The part of a decoder layer a direct child belongs to, by its attribute name in transformers."""
    name = child_name.lower()
    if "norm" in name or name.startswith("ln"):
        return "norms"
    if "attn" in name or "attention" in name:
        return "attention"
    if any(word in name for word in ("mlp", "feed_forward", "ffn", "moe", "expert")):
        return "mlp"
    return "other"


def _trace(raw: Mapping[str, Any], architecture: str | None, batches: tuple[int, ...], seq_len: int,
           weight_dtype: str, autocast: bool, attention: str, device: str,
           padded: bool = False) -> tuple[str, dict[int, Saves], str, bool]:
    """Traced training forwards of one fake model, one per micro-batch: (model class, saves by micro-batch, the
    attention traced: sdpa asked of a class without an sdpa path runs eager, as transformers would train it, and
    whether its batches of more than one row carried a padding mask: ``padded`` asked of a causal LM)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memcalc.measure import build
    from memcalc.measure.step import make_batch
    from memcalc.measure.trace import unpacked_sequences

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weight_dtype]
    found: dict[int, Saves] = {}
    masked = False
    if attention == "sdpa" and not build.sdpa_supported(raw, architecture):
        attention = "eager"
    with FakeTensorMode(allow_non_fake_inputs=True), unpacked_sequences(), build.quiet_fake_tensor_log():
        model = build.build_model(raw, architecture, dtype=dtype, attn_implementation=attention)
        model.train()
        layers = build.decoder_layers(model)
        for batch in batches:
            # the keyword arguments a training forward of this head takes (labels, positions: measure.step)
            shape = SimpleNamespace(micro_batch_size=batch, seq_len=seq_len, device="cpu", decoder_seq_len=None,
                                    padded=padded)
            inputs, _ = make_batch(model, shape)
            masked = masked or "attention_mask" in inputs
            found[batch] = _saved_in_forward(model, layers, inputs, autocast, like_cuda=device == "cuda")
    return type(model).__name__, found, attention, masked


def _saved_in_forward(model: Any, layers: list[Any], inputs: dict[str, Any], autocast: bool, like_cuda: bool) -> Saves:
    """The storages one training forward saves for backward, by where each was created (``like_cuda``: with
    CUDA's dtypes and kernels, memcalc.measure.cuda_semantics)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from memcalc.measure import cuda_semantics
    from memcalc.measure.trace import fake_grouped_mm

    excluded = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    parameters = set(excluded)
    where: list[Any] = [MODEL]  # the innermost place running now: MODEL, LOSS, or (layer, part)
    created: dict[int, Any] = {}  # storage -> where it was created
    held: list[Any] = []  # keeps every recorded storage alive, so no address is reused within the forward
    handles = []

    def enter(place: Any):
        def hook(module: Any, args: Any) -> None:
            where.append(place)
        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        where.pop()

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter((index, "residual and other"))))
        handles.append(layer.register_forward_hook(leave))
        for child_name, child in layer.named_children():
            handles.append(child.register_forward_pre_hook(enter((index, part_of(child_name)))))
            handles.append(child.register_forward_hook(leave))
    head = model.get_output_embeddings()
    if head is not None:
        handles.append(head.register_forward_hook(lambda module, args, output: where.__setitem__(0, LOSS)))

    class Creation(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = fake_grouped_mm(func, args, kwargs)
            if out is None:
                out = func(*args, **(kwargs or {}))
            if like_cuda:
                out = cuda_semantics.layer_norm_stats(func, args, out)
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    key = tensor.untyped_storage()._cdata
                    if func is torch.ops.aten._to_copy.default and args[0].untyped_storage()._cdata in parameters:
                        excluded.add(key)  # an autocast copy of a weight: the autocast_weight_copies term
                    if key not in created:
                        created[key] = where[-1]
                        held.append(tensor)
            return out

    saved: dict[int, tuple[Any, Any]] = {}

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in excluded and key not in saved:
            saved[key] = (storage, created.get(key, MODEL))
        return tensor

    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    # (sdpa's kernel as CUDA picks it either way: memcalc's measured CPU steps run it so too)
    semantics = cuda_semantics.like_cuda() if like_cuda else cuda_semantics.kernels_like_cuda()
    try:
        with semantics, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Creation(), cast:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    per_layer: list[dict[str, int]] = [{} for _ in layers]
    per_model: dict[str, int] = {}
    loss = 0
    for storage, place in saved.values():
        size = int(storage.nbytes())
        if place == LOSS:
            loss += size
        elif place == MODEL:
            per_model[OUTSIDE] = per_model.get(OUTSIDE, 0) + size
        else:
            index, part = place
            per_layer[index][part] = per_layer[index].get(part, 0) + size
    return Saves(tuple(per_layer), per_model, loss)
