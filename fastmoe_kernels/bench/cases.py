"""One benchmark configuration and its accounting.

FLOP convention (DESIGN-RULES.md, the kernels' benchmark convention): a gated expert MLP costs
``6·T·k·d·f`` forward and ``18·T·k·d·f`` forward+backward (4·… and 12·… for non-gated ones);
shared experts add the same per token with k = 1 and their width; the router (``2·T·d·E``) is
left out of the FLOPs but not out of the time. Bytes are the fewest an op must move: each input
read once, each output written once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch

from ..activations import is_gated
from ..config import MoEConfig
from ..ops.plan import expert_capacity

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class BenchCase:
    sweep: str                 # the axis this case belongs to ("experts", "top_k", …, "base")
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    dtype: str = "bfloat16"
    capacity_factor: Optional[float] = None
    num_shared_experts: int = 0
    shared_d_ff: Optional[int] = None
    activation: str = "swiglu"
    score_func: str = "softmax"
    num_groups: Optional[int] = None   # group-limited routing (DeepSeek-V3): groups, and groups kept
    topk_groups: Optional[int] = None
    routed_scaling_factor: float = 1.0
    label: str = ""                    # the model whose layer shape this is ("Qwen3-30B-A3B", …)
    inference_only: bool = False       # decode: forward without autograd only
    fp8_recipe: Optional[str] = None   # "blockwise": the experts' GEMMs in fp8 (MoEConfig.fp8_recipe)
    graphed: bool = False              # also time the triton layer replayed from CUDA graphs (model shapes)

    @property
    def name(self) -> str:
        parts = [self.label] if self.label else []
        parts += [f"T{self.tokens}", f"d{self.d_model}", f"f{self.d_ff}", f"E{self.num_experts}", f"k{self.top_k}", self.dtype]
        if self.capacity_factor is not None:
            parts.append(f"cf{self.capacity_factor}")
        if self.num_shared_experts:
            parts.append(f"shared{self.num_shared_experts}x{self.shared_d_ff or self.d_ff}")
        if self.activation != "swiglu":
            parts.append(self.activation)
        if self.score_func != "softmax":
            parts.append(self.score_func)
        if self.num_groups:
            parts.append(f"g{self.num_groups}of{self.topk_groups}")
        if self.fp8_recipe:
            parts.append(f"fp8{self.fp8_recipe}")
        if self.inference_only:
            parts.append("infer")
        return "-".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gated(self) -> bool:
        return is_gated(self.activation)

    def config(self, **overrides) -> MoEConfig:
        fields = dict(
            d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts, top_k=self.top_k,
            activation=self.activation, capacity_factor=self.capacity_factor,
            num_shared_experts=self.num_shared_experts, shared_d_ff=self.shared_d_ff, aux_loss_coeff=1e-2,
            score_func=self.score_func, num_groups=self.num_groups, topk_groups=self.topk_groups,
            routed_scaling_factor=self.routed_scaling_factor, expert_bias=self.score_func == "sigmoid",
            fp8_recipe=self.fp8_recipe,
        )
        fields.update(overrides)
        return MoEConfig(**fields)

    # ---- accounting -----------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        return self.num_experts / self.top_k

    @property
    def rows(self) -> int:
        """Rows of the permuted layout (kept assignments, at most)."""
        if self.capacity_factor is None:
            return self.tokens * self.top_k
        cap = expert_capacity(self.tokens, self.num_experts, self.top_k, self.capacity_factor)
        return min(self.tokens * self.top_k, self.num_experts * cap)

    @property
    def compares_baselines(self) -> bool:
        """Whether the baselines run on this case: they are dropless and bf16/fp16/fp32 only."""
        return self.capacity_factor is None and not self.fp8_recipe

    def graphed_modes(self) -> tuple:
        """The modes the CUDA-graphed layer is timed in (``graphed`` cases): the forward, and the training
        step unless its graphs would hold a second copy of a large step's buffers (the capture's private
        pool: the experts' weights past 8 GB, DeepSeek-V3's 22.5 GB), or fp8 (the weight cache's
        per-update quantisation is host-side state a replay would skip)."""
        if not self.graphed or self.fp8_recipe:
            return ()
        if self.inference_only or self.num_experts * self.expert_bytes() > 8e9:
            return ("fwd",)
        return ("fwd", "fwd+bwd")

    @property
    def breaks_down_ops(self) -> bool:
        """Whether this case can have its op-by-op breakdown: a training case whose ops are the
        layer's own (the fp8 layer's products are not the bf16 ops that the breakdown times)."""
        return not self.inference_only and not self.fp8_recipe

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (three matrices when gated, two otherwise)."""
        return (3 if self.gated else 2) * self.d_model * self.d_ff

    @property
    def shared_params(self) -> int:
        """Parameters of all the shared experts."""
        return self.num_shared_experts * (3 if self.gated else 2) * self.d_model * (self.shared_d_ff or self.d_ff)

    def routed_flops(self, backward: bool = False) -> float:
        """FLOPs of the routed experts (k per token)."""
        return 2.0 * self.tokens * self.top_k * self.expert_params * (3 if backward else 1)

    def expert_flops(self, backward: bool = False) -> float:
        """FLOPs of the routed and the shared experts: the layer's FLOPs by the benchmark convention."""
        return self.routed_flops(backward) + 2.0 * self.tokens * self.shared_params * (3 if backward else 1)

    def gemm_flops(self, which: str, backward: bool = False) -> float:
        """FLOPs of the grouped up ("up") or down ("down") projection over the permuted rows."""
        m = 2 if self.gated else 1
        width = m * self.d_ff if which == "up" else self.d_ff
        return 2.0 * self.rows * self.d_model * width * (3 if backward else 1)

    def params(self) -> Dict[str, int]:
        always = self.shared_params + self.d_model * self.num_experts  # shared experts and the router
        return {
            "total_params": self.num_experts * self.expert_params + always,
            "active_params": self.top_k * self.expert_params + always,
        }

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights."""
        return self.expert_params * self.elem_bytes()

    def forward_bytes(self, touched_experts: int) -> int:
        """Fewest bytes a forward must move: the touched experts' weights, the shared experts' and the
        router's, the tokens in and out. What bounds a small batch (decode). With an fp8 recipe the routed
        experts' weights are read as the weight cache holds them: e4m3, one fp32 scale per 128×128 block."""
        always = self.shared_params + self.d_model * self.num_experts + 2 * self.tokens * self.d_model
        if self.fp8_recipe:
            return touched_experts * self.expert_params * (1 + 4 / 128 ** 2) + always * self.elem_bytes()
        return (touched_experts * self.expert_params + always) * self.elem_bytes()

    def elem_bytes(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    def as_dict(self) -> Dict[str, object]:
        out = asdict(self)
        out["case"] = self.name
        out["sparsity"] = self.sparsity
        out.update(self.params())
        return out
