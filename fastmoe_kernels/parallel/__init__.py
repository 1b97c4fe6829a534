"""Expert parallelism: experts sharded over a torch.distributed process group.

    layer = MoELayer(config, expert_parallel_group=group)      # this rank's shard, fresh weights
    shard = full_layer.to_expert_parallel(group)                # this rank's shard of a full layer
    full = shard.gather_full()                                  # back to a full layer (on every rank)

Expert parameters carry ``param.fastmoe_expert_parallel = True``: with data parallelism or FSDP
over the same ranks, all-reduce (or shard) them only among the ranks that hold the same experts,
never across the expert-parallel group; the router, shared experts and the rest of the model are
replicated and reduced as usual. :func:`expert_parameters` / :func:`replicated_parameters` split a
model's parameters that way.
"""
from typing import Iterator

from torch import nn

from .expert_parallel import ExpertParallelError, ExpertParallelExchange, all_to_all, local_expert_range


def is_expert_parameter(param: nn.Parameter) -> bool:
    return bool(getattr(param, "fastmoe_expert_parallel", False))


def expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters sharded by expert parallelism (reduce them within expert-data-parallel groups only)."""
    return (p for p in model.parameters() if is_expert_parameter(p))


def replicated_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every other parameter (reduce over all data-parallel ranks, the expert-parallel ones included)."""
    return (p for p in model.parameters() if not is_expert_parameter(p))


__all__ = ["ExpertParallelError", "ExpertParallelExchange", "all_to_all", "expert_parameters", "is_expert_parameter", "local_expert_range",
           "replicated_parameters"]
