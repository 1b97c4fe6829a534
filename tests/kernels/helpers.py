"""Shared helpers of the kernel tests."""
import torch

# Kernel vs reference, same input dtype: relative Frobenius error bounds per dtype. The fp32 bound
# covers TF32-free fp32 dots; 16-bit bounds cover one rounding of the output and of intermediates.
REL_ERR = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


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
