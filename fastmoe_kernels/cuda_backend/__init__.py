"""The ``cuda`` backend: the hand-written kernels of csrc/ (CUDA kernels for CUDA tensors, their C++
CPU twins for CPU tensors), reached through the ``torch.ops.fastmoe_C`` op library.

Importing this package loads the compiled extension (prebuilt or JIT, see ``_loader``) and
registers its kernels; an ImportError says why it could not. It covers the memory-bound,
index-heavy kernels: routing top-k, the dispatch plan, gather / combine and their backward, and
routing statistics. The grouped GEMMs stay with Triton on GPUs; on CPUs this backend runs them as
torch's grouped matmul (``torch._grouped_mm``) where it applies. Float64 data runs the reference.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import backends
from .._alloc import empty
from ..ops.plan import num_plan_rows
from ._loader import load_extension

extension = load_extension()
_ops = torch.ops.fastmoe_C
MAX_ROUTING_EXPERTS = 1024  # the warp-per-token CUDA routing kernels (CPU: any E)


def supports_device(device: torch.device) -> Tuple[bool, str]:
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if getattr(extension, "with_cuda", False):
            return True, ""
        return False, "the compiled kernels were built without CUDA (no nvcc or a CPU-only torch at build time)"
    return False, f"no kernels for device type {device.type!r}"


def _register(kernel: str):
    return backends.register_accelerated(kernel, "cuda")


def _routing_fits(logits: torch.Tensor, k: int) -> bool:
    return not logits.is_cuda or (logits.shape[1] <= MAX_ROUTING_EXPERTS and k <= 32)


@_register("route_topk")
def route_topk_cuda(logits, k, score, normalize, expert_bias, num_groups, topk_groups, scaling, return_probs):
    if not _routing_fits(logits, k):
        return backends.get_kernel("route_topk", "torch")(
            logits, k, score, normalize, expert_bias, num_groups, topk_groups, scaling, return_probs)
    T, E = logits.shape
    dev = logits.device
    idx = empty(T, k, dtype=torch.int32, device=dev)
    weight = empty(T, k, dtype=torch.float32, device=dev)
    probs = empty((T, E) if return_probs else (0,), dtype=torch.float32, device=dev)
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    _ops.route_topk(logits.contiguous(), k, score == "sigmoid", normalize, bias, num_groups, topk_groups, scaling,
                    idx, weight, probs)
    return idx, weight, probs


@_register("route_topk_backward")
def route_topk_backward_cuda(grad_weight, grad_probs, logits, expert_idx, score, normalize, scaling):
    if not _routing_fits(logits, expert_idx.shape[1]):
        return backends.get_kernel("route_topk_backward", "torch")(
            grad_weight, grad_probs, logits, expert_idx, score, normalize, scaling)
    grad_logits = empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _ops.route_topk_backward(grad_weight.float().contiguous(), grad_probs.float().contiguous(), logits.contiguous(),
                             expert_idx.to(torch.int32).contiguous(), score == "sigmoid", normalize, scaling,
                             grad_logits)
    return grad_logits


@_register("make_plan")
def make_plan_cuda(expert_idx, num_experts, capacity, drop_policy, weight, pad):
    T, k = expert_idx.shape
    dev = expert_idx.device
    R = num_plan_rows(T, k, num_experts, capacity, pad)
    counts = empty(num_experts, dtype=torch.int32, device=dev)
    routed = empty(num_experts, dtype=torch.int32, device=dev)
    offsets = empty(num_experts + 1, dtype=torch.int32, device=dev)
    row = empty(T, k, dtype=torch.int32, device=dev)
    assignment = empty(R, dtype=torch.int32, device=dev)
    by_weight = capacity >= 0 and drop_policy == "probs"
    _ops.make_plan(expert_idx.to(torch.int32).contiguous(), num_experts, capacity, by_weight,
                   weight.float().contiguous() if by_weight else None, pad, counts, routed, offsets, row, assignment)
    return counts, routed, offsets, row, assignment


def _gather(x, index, num_rows, div=1, scale=None, out_dtype=None):
    out = empty(num_rows, x.shape[1], dtype=out_dtype or x.dtype, device=x.device)
    x = x if x.dtype == out.dtype else x.to(out.dtype)
    _ops.gather(x if x.stride(-1) == 1 else x.contiguous(), index.contiguous(), div, scale, out)
    return out


def _combine(y, row, weight, ordered=False):
    out = empty(row.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    w = weight.float().contiguous() if weight is not None and weight.numel() else None
    _ops.combine(y if y.stride(-1) == 1 else y.contiguous(), row.contiguous(), w, ordered, out)
    return out


@_register("permute")
def permute_cuda(x, src):
    return _gather(x, src, src.shape[0])


@_register("combine")
def combine_cuda(y, row, weight):
    return _combine(y, row, weight)


@_register("unpermute_backward")
def unpermute_backward_cuda(grad_out, y, row, weight, assignment):
    k = row.shape[1]
    scale = weight.reshape(-1).float().contiguous() if weight.numel() else None
    grad_y = _gather(grad_out, assignment, assignment.shape[0], div=k, scale=scale, out_dtype=y.dtype)
    grad_weight = empty(row.shape, dtype=torch.float32, device=y.device)
    g = grad_out.to(y.dtype).contiguous()
    _ops.rowdot(g, y.contiguous(), row.contiguous(), grad_weight)
    return grad_y, grad_weight


# ---- grouped GEMM on CPU tensors: torch's grouped matmul ------------------------------------------
# The hand-written kernels are the index-heavy ones; for the GEMMs of the CPU path, torch's
# `_grouped_mm` (one call for all experts) replaces the reference's loop over experts. Heterogeneous
# (packed) weights, other dtypes, misaligned shapes and CUDA tensors (Triton's job) use the reference.
def _grouped_mm_applies(a: torch.Tensor, offsets: torch.Tensor, packed: str) -> bool:
    return (not a.is_cuda and not packed and hasattr(torch, "_grouped_mm")
            and a.dtype in (torch.float32, torch.bfloat16) and a.shape[0] > 0 and int(offsets[0]) == 0)


def _expert_of_row(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    counts = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.shape[0]), counts)[:rows]


@_register("grouped_gemm")
def grouped_gemm_cuda(a, b, offsets, trans_b, bias, widths, packed):
    reference = backends.get_kernel("grouped_gemm", "torch")
    if not _grouped_mm_applies(a, offsets, packed):
        return reference(a, b, offsets, trans_b, bias, widths, packed)
    mats = b.to(a.dtype)
    try:
        out = torch._grouped_mm(a, mats.transpose(1, 2) if trans_b else mats, offs=offsets[1:].to(torch.int32))
    except RuntimeError:  # the CPU kernel's shape / 16-byte stride limits
        return reference(a, b, offsets, trans_b, bias, widths, packed)
    last = int(offsets[-1])
    out[last:] = 0  # rows outside every group (torch leaves them unwritten)
    if bias is not None:
        out[:last] += bias.to(a.dtype)[_expert_of_row(offsets, last)]
    return out


@_register("grouped_gemm_wgrad")
def grouped_gemm_wgrad_cuda(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape):
    reference = backends.get_kernel("grouped_gemm_wgrad", "torch")
    if not _grouped_mm_applies(a, offsets, packed):
        return reference(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape)
    try:
        grad_b = torch._grouped_mm(a.t(), grad.to(a.dtype), offs=offsets[1:].to(torch.int32)).float()
    except RuntimeError:
        return reference(a, grad, offsets, trans_b, has_bias, widths, packed, b_shape)
    if trans_b:
        grad_b = grad_b.transpose(1, 2).contiguous()
    E = offsets.shape[0] - 1
    grad_bias = grad.new_empty(0, dtype=torch.float32)
    if has_bias:
        last = int(offsets[-1])
        grad_bias = torch.zeros(E, grad.shape[1], dtype=torch.float32).index_add_(
            0, _expert_of_row(offsets, last), grad[:last].float())
    return grad_b, grad_bias


@_register("routing_stats")
def routing_stats_cuda(probs, expert_idx, num_segments):
    E = probs.shape[1]
    tokens = empty(num_segments, E, dtype=torch.float32, device=probs.device)
    prob_mean = empty(num_segments, E, dtype=torch.float32, device=probs.device)
    _ops.routing_stats(probs.float().contiguous(), expert_idx.to(torch.int32).contiguous(), num_segments, tokens,
                       prob_mean)
    return tokens, prob_mean.to(probs.dtype)
