"""Tolerances per dtype, defined once for the whole suite: (atol, rtol) for torch.testing.assert_close."""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOL[dtype]


def assert_close(actual, expected, dtype=None, **override):
    dtype = dtype or expected.dtype
    kw = {**TOL[dtype], **override}
    torch.testing.assert_close(actual.to(expected.dtype), expected, **kw)
