"""pytest-benchmark: fastmsc's lstm_layer per backend, forward (no_grad) and forward+backward."""

OP = "lstm_layer"


def test_lstm_layer(benchmark, bench_target, run_benchmark):
    run_benchmark(benchmark, bench_target)
