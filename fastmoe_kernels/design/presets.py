"""Published MoE models as ``account`` arguments, with their published parameter counts.

``published`` is (total, active) as the model card or report states it (rounded there), and
``active_convention`` says whether that active count includes the input embedding ("with") or not
("without", DeepSeek's convention). MTP modules are excluded.
"""
from __future__ import annotations

from typing import Dict

from .accounting import MLA, Accounting, account

PRESETS: Dict[str, dict] = {
    "mixtral-8x7b": dict(
        args=dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=32000,
                  num_experts=8, top_k=2, d_ff=14336),
        published=(46.7e9, 12.9e9), active_convention="with"),
    "mixtral-8x22b": dict(
        args=dict(n_layers=56, d_model=6144, n_heads=48, n_kv_heads=8, head_dim=128, vocab_size=32768,
                  num_experts=8, top_k=2, d_ff=16384),
        published=(141e9, 39e9), active_convention="with"),
    "qwen3-30b-a3b": dict(
        args=dict(n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128, vocab_size=151936,
                  num_experts=128, top_k=8, d_ff=768, qk_norm="head"),
        published=(30.5e9, 3.3e9), active_convention="with"),
    "qwen3-235b-a22b": dict(
        args=dict(n_layers=94, d_model=4096, n_heads=64, n_kv_heads=4, head_dim=128, vocab_size=151936,
                  num_experts=128, top_k=8, d_ff=1536, qk_norm="head"),
        published=(235e9, 22e9), active_convention="with"),
    "olmoe-1b-7b": dict(
        args=dict(n_layers=16, d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, vocab_size=50304,
                  num_experts=64, top_k=8, d_ff=1024, qk_norm="full"),
        published=(6.9e9, 1.3e9), active_convention="with"),
    "deepseek-v2-lite": dict(
        args=dict(n_layers=27, d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, vocab_size=102400,
                  num_experts=64, top_k=6, d_ff=1408, num_shared_experts=2, shared_d_ff=1408,
                  n_dense_layers=1, dense_d_ff=10944,
                  mla=MLA(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)),
        published=(15.7e9, 2.4e9), active_convention="without"),
    "deepseek-v3": dict(
        args=dict(n_layers=61, d_model=7168, n_heads=128, n_kv_heads=128, head_dim=128, vocab_size=129280,
                  num_experts=256, top_k=8, d_ff=2048, num_shared_experts=1, shared_d_ff=2048,
                  n_dense_layers=3, dense_d_ff=18432,
                  mla=MLA(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                          v_head_dim=128)),
        published=(671e9, 37e9), active_convention="without"),
}


def preset(name: str, **overrides) -> Accounting:
    """Accounting of a published model (``overrides`` change its arguments, e.g. ``seq_len``)."""
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"preset: unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    args = dict(PRESETS[key]["args"])
    args.update(overrides)
    return account(**args)

