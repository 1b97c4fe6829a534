"""fastmoe_kernels: a kernel-first Mixture-of-Experts layer for PyTorch.

    from fastmoe_kernels import MoELayer
    layer = MoELayer(d_model=512, d_ff=256, num_experts=64, top_k=8)
    y = layer(x)
"""
import importlib as _importlib
import sys as _sys

from ._version import __version__
from ._checks import flush_value_checks, set_value_checks, value_checks_enabled
from . import backends, tuning
from .backends import BackendUnavailableError, backend_report, describe as describe_backends, set_default_backend
from .config import MoEConfig
from .dispatch import CapacityDispatcher, DroplessDispatcher
from .experts import GroupedExperts, SharedExperts
from .layer import MoELayer, RoutingStats, update_expert_biases
from .losses import load_balancing_loss, set_aux_loss_scale, z_loss
from .router import RouterOutput, TopKRouter
from . import ops, losses

if "transformers" in _sys.modules:
    # transformers has no plugin entry points; where it is already loaded, make "fastmoe" an experts
    # implementation now (otherwise importing fastmoe_kernels.integrations.transformers does it).
    from .integrations import transformers as _transformers_integration  # noqa: F401


def _loader(module: str):
    """Import ``module`` on the first call; later calls repeat its outcome (a failed build is not retried)."""
    outcome = []

    def load():
        if not outcome:
            try:
                _importlib.import_module(module, __name__)
                outcome.append(None)
            except Exception as exc:  # reported by backends.availability
                outcome.append(exc)
        if outcome[0] is not None:
            raise outcome[0]

    return load


# The kernel backends load on first use (importing Triton, or compiling the csrc kernels, takes time).
# One extension holds both the CUDA kernels and their C++ CPU twins.
_load_csrc = _loader(".csrc_backend")
backends.add_loader("triton", _loader(".triton_backend"))
backends.add_loader("cuda", _load_csrc)
backends.add_loader("cpp", _load_csrc)
# "auto" on CUDA takes the grouped GEMMs' backend from the device's tuning table where it has the
# shape (torch's grouped matmul where it was measured fastest), else the order in AUTO_PREFERENCE.
for _kernel in ("grouped_gemm", "grouped_gemm_wgrad"):
    backends.set_auto_preference("cuda", _kernel, tuning.gemm_order(tuple(backends.AUTO_PREFERENCE["cuda"][_kernel])))

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
    "flush_value_checks",
    "load_balancing_loss",
    "losses",
    "ops",
    "set_aux_loss_scale",
    "set_default_backend",
    "set_value_checks",
    "update_expert_biases",
    "value_checks_enabled",
    "z_loss",
]
