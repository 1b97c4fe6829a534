"""Exact parameter and FLOP accounting of an MoE transformer — the constraint triad (FLOPs/token,
active parameters, total parameters) of Wan et al. (2026), arXiv 2603.21862.

Per layer, with n_h query heads, n_kv key/value heads and head dimension h (DESIGN-RULES.md):

- attention ``2·d·n_h·h + 2·d·n_kv·h`` (q, o, k, v); DeepSeek's multi-head latent attention
  ``d·q_r + q_r·n_h·(nope+rope) + d·(kv_r+rope) + kv_r·n_h·(nope+v) + n_h·v·d`` (+ its two norms);
- routed experts ``E·m·d·f`` (m = 3 gated, 2 otherwise; heterogeneous: ``m·d·Σ f_e``), of which
  ``k·m·d·f`` are active (heterogeneous: k times the mean width, i.e. balanced routing);
- shared experts ``n_shared·m·d·f_shared``, router ``d·E``, norms ``2·d`` — all active;
- dense layers (the first ``n_dense_layers``) ``m·d·f_dense`` instead of the MoE block;
- embeddings ``V·d``, twice when input and output embeddings are untied.

FLOPs per token, forward: ``2·(N_active − input embedding) + attention scores`` with the output
projection inside N_active (``2·d·V`` when tied); attention scores ``2·ctx·n_h·(qk_dim + v_dim)``
per layer, ctx = seq_len, or (seq_len+1)/2 — exactly the mean — with a causal mask. Training ≈ 3×.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

Width = Union[int, Sequence[int]]


@dataclass(frozen=True)
class MLA:
    """DeepSeek's multi-head latent attention dimensions (q_lora_rank None: a plain q projection)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None

    def params(self, d: int, n_heads: int) -> int:
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = d * self.q_lora_rank + self.q_lora_rank * n_heads * qk + self.q_lora_rank if self.q_lora_rank else d * n_heads * qk
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + n_heads * self.v_head_dim * d


@dataclass
class Accounting:
    """Totals and their breakdown by component (parameters; FLOPs per token)."""

    total_params: int
    active_params: int
    flops_per_token: float
    training_flops_per_token: float
    breakdown: Dict[str, int] = field(default_factory=dict)
    active_breakdown: Dict[str, int] = field(default_factory=dict)
    flops_breakdown: Dict[str, float] = field(default_factory=dict)
    num_experts: int = 0
    top_k: int = 0
    d_model: int = 0
    d_ff_mean: float = 0.0

    @property
    def active_params_excluding_input_embedding(self) -> int:
        """The convention of DeepSeek's reports (the embedding lookup does no arithmetic)."""
        return self.active_params - self.breakdown.get("input_embedding", 0)

    @property
    def sparsity(self) -> float:
        """s = n_exp / n_topk (Liew et al. 2026)."""
        return self.num_experts / self.top_k if self.top_k else float("inf")

    @property
    def granularity_krajewski(self) -> float:
        """G = 4·d / d_expert: the dense FFN width over the expert width (Krajewski et al. 2024)."""
        return 4 * self.d_model / self.d_ff_mean if self.d_ff_mean else float("inf")

    @property
    def granularity_liew(self) -> float:
        """G = d_model / d_expert (Liew et al. 2026) — 4× smaller than Krajewski's G."""
        return self.d_model / self.d_ff_mean if self.d_ff_mean else float("inf")

    def summary(self) -> str:
        return (f"total {self.total_params / 1e9:.2f}B, active {self.active_params / 1e9:.2f}B "
                f"({self.active_params_excluding_input_embedding / 1e9:.2f}B without the input embedding), "
                f"{self.flops_per_token / 1e9:.2f} GFLOP/token forward, sparsity {self.sparsity:.3g}, "
                f"granularity {self.granularity_krajewski:.3g} (4d/f) = {self.granularity_liew:.3g} (d/f)")


def account(
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    num_experts: int,
    top_k: int,
    d_ff: Width,
    num_shared_experts: int = 0,
    shared_d_ff: Optional[int] = None,
    n_dense_layers: int = 0,
    dense_d_ff: Optional[int] = None,
    tie_embeddings: bool = False,
    gated: bool = True,
    seq_len: int = 4096,
    causal: bool = True,
    mla: Optional[MLA] = None,
    qk_norm: Optional[str] = None,
) -> Accounting:
    """Account an MoE transformer (names as in MoEConfig; see the module docstring for the formulas).

    ``qk_norm``: None, "head" (per-head q/k RMSNorm, 2·h weights, Qwen3) or "full" (over all heads,
    (n_h + n_kv)·h weights, OLMoE).
    """
    if not 0 <= n_dense_layers <= n_layers:
        raise ValueError(f"account: `n_dense_layers` must be in [0, n_layers={n_layers}], got {n_dense_layers}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"account: `top_k` must be in [1, num_experts={num_experts}], got {top_k}")
    d, L, V = d_model, n_layers, vocab_size
    m = 3 if gated else 2
    widths = [int(d_ff)] * num_experts if isinstance(d_ff, int) else [int(w) for w in d_ff]
    if len(widths) != num_experts:
        raise ValueError(f"account: `d_ff` needs {num_experts} widths, got {len(widths)}")
    mean_width = sum(widths) / num_experts
    moe_layers = L - n_dense_layers

    if mla is not None:
        attention = mla.params(d, n_heads)
        qk_dim, v_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim
    else:
        attention = 2 * d * n_heads * head_dim + 2 * d * n_kv_heads * head_dim
        qk_dim = v_dim = head_dim
    if qk_norm == "head":
        attention += 2 * head_dim
    elif qk_norm == "full":
        attention += (n_heads + n_kv_heads) * head_dim
    elif qk_norm is not None:
        raise ValueError(f"account: `qk_norm` must be None, 'head' or 'full', got {qk_norm!r}")

    routed_total = m * d * sum(widths)
    routed_active = int(round(top_k * m * d * mean_width))
    shared = num_shared_experts * m * d * (shared_d_ff if shared_d_ff is not None else widths[0]) if num_shared_experts else 0
    router = d * num_experts
    dense = m * d * (dense_d_ff or 0)
    if n_dense_layers and not dense_d_ff:
        raise ValueError("account: `dense_d_ff` is needed with n_dense_layers > 0")
    norms = 2 * d

    embeddings_in = V * d
    embeddings_out = 0 if tie_embeddings else V * d
    breakdown = {
        "attention": L * attention,
        "routed_experts": moe_layers * routed_total,
        "shared_experts": moe_layers * shared,
        "router": moe_layers * router,
        "dense_mlp": n_dense_layers * dense,
        "norms": L * norms + d,
        "input_embedding": embeddings_in,
        "output_embedding": embeddings_out,
    }
    active_breakdown = dict(breakdown, routed_experts=moe_layers * routed_active)
    total = sum(breakdown.values())
    active = sum(active_breakdown.values())

    context = (seq_len + 1) / 2 if causal else seq_len
    attention_scores = 2.0 * L * context * n_heads * (qk_dim + v_dim)
    # The output projection is a matmul even when tied to the input embedding, which is a lookup.
    matmul_active = active - embeddings_in + (V * d if tie_embeddings else 0)
    flops_breakdown = {
        "matmuls": 2.0 * matmul_active,
        "attention_scores": attention_scores,
    }
    flops = sum(flops_breakdown.values())
    return Accounting(
        total_params=total, active_params=active, flops_per_token=flops, training_flops_per_token=3 * flops,
        breakdown=breakdown, active_breakdown=active_breakdown, flops_breakdown=flops_breakdown,
        num_experts=num_experts, top_k=top_k, d_model=d, d_ff_mean=mean_width,
    )


def head_layout(d_model: int, head_dim: int = 128, gqa_ratio: int = 4) -> Dict[str, int]:
    """A conventional head layout for a width: head_dim 128 (64 below d = 1024), GQA groups of 4."""
    h = head_dim if d_model >= 1024 else 64
    n_heads = max(1, d_model // h)
    return {"n_heads": n_heads, "n_kv_heads": max(1, n_heads // gqa_ratio), "head_dim": h}


def round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)
