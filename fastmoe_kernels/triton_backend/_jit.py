"""Device code shared by the Triton kernels: activations and the grouped tile table."""
import triton
import triton.language as tl

# Activation codes (see _common.ACTIVATION_CODES): 0 none, 1 SiLU (SwiGLU), 2 GELU (GeGLU),
# 3 GELU, 4 ReLU. Gated activations multiply by the up half outside these helpers.


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    if ACT == 1:
        return x * tl.sigmoid(x)
    elif ACT == 2 or ACT == 3:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 4:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx."""
    if ACT == 1:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACT == 2 or ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 4:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


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
