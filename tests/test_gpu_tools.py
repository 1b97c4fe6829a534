"""What the GPU run's tools compute without a GPU: the fused-or-not default, the profile's FLOP plans."""
import os
import sys

import pytest
import torch

from fastmoe_kernels.bench.grids import model_cases
from fastmoe_kernels.ops.moe_mlp import default_fusion

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_profile  # noqa: E402

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_a_training_step_on_a_gpu_takes_the_composition_by_default():
    assert default_fusion(None, True, CUDA) is False
    assert default_fusion(None, False, CUDA) is None  # inference: the fused kernels
    assert default_fusion(None, True, CPU) is None  # the CPU's choice was measured apart
    assert default_fusion(True, True, CUDA) is True  # what the user asked for stands
    assert default_fusion(False, False, CUDA) is False


@pytest.mark.parametrize("case", model_cases(tokens=256), ids=lambda c: c.label)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_every_flop_plan_of_the_profile_counts_the_layers_expert_flops(case, mode):
    plans = gpu_profile.gemm_flop_plans(case, mode)
    routed = case.routed_flops(mode == "fwd+bwd")
    for path, plan in plans.items():
        assert sum(flops for _, flops in plan.values()) == pytest.approx(routed), path


def test_the_profile_takes_the_plan_whose_launch_counts_it_saw():
    case = model_cases(tokens=256)[0]
    composition = {"_grouped_matmul_kernel": 4.0, "_grouped_wgrad_kernel": 2.0, "_gather_kernel": 2.0}
    assert gpu_profile.gemm_flops(case, "fwd+bwd", composition) == gpu_profile.gemm_flop_plans(case, "fwd+bwd")["composition"]
    fused = {"_up_projection_kernel": 1.0, "_grouped_matmul_kernel": 2.0, "_activation_backward_kernel": 1.0,
             "_grouped_wgrad_kernel": 3.0}
    assert gpu_profile.gemm_flops(case, "fwd+bwd", fused) == gpu_profile.gemm_flop_plans(case, "fwd+bwd")["fused"]
    assert gpu_profile.gemm_flops(case, "fwd+bwd", {"_grouped_matmul_kernel": 3.0}) == {}
