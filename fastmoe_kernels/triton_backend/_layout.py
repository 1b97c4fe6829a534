"""Where each expert's matrix and bias vector live inside a weight tensor (host side).

Every weight layout the package uses — homogeneous ``[E, rows, cols]``, packed heterogeneous
``[Σ, cols]`` or ``[rows, Σ]``, a half of a gated ``[gate | up]`` weight — is described by one
:class:`ExpertMatrices`: per-expert element offset, row count and column count, and two strides.
A kernel then reads expert e's B operand either as the matrix itself or as its transpose.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def alignment(values: Sequence[int]) -> int:
    """The largest power of two up to 16 dividing every value (16 for none or all zero).

    Kernels load per-expert offsets and sizes from memory, so the compiler cannot see that they
    are multiples of 8 or 16; without that it cannot vectorise the operand loads along K, and
    without vector loads Triton's pipeliner cannot turn them into asynchronous copies (the GEMM
    then runs unpipelined). The host knows the values: it passes this as a hint (tl.multiple_of).
    """
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    return 16 if g == 0 else min(16, g & -g)


def _device_arrays(key: tuple, offsets, rows, cols, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Layouts are static per module: build the small index tensors once per device.
    full_key = key + (str(device),)
    if full_key not in _CACHE:
        _CACHE[full_key] = (
            torch.tensor(offsets, dtype=torch.int64, device=device),
            torch.tensor(rows, dtype=torch.int32, device=device),
            torch.tensor(cols, dtype=torch.int32, device=device),
        )
    return _CACHE[full_key]


@dataclass
class ExpertMatrices:
    offset: torch.Tensor  # [E] int64 element offset of expert e's matrix
    rows: torch.Tensor    # [E] int32
    cols: torch.Tensor    # [E] int32
    stride_r: int
    stride_c: int
    max_rows: int
    max_cols: int
    align: Tuple[int, int, int]  # alignment() of the offsets, of the row counts, of the column counts

    @property
    def offsets_64(self) -> bool:
        """Whether an element offset inside one expert's matrix can pass 2³¹: then the kernels compute
        it in int64 (in int32 it would wrap — packed weights have a row stride of Σ widths)."""
        span = max(self.max_rows - 1, 0) * abs(self.stride_r) + max(self.max_cols - 1, 0) * abs(self.stride_c)
        return span >= 2**31

    def as_b(self, transpose: bool):
        """(offset, k_size, n_size, stride_k, stride_n, K_MAX, N_MAX) for ``B_e = M_e`` or ``M_eᵀ``."""
        if transpose:
            return self.offset, self.cols, self.rows, self.stride_c, self.stride_r, self.max_cols, self.max_rows
        return self.offset, self.rows, self.cols, self.stride_r, self.stride_c, self.max_rows, self.max_cols

    def b_align(self, transpose: bool) -> Tuple[int, int, int]:
        """Alignment hints (offset, k_size, n_size) matching :meth:`as_b`."""
        off, rows, cols = self.align
        return (off, cols, rows) if transpose else (off, rows, cols)


_ALIGN_CACHE: Dict[tuple, Tuple[int, int, int]] = {}


def _matrices(key, offsets, rows, cols, device, *strides_and_max) -> ExpertMatrices:
    off, r, c = _device_arrays(key, offsets, rows, cols, device)
    # Cached with the index tensors: every launch builds its layout, the hints need computing once.
    if key not in _ALIGN_CACHE:
        _ALIGN_CACHE[key] = (alignment(offsets), alignment(rows), alignment(cols))
    return ExpertMatrices(off, r, c, *strides_and_max, _ALIGN_CACHE[key])


def stacked(w: torch.Tensor, row_start: int = 0, num_rows: Optional[int] = None, row_step: int = 1) -> ExpertMatrices:
    """Experts stacked on dim 0 of ``w [E, R, C]``; optionally rows ``row_start, row_start + row_step, …``
    (``num_rows`` of them): ``row_step`` 2 reads one half of interleaved gate/up rows in place."""
    E, R, C = w.shape
    n = (R - row_start) // row_step if num_rows is None else num_rows
    key = ("stacked", E, w.stride(0), w.stride(1), w.stride(2), row_start, n, C, row_step)
    offsets = [e * w.stride(0) + row_start * w.stride(1) for e in range(E)]
    return _matrices(key, offsets, [n] * E, [C] * E, w.device, w.stride(1) * row_step, w.stride(2), n, C)


def packed_rows(w: torch.Tensor, widths: Sequence[int], row_base: int = 0) -> ExpertMatrices:
    """Expert e owns rows ``row_base + start_e : … + widths[e]`` of ``w [·, C]``."""
    starts = list(itertools.accumulate([0, *widths]))[:-1]
    C = w.shape[1]
    key = ("rows", tuple(widths), w.stride(0), row_base, C)
    offsets = [(row_base + s) * w.stride(0) for s in starts]
    return _matrices(key, offsets, list(widths), [C] * len(widths), w.device, w.stride(0), w.stride(1), max(widths), C)


def packed_cols(w: torch.Tensor, widths: Sequence[int]) -> ExpertMatrices:
    """Expert e owns columns ``start_e : start_e + widths[e]`` of ``w [R, ·]``."""
    starts = list(itertools.accumulate([0, *widths]))[:-1]
    R = w.shape[0]
    key = ("cols", tuple(widths), w.stride(1), R)
    offsets = [s * w.stride(1) for s in starts]
    return _matrices(key, offsets, [R] * len(widths), list(widths), w.device, w.stride(0), w.stride(1), R, max(widths))


@dataclass
class ExpertVectors:
    offset: torch.Tensor  # [E] int64
    stride: int


def stacked_vectors(bias: torch.Tensor, start: int = 0, step: int = 1) -> ExpertVectors:
    """``bias [E, N]``: expert e's vector starts at row e, column ``start``, every ``step`` columns."""
    E = bias.shape[0]
    key = ("vstack", E, bias.stride(0), bias.stride(1), start)
    off, _, _ = _device_arrays(key, [e * bias.stride(0) + start * bias.stride(1) for e in range(E)], [0] * E, [0] * E, bias.device)
    return ExpertVectors(off, bias.stride(1) * step)


def packed_vectors(bias: torch.Tensor, widths: Sequence[int], base: int = 0) -> ExpertVectors:
    """``bias [Σ]``: expert e's vector starts at ``base + start_e``."""
    starts = list(itertools.accumulate([0, *widths]))[:-1]
    key = ("vpack", tuple(widths), bias.stride(0), base)
    off, _, _ = _device_arrays(key, [(base + s) * bias.stride(0) for s in starts], [0] * len(widths), [0] * len(widths), bias.device)
    return ExpertVectors(off, bias.stride(0))
