"""Design accounting against published models and hand-computed cases; the recommender's rules."""

import pytest

from fastmoe_kernels import design
from fastmoe_kernels.design import MLA, account, preset, recommend
from fastmoe_kernels.design.cli import main as design_main
from fastmoe_kernels.design.presets import PRESETS
from fastmoe_kernels.design.rules import MeasuredCost, SearchSpace, rank


def _rounding_tolerance(published: float) -> float:
    """Half a unit of the last published digit (3.3B → ±0.05B), plus 0.5% for the formulas."""
    digits = f"{published / 1e9:g}"
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return 0.5 * 10 ** -decimals * 1e9 + 0.005 * published


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_published_counts(name):
    spec = PRESETS[name]
    acc = preset(name)
    total, active = spec["published"]
    assert abs(acc.total_params - total) <= 0.01 * total, acc.summary()
    ours = acc.active_params if spec["active_convention"] == "with" else acc.active_params_excluding_input_embedding
    assert abs(ours - active) <= _rounding_tolerance(active), acc.summary()


def test_design_rules_reference_points_exactly():
    # DESIGN-RULES.md: the formulas reproduce Mixtral-8x7B 46.70B / 12.88B and Qwen3-30B-A3B 30.53B / 3.35B.
    m = preset("mixtral-8x7b")
    assert abs(m.total_params / 1e9 - 46.70) < 0.005 and abs(m.active_params / 1e9 - 12.88) < 0.005
    q = account(n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128, vocab_size=151936,
                num_experts=128, top_k=8, d_ff=768)
    assert abs(q.total_params / 1e9 - 30.53) < 0.005 and abs(q.active_params / 1e9 - 3.35) < 0.005


def test_hand_computed_small_model():
    # 2 layers, d=8, 2 heads of 4 (kv 1), V=10, E=4 experts of width 6, k=2, one shared of width 3,
    # the first layer dense (width 12), tied embeddings, gated.
    acc = account(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, vocab_size=10, num_experts=4,
                  top_k=2, d_ff=6, num_shared_experts=1, shared_d_ff=3, n_dense_layers=1, dense_d_ff=12,
                  tie_embeddings=True, seq_len=5, causal=False)
    attention = 2 * 8 * 2 * 4 + 2 * 8 * 1 * 4          # 96 per layer
    routed, routed_active = 4 * 3 * 8 * 6, 2 * 3 * 8 * 6  # 576, 288 (one MoE layer)
    shared, router, dense = 3 * 8 * 3, 8 * 4, 3 * 8 * 12  # 72, 32, 288
    norms = 2 * (2 * 8) + 8
    embed = 10 * 8
    assert acc.total_params == 2 * attention + routed + shared + router + dense + norms + embed
    assert acc.active_params == 2 * attention + routed_active + shared + router + dense + norms + embed
    matmuls = 2 * (acc.active_params - embed + embed)  # tied: the output projection is still a matmul
    assert acc.flops_per_token == pytest.approx(matmuls + 2 * 2 * 5 * 2 * (4 + 4))
    assert acc.training_flops_per_token == pytest.approx(3 * acc.flops_per_token)
    assert acc.sparsity == 2 and acc.granularity_krajewski == pytest.approx(32 / 6)
    assert acc.granularity_liew == pytest.approx(8 / 6)


def test_causal_attention_flops_are_the_exact_mean():
    args = dict(n_layers=1, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16, vocab_size=100, num_experts=4, top_k=1,
                d_ff=32, seq_len=7)
    full = account(**args, causal=False).flops_breakdown["attention_scores"]
    causal = account(**args, causal=True).flops_breakdown["attention_scores"]
    assert causal == pytest.approx(full * (7 + 1) / 2 / 7)


def test_heterogeneous_widths_and_mla():
    acc = account(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, vocab_size=10, num_experts=4,
                  top_k=2, d_ff=[4, 8, 12, 16])
    assert acc.breakdown["routed_experts"] == 3 * 16 * 40
    assert acc.active_breakdown["routed_experts"] == 2 * 3 * 16 * 10
    mla = MLA(kv_lora_rank=4, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=5, q_lora_rank=6)
    d, h = 16, 2
    expected = d * 6 + 6 * h * 5 + 6 + d * (4 + 2) + 4 + 4 * h * (3 + 5) + h * 5 * d
    assert mla.params(d, h) == expected


def test_account_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        account(n_layers=1, d_model=8, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=4, num_experts=2, top_k=3, d_ff=4)
    with pytest.raises(ValueError, match="d_ff"):
        account(n_layers=1, d_model=8, n_heads=1, n_kv_heads=1, head_dim=8, vocab_size=4, num_experts=2, top_k=1, d_ff=[4])
    with pytest.raises(KeyError, match="unknown model"):
        preset("gpt-5")


SMALL = SearchSpace(n_layers=(4, 8), d_model=(256, 512), num_experts=(8, 16, 32), top_k=(1, 2, 4),
                    granularity_factors=(0.5, 1.0, 2.0), num_shared_experts=(0, 1))


def test_recommender_respects_budgets_and_ranks_by_the_rules():
    rec = recommend(max_total_params=60e6, max_active_params=20e6, max_flops_per_token=80e6, vocab_size=1000,
                    seq_len=256, space=SMALL, top=500)
    assert rec.candidates and rec.feasible <= rec.considered
    for c in rec.candidates:
        a = c.accounting
        assert a.total_params <= 60e6 and a.active_params <= 20e6 and a.flops_per_token <= 80e6
    best = rec.candidates[0].accounting.total_params
    assert all(c.accounting.total_params >= best * 0.98 for c in rec.band)
    assert max(c.accounting.total_params for c in rec.candidates) <= best / 0.98
    # Within the first tier: sparsity ascending, then fewer experts.
    tier = rec.band
    keys = [(c.accounting.sparsity, c.args["num_experts"]) for c in tier]
    assert keys == sorted(keys)


def test_rank_prefers_total_then_sparsity_then_fewer_experts():
    def cand(total, E, k, G=8.0):
        acc = account(n_layers=1, d_model=64, n_heads=1, n_kv_heads=1, head_dim=64, vocab_size=10, num_experts=E,
                      top_k=k, d_ff=32)
        acc.total_params = total
        from fastmoe_kernels.design.rules import Candidate
        return Candidate({"num_experts": E, "top_k": k}, acc, G)

    a, b, c, d = cand(100, 16, 2), cand(99.5, 16, 4), cand(99.5, 8, 2), cand(50, 8, 8)
    ordered = rank([a, b, c, d], 0.02, 8.0)
    assert ordered == [c, b, a, d]  # c and b: s = 4 before a's s = 8; c fewer experts than b at s = 4


def test_measured_cost_interpolates_and_bounds_step_time():
    rows = [
        {"op": "layer", "mode": "fwd+bwd", "d_model": 256, "num_experts": 8, "top_k": 2, "d_ff": 128, "tflops": 100.0},
        {"op": "layer", "mode": "fwd+bwd", "d_model": 256, "num_experts": 32, "top_k": 2, "d_ff": 128, "tflops": 50.0},
        {"op": "experts", "mode": "fwd+bwd", "d_model": 256, "num_experts": 8, "top_k": 2, "d_ff": 128, "tflops": 999.0},
        {"op": "layer", "mode": "fwd+bwd", "d_model": 256, "num_experts": 8, "top_k": 2, "d_ff": 128, "tflops": 500.0,
         "flags": "wide spread (p80/p20 3.1); loaded (1.8 of 2 cores busy elsewhere)"},  # not this machine's cost
    ]
    cost = MeasuredCost(rows)
    assert cost.rate(256, 8, 2, 128) == 100.0
    mid = cost.rate(256, 16, 2, 128)
    assert 50.0 < mid < 100.0
    rec = recommend(max_total_params=60e6, max_active_params=20e6, vocab_size=1000, seq_len=256, space=SMALL,
                    results=rows, tokens_per_step=4096, max_step_ms=1e9)
    assert all(c.measured_tflops and c.est_moe_ms_per_step for c in rec.candidates)
    tight = recommend(max_total_params=60e6, max_active_params=20e6, vocab_size=1000, seq_len=256, space=SMALL,
                      results=rows, tokens_per_step=4096, max_step_ms=1e-6)
    assert tight.feasible == 0


def test_recommender_needs_budgets():
    with pytest.raises(ValueError, match="memory"):
        recommend(max_active_params=1e9)
    with pytest.raises(ValueError, match="cost"):
        recommend(memory_gb=10)
    with pytest.raises(ValueError, match="results"):
        recommend(memory_gb=10, max_active_params=1e9, max_step_ms=10)


def test_cli(capsys):
    assert design_main(["--total-params", "60e6", "--active-params", "20e6", "--vocab", "1000", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "Rules applied" in out and "Liew" in out and "| layers |" in out
    assert design_main(["--preset", "olmoe-1b-7b"]) == 0
    assert "olmoe-1b-7b: total 6.92B" in capsys.readouterr().out
    assert design_main(["--memory-gb", "1"]) == 2


def test_public_api():
    assert design.account is account and callable(design.recommend)
