"""PyTorch's CUDA caching allocator, replayed: what a step's allocations and frees reserve on a GPU.

A step's live tensor bytes (memcalc's peak) are what ``torch.cuda.max_memory_allocated`` approximates; a run dies
when the caching allocator cannot *reserve* a block. This module replays an allocation/free sequence through a
model of ``c10/cuda/CUDACachingAllocator.cpp`` (pytorch/pytorch, ``DeviceCachingAllocator``) and reports the
reserved peak, the allocated peak (block sizes, which include rounding and unsplit remainders) and the requested
peak (the tensors' bytes). Pure Python: no torch.

The rules, each from that file (function names are the C++ ones):
- ``round_size``: requests below 512 B take 512 B, the rest round up to a multiple of 512 B, or to the next
  power-of-2 division where ``roundup_power2_divisions`` asks (``roundup_power2_next_division``).
- ``get_pool``: requests of at most 1 MiB (``kSmallSize``) come from the small pool, the rest from the large pool.
- ``get_allocation_size``: a new small segment is 2 MiB (``kSmallBuffer``); a request under 10 MiB
  (``kMinLargeAlloc``) gets a 20 MiB segment (``kLargeBuffer``); larger requests a segment of their size rounded up
  to 2 MiB (``kRoundLarge``).
- ``get_free_block``: best fit, the smallest cached block (then the lowest address) of at least the size; with
  ``max_split_size`` set, a request below it never takes an oversize block and a request above it only one less than
  ``max_non_split_rounding_mb`` (20 MiB) larger.
- ``should_split``: a small-pool block (or any block with expandable segments) is split if at least 512 B remain; a
  large-pool block only if more than 1 MiB remains and the request is below ``max_split_size``: otherwise the whole
  block is handed out (allocated bytes count it, requested bytes do not).
- ``free_block``/``try_merge_blocks``: a freed block merges with free neighbours of the same segment.
- where ``cudaMalloc`` puts a new segment: below every earlier one. The allocator's own rule breaks a best-fit tie by
  address (``BlockComparatorSize``), so of two cached blocks of one size the newer segment's is taken. That is not
  PyTorch's rule but the driver's placement, read from an H200 (CUDA 13.0, driver 580): ``torch.cuda.memory._snapshot``
  lists segments by address, and in the kept rows (``benchmarks/gpu-runs``) the step's large segments lie below the
  weights loaded before them, newest lowest. Replayed that way, the 8,192-token eager row's reserved peak is 50.71 GiB
  against the GPU's 50.86 GiB (placed upward: 42.71 GiB, -16%); ``python benchmarks/segment_order.py`` prints every
  kept row both ways.
- ``alloc_block`` failing (the device is full): ``release_available_cached_blocks`` (only with ``max_split_size``
  set), then ``release_cached_blocks`` (every cached segment that is not split is freed) and one retry
  (``num_alloc_retries``); then out of memory (``num_ooms``).
- ``expandable_segments``: one segment per pool that grows by mapping 2 MiB (small) or 20 MiB (large) pages at its
  lowest free address range (``find_expandable_block``, ``map_block``); blocks split whenever 512 B remain; a retry
  unmaps the free whole pages (``unmap_block``).
- ``garbage_collection_threshold`` acts only when a per-process memory fraction is set
  (``torch.cuda.set_per_process_memory_fraction``); the replay has none, so it has no effect here (said in the
  result).

One stream: every request is on the step's compute stream (blocks used on another stream are freed after an event,
which this replay does not model).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

MIB = 1024 * 1024
MIN_BLOCK_SIZE = 512  # kMinBlockSize
SMALL_SIZE = 1 * MIB  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: a small-pool segment (and an expandable small page)
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: the segment for a 1-10 MiB request (and an expandable large page)
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc
ROUND_LARGE = 2 * MIB  # kRoundLarge
# CUDAAllocatorConfig: roundup_power2_divisions has one entry per power-of-2 interval from 1 MiB to 64 GiB.
ROUNDUP_INTERVALS = 16
# AllocatorConfig.cpp reads PYTORCH_ALLOC_CONF, else the older (deprecated) PYTORCH_CUDA_ALLOC_CONF.
ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
# Options CUDAAllocatorConfig accepts that do not change device reservations (pinned host memory, locking).
_NO_EFFECT_KEYS = {"pinned_use_cuda_host_register", "pinned_num_register_threads", "release_lock_on_cudamalloc",
                   "pinned_use_background_threads", "pinned_reserve_segment_size_mb",
                   "graph_capture_record_stream_reuse", "per_process_memory_fraction"}


def environment_alloc_conf() -> tuple[str, str]:
    """The allocator settings this process's environment gives PyTorch, and the variable they came from (``""`` and
    ``"default"`` when none is set)."""
    import os

    source = next((name for name in ENV_VARS if os.environ.get(name)), "default")
    return os.environ.get(source, ""), source


class AllocConfError(ValueError):
    """A PYTORCH_CUDA_ALLOC_CONF string the allocator would refuse (or that memcalc cannot replay)."""


def _shown(text: str) -> str:
    """A piece of the settings echoed in an error: quoted as repr does, at most 60 characters of it."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


@dataclass(frozen=True)
class AllocatorConfig:
    """The caching allocator's settings (``c10/cuda/CUDAAllocatorConfig.cpp``), as PYTORCH_CUDA_ALLOC_CONF sets
    them. ``max_split_size`` None is the default (no limit)."""

    max_split_size: int | None = None
    max_non_split_rounding: int = LARGE_BUFFER  # max_non_split_rounding_mb (kLargeBuffer before it existed)
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    text: str = ""  # the string it was read from ("" for the defaults)

    def divisions_for(self, size: int) -> int:
        """CUDAAllocatorConfig::roundup_power2_divisions(size): the entry of the size's power-of-2 interval."""
        index = size.bit_length() - 1 - 20  # log2(size) - log2(1 MiB)
        return self.roundup_power2_divisions[min(max(index, 0), ROUNDUP_INTERVALS - 1)]


def _parse_divisions(value: str) -> tuple[int, ...]:
    """``roundup_power2_divisions:N`` (every interval) or ``[256:1,512:2,>:8]`` (per interval, sizes in MiB), as
    CUDAAllocatorConfig::parseRoundUpPower2Divisions reads them."""
    def divisions(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise AllocConfError(f"roundup_power2_divisions: {_shown(text)} is not a whole number") from None
        if number != 0 and (number < 1 or number & (number - 1)):
            raise AllocConfError(f"roundup_power2_divisions: {number} must be a power of 2")
        return number

    if not value.startswith("["):
        number = divisions(value)
        if number == 0:
            raise AllocConfError("roundup_power2_divisions must be a power of 2, got 0")
        return (number,) * ROUNDUP_INTERVALS
    if not value.endswith("]"):
        raise AllocConfError("roundup_power2_divisions: a list must end with ']'")
    table = [0] * ROUNDUP_INTERVALS
    first, last_index = True, 0
    for item in filter(None, value[1:-1].split(",")):
        key, sep, number_text = item.partition(":")
        if not sep:
            raise AllocConfError(f"roundup_power2_divisions: {_shown(item)} is not SIZE_MB:DIVISIONS")
        number = divisions(number_text.strip())
        key = key.strip()
        if key == ">":
            table[last_index + 1:] = [number] * (ROUNDUP_INTERVALS - last_index - 1)
            continue
        try:
            size_mb = int(key)
        except ValueError:
            raise AllocConfError(f"roundup_power2_divisions: {_shown(key)} is not a size in MiB") from None
        if size_mb < 1 or size_mb & (size_mb - 1):
            raise AllocConfError(f"roundup_power2_divisions: {size_mb} must be a power of 2")
        index = min(size_mb.bit_length() - 1, ROUNDUP_INTERVALS - 1)
        if first:
            table[:index] = [number] * index
            first = False
        table[index] = number
        last_index = index
    return tuple(table)


def parse_alloc_conf(text: str) -> AllocatorConfig:
    """Read a PYTORCH_CUDA_ALLOC_CONF string (``key:value`` pairs separated by commas; a list value in brackets)."""
    max_split: int | None = None
    rounding = LARGE_BUFFER
    divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    expandable, threshold = False, 0.0
    # split on commas outside brackets
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise AllocConfError(f"{_shown(item)} is not key:value")
        if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            try:
                megabytes = int(value)
            except ValueError:
                raise AllocConfError(f"{key}: {_shown(value)} is not a whole number of MiB") from None
            if megabytes < LARGE_BUFFER // MIB:  # AllocatorConfig.cpp: "too small, must be >= 20"
                raise AllocConfError(f"{key} must be at least {LARGE_BUFFER // MIB}, got {megabytes}")
            if key == "max_split_size_mb":
                max_split = megabytes * MIB
            else:
                rounding = megabytes * MIB
        elif key == "roundup_power2_divisions":
            divisions = _parse_divisions(value)
        elif key == "expandable_segments":
            if value not in ("True", "False"):
                raise AllocConfError(f"expandable_segments must be True or False, got {_shown(value)}")
            expandable = value == "True"
        elif key == "garbage_collection_threshold":
            try:
                threshold = float(value)
            except ValueError:
                raise AllocConfError(f"garbage_collection_threshold: {_shown(value)} is not a number") from None
            if not 0.0 < threshold < 1.0:
                raise AllocConfError(f"garbage_collection_threshold must be between 0 and 1, got {value}")
        elif key == "backend":
            if value == "cudaMallocAsync":
                raise AllocConfError("backend:cudaMallocAsync (CUDA's own pool) is not the caching allocator memcalc "
                                     "replays; drop it to predict reserved memory")
            if value != "native":
                raise AllocConfError(f"backend must be native or cudaMallocAsync, got {_shown(value)}")
        elif key not in _NO_EFFECT_KEYS:
            raise AllocConfError(f"unknown option {_shown(key)}; the caching allocator's are max_split_size_mb, "
                                 "max_non_split_rounding_mb, roundup_power2_divisions, expandable_segments, "
                                 "garbage_collection_threshold and backend")
    return AllocatorConfig(max_split, rounding, divisions, expandable, threshold, text.strip())


@dataclass(eq=False)
class _Block:
    size: int
    addr: int
    small: bool
    segment: int
    prev: _Block | None = None
    next: _Block | None = None
    allocated: bool = False
    mapped: bool = True
    requested: int = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class OutOfMemory(Exception):
    """The replay could not reserve a block within the capacity it was given."""


@dataclass
class ReplayResult:
    """What the replayed step left in the allocator's statistics (``torch.cuda.memory_stats`` names)."""

    reserved_peak_bytes: int  # reserved_bytes.all.peak (max_memory_reserved)
    allocated_peak_bytes: int  # allocated_bytes.all.peak (max_memory_allocated): block sizes
    requested_peak_bytes: int  # requested_bytes.all.peak: the tensors' own bytes
    reserved_at_allocated_peak_bytes: int
    segments_peak: int
    num_alloc_retries: int
    num_ooms: int
    config: AllocatorConfig
    notes: list[str] = field(default_factory=list)


class CachingAllocator:
    """One device's caching allocator, single stream. ``capacity_bytes`` bounds what it may reserve (the GPU's memory
    less what is not the allocator's); None is unbounded. ``segments_below``: each new segment at a lower address
    than the earlier ones, as cudaMalloc placed them on an H200 (the module's docstring)."""

    def __init__(self, config: AllocatorConfig | None = None, capacity_bytes: int | None = None,
                 segments_below: bool = True) -> None:
        self.config = config or AllocatorConfig()
        self.capacity = capacity_bytes
        self._segments_below = segments_below  # False: each new segment above the last (tests, benchmarks)
        self._free: dict[bool, list[tuple[int, int, _Block]]] = {True: [], False: []}  # small? -> sorted free blocks
        self._unmapped: dict[bool, list[_Block]] = {True: [], False: []}  # expandable: unmapped ranges
        self._next_addr = 1 << 40  # expandable segments' address space grows up from here
        self._next_segment_addr = 1 << 56  # cudaMalloc'd segments: each new one below the last (see above)
        self._segments = itertools.count()
        self.reserved = self.allocated = self.requested = 0
        self.reserved_peak = self.allocated_peak = self.requested_peak = 0
        self.reserved_at_allocated_peak = 0
        self.segments = self.segments_peak = 0
        self.num_alloc_retries = self.num_ooms = 0

    # -- pools -------------------------------------------------------------------------------------------------
    def _insert(self, block: _Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.addr, block))

    def _remove(self, block: _Block) -> None:
        pool = self._free[block.small]
        index = bisect.bisect_left(pool, (block.size, block.addr))
        assert pool[index][2] is block
        del pool[index]

    def _round(self, size: int) -> int:
        if size < MIN_BLOCK_SIZE:
            return MIN_BLOCK_SIZE
        divisions = self.config.divisions_for(size)
        if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
            if size & (size - 1) == 0:
                return size
            floor = 1 << (size.bit_length() - 1)
            step = floor >> (divisions.bit_length() - 1)
            if step == 0:
                return floor << 1
            rounded = size & ~(step - 1)
            return size if rounded == size else rounded + step
        return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE

    @staticmethod
    def _segment_size(size: int) -> int:
        if size <= SMALL_SIZE:
            return SMALL_BUFFER
        if size < MIN_LARGE_ALLOC:
            return LARGE_BUFFER
        return -(-size // ROUND_LARGE) * ROUND_LARGE

    def _get_free_block(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, 0))
        if index == len(pool):
            return None
        block = pool[index][2]
        if self.config.expandable_segments:
            # best fit counts the unmapped range after a block as room it can grow into
            def room(b: _Block) -> int:
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
            for _size, _addr, other in pool[index + 1:]:
                if room(other) < room(block):
                    block = other
                else:
                    break
        limit = self.config.max_split_size
        if limit is not None:
            if size < limit <= block.size:
                return None
            if size >= limit and block.size >= size + self.config.max_non_split_rounding:
                return None
        self._remove(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= MIN_BLOCK_SIZE
        limit = self.config.max_split_size
        return (limit is None or size < limit) and remaining > SMALL_SIZE

    def _fits_device(self, size: int) -> bool:
        return self.capacity is None or self.reserved + size <= self.capacity

    def _new_segment(self, size: int, small: bool) -> _Block | None:
        segment_size = self._segment_size(size)
        if not self._fits_device(segment_size):
            return None
        span = segment_size + LARGE_BUFFER  # (segments never touch: no merging across them)
        if self._segments_below:
            self._next_segment_addr -= span
            addr = self._next_segment_addr
        else:
            addr, self._next_segment_addr = self._next_segment_addr, self._next_segment_addr + span
        block = _Block(segment_size, addr, small, next(self._segments))
        self._reserve(segment_size, +1)
        return block

    def _reserve(self, size: int, segments: int) -> None:
        self.reserved += size
        self.segments += segments
        self.reserved_peak = max(self.reserved_peak, self.reserved)
        self.segments_peak = max(self.segments_peak, self.segments)

    # -- expandable segments -------------------------------------------------------------------------------------
    def _expandable_block(self, size: int, small: bool) -> _Block | None:
        """find_expandable_block + map_block: the lowest unmapped range (with the free block before it) that holds
        ``size``, its pages mapped."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        unmapped = self._unmapped[small]
        if not unmapped:
            space = 1 << 50  # the segment's address space (1 1/8 of the GPU's memory): larger than any request
            base = -(-self._next_addr // LARGE_BUFFER) * LARGE_BUFFER  # pages are aligned to the segment's start
            tail = _Block(space, base, small, next(self._segments), mapped=False)
            self._next_addr = base + space
            unmapped.append(tail)
        for gap in sorted(unmapped, key=lambda b: b.addr):
            start = gap.prev if gap.prev is not None and not gap.prev.allocated else gap
            room, b = 0, start
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room < size:
                continue
            candidate = start
            if not candidate.mapped:
                candidate = self._map(candidate, min(candidate.size, size), page)
                if candidate is None:
                    return None
            while candidate.size < size:
                following = candidate.next
                assert following is not None and not following.mapped
                mapped = self._map(following, min(size - candidate.size, following.size), page)
                if mapped is None:
                    return None
                candidate = mapped
            self._remove(candidate)
            return candidate
        return None

    def _map(self, block: _Block, size: int, page: int) -> _Block | None:
        mapped_size = min(-(-size // page) * page, block.size)
        if not self._fits_device(mapped_size):
            return None
        self._unmapped[block.small].remove(block)
        block.mapped = True
        if mapped_size < block.size:
            rest = _Block(block.size - mapped_size, block.addr + mapped_size, block.small, block.segment,
                          prev=block, next=block.next, mapped=False)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped_size
            self._unmapped[block.small].append(rest)
        self._reserve(mapped_size, 0)
        for neighbour in (block.prev, block.next):
            self._merge(block, neighbour)
        self._insert(block)
        return block

    def _unmap_free(self) -> None:
        """release_cached_blocks with expandable segments: unmap every whole page of every free mapped block."""
        for small in (True, False):
            page = SMALL_BUFFER if small else LARGE_BUFFER
            for _size, _addr, block in list(self._free[small]):
                start = -(-block.addr // page) * page
                end = (block.addr + block.size) // page * page
                if end <= start:
                    continue
                self._remove(block)
                before, after = start - block.addr, block.addr + block.size - end
                if before:
                    head = _Block(before, block.addr, small, block.segment, prev=block.prev, next=block)
                    if block.prev is not None:
                        block.prev.next = head
                    block.prev = head
                    self._insert(head)
                if after:
                    tail = _Block(after, end, small, block.segment, prev=block, next=block.next)
                    if block.next is not None:
                        block.next.prev = tail
                    block.next = tail
                    self._insert(tail)
                block.addr, block.size, block.mapped = start, end - start, False
                self.reserved -= block.size
                for neighbour in (block.prev, block.next):
                    if neighbour is not None and not neighbour.mapped:
                        self._unmapped[small].remove(neighbour)
                        self._merge(block, neighbour)
                self._unmapped[small].append(block)

    # -- malloc / free -------------------------------------------------------------------------------------------
    def malloc(self, orig_size: int) -> _Block:
        size = self._round(orig_size)
        small = size <= SMALL_SIZE
        block = self._get_free_block(size, small)
        if block is None:
            block = self._alloc_block(size, small)
        if block is None and self._release_available(size, small):
            block = self._alloc_block(size, small)
        if block is None:
            self._release_cached()
            self.num_alloc_retries += 1
            block = self._alloc_block(size, small)
        if block is None:
            self.num_ooms += 1
            raise OutOfMemory(f"a {self._segment_size(size) / MIB:,.0f} MiB segment for a {orig_size / MIB:,.1f} MiB "
                              f"tensor did not fit beside {self.reserved / MIB:,.0f} MiB reserved "
                              f"({self.allocated / MIB:,.0f} MiB allocated)")
        if self._should_split(block, size):
            rest = _Block(block.size - size, block.addr + size, small, block.segment, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.allocated = True
        block.requested = orig_size
        self.allocated += block.size
        self.requested += orig_size
        if self.allocated > self.allocated_peak:
            self.allocated_peak = self.allocated
            self.reserved_at_allocated_peak = self.reserved
        self.requested_peak = max(self.requested_peak, self.requested)
        return block

    def _alloc_block(self, size: int, small: bool) -> _Block | None:
        if self.config.expandable_segments:
            return self._expandable_block(size, small)
        return self._new_segment(size, small)

    def free(self, block: _Block) -> None:
        assert block.allocated
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        for neighbour in (block.prev, block.next):
            self._merge(block, neighbour)
        self._insert(block)

    def _merge(self, block: _Block, other: _Block | None) -> None:
        """try_merge_blocks: absorb a free neighbour (of the same mapping state) into ``block``."""
        if other is None or other.allocated or other.mapped != block.mapped:
            return
        if other.mapped:
            self._remove(other)
        if other is block.prev:
            block.addr = other.addr
            block.prev = other.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = other.next
            if block.next is not None:
                block.next.prev = block
        block.size += other.size

    def _release_available(self, size: int, small: bool) -> bool:
        """release_available_cached_blocks: with max_split_size set, free the smallest cached oversize segment that
        covers the request, else oversize segments from the largest down until they cover it."""
        limit = self.config.max_split_size
        if limit is None or self.config.expandable_segments:
            return False
        pool = self._free[small]
        target = max(size, limit)
        index = bisect.bisect_left(pool, (target, 0))
        if index < len(pool):
            chosen = [pool[index][2]]
        else:
            chosen, total = [], 0
            for _size, _addr, block in reversed(pool):
                if total >= target or block.size < limit:
                    break
                chosen.append(block)
                total += block.size
            if total < target:
                for block in chosen:  # (the C++ frees them even then; the retry that follows frees the rest anyway)
                    self._remove(block)
                    self._reserve(-block.size, -1)
                return False
        for block in chosen:
            self._remove(block)
            self._reserve(-block.size, -1)
        return True

    def _release_cached(self) -> None:
        """release_cached_blocks: every cached segment that is not split goes back to the device."""
        if self.config.expandable_segments:
            self._unmap_free()
            return
        for small in (True, False):
            for _size, _addr, block in list(self._free[small]):
                if not block.is_split():
                    self._remove(block)
                    self._reserve(-block.size, -1)

    def result(self, notes: Iterable[str] = ()) -> ReplayResult:
        notes = list(notes)
        if self.config.garbage_collection_threshold:
            notes.append("garbage_collection_threshold acts only with a per-process memory fraction set "
                         "(torch.cuda.set_per_process_memory_fraction); the replay sets none, so it changes nothing")
        return ReplayResult(self.reserved_peak, self.allocated_peak, self.requested_peak,
                            self.reserved_at_allocated_peak, self.segments_peak, self.num_alloc_retries,
                            self.num_ooms, self.config, notes)


# The cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize): allocated through the
# caching allocator for each (handle, stream) that runs a matmul and kept. CUBLAS_WORKSPACE_CONFIG's ":SIZE:COUNT"
# pairs (KiB) sum to its size; the default is 32 MiB on compute capability 9.x to 12.x (Hopper, Blackwell), else
# ":4096:2:16:8" (8 MiB + 128 KiB); ROCm builds: 128 MiB on gfx942 and gfx950, else 32 MiB. cuBLASLt shares it
# (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default).
CUBLAS_WORKSPACE_LARGE = 4096 * 8 * 1024
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLAS_WORKSPACE_ROCM = {"gfx942": 128 * MIB, "gfx950": 128 * MIB}
# A training step runs matmuls on two threads, each with its own handle (DeviceThreadHandlePool): the forward's and
# the optimizer's thread, and autograd's device thread for the backward.
CUBLAS_HANDLES_PER_STEP = 2
# 1 MiB more per thread, kept by the process from the first step that runs a biased Linear on that thread (measured on
# an H200, torch 2.11: benchmarks/gpu-runs/2026-12-04-h200-c, the Qwen2 eager row on the forward's thread, a Qwen2-MoE
# checkpointed recomputation on autograd's); its size is cuBLASLt's default workspace (CublasHandlePool.cpp
# parseCUDABlasLtWorkspaceSize: 1024 KiB), which addmm with a bias runs through (gemm_and_bias). The fit deducts it
# with the workspaces; the measured comparisons leave it out (a model without biases never makes it).
CUBLASLT_WORKSPACE = 1024 * 1024


def cublas_workspace_bytes(compute_capability: str | None, workspace_config: str | None = None) -> int | None:
    """One cuBLAS workspace for a card of this compute capability ("9.0", or a ROCm gfx target), under
    CUBLAS_WORKSPACE_CONFIG if set; None when the card is not known."""
    import re

    if workspace_config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", workspace_config)
        if pairs:
            return sum(int(size) * 1024 * int(count) for size, count in pairs)
    if not compute_capability:
        return None
    if compute_capability.startswith("gfx"):
        return CUBLAS_WORKSPACE_ROCM.get(compute_capability, 32 * MIB)
    major = int(compute_capability.split(".")[0])
    return CUBLAS_WORKSPACE_LARGE if 9 <= major <= 12 else CUBLAS_WORKSPACE_DEFAULT


def environment_cublas_workspace(compute_capability: str | None) -> int | None:
    """``cublas_workspace_bytes`` for this card under the environment's CUBLAS_WORKSPACE_CONFIG."""
    import os

    return cublas_workspace_bytes(compute_capability, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def step_workspace_bytes(compute_capability: str | None, unknown: int = 0) -> int:
    """The step's cuBLAS workspaces together (CUBLAS_HANDLES_PER_STEP of ``environment_cublas_workspace``), kept by
    the caching allocator beside the tensors; ``unknown`` per handle for a card not known."""
    one = environment_cublas_workspace(compute_capability)
    return CUBLAS_HANDLES_PER_STEP * (unknown if one is None else one)


def workspace_allocations(workspace_bytes: int | None) -> list[int]:
    """The step's cuBLAS workspaces as ``replay``'s persistent allocations, one per handle; none for an unknown card."""
    return [workspace_bytes] * CUBLAS_HANDLES_PER_STEP if workspace_bytes else []


ALLOC, FREE = 1, 0


def replay(events: Iterable[tuple[int, int, int]], config: AllocatorConfig | None = None,
           capacity_bytes: int | None = None, persistent: Iterable[int] = (), segments_below: bool = True
           ) -> ReplayResult:
    """Replay ``(ALLOC, key, nbytes)`` and ``(FREE, key, 0)`` events (a key may be reused after its free). Zero-byte
    requests are not allocations (the CUDA allocator hands out a null pointer). ``persistent``: allocations made
    first and never freed (the cuBLAS workspaces). An allocation that cannot be reserved within ``capacity_bytes``
    ends the replay with ``num_ooms`` 1."""
    allocator = CachingAllocator(config, capacity_bytes, segments_below)
    live: dict[int, _Block] = {}
    try:
        for nbytes in persistent:
            allocator.malloc(nbytes)
        for kind, key, nbytes in events:
            if kind == ALLOC:
                if nbytes > 0:
                    live[key] = allocator.malloc(nbytes)
            else:
                block = live.pop(key, None)
                if block is not None:
                    allocator.free(block)
    except OutOfMemory as error:
        return allocator.result([f"out of memory in the replay: {error}"])
    return allocator.result()
