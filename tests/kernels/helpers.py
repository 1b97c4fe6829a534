"""Shared helpers of the kernel tests."""
import torch

from tolerances import REL_ERR, assert_rel, rel_err  # noqa: F401  (the suite's one table)


def routing(T, E, k, device, skew=False):
    p = (torch.rand(E) ** 6 + 1e-3) if skew else torch.ones(E)
    if T == 0:
        idx = torch.zeros(0, k, dtype=torch.long)
    else:
        idx = torch.stack([torch.multinomial(p, k, replacement=False) for _ in range(T)])
    return idx.to(torch.int32).to(device), torch.rand(T, k, device=device)


def plan_for(idx, weight, num_experts, mode):
    """A plan for ``mode``: None (dropless) or (capacity_factor, drop_policy, pad)."""
    from fastmoe_kernels.ops import expert_capacity, make_plan

    if mode is None:
        return make_plan(idx, num_experts)
    T, k = idx.shape
    return make_plan(idx, num_experts, expert_capacity(T, num_experts, k, mode[0]), mode[1], weight, mode[2])
