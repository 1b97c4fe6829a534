"""MoE design rules: exact accounting of MoE transformers and a recommender that ranks
configurations by the design studies' findings, beside this GPU's measured layer cost.

    from fastmoe_kernels import design
    design.account(n_layers=..., d_model=..., ...).total_params
    design.preset("mixtral-8x7b").active_params
    design.recommend(memory_gb=80, max_active_params=3e9)
"""
from .accounting import MLA, Accounting, account
from .presets import PRESETS, preset
from .rules import Recommendation, SearchSpace, recommend

__all__ = ["MLA", "Accounting", "PRESETS", "Recommendation", "SearchSpace", "account", "preset", "recommend"]
