"""bench/gpu_check.sh without a GPU: its --dry-run keeps the steps, caps, budget logic and outputs of the real
run with CPU stand-ins, so the script that gets a few minutes on a borrowed GPU is known to work before it
gets there. Four runs go at once (about 40 s on 2 cores): a clean dry run, one where a step overruns its cap,
one where the extension build overruns its deadline, and the real mode on a machine without a GPU."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location("gpu_check_report", REPO / "bench" / "gpu_check_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
SECTIONS = ("(a) benchmark table", "(b) CUDA tests", "(c) steps")
STEPS = ("env", "ext_build", "triton_warmup", "bench_f32", "bench_bf16", "ext_wait", "bench_lstm", "cuda_tests",
         "bench_compile", "report")
OUTPUTS = ("gpu_check.log", "env.txt", "bench.csv", "dispatch_table.json", "cuda_tests.xml", "steps.txt",
           "summary.txt")
BUDGET = 360
TAIL_SHOWN = 12_000  # characters of the output a GPU run's caller sees

needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in ("bash", "timeout")),
                                 reason="needs bash and coreutils' timeout")


def _env(folder: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPU_CHECK_", "PYTEST_")) and k not in ("OUT", "TRITON_INTERPRET", "FASTMSC_POISON")}
    env.update(PYTHON=sys.executable, OUT=str(folder / "out"), GPU_CHECK_WORK=str(folder / "work"), **extra)
    return env


RUNS = {
    "clean": (["--dry-run"], {}),
    # bench_bf16 writes its rows, then sleeps past its 15 s cap; bench_compile runs after it
    "overrun": (["--dry-run", "--steps", "bench_bf16,bench_compile"],
                {"GPU_CHECK_CAP_bench_bf16": "15", "GPU_CHECK_SLEEP_bench_bf16": "100",
                 "GPU_CHECK_TABLE_CHARS": "300"}),
    # the extension build sleeps past its deadline (budget 45 s - report 15 s - bench_lstm 20 s = 10 s)
    "ext_timeout": (["--dry-run", "--steps", "ext_build,bench_lstm"],
                    {"GPU_CHECK_BUDGET": "45", "GPU_CHECK_CAP_bench_lstm": "20", "GPU_CHECK_CAP_ext_wait": "5",
                     "GPU_CHECK_SLEEP_ext_build": "100"}),
    "no_gpu": ([], {}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = {}
    for name, (args, extra) in RUNS.items():
        if name == "no_gpu" and _cuda_available():
            continue
        folder = tmp_path_factory.mktemp(name)
        proc = subprocess.Popen(["bash", str(SCRIPT), *args], env=_env(folder, **extra), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        started[name] = (proc, folder)
    results = {}
    for name, (proc, folder) in started.items():
        stdout, _ = proc.communicate(timeout=300)
        results[name] = {"rc": proc.returncode, "stdout": stdout, "out": folder / "out"}
    return results


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _sections(stdout: str) -> dict[str, str]:
    """The text under each of the three headers that end the output (they must come last, in order)."""
    positions = [stdout.rfind(f" {title} ") for title in SECTIONS]
    assert all(p >= 0 for p in positions), f"missing a section header:\n{stdout[-3000:]}"
    assert positions == sorted(positions), f"sections out of order: {positions}"
    bodies = {}
    for i, title in enumerate(SECTIONS):
        start = stdout.index("\n", positions[i]) + 1
        end = stdout.rfind("\n", 0, positions[i + 1]) if i + 1 < len(SECTIONS) else len(stdout)
        bodies[title] = stdout[start:end]
    return bodies


def _steps(stdout: str) -> dict[str, tuple[str, int, int, str]]:
    """step -> (status, seconds, cap, note) from section (c)."""
    rows = {}
    for line in _sections(stdout)["(c) steps"].splitlines():
        m = re.match(r"^(\w+)\s+(ok|FAILED|TIMEOUT|SKIPPED)\s+(\d+)s\s+(-?\d+)s\s*(.*)$", line)
        if m:
            rows[m[1]] = (m[2], int(m[3]), int(m[4]), m[5])
    return rows


def _check_outputs(folder: Path) -> list[str]:
    entries = list(folder.iterdir())
    assert len(entries) <= 8, entries
    for path in entries:
        assert path.is_file() and not path.is_symlink(), path
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path.name
        assert path.name in OUTPUTS, f"{path.name} is not among the declared outputs"
    return sorted(p.name for p in entries)


@needs_tools
def test_dry_run_passes_with_every_step_and_output(runs):
    run = runs["clean"]
    assert run["rc"] == 0, run["stdout"][-4000:]
    steps = _steps(run["stdout"])
    assert steps["total"][1] < 120, f"the dry run took {steps['total'][1]} s"
    assert list(steps)[:-1] == list(STEPS) and list(steps)[-1] == "total", steps
    assert all(status == "ok" for status, *_ in steps.values()), steps
    assert run["stdout"].rstrip().endswith("exit status 0 (dry run)")
    names = _check_outputs(run["out"])
    assert set(OUTPUTS) - {"dispatch_table.json"} <= set(names), names
    assert "nvidia-smi" in (run["out"] / "env.txt").read_text()
    assert (run["out"] / "steps.txt").read_text().strip() == _sections(run["stdout"])["(c) steps"].strip()
    summary = (run["out"] / "summary.txt").read_text()
    assert [summary.find(f" {t} ") for t in SECTIONS] == sorted(summary.find(f" {t} ") for t in SECTIONS)


@needs_tools
def test_dry_run_sections_fit_the_shown_tail(runs):
    stdout = runs["clean"]["stdout"]
    sections = _sections(stdout)
    assert "max_avg_pool" in sections["(a) benchmark table"]
    assert re.search(r"\d+ passed, \d+ failed, \d+ errors, \d+ skipped", sections["(b) CUDA tests"])
    assert all(f" {t} " in stdout[-TAIL_SHOWN:] for t in SECTIONS)
    with (runs["clean"]["out"] / "bench.csv").open(newline="") as f:
        dtypes = {(row["op"], row["dtype"]) for row in csv.DictReader(f)}
    assert {("max_avg_pool", "float32"), ("max_avg_pool", "bfloat16"), ("lstm_layer", "float32"),
            ("lstm_layer", "bfloat16")} <= dtypes, dtypes


@needs_tools
def test_caps_add_up_within_the_budget(runs):
    plan = re.search(r"^budget (\d+)s: report (\d+)s \+ (.*)$", runs["clean"]["stdout"], re.M)
    assert plan, runs["clean"]["stdout"][:2000]
    caps = dict(re.findall(r"(\w+) (\d+)s\+?", plan[3]))
    assert set(caps) == set(STEPS) - {"report", "ext_build"} and "ext_build (background)" in plan[3], plan[3]
    assert int(plan[1]) == BUDGET
    assert int(plan[2]) + sum(int(c) for c in caps.values()) <= BUDGET, plan[0]
    steps = _steps(runs["clean"]["stdout"])
    assert steps["total"][1] <= BUDGET


@needs_tools
def test_a_step_over_its_cap_is_killed_and_the_report_still_prints(runs):
    run = runs["overrun"]
    assert run["rc"] == 1, run["stdout"][-4000:]
    steps = _steps(run["stdout"])
    assert set(steps) == {"bench_bf16", "bench_compile", "report", "total"}, steps
    status, seconds, cap, note = steps["bench_bf16"]
    assert (status, cap) == ("TIMEOUT", 15) and 15 <= seconds <= 22 and "killed at its cap" in note, steps
    assert steps["bench_compile"][0] == "ok"
    assert steps["total"][1] < 60, "the sleeping step was not killed at its cap"
    table = _sections(run["stdout"])["(a) benchmark table"]
    # the digest, as the full table is over 300 characters
    assert table.startswith("digest of the table: the full one") and "summary.txt" in table
    assert re.search(r"max_avg_pool\s+fwd\s+bf16", table) and re.search(r"max_avg_pool\s+fwd\s+f32", table), table
    _check_outputs(run["out"])


@needs_tools
def test_an_extension_build_over_its_deadline_skips_the_lstm_steps(runs):
    run = runs["ext_timeout"]
    assert run["rc"] == 1, run["stdout"][-4000:]
    steps = _steps(run["stdout"])
    assert steps["ext_build"][0] == "TIMEOUT" and steps["ext_build"][2] == 10, steps
    assert steps["bench_lstm"][:1] == ("SKIPPED",) and "extension" in steps["bench_lstm"][3], steps
    assert steps["total"][1] < 40
    _sections(run["stdout"])


@needs_tools
def test_without_a_gpu_the_real_run_stops_after_env_and_reports(runs):
    if "no_gpu" not in runs:
        pytest.skip("this machine has a CUDA GPU")
    run = runs["no_gpu"]
    assert run["rc"] == 1
    steps = _steps(run["stdout"])
    assert steps["env"][0] == "FAILED"
    assert all(steps[s][0] == "SKIPPED" and "no usable CUDA GPU" in steps[s][3]
               for s in STEPS if s not in ("env", "ext_wait", "report")), steps
    _check_outputs(run["out"])


def test_a_plan_over_the_budget_or_an_unknown_step_is_refused():
    env = _env(Path("/nonexistent"), GPU_CHECK_CAP_cuda_tests="400")
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "over the 360s budget" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--steps", "nope"], env=_env(Path("/nonexistent")),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown step nope" in result.stderr


def test_test_summary_lists_failures_with_reasons(tmp_path):
    xml = tmp_path / "t.xml"
    case = '<testcase classname="tests.test_cuda{}" name="{}">{}</testcase>'
    skip = '<skipped message="LSTM extension unavailable: boom"/>'
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" time="12.5">' + "".join([
        case.format("", "test_a[x]", ""),
        case.format("", "test_b", '<failure message="AssertionError: conv grad of x: 3e-2 &gt; 1e-4&#10;more">'
                                  "trace</failure>"),
        case.format(".TestGroup", "test_c", '<error message="RuntimeError: CUDA error">trace</error>'),
        case.format("", "test_d", skip),
        case.format("", "test_e", skip),
    ]) + "</testsuite></testsuites>")
    text = report.test_summary(xml)
    assert text.splitlines()[0].startswith("1 passed, 1 failed, 1 errors, 2 skipped (5 tests, 12 s")
    assert "  FAILED tests/test_cuda.py::test_b: AssertionError: conv grad of x: 3e-2 > 1e-4" in text
    assert "  ERROR tests/test_cuda.py::TestGroup::test_c: RuntimeError: CUDA error" in text
    assert "  skipped x2: LSTM extension unavailable: boom" in text
    assert report.test_summary(tmp_path / "absent.xml").startswith("no test results")


def test_digest_merges_backends_and_factors_out_constant_dims():
    def row(backend, status="ok", median="2", speedup="", shape="B=32 T=150 E=256", dtype="float32"):
        return {"op": "attention", "mode": "fwd", "shape": shape, "dtype": dtype, "backend": backend,
                "status": status, "median_ms": median if status == "ok" else "", "speedup_vs_torch": speedup}
    rows = [row("torch"), row("fused", speedup="2.5"), row("compile", "skipped"),
            row("torch", median="3"), row("compile", speedup="1.25"),  # the torch.compile step's own run
            row("torch", shape="B=32 T=512 E=256"), row("fused", "mismatch", shape="B=32 T=512 E=256")]
    lines = report.digest(rows).splitlines()
    assert lines[0].split() == ["op", "mode", "dtype", "shape", "torch", "ms", "fused", "x", "compile", "x"]
    assert lines[2].split() == ["attention", "fwd", "f32", "T=150", "2", "2.50x", "1.25x"]
    assert lines[3].split() == ["attention", "fwd", "f32", "T=512", "2", "mismatch"]
    assert lines[-1] == "same in every row: attention B=32 E=256"


def test_output_check_names_each_problem(tmp_path):
    (tmp_path / "bench.csv").write_text("")
    (tmp_path / "extra.txt").write_text("")
    (tmp_path / "bad name.txt").write_text("")
    (tmp_path / "sub").mkdir()
    problems = report.check_outputs(tmp_path, ["bench.csv", "bad name.txt"], max_files=3)
    assert any(p.startswith("extra.txt: not one of the outputs") for p in problems)
    assert any(p.startswith("bad name.txt: name outside") for p in problems)
    assert any(p.startswith("sub: not a plain file") for p in problems)
    assert "4 entries, more than 3" in problems
    assert report.check_outputs(tmp_path / "sub", ["x"], 8) == []
