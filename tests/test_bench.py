"""fastmsc bench: the quick CLI run, saved_tensor_bytes, reference-mismatch detection, the CSV and the chart."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

import fastmsc
from fastmsc.backend import OPS
from fastmsc.bench import Options, run_suite, saved_tensor_bytes
from fastmsc.bench.cases import QUICK_CASES, Case, all_ops, default_cases, modes_for
from fastmsc.bench.harness import ModelWorkload, OpWorkload, compare, measure
from fastmsc.bench.report import CSV_COLUMNS, format_table, write_csv
from fastmsc.bench.timing import Stats, time_interleaved
from fastmsc.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "mismatch", "error", "unavailable", "skipped"}


def _rand_shape(*, low=2, high=9, ndim=2):
    return tuple(int(v) for v in torch.randint(low, high, (ndim,)))


def _quick_options(**overrides) -> Options:
    fields = dict(device=torch.device("cpu"), backends=("torch", "fused"), repeats=1, warmup=0, quick=True,
                  log=lambda line: None)
    fields.update(overrides)
    return Options(**fields)


# --- the CLI, end to end -------------------------------------------------------------------------------------


def test_quick_cli_prints_table_and_writes_one_csv_row_per_measurement(tmp_path):
    csv_path = tmp_path / "bench.csv"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastmsc", "bench", "--quick", "--csv", str(csv_path),
                           "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "median ms" in proc.stdout and "vs torch" in proc.stdout, proc.stdout
    assert "torch.compile skipped in --quick" in proc.stdout + proc.stderr

    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    # One row per (op, case, mode, backend): quick runs reference, torch and fused.
    expected = sum(len(QUICK_CASES[op]) * len(modes_for(op)) * 3 for op in all_ops() if op in QUICK_CASES)
    assert len(rows) == expected
    table_lines = [line for line in proc.stdout.splitlines()
                   if line.split()[:1] and line.split()[0] in QUICK_CASES and len(line.split()) > 3]
    assert len(table_lines) == expected, proc.stdout

    for row in rows:
        assert row["status"] in STATUSES, row
        assert row["device"] == "cpu" and row["device_name"], row
        assert row["torch"] == torch.__version__ and row["python"] == ".".join(map(str, sys.version_info[:3]))
        assert datetime.fromisoformat(row["timestamp"]).tzinfo is not None
        if row["status"] == "ok":
            low, mid, high = float(row["min_ms"]), float(row["median_ms"]), float(row["max_ms"])
            assert 0 < low <= mid <= high, row
            assert float(row["q1_ms"]) <= mid <= float(row["q3_ms"]), row
            assert float(row["max_rel_error"]) <= float(row["tolerance"]), row
            assert row["seed"].isdigit() and row["checked_on"] == "full shape", row
            assert row["speedup_vs_torch"], row
        else:
            assert row["median_ms"] == "" and row["note"], row
        if row["backend"] == "torch":
            assert row["status"] == "ok" and math.isclose(float(row["speedup_vs_torch"]), 1.0), row
        if row["status"] == "ok" and row["mode"] in ("fwd+bwd", "train step"):
            assert int(row["saved_bytes"]) > 0, row
    # Without a GPU the Triton ops' fused path is unavailable and says why, instead of crashing.
    if not torch.cuda.is_available():
        for op in ("multiscale_conv1d", "attention", "max_avg_pool"):
            if OPS[op].why_not_fused("cpu") is not None:
                fused = [r for r in rows if r["op"] == op and r["backend"] == "fused"]
                assert fused and all(r["status"] == "unavailable" and r["note"].startswith("fused unavailable: ")
                                     for r in fused), fused


# --- saved_tensor_bytes --------------------------------------------------------------------------------------


def test_saved_tensor_bytes_counts_each_saved_storage_once():
    x = torch.randn(_rand_shape(), requires_grad=True)
    y = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    # x * y saves both operands for the two gradients.
    assert saved_tensor_bytes(torch.mul, x, y) == x.nbytes + y.nbytes
    # x * x saves x twice: one storage.
    assert saved_tensor_bytes(lambda a: a * a, x) == x.nbytes
    # Excluded tensors (parameters) are left out.
    assert saved_tensor_bytes(torch.mul, x, y, exclude=[y]) == x.nbytes
    # Nothing requires grad: nothing is saved.
    assert saved_tensor_bytes(torch.mul, x.detach(), y.detach()) == 0


def test_saved_tensor_bytes_charges_views_their_whole_base_and_excludes_views_of_parameters():
    rows, cols = _rand_shape(low=3)
    base = torch.randn(rows, cols, requires_grad=True)
    other = torch.randn(rows - 1, cols, requires_grad=True)
    # base[1:] * other saves a view of base: the whole storage of base is held.
    assert saved_tensor_bytes(lambda a, b: a[1:] * b, base, other) == base.nbytes + other.nbytes
    # x @ w.t() saves x and a view of w; with w excluded only x counts.
    weight = torch.nn.Parameter(torch.randn(5, cols))
    x = torch.randn(rows, cols, requires_grad=True)
    assert saved_tensor_bytes(lambda a: a @ weight.t(), x, exclude=[weight]) == x.nbytes


def test_saved_tensor_bytes_sees_custom_autograd_functions():
    class SaveOutput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out = x.exp()
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            return grad * out

    x = torch.randn(_rand_shape(), requires_grad=True)
    assert saved_tensor_bytes(SaveOutput.apply, x) == x.nbytes  # the output, same size as x
    assert saved_tensor_bytes(lambda a: SaveOutput.apply(a) * a, x) == 2 * x.nbytes  # + x saved by the mul


# --- reference checks ----------------------------------------------------------------------------------------


def _register_fused(monkeypatch, op_name, fused):
    """Make ``fused`` the op's fused path on every device, as a later kernel module would."""
    op = OPS[op_name]
    monkeypatch.setattr(op, "_loaded", True)
    monkeypatch.setattr(op, "fused", fused)
    monkeypatch.setattr(op, "fused_unsupported", None)


def test_wrong_fused_forward_is_reported_not_timed(monkeypatch):
    torch_impl = OPS["max_avg_pool"].torch
    _register_fused(monkeypatch, "max_avg_pool", lambda x, lengths=None: torch_impl(x, lengths) * 1.01)
    rows = run_suite(_quick_options(), ["max_avg_pool"])
    assert [(r.mode, r.backend) for r in rows] == [("fwd", "torch"), ("fwd", "fused"),
                                                     ("fwd+bwd", "torch"), ("fwd+bwd", "fused")]
    for r in rows:
        if r.backend == "torch":
            assert r.status == "ok" and r.stats is not None
        else:
            assert r.status == "mismatch", r
            assert r.stats is None and r.speedup is None and r.saved_bytes is None, r
            assert r.max_error > r.tolerance and r.seed is not None
            assert "differs from the float64 reference" in r.note and str(r.seed) in r.note, r.note


def test_wrong_fused_gradient_is_caught_in_fwd_bwd_only(monkeypatch):
    torch_impl = OPS["attention"].torch

    class WrongKeyGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, k):
            return k.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 0.5  # should be grad

    def fused(q, k, v, lengths=None, scale=None):
        return torch_impl(q, WrongKeyGrad.apply(k), v, lengths, scale)

    _register_fused(monkeypatch, "attention", fused)
    rows = {(r.mode, r.backend): r for r in run_suite(_quick_options(), ["attention"])}
    assert rows["fwd", "fused"].status == "ok" and rows["fwd", "fused"].stats is not None
    wrong = rows["fwd+bwd", "fused"]
    assert wrong.status == "mismatch" and wrong.worst == "grad k", wrong


def test_a_correct_fused_path_registered_later_is_checked_and_timed(monkeypatch):
    """The harness is generic over OPS: once an op gets a fused path, it is benchmarked like the others."""
    torch_impl = OPS["multiscale_conv1d"].torch
    def fused(x, weights, biases=None, activation=None):
        return torch_impl(x, weights, biases, activation)

    _register_fused(monkeypatch, "multiscale_conv1d", fused)
    rows = run_suite(_quick_options(), ["multiscale_conv1d"])
    fused = [r for r in rows if r.backend == "fused"]
    assert len(fused) == 2
    for r in fused:
        assert r.status == "ok" and r.stats is not None and r.speedup is not None, r
        assert r.max_error <= r.tolerance
    assert fused[1].saved_bytes > 0


def test_wrong_torch_backend_fails_the_cli_with_exit_code_1(monkeypatch, tmp_path, capsys):
    real = OPS["max_avg_pool"].torch
    monkeypatch.setattr(OPS["max_avg_pool"], "torch", lambda x, lengths=None: real(x, lengths) * 0.5)
    code = cli_main(["bench", "--quick", "--ops", "max_avg_pool", "--backends", "torch", "--repeats", "1",
                     "--warmup", "0", "--csv", str(tmp_path / "b.csv")])
    out = capsys.readouterr()
    assert code == 1
    assert "mismatch" in out.out and "failed their reference check" in out.err
    with (tmp_path / "b.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["mismatch", "mismatch"]


def test_a_raising_backend_is_reported_as_an_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    _register_fused(monkeypatch, "max_avg_pool", broken)
    rows = run_suite(_quick_options(modes=("fwd",)), ["max_avg_pool"])
    assert [r.status for r in rows] == ["ok", "error"]
    assert "kernel launch failed" in rows[1].note


def test_compare_flags_nan_shape_and_missing_gradient():
    want = torch.randn(4, 3, dtype=torch.float64)
    assert compare([("a", want.float(), want)])[0] < 1e-6
    nan = want.clone()
    nan[1, 2] = float("nan")
    assert compare([("a", nan, want)]) == (float("inf"), "a")
    error, worst = compare([("a", want[:3], want)])
    assert error == float("inf") and "shape" in worst
    assert compare([("g", None, want)])[0] == pytest.approx(1.0)  # a missing gradient counts as zeros


# --- cases, unavailable rows, compile policy -----------------------------------------------------------------


def test_default_cases_follow_the_spec():
    lstm = {(c.batch, c.steps, c["I"], c["H"]) for c in default_cases("lstm_layer", quick=False, device_type="cpu")}
    assert {(32, 150, 192, 128), (32, 512, 192, 128), (64, 512, 96, 64), (8, 1000, 64, 64), (32, 24, 32, 32)} == lstm
    gpu_steps = {c.steps for c in default_cases("attention", quick=False, device_type="cuda")}
    assert gpu_steps == {150, 512, 2048}
    for op in all_ops():
        for case in default_cases(op, quick=False, device_type="cpu"):
            assert case.batch == 32 or op == "lstm_layer"


def test_model_fused_row_lists_why_every_op_lacks_a_fused_path(monkeypatch):
    for name, op in OPS.items():
        monkeypatch.setattr(op, "why_not_fused", lambda device_type, _n=name, **kw: f"no kernel for {_n}")
    case = QUICK_CASES["model"][0]
    row = measure(ModelWorkload(case, "train step", _quick_options()), "fused", _quick_options())
    assert row.status == "unavailable" and row.stats is None
    assert row.note.startswith("fused unavailable: ") and all(f"no kernel for {name}" in row.note for name in OPS)


def test_compile_of_a_long_lstm_in_training_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.setattr(fastmsc.bench.harness, "compile_unavailable", lambda device: None)
    case = Case("lstm_layer", (("B", 2), ("T", 150), ("I", 3), ("H", 4)))
    row = measure(OpWorkload(case, "fwd+bwd", _quick_options()), "compile", _quick_options())
    assert row.status == "skipped" and "unrolls the LSTM" in row.note and "--compile-lstm" in row.note


# --- CSV, table, chart, argument errors ----------------------------------------------------------------------


def test_csv_appends_and_refuses_a_file_with_other_columns(tmp_path):
    rows = run_suite(_quick_options(modes=("fwd",)), ["max_avg_pool"])
    env = fastmsc.bench.report.environment(torch.device("cpu"))
    path = tmp_path / "out.csv"
    write_csv(path, rows, env, warmup=0)
    write_csv(path, rows, env, warmup=0)
    with path.open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(rows)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="exists with other columns"):
        write_csv(other, rows, env, warmup=0)
    table = format_table(rows, env)
    assert "[1] fused unavailable" in table or all(r.status == "ok" for r in rows)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib, an optional dependency not installed here")
    path = tmp_path / "chart.png"
    code = cli_main(["bench", "--quick", "--ops", "max_avg_pool", "--backends", "torch", "--repeats", "1",
                     "--warmup", "0", "--csv", str(tmp_path / "b.csv"), "--plot", str(path)])
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = cli_main(["bench", "--quick", "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "c.png")])
    assert code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--ops", "nope"], "--ops got nope"),
    (["--backends", "magic"], "--backends got magic"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--modes", "bwd"], "--modes got bwd"),
])
def test_bad_arguments_name_the_option(argv, message, tmp_path, capsys):
    assert cli_main(["bench", "--quick", "--csv", str(tmp_path / "b.csv"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing GPU; this machine has one")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["bench", "--quick", "--device", "cuda", "--csv", str(tmp_path / "b.csv")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_stats_quartiles():
    samples = [float(v) for v in torch.randperm(9) + 1]
    stats = Stats.from_samples(samples)
    assert (stats.min_ms, stats.q1_ms, stats.median_ms, stats.q3_ms, stats.max_ms) == (1, 3, 5, 7, 9)
    assert Stats.from_samples([2.5]).q3_ms == 2.5


def test_backends_are_timed_round_robin_and_a_raising_one_leaves_the_rotation():
    calls = []

    def step(name):
        return lambda: calls.append(name)

    def flaky():
        calls.append("flaky")
        if calls.count("flaky") == 3:
            raise RuntimeError("out of memory")

    warmup, repeats = 2, 3
    results = time_interleaved({"torch": step("torch"), "flaky": flaky, "fused": step("fused")}, "cpu",
                               repeats=repeats, warmup=warmup)
    one_round = ["torch", "flaky", "fused"]
    # Two warm-up rounds, one timed round with all three, then the failing step is out for the last two rounds.
    assert calls == one_round * 3 + ["torch", "fused"] * 2
    assert list(results) == ["torch", "flaky", "fused"]
    assert isinstance(results["flaky"], RuntimeError)
    for name in ("torch", "fused"):
        stats, first_call_s = results[name]
        assert stats.repeats == repeats and first_call_s is not None and first_call_s >= 0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_interleaved({"torch": step("torch")}, "cpu", repeats=0, warmup=0)


def test_a_backend_raising_only_while_timed_is_an_error_row_and_the_others_are_timed(monkeypatch):
    torch_impl = OPS["max_avg_pool"].torch
    calls = {"n": 0}

    def fails_after_check(x, lengths=None):
        calls["n"] += 1
        if calls["n"] > 1:  # the reference check is the first call
            raise RuntimeError("illegal memory access")
        return torch_impl(x, lengths)

    _register_fused(monkeypatch, "max_avg_pool", fails_after_check)
    rows = run_suite(_quick_options(modes=("fwd",), repeats=2), ["max_avg_pool"])
    assert [r.backend for r in rows] == ["torch", "fused"]
    assert rows[0].status == "ok" and rows[0].stats.repeats == 2 and rows[0].speedup == 1.0
    assert rows[1].status == "error" and "while timing" in rows[1].note and "illegal memory access" in rows[1].note
