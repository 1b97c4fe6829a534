"""The torch references (the fp32 emulation of :mod:`fastmoe_kernels.fp8`'s recipe) of the fp8 experts'
gathered and activated products: registered as the torch backend of those ops by ops/fp8_mlp.py and
composed by the fused node's reference (ops/fp8_moe_node.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..activations import Activation, apply_activation
from ..fp8 import grouped_gemm_fp8_backward_reference, grouped_gemm_fp8_forward_reference
from .permute import permute_reference


def gathered_forward_reference(x: Tensor, w: Tensor, offsets: Tensor, src: Tensor) -> Tensor:
    return grouped_gemm_fp8_forward_reference(permute_reference(x, src), w, offsets)


def gathered_backward_reference(grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor, src: Tensor):
    """(gradient of the gathered rows ``[R, K]``, gradient of w)."""
    return grouped_gemm_fp8_backward_reference(grad, permute_reference(x, src), w, offsets)


def activated_forward_reference(h: Tensor, w: Tensor, offsets: Tensor, act: Activation) -> Tensor:
    return grouped_gemm_fp8_forward_reference(apply_activation(h, act), w, offsets)


def activated_backward_reference(grad: Tensor, h: Tensor, w: Tensor, offsets: Tensor, act: Activation):
    """(gradient of the pre-activation h, gradient of w): the fp8 dgrad reaches act(h), torch's own
    derivative of the activation carries it to h (``torch.func.vjp``: a function transform, so it
    works inside the op, where autograd is off)."""
    a, activation_vjp = torch.func.vjp(lambda t: apply_activation(t, act), h)
    grad_a, grad_w = grouped_gemm_fp8_backward_reference(grad, a, w, offsets)
    (grad_h,) = activation_vjp(grad_a)
    return grad_h, grad_w
