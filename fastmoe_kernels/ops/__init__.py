"""The op layer: one function per op, each a torch.library custom op with a backward and a
fake (meta) implementation; ``backends.resolve`` picks the implementation of each kernel."""
from .grouped_gemm import grouped_gemm
from .grouped_gemm_fp8 import grouped_gemm_fp8
from . import fp8_moe_node as _fp8_moe_node  # noqa: F401  (registers the fp8 node's torch reference)
from .grouped_mlp import grouped_mlp
from .moe_mlp import moe_mlp
from .permute import permute, unpermute
from .plan import DispatchPlan, expert_capacity, make_plan, plan_for_grouped_rows
from .route_topk import route_topk
from .router_logits import router_logits
from .routing_stats import routing_stats

__all__ = [
    "DispatchPlan",
    "expert_capacity",
    "grouped_gemm",
    "grouped_gemm_fp8",
    "grouped_mlp",
    "make_plan",
    "moe_mlp",
    "permute",
    "plan_for_grouped_rows",
    "route_topk",
    "router_logits",
    "routing_stats",
    "unpermute",
]
