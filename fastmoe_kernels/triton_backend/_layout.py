"""Where each expert's matrix and bias vector live inside a weight tensor (host side).

Every weight layout the package uses — homogeneous ``[E, rows, cols]``, packed heterogeneous
``[Σ, cols]`` or ``[rows, Σ]``, a half of a gated ``[gate | up]`` weight — is described by one
:class:`ExpertMatrices`: per-expert element offset, row count and column count, and two strides.
A kernel then reads expert e's B operand either as the matrix itself or as its transpose.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


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

    def as_b(self, transpose: bool):
        """(offset, k_size, n_size, stride_k, stride_n, K_MAX, N_MAX) for ``B_e = M_e`` or ``M_eᵀ``."""
        if transpose:
            return self.offset, self.cols, self.rows, self.stride_c, self.stride_r, self.max_cols, self.max_rows
        return self.offset, self.rows, self.cols, self.stride_r, self.stride_c, self.max_rows, self.max_cols


def stacked(w: torch.Tensor, row_start: int = 0, num_rows: Optional[int] = None) -> ExpertMatrices:
    """Experts stacked on dim 0 of ``w [E, R, C]``; optionally rows ``row_start:row_start+num_rows``."""
    E, R, C = w.shape
    n = R - row_start if num_rows is None else num_rows
    key = ("stacked", E, w.stride(0), w.stride(1), row_start, n, C)
    off, rows, cols = _device_arrays(
        key, [e * w.stride(0) + row_start * w.stride(1) for e in range(E)], [n] * E, [C] * E, w.device
    )
    return ExpertMatrices(off, rows, cols, w.stride(1), w.stride(2), n, C)


def packed_rows(w: torch.Tensor, widths: Sequence[int], row_base: int = 0) -> ExpertMatrices:
    """Expert e owns rows ``row_base + start_e : … + widths[e]`` of ``w [·, C]``."""
    starts = list(itertools.accumulate([0, *widths]))[:-1]
    C = w.shape[1]
    key = ("rows", tuple(widths), w.stride(0), row_base, C)
    off, rows, cols = _device_arrays(
        key, [(row_base + s) * w.stride(0) for s in starts], list(widths), [C] * len(widths), w.device
    )
    return ExpertMatrices(off, rows, cols, w.stride(0), w.stride(1), max(widths), C)


def packed_cols(w: torch.Tensor, widths: Sequence[int]) -> ExpertMatrices:
    """Expert e owns columns ``start_e : start_e + widths[e]`` of ``w [R, ·]``."""
    starts = list(itertools.accumulate([0, *widths]))[:-1]
    R = w.shape[0]
    key = ("cols", tuple(widths), w.stride(1), R)
    off, rows, cols = _device_arrays(
        key, [s * w.stride(1) for s in starts], [R] * len(widths), list(widths), w.device
    )
    return ExpertMatrices(off, rows, cols, w.stride(0), w.stride(1), R, max(widths))


@dataclass
class ExpertVectors:
    offset: torch.Tensor  # [E] int64
    stride: int


def stacked_vectors(bias: torch.Tensor, start: int = 0) -> ExpertVectors:
    """``bias [E, N]``: expert e's vector starts at row e, column ``start``."""
    E = bias.shape[0]
    key = ("vstack", E, bias.stride(0), start)
    off, _, _ = _device_arrays(key, [e * bias.stride(0) + start * bias.stride(1) for e in range(E)], [0] * E, [0] * E, bias.device)
    return ExpertVectors(off, bias.stride(1))


def packed_vectors(bias: torch.Tensor, widths: Sequence[int], base: int = 0) -> ExpertVectors:
    """``bias [Σ]``: expert e's vector starts at ``base + start_e``."""
    starts = list(itertools.accumulate([0, *widths]))[:-1]
    key = ("vpack", tuple(widths), bias.stride(0), base)
    off, _, _ = _device_arrays(key, [(base + s) * bias.stride(0) for s in starts], [0] * len(widths), [0] * len(widths), bias.device)
    return ExpertVectors(off, bias.stride(0))
