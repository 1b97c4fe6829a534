"""router_logits: the router's logits ``x · Wᵀ`` in fp32, differentiable.

``router_logits(x [T, d], weight [E, d])`` returns fp32 ``[T, E]``: the product of x and W as fp32
numbers (x and W in any float dtype but fp64), accumulated in fp32 — what ``TopKRouter`` computes by
default (``F.linear(x.float(), W.float())``, the reference here). Gradients come back in x's and W's
own dtypes. The triton kernels run it on tensor cores at fp32's accuracy
(``triton_backend/router_gemm.py``) and read x without an fp32 copy; the layer's router takes them
where ``FASTMOE_ROUTER_GEMM=tensor-cores`` (``router.py``; default "torch" until a GPU measures them
faster).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from .._checks import check_tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def router_logits_reference(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x.to(torch.float32), weight.to(torch.float32))


def router_logits_backward_reference(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return (grad @ weight.to(torch.float32)).to(x.dtype), (grad.t() @ x.to(torch.float32)).to(weight.dtype)


backends.register("router_logits", "torch")(router_logits_reference)
backends.register("router_logits_backward", "torch")(router_logits_backward_reference)


@torch.library.custom_op("fastmoe::router_logits", mutates_args=())
def _router_logits_op(x: Tensor, weight: Tensor, backend: str, backward_backend: str) -> Tensor:
    return backends.get_kernel("router_logits", backend)(x, weight)


@_router_logits_op.register_fake
def _(x, weight, backend, backward_backend):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastmoe::router_logits_backward", mutates_args=())
def _router_logits_backward_op(grad: Tensor, x: Tensor, weight: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return backends.get_kernel("router_logits_backward", backend)(grad, x, weight)


@_router_logits_backward_op.register_fake
def _(grad, x, weight, backend):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, _backend, backward = inputs
    ctx.save_for_backward(x, weight)
    ctx.backend = backward


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _router_logits_backward_op(grad.contiguous(), x, weight, ctx.backend)
    return grad_x, grad_w, None, None


_router_logits_op.register_autograd(_backward, setup_context=_setup)


def router_logits(x: Tensor, weight: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """fp32 logits ``x · Wᵀ`` (see the module docstring)."""
    where = "router_logits"
    check_tensor(where, "x", x, ndim=2, dtypes=DTYPES)
    check_tensor(where, "weight", weight, ndim=2, dtypes=DTYPES, shape=(None, x.shape[1]), device=x.device)
    forward = backends.resolve("router_logits", backend, x.device, x.dtype)
    backward = backends.resolve("router_logits_backward", backend, x.device, x.dtype)
    return _router_logits_op(x, weight, forward, backward)
