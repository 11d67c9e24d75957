"""pytest-benchmark: fastmsc's max_avg_pool per backend, forward (no_grad) and forward+backward."""

OP = "max_avg_pool"


def test_max_avg_pool(benchmark, bench_target, run_benchmark):
    run_benchmark(benchmark, bench_target)
