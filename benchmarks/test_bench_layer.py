"""The whole layer on every backend, and the experts against the baselines (same weights and routing)."""
from _measure import run_target


def test_layer(benchmark, bench_session, target_key):
    run_target(benchmark, bench_session, target_key)
