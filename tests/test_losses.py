"""routing_stats and the losses on hand-computed cases, the naive loop, and their gradients."""
import math

import pytest
import torch

import naive
from fastmoe_kernels import losses
from fastmoe_kernels.ops import route_topk, routing_stats
from tolerances import assert_close


def test_balanced_routing_gives_one_and_k():
    T, E, k = 16, 8, 2
    idx = torch.stack([torch.tensor([(2 * t) % E, (2 * t + 1) % E]) for t in range(T)])
    probs = torch.full((T, E), 1 / E)
    assert math.isclose(float(losses.load_balancing_loss(probs, idx)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(losses.load_balancing_loss(probs, idx, normalization="mixtral")), k, rel_tol=1e-6)
    # Balanced counts give exactly 1 whatever the probabilities.
    skewed = torch.softmax(torch.randn(T, E), -1)
    assert math.isclose(float(losses.load_balancing_loss(skewed, idx)), 1.0, rel_tol=1e-6)


def test_hand_computed_case():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64)
    idx = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.55, 0.45]: L = 2 · (1 · 0.55) = 1.1 (k = 1: both conventions agree).
    assert math.isclose(float(losses.load_balancing_loss(probs, idx)), 1.1)
    assert math.isclose(float(losses.load_balancing_loss(probs, idx, normalization="mixtral")), 1.1)
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    idx3 = torch.tensor([[0, 1], [1, 2]])
    # n = [1, 2, 1], T·k = 4: f = [.25, .5, .25], P = [.3, .45, .25] → 3·(.075+.225+.0625) = 1.0875
    assert math.isclose(float(losses.load_balancing_loss(probs3, idx3)), 1.0875)
    assert math.isclose(float(losses.load_balancing_loss(probs3, idx3, normalization="mixtral")), 2 * 1.0875)
    assert math.isclose(float(losses.load_balancing_loss(probs3, idx3, coeff=0.01)), 0.010875)


def test_z_loss_hand_computed():
    logits = torch.zeros(5, 4)
    assert math.isclose(float(losses.z_loss(logits)), math.log(4) ** 2, rel_tol=1e-6)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert math.isclose(float(losses.z_loss(logits, coeff=2.0)), 2 * math.log(4) ** 2, rel_tol=1e-6)


@pytest.mark.parametrize("normalization", ["megatron", "mixtral"])
@pytest.mark.parametrize("num_sequences", [1, 3])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_matches_naive_with_gradients(normalization, num_sequences, score):
    T, E, k = 12, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64)
    l1 = logits.clone().requires_grad_()
    idx, _, probs = route_topk(l1, k, score, return_probs=True)
    loss = losses.load_balancing_loss(probs, idx, normalization=normalization, num_sequences=num_sequences)
    l2 = logits.clone().requires_grad_()
    ref_idx, _, ref_probs = naive.route(l2, k, score=score)
    ref = naive.load_balancing_loss(ref_probs, ref_idx, E, k, normalization, num_sequences)
    assert_close(loss, ref)
    loss.backward()
    ref.backward()
    assert_close(l1.grad, l2.grad)
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    losses.z_loss(z1).backward()
    naive.z_loss(z2).backward()
    assert_close(z1.grad, z2.grad)


def test_per_sequence_is_mean_of_sequences():
    T, E, k = 8, 4, 1
    probs = torch.softmax(torch.randn(T, E, dtype=torch.float64), -1)
    idx = torch.randint(0, E, (T, k))
    whole = losses.load_balancing_loss(probs, idx, num_sequences=2)
    halves = (losses.load_balancing_loss(probs[:4], idx[:4]) + losses.load_balancing_loss(probs[4:], idx[4:])) / 2
    assert math.isclose(float(whole), float(halves), rel_tol=1e-12)


def test_routing_stats_counts_and_gradient():
    probs = torch.softmax(torch.randn(6, 3, dtype=torch.float64), -1).requires_grad_()
    idx = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1], [0, 1], [2, 1]])
    tokens, prob_mean = routing_stats(probs, idx, 2)
    assert tokens.tolist() == [[2, 2, 2], [2, 3, 1]]
    assert_close(prob_mean, probs.detach().view(2, 3, 3).mean(1))
    assert torch.autograd.gradcheck(lambda p: routing_stats(p, idx, 2)[1], (probs,))


def test_empty_batch_losses_are_zero():
    probs = torch.zeros(0, 4)
    idx = torch.zeros(0, 2, dtype=torch.long)
    assert float(losses.load_balancing_loss(probs, idx)) == 0.0
    assert float(losses.z_loss(torch.zeros(0, 4))) == 0.0


def test_expert_bias_rule():
    counts = torch.tensor([10.0, 2.0, 6.0, 6.0])
    delta = losses.expert_bias_delta(counts, 0.01)
    assert delta.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_auto_scaler_injects_gradient_and_scale():
    x = torch.randn(3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    aux = w ** 2
    y = losses.attach_aux_loss(x * 1.0, aux)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(3)) and math.isclose(float(w.grad), 4.0)
    w.grad = None
    losses.set_aux_loss_scale(0.5)
    try:
        losses.attach_aux_loss(x * 1.0, w ** 2).sum().backward()
    finally:
        losses.set_aux_loss_scale(1.0)
    assert math.isclose(float(w.grad), 2.0)
