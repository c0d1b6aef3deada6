"""--activation-offload: torchtune's activation offloading, or TRL's copy of it, run on one device so that a measured
or traced step keeps on the device what they keep on the GPU, and counts what they move to host memory.

torchtune's ``OffloadActivations`` (torchtune/training/_activation_offloading.py) is a ``saved_tensors_hooks``
around the model's forward. Its GPU side needs CUDA streams, which a CPU-only torch cannot create, so this module
runs the same bookkeeping (``Offload``) with copies in place of stream transfers, and memcalc's tracker books the
host copies apart (``tracker.host``). What it follows, from ``pack_tensor`` and ``unpack_tensor_with_streams``
(use_streams, the recipes' default on torch >= 2.5):

- pack: every saved tensor gets an id; one of at least ``min_offload_size`` (1024) bytes that is not an
  ``nn.Parameter`` or ``nn.Buffer`` object is copied into a host tensor (a weight's transposed view, which ``mm``
  saves, is a plain tensor: copied too); the device tensor stays referenced in the forward stash until a tensor
  ``max_fwd_stash_size`` (5) ids later is offloaded (the copy must finish before the device memory is reused);
  smaller ones, parameters and buffers stay on the device as saved;
- unpack: a tensor still in the forward stash is used as is; any other offloaded one is copied back to the
  device and kept in the backward stash until the next autograd node that brings a tensor back has run (the node's
  hook frees the previous node's); the forward stash is emptied at the first node's hook, the backward stash at
  the end of backward;
- ``get_act_offloading_ctx_manager`` turns offloading off inside the output projection (``NoOpManager`` around
  ``model.output``), and torchtune's recipes compute the loss outside the context: nothing is offloaded from the
  head's forward on.

TRL's copy (trl/models/activation_offloading.py, used by its trainers' ``activation_offloading`` and by axolotl's)
differs where it matters here (style ``trl``): a tensor on a parameter's storage is not offloaded
(``update_model_params``), a storage already offloaded in this forward is kept on the device when saved again
(its deduplication by storage address and dtype), a broadcast tensor's storage is copied rather than its expanded
shape, and the context wraps the whole training step, so only the head itself is exempt: the loss is offloaded.

Style ``save_on_cpu`` is torch.autograd.graph.save_on_cpu, which transformers' activation_checkpointing_enable(
offload=True) puts around each checkpoint call (``checkpoints_offloaded``): every tensor saved outside the checkpoint's
own hooks (its _NoopSaveInputs: the layer's inputs) is copied to the host, and brought back by the recomputation.

Not followed: pinned host memory (host bytes are the same), the timing of the copies (the stashes are freed when
their events would have fired, which waits on nothing here), ``record_stream`` for a brought-back tensor that a
node's output shares storage with (kept until the next node here; freed when the compute stream is done with it
there, so the output holds it anyway), and axolotl's patches to TRL's (a compute-stream clone of non-contiguous
saved tensors). TRL keys its deduplication by the device address: once an offloaded tensor's block is freed, the
caching allocator may hand the same address to a new tensor, which TRL then takes for a duplicate and keeps on the
GPU. Which addresses repeat depends on the allocator, so that is not followed: TRL may keep more on the GPU than
counted here (memcalc.activations.TRL_ADDRESS_NOTE says so in the output).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from memcalc.measure import tracker as trk

MIN_OFFLOAD_BYTES = 1024  # OffloadActivations(min_offload_size=1024)
FORWARD_STASH = 5  # OffloadActivations(max_fwd_stash_size=5)


class Offload(saved_tensors_hooks):
    """OffloadActivations' bookkeeping with the device's stream transfers as copies (module docstring)."""

    def __init__(self, tracker: trk.MemoryTracker | None = None, style: str = "torchtune",
                 parameters: Any = ()) -> None:
        self.host = tracker.host if tracker is not None else contextlib.nullcontext
        self.trl = style == "trl"
        self.every = style == "save_on_cpu"
        self.parameter_storages = {id(storage) for p in parameters if (storage := _storage(p)) is not None}
        # trl: (storage, offset, dtype) offloaded in this forward, with the storage (weakly: a key is a live storage)
        self.offloaded_storages: dict[tuple[int, int, Any], Any] = {}
        self.layouts: dict[int, tuple[Any, Any, int]] = {}  # trl: a broadcast tensor's shape, stride and offset
        # id -> (tensor, the device it was saved on when the tensor is its host copy, else None)
        self.saved: dict[int, tuple[torch.Tensor, torch.device | None]] = {}
        self.forward_stash: dict[int, torch.Tensor] = {}
        self.backward_stash: dict[int, torch.Tensor] = {}
        self.next_id = 0
        self.node: Any = None
        self.cleanup_queued = False
        self.off = False  # inside the output head (NoOpManager): saved tensors stay on the device
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> int:
        self.next_id += 1
        ident = self.next_id
        if self.every:  # save_on_cpu: every saved tensor, copied as it is saved
            with self.host():
                copy = torch.empty_like(tensor, device="cpu")
            copy.copy_(tensor)
            self.saved[ident] = (copy, tensor.device)
            return ident
        kept = (self.off or tensor.element_size() * tensor.nelement() < MIN_OFFLOAD_BYTES
                or isinstance(tensor, (torch.nn.Parameter, torch.nn.Buffer)))
        storage = _storage(tensor)
        key = (id(storage), tensor.storage_offset(), tensor.dtype)
        if self.trl and not kept:
            offloaded = self.offloaded_storages.get(key)
            kept = (offloaded is not None and offloaded() is storage) or id(storage) in self.parameter_storages
        if kept:
            self.saved[ident] = (tensor, None)
            return ident
        for old in list(self.forward_stash):  # (ids in order: stop at the first still recent)
            if old > ident - FORWARD_STASH:
                break
            del self.forward_stash[old]
        layout = None
        with self.host():
            if self.trl and 0 in tensor.stride() and storage is not None:  # broadcast: the storage alone
                elements = storage.nbytes() // tensor.element_size()
                copy = torch.empty(elements, dtype=tensor.dtype, device="cpu")
                layout = (tensor.shape, tensor.stride(), tensor.storage_offset())
                source = torch.as_strided(tensor, (elements,), (1,), 0)
            else:
                copy = torch.empty_like(tensor, device="cpu")
                source = tensor
        copy.copy_(source)
        if self.trl and storage is not None:
            self.offloaded_storages[key] = weakref.ref(storage)
        self.saved[ident] = (copy, tensor.device)
        if layout is not None:
            self.layouts[ident] = layout
        self.forward_stash[ident] = tensor
        return ident

    def _unpack(self, ident: int) -> torch.Tensor:
        tensor, device = self.saved.pop(ident)
        if device is None:
            return tensor
        if self.every:  # save_on_cpu's unpack: tensor.to(device), the caller's to keep
            return tensor.to(device, copy=True)
        if not self.cleanup_queued:
            self.cleanup_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.backward_stash.clear)
        node = torch._C._current_autograd_node()
        previous = []
        if node is not None and node is not self.node:
            self.node = node
            previous = list(self.backward_stash)
        if ident in self.forward_stash:
            found = self.forward_stash[ident]
        else:
            found = tensor.to(device, copy=True)  # back to the device: a new allocation there (copy: on a CPU too)
            if ident in self.layouts:
                found = torch.as_strided(found, *self.layouts.pop(ident))
            self.backward_stash[ident] = found

        def after_node(_outputs: Any, _inputs: Any) -> None:
            self.forward_stash.clear()
            for old in previous:
                self.backward_stash.pop(old, None)

        if node is not None:
            node.register_hook(after_node)
        return found

    def head(self, module: torch.nn.Module) -> list[Any]:
        """No offloading inside the output head (its NoOpManager); torchtune: nor after it (the loss runs outside the
        context)."""

        def enter(*_args: Any) -> None:
            self.off = True

        def leave(*_args: Any) -> None:
            self.off = False

        handles = [module.register_forward_pre_hook(enter)]
        if self.trl:
            handles.append(module.register_forward_hook(leave, always_call=True))
        return handles


def _storage(tensor: torch.Tensor) -> Any:
    try:
        return tensor.untyped_storage()
    except (NotImplementedError, RuntimeError, TypeError):
        return None


@contextlib.contextmanager
def offloading(model: torch.nn.Module, head: torch.nn.Module | None, style: str = "torchtune") -> Any:
    """The forward (and loss) under activation offloading (``style``: torchtune or trl), booked by the active tracker,
    if any."""
    manager = Offload(trk.active(), style, model.parameters())
    handles = manager.head(head) if head is not None else []
    try:
        with manager:
            yield manager
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def checkpoints_offloaded() -> Any:
    """--activation-offload checkpoints: transformers' activation_checkpointing_enable(offload=True) wraps each
    checkpoint call in torch.autograd.graph.save_on_cpu(pin_memory=True) (modeling_utils.py
    _activation_checkpointing_enable), so what the checkpoint saves outside its own hooks (the layer's inputs, which
    its _NoopSaveInputs saves) is copied to host memory and brought back for the recomputation. On a CPU its copies
    would be device memory to the tracker: here save_on_cpu is that bookkeeping, booked by the active tracker."""
    from transformers import modeling_utils

    tracker = trk.active()
    original = modeling_utils.save_on_cpu
    modeling_utils.save_on_cpu = lambda *_args, **_kwargs: Offload(tracker, "save_on_cpu")
    try:
        yield
    finally:
        modeling_utils.save_on_cpu = original
