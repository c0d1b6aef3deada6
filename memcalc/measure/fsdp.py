"""FSDP2's pieces the measured ranks share (memcalc.measure.distributed's data- and tensor-parallel ranks and
memcalc.measure.pipeline's stages): the rank-local tensor of a DTensor, the master-weight recipe as FSDP2 runs it, its
parameters, and the instrumentation that tells the tracker about its communication buffers. Imports torch lazily."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

UNSHARDED_GRADIENTS = "unsharded_gradients"


def local(t):
    """The rank-local tensor of a DTensor (FSDP2 shards), else the tensor."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


@contextlib.contextmanager
def instrument_fsdp(tracker) -> Iterator[None]:
    """While the measured step runs: FSDP2's collective functions allocate comm buffers; storage resizes are
    reported to the tracker. Restored afterwards."""
    import torch
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module

    names = ("foreach_all_gather", "foreach_all_gather_copy_out", "foreach_reduce")
    originals = {name: getattr(group_module, name) for name in names}
    original_resize = torch.UntypedStorage.resize_

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with tracker.communication():
                return fn(*args, **kwargs)

        return inner

    @functools.wraps(original_resize)
    def resize_(storage, size):
        result = original_resize(storage, size)
        tracker.storage_resized(storage)
        return result

    for name, fn in originals.items():
        setattr(group_module, name, wrap(fn))
    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original_resize
        for name, fn in originals.items():
            setattr(group_module, name, fn)


def fsdp_setup(setup):
    """fsdp2's dtypes: for a master-weight recipe (bf16/fp16) fp32 parameters and a mixed-precision policy
    instead of a separate master copy; else the recipe's own."""
    if setup.master_dtype is None:
        return setup, None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=setup.weight_dtype, reduce_dtype=torch.float32)
    return dataclasses.replace(setup, weight_dtype=setup.master_dtype, master_dtype=None), policy


def fsdp_params(model) -> list:
    found, seen = [], set()
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        group = get_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else []:
            if id(fsdp_param) not in seen:
                seen.add(id(fsdp_param))
                found.append(fsdp_param)
    return found
