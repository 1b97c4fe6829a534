"""The benchmark harness behind ``benchmarks/`` and the ``fastmoe-bench`` command.

- ``env``: device and versions recorded with every result;
- ``timing``: warm-up, synchronised or CUDA-event timing, medians, peak memory;
- ``cases``: one MoE configuration to measure, with its FLOP / byte / parameter accounting;
- ``grids``: the sweeps (experts, top-k, expert size and granularity, tokens, d_model, dtype,
  capacity, shared experts), in smoke / quick (CPU, minutes) / full (GPU) sizes;
- ``targets``: what is timed for a case — the layer on every backend, each op, the experts against
  the baselines, and a dense GEMM of the same FLOPs (the roofline);
- ``baselines``: per-expert Python loop, ``torch._grouped_mm``, Hugging Face experts;
- ``runner``: a grid → tidy rows (CSV / JSON); ``report``: plots, Markdown, headline table.
"""
from .cases import BenchCase
from .runner import ResultRow, run_grid

__all__ = ["BenchCase", "ResultRow", "run_grid"]
