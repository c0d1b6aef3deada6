"""torch.cuda's memory statistics faked on a CPU machine, for the CUDA measurement's bookkeeping
(tests/test_verify_cuda.py) and the GPU validation script (tests/test_gpu_validation.py)."""

from __future__ import annotations

GIB = 2**30


class FakeCuda:
    """torch.cuda's memory statistics, scripted: each reset of the peak statistics starts a new, higher peak."""

    def __init__(self) -> None:
        self.resets = 0
        self.calls: list[str] = []
        self.gc_during: list[bool] = []

    def is_available(self) -> bool:
        return True

    def synchronize(self, device=None) -> None:
        self.calls.append("synchronize")

    def reset_peak_memory_stats(self, device=None) -> None:
        self.resets += 1
        self.calls.append("reset")

    def max_memory_allocated(self, device=None) -> int:
        return 1000 * self.resets

    def memory_allocated(self, device=None) -> int:
        return 100 * self.resets

    def max_memory_reserved(self, device=None) -> int:
        return 2000 * self.resets

    def memory_reserved(self, device=None) -> int:
        return 3 * GIB

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return 76 * GIB, 80 * GIB  # 4 GiB used: 3 GiB reserved + 1 GiB context

    def get_device_name(self, device=None) -> str:
        return "Fake GPU"

    def memory_stats(self, device=None) -> dict[str, int]:
        import gc

        self.gc_during.append(gc.isenabled())
        return {"requested_bytes.all.peak": 900 * self.resets, "active_bytes.all.peak": 950 * self.resets,
                "allocated_bytes.all.peak": 1000 * self.resets, "reserved_bytes.all.peak": 2000 * self.resets,
                "num_alloc_retries": 1, "num_ooms": 0}


def patch_cuda(monkeypatch) -> FakeCuda:
    """torch.cuda's statistics replaced by a FakeCuda for the test (the ``fake_cuda`` fixture, tests/conftest.py)."""
    import torch

    fake = FakeCuda()
    for name in ("is_available", "synchronize", "reset_peak_memory_stats", "max_memory_allocated",
                 "memory_allocated", "max_memory_reserved", "memory_reserved", "mem_get_info", "get_device_name",
                 "memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake
