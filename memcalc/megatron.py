"""Megatron-LM's engine (``--engine megatron``): what its data parallelism holds per GPU, read from its code
(megatron/core and megatron/training; the file and function named at each rule).

- **Weights** in the training dtype: ``Float16Module`` casts the model to bf16 (``--bf16``); fp32 runs keep fp32.
- **Main gradients**, one contiguous buffer for the whole step: ``_ParamAndGradBuffer.__init__``
  (megatron/core/distributed/param_and_grad_buffer.py) allocates ``grad_data`` once, in ``grad_dtype``, and each
  parameter's ``main_grad`` is a view of it; ``DistributedDataParallel.zero_grad_buffer`` zeroes it between steps
  rather than freeing it, so it is alive through forward too. Under ``--bf16`` the gradients are accumulated and
  reduced in fp32 (megatron/training/arguments.py ``validate_args``: bf16 sets
  ``accumulate_allreduce_grads_in_fp32``, unless ``--grad-reduce-in-bf16``). Autograd's bf16 gradient of a parameter
  is added into it by ``DistributedDataParallel._make_backward_post_hook`` and dropped (``param.grad = None``); a
  Linear's weight gradient goes straight into it (``gradient_accumulation_fusion``).
- **Without the distributed optimizer** (``--zero 0``): ``Float16OptimizerWithFloat16Params``
  (megatron/core/optimizer/optimizer.py) keeps an fp32 main copy of every parameter and points its ``.grad`` at the
  fp32 main gradient (no copy); Adam's two fp32 states per parameter. 18 B per parameter under bf16, 16 under fp32.
- **With it** (``--zero 1``, ``--use-distributed-optimizer``): ``DistributedOptimizer._build_model_and_main_param_
  groups`` (megatron/core/optimizer/distrib_optimizer.py) makes fp32 main parameters for this rank's 1/dp range of the
  buffer only, and Adam's states for them; the gradient buffer stays whole (reduce-scattered in place), and so do the
  weights (the parameter buffer, all-gathered in place). 6 + 12/dp B per parameter under bf16, 8 + 8/dp under fp32.
  The buffers are padded: each parameter starts at a multiple of 64 elements (``_pad_start_of_param_if_needed``) and
  each bucket (at least 40M parameters, ``bucket_size = max(40_000_000, 1_000_000 x dp)``) ends at a multiple of
  lcm(dp, 128) (``_pad_end_of_bucket_if_needed``).
- **The step**: TransformerEngine's (or apex's) ``FusedAdam`` (megatron/core/optimizer/__init__.py), no step
  temporaries beyond the fused kernel's.
- **The vocabulary** is padded to a multiple of ``make_vocab_size_divisible_by`` (128) x tp
  (megatron/training/tokenizer ``_vocab_size_with_padding``): the embedding and the output layer have those rows and
  the logits those columns.

The per-parameter figures are Megatron's own (docs/source/api-guide/dist_optimizer.md). Megatron's buffers and
optimizer need CUDA, so none of this is measured here; the activations are memcalc's rules for the transformers class,
not Megatron's TransformerEngine layers. With ``--pp`` the layers are split evenly and the stages run its 1F1B
schedule (memcalc.pipeline.stage_ranges, engine._megatron_pipeline_buffers): that part is measured, megatron-core's own
schedule on gloo ranks (memcalc.measure.megatron_pipeline, benchmarks/megatron_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from memcalc.model import ROLE_EMBEDDING, ROLE_LM_HEAD, ParamTensor

VOCAB_DIVISIBLE_BY = 128  # --make-vocab-size-divisible-by's default
PARAM_START_ALIGNMENT = 64  # elements: 128-byte aligned starts for >= 16-bit parameters
BUCKET_MIN_PARAMS = 40_000_000  # the distributed optimizer's bucket size: max(40M, 1M x dp)
BUCKET_END_ALIGNMENT = 128
SOURCE = ("Megatron-LM megatron/core/distributed/param_and_grad_buffer.py (_ParamAndGradBuffer) and "
          "distributed_data_parallel.py; megatron/core/optimizer/optimizer.py, distrib_optimizer.py")
PIPELINE_SOURCE = ("megatron-core megatron/core/pipeline_parallel/schedules.py "
                   "forward_backward_pipelining_without_interleaving; measured on gloo ranks (memcalc.measure."
                   "megatron_pipeline)")
# Measured (benchmarks/megatron_pipeline.py: megatron-core 0.16.1's 1F1B schedule on gloo ranks, a small Llama on 2 to
# 4 stages, 1 to 6 micro-batches, four recipes, checkpointing none and full)
PIPELINE_NOTE = ("--pp under --engine megatron: Megatron-LM's 1F1B schedule (outputs pseudo-freed once sent, receive "
                 "buffers made per receive); against megatron-core's own schedule on gloo ranks (a small Llama, 2 to "
                 "4 stages): 100 stage steps -0.1% to +0.0%, the phase right. Megatron's model states are its code's "
                 "rules, not measured (its buffers and optimizer need CUDA)")
NOTE = ("--engine megatron: model states as Megatron-LM's DDP and optimizer hold them (memcalc.megatron, from its "
        "code; not measured: Megatron needs CUDA); activations are memcalc's rules for the transformers class, not "
        "Megatron's TransformerEngine layers (fused norms, SwiGLU and loss save other tensors)")


def padded_vocab(vocab: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x tp."""
    multiple = VOCAB_DIVISIBLE_BY * tp
    return math.ceil(vocab / multiple) * multiple


def pad_vocabulary(tensors: Sequence[ParamTensor], vocab: int, tp: int) -> list[ParamTensor]:
    """The model's tensors with the embedding's and the output layer's ``vocab`` rows padded to Megatron's."""
    rows = padded_vocab(vocab, tp)
    return [dataclasses.replace(t, shape=(rows, *t.shape[1:]))
            if t.role in (ROLE_EMBEDDING, ROLE_LM_HEAD) and len(t.shape) == 2 and t.shape[0] == vocab else t
            for t in tensors]


def buffer_numel(numels: Sequence[int], dp: int, distributed: bool) -> int:
    """Elements of the gradient (and parameter) buffer: the parameters, and with the distributed optimizer each one's
    start aligned to 64 elements and each bucket's end to lcm(dp, 128)."""
    if not distributed:
        return sum(numels)
    aligned = sum(math.ceil(n / PARAM_START_ALIGNMENT) * PARAM_START_ALIGNMENT for n in numels)
    buckets = max(1, math.ceil(aligned / max(BUCKET_MIN_PARAMS, 1_000_000 * dp)))
    return aligned + buckets * (math.lcm(dp, BUCKET_END_ALIGNMENT) - 1)
