"""Naive implementations written only for tests: Python loops over tokens / rows, no shared code
with the package beyond reading its parameters. They are slow and obviously correct, and every
float they produce is differentiable through plain torch ops, so autograd gives the reference
gradients."""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from fastmoe_kernels.activations import as_activation


# ---- routing ----------------------------------------------------------------------------------
def route_token(logits_t, k, score="softmax", normalize=True, bias=None, num_groups=None, topk_groups=None, scaling=1.0):
    """One token: returns (list of k expert ids, tensor [k] of weights, probs [E])."""
    E = logits_t.shape[0]
    scores = torch.softmax(logits_t, 0) if score == "softmax" else torch.sigmoid(logits_t)
    if bias is None and num_groups is None:
        key = [float(v) for v in logits_t.detach()]
    else:
        b = [0.0] * E if bias is None else [float(v) for v in bias]
        key = [float(scores[e].detach()) + b[e] for e in range(E)]
    allowed = list(range(E))
    if num_groups is not None:
        size = E // num_groups
        group_score = []
        for g in range(num_groups):
            members = sorted((key[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_score.append(sum(members[: min(2, size)]))
        best = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:topk_groups]
        allowed = [e for e in range(E) if e // size in best]
    chosen = sorted(allowed, key=lambda e: (-key[e], e))[:k]
    w = torch.stack([scores[e] for e in chosen])
    if normalize:
        w = w / (w.sum() + 1e-20)
    probs = scores if score == "softmax" else scores / scores.sum()
    return chosen, w * scaling, probs


def route(logits, k, **kw):
    """All tokens: (idx [T,k] long, weight [T,k], probs [T,E]) built token by token."""
    rows = [route_token(logits[t], k, **kw) for t in range(logits.shape[0])]
    if not rows:
        E = logits.shape[1]
        return (torch.zeros(0, k, dtype=torch.long), logits.new_zeros(0, k), logits.new_zeros(0, E))
    idx = torch.tensor([r[0] for r in rows], dtype=torch.long)
    return idx, torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])


# ---- plan -------------------------------------------------------------------------------------
def capacity(T, E, k, factor):
    return math.ceil(Fraction(repr(float(factor))) * T * k / E)


def plan(idx, E, cap=None, policy="probs", weight=None, pad=False):
    """Python-loop plan: (counts, routed, offsets, row [T,k], assignment [R]) as lists/tensors."""
    T, k = idx.shape
    per_expert = [[] for _ in range(E)]
    for t in range(T):
        for j in range(k):
            if int(idx[t, j]) >= 0:  # -1: no expert
                per_expert[int(idx[t, j])].append(t * k + j)
    routed = [len(a) for a in per_expert]
    kept = []
    for e in range(E):
        assignments = per_expert[e]
        if cap is not None:
            if policy == "probs":
                flat_w = weight.reshape(-1)
                priority = sorted(assignments, key=lambda a: (-float(flat_w[a]), a))
            else:
                priority = sorted(assignments)
            assignments = sorted(priority[:cap])
        kept.append(assignments)
    counts = [len(a) for a in kept]
    row = [[-1] * k for _ in range(T)]
    if cap is None:
        R = T * k
    elif pad:
        R = E * cap
    else:
        R = min(T * k, E * cap)
    assignment = [-1] * R
    offsets = [0]
    r = 0
    for e in range(E):
        start = e * cap if pad else r
        for i, a in enumerate(kept[e]):
            row[a // k][a % k] = start + i
            assignment[start + i] = a
        r = start + len(kept[e])
        offsets.append((e + 1) * cap if pad else r)
    return counts, routed, offsets, row, assignment


# ---- data movement ----------------------------------------------------------------------------
def permute(x, assignment, k):
    rows = [x[a // k] if a >= 0 else x.new_zeros(x.shape[1]) for a in assignment]
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def unpermute(y, row, weight):
    T = len(row)
    out = []
    for t in range(T):
        acc = y.new_zeros(y.shape[1])
        for j, r in enumerate(row[t]):
            if r >= 0:
                acc = acc + weight[t, j] * y[r]
        out.append(acc)
    return torch.stack(out) if out else y.new_zeros(0, y.shape[1])


# ---- grouped GEMM -----------------------------------------------------------------------------
def grouped_gemm(a, b, offsets, trans_b=False, bias=None, widths=None, packed=None):
    """Row-by-row matrix-vector products."""
    E = len(offsets) - 1
    starts = [0]
    for w in widths or []:
        starts.append(starts[-1] + w)
    if packed == "n":
        N = max(widths)
    elif packed == "k":
        N = b.shape[0] if trans_b else b.shape[1]
    else:
        N = b.shape[1] if trans_b else b.shape[2]
    rows = []
    for r in range(a.shape[0]):
        groups = [e for e in range(E) if offsets[e] <= r < offsets[e + 1]]
        out = a.new_zeros(N)
        if groups:
            e = groups[0]
            if not packed:
                W = b[e].t() if trans_b else b[e]
                v = a[r] @ W
                if bias is not None:
                    v = v + bias[e]
            elif packed == "n":
                s, w = starts[e], widths[e]
                W = b[s:s + w].t() if trans_b else b[:, s:s + w]
                v = a[r] @ W
                if bias is not None:
                    v = v + bias[s:s + w]
            else:
                s, w = starts[e], widths[e]
                W = b[:, s:s + w].t() if trans_b else b[s:s + w]
                v = a[r, :w] @ W
                if bias is not None:
                    v = v + bias[e]
            out = torch.cat([v, a.new_zeros(N - v.shape[0])])
        rows.append(out)
    return torch.stack(rows) if rows else a.new_zeros(0, N)


# ---- whole layer ------------------------------------------------------------------------------
def _gate(x, spec):
    """act(x) from the formulas (independent of fastmoe_kernels.activations)."""
    name = spec.name
    if name in ("swiglu", "swiglu_oai", "silu"):
        x = torch.minimum(x, torch.full_like(x, spec.limit))
        return x * torch.sigmoid(spec.alpha * x)
    if name in ("geglu", "gelu"):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name in ("geglu_tanh", "gelu_tanh"):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    assert name == "relu2", name
    return torch.where(x > 0, x * x, torch.zeros_like(x))


def act(h, spec):
    """The expert activation of ``spec`` (an activations.Activation, or a name with its default
    parameters) on one token's pre-activation."""
    spec = as_activation(spec)
    if spec.gated:
        g, u = h.chunk(2)
        u = torch.maximum(torch.minimum(u, torch.full_like(u, spec.limit)), torch.full_like(u, -spec.limit))
        return _gate(g, spec) * (u + 1 if spec.name == "swiglu_oai" else u)
    return _gate(h, spec)


def expert_mlp(x_t, w_up, w_down, b_up, b_down, activation):
    h = w_up @ x_t
    if b_up is not None:
        h = h + b_up
    y = w_down @ act(h, activation)
    return y + b_down if b_down is not None else y


def moe_layer(layer, x):
    """The layer's output computed token by token from its parameters (no aux loss attached)."""
    cfg = layer.config
    d = cfg.d_model
    x2 = x.reshape(-1, d)
    T = x2.shape[0]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x2.to(compute) @ layer.router.weight.to(compute).t()
    bias = layer.router.expert_bias
    idx, weight, _ = route(
        logits, cfg.top_k, score=cfg.score_func, normalize=cfg.normalize_topk, bias=bias,
        num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, scaling=cfg.routed_scaling_factor,
    )
    cap = None if cfg.capacity_factor is None else capacity(T, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
    _, _, _, row, _ = plan(idx, cfg.num_experts, cap, cfg.drop_policy, weight.detach(), cfg.pad_to_capacity)
    outputs = []
    for t in range(T):
        acc = x2.new_zeros(d, dtype=compute)
        for j in range(cfg.top_k):
            if row[t][j] < 0:
                continue
            w_up, w_down, b_up, b_down = layer.experts.expert_weights(int(idx[t, j]))
            acc = acc + weight[t, j] * expert_mlp(x2[t], w_up, w_down, b_up, b_down, cfg.activation_spec).to(compute)
        y_t = acc.to(x.dtype)
        if layer.shared_experts is not None:
            y_t = y_t + shared_mlp(layer.shared_experts, x2[t], cfg.activation_spec)
        outputs.append(y_t)
    y = torch.stack(outputs) if outputs else x2.new_zeros(0, d)
    return y.reshape(x.shape)


def shared_mlp(shared, x_t, activation):
    """The shared experts as ``num_experts`` separate MLPs summed (checks the fused form)."""
    n, f = shared.num_experts, shared.d_ff
    hidden = n * f
    gated = activation.gated
    total = x_t.new_zeros(x_t.shape[0])
    for i in range(n):
        rows = list(range(i * f, (i + 1) * f))
        if gated:
            rows = rows + [hidden + r for r in rows]
        w_up = shared.w_up[rows]
        b_up = None if shared.b_up is None else shared.b_up[rows]
        w_down = shared.w_down[:, i * f:(i + 1) * f]
        total = total + expert_mlp(x_t, w_up, w_down, b_up, None, activation)
    if shared.b_down is not None:
        total = total + shared.b_down
    if shared.w_gate is not None:
        total = total * torch.sigmoid(shared.w_gate[0] @ x_t)
    return total


def load_balancing_loss(probs, idx, E, k, normalization="megatron", num_sequences=1):
    T = probs.shape[0]
    if T == 0:
        return probs.new_zeros(())
    S = T // num_sequences
    losses = []
    for s in range(num_sequences):
        total = probs.new_zeros(())
        for e in range(E):
            n_e = sum(1 for t in range(s * S, (s + 1) * S) for j in range(k) if int(idx[t, j]) == e)
            f_e = n_e / (S * k) if normalization == "megatron" else n_e / S
            P_e = sum(probs[t, e] for t in range(s * S, (s + 1) * S)) / S
            total = total + f_e * P_e
        losses.append(E * total)
    return sum(losses) / num_sequences


def z_loss(logits):
    T = logits.shape[0]
    return sum(torch.logsumexp(logits[t], 0) ** 2 for t in range(T)) / T
