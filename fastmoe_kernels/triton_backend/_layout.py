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


def _index_tensors(device, offsets, *int32_lists) -> Tuple[torch.Tensor, ...]:
    """The small per-expert index tensors a kernel loads: offsets in int64, counts in int32."""
    return (torch.tensor(offsets, dtype=torch.int64, device=device),
            *(torch.tensor(v, dtype=torch.int32, device=device) for v in int32_lists))


@dataclass(frozen=True)
class Stack:
    """Where homogeneous experts' matrices sit in a stacked weight ``w [experts, rows, cols]`` with unit
    column stride: expert e's matrix is rows ``row_start : row_start + n`` of ``w[e]``. What a kernel
    needs to describe the whole weight as one 3-D TMA tensor (``_tma.py``)."""
    experts: int
    rows: int
    cols: int
    stride_e: int
    stride_r: int
    row_start: int


@dataclass(frozen=True)  # shared by every launch with the same layout (cached below)
class ExpertMatrices:
    offset: torch.Tensor  # [E] int64 element offset of expert e's matrix
    rows: torch.Tensor    # [E] int32
    cols: torch.Tensor    # [E] int32
    stride_r: int
    stride_c: int
    max_rows: int
    max_cols: int
    align: Tuple[int, int, int]  # alignment() of the offsets, of the row counts, of the column counts
    stack: Optional[Stack] = None  # set for contiguous rows of a stacked weight (stacked(), row_step 1)

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


# Every launch describes its operands; a description depends only on its key (shape, strides, widths)
# and device, so it is built once: the per-expert Python lists (E of them, 256 at DeepSeek-V3) and the
# alignment hints are computed only on a miss, never per call.
_LAYOUT_CACHE: Dict[tuple, object] = {}


def _cached(key: tuple, device, build):
    full_key = key + (str(device),)
    layout = _LAYOUT_CACHE.get(full_key)
    if layout is None:
        layout = _LAYOUT_CACHE[full_key] = build()
    return layout


def _matrices(offsets, rows, cols, device, *strides_and_max, stack: Optional[Stack] = None) -> ExpertMatrices:
    return ExpertMatrices(*_index_tensors(device, offsets, rows, cols), *strides_and_max,
                          (alignment(offsets), alignment(rows), alignment(cols)), stack)


def stacked(w: torch.Tensor, row_start: int = 0, num_rows: Optional[int] = None, row_step: int = 1) -> ExpertMatrices:
    """Experts stacked on dim 0 of ``w [E, R, C]``; optionally rows ``row_start, row_start + row_step, …``
    (``num_rows`` of them): ``row_step`` 2 reads one half of interleaved gate/up rows in place."""
    E, R, C = w.shape
    s0, s1, s2 = w.stride()
    n = (R - row_start) // row_step if num_rows is None else num_rows
    key = ("stacked", E, R, s0, s1, s2, row_start, n, C, row_step)
    stack = Stack(E, R, C, s0, s1, row_start) if row_step == 1 and s2 == 1 else None
    return _cached(key, w.device, lambda: _matrices(
        [e * s0 + row_start * s1 for e in range(E)], [n] * E, [C] * E, w.device, s1 * row_step, s2, n, C, stack=stack))


def packed_rows(w: torch.Tensor, widths: Sequence[int], row_base: int = 0) -> ExpertMatrices:
    """Expert e owns rows ``row_base + start_e : … + widths[e]`` of ``w [·, C]``."""
    C = w.shape[1]
    s0, s1 = w.stride()
    key = ("rows", tuple(widths), s0, s1, row_base, C)

    def build():
        starts = list(itertools.accumulate([0, *widths]))[:-1]
        return _matrices([(row_base + s) * s0 for s in starts], list(widths), [C] * len(widths), w.device,
                         s0, s1, max(widths), C)

    return _cached(key, w.device, build)


def packed_cols(w: torch.Tensor, widths: Sequence[int]) -> ExpertMatrices:
    """Expert e owns columns ``start_e : start_e + widths[e]`` of ``w [R, ·]``."""
    R = w.shape[0]
    s0, s1 = w.stride()
    key = ("cols", tuple(widths), s0, s1, R)

    def build():
        starts = list(itertools.accumulate([0, *widths]))[:-1]
        return _matrices([s * s1 for s in starts], [R] * len(widths), list(widths), w.device,
                         s0, s1, R, max(widths))

    return _cached(key, w.device, build)


@dataclass(frozen=True)
class ExpertVectors:
    offset: torch.Tensor  # [E] int64
    stride: int


def stacked_vectors(bias: torch.Tensor, start: int = 0, step: int = 1) -> ExpertVectors:
    """``bias [E, N]``: expert e's vector starts at row e, column ``start``, every ``step`` columns."""
    E = bias.shape[0]
    s0, s1 = bias.stride()
    key = ("vstack", E, s0, s1, start, step)

    def build():
        return ExpertVectors(_index_tensors(bias.device, [e * s0 + start * s1 for e in range(E)])[0], s1 * step)

    return _cached(key, bias.device, build)


def packed_vectors(bias: torch.Tensor, widths: Sequence[int], base: int = 0) -> ExpertVectors:
    """``bias [Σ]``: expert e's vector starts at ``base + start_e``."""
    s0 = bias.stride(0)
    key = ("vpack", tuple(widths), s0, base)

    def build():
        starts = list(itertools.accumulate([0, *widths]))[:-1]
        return ExpertVectors(_index_tensors(bias.device, [(base + s) * s0 for s in starts])[0], s0)

    return _cached(key, bias.device, build)
