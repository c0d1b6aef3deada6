"""The caching-allocator replay against request sequences whose result follows by hand from the rules of
pytorch/pytorch c10/cuda/CUDACachingAllocator.cpp and c10/core/AllocatorConfig.cpp (each test names its rule)."""

import pytest

from memcalc.allocator import (
    ALLOC,
    FREE,
    MIB,
    AllocConfError,
    CachingAllocator,
    parse_alloc_conf,
    replay,
)


def run(sequence, conf="", capacity=None, segments_below=True):
    """``sequence``: ("+", name, bytes) or ("-", name)."""
    events = [(ALLOC, hash(name), size[0]) if op == "+" else (FREE, hash(name), 0) for op, name, *size in sequence]
    return replay(events, parse_alloc_conf(conf), capacity, segments_below=segments_below)


def test_small_requests_round_to_512_and_share_2mib_segments():
    # round_size: < 512 B -> 512 B; get_allocation_size: a small request (<= 1 MiB) opens a 2 MiB segment
    result = run([("+", "a", 100)])
    assert (result.requested_peak_bytes, result.allocated_peak_bytes, result.reserved_peak_bytes) == (100, 512, 2 * MIB)
    # two 1 MiB requests fill one 2 MiB segment (split while >= 512 B remain); a third opens another
    result = run([("+", "a", MIB), ("+", "b", MIB), ("+", "c", MIB)])
    assert (result.allocated_peak_bytes, result.reserved_peak_bytes, result.segments_peak) == (3 * MIB, 4 * MIB, 2)


def test_mid_sized_requests_pack_into_20mib_segments():
    # 1-10 MiB requests open a 20 MiB segment (kLargeBuffer) and split it while more than 1 MiB would remain;
    # the 13th 1.5 MiB request finds a 2 MiB block whose 0.5 MiB rest is not split off: the whole block is handed out
    size = 3 * MIB // 2
    result = run([("+", i, size) for i in range(13)])
    assert result.reserved_peak_bytes == 20 * MIB
    assert result.requested_peak_bytes == 13 * size
    assert result.allocated_peak_bytes == 12 * size + 2 * MIB
    assert run([("+", i, size) for i in range(14)]).reserved_peak_bytes == 40 * MIB


def test_large_requests_round_to_2mib_and_keep_small_remainders():
    # >= 10 MiB: a segment of the request rounded up to 2 MiB (11 MiB -> 12 MiB); the 1 MiB rest is not > 1 MiB, so
    # the block is not split and allocated bytes count all 12 MiB
    result = run([("+", "a", 11 * MIB)])
    assert (result.requested_peak_bytes, result.allocated_peak_bytes, result.reserved_peak_bytes) == (
        11 * MIB, 12 * MIB, 12 * MIB)


def test_best_fit_reuse_split_and_merge():
    # a freed 100 MiB segment serves 60 MiB (split: 40 MiB rest); the next 60 MiB does not fit the rest: a new
    # segment. Freed, the two halves merge and the whole 100 MiB serves a 100 MiB request without a new segment.
    result = run([("+", "a", 100 * MIB), ("-", "a"), ("+", "b", 60 * MIB), ("+", "c", 60 * MIB), ("-", "b"),
                  ("-", "c"), ("+", "d", 100 * MIB)])
    assert result.reserved_peak_bytes == 160 * MIB
    assert result.allocated_peak_bytes == 120 * MIB
    assert result.reserved_at_allocated_peak_bytes == 160 * MIB
    # best fit: of cached 30 and 50 MiB segments a 25 MiB request takes the 30 MiB one (split, 5 MiB rest), so the
    # 45 MiB request that follows still fits the 50 MiB one
    result = run([("+", "a", 30 * MIB), ("+", "b", 50 * MIB), ("-", "a"), ("-", "b"), ("+", "c", 25 * MIB),
                  ("+", "d", 45 * MIB)])
    assert result.reserved_peak_bytes == 80 * MIB


def test_full_device_frees_cached_segments_and_retries():
    # cudaMalloc fails past the capacity: release_cached_blocks frees the unsplit cached 100 MiB segment, the retry
    # reserves 120 MiB (num_alloc_retries 1); with the 100 MiB still in use the retry fails too (num_ooms 1)
    result = run([("+", "a", 100 * MIB), ("-", "a"), ("+", "b", 120 * MIB)], capacity=150 * MIB)
    assert (result.reserved_peak_bytes, result.num_alloc_retries, result.num_ooms) == (120 * MIB, 1, 0)
    result = run([("+", "a", 100 * MIB), ("+", "b", 60 * MIB)], capacity=150 * MIB)
    assert (result.num_alloc_retries, result.num_ooms) == (1, 1)
    assert "out of memory" in result.notes[0]


def test_max_split_size():
    # a request below max_split_size never takes an oversize cached block: 100 MiB opens its own segment
    sequence = [("+", "a", 300 * MIB), ("-", "a"), ("+", "b", 100 * MIB)]
    assert run(sequence).reserved_peak_bytes == 300 * MIB
    assert run(sequence, "max_split_size_mb:200").reserved_peak_bytes == 400 * MIB
    # a request above it takes an oversize block less than max_non_split_rounding (20 MiB) larger, unsplit
    result = run([("+", "a", 300 * MIB), ("-", "a"), ("+", "b", 290 * MIB)], "max_split_size_mb:200")
    assert (result.reserved_peak_bytes, result.allocated_peak_bytes) == (300 * MIB, 300 * MIB)
    result = run([("+", "a", 300 * MIB), ("-", "a"), ("+", "b", 250 * MIB)], "max_split_size_mb:200")
    assert result.reserved_peak_bytes == 550 * MIB
    result = run([("+", "a", 300 * MIB), ("-", "a"), ("+", "b", 250 * MIB)],
                 "max_split_size_mb:200,max_non_split_rounding_mb:64")
    assert result.reserved_peak_bytes == 300 * MIB
    # on a full device release_available_cached_blocks frees the cached oversize segment before any retry
    result = run([("+", "a", 300 * MIB), ("-", "a"), ("+", "b", 100 * MIB)], "max_split_size_mb:200",
                 capacity=350 * MIB)
    assert (result.reserved_peak_bytes, result.num_alloc_retries, result.num_ooms) == (300 * MIB, 0, 0)


def test_roundup_power2_divisions():
    # roundup_power2_next_division: 5 MiB + 1 B in 4 divisions of [4, 8) MiB rounds to 6 MiB (a 20 MiB segment)
    allocator = CachingAllocator(parse_alloc_conf("roundup_power2_divisions:4"))
    assert allocator.malloc(5 * MIB + 1).size == 6 * MIB
    assert CachingAllocator().malloc(5 * MIB + 1).size == 5 * MIB + 512
    # a power of 2 stays; the list form sets divisions per interval (sizes in MiB): [256:1,512:2,>:8]
    table = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,>:8]").roundup_power2_divisions
    assert table == (1,) * 9 + (2,) + (8,) * 6
    allocator = CachingAllocator(parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,>:8]"))
    assert allocator.malloc(300 * MIB + 1).size == 300 * MIB + 512  # 1 division: 512 B rounding
    assert allocator.malloc(600 * MIB).size == 768 * MIB  # [512, 1024) in 2
    assert allocator.malloc(1100 * MIB).size == 1152 * MIB  # [1024, 2048) in 8
    assert allocator.malloc(1024 * MIB).size == 1024 * MIB


def test_expandable_segments_map_pages():
    # one large segment grows in 20 MiB pages: 30 MiB maps 40 MiB; 15 MiB more uses the 10 MiB free tail and maps
    # one more page (60 MiB); without expandable segments the two are segments of 30 and 16 MiB
    sequence = [("+", "a", 30 * MIB), ("+", "b", 15 * MIB)]
    assert run(sequence, "expandable_segments:True").reserved_peak_bytes == 60 * MIB
    assert run(sequence).reserved_peak_bytes == 46 * MIB
    # a freed range in the middle serves a smaller request (blocks split whenever 512 B remain)
    result = run([("+", "a", 40 * MIB), ("+", "b", 40 * MIB), ("-", "a"), ("+", "c", 39 * MIB)],
                 "expandable_segments:True")
    assert (result.reserved_peak_bytes, result.allocated_peak_bytes, result.requested_peak_bytes) == (
        80 * MIB, 80 * MIB, 80 * MIB)
    # small requests grow a small segment in 2 MiB pages
    assert run([("+", i, MIB) for i in range(3)], "expandable_segments:True").reserved_peak_bytes == 4 * MIB
    # on a full device the retry unmaps free whole pages: 40 MiB freed at the start cannot hold 60 MiB, the
    # retry unmaps them and maps the request at the lowest address that fits
    result = run([("+", "a", 40 * MIB), ("+", "b", 40 * MIB), ("-", "a"), ("+", "c", 60 * MIB)],
                 "expandable_segments:True", capacity=100 * MIB)
    assert (result.num_alloc_retries, result.num_ooms, result.reserved_peak_bytes) == (1, 0, 100 * MIB)


def test_replay_skips_zero_byte_requests_and_reused_keys():
    events = [(ALLOC, 1, 0), (ALLOC, 2, 4096), (FREE, 2, 0), (ALLOC, 2, 4096), (FREE, 1, 0)]
    result = replay(events)
    assert (result.requested_peak_bytes, result.reserved_peak_bytes) == (4096, 2 * MIB)


@pytest.mark.parametrize(("text", "message"), [
    ("max_split_size_mb:10", "at least 20"),
    ("max_split_size_mb:big", "whole number"),
    ("roundup_power2_divisions:3", "power of 2"),
    ("roundup_power2_divisions:[300:2]", "power of 2"),
    ("expandable_segments:yes", "True or False"),
    ("garbage_collection_threshold:1.5", "between 0 and 1"),
    ("backend:cudaMallocAsync", "not the caching allocator"),
    ("expandable_segment:True", "unknown option"),
    ("max_split_size_mb", "key:value"),
])
def test_bad_alloc_conf(text, message):
    with pytest.raises(AllocConfError, match=message):
        parse_alloc_conf(text)


def test_alloc_conf_defaults_and_no_effect_keys():
    config = parse_alloc_conf("pinned_use_cuda_host_register:True,backend:native")
    assert (config.max_split_size, config.expandable_segments) == (None, False)
    result = run([("+", "a", MIB)], "garbage_collection_threshold:0.6")
    assert "per-process memory fraction" in result.notes[0]


@pytest.mark.parametrize(("capability", "workspace_config", "expected"), [
    ("9.0", None, 32 * MIB),  # Hopper: 4096 KiB x 8
    ("10.0", None, 32 * MIB),  # Blackwell
    ("12.0", None, 32 * MIB),
    ("8.0", None, 4096 * 1024 * 2 + 16 * 1024 * 8),  # ":4096:2:16:8"
    ("7.5", None, 4096 * 1024 * 2 + 16 * 1024 * 8),
    ("gfx942", None, 128 * MIB),  # ROCm MI300
    (None, None, None),  # the card is not known
    ("8.0", ":4096:8", 32 * MIB),  # CUBLAS_WORKSPACE_CONFIG: KiB x count, summed
    (None, ":16:8", 128 * 1024),
])
def test_cublas_workspace_size(capability, workspace_config, expected):
    """aten/src/ATen/cuda/CublasHandlePool.cpp parseChosenWorkspaceSize."""
    from memcalc.allocator import cublas_workspace_bytes

    assert cublas_workspace_bytes(capability, workspace_config) == expected


def test_persistent_allocations_come_first_and_stay():
    # two 32 MiB workspaces (own segments, >= 10 MiB) before a 100 MiB tensor allocated and freed
    result = replay([(ALLOC, 1, 100 * MIB), (FREE, 1, 0)], persistent=[32 * MIB, 32 * MIB])
    assert (result.requested_peak_bytes, result.reserved_peak_bytes) == (164 * MIB, 164 * MIB)


def test_of_two_cached_blocks_of_one_size_the_newer_segments_is_taken():
    # get_free_block breaks a best-fit tie by address (BlockComparatorSize), and cudaMalloc puts each new segment
    # below the earlier ones (an H200's snapshots, benchmarks/segment_order.py). a opens a 4 GiB segment S1, b an
    # 8 GiB S2 below it; b freed, c (4 GiB) splits S2, whose free 4 GiB rest lies below S1; a freed: two free 4 GiB
    # blocks, and d takes S2's rest (the lower address), filling S2. c freed leaves S2 a free 4 GiB head beside d, so
    # e (8 GiB) finds no 8 GiB block: a third segment, 4 + 8 + 8 = 20 GiB. Had d taken S1 (segments placed upward),
    # S2 would have merged whole when c was freed and served e: 12 GiB.
    gib = 1024 * MIB
    sequence = [("+", "a", 4 * gib), ("+", "b", 8 * gib), ("-", "b"), ("+", "c", 4 * gib), ("-", "a"),
                ("+", "d", 4 * gib), ("-", "c"), ("+", "e", 8 * gib)]
    assert run(sequence).reserved_peak_bytes == 20 * gib
    assert run(sequence, segments_below=False).reserved_peak_bytes == 12 * gib
