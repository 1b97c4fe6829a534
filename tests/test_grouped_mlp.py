"""grouped_mlp (homogeneous and heterogeneous layouts) against per-row expert MLPs."""
import pytest
import torch

import naive
from fastmoe_kernels.experts import GroupedExperts
from test_grouped_gemm import random_offsets
from tolerances import assert_close


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("widths", [(4, 4, 4, 4, 4), (3, 1, 6, 2, 5)], ids=["homogeneous", "heterogeneous"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_experts_match_per_row_mlps(activation, widths, bias, dtype):
    d, R = 6, 23
    experts = GroupedExperts(d, widths, activation, bias, dtype=dtype)
    offsets = random_offsets(R, len(widths), fill=False)
    x = torch.randn(R, d, dtype=dtype)
    x1 = x.clone().requires_grad_()
    out = experts(x1, offsets)
    x2 = x.clone().requires_grad_()
    bounds = offsets.tolist()
    rows = []
    for r in range(R):
        group = [e for e in range(len(widths)) if bounds[e] <= r < bounds[e + 1]]
        if group:
            rows.append(naive.expert_mlp(x2[r], *experts.expert_weights(group[0]), activation))
        else:
            # Rows outside every group come out as 0; `x2[r] * 0` keeps x2 in the graph even
            # when the random offsets leave every group empty (then all gradients are 0).
            rows.append(x2[r] * 0)
    ref = torch.stack(rows)
    assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x1, *experts.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x2, *experts.parameters()], allow_unused=True)
    for got, want in zip(grads, ref_grads):
        assert_close(got, torch.zeros_like(got) if want is None else want)


def test_expert_weights_views_follow_layout():
    experts = GroupedExperts(4, (2, 3), "swiglu", bias=True, dtype=torch.float64)
    w_up, w_down, b_up, b_down = experts.expert_weights(1)
    assert w_up.shape == (6, 4) and w_down.shape == (4, 3) and b_up.shape == (6,) and b_down.shape == (4,)
    # Gate rows of expert 1 are rows 2:5 of the packed gate block; its up rows follow all gate rows.
    assert torch.equal(w_up[:3], experts.w_up[2:5]) and torch.equal(w_up[3:], experts.w_up[7:10])
    assert torch.equal(w_down, experts.w_down[:, 2:5])
