"""grouped_gemm: one matrix product per expert over that expert's rows.

``grouped_gemm(a [R, K], b, offsets [E+1]) → [R, N]``: group e multiplies rows
``offsets[e]:offsets[e+1]`` of ``a`` by expert e's matrix; empty groups are legal; rows outside every
group are zeros. Accumulation is fp32 (fp64 for fp64 data); the output has a's dtype.

Weight layouts:
- homogeneous: ``b [E, K, N]``, or ``[E, N, K]`` with ``trans_b=True`` (nn.Linear / Hugging Face
  layout, out × in); ``bias [E, N]``.
- ``packed="n"`` (experts of different widths, packed along N): ``widths[e]`` columns per expert,
  ``b [K, ΣW]`` (``[ΣW, K]`` with ``trans_b``); output ``[R, max W]`` where group e fills its first
  ``widths[e]`` columns and leaves zeros after; ``bias [ΣW]``.
- ``packed="k"`` (packed along K): group e reads the first ``widths[e]`` columns of ``a [R, max W]``;
  ``b [ΣW, N]`` (``[N, ΣW]`` with ``trans_b``); output ``[R, N]``; ``bias [E, N]``.

Backward: ``grad_a`` is the same op with ``trans_b`` flipped and ``packed`` n↔k; ``grad_b`` is
``a_eᵀ · grad_e`` per group (zero for empty groups); ``grad_bias`` the per-group row sum.
"""
from __future__ import annotations

import itertools
import os
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .._variants import flag
from .. import backends
from .._shapes import grouped_gemm_output_width
from ..tuning import rows_bucket
from .._checks import (
    FLOAT_DTYPES, INDEX_DTYPES, accum_dtype, check_choice, check_tensor, check_values, is_trusted,
)

PACKINGS = ("", "n", "k")
# The old weight-gradient contract, kept selectable for the GPU session's A/B (read once, at import):
# fp32 gradients from the kernel, cast to the parameters' dtype by a second pass.
WGRAD_IN_FP32 = flag("FASTMOE_WGRAD_FP32", "0", ("0", "1")) == "1"
_FLIP = {"": "", "n": "k", "k": "n"}


def _starts(widths: Sequence[int]) -> List[int]:
    return [0, *itertools.accumulate(widths)]


def expert_matrix(b: Tensor, e: int, trans_b: bool, widths: Sequence[int], packed: str, starts: Sequence[int]) -> Tensor:
    """Expert e's matrix as a ``[K_e, N_e]`` view of ``b``."""
    if not packed:
        return b[e].t() if trans_b else b[e]
    s, w = starts[e], widths[e]
    if packed == "n":
        return b[s:s + w].t() if trans_b else b[:, s:s + w]
    return b[:, s:s + w].t() if trans_b else b[s:s + w]


def expert_bias(bias: Tensor, e: int, widths: Sequence[int], packed: str, starts: Sequence[int]) -> Tensor:
    return bias[starts[e]:starts[e] + widths[e]] if packed == "n" else bias[e]


def grouped_gemm_reference(
    a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, bias: Optional[Tensor], widths: List[int], packed: str
) -> Tensor:
    """Reference forward: a loop over experts (one host sync to read ``offsets``)."""
    out = a.new_zeros(a.shape[0], grouped_gemm_output_width(b, trans_b, widths, packed))
    bounds = offsets.tolist()
    starts = _starts(widths)
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        a_e = a[lo:hi, : widths[e]] if packed == "k" else a[lo:hi]
        res = a_e @ expert_matrix(b, e, trans_b, widths, packed, starts).to(a.dtype)
        if bias is not None:
            res = res + expert_bias(bias, e, widths, packed, starts).to(a.dtype)
        out[lo:hi, : res.shape[1]] = res
    return out


def grouped_gemm_wgrad_reference(
    a: Tensor, grad: Tensor, offsets: Tensor, trans_b: bool, has_bias: bool, widths: List[int], packed: str,
    b_shape: List[int], out_dtype: torch.dtype, bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Reference ``(grad_b in b's layout, grad_bias or an empty tensor)``, accumulated in fp32 (fp64 for
    fp64 data) and returned in ``out_dtype`` / ``bias_dtype`` (the parameters' dtypes)."""
    acc = accum_dtype(a, grad)
    grad_b = torch.zeros(b_shape, dtype=acc, device=a.device)
    bounds = offsets.tolist()
    E = len(bounds) - 1
    starts = _starts(widths)
    if has_bias:
        bias_shape = (starts[-1],) if packed == "n" else (E, grad.shape[1])
        grad_bias = torch.zeros(bias_shape, dtype=acc, device=a.device)
    else:
        grad_bias = grad.new_empty(0, dtype=bias_dtype)
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        a_e = a[lo:hi, : widths[e]] if packed == "k" else a[lo:hi]
        g_e = grad[lo:hi, : widths[e]] if packed == "n" else grad[lo:hi]
        # expert_matrix gives a view of grad_b shaped [K_e, N_e]; write a_eᵀ g_e through it.
        expert_matrix(grad_b, e, trans_b, widths, packed, starts).copy_(a_e.to(acc).t() @ g_e.to(acc))
        if has_bias:
            expert_bias(grad_bias, e, widths, packed, starts).copy_(g_e.to(acc).sum(0))
    return grad_b.to(out_dtype), grad_bias.to(bias_dtype)


backends.register("grouped_gemm", "torch")(grouped_gemm_reference)
backends.register("grouped_gemm_wgrad", "torch")(grouped_gemm_wgrad_reference)


@torch.library.custom_op("fastmoe::grouped_gemm", mutates_args=())
def _grouped_gemm_op(
    a: Tensor, b: Tensor, offsets: Tensor, trans_b: bool, bias: Optional[Tensor], widths: List[int], packed: str,
    backend_names: str,
) -> Tensor:
    # Value checks live inside the op, where torch.compile does not trace them.
    check_offsets("grouped_gemm", offsets, a.shape[0])
    forward = backend_names.split(",")[0]
    return backends.get_kernel("grouped_gemm", forward)(a, b, offsets, trans_b, bias, widths, packed)


@_grouped_gemm_op.register_fake
def _(a, b, offsets, trans_b, bias, widths, packed, backend_names):
    return a.new_empty((a.shape[0], grouped_gemm_output_width(b, trans_b, widths, packed)))


@torch.library.custom_op("fastmoe::grouped_gemm_wgrad", mutates_args=())
def _grouped_gemm_wgrad_op(
    a: Tensor, grad: Tensor, offsets: Tensor, trans_b: bool, has_bias: bool, widths: List[int], packed: str,
    b_shape: List[int], out_dtype: torch.dtype, bias_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor]:
    fn = backends.get_kernel("grouped_gemm_wgrad", backend)
    return fn(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape, out_dtype, bias_dtype)


@_grouped_gemm_wgrad_op.register_fake
def _(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape, out_dtype, bias_dtype, backend):
    E = offsets.shape[0] - 1
    if has_bias:
        bias_shape = (sum(widths),) if packed == "n" else (E, grad.shape[1])
    else:
        bias_shape = (0,)
    return a.new_empty(b_shape, dtype=out_dtype), a.new_empty(bias_shape, dtype=bias_dtype)


def _setup(ctx, inputs, output):
    a, b, offsets, trans_b, bias, widths, packed, backend_names = inputs
    ctx.save_for_backward(a, b, offsets)
    ctx.trans_b, ctx.widths, ctx.packed, ctx.backend_names = trans_b, widths, packed, backend_names
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else b.dtype


def _backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    forward, dgrad, wgrad, dgrad_wgrad = ctx.backend_names.split(",")
    grad = grad.contiguous()
    grad_a = grad_b = grad_bias = None
    if ctx.needs_input_grad[0]:
        # The input gradient is the same op with trans_b and the packing flipped (its own backward
        # flips them back).
        grad_a = _grouped_gemm_op(
            grad, b, offsets, not ctx.trans_b, None, ctx.widths, _FLIP[ctx.packed], ",".join([dgrad, forward, dgrad_wgrad, wgrad])
        )
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[4]):
        # Weight gradients come in the parameters' dtypes straight from the kernels' fp32 sums: no fp32
        # copy of the experts and no cast pass (the first H100 run: 1.25 ms of a 12.4 ms Qwen3 step,
        # and DeepSeek-V3's out-of-memory).
        out_dtype = torch.float32 if WGRAD_IN_FP32 else b.dtype
        grad_b, grad_bias = _grouped_gemm_wgrad_op(
            a, grad, offsets, ctx.trans_b, ctx.has_bias, ctx.widths, ctx.packed, list(b.shape), out_dtype,
            torch.float32 if WGRAD_IN_FP32 else ctx.bias_dtype, wgrad
        )
        grad_b = grad_b.to(b.dtype)
        grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.has_bias else None
    return grad_a, grad_b, None, None, grad_bias, None, None, None


_grouped_gemm_op.register_autograd(_backward, setup_context=_setup)


def _resolve_all(requested: Optional[str], a: Tensor, K: int, N: int, packed: str, num_experts: int,
                 all_rows_grouped: bool) -> str:
    """Backends of the forward, the input gradient, the weight gradient and the latter's twin for
    the input gradient's own backward, comma-separated (an op argument)."""
    rows, dtype_name = rows_bucket(a.shape[0]), str(a.dtype).replace("torch.", "")

    def resolve(kernel, packing, k_dim, n_dim):
        return backends.resolve(kernel, requested, a.device, a.dtype, packed=packing, k_dim=k_dim, n_dim=n_dim,
                                element_size=a.element_size(), num_experts=num_experts, rows=rows, dtype_name=dtype_name,
                                all_rows_grouped=all_rows_grouped)

    flipped = _FLIP[packed]
    return ",".join([resolve("grouped_gemm", packed, K, N), resolve("grouped_gemm", flipped, N, K),
                     resolve("grouped_gemm_wgrad", packed, K, N), resolve("grouped_gemm_wgrad", flipped, N, K)])


def grouped_gemm(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    trans_b: bool = False,
    bias: Optional[Tensor] = None,
    *,
    widths: Optional[Sequence[int]] = None,
    packed: Optional[str] = None,
    backend: Optional[str] = None,
    all_rows_grouped: bool = False,
) -> Tensor:
    """Grouped matrix product (see the module docstring for the layouts). Differentiable in a, b, bias.

    ``all_rows_grouped``: the caller guarantees ``offsets[0] = 0`` and ``offsets[E] = R`` (every row in
    a group, as in a dispatch plan's dropless or padded layout), which lets backends skip writing
    zeros outside the groups (torch's grouped matmul, which writes only the groups' rows). With a
    grouping that leaves rows out, the flag would leave those rows undefined."""
    where = "grouped_gemm"
    check_tensor(where, "a", a, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, None))
    check_tensor(where, "offsets", offsets, ndim=1, dtypes=INDEX_DTYPES, shape=(None,), device=a.device)
    E = offsets.shape[0] - 1
    if E < 1:
        raise ValueError(f"{where}: `offsets` must be [E+1] with E >= 1, got shape {list(offsets.shape)}")
    packed = packed or ""
    check_choice(where, "packed", packed, PACKINGS)
    check_tensor(where, "b", b, dtypes=FLOAT_DTYPES, device=a.device)
    R, K = a.shape
    if not packed:
        if widths is not None:
            raise ValueError(f"{where}: `widths` needs `packed` = 'n' or 'k'")
        widths = []
        expected = (E, None, K) if trans_b else (E, K, None)
        check_tensor(where, "b", b, ndim=3, shape=expected)
        N = b.shape[1] if trans_b else b.shape[2]
        bias_shape = (E, N)
    else:
        if widths is None or len(widths) != E or not all(isinstance(w, int) and w >= 0 for w in widths):
            raise ValueError(f"{where}: packed='{packed}' needs `widths`: {E} ints >= 0, got {widths!r}")
        widths = [int(w) for w in widths]
        total = sum(widths)
        if packed == "n":
            expected = (total, K) if trans_b else (K, total)
            bias_shape = (total,)
        else:
            if K != max(widths):
                raise ValueError(f"{where}: packed='k' needs `a` [R, max(widths)={max(widths)}], got {list(a.shape)}")
            expected = (None, total) if trans_b else (total, None)
            bias_shape = (E, b.shape[0] if trans_b else b.shape[1])
        check_tensor(where, "b", b, ndim=2, shape=expected)
    if bias is not None:
        check_tensor(where, "bias", bias, dtypes=FLOAT_DTYPES, ndim=len(bias_shape), shape=bias_shape, device=a.device)
    N = grouped_gemm_output_width(b, trans_b, widths, packed)
    names = _resolve_all(backend, a, int(K), int(N), packed, int(E), bool(all_rows_grouped))
    return _grouped_gemm_op(a.contiguous(), b, offsets, bool(trans_b), bias, widths, packed, names)


def check_offsets(where: str, offsets: Tensor, num_rows: int) -> None:
    """Value check: ``offsets`` non-decreasing within [0, num_rows]; a plan's own offsets (trusted,
    unchanged) need none."""
    if offsets.numel() == 0 or is_trusted(offsets):
        return

    def stats():
        bad = (offsets[1:] < offsets[:-1]).any() | (offsets[0] < 0) | (offsets[-1] > num_rows)
        return torch.cat([bad.long().reshape(1), offsets[:16].long()])

    def message(values):
        return f"{where}: `offsets` must be non-decreasing within [0, R={num_rows}], got {values[1:]}..."

    check_values(offsets.device, stats, message)
