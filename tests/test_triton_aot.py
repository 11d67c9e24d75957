"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80: no register spills, no local
memory, shared memory within the SM's per-block limit, and a case for every kernel.

No GPU is needed: triton.compile targets an architecture and cuobjdump reads the cubin. The compiles run
in subprocesses without TRITON_INTERPRET (see fastmsc.kernels._aot.collect). Run with ``-s`` or ``-rA``
to see the resource table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastmsc.kernels import _aot

SAMPLE = Path(__file__).with_name("_aot_sample.py")
TOOLCHAIN = _aot.toolchain_unavailable()
needs_toolchain = pytest.mark.skipif(TOOLCHAIN is not None, reason=f"cannot compile Triton for CUDA here: {TOOLCHAIN}")

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


def test_coverage_ignores_device_helpers_and_finds_missing_kernels():
    sample = _aot.load_module(str(SAMPLE))
    assert set(_aot.entry_kernels(sample)) == {"_scale_kernel", "_matmul_kernel", "_spill_kernel"}  # not _squash
    assert _aot.uncovered_kernels(sample, sample.ALL_CASES) == []
    assert _aot.uncovered_kernels(sample, sample.AOT_CASES) == ["_spill_kernel"]
    assert _aot.uncovered_kernels(sample, sample.SPILL_CASES) == ["_matmul_kernel", "_scale_kernel"]


@needs_toolchain
def test_machinery_measures_sample_kernels_and_detects_a_spill():
    report = _aot.collect([str(SAMPLE)], attr="ALL_CASES", jobs=2)
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


def test_every_module_with_triton_kernels_lists_aot_cases():
    missing = sorted(set(_modules_with_triton_kernels()) - set(_aot.kernel_modules()))
    assert missing == [], f"these kernel modules define @triton.jit kernels but no AOT_CASES: {missing}"


@needs_toolchain
def test_every_kernel_compiles_for_sm90_and_sm80_without_spills():
    modules = _aot.kernel_modules()
    if not modules:
        pytest.skip("no module in fastmsc/kernels defines AOT_CASES yet")
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
    (99 KB on sm_86/sm_89): every compiled case must stay within the bound for its dtype and head dim."""
    from fastmsc.kernels import attention
    module = "fastmsc.kernels.attention"
    cases = {case["name"]: case for case in attention.AOT_CASES}
    report = _aot.collect([module], archs=_aot.ARCHS)
    assert report.errors == [] and len(report.results) == len(cases) * len(_aot.ARCHS)
    for row in report.results:
        dtype = next(d for d in (torch.float32, torch.float16, torch.bfloat16) if f"_{str(d)[6:]}_" in row.case)
        bound = attention.shared_bytes_bound(dtype, cases[row.case]["constexprs"]["HEAD_DIM"])
        assert row.shared_bytes <= bound, f"{row.case} on sm_{row.arch} needs {row.shared_bytes} bytes > {bound}"
    # The small bound is the sm_86/sm_89 limit: only float32 with a head dim above 96 needs more.
    assert attention.SMALL_SHARED_BYTES == _aot.SHARED_LIMIT_BYTES[86] == _aot.SHARED_LIMIT_BYTES[89]
    assert attention.shared_bytes_bound(torch.float32, 96) == attention.SMALL_SHARED_BYTES
    assert attention.shared_bytes_bound(torch.float32, 97) == attention.LARGE_SHARED_BYTES
    assert attention.shared_bytes_bound(torch.bfloat16, 256) == attention.SMALL_SHARED_BYTES
    assert attention.LARGE_SHARED_BYTES <= min(_aot.SHARED_LIMIT_BYTES[arch] for arch in _aot.ARCHS)
