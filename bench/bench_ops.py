"""pytest-benchmark: every op of fastmsc.backend.OPS per backend, forward (no_grad) and forward+backward, and
MSCClassifier's training step (forward, cross-entropy, backward, AdamW step); bench/conftest.py parametrises
``bench_target`` over the ops, cases, modes and backends."""


def test_op(benchmark, bench_target, run_benchmark):
    run_benchmark(benchmark, bench_target)
