import pytest
import torch

from fastmoe_kernels.ops import permute, unpermute
from kernel_tests.conftest import low_precision_dtypes
from kernel_tests.helpers import assert_rel, plan_for, routing

MODES = [None, (0.7, "probs", False), (1.25, "position", True)]


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("d", [1, 33, 300])
@pytest.mark.parametrize("dtype", [torch.float32, *low_precision_dtypes()])
def test_permute_unpermute_fwd_bwd(backend, device, mode, d, dtype):
    T, E, k = 53, 9, 3
    idx, weight = routing(T, E, k, device, skew=True)
    plan = plan_for(idx, weight, E, mode)
    x = torch.randn(T, d, device=device).to(dtype)
    g = torch.randn(T, d, device=device).to(dtype)
    res = {}
    for b in (backend, "torch"):
        xx = x.clone().requires_grad_()
        ww = weight.clone().requires_grad_()
        xp = permute(xx, plan, backend=b)
        y = (xp.float() * 1.5).to(dtype)
        out = unpermute(y, plan, ww, backend=b)
        (out.float() * g.float()).sum().backward()
        res[b] = (xp, out, xx.grad, ww.grad)
    for name, a, r in zip(("permute", "unpermute", "grad_x", "grad_weight"), res[backend], res["torch"]):
        assert a.dtype == r.dtype, name
        assert_rel(a, r, dtype, what=name)
