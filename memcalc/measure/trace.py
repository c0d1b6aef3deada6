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


def measure_trace(model_config: ModelConfig | dict[str, Any], spec: TrainingSpec, *, attn_implementation: str = "sdpa",
                  progress: Progress | None = None, record_timeline: bool = False) -> Measurement:
    from torch._subclasses.fake_tensor import FakeTensorMode

    # allow_non_fake_inputs: module code may mix in real constants (e.g. a scalar made before the mode).
    with FakeTensorMode(allow_non_fake_inputs=True), unpacked_sequences():
        result = execute(model_config, spec, device="cpu", attn_implementation=attn_implementation,
                         progress=progress, record_timeline=record_timeline)
        measurement = to_measurement("trace", result)
    return measurement
