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
from fastmsc.bench.baselines import NAIVE
from fastmsc.bench.cases import QUICK_CASES, Case, all_ops, default_cases, modes_for
from fastmsc.bench.checks import mismatch
from fastmsc.bench.harness import ModelWorkload, OpWorkload, compare, measure
from fastmsc.bench.report import CSV_COLUMNS, format_table, write_csv
from fastmsc.bench.roofline import Peaks, Work, rates, work
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
    # One row per (op, case, mode, backend): quick runs reference, torch and fused, plus naive for attention and
    # the two fused LSTM implementations (persistent: an unavailable row on CPU; stepwise) for lstm_layer.
    expected = sum(len(QUICK_CASES[op]) * len(modes_for(op)) * (3 + (op in NAIVE) + 2 * (op == "lstm_layer"))
                   for op in all_ops() if op in QUICK_CASES)
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
            # Achieved rates from the op's counts, and the roofline fraction against ceilings measured in this run.
            assert float(row["tflops"]) > 0 and float(row["gbps"]) > 0, row
            assert 0 < float(row["pct_of_peak"]) and row["bound"] in ("mem", "math"), row
            assert float(row["peak_copy_gbps"]) > 0 and float(row["peak_matmul_tflops"]) > 0, row
        else:
            assert row["median_ms"] == "" and row["note"], row
        if row["backend"] == "torch":
            assert row["status"] == "ok" and math.isclose(float(row["speedup_vs_torch"]), 1.0), row
            if row["op"] == "attention":  # the SDPA kernel that ran, reached through 4-D inputs
                assert "SDPA kernel " in row["note"] and "MATH" not in row["note"], row
        if row["status"] == "ok" and row["mode"] in ("fwd+bwd", "train step"):
            assert int(row["saved_bytes"]) > 0, row
    # The same table again from the CSV alone (what bench/gpu_check.sh prints after a step was cut short).
    again = subprocess.run([sys.executable, "-m", "fastmsc", "bench", "--table-from", str(csv_path)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    again_lines = [line for line in again.stdout.splitlines()
                   if line.split()[:1] and line.split()[0] in QUICK_CASES and len(line.split()) > 3]
    # The same rows in the same order (numbers pass through the CSV's 6 digits, so compare the labels).
    labels = [line.split()[:2] + [line.split()[-1]] for line in table_lines]
    assert [line.split()[:2] + [line.split()[-1]] for line in again_lines] == labels, again.stdout
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
    monkeypatch.setattr(op, "fused_prepare", None)
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


def test_mismatch_bounds_each_element_and_finds_the_worst():
    """The one comparison the tests (tests/_helpers.assert_close) and the benchmark share."""
    want = torch.tensor([[1.0, -2.0, 0.0], [4.0, 8.0, 0.5]], dtype=torch.float64)
    assert mismatch(want.clone(), want, rtol=0, atol=0) == (0.0, (0, 0), 0)
    got = want.clone()
    got[1, 1] += 0.08  # allowed: atol 0.01 + rtol 0.01 * 8 = 0.09
    got[0, 2] += 0.02  # allowed: 0.01 only: twice over
    ratio, index, bad = mismatch(got, want, rtol=0.01, atol=0.01)
    assert index == (0, 2) and bad == 1 and ratio == pytest.approx(2.0)
    # atol_per_max adds a fraction of max|want| (8) to every element's bound: 0.02 <= 0.01 + 0.01 * 8.
    assert mismatch(got, want, rtol=0.01, atol=0.01, atol_per_max=0.01)[2] == 0
    per_element = torch.full_like(want, 1e-3)
    per_element[0, 2] = 0.05
    assert mismatch(got, want, atol=per_element)[1] == (1, 1)
    for bad_value in (float("nan"), float("inf")):
        broken = want.clone()
        broken[1, 0] = bad_value
        assert mismatch(broken, want, rtol=1.0, atol=1.0)[:2] == (float("inf"), (1, 0))
    infinite = want.clone()
    infinite[0, 0] = float("-inf")
    assert mismatch(infinite, infinite.clone(), atol=0)[0] == 0.0  # equal infinities match
    assert mismatch(infinite.new_full((2, 3), float("nan")), infinite.new_full((2, 3), float("nan")))[0] == math.inf
    with pytest.raises(ValueError, match="shape"):
        mismatch(want[:1], want)


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
    monkeypatch.setattr(fastmsc.bench.workloads, "compile_unavailable", lambda device: None)
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


def test_bench_only_flags_are_checked_before_any_work(tmp_path, capsys):
    assert cli_main(["bench", "--quick", "--csv", str(tmp_path / "b.csv"), "--write-dispatch",
                     str(tmp_path / "d.json")]) == 2
    assert "--write-dispatch records verdicts per GPU compute capability" in capsys.readouterr().err
    assert cli_main(["bench", "--quick", "--csv", str(tmp_path / "b.csv"), "--time-budget", "0"]) == 2
    assert "--time-budget must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "b.csv").exists() and not (tmp_path / "d.json").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert cli_main(["bench", "--table-from", str(bad)]) == 2
    assert "cannot be read as a fastmsc bench CSV" in capsys.readouterr().err


# --- honest baselines, rates, rotation ------------------------------------------------------------------------


def test_large_pooling_case_on_cuda_exceeds_a_gigabyte_in_every_half_or_single_dtype():
    cases = default_cases("max_avg_pool", quick=False, device_type="cuda")
    largest = max(c.batch * c.steps * c["C"] for c in cases)
    assert largest * 2 >= 2**30  # bfloat16 / float16; float32 is twice that
    assert all(c.batch * c.steps * c["C"] < 2**24 for c in default_cases("max_avg_pool", quick=False,
                                                                          device_type="cpu"))


def test_torch_attention_reaches_a_fused_sdpa_kernel_and_naive_runs_in_the_input_dtype():
    from fastmsc.ops.attention import attention_reference, attention_torch, sdpa_backend
    B, T, D = _rand_shape(low=2, high=7, ndim=1)[0], 13, 8
    q, k, v = (torch.randn(B, T, D, dtype=torch.float64) for _ in range(3))
    lengths = torch.randint(1, T + 1, (B,))
    assert sdpa_backend(q.float(), k.float(), v.float()) != "MATH"  # 3-D inputs alone would run the math path
    for lens in (None, lengths):
        want = attention_reference(q, k, v, lens, 0.3)
        naive = NAIVE["attention"](q.float(), k.float(), v.float(), lens, 0.3)
        assert naive.dtype == torch.float32  # computed in the input dtype, as a user's code would
        torch.testing.assert_close(naive.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention_torch(q, k, v, lens, 0.3), want, rtol=1e-12, atol=1e-12)
        heads = q.view(B, T, 2, D // 2).transpose(1, 2)  # 4-D, non-contiguous
        torch.testing.assert_close(attention_torch(heads, heads, heads, lens, 0.3),
                                   attention_reference(heads, heads, heads, lens, 0.3), rtol=1e-12, atol=1e-12)


def test_roofline_counts_and_fraction():
    pool = Case("max_avg_pool", (("B", 2), ("T", 5), ("C", 3)))
    assert work(pool, "fwd", torch.float32).bytes == 4 * (2 * 5 * 3 + 2 * 2 * 3)
    attn = Case("attention", (("B", 2), ("T", 8), ("E", 4)))
    fwd, both = work(attn, "fwd", torch.bfloat16), work(attn, "fwd+bwd", torch.bfloat16)
    assert fwd.flops == 4 * 2 * 8 * 8 * 4 and both.flops == 3.5 * fwd.flops and fwd.bytes == 2 * 4 * 2 * 8 * 4
    conv = Case("multiscale_conv1d", (("B", 2), ("C_in", 3), ("T", 7), ("C_out", 5)))
    assert work(conv, "fwd", torch.float32).flops == 2 * 2 * 7 * 5 * 3 * (3 + 5 + 7)
    peaks = Peaks(copy_gbps=1000.0, matmul_tflops={"float32": 10.0})
    # 1 GB at 1000 GB/s is 1 ms: done in 2 ms that is half the memory roofline.
    found = rates(Work(flops=1e9, bytes=1e9), 2.0, "float32", peaks)
    assert found.bound == "mem" and found.pct_of_peak == pytest.approx(50.0) and found.gbps == pytest.approx(500.0)
    found = rates(Work(flops=1e11, bytes=1e6), 20.0, "float32", peaks)
    assert found.bound == "math" and found.pct_of_peak == pytest.approx(50.0) and found.tflops == pytest.approx(5.0)
    assert rates(Work(1.0, 1.0), 1.0, "float16", peaks).pct_of_peak is None  # no ceiling measured for float16


def test_before_each_runs_before_every_timed_call_only():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    time_interleaved(steps, "cpu", repeats=3, warmup=2, before_each=lambda: calls.append("flush"))
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up: no flush
    assert calls[4:] == ["flush", "a", "flush", "b"] * 3


def test_time_budget_skips_later_cases_and_rows_reach_on_rows_case_by_case(monkeypatch):
    import itertools

    from fastmsc.bench import harness
    clock = itertools.count(0.0, 10.0)  # every reading of the clock is 10 s after the last
    monkeypatch.setattr(harness.time, "monotonic", lambda: next(clock))
    seen = []
    cases = {"max_avg_pool": [Case("max_avg_pool", (("B", 2), ("T", t), ("C", 3))) for t in (5, 6, 7)]}
    options = _quick_options(modes=("fwd",), time_budget=15.0, on_rows=lambda rows: seen.append(list(rows)))
    rows = run_suite(options, ["max_avg_pool"], cases)
    assert [len(batch) for batch in seen] == [len(options.backends)] * 3 and sum(seen, []) == rows
    # The first case starts 10 s in, within the budget; the second would start 20 s in.
    assert all(r.status != "skipped" for r in seen[0])
    assert all(r.status == "skipped" and "time budget" in r.note for batch in seen[1:] for r in batch)


def test_a_run_stopped_midway_keeps_the_rows_it_measured(monkeypatch, tmp_path):
    from fastmsc.bench import harness
    real, calls = harness.measure_backends, []

    def stop_on_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a time cap's signal does to a run
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "measure_backends", stop_on_second_case)
    path = tmp_path / "b.csv"
    with pytest.raises(KeyboardInterrupt):
        cli_main(["bench", "--quick", "--ops", "max_avg_pool", "attention", "--modes", "fwd", "--backends", "torch",
                  "--repeats", "1", "--warmup", "0", "--csv", str(path)])
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["backend"], r["status"]) for r in rows] == [("max_avg_pool", "torch", "ok")]


def test_csv_round_trip_gives_back_every_field_the_table_shows(tmp_path):
    from fastmsc.bench.report import read_csv
    peaks = Peaks(copy_gbps=10.0, matmul_tflops={"float32": 0.1})
    rows = run_suite(_quick_options(modes=("fwd+bwd",), peaks=peaks), ["max_avg_pool"])
    assert any(r.pct_of_peak is not None for r in rows)
    env = fastmsc.bench.report.environment(torch.device("cpu"), peaks, torch.float32)
    path = tmp_path / "out.csv"
    write_csv(path, rows, env, warmup=0)
    back = [result for _, result in read_csv(path)]
    assert len(back) == len(rows)
    for got, want in zip(back, rows, strict=True):
        for name in ("op", "mode", "shape", "dtype", "backend", "status", "note", "bound", "seed", "saved_bytes",
                     "checked_on", "worst"):
            assert getattr(got, name) == getattr(want, name), name
        for name in ("speedup", "tflops", "gbps", "pct_of_peak", "max_error", "first_call_s"):
            value = getattr(want, name)
            assert getattr(got, name) == (None if value is None else pytest.approx(value, rel=1e-5)), name
        if want.stats is not None:
            assert tuple(vars(got.stats).values()) == pytest.approx(tuple(vars(want.stats).values()), rel=1e-5)


def test_lstm_implementation_rows():
    """persistent and stepwise rows time one fused LSTM implementation each: on CPU the persistent kernel is
    unavailable (it runs there only in the Triton interpreter, never timed) and stepwise is the extension."""
    case = QUICK_CASES["lstm_layer"][0]
    options = _quick_options(backends=("torch", "persistent", "stepwise"))
    workload = OpWorkload(case, "fwd+bwd", options)
    persistent, stepwise = measure(workload, "persistent", options), measure(workload, "stepwise", options)
    assert persistent.status == "unavailable" and "persistent unavailable:" in persistent.note, persistent
    assert "interpreter" in persistent.note, persistent
    assert stepwise.status == "ok" and stepwise.stats is not None, stepwise
    rows = run_suite(_quick_options(backends=("torch", "persistent")), ["attention"])
    assert {row.backend for row in rows} == {"torch"}, "no LSTM implementation row for other ops"


def test_lstm_grid_option(tmp_path):
    """--lstm-grid times lstm_layer on B 8/32/64 x T 150/512/1000 x H 64/128/256 (here only parsed and listed: the
    shapes take minutes even on a GPU)."""
    from fastmsc.bench.cases import lstm_grid_cases

    cases = lstm_grid_cases()
    dims = {tuple(dict(case.dims)[k] for k in ("B", "T", "H")) for case in cases}
    assert len(cases) == 27 and dims == {(b, t, h) for b in (8, 32, 64) for t in (150, 512, 1000)
                                         for h in (64, 128, 256)}
    assert {dict(case.dims)["I"] for case in cases} == {192} and {case.op for case in cases} == {"lstm_layer"}
    args = fastmsc.cli.build_parser().parse_args(["bench", "--lstm-grid", "--ops", "lstm_layer"])
    assert args.lstm_grid and args.ops == ["lstm_layer"]


def test_lstm_grid_option_feeds_the_run(tmp_path, monkeypatch):
    from fastmsc.commands import bench as bench_command

    tiny = [Case("lstm_layer", (("B", 2), ("T", 5), ("I", 3), ("H", 4))),
            Case("lstm_layer", (("B", 3), ("T", 4), ("I", 3), ("H", 6)))]
    monkeypatch.setattr(bench_command, "lstm_grid_cases", lambda: tiny)
    csv_path = tmp_path / "grid.csv"
    assert cli_main(["bench", "--lstm-grid", "--ops", "lstm_layer", "--backends", "torch", "--modes", "fwd",
                     "--repeats", "1", "--warmup", "0", "--device", "cpu", "--csv", str(csv_path)]) == 0
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["shape"] for row in rows] == [case.shape for case in tiny], rows


def test_lstm_cpu_grid_times_both_layouts_and_summarises(tmp_path):
    """bench/lstm_cpu_grid.py on a two-case slice of its grid: each case timed training and inference against
    torch.nn.LSTM, one CSV row per case and mode, a summary with the geomeans, the worst cases and the per-dimension
    trends. Skipped where the LSTM extension cannot be built (the fused backend needs it)."""
    from fastmsc.backend import OPS
    if (reason := OPS["lstm_layer"].why_not_fused("cpu")) is not None:
        pytest.skip(f"the LSTM extension is unavailable: {reason}")
    path = tmp_path / "grid.csv"
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "lstm_cpu_grid.py"),
                           "--only", "B=1", "T=24", "H=32", "D=2", "threads=1", "--reps", "3", "--min-seconds", "0",
                           "--csv", str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(path.open()))
    assert [(r["layout"], r["mode"]) for r in rows] == [("batch_first", "train"), ("batch_first", "infer"),
                                                        ("time_major", "train"), ("time_major", "infer")]
    for r in rows:
        assert math.isclose(float(r["ratio"]), float(r["torch_ms"]) / float(r["fastmsc_ms"]), rel_tol=1e-3)
    assert "train: geomean" in done.stdout and "infer: geomean" in done.stdout and "worst cases:" in done.stdout
    assert "layout   batch_first:" in done.stdout
    # The CSV becomes this CPU class's record for auto's CPU rule, without timing anything again.
    from fastmsc.kernels import lstm_cpu_measured
    table = tmp_path / "table.json"
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "lstm_cpu_grid.py"),
                           "--sample", "0", "--write-table", "--from-csv", str(path), "--table", str(table)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = lstm_cpu_measured.read(table)[torch.backends.cpu.get_cpu_capability()]
    assert sorted((c.mode, c.B, c.T, c.H, c.D, c.threads, c.dtype) for c in record.cases) == sorted(
        (r["mode"], 1, 24, 32, 2, 1, "float32") for r in rows)
    for case, r in zip(record.cases, rows, strict=True):
        assert math.isclose(case.ratio, float(r["ratio"]), rel_tol=1e-3)


def test_lstm_cpu_grid_merges_new_cases_into_the_record(tmp_path):
    """--write-table --merge adds the cases of --from-csv (and of the run) to this CPU class's record: a case and mode
    timed again replace the recorded ones, the others stay (a case's other mode too), and the command says what came
    before."""
    from fastmsc.kernels import lstm_cpu_measured
    cpu_class = torch.backends.cpu.get_cpu_capability()
    again = [lstm_cpu_measured.Case("float32", mode, 2, 1, 24, 256, 1, 1.0, 2.0) for mode in ("train", "infer")]
    kept = [lstm_cpu_measured.Case("bfloat16", mode, 1, 8, 64, 32, 2, 0.5, 0.25) for mode in ("train", "infer")]
    kept.append(lstm_cpu_measured.Case("float32", "train", 2, 1, 150, 128, 1, 0.7, 0.6))  # its inference is new
    table = tmp_path / "table.json"
    lstm_cpu_measured.write({cpu_class: lstm_cpu_measured.ClassRecord("cpu", "torch", "2026-01-01", "earlier",
                                                                     (*again, *kept))}, table)
    header = "B,T,H,D,layout,threads,dtype,mode,torch_ms,fastmsc_ms,ratio,backend,cpu,torch,cpu_class"
    timed = [f"1,24,256,1,batch_first,2,float32,{mode},1.5,0.5,3.0,fused,cpu,torch,{cpu_class}"
             for mode in ("train", "infer")]
    new = [f"1,150,128,1,batch_first,2,float32,infer,0.9,0.3,3.0,fused,cpu,torch,{cpu_class}"]
    csv_path = tmp_path / "run.csv"
    csv_path.write_text("\n".join([header, *timed, *new]) + "\n")
    script = str(Path(__file__).parents[1] / "bench" / "lstm_cpu_grid.py")
    done = subprocess.run([sys.executable, script, "--sample", "0", "--write-table", "--merge", "--from-csv",
                           str(csv_path), "--table", str(table)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = lstm_cpu_measured.read(table)[cpu_class]
    got = sorted((c.dtype, c.mode, c.B, c.T, c.H, c.D, c.threads, c.torch_ms, c.fastmsc_ms) for c in record.cases)
    assert got == sorted([*(("float32", m, 1, 24, 256, 1, 2, 1.5, 0.5) for m in ("train", "infer")),
                          ("float32", "infer", 1, 150, 128, 1, 2, 0.9, 0.3),
                          *((c.dtype, c.mode, c.B, c.T, c.H, c.D, c.threads, c.torch_ms, c.fastmsc_ms) for c in kept)])
    assert record.command.startswith("earlier; then python bench/lstm_cpu_grid.py --sample 0 --write-table --merge")
    refused = subprocess.run([sys.executable, script, "--sample", "0", "--merge"], capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode != 0 and "--merge go with --write-table" in refused.stderr, refused.stderr[-3000:]


def test_lstm_cpu_grid_refreshes_the_records_fast_cases(tmp_path):
    """--refresh-below MS re-times the record's cases whose torch time was under MS (both modes of such a case), of
    --dtypes where given, and keeps the others as recorded."""
    from fastmsc.backend import OPS
    from fastmsc.kernels import lstm_cpu_measured
    if (reason := OPS["lstm_layer"].why_not_fused("cpu")) is not None:
        pytest.skip(f"the LSTM extension is unavailable: {reason}")
    cpu_class = torch.backends.cpu.get_cpu_capability()
    fast = [lstm_cpu_measured.Case("float32", mode, 1, 1, 5, 8, 1, 0.0123, 0.0456) for mode in ("train", "infer")]
    slow = [lstm_cpu_measured.Case("float32", mode, 1, 64, 512, 256, 2, 999.0, 998.0) for mode in ("train", "infer")]
    # Fast, but not of the dtype or the batch sizes asked for: kept.
    other = [lstm_cpu_measured.Case("bfloat16", mode, 1, 1, 5, 8, 1, 0.0321, 0.0654) for mode in ("train", "infer")]
    other += [lstm_cpu_measured.Case("float32", mode, 1, 2, 5, 8, 1, 0.0111, 0.0222) for mode in ("train", "infer")]
    table = tmp_path / "table.json"
    lstm_cpu_measured.write({cpu_class: lstm_cpu_measured.ClassRecord("cpu", "torch", "2026-01-01", "earlier",
                                                                     (*fast, *slow, *other))}, table)
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "lstm_cpu_grid.py"),
                           "--refresh-below", "1", "--dtypes", "float32", "--only", "B=1,64", "--table", str(table),
                           "--reps", "3", "--min-seconds", "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = lstm_cpu_measured.read(table)[cpu_class]
    refreshed = [c for c in record.cases if c.B == 1 and c.dtype == "float32"]
    assert sorted(record.cases, key=lambda c: (c.B, c.dtype, c.mode)) == sorted(
        [*refreshed, *other, *slow], key=lambda c: (c.B, c.dtype, c.mode))
    assert sorted(c.mode for c in refreshed) == ["infer", "train"]
    assert all(c.torch_ms != 0.0123 and c.fastmsc_ms != 0.0456 for c in refreshed)
    assert record.command.startswith("earlier; then python bench/lstm_cpu_grid.py --refresh-below 1")


def test_lstm_cpu_clients_times_stock_against_swapped():
    """bench/lstm_cpu_clients.py, one step of the 2-layer BiLSTM classifier: stock and swapped models both train, and
    so does the copy without its LSTM, whose step bounds the ratio."""
    from fastmsc.backend import OPS
    if (reason := OPS["lstm_layer"].why_not_fused("cpu")) is not None:
        pytest.skip(f"the LSTM extension is unavailable: {reason}")
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "lstm_cpu_clients.py"),
                           "--models", "bilstm", "--backend", "fused", "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("bilstm"))
    stock, swapped, free = (float(line.split(label)[1].split("ms")[0]) for label in ("stock", "swapped", "no LSTM"))
    assert math.isclose(float(line.rsplit(maxsplit=1)[1].rstrip("x")), stock / swapped, rel_tol=2e-2), line
    assert math.isclose(float(line.split("bound")[1].split("x")[0]), stock / free, rel_tol=2e-2), line


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_without_lstms_keeps_the_model_and_its_output_shape():
    """The bound's model: each LSTM replaced by zeros of its output's shape (directions and proj_size counted), in a
    copy; the original keeps its LSTMs."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        import lstm_cpu_clients
    finally:
        sys.path.pop(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LSTM(4, 6, bidirectional=True, proj_size=2))
    free = lstm_cpu_clients.without_lstms(model)
    assert isinstance(model[1], torch.nn.LSTM) and isinstance(free[1], lstm_cpu_clients.FreeLSTM)
    x = torch.randn(5, 7, 4)
    out, state = free[1](x)
    assert out.shape == model[1](x)[0].shape and state is None and not out.any()
    classifier = lstm_cpu_clients.MODELS["lstm_fcn_steps"]()
    free = lstm_cpu_clients.without_lstms(classifier)
    assert classifier(torch.randn(2, 3, 100)).shape == free(torch.randn(2, 3, 100)).shape == (2, 10)
    assert not any(isinstance(m, torch.nn.LSTM) for m in free.modules())


def test_lstm_cpu_loop_times_both_models_per_shape():
    """bench/lstm_cpu_loop.py: one line per shape, the ratio the two times give; a bad shape is refused by name."""
    from fastmsc.backend import OPS
    if (reason := OPS["lstm_layer"].why_not_fused("cpu")) is not None:
        pytest.skip(f"the LSTM extension is unavailable: {reason}")
    script = str(Path(__file__).parents[1] / "bench" / "lstm_cpu_loop.py")
    done = subprocess.run([sys.executable, script, "--shape", "2,3,5,2", "--shape", "1,2,4,1", "--mode", "train",
                           "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("B=")]
    assert [line.split(":")[0] for line in lines] == ["B=2 T=3 H=5 D=2", "B=1 T=2 H=4 D=1"], done.stdout
    for line in lines:
        torch_ms, fast_ms = (float(line.split(label)[1].split()[0]) for label in ("torch", "fastmsc"))
        assert math.isclose(float(line.rsplit(maxsplit=1)[1].rstrip("x")), torch_ms / fast_ms, rel_tol=2e-2), line
    bad = subprocess.run([sys.executable, script, "--shape", "1,2,4,3"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "D must be 1 or 2, got 3" in bad.stderr, bad.stderr[-3000:]
