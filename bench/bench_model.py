"""pytest-benchmark: MSCClassifier's training step (forward, cross-entropy, backward, AdamW step) per backend."""

OP = "model"


def test_model_train_step(benchmark, bench_target, run_benchmark):
    run_benchmark(benchmark, bench_target)
