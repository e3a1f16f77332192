"""How ``ddpo bench`` measures: peak memory (:class:`PeakMemory`), device synchronisation before a clock is read
(:func:`sync`), median wall time (:func:`median_seconds`) and the device's measured matmul rate (:func:`matmul_tflops`,
the MFU's denominator)."""

from __future__ import annotations

import math
import os
import statistics
import threading
import time

import torch


class PeakMemory:
    """Peak memory while the context is open: ``torch.cuda.max_memory_allocated`` on a GPU, else the process RSS
    sampled every ``interval`` seconds by a thread (MiB in :attr:`peak_mib`)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak_mib = device, interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the lifetime maximum is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self.rss_mib())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()  # so that memory a previous run freed does not count as this run's RSS
            self.peak_mib = self.rss_mib()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self.rss_mib())


def _release_freed_memory() -> None:
    """Give memory that the allocator keeps after ``free`` back to the OS (glibc ``malloc_trim``; else nothing)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's), so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()`` after one unmeasured warm-up call (for the benchmark
    scripts' tables)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """The measured dense matmul rate of ``device`` in ``dtype`` (TFLOP/s): the best of ``repeats`` square products
    of side ``size`` (8192 on a GPU, 1024 on a CPU) after a warm-up. The MFU's denominator."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12
