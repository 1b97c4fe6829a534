"""route_topk: router scores over all experts, then top-k selection.

Conventions (the reference below is the specification every backend must match):

- scores are ``softmax(logits)`` over all E experts, or ``sigmoid(logits)``; computed in fp32.
- the *selection key* is the logits when there is neither expert bias nor group limiting (same
  ranking as the scores, without rounding ties), else ``scores + expert_bias``. The bias changes
  which experts are chosen, never the weights (DeepSeek-V3's loss-free balancing).
- group-limited routing: experts form ``num_groups`` equal consecutive groups; a group's score is
  the sum of its two best keys (its best key when groups have one expert); a token may only choose
  experts in its ``topk_groups`` best groups.
- ties break to the lower index (expert or group), deterministically; ``expert_idx[t]`` lists the k
  experts by descending key.
- non-finite keys: a NaN key ranks as -inf; a token never gets an expert (or a group) twice, and the
  experts of its allowed groups come before every other. So a -inf bias that masks an expert, a +inf
  one that forces it, or a NaN token (whose NaN weights the value check reports) still give k distinct
  experts, the same on every backend.
- ``weight[t, j] = scaling · s[t, idx[t, j]] / (Σ_j' s[t, idx[t, j']] + 1e-20 if normalize else 1)``.
- ``probs`` (when asked): the per-token distribution the load-balancing loss uses — the softmax
  scores, or the sigmoid scores renormalised to sum to 1 over the experts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import FLOAT_DTYPES, check_choice, check_finite, check_int, check_tensor, trust

NORMALIZE_EPS = 1e-20
SCORE_FUNCS = ("softmax", "sigmoid")


def _router_dtype(logits: Tensor) -> torch.dtype:
    """Routing runs in fp32 whatever the input dtype (fp64 stays fp64, for gradcheck)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scores(logits32: Tensor, score: str) -> Tensor:
    return torch.softmax(logits32, dim=-1) if score == "softmax" else torch.sigmoid(logits32)


def _nan_as_neg_inf(t: Tensor) -> Tensor:
    return torch.where(torch.isnan(t), float("-inf"), t)


def _selection_key(logits32: Tensor, scores: Tensor, expert_bias: Optional[Tensor], num_groups: int) -> Tensor:
    if expert_bias is None and num_groups <= 1:
        key = logits32
    else:
        key = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    return _nan_as_neg_inf(key)


def _allowed_experts(key: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """``[T, E]`` bool: the experts of each token's ``topk_groups`` best groups."""
    T, E = key.shape
    grouped = key.view(T, num_groups, E // num_groups)
    best_in_group = torch.sort(grouped, dim=-1, descending=True, stable=True).values
    group_score = _nan_as_neg_inf(best_in_group[..., : min(2, E // num_groups)].sum(dim=-1))  # +inf + -inf
    top_groups = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    keep = torch.zeros(T, num_groups, dtype=torch.bool, device=key.device).scatter_(1, top_groups, True)
    return keep.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)


def route_topk_reference(
    logits: Tensor,
    k: int,
    score: str,
    normalize: bool,
    expert_bias: Optional[Tensor],
    num_groups: int,
    topk_groups: int,
    scaling: float,
    return_probs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: ``(expert_idx [T,k] int32, weight [T,k] fp32, probs [T,E] fp32 or [0])``."""
    logits32 = logits.to(_router_dtype(logits))
    scores = _scores(logits32, score)
    key = _selection_key(logits32, scores, expert_bias, num_groups)
    # Order by key (ties: lower index), then, stably, the allowed experts first.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    if num_groups > 1:
        allowed = _allowed_experts(key, num_groups, topk_groups).gather(1, order)
        order = order.gather(1, torch.sort(allowed.to(torch.int8), dim=-1, descending=True, stable=True).indices)
    expert_idx = order[:, :k]
    selected = scores.gather(1, expert_idx)
    if normalize:
        selected = selected / (selected.sum(dim=-1, keepdim=True) + NORMALIZE_EPS)
    weight = selected * scaling
    if not return_probs:
        probs = logits32.new_empty(0)
    elif score == "softmax":
        probs = scores.clone()
    else:
        probs = scores / scores.sum(dim=-1, keepdim=True)
    return expert_idx.to(torch.int32), weight, probs


def route_topk_backward_reference(
    grad_weight: Tensor,
    grad_probs: Tensor,
    logits: Tensor,
    expert_idx: Tensor,
    score: str,
    normalize: bool,
    scaling: float,
) -> Tensor:
    """Reference backward: the gradient of the logits (``grad_probs`` may be empty: no probs output).

    With g the selected scores and S = Σ g + eps: dL/dg_i = c/S · (dL/dw_i − Σ_j dL/dw_j · g_j / S)
    when normalising, c · dL/dw_i otherwise; then through the softmax / sigmoid Jacobian.
    """
    logits32 = logits.to(_router_dtype(logits))
    scores = _scores(logits32, score)
    idx = expert_idx.long()
    selected = scores.gather(1, idx)
    gw = grad_weight.to(logits32.dtype)
    if normalize:
        total = selected.sum(dim=-1, keepdim=True) + NORMALIZE_EPS
        grad_selected = (scaling / total) * (gw - (gw * selected).sum(dim=-1, keepdim=True) / total)
    else:
        grad_selected = scaling * gw
    grad_scores = torch.zeros_like(scores).scatter_(1, idx, grad_selected)
    if grad_probs.numel():
        gp = grad_probs.to(logits32.dtype)
        if score == "softmax":
            grad_scores = grad_scores + gp
        else:
            z = scores.sum(dim=-1, keepdim=True)
            grad_scores = grad_scores + (gp - (gp * scores).sum(dim=-1, keepdim=True) / z) / z
    if score == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1 - scores)
    return grad_logits.to(logits.dtype)


backends.register("route_topk", "torch")(route_topk_reference)
backends.register("route_topk_backward", "torch")(route_topk_backward_reference)


@torch.library.custom_op("fastmoe::route_topk", mutates_args=())
def _route_topk_op(
    logits: Tensor,
    k: int,
    score: str,
    normalize: bool,
    expert_bias: Optional[Tensor],
    num_groups: int,
    topk_groups: int,
    scaling: float,
    return_probs: bool,
    backend: str,
    backward_backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    check_finite("route_topk", "logits", logits)
    fn = backends.get_kernel("route_topk", backend)
    expert_idx, weight, probs = fn(logits, k, score, normalize, expert_bias, num_groups, topk_groups, scaling,
                                   return_probs)
    trust(expert_idx)  # in [0, E) by construction: make_plan and routing_stats skip their id checks
    return expert_idx, weight, probs


@_route_topk_op.register_fake
def _(logits, k, score, normalize, expert_bias, num_groups, topk_groups, scaling, return_probs, backend,
      backward_backend):
    T, E = logits.shape
    idx = logits.new_empty((T, k), dtype=torch.int32)
    weight = logits.new_empty((T, k), dtype=_router_dtype(logits))
    probs = logits.new_empty((T, E) if return_probs else (0,), dtype=_router_dtype(logits))
    return idx, weight, probs


@torch.library.custom_op("fastmoe::route_topk_backward", mutates_args=())
def _route_topk_backward_op(
    grad_weight: Tensor,
    grad_probs: Tensor,
    logits: Tensor,
    expert_idx: Tensor,
    score: str,
    normalize: bool,
    scaling: float,
    backend: str,
) -> Tensor:
    fn = backends.get_kernel("route_topk_backward", backend)
    return fn(grad_weight, grad_probs, logits, expert_idx, score, normalize, scaling)


@_route_topk_backward_op.register_fake
def _(grad_weight, grad_probs, logits, expert_idx, score, normalize, scaling, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, _k, score, normalize, _bias, _g, _tg, scaling, return_probs, _backend, backward_backend = inputs
    expert_idx = output[0]
    ctx.save_for_backward(logits, expert_idx)
    ctx.score, ctx.normalize, ctx.scaling = score, normalize, scaling
    ctx.return_probs, ctx.backend = return_probs, backward_backend


def _backward(ctx, _grad_idx, grad_weight, grad_probs):
    logits, expert_idx = ctx.saved_tensors
    if grad_weight is None:
        grad_weight = torch.zeros(expert_idx.shape, dtype=_router_dtype(logits), device=logits.device)
    if grad_probs is None or not ctx.return_probs:
        grad_probs = logits.new_empty(0, dtype=_router_dtype(logits))
    grad_logits = _route_topk_backward_op(
        grad_weight.contiguous(), grad_probs.contiguous(), logits, expert_idx,
        ctx.score, ctx.normalize, ctx.scaling, ctx.backend,
    )
    return grad_logits, None, None, None, None, None, None, None, None, None, None


_route_topk_op.register_autograd(_backward, setup_context=_setup_context)


def route_topk(
    logits: Tensor,
    k: int,
    score: str = "softmax",
    normalize: bool = True,
    expert_bias: Optional[Tensor] = None,
    *,
    num_groups: Optional[int] = None,
    topk_groups: Optional[int] = None,
    scaling_factor: float = 1.0,
    return_probs: bool = False,
    backend: Optional[str] = None,
):
    """Choose ``k`` experts per token.

    Args:
        logits: ``[T, E]`` router logits, any float dtype (computed in fp32), finite.
        k: experts per token, ``1 <= k <= E``.
        score: "softmax" (over all E, then top-k) or "sigmoid".
        normalize: renormalise the k selected scores to sum to 1.
        expert_bias: optional ``[E]`` bias added to the scores for *selection only*.
        num_groups, topk_groups: group-limited routing (both or neither).
        scaling_factor: multiplies the weights (DeepSeek-V3's routed scaling factor).
        return_probs: also return ``probs [T, E]`` fp32 for the load-balancing loss.
        backend: "torch", "triton", "cuda", "cpp" or "auto" (see :mod:`fastmoe_kernels.backends`).

    Returns:
        ``(expert_idx [T, k] int32, weight [T, k] float32)``, plus ``probs`` when asked (both
        float64 instead for float64 logits).
        ``weight`` and ``probs`` are differentiable with respect to ``logits``.
    """
    where = "route_topk"
    check_tensor(where, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, None))
    T, E = logits.shape
    check_int(where, "k", k, low=1, high=E)
    check_choice(where, "score", score, SCORE_FUNCS)
    if expert_bias is not None:
        check_tensor(where, "expert_bias", expert_bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(E,), device=logits.device)
    if (num_groups is None) != (topk_groups is None):
        raise ValueError(f"{where}: `num_groups` and `topk_groups` must be given together")
    if num_groups is None:
        num_groups, topk_groups = 1, 1
    check_int(where, "num_groups", num_groups, low=1, high=E)
    if E % num_groups:
        raise ValueError(f"{where}: `num_groups` must divide the number of experts {E}, got {num_groups}")
    check_int(where, "topk_groups", topk_groups, low=1, high=num_groups)
    if k > topk_groups * (E // num_groups):
        raise ValueError(
            f"{where}: `k`={k} exceeds the experts reachable in `topk_groups`={topk_groups} groups of {E // num_groups}"
        )
    if not scaling_factor > 0:
        raise ValueError(f"{where}: `scaling_factor` must be > 0, got {scaling_factor}")
    facts = dict(num_experts=int(E), top_k=int(k))
    forward = backends.resolve("route_topk", backend, logits.device, logits.dtype, **facts)
    backward = backends.resolve("route_topk_backward", backend, logits.device, logits.dtype, **facts)
    expert_idx, weight, probs = _route_topk_op(
        logits, k, score, bool(normalize), expert_bias, num_groups, topk_groups, float(scaling_factor),
        bool(return_probs), forward, backward,
    )
    if return_probs:
        return expert_idx, weight, probs
    return expert_idx, weight
