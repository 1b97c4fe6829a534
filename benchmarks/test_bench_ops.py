"""Each op of the layer (routing, plan, permute, grouped GEMM up/down, unpermute = combine) on every backend."""
from _measure import run_target


def test_op(benchmark, bench_session, target_key):
    run_target(benchmark, bench_session, target_key)
