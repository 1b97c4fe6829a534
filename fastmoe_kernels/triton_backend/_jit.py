"""Device code shared by the Triton kernels: activations and the grouped tile table."""
import triton
import triton.language as tl

# Activation codes (see _common.activation_code): 0 none, 1 x·σ(α·x) on x clamped above at limit
# (SiLU, SwiGLU and its clamped variants), 2 GELU (GeGLU), 3 GELU, 4 ReLU, 5 GELU with the tanh
# approximation, 6 ReLU². Gated activations multiply by up_fwd(up) outside these helpers. alpha and
# limit are runtime floats (limit inf: no clamp).
# GELU's tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), √(2/π) = 0.7978845608028654.


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def act_fwd(x, ACT: tl.constexpr, alpha, limit):
    if ACT == 1:
        xc = tl.minimum(x, limit)
        return xc * tl.sigmoid(alpha * xc)
    elif ACT == 2 or ACT == 3:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 4:
        return tl.maximum(x, 0.0)
    elif ACT == 5:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 6:
        r = tl.maximum(x, 0.0)
        return r * r
    else:
        return x


@triton.jit
def act_grad(x, ACT: tl.constexpr, alpha, limit):
    """d act(x) / dx (0 where the clamp holds x at the limit, as torch.clamp's gradient)."""
    if ACT == 1:
        xc = tl.minimum(x, limit)
        s = tl.sigmoid(alpha * xc)
        return tl.where(x <= limit, s * (1.0 + alpha * xc * (1.0 - s)), 0.0)
    elif ACT == 2 or ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 4:
        return tl.where(x > 0, 1.0, 0.0)
    elif ACT == 5:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 6:
        return 2.0 * tl.maximum(x, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def up_fwd(u, limit, up_offset):
    """The up half's factor of a gated activation: clamp(u, -limit, limit) + up_offset."""
    return tl.minimum(tl.maximum(u, -limit), limit) + up_offset


@triton.jit
def up_grad(u, limit):
    return tl.where((u >= -limit) & (u <= limit), 1.0, 0.0)


@triton.jit
def gated_grads(d_act, gate, up, ACT: tl.constexpr, alpha, limit, up_offset):
    """(d gate, d up) of ``act(gate) · up'(up)`` for ``d_act``, its output's gradient."""
    d_gate = d_act * up_fwd(up, limit, up_offset) * act_grad(gate, ACT, alpha, limit)
    d_up = d_act * act_fwd(gate, ACT, alpha, limit) * up_grad(up, limit)
    return d_gate, d_up


@triton.jit
def group_table(offsets_ptr, num_rows, E, E_PAD: tl.constexpr, BM: tl.constexpr):
    """Per-expert row ranges and their M tiles, computed once per program.

    Returns (expert ids [E_PAD], first row [E_PAD], end row [E_PAD], M tiles [E_PAD], inclusive cumsum
    of M tiles). Computing this in the kernel (instead of on the host) lets the autotuner pick BM
    freely and keeps the launch free of device→host syncs. The ranges are clamped to
    ``[0, num_rows]``: offsets that a value check would reject (it may run after the kernel, see
    _checks.py) give undefined values, never an access out of bounds.
    """
    e = tl.arange(0, E_PAD)
    emask = e < E
    lo = tl.load(offsets_ptr + e, mask=emask, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=emask, other=0)
    lo = tl.minimum(tl.maximum(lo, 0), num_rows)
    hi = tl.minimum(tl.maximum(hi, lo), num_rows)
    m_tiles = tl.where(hi > lo, (hi - lo + BM - 1) // BM, 0)
    return e, lo, hi, m_tiles, tl.cumsum(m_tiles, 0)


@triton.jit
def pick(vec, e_range, e):
    """vec[e] for a per-expert vector held in registers."""
    return tl.sum(tl.where(e_range == e, vec, 0), 0)


@triton.jit
def gather_rows(index_ptr, rows, rmask, num_src, DIV: tl.constexpr, INDEXED: tl.constexpr):
    """(int64 rows to access, valid): ``index[r] // DIV`` when INDEXED, else the rows. An index below 0
    (none) or past the ``num_src`` rows it points into (a plan changed after it was made, say) is not
    valid: nothing is read or written for it."""
    if INDEXED:
        idx = tl.load(index_ptr + rows, mask=rmask, other=-1)
        valid = rmask & (idx >= 0) & (idx // DIV < num_src)
        return tl.where(valid, idx // DIV, 0).to(tl.int64), valid
    else:
        return rows.to(tl.int64), rmask


@triton.jit
def load_activated(x_ptr, rows, valid, stride_xm, cols, cmask, up_col, col_step, alpha, limit, up_offset,
                   ACT: tl.constexpr, GATED: tl.constexpr):
    """An fp32 tile of x[rows, cols] (ACT 0), or of act(x) computed from x's gate (and up) columns
    ``col_step·c`` (and ``col_step·c + up_col``) and rounded to x's dtype, as the activation's output
    would be stored: the fp8 quantisers read the activation from the pre-activation h this way, so
    that act(h) is never written. Masked elements are 0 (act(0) = 0 for every activation)."""
    ptrs = x_ptr + rows[:, None] * stride_xm + (cols * col_step)[None, :]
    mask = valid[:, None] & cmask[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        x = act_fwd(x, ACT, alpha, limit)
        if GATED:
            x = x * up_fwd(tl.load(ptrs + up_col, mask=mask, other=0.0).to(tl.float32), limit, up_offset)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def store_activation_grad(dh_ptr, h_ptr, rows, valid, cols, N_OUT, stride_m, up_col, col_step, d_act,
                          alpha, limit, up_offset, ACT: tl.constexpr, GATED: tl.constexpr):
    """dh at the gate (and up) columns of h for ``d_act``, the gradient of act(h)[rows, cols]; h and
    dh share one layout (see load_activated)."""
    mask = valid[:, None] & (cols < N_OUT)[None, :]
    offs = rows[:, None] * stride_m + (cols * col_step)[None, :]
    gate = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(h_ptr + offs + up_col, mask=mask, other=0.0).to(tl.float32)
        d_gate, d_up = gated_grads(d_act, gate, up, ACT, alpha, limit, up_offset)
        tl.store(dh_ptr + offs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + offs + up_col, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dh_ptr + offs, (d_act * act_grad(gate, ACT, alpha, limit)).to(dh_ptr.dtype.element_ty), mask=mask)
