import pytest
import torch

from fastmoe_kernels.ops import route_topk
from kernel_tests.helpers import assert_rel

CASES = [(1, 1), (7, 2), (7, 7), (64, 8), (64, 1), (300, 16), (160, 32)]


@pytest.mark.parametrize("E,k", CASES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(backend, device, E, k, score, normalize):
    T = 37
    logits = (torch.randn(T, E) * 2).to(device)
    outs = {}
    for b in (backend, "torch"):
        l = logits.clone().requires_grad_()
        idx, w, p = route_topk(l, k, score, normalize, scaling_factor=1.5, return_probs=True, backend=b)
        gw = torch.linspace(-1, 1, w.numel(), device=device).view_as(w)
        gp = torch.linspace(1, -1, p.numel(), device=device).view_as(p)
        ((w * gw).sum() + (p * gp).sum()).backward()
        outs[b] = (idx, w, p, l.grad)
    k_out, ref = outs[backend], outs["torch"]
    assert torch.equal(k_out[0], ref[0])
    for name, a, r in zip(("weight", "probs", "grad_logits"), k_out[1:], ref[1:]):
        assert_rel(a, r, torch.float32, what=name)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups", [(8, 3), (4, 4), (16, 1)])
def test_bias_and_groups(backend, device, score, groups):
    T, E, k = 29, 64, 4
    G, TG = groups
    if k > TG * (E // G):
        k = TG * (E // G)
    logits = torch.randn(T, E, device=device)
    bias = (torch.randn(E) * 0.05).to(device)
    res = [route_topk(logits, k, score, True, bias, num_groups=G, topk_groups=TG, backend=b) for b in (backend, "torch")]
    assert torch.equal(res[0][0], res[1][0])
    assert_rel(res[0][1], res[1][1], torch.float32)


def test_fp16_logits_and_ties(backend, device):
    logits = torch.randn(50, 24).half().to(device)
    a = route_topk(logits, 5, backend=backend)
    b = route_topk(logits, 5, backend="torch")
    assert torch.equal(a[0], b[0]) and a[1].dtype == torch.float32
    assert_rel(a[1], b[1], torch.float32)
    ties = torch.zeros(9, 12, device=device)
    assert route_topk(ties, 3, backend=backend)[0].tolist() == [[0, 1, 2]] * 9


def test_empty(backend, device):
    idx, w = route_topk(torch.randn(0, 8, device=device), 2, backend=backend)
    assert idx.shape == (0, 2) and w.shape == (0, 2)
