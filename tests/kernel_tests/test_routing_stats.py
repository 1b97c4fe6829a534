import pytest
import torch

from fastmoe_kernels.ops import routing_stats
from kernel_tests.helpers import assert_rel, routing


@pytest.mark.parametrize("E,k", [(1, 1), (9, 2), (128, 8), (500, 4)])
@pytest.mark.parametrize("segments", [1, 3])
def test_matches_reference(backend, device, E, k, segments):
    T = 45
    idx, _ = routing(T, E, k, device, skew=True)
    probs = torch.softmax(torch.randn(T, E, device=device), -1)
    a = routing_stats(probs, idx, segments, backend=backend)
    b = routing_stats(probs, idx, segments, backend="torch")
    assert torch.equal(a[0], b[0])
    assert_rel(a[1], b[1], torch.float32)
