"""``--verify=trace``: the real transformers model class at full size under ``FakeTensorMode``.

Fake tensors carry shape, dtype, device and storage size but no data, so an 8B model's step is traced in
seconds through the same tracker, counting the bytes each storage would have. Pitfalls this avoids:
- dtypes: the model is built with ``torch.set_default_dtype`` set to the weight dtype (and ``dtype=`` passed
  to transformers), so nothing is created in fp32 and cast afterwards;
- optimizer implementation: passed explicitly (foreach / fused / for-loop), since CPU defaults differ from
  CUDA's;
- attention path: transformers treats any fake tensor as "being traced". No attention mask is passed, and its
  packed-sequence check (``masking_utils.find_packed_sequence_indices``), which cannot read fake position ids and
  then assumes packing, is answered as a real run answers it for these inputs (one unpacked sequence per row:
  ``None``). Without that, transformers builds an explicit mask, so SDPA gets no ``is_causal`` and no
  ``enable_gqa`` (k and v are repeated to all heads): more memory than the GPU run. The fake tensors are CPU
  tensors, never the meta device, so SDPA takes its flash kernel rather than the math fallback the meta device
  takes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from memcalc.measure.measurement import Measurement
from memcalc.measure.step import Progress, execute, to_measurement
from memcalc.model import ModelConfig
from memcalc.spec import TrainingSpec


@contextlib.contextmanager
def unpacked_sequences() -> Iterator[None]:
    """While tracing, transformers' packed-sequence detection answers as for real, unpacked inputs."""
    from torch._subclasses.fake_tensor import FakeTensor
    from transformers import masking_utils

    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        found = original(position_ids, *args, **kwargs)
        # Our position ids are 0..seq-1 in every row: a real run returns None (no packing).
        return None if isinstance(found, FakeTensor) else found

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def fake_grouped_mm(func: Any, args: Any, kwargs: Any) -> Any:
    """aten._grouped_mm (transformers' MoE experts) on fp32 fake tensors: torch's meta kernel accepts only bf16
    (_meta_registrations.py, _meta_grouped_mm_common), the real CPU kernel any float dtype. The output is what the
    real kernel returns: the shape a bf16 call gives, in out_dtype or the inputs' dtype. None for any other call
    (the op then runs as it is)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    if func is not torch.ops.aten._grouped_mm.default:
        return None
    mat_a, mat_b = args[0], args[1]
    if not isinstance(mat_a, FakeTensor) or (mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16):
        return None
    kwargs = dict(kwargs or {})
    out_dtype = kwargs.pop("out_dtype", None) or mat_a.dtype
    shaped = func(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), *args[2:], **kwargs)
    return torch.empty(shaped.shape, dtype=out_dtype, device=mat_a.device)


class FakeKernels(TorchDispatchMode):
    """Below the tracker: the fake grouped_mm (``fake_grouped_mm``) and, with CUDA's semantics, LayerNorm's fp32
    statistics (``cuda_semantics.layer_norm_stats``)."""

    def __init__(self, like_cuda: bool = False) -> None:
        super().__init__()
        self.like_cuda = like_cuda

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = fake_grouped_mm(func, args, kwargs)
        if out is None:
            out = func(*args, **(kwargs or {}))
        if self.like_cuda:
            from memcalc.measure import cuda_semantics

            return cuda_semantics.layer_norm_stats(func, args, out)
        return out


def measure_trace(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, attn_implementation: str = "sdpa",
                  progress: Progress | None = None, record_timeline: bool = False) -> Measurement:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # allow_non_fake_inputs: module code may mix in real constants (e.g. a scalar made before the mode).
    with FakeTensorMode(allow_non_fake_inputs=True), unpacked_sequences(), FakeKernels():
        result = execute(model_config, spec, device="cpu", attn_implementation=attn_implementation,
                         progress=progress, record_timeline=record_timeline, allocation_events=True)
        measurement = to_measurement("trace", result)
    return measurement
