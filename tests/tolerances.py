"""Tolerances per dtype, defined once for the whole suite.

- ``TOL``: elementwise ``(atol, rtol)`` for ``torch.testing.assert_close``;
- ``REL_ERR``: bounds on the relative Frobenius error ``‖a − e‖ / ‖e‖`` of a kernel against a
  reference given the same input dtype (fp32: TF32-free fp32 dots; 16-bit: one rounding of the output
  and of intermediates).
"""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
REL_ERR = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def tol(dtype: torch.dtype) -> dict:
    return TOL[dtype]


def assert_close(actual, expected, dtype=None, **override):
    dtype = dtype or expected.dtype
    kw = {**TOL[dtype], **override}
    torch.testing.assert_close(actual.to(expected.dtype), expected, **kw)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − e‖ / ‖e‖, with ‖e‖ floored at 1e-3 per element: a result that is zero up to rounding
    (e.g. a gradient through a normalisation over one expert) is compared absolutely."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values (an unwritten, poisoned element?)"
    floor = 1e-3 * max(e.numel(), 1) ** 0.5
    return float((a - e).norm() / max(float(e.norm()), floor))


def assert_rel(actual, expected, dtype, scale=1.0, what=""):
    err = rel_err(actual, expected)
    assert err <= REL_ERR[dtype] * scale, f"{what}: relative error {err:.2e} > {REL_ERR[dtype] * scale:.1e}"
