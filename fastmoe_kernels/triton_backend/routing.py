"""Fused router top-k: scores (softmax | sigmoid), optional bias and group limiting, top-k
selection, renormalisation and scaling in one kernel; and its backward to the logits.

Each program owns ``BLOCK_T`` tokens and holds their ``[BLOCK_T, E]`` scores in registers (hence
E ≤ 1024, which the registration states). Top-k is k rounds of (row max → lowest index attaining it
→ mask it out), so ties go to the lower index exactly like the reference; cheap next to reading the
logits for the usual k ≤ 16, linear in k beyond.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty

from ._common import cdiv, next_pow2, register

NORMALIZE_EPS = 1e-20
MAX_EXPERTS = 1024


@triton.jit
def _scores(l, cmask, SIGMOID: tl.constexpr):
    if SIGMOID:
        s = tl.where(cmask, tl.sigmoid(l), 0.0)
    else:
        m = tl.max(l, 1)
        ex = tl.where(cmask, tl.exp(l - m[:, None]), 0.0)
        s = ex / tl.sum(ex, 1)[:, None]
    return s


@triton.jit
def _allowed_experts(key, cols, NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                     G_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """[BLOCK_T, E_PAD] bool: the experts of each token's TOPK_GROUPS best groups (a group scores its
    two best keys; rounds of "best group not yet taken", ties to the lower group)."""
    group_of = cols // GROUP_SIZE
    gcols = tl.arange(0, G_PAD)
    gscore = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        kg = tl.where((group_of == g)[None, :], key, float("-inf"))
        m1 = tl.max(kg, 1)
        if GROUP_SIZE >= 2:
            first = tl.min(tl.where(kg == m1[:, None], cols[None, :], E_PAD), 1)
            m2 = tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), kg), 1)
            score = m1 + m2
        else:
            score = m1
        score = tl.where(score != score, float("-inf"), score)  # +inf + -inf
        gscore = tl.where((gcols == g)[None, :], score[:, None], gscore)
    gavail = tl.full((BLOCK_T, G_PAD), 1, tl.int1) & (gcols < NUM_GROUPS)[None, :]
    allowed = tl.zeros((BLOCK_T, E_PAD), tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        m = tl.max(tl.where(gavail, gscore, float("-inf")), 1)
        best = tl.min(tl.where(gavail & (gscore == m[:, None]), gcols[None, :], G_PAD), 1)
        allowed = allowed | (group_of[None, :] == best[:, None])
        gavail = gavail & (gcols[None, :] != best[:, None])
    return allowed


@triton.jit
def _route_topk_fwd_kernel(
    logits_ptr, bias_ptr, idx_ptr, weight_ptr, probs_ptr, T, stride_l, scaling,
    E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_PROBS: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    rmask = rows < T
    cmask = (cols < E)[None, :]
    l = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :], mask=rmask[:, None] & cmask, other=0.0)
    l = tl.where(cmask, l.to(tl.float32), float("-inf"))
    s = _scores(l, cmask, SIGMOID)
    if HAS_BIAS or NUM_GROUPS > 1:
        key = s
        if HAS_BIAS:
            key = key + tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
    else:
        key = l  # same ranking as the scores, without rounding ties
    key = tl.where(key != key, float("-inf"), key)  # a NaN key ranks as -inf
    # Selection: k rounds of "best expert not yet taken" (ties: lower index), the experts of the
    # allowed groups first — distinct experts even when keys are -inf (see route_topk.py).
    avail = tl.full((BLOCK_T, E_PAD), 1, tl.int1) & cmask
    if NUM_GROUPS > 1:
        allowed = _allowed_experts(key, cols, NUM_GROUPS, TOPK_GROUPS, E // NUM_GROUPS, G_PAD, E_PAD, BLOCK_T)
    else:
        allowed = avail
    kcols = tl.arange(0, K_PAD)
    sel_idx = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    sel_w = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    for j in tl.static_range(K):
        preferred = avail & allowed
        cand = tl.where((tl.max(preferred.to(tl.int32), 1) > 0)[:, None], preferred, avail)
        m = tl.max(tl.where(cand, key, float("-inf")), 1)
        best = tl.min(tl.where(cand & (key == m[:, None]), cols[None, :], E_PAD), 1)
        hit = cols[None, :] == best[:, None]
        w = tl.sum(tl.where(hit, s, 0.0), 1)
        sel_idx = tl.where((kcols == j)[None, :], best[:, None], sel_idx)
        sel_w = tl.where((kcols == j)[None, :], w[:, None], sel_w)
        avail = avail & (cols[None, :] != best[:, None])
    if NORMALIZE:
        sel_w = sel_w / (tl.sum(sel_w, 1)[:, None] + 1e-20)
    sel_w = sel_w * scaling
    out_mask = rmask[:, None] & (kcols < K)[None, :]
    out_offs = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(idx_ptr + out_offs, sel_idx, mask=out_mask)
    tl.store(weight_ptr + out_offs, sel_w, mask=out_mask)
    if RETURN_PROBS:
        if SIGMOID:
            p = s / tl.sum(s, 1)[:, None]
        else:
            p = s
        tl.store(probs_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], p, mask=rmask[:, None] & cmask)


@triton.jit
def _route_topk_bwd_kernel(
    grad_w_ptr, grad_p_ptr, logits_ptr, idx_ptr, grad_l_ptr, T, stride_l, scaling,
    E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    rmask = rows < T
    cmask = (cols < E)[None, :]
    rows64 = rows.to(tl.int64)
    l = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=rmask[:, None] & cmask, other=0.0)
    l = tl.where(cmask, l.to(tl.float32), float("-inf"))
    s = _scores(l, cmask, SIGMOID)
    kmask = rmask[:, None] & (kcols < K)[None, :]
    idx = tl.load(idx_ptr + rows64[:, None] * K + kcols[None, :], mask=kmask, other=-1)
    gw = tl.load(grad_w_ptr + rows64[:, None] * K + kcols[None, :], mask=kmask, other=0.0).to(tl.float32)
    selected = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    for j in tl.static_range(K):
        e_j = tl.sum(tl.where((kcols == j)[None, :], idx, 0), 1)
        s_j = tl.sum(tl.where(cols[None, :] == e_j[:, None], s, 0.0), 1)
        selected = tl.where((kcols == j)[None, :], s_j[:, None], selected)
    if NORMALIZE:
        total = tl.sum(selected, 1)[:, None] + 1e-20
        g_sel = (scaling / total) * (gw - tl.sum(gw * selected, 1)[:, None] / total)
    else:
        g_sel = scaling * gw
    g_s = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    for j in tl.static_range(K):
        e_j = tl.sum(tl.where((kcols == j)[None, :], idx, 0), 1)
        g_j = tl.sum(tl.where((kcols == j)[None, :], g_sel, 0.0), 1)
        g_s += tl.where(cols[None, :] == e_j[:, None], g_j[:, None], 0.0)
    if HAS_GRAD_PROBS:
        gp = tl.load(grad_p_ptr + rows64[:, None] * E + cols[None, :], mask=rmask[:, None] & cmask, other=0.0).to(tl.float32)
        if SIGMOID:
            z = tl.sum(s, 1)[:, None]
            g_s += (gp - tl.sum(gp * s, 1)[:, None] / z) / z
        else:
            g_s += gp
    if SIGMOID:
        g_l = g_s * s * (1.0 - s)
    else:
        g_l = s * (g_s - tl.sum(g_s * s, 1)[:, None])
    tl.store(grad_l_ptr + rows64[:, None] * E + cols[None, :], g_l.to(grad_l_ptr.dtype.element_ty), mask=rmask[:, None] & cmask)


def _block_t(e_pad: int) -> int:
    return max(1, min(64, 4096 // e_pad))


def _fits(num_experts: int = 1, top_k: int = 1, **_) -> Optional[str]:
    if num_experts > MAX_EXPERTS:
        return f"triton's router holds a token's scores in registers: E <= {MAX_EXPERTS}, got {num_experts}"
    return None


@register("route_topk", applies=_fits)
def route_topk_triton(logits, k, score, normalize, expert_bias, num_groups, topk_groups, scaling, return_probs):
    T, E = logits.shape
    device = logits.device
    idx = empty(T, k, dtype=torch.int32, device=device)
    weight = empty(T, k, dtype=torch.float32, device=device)
    probs = empty((T, E) if return_probs else (0,), dtype=torch.float32, device=device)
    if T == 0:
        return idx, weight, probs
    e_pad = next_pow2(E)
    block_t = _block_t(e_pad)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    _route_topk_fwd_kernel[(cdiv(T, block_t),)](
        logits, expert_bias if expert_bias is not None else logits, idx, weight, probs, T, logits.stride(0), float(scaling),
        E=E, E_PAD=e_pad, K=k, K_PAD=next_pow2(k), SIGMOID=score == "sigmoid", NORMALIZE=normalize,
        HAS_BIAS=expert_bias is not None, RETURN_PROBS=return_probs,
        NUM_GROUPS=num_groups, TOPK_GROUPS=topk_groups, G_PAD=next_pow2(num_groups), BLOCK_T=block_t,
    )
    return idx, weight, probs


@register("route_topk_backward", applies=_fits)
def route_topk_backward_triton(grad_weight, grad_probs, logits, expert_idx, score, normalize, scaling):
    T, E = logits.shape
    k = expert_idx.shape[1]
    grad_logits = empty(T, E, dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad_logits
    e_pad = next_pow2(E)
    block_t = _block_t(e_pad)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    has_gp = grad_probs.numel() > 0
    _route_topk_bwd_kernel[(cdiv(T, block_t),)](
        grad_weight, grad_probs if has_gp else grad_weight, logits, expert_idx, grad_logits, T, logits.stride(0), float(scaling),
        E=E, E_PAD=e_pad, K=k, K_PAD=next_pow2(k), SIGMOID=score == "sigmoid", NORMALIZE=normalize,
        HAS_GRAD_PROBS=has_gp, BLOCK_T=block_t,
    )
    return grad_logits
