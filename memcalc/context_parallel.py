"""Context parallelism (``--cp N``): the sequence split over N ranks, attention run as a ring.

What one rank holds, following PyTorch's ``context_parallel`` (torch/distributed/tensor/experimental/
_context_parallel/_attention.py, torch 2.13), as torchtitan applies it (models/llama3/infra/parallelize.py: the
context-parallel ranks fold into the FSDP mesh, ``dp_shard_cp``):

- every activation of a layer is this rank's ``seq_len / cp`` positions (``context_parallel`` shards the inputs,
  labels and position ids along the sequence; with load balancing each rank takes two of ``2 cp`` chunks, the head
  and the tail of the causal triangle), so the rules run at the local sequence;
- sdpa's saved tensors are those of the local q, k and v (the DTensor dispatch wraps the local tensors), plus what
  the ring makes while it runs and frees when it returns: ``_templated_ring_attention`` (forward) and
  ``_templated_ring_attention_backward``, with their default options (``_ContextParallelOptions``: merge in fp32,
  load balancing on, the keys and values all-gathered once per call). ``ring_peaks`` walks those two functions'
  tensors line by line; their peak is the attention's moment of the step, the forward's beside the layers before,
  the backward's where a layer's attention gradients are made.

The parameters are replicated over the context-parallel ranks and their gradients reduced over them: the data-
parallel sharding (``--gpus`` / (tp x pp) ranks) spans them, as torchtitan's FSDP mesh does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from memcalc.errors import UnsupportedModelError, UsageError
from memcalc.families.base import CAUSAL_LM
from memcalc.spec import ActivationSource, Attention
from memcalc.tensor_parallel import MODEL_TYPES, MOE_MODEL_TYPES
from memcalc.units import BYTES_PER_FP32

# Llama-layout attention (separate q, k, v and o projections, sdpa): the dense types of the TP plan and the MoE ones.
CP_MODEL_TYPES = (*MODEL_TYPES, *MOE_MODEL_TYPES)
# What the ring does not do, said with every estimate.
ASSUMPTIONS = ("CUDA's flash kernel takes the grouped k and v as they are (enable_gqa), so the ring moves kv-heads-"
               "sized buffers; the flash backward's own workspaces are not counted (as without --cp)")


@dataclass(frozen=True)
class RingPeaks:
    """Bytes the ring makes beyond its inputs, at its forward's and its backward's peak (the most loaded rank)."""

    forward: int
    backward: int
    rank: int  # the rank with the larger backward peak


class _Frame:
    """The tensors one Python function holds: names bound to tensors (several names may share one, as views and
    aliases do), a tensor released when no name holds it; the largest sum of live bytes reached."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}  # name -> tensor
        self._refs: dict[int, int] = {}  # tensor -> names holding it
        self._sizes: dict[int, int] = {}  # tensor -> bytes
        self.live = self.peak = self._made = 0

    def new(self, name: str, nbytes: int) -> None:
        """``name = <a new tensor>``: it exists before the one the name held is released."""
        self._made += 1
        tensor = self._made
        self._sizes[tensor], self._refs[tensor] = nbytes, 1
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._unbind(name)
        self.names[name] = tensor

    def temp(self, nbytes: int) -> None:
        """A temporary made and released within one expression, beside what is live."""
        self.peak = max(self.peak, self.live + nbytes)

    def alias(self, name: str, of: str) -> None:
        """``name = of`` (or a view of it: a view keeps its base alive)."""
        tensor = self.names[of]
        self._refs[tensor] += 1
        self._unbind(name)
        self.names[name] = tensor

    def drop(self, *names: str) -> None:
        for name in names:
            self._unbind(name)

    def _unbind(self, name: str) -> None:
        tensor = self.names.pop(name, None)
        if tensor is None:
            return
        self._refs[tensor] -= 1
        if not self._refs[tensor]:
            self.live -= self._sizes.pop(tensor)
            del self._refs[tensor]


# Kinds of a ring step on one rank (_is_causal_behavior, with the load-balancing branches).
CAUSAL, FULL, PARTIAL, SKIP = "causal", "full", "partial", "skip"
# A run of steps of one kind repeats the same tensors: past this many in a row the walk skips the middle ones (the
# first and last steps stay). tests/test_context_parallel.py checks the skipped walk against the whole one.
_REPEATS = 3


def _steps(size: int, rank: int, load_balance: bool) -> list[tuple[bool, bool, str]]:
    """(first, last, kind) of the ring steps one rank walks: step 0 causal over its own block; then, for
    i <= rank, the whole (or with load balancing the first half of the) earlier rank's block, and for i > rank, with
    load balancing the second half of q against it (partial), without it nothing (skip)."""
    kinds = [CAUSAL] + [FULL if i <= rank else (PARTIAL if load_balance else SKIP) for i in range(1, size)]
    steps, run = [], 0
    for i, kind in enumerate(kinds):
        run = run + 1 if i and kind == kinds[i - 1] else 0
        if i in (0, size - 1) or run < _REPEATS:
            steps.append((i == 0, i == size - 1, kind))
    return steps


def _ranks(size: int) -> list[int]:
    """Ranks whose walks differ once repeats are skipped: the first and last few (the middle ones walk alike)."""
    return sorted(set(range(min(size, _REPEATS + 1))) | set(range(max(0, size - _REPEATS - 1), size)))


def ring_forward(q: int, kv: int, lse: int, c: int, size: int, rank: int, load_balance: bool = True,
                 kv_contiguous: bool = False) -> int:
    """Peak bytes _templated_ring_attention holds beyond q, k and v, its two outputs included (``q``, ``kv``: bytes of
    the local q and of k (= v); ``lse``: the fp32 log-sum-exp, b x heads x s x 4; ``c``: the inputs' element
    size), walking the function (and _SDPAMerger's) line by line."""
    f = _Frame()
    for name in ("key", "value"):
        f.new(name, kv if not kv_contiguous else 0)  # key = key.contiguous() (contiguous: the caller's, not counted)
    for first, last, kind in _steps(size, rank, load_balance):
        if not first:  # key, value = slices of the gathered buffer (rotater.next_buffer())
            f.alias("key", "gathered")
            f.alias("value", "gathered")
        if not last:
            f.new("next_kv", 2 * kv)  # torch.cat([key.flatten(), value.flatten()])
            if "gathered" not in f.names:
                f.new("gathered", size * 2 * kv)  # _AllGatherRotater: all_gather_single once, kept by the rotater
            f.drop("next_kv")  # exchange_buffers returns None
        if kind == SKIP:
            continue
        share = 2 if kind == PARTIAL else 1  # the second half of q only
        f.alias("k", "key")
        f.alias("v", "value")
        f.new("out", q // share)  # out, logsumexp, *rest = op(q, k, v, ...)
        f.new("logsumexp", lse // share)
        # _SDPAMerger.step: out.to(fp32) (a copy unless fp32 already), lse.to(fp32) (fp32 already: itself)
        if c == BYTES_PER_FP32:
            f.alias("block_out", "out")
        else:
            f.new("block_out", q * BYTES_PER_FP32 // c // share)
        if "merged_lse" not in f.names:
            f.alias("merged_lse", "logsumexp")
            f.alias("merged_out", "block_out")
        else:
            half_lse, half_out = lse // share, q * BYTES_PER_FP32 // c // share
            # out = out - F.sigmoid(block_lse - lse) * (out - block_out)
            f.new("sig", half_lse)
            f.temp(half_lse)  # (block_lse - lse, until sigmoid returns)
            f.new("diff", half_out)
            f.new("prod", half_out)
            f.drop("diff")
            f.new("new_out", half_out)
            f.drop("prod", "sig")
            # lse = lse - F.logsigmoid(lse - block_lse) (CUDA's log_sigmoid_forward keeps no buffer)
            f.new("logsig", half_lse)
            f.temp(half_lse)
            f.new("new_lse", half_lse)
            f.drop("logsig")
            if kind == PARTIAL:  # _partial_update: torch.cat of the kept half and the new one
                f.new("merged_lse", lse)
                f.new("merged_out", q * BYTES_PER_FP32 // c)
            else:
                f.alias("merged_lse", "new_lse")
                f.alias("merged_out", "new_out")
            f.drop("new_lse", "new_out")
        f.drop("block_out")  # step's fp32 copy of the block
    if c != BYTES_PER_FP32:
        f.new("result", q)  # results(): self._out.to(the output dtype); the lse is the merger's own
    return f.peak


def ring_backward(q: int, kv: int, lse: int, c: int, size: int, rank: int, load_balance: bool = True,
                  kv_contiguous: bool = False) -> int:
    """Peak bytes _templated_ring_attention_backward holds beyond its inputs (grad_out, q, k, v, out, lse), its
    outputs (q's, k's and v's gradients) included, walking it line by line."""
    qf, kvf = q * BYTES_PER_FP32 // c, kv * BYTES_PER_FP32 // c
    f = _Frame()
    f.new("grad_query", qf)  # zeros_like(query, dtype=fp32)
    f.new("grad_key", kvf)
    f.new("grad_value", kvf)
    for name in ("key", "value"):
        f.new(name, 0 if kv_contiguous else kv)
    for first, last, kind in _steps(size, rank, load_balance):
        if not first:  # key, value = slices of the gathered buffer
            f.alias("key", "gathered")
            f.alias("value", "gathered")
        if not last:
            f.new("next_kv", 2 * kv)  # torch.cat(...), held by the name until the next one
            if "gathered" not in f.names:
                f.new("gathered", size * 2 * kv)
        if kind != SKIP:  # q, k, v, out_, dout, lse = (query, key, value, ...) or views of them
            f.alias("k", "key")
            f.alias("v", "value")
            if kind == PARTIAL:
                f.new("lse", lse // 2)  # logsumexp.chunk(2)[1].contiguous()
            else:
                f.drop("lse")  # (the saved logsumexp itself)
        names = ("gq", "gk", "gv")
        if kind == SKIP:
            for name, nbytes in zip(names, (qf, kvf, kvf)):  # zeros_like(..., dtype=accum_dtype)
                f.new(name, nbytes)
        else:  # grad_query_, grad_key_, grad_value_, *rest = op(...): all three made before the old ones go
            grads = {PARTIAL: (q // 2, kv, kv), FULL: (q, kv // 2, kv // 2) if load_balance else (q, kv, kv),
                     CAUSAL: (q, kv, kv)}[kind]
            for name, nbytes in zip(names, grads):
                f.new(name + " new", nbytes)
            for name in names:
                f.alias(name, name + " new")
                f.drop(name + " new")
        if not first:
            f.alias("next_grad_kv", "sent")  # dkv_rotater.next_buffer(): the received gradients
            f.alias("grad_key", "next_grad_kv")
            f.alias("grad_value", "next_grad_kv")
            if load_balance and kind == FULL:  # _partial_update(..., add=True): a cat each
                f.new("grad_key", kvf)
                f.new("grad_value", kvf)
        if first and not kv_contiguous:  # grad_key keeps key's strides: flatten() copies
            f.new("flat", 2 * kvf)
            f.new("next_grad_kv", 2 * kvf)
            f.drop("flat")
        else:
            f.new("next_grad_kv", 2 * kvf)  # torch.cat([grad_key.flatten(), grad_value.flatten()])
        f.new("sent", 2 * kvf)  # _AllToAllRotater: permute_tensor's output, kept by the rotater
        if kind == PARTIAL:
            f.new("grad_query", qf)  # _partial_update(grad_query, ...): a cat
    if c == BYTES_PER_FP32:  # .to() of an fp32 tensor to fp32: the same tensor
        f.alias("next_grad_kv", "sent")
    else:
        f.new("grad_query", q)  # grad_query.to(query.dtype)
        f.new("next_grad_kv", 2 * kv)  # dkv_rotater.next_buffer().to(key.dtype)
    f.alias("grad_key", "next_grad_kv")
    f.alias("grad_value", "next_grad_kv")
    return f.peak


@functools.lru_cache(maxsize=256)  # (a pure walk of ints; the planner asks for the same rings many times)
def ring_peaks(q: int, kv: int, lse: int, c: int, size: int, load_balance: bool = True,
               kv_contiguous: bool = False) -> RingPeaks:
    """The ring's forward and backward peaks on the most loaded rank."""
    ranks = _ranks(size)
    forward = max(ring_forward(q, kv, lse, c, size, r, load_balance, kv_contiguous) for r in ranks)
    backward, rank = max((ring_backward(q, kv, lse, c, size, r, load_balance, kv_contiguous), r) for r in ranks)
    return RingPeaks(forward, backward, rank)


def check(described, spec) -> None:
    """One line for a run context parallelism cannot take as modelled (exit 2 for a bad request, 5 for a path not
    modelled)."""
    if spec.cp == 1:
        return
    if described is None:
        raise UsageError("{cp} splits each layer's sequence: give a model name or config.json, not only {params}")
    arch = described.arch
    if described.model_type not in CP_MODEL_TYPES:
        raise UnsupportedModelError(f"{{cp}} is modelled for decoders of the Llama layout "
                                    f"({', '.join(CP_MODEL_TYPES)}); {described.model_type} is not yet: drop {{cp}}")
    if arch.head != CAUSAL_LM:
        raise UnsupportedModelError(f"{{cp}} runs causal attention (context_parallel's ring); {arch.architecture} "
                                    "has another head: drop {cp}")
    if not arch.supports_sdpa:
        raise UnsupportedModelError(f"{{cp}}: {arch.architecture} has no sdpa path in transformers (it runs eager "
                                    "attention), and torch's context_parallel replaces sdpa's kernels only: drop {cp}")
    if spec.attention != Attention.sdpa:
        raise UsageError(f"{{cp}} with {{attn}} {spec.attention.value}: torch's context_parallel replaces sdpa's "
                         "kernels only; use {attn} sdpa")
    if spec.padding_masked:
        raise UsageError("{cp} with {padded}: a padded batch needs an attention mask, and torch's ring attention runs "
                         "causal attention without one: pack the rows or drop {cp}")
    if arch.sliding_window is not None and arch.sliding_window < spec.seq_len:
        raise UnsupportedModelError(
            f"{{cp}} with a sliding window ({arch.sliding_window:,} < {{seq_len}} {spec.seq_len:,}): the window needs "
            "an attention mask, and torch's ring attention runs causal attention without one: drop {cp}")
    if spec.activations == ActivationSource.trace:
        raise UsageError("{cp} with {activations} trace: the traced step runs one process's attention, not the ring; "
                         "use the rules ({activations} auto)")


def ring_bytes(heads: int, kv_heads: int, head_dim: int, tokens: int, c: int) -> tuple[int, int, int]:
    """The local q's, k's (= v's) and fp32 log-sum-exp's bytes of one layer's attention on one rank."""
    return c * tokens * heads * head_dim, c * tokens * kv_heads * head_dim, BYTES_PER_FP32 * tokens * heads
