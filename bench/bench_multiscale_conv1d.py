"""pytest-benchmark: fastmsc's multiscale_conv1d per backend, forward (no_grad) and forward+backward."""

OP = "multiscale_conv1d"


def test_multiscale_conv1d(benchmark, bench_target, run_benchmark):
    run_benchmark(benchmark, bench_target)
