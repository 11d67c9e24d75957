"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80: no register spills, no local
memory, shared memory within the SM's per-block limit, and a case for every kernel, each case compiled with
the specialisation Triton's runtime gives the launch it records.

No GPU is needed: triton.compile targets an architecture and cuobjdump reads the cubin. The compiles run
in subprocesses without TRITON_INTERPRET (see fastmsc.tools.aot.collect). Run with ``-s`` or ``-rA``
to see the resource table.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmsc.tools import aot as _aot

SAMPLE = Path(__file__).with_name("_aot_sample.py")
RUNTIME_PROBE = Path(__file__).with_name("_aot_runtime.py")
DIVISIBLE = [["tt.divisibility", 16]]
TOOLCHAIN = _aot.toolchain_unavailable()
needs_toolchain = pytest.mark.skipif(TOOLCHAIN is not None, reason=f"cannot compile Triton for CUDA here: {TOOLCHAIN}")


def _cuda_backend_missing() -> str | None:
    try:
        from triton.backends import backends
    except Exception as exc:  # any import failure
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None if "nvidia" in backends else "triton has no CUDA backend"


# Specialising a launch needs Triton's CUDA backend (its binder), not its compiler tools.
needs_cuda_backend = pytest.mark.skipif(_cuda_backend_missing() is not None, reason=str(_cuda_backend_missing()))

CUOBJDUMP_OUTPUT = """
Resource usage:
 Common:
  GLOBAL:0
 Function _fwd_kernel:
  REG:168 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function helper_kernel: REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage_reads_both_layouts():
    usage = _aot.parse_resource_usage(CUOBJDUMP_OUTPUT)
    assert set(usage) == {"_fwd_kernel", "helper_kernel"}
    assert usage["_fwd_kernel"] == {"REG": 168, "STACK": 16, "SHARED": 1024, "LOCAL": 8, "CONSTANT[0]": 568,
                                    "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}
    assert usage["helper_kernel"]["REG"] == 32 and usage["helper_kernel"]["STACK"] == 0
    assert "GLOBAL" not in usage["_fwd_kernel"]


def _row(**overrides):
    fields = dict(module="m", case="c", kernel="k", config="w4 s2", dtype="fp16", arch=90, registers=100,
                  stack_bytes=0, local_bytes=0, static_shared_bytes=0, dynamic_shared_bytes=0, compile_seconds=1.0)
    fields.update(overrides)
    return _aot.KernelResources(**fields)


def test_problems_flag_spills_local_memory_and_shared_overflow():
    assert _row().problems() == []
    assert _row(arch=90, static_shared_bytes=1024, dynamic_shared_bytes=232448 - 1024).problems() == []
    (spill,) = _row(stack_bytes=40).problems()
    assert "spills" in spill and "40 bytes" in spill
    (local,) = _row(local_bytes=8).problems()
    assert "local memory" in local
    # The sm_80 limit is below sm_90's: a block that fits an H100 can overflow an A100.
    assert _row(arch=90, dynamic_shared_bytes=200_000).problems() == []
    (shared,) = _row(arch=80, dynamic_shared_bytes=200_000).problems()
    assert "200000 bytes of shared memory" in shared and "166912" in shared


def test_case_validation_names_the_case_and_the_problem():
    sample = _aot.load_module(str(SAMPLE))
    good = sample.AOT_CASES[0]
    _aot.validate_case(good)
    broken = {**good, "signature": dict(reversed(list(good["signature"].items())))}
    with pytest.raises(_aot.CaseError, match=r"'scale_fp32'.*every parameter of _scale_kernel in order"):
        _aot.validate_case(broken)
    with pytest.raises(_aot.CaseError, match=r"constexprs must give exactly.*\['BLOCK'\]"):
        _aot.validate_case({**good, "constexprs": {}})
    with pytest.raises(_aot.CaseError, match=r"lacks keys \['num_stages'\]"):
        _aot.validate_case({k: v for k, v in good.items() if k != "num_stages"})
    with pytest.raises(_aot.CaseError, match="num_warps must be a positive int"):
        _aot.validate_case({**good, "num_warps": 0})
    with pytest.raises(_aot.CaseError, match="not a @triton.jit function"):
        _aot.validate_case({**good, "kernel": len})


def test_case_validation_checks_attrs():
    sample = _aot.load_module(str(SAMPLE))
    good = {**sample.AOT_CASES[0], "attrs": {"x_ptr": DIVISIBLE, "n": DIVISIBLE}}
    _aot.validate_case(good)
    with pytest.raises(_aot.CaseError, match=r"attrs name 'BLOCK', which is not a non-constexpr parameter"):
        _aot.validate_case({**good, "attrs": {"BLOCK": DIVISIBLE}})
    with pytest.raises(_aot.CaseError, match=r"attrs\['n'\] must be a list of \[attribute, value\] pairs"):
        _aot.validate_case({**good, "attrs": {"n": 16}})


@needs_cuda_backend
def test_specialize_gives_divisibility_hints_and_constants_as_the_runtime_does():
    """Pointers 16-byte aligned and ints divisible by 16 get tt.divisibility 16; an int equal to 1 becomes the
    constexpr 1; a misaligned view, other ints and floats get nothing (works under the interpreter too)."""
    sample = _aot.load_module(str(SAMPLE))
    buffer = torch.empty(4096)
    spec = _aot.specialize(sample._scale_kernel, (buffer, buffer[4:], 4096, 0.5), {"BLOCK": 1024})
    assert spec["signature"] == {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "scale": "fp32",
                                 "BLOCK": "constexpr"}
    assert spec["attrs"] == {"x_ptr": DIVISIBLE, "y_ptr": DIVISIBLE, "n": DIVISIBLE}
    assert spec["constexprs"] == {"BLOCK": 1024}
    assert (spec["num_warps"], spec["num_stages"]) == (4, 3)  # Triton's defaults for a launch without them
    spec = _aot.specialize(sample._scale_kernel, (buffer[1:], buffer, 1, 2.0), {"BLOCK": 256, "num_warps": 8})
    assert spec["signature"]["n"] == "constexpr" and spec["constexprs"] == {"n": 1, "BLOCK": 256}
    assert spec["attrs"] == {"y_ptr": DIVISIBLE} and spec["num_warps"] == 8
    spec = _aot.specialize(sample._scale_kernel, (buffer, buffer, 17, 2.0), {"BLOCK": 256})
    assert spec["signature"]["n"] == "i32" and "n" not in spec["attrs"]
    case = _aot.launch_case("scale", sample._scale_kernel, (buffer, buffer, 17, 2.0), {"BLOCK": 256})
    _aot.validate_case(case)
    assert _aot.case_key(case) != _aot.case_key({**case, "attrs": {}})


@needs_cuda_backend
def test_record_launches_records_each_specialisation_once_and_restores_the_module():
    sample = _aot.load_module(str(SAMPLE))
    kernel, buffer = sample._scale_kernel, torch.empty(256)
    with _aot.record_launches(sample, AOT_CASES=[]) as log:
        assert sample.AOT_CASES == [] and sample._scale_kernel is not kernel
        log.label = "aligned"
        sample._scale_kernel[(1,)](buffer, buffer, 256, 1.0, BLOCK=256)
        sample._scale_kernel[(4,)](buffer, buffer, 256, 3.0, BLOCK=256)  # the same compilation
        log.label = "misaligned"
        sample._scale_kernel[(1,)](buffer[1:], buffer, 255, 1.0, BLOCK=256)
    assert sample._scale_kernel is kernel and sample.AOT_CASES != []
    assert [case["name"] for case in log.cases] == ["scale_kernel[aligned]", "scale_kernel[misaligned]"]
    assert log.cases[1]["attrs"] == {"y_ptr": DIVISIBLE}
    with pytest.raises(AttributeError, match="no global 'NOT_THERE'"):
        with _aot.record_launches(sample, NOT_THERE=1):
            pass
    assert sample._scale_kernel is kernel


@pytest.fixture(scope="module")
def runtime_launches() -> dict:
    """What Triton's own JITFunction.run asks its compiler for (tests/_aot_runtime.py, in a subprocess without
    TRITON_INTERPRET, with a stand-in sm_90 driver)."""
    done = subprocess.run([sys.executable, str(RUNTIME_PROBE)], capture_output=True, text=True, timeout=600,
                          env=_aot._clean_env(), cwd=str(_aot.REPO_ROOT))
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_cuda_backend
def test_specialize_is_what_the_runtime_compiles(runtime_launches):
    """fastmsc.tools.aot_cases.specialize gives, for the sample kernel's launches, exactly the signature,
    constants, attributes and launch settings that JITFunction.run hands to its compile step."""
    launches = runtime_launches["sample"]
    assert len(launches) == 4
    for launch in launches:
        ours = launch.pop("specialize")
        assert ours == {k: v for k, v in launch.items() if k != "kernel"}
    aligned, misaligned, unit, offset16 = launches
    assert aligned["attrs"] == {"x_ptr": DIVISIBLE, "y_ptr": DIVISIBLE, "n": DIVISIBLE}
    assert misaligned["attrs"] == {"y_ptr": DIVISIBLE}  # a float32 view 4 bytes in; n = 100
    assert unit["signature"]["n"] == "constexpr" and unit["constexprs"]["n"] == 1
    assert offset16["attrs"]["x_ptr"] == DIVISIBLE and "n" not in offset16["attrs"]


def _comparable(case: dict) -> str:
    """A case's compilation, as JSON text that compares equal for the same kernel, signature, constants,
    attributes and launch settings."""
    kernel = case["kernel"] if isinstance(case["kernel"], str) else _aot.unwrap_kernel(case["kernel"]).__name__
    return json.dumps([kernel, case["signature"], case["constexprs"], case["attrs"], case["num_warps"],
                       case["num_stages"]], sort_keys=True)


@needs_cuda_backend
def test_cases_hold_the_default_models_launches_as_the_runtime_specialises_them(runtime_launches):
    """Every launch of the default model's calls (3-channel input, 3 x 64 conv channels, one attention head of 256,
    B = 32, T = 150 with lengths and T = 512 without, every dtype), as Triton's runtime specialises it, is one of
    the compiled cases of its module: so the AOT check compiles what the model runs."""
    launches = runtime_launches["model"]
    kernels_seen = {launch["kernel"] for launch in launches}
    compiled = {}
    for module in _aot.kernel_modules():
        for case in importlib.import_module(module).aot_cases():
            compiled[_comparable(case)] = case["name"]
    missing = [launch for launch in launches if _comparable(launch) not in compiled]
    assert missing == [], f"{len(missing)} of {len(launches)} launches have no case, e.g. {missing[0]}"
    # Every entry kernel of the model's path, with the hints the runtime gives fresh tensors.
    assert {"_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_msc_forward_kernel",
            "_msc_grad_weight_partial_kernel", "_max_avg_pool_partial_kernel", "_max_avg_pool_combine_kernel",
            "_max_avg_pool_bwd_kernel"} <= kernels_seen
    forward = next(launch for launch in launches if launch["kernel"] == "_attention_fwd_kernel"
                   and launch["signature"]["Q"] == "*fp32" and launch["constexprs"]["HAS_LENGTHS"])
    assert forward["attrs"]["Q"] == DIVISIBLE and forward["attrs"]["stride_qt"] == DIVISIBLE
    assert forward["constexprs"]["H"] == 1 and forward["constexprs"]["stride_qd"] == 1
    assert "T" not in forward["attrs"]  # T = 150


def test_coverage_ignores_device_helpers_and_finds_missing_kernels():
    sample = _aot.load_module(str(SAMPLE))
    assert set(_aot.entry_kernels(sample)) == {"_scale_kernel", "_matmul_kernel", "_spill_kernel"}  # not _squash
    assert _aot.uncovered_kernels(sample, sample.ALL_CASES) == []
    assert _aot.uncovered_kernels(sample, sample.AOT_CASES) == ["_spill_kernel"]
    assert _aot.uncovered_kernels(sample, sample.SPILL_CASES) == ["_matmul_kernel", "_scale_kernel"]


@needs_toolchain
def test_machinery_measures_sample_kernels_and_detects_a_spill():
    report = _aot.collect([str(SAMPLE)], jobs=2)
    print(f"\nsample kernels ({report.seconds:.1f} s):\n{_aot.format_table(report.results)}")
    assert report.errors == [] and report.uncovered == {}
    by_case = {(r.case, r.arch): r for r in report.results}
    assert set(by_case) == {(c["name"], a) for c in _aot.load_module(str(SAMPLE)).ALL_CASES for a in _aot.ARCHS}
    for (case, _arch), row in by_case.items():
        assert row.registers > 0, row
        if case.startswith("spill"):
            assert row.stack_bytes + row.local_bytes > 0, f"the spilling kernel reported no spill: {row}"
            assert any("spills" in p for p in row.problems())
        else:
            assert row.problems() == [], row.problems()
    # tl.dot with 3 stages stages its A and B tiles through shared memory: 3 * (64*32 + 32*64) * 2 bytes.
    for arch in _aot.ARCHS:
        assert by_case[("matmul_fp16", arch)].shared_bytes >= 2 * (64 * 32 + 32 * 64) * 2
        assert by_case[("scale_fp32", arch)].dynamic_shared_bytes == 0


def _modules_with_triton_kernels() -> list[str]:
    found = []
    for path in sorted(_aot.KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    "triton.jit" in ast.unparse(d) or ast.unparse(d) == "jit" for d in node.decorator_list):
                found.append(f"fastmsc.kernels.{path.stem}")
                break
    return found


def test_every_module_with_triton_kernels_has_aot_cases():
    declared = {importlib.import_module(module).KERNELS.__name__ for module in _aot.kernel_modules()}
    missing = sorted(set(_modules_with_triton_kernels()) - declared)
    assert missing == [], f"these kernel modules define @triton.jit kernels but no <op>_aot.py declares them: {missing}"


@needs_toolchain
def test_every_kernel_compiles_for_sm90_and_sm80_without_spills():
    modules = _aot.kernel_modules()
    if not modules:
        pytest.skip("no fastmsc/kernels/<op>_aot.py yet")
    report = _aot.collect(modules, archs=_aot.ARCHS)
    table = _aot.format_table(report.results)
    print(f"\nAOT resource usage of {', '.join(modules)} ({len(report.results)} compilations, {report.seconds:.1f} s):"
          f"\n{table}")
    assert report.results, "no case compiled"
    problems = report.problems()
    assert problems == [], "\n".join(problems)


@needs_toolchain
def test_attention_cases_fit_the_shared_memory_bound_its_dispatch_assumes():
    """fused_unsupported declines attention calls whose shared-memory bound exceeds the GPU's per-block limit
    (99 KB on sm_86/sm_89): every case compiled for sm_80 must stay within the bound for its dtype and head dim.
    Triton gives sm_86/sm_89 the sm_80 code (the same shared memory, checked when this bound was set); sm_90 code
    stages wgmma operands in shared memory and may take more (105 KB for the fp32 dQ kernel at head dim 64), which
    the 227 KB of every sm_90 GPU holds (checked by the spill test's shared-memory limit)."""
    from fastmsc.kernels import attention, attention_aot
    module = "fastmsc.kernels.attention_aot"
    cases = {case["name"]: case for case in attention_aot.aot_cases()}
    report = _aot.collect([module], archs=_aot.ARCHS)
    assert report.errors == [] and len(report.results) == len(cases) * len(_aot.ARCHS)
    pointer = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}
    for row in report.results:
        if row.arch != 80:
            continue
        signature = cases[row.case]["signature"]
        dtype = pointer[next(signature[name] for name in ("Q", "OUT", "DQ") if name in signature)]
        bound = attention.shared_bytes_bound(dtype, cases[row.case]["constexprs"]["HEAD_DIM"])
        assert row.shared_bytes <= bound, f"{row.case} on sm_{row.arch} needs {row.shared_bytes} bytes > {bound}"
    # The bound is the sm_86/sm_89 limit, for every dtype and head dim: those GPUs take every call.
    assert attention.SMALL_SHARED_BYTES == _aot.SHARED_LIMIT_BYTES[86] == _aot.SHARED_LIMIT_BYTES[89]
    for dtype in pointer.values():
        for head_dim in (1, 96, 97, 256):
            assert attention.shared_bytes_bound(dtype, head_dim) == attention.SMALL_SHARED_BYTES


@needs_toolchain
def test_resident_lstm_cases_fit_the_shared_memory_bound_its_launcher_assumes():
    """lstm_persistent.resident() runs the resident kernels only where resident_shared_bytes(H, dtype) fits the GPU's
    per-block limit: every resident compilation, on sm_80 and sm_90, must stay within that bound, or a GPU near the
    limit would refuse the launch."""
    from fastmsc.kernels import lstm_layer_aot, lstm_persistent
    cases = {case["name"]: case for case in lstm_layer_aot.aot_cases()}
    report = _aot.collect(["fastmsc.kernels.lstm_layer_aot"], archs=_aot.ARCHS)
    assert report.errors == []
    pointer = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}
    checked = set()
    for row in report.results:
        if "resident" not in row.kernel:
            continue
        label = row.case.split("[", 1)[1]  # "bfloat16 H128 resident training]"
        hidden = int(label.split()[1][1:])
        dtype = pointer[cases[row.case]["signature"]["W_HH"]]
        bound = lstm_persistent.resident_shared_bytes(hidden, dtype)
        assert row.shared_bytes <= bound, f"{row.case} on sm_{row.arch} needs {row.shared_bytes} bytes > {bound}"
        checked.add((hidden, dtype, row.arch))
    assert {(128, torch.bfloat16, 90), (128, torch.bfloat16, 80), (64, torch.float32, 90)} <= checked
