"""The kernels never read or write out of bounds, whatever the indices they are given: a plan changed
after make_plan, with value checks on or off. Each case runs in its own process, so that a crash is a
test failure and not a lost run."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import os, sys, torch
from fastmoe_kernels import set_value_checks
from fastmoe_kernels.experts import GroupedExperts
from fastmoe_kernels.ops import make_plan, permute, unpermute
backend, device, field, value = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
set_value_checks(sys.argv[5])
T, E, k, d = 9, 4, 2, 16
idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().to(device)
plan = make_plan(idx, E, backend="torch")
getattr(plan, field).view(-1)[0] = value  # tampered after creation
x = torch.randn(T, d, device=device, requires_grad=True)
weight = torch.rand(T, k, device=device, requires_grad=True)
y = unpermute(permute(x, plan, backend=backend), plan, weight, backend=backend)
experts = GroupedExperts(d, (16,) * E, "swiglu", bias=True, device=device)
z = experts.forward_tokens(x, plan, weight, backend=backend)
(y.sum() + z.sum()).backward()
print("FINITE", bool(torch.isfinite(y).all() and torch.isfinite(z).all() and torch.isfinite(x.grad).all()))
"""


@pytest.mark.parametrize("field,value", [("assignment", 2**30), ("assignment", -5), ("row", 2**30), ("row", 17)])
@pytest.mark.parametrize("checks", ["sync", "off"])
def test_a_plan_changed_after_creation_is_never_read_out_of_bounds(backend, device, field, value, checks):
    env = dict(os.environ, FASTMOE_POISON="0")
    probe = subprocess.run([sys.executable, "-c", PROBE, backend, device.type, field, str(value), checks],
                           capture_output=True, text=True, env=env, timeout=600)
    assert probe.returncode == 0, f"crashed ({probe.returncode}): {probe.stderr[-3000:]}"
    assert "FINITE True" in probe.stdout, probe.stdout + probe.stderr[-2000:]
