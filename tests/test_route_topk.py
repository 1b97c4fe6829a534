"""route_topk against the token-by-token naive router: selection, weights, probs, gradients."""
import pytest
import torch

import naive
from fastmoe_kernels.ops import route_topk
from tolerances import assert_close

CASES = [(E, k) for E in (1, 2, 7, 64) for k in (1, 2, 8, E) if k <= E]


@pytest.mark.parametrize("E,k", sorted(set(CASES)))
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_naive_forward_and_backward(E, k, score, normalize, dtype):
    T = 11
    logits = torch.randn(T, E, dtype=dtype) * 2
    scaling = 1.0 if normalize else 2.5
    ours = logits.clone().requires_grad_()
    idx, weight, probs = route_topk(ours, k, score, normalize, scaling_factor=scaling, return_probs=True)
    ref_in = logits.clone().requires_grad_()
    ref_idx, ref_weight, ref_probs = naive.route(ref_in, k, score=score, normalize=normalize, scaling=scaling)
    assert idx.dtype == torch.int32 and idx.shape == (T, k)
    assert torch.equal(idx.long(), ref_idx)
    assert_close(weight, ref_weight, dtype)
    assert_close(probs, ref_probs, dtype)
    gw, gp = torch.randn_like(weight), torch.randn_like(probs)
    ((weight * gw).sum() + (probs * gp).sum()).backward()
    ((ref_weight * gw).sum() + (ref_probs * gp).sum()).backward()
    assert_close(ours.grad, ref_in.grad, dtype)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_bias_and_groups_match_naive(score):
    T, E, k, G, TG = 9, 16, 3, 4, 2
    logits = torch.randn(T, E, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.3
    ours = logits.clone().requires_grad_()
    idx, weight = route_topk(ours, k, score, True, bias, num_groups=G, topk_groups=TG, scaling_factor=2.5)
    ref_in = logits.clone().requires_grad_()
    ref_idx, ref_weight, _ = naive.route(ref_in, k, score=score, bias=bias, num_groups=G, topk_groups=TG, scaling=2.5)
    assert torch.equal(idx.long(), ref_idx)
    # Every chosen expert lies in one of the token's topk_groups groups.
    assert int((idx.long() // (E // G)).unique(dim=None).numel()) >= 1
    for t in range(T):
        assert len(set((idx[t].long() // (E // G)).tolist())) <= TG
    assert_close(weight, ref_weight)
    g = torch.randn_like(weight)
    (weight * g).sum().backward()
    (ref_weight * g).sum().backward()
    assert_close(ours.grad, ref_in.grad)


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx, weight = route_topk(logits, 1, "sigmoid", False)
    assert idx.tolist() == [[0]]
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    idx_b, weight_b = route_topk(logits, 1, "sigmoid", False, bias)
    assert idx_b.tolist() == [[3]]
    assert torch.allclose(weight_b, torch.sigmoid(torch.tensor([[-1.0]])))


def test_ties_break_to_lower_index():
    logits = torch.zeros(3, 6)
    idx, weight = route_topk(logits, 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.allclose(weight, torch.full((3, 4), 0.25))
    bias = torch.zeros(6)
    idx_b, _ = route_topk(logits, 2, "sigmoid", True, bias, num_groups=3, topk_groups=2)
    assert idx_b.tolist() == [[0, 1]] * 3


def test_order_is_descending_key():
    logits = torch.randn(20, 10)
    idx, weight = route_topk(logits, 5, normalize=False)
    chosen = logits.gather(1, idx.long())
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
    assert torch.all(weight[:, :-1] >= weight[:, 1:])


def test_empty_batch():
    logits = torch.randn(0, 8, requires_grad=True)
    idx, weight, probs = route_topk(logits, 2, return_probs=True)
    assert idx.shape == (0, 2) and weight.shape == (0, 2) and probs.shape == (0, 8)
    (weight.sum() + probs.sum()).backward()
    assert logits.grad.shape == (0, 8)


def test_bf16_logits_route_in_fp32():
    logits = torch.randn(7, 12).bfloat16()
    idx, weight = route_topk(logits, 3)
    ref_idx, ref_weight = route_topk(logits.float(), 3)
    assert weight.dtype == torch.float32
    assert torch.equal(idx, ref_idx) and torch.equal(weight, ref_weight)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(score, normalize):
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def fn(l):
        _, w, p = route_topk(l, 2, score, normalize, scaling_factor=1.5, return_probs=True)
        return w, p

    assert torch.autograd.gradcheck(fn, (logits,))
