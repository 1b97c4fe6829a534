"""Dense GEMMs with the experts' FLOPs and the grouped GEMMs' shapes: the rate we chase."""
from _measure import run_target


def test_roofline(benchmark, bench_session, target_key):
    run_target(benchmark, bench_session, target_key)
