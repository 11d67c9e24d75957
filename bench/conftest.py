"""pytest-benchmark suite: bench_ops.py, parametrised here over every op of ``fastmsc.bench.cases.all_ops`` (the
ops of fastmsc.backend.OPS and MSCClassifier's training step), on the shapes and inputs of ``fastmsc.bench.cases``
(the ones ``fastmsc bench`` uses). ``--bench-ops`` or ``-k <op>`` selects ops. See bench/README.md for the commands.

Each benchmark first checks its backend against the float64 reference (a mismatch fails the test) and
skips, with the reason, a backend that cannot run here (fused without a GPU, torch.compile without a
compiler or where it would unroll a long LSTM).
"""

from __future__ import annotations

import fnmatch

import pytest
import torch

from fastmsc.bench.cases import all_ops, default_cases, modes_for
from fastmsc.bench.harness import BACKEND_CHOICES, Options, Unavailable, applies, check_threads, make_workload

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

try:
    import pytest_benchmark  # noqa: F401
except ImportError as exc:
    raise pytest.UsageError("the bench/ suite needs pytest-benchmark: pip install pytest-benchmark "
                            "(or pip install 'fastmsc[test]')") from exc


def pytest_addoption(parser):
    group = parser.getgroup("fastmsc-bench", "fastmsc benchmark shapes and backends")
    group.addoption("--bench-device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    group.addoption("--bench-dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default float32)")
    group.addoption("--bench-quick", action="store_true", help="the tiny shapes of `fastmsc bench --quick`")
    group.addoption("--bench-backends", default="torch,fused",
                    help=f"comma-separated, from {','.join(BACKEND_CHOICES)} (default: torch,fused)")
    group.addoption("--bench-warmup", type=int, default=None,
                    help="untimed calls first (default 3; 1 with --bench-quick)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds of one call each (default 10; 3 with --bench-quick); fixed rather than "
                         "calibrated, so a run's length does not depend on how busy the machine is")
    group.addoption("--bench-ops", default=",".join(all_ops()),
                    help=f"comma-separated, from {','.join(all_ops())} (default: all)")
    group.addoption("--bench-compile-lstm", action="store_true",
                    help="let torch.compile unroll long LSTMs (compile time grows with T)")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here without `-o python_files=...`; skip files pytest collects anyway (named on
    the command line, or matching python_files), which would otherwise run twice."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _options(config) -> Options:
    name = config.getoption("--bench-device")
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {name}: torch sees no CUDA device")
    backends = tuple(b for b in config.getoption("--bench-backends").split(",") if b)
    bad = [b for b in backends if b not in BACKEND_CHOICES]
    if bad:
        raise pytest.UsageError(f"--bench-backends got {', '.join(bad)}; valid: {', '.join(BACKEND_CHOICES)}")
    quick = config.getoption("--bench-quick")
    warmup, rounds = config.getoption("--bench-warmup"), config.getoption("--bench-rounds")
    return Options(device=device, dtype=DTYPES[config.getoption("--bench-dtype")], backends=backends,
                   warmup=(1 if quick else 3) if warmup is None else warmup,
                   repeats=(3 if quick else 10) if rounds is None else rounds,
                   quick=quick, compile_lstm=config.getoption("--bench-compile-lstm"))


def pytest_generate_tests(metafunc):
    if "bench_target" not in metafunc.fixturenames:
        return
    options = _options(metafunc.config)
    ops = tuple(o for o in metafunc.config.getoption("--bench-ops").split(",") if o)
    bad = [o for o in ops if o not in all_ops()]
    if bad:
        raise pytest.UsageError(f"--bench-ops got {', '.join(bad)}; valid: {', '.join(all_ops())}")
    params, ids = [], []
    for op in ops:
        for case in default_cases(op, quick=options.quick, device_type=options.device.type):
            for mode in modes_for(op):
                for backend in options.backends:  # innermost, so one workload serves consecutive tests
                    if not applies(op, backend):
                        continue  # a hand-written (naive) baseline exists only for some ops
                    params.append((case, mode, backend))
                    ids.append(f"{op}-{mode.replace(' ', '_')}-{case.shape.replace(' ', '-')}-{backend}")
    metafunc.parametrize("bench_target", params, ids=ids)


@pytest.fixture(scope="session")
def bench_options(pytestconfig) -> Options:
    return _options(pytestconfig)


_last_workload = {}


def _workload(case, mode, options):
    """The workload of the previous test when it had the same case and mode (the float64 reference is costly)."""
    key = (case, mode)
    if key not in _last_workload:
        _last_workload.clear()
        _last_workload[key] = make_workload(case, mode, options)
    return _last_workload[key]


@pytest.fixture
def run_benchmark(bench_options):
    """run_benchmark(benchmark, bench_target): check the backend against the reference, warm up, time it."""

    def run(benchmark, target):
        case, mode, backend = target
        workload = _workload(case, mode, bench_options)
        runner = workload.resolve(backend)
        if isinstance(runner, Unavailable):
            pytest.skip(runner.reason)
        with check_threads(bench_options.device):
            outcome = runner.check()
        assert outcome.ok, (f"{case.op} {mode} [{case.shape}] {backend} differs from the float64 reference: "
                            f"{outcome.worst} error {outcome.max_error:.3g} > {outcome.tolerance:.1g} "
                            f"(seed {workload.check_seed})")
        step = runner.step()
        for _ in range(bench_options.warmup):
            step()
        saved = runner.saved_bytes()
        if bench_options.device.type == "cuda":
            timed = lambda: (step(), torch.cuda.synchronize(bench_options.device))
        else:
            timed = step
        benchmark.group = f"{case.op} {mode} {case.shape}"
        benchmark.extra_info.update(op=case.op, mode=mode, shape=case.shape, backend=backend,
                                    device=str(bench_options.device), saved_bytes=saved,
                                    max_rel_error=outcome.max_error, checked_on=outcome.checked_on, note=runner.note)
        benchmark.pedantic(timed, rounds=bench_options.repeats, iterations=1)

    return run
