"""How busy the machine is, and how many CPU threads a benchmark may use without being slowed by it.

Why this exists: torch's CPU kernels run OpenMP parallel regions whose threads wait for each other
at every barrier. When another process holds a core, one of our threads is descheduled and every
barrier waits for the scheduler to give it a time slice back. Measured on the 2-core dev machine
(base case, torch layer forward+backward): 28 ms with 2 threads idle, 1,937 ms (p20–p80
1,907–1,977) with 2 threads next to a 2-thread torch job, 64 ms with 1 thread next to the same job.
A thread count no larger than the cores nobody else uses cannot be multiplied that way; the
monitor below measures the other processes' load during every timed target so that a job starting
mid-run is seen, reported, and answered by fewer threads.

Linux only (/proc/stat); elsewhere the load is unknown and the benchmark takes one thread.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import List, Optional

import torch


@functools.lru_cache(maxsize=None)
def _cgroup_cpu_limit() -> Optional[int]:
    """Cores a container's CPU quota allows (cgroup v2 ``cpu.max``), or None when unlimited/unknown."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(math.ceil(int(quota) / int(period))))


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, within a container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def _our_cpus() -> Optional[List[int]]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU seconds of the cores we may use, our own CPU seconds, and the wall clock."""

    busy_s: float
    own_s: float
    wall_s: float


# The shortest window a load reading is taken over: with 10 ms ticks on each core, rounding alone
# adds up to 2 ticks per core, 0.16 cores on 2 cores over 0.25 s.
MIN_WINDOW_S = 0.25
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def snapshot() -> Optional[CpuSnapshot]:
    """The current CPU counters, or None where /proc/stat is unavailable."""
    cpus = _our_cpus()
    try:
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    busy = 0
    wanted = {f"cpu{i}" for i in cpus} if cpus is not None else None
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        if wanted is not None and fields[0] not in wanted:
            continue
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        busy += sum(ticks) - ticks[3] - ticks[4]
    return CpuSnapshot(busy / _TICKS, time.process_time(), time.perf_counter())


def others_busy_cores(start: Optional[CpuSnapshot], end: Optional[CpuSnapshot]) -> Optional[float]:
    """Cores kept busy by other processes between two snapshots (our own CPU time subtracted)."""
    if start is None or end is None:
        return None
    wall = end.wall_s - start.wall_s
    if wall < MIN_WINDOW_S:  # /proc/stat counts in 10 ms ticks per core: shorter windows are noise
        return None
    others = (end.busy_s - start.busy_s) - (end.own_s - start.own_s)
    return max(0.0, others / wall)


def sample_others(window_s: float = 0.5) -> Optional[float]:
    """Other processes' busy cores over ``window_s`` seconds while this process sleeps."""
    start = snapshot()
    time.sleep(window_s)
    return others_busy_cores(start, snapshot())


def free_cores(others: Optional[float]) -> int:
    """Cores left for us, rounding a partly busy core to busy (a thread there would wait for it)."""
    if others is None:
        return 1
    return max(1, usable_cores() - int(math.ceil(others - 0.2)))


def choose_threads(requested: str, device: torch.device, others: Optional[float]) -> int:
    """CPU threads for the run: a number, or "auto" — one per free core on a CPU run (one where the
    load is unknown), torch's own count on a GPU run (the host only launches kernels there)."""
    if requested != "auto":
        try:
            n = int(requested)
        except ValueError:
            raise ValueError(f"threads must be 'auto' or a positive integer, got {requested!r}") from None
        if n < 1:
            raise ValueError(f"threads must be 'auto' or a positive integer, got {requested!r}")
        return n
    if device.type == "cuda":
        return torch.get_num_threads()
    return free_cores(others)


def oversubscribed(others: Optional[float], threads: int) -> bool:
    """Whether our threads and the other processes' load need more cores than we may use."""
    return others is not None and others + threads > usable_cores() + 0.5
