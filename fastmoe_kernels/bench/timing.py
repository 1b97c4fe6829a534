"""Timing that is honest about noise: warm-up first, device synchronisation (CUDA events on GPUs),
runs repeated until the median's confidence interval is narrow enough or a time cap is reached, and
callables that rotate through several input sets so repeated runs do not find their inputs in cache.

A timing reports its median, its spread (p20–p80) and a distribution-free 95% confidence interval
of the median (order statistics: no assumption that run times are normal — they are not; they have
a floor and a long tail).
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    ci_low_ms: float = math.nan
    ci_high_ms: float = math.nan
    converged: bool = False  # the confidence interval reached its target before the time cap
    samples: List[float] = field(default_factory=list, repr=False)

    @property
    def ci_rel(self) -> float:
        """Half-width of the median's 95% confidence interval, as a fraction of the median."""
        if not self.median_ms > 0 or math.isnan(self.ci_low_ms):
            return math.inf
        return (self.ci_high_ms - self.ci_low_ms) / 2 / self.median_ms

    @property
    def spread(self) -> float:
        """p80 / p20: 1 for a perfectly steady measurement."""
        return self.p80_ms / self.p20_ms if self.p20_ms > 0 else math.inf


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))]


@functools.lru_cache(maxsize=None)
def _median_rank(n: int) -> int:
    """The largest r with P(Binomial(n, ½) ≤ r − 1) ≤ 2.5%: [x₍ᵣ₎, x₍ₙ₋ᵣ₊₁₎] (1-based order statistics)
    then covers the median with probability ≥ 95% (exact; at least 1: the whole range)."""
    cdf, r = 0.0, 1
    for i in range(n):
        cdf += math.comb(n, i) / 2.0 ** n
        if cdf > 0.025:
            break
        r = i + 1
    return min(r, (n + 1) // 2)


def median_ci(sorted_values: Sequence[float]) -> Tuple[float, float]:
    """95% confidence interval of the median from order statistics, with exact binomial ranks (no
    assumption about the shape of the run times: they have a floor and a long tail). With fewer than
    6 samples it is the whole range (which covers less than 95%: 94% at 5, 75% at 3), with fewer than
    3 none. Stopping as soon as it is narrow enough lowers its coverage somewhat; the report's flags
    use it only against a 10% margin."""
    n = len(sorted_values)
    if n < 3:  # one or two runs bound nothing: no interval is claimed
        return math.nan, math.nan
    r = _median_rank(n)
    return sorted_values[r - 1], sorted_values[n - r]


def summarize(samples_ms: Sequence[float], target_rel_ci: Optional[float] = None) -> Timing:
    s = sorted(samples_ms)
    lo, hi = median_ci(s)
    t = Timing(statistics.median(s), quantile(s, 0.2), quantile(s, 0.8), len(s), lo, hi, samples=list(samples_ms))
    t.converged = target_rel_ci is not None and len(s) >= 3 and t.ci_rel <= target_rel_ci  # one run proves nothing
    return t


def _one_sample_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, min_reps: int = 5,
            max_reps: int = 200, target_rel_ci: float = 0.05, max_seconds: Optional[float] = None) -> Timing:
    """Time ``fn()`` in milliseconds: ``warmup`` runs, then at least ``min_reps`` timed runs, more until
    the median's 95% confidence interval is within ``target_rel_ci`` of it, ``max_reps`` runs, or
    ``max_seconds`` of timed runs. A case slower than the cap still gets three runs (one when even
    the warm-up took longer than the whole cap); ``converged`` tells which way it stopped."""
    warm_started = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    warm_each = (time.perf_counter() - warm_started) / max(warmup, 1)
    floor = 1 if max_seconds is not None and warmup and warm_each > max_seconds else min(3, min_reps)
    samples: List[float] = []
    started = time.perf_counter()
    while len(samples) < max_reps:
        samples.append(_one_sample_ms(fn, device))
        n = len(samples)
        if n >= min_reps and summarize(samples).ci_rel <= target_rel_ci:
            break
        if max_seconds is not None and n >= floor and time.perf_counter() - started > max_seconds:
            break
    return summarize(samples, target_rel_ci)


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
