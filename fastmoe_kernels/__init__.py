"""fastmoe_kernels: a kernel-first Mixture-of-Experts layer for PyTorch.

    from fastmoe_kernels import MoELayer
    layer = MoELayer(d_model=512, d_ff=256, num_experts=64, top_k=8)
    y = layer(x)
"""
from ._version import __version__
from ._checks import set_value_checks, value_checks_enabled
from .backends import BackendUnavailableError, backend_report, describe as describe_backends
from .config import MoEConfig
from .dispatch import CapacityDispatcher, DroplessDispatcher
from .experts import GroupedExperts, SharedExperts
from .layer import MoELayer, RoutingStats, update_expert_biases
from .losses import load_balancing_loss, set_aux_loss_scale, z_loss
from .router import RouterOutput, TopKRouter
from . import ops, losses

__all__ = [
    "BackendUnavailableError",
    "CapacityDispatcher",
    "DroplessDispatcher",
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "RouterOutput",
    "RoutingStats",
    "SharedExperts",
    "TopKRouter",
    "__version__",
    "backend_report",
    "describe_backends",
    "load_balancing_loss",
    "losses",
    "ops",
    "set_aux_loss_scale",
    "set_value_checks",
    "update_expert_biases",
    "value_checks_enabled",
    "z_loss",
]
