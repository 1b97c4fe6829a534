"""Timing that does not flatter: warm-up first, device synchronisation (CUDA events on GPUs), the
median of several runs, and callables that rotate through several input sets so repeated runs do
not find their inputs in cache."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_values: List[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))]


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 10,
            max_seconds: Optional[float] = None) -> Timing:
    """Median time of ``fn()`` in milliseconds. ``max_seconds`` caps the number of reps for slow cases."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: List[float] = []
    started = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and time.perf_counter() - started > max_seconds and len(samples) >= 3:
            break
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory allocated by one call beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


class Rotation:
    """Cycles through pre-built input sets: call ``next()`` for the inputs of the next run."""

    def __init__(self, make: Callable[[int], object], count: int):
        self.items = [make(i) for i in range(max(1, count))]
        self.i = 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """Input sets to rotate through: enough to exceed twice the L2 cache on a GPU, at most 8."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return int(min(8, max(2, -(-2 * l2 // max(bytes_per_set, 1)))))
