"""pytest-benchmark: fastmsc's attention per backend, forward (no_grad) and forward+backward."""

OP = "attention"


def test_attention(benchmark, bench_target, run_benchmark):
    run_benchmark(benchmark, bench_target)
