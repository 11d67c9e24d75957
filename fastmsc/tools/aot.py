"""Ahead-of-time compilation of the Triton kernels for chosen GPU architectures, with resource checks.

Each op with Triton kernels declares its compilations in ``fastmsc/kernels/<op>_aot.py``: ``aot_cases()`` returns
the case dicts (see :mod:`fastmsc.tools.aot_cases`) recorded from the op's own launchers on meta tensors, and
``KERNELS`` is the module that defines the op's @triton.jit kernels, each of which needs a case. Those modules
are imported only here, so nothing of this runs when fastmsc or a kernel module is imported. Identical
specialisations are compiled once.

Each case is compiled with ``triton.compile`` for a ``GPUTarget("cuda", arch, 32)`` without a GPU, and the
cubin's resource usage is read with ``cuobjdump --dump-resource-usage``:

* registers per thread (REG);
* spilled bytes: ptxas puts register spills in the per-thread stack frame (STACK) and ``.local``
  arrays in LOCAL; either one means slow local-memory traffic, so both must be zero;
* shared memory per block: the static part (SHARED) plus the dynamic part Triton launches with
  (``metadata.shared``), which must fit the architecture's per-block opt-in limit.

Triton picks the interpreter instead of the compiler when TRITON_INTERPRET=1 is set at import time
(the test suite sets it on machines without a GPU), so :func:`collect` always compiles in worker
subprocesses whose environment lacks it, several at once.

Command line: ``python -m fastmsc.tools.aot [--arch 90 --arch 80] [--jobs N] [--module NAME] [--json]``
prints one row per case and arch (``div16`` in the config column counts the arguments with a divisibility
hint), and exits 1 when a kernel spills, overflows shared memory, fails to compile or has no case.

Cost: a cold compile takes 0.1-10 s per case and arch on one core (the fp32 attention kernels at head dims
200-256 the longest); the whole check is about 490 compilations, 5 CPU-minutes. Triton's cache ($TRITON_CACHE_DIR,
default ~/.triton/cache) makes an unchanged case instant (``compile_s`` 0.0; its key includes line numbers, so a
moved kernel compiles again), so CI should keep that folder. $FASTMSC_AOT_JOBS sets the number of compiler
processes (default: the CPU count, at most 8), $FASTMSC_AOT_TIMEOUT the seconds allowed for a run (default 1200).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .aot_cases import (  # noqa: F401  (the case helpers are part of the tool's interface)
    CaseError,
    case_key,
    entry_kernels,
    launch_case,
    load_module,
    record_launches,
    specialize,
    uncovered_kernels,
    unwrap_kernel,
    validate_case,
)

ARCHS = (90, 80)

# Largest shared memory one block may use after opting in (cudaFuncAttributeMaxDynamicSharedMemorySize):
# 227 KiB on sm_90 (H100), 163 KiB on sm_80 (A100).
SHARED_LIMIT_BYTES = {90: 232448, 80: 166912, 89: 101376, 86: 101376}

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO_ROOT / "fastmsc" / "kernels"


@dataclass(frozen=True)
class KernelResources:
    """Resource usage of one compiled case on one architecture."""

    module: str
    case: str
    kernel: str
    config: str
    dtype: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    static_shared_bytes: int
    dynamic_shared_bytes: int
    compile_seconds: float

    @property
    def shared_bytes(self) -> int:
        return self.static_shared_bytes + self.dynamic_shared_bytes

    @property
    def shared_limit_bytes(self) -> int | None:
        return SHARED_LIMIT_BYTES.get(self.arch)

    def problems(self) -> list[str]:
        """Sentences describing what is wrong with this kernel on this architecture (empty when fine)."""
        where = f"{self.module}:{self.case} on sm_{self.arch}"
        found = []
        if self.stack_bytes:
            found.append(f"{where} spills registers: {self.stack_bytes} bytes of stack frame per thread "
                         f"({self.registers} registers); use smaller blocks or more warps")
        if self.local_bytes:
            found.append(f"{where} uses {self.local_bytes} bytes of local memory per thread")
        limit = self.shared_limit_bytes
        if limit is not None and self.shared_bytes > limit:
            found.append(f"{where} needs {self.shared_bytes} bytes of shared memory per block, more than the "
                         f"{limit} bytes sm_{self.arch} allows; use fewer stages or smaller blocks")
        return found


@dataclass
class AotReport:
    """What :func:`collect` found: one row per compiled case, plus every failure."""

    results: list[KernelResources] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # cases that did not compile, broken case dicts
    uncovered: dict[str, list[str]] = field(default_factory=dict)  # module -> kernels without a case
    seconds: float = 0.0

    def problems(self) -> list[str]:
        found = [p for r in self.results for p in r.problems()] + list(self.errors)
        for module, names in sorted(self.uncovered.items()):
            found.append(f"{module}: kernels without a case: {', '.join(names)}")
        return found


# ----------------------------------------------------------------------------------------------------------
# Toolchain
# ----------------------------------------------------------------------------------------------------------


def _nvidia_tool(name: str) -> str | None:
    """Path of a CUDA tool Triton uses (its bundled copy unless TRITON_<NAME>_PATH points elsewhere)."""
    try:
        import triton
    except Exception:  # a missing or broken triton means no tools
        return None
    try:
        tool = getattr(triton.knobs.nvidia, name).get()
        if tool is not None:
            return tool.path
    except Exception:  # older triton without knobs: fall back to the bundled location
        pass
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() and os.access(bundled, os.X_OK) else None


def toolchain_unavailable() -> str | None:
    """Why kernels cannot be compiled ahead of time here, or None when they can."""
    try:
        import triton
    except Exception as exc:  # any import failure
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        from triton.backends import backends
    except Exception as exc:
        return f"triton's backends cannot be listed ({type(exc).__name__}: {exc})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no CUDA backend (backends: {', '.join(sorted(backends)) or 'none'})"
    for tool in ("ptxas", "cuobjdump"):
        if _nvidia_tool(tool) is None:
            return f"triton's CUDA backend lacks a working {tool} (bundled or via TRITON_{tool.upper()}_PATH)"
    return None


_FUNCTION_HEAD = re.compile(r"^Function\s+([^:\s]+)\s*:(.*)$")
_RESOURCE_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Parse ``cuobjdump --dump-resource-usage`` output into {function: {"REG": n, "STACK": n, ...}}.

    The fields follow a ``Function <name>:`` line, on the same line or the next one depending on the
    CUDA version; other headings (``Common:``) end a function's section.
    """
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        head = _FUNCTION_HEAD.match(stripped)
        if head:
            current = head.group(1)
            functions[current] = {}
            stripped = head.group(2)
        elif stripped.endswith(":") and not _RESOURCE_FIELD.search(stripped):
            current = None
        if current is not None:
            for key, value in _RESOURCE_FIELD.findall(stripped):
                functions[current][key] = int(value)
    return functions


def cubin_resources(cubin: bytes) -> dict[str, dict[str, int]]:
    """Resource usage of every function in a cubin (see :func:`parse_resource_usage`)."""
    cuobjdump = _nvidia_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found; " + (toolchain_unavailable() or "set TRITON_CUOBJDUMP_PATH"))
    with tempfile.TemporaryDirectory(prefix="fastmsc_aot_") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    parsed = parse_resource_usage(done.stdout)
    if not parsed:
        raise RuntimeError(f"cuobjdump printed no function resource usage:\n{done.stdout}")
    return parsed


# ----------------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------------

def _describe_dtype(signature: dict) -> str:
    floats = []
    for kind in signature.values():
        if isinstance(kind, str) and kind.startswith("*") and kind[1:].startswith(("fp", "bf")):
            if kind[1:] not in floats:
                floats.append(kind[1:])
    return "/".join(floats) or "-"


def _describe_config(case: dict) -> str:
    parts = [f"{k}={v}" for k, v in case["constexprs"].items() if isinstance(v, (int, bool))]
    arguments = [name for name, kind in case["signature"].items() if kind != "constexpr"]
    hinted = [name for name in arguments if case.get("attrs", {}).get(name)]
    registers = f" maxnreg={case['maxnreg']}" if "maxnreg" in case else ""
    return (f"w{case['num_warps']} s{case['num_stages']}{registers} " + " ".join(parts)
            + f" div16={len(hinted)}/{len(arguments)}")


def compile_case(case: dict, arch: int, module: str = "") -> KernelResources:
    """Compile one case for sm_<arch> and measure its resources. Needs TRITON_INTERPRET unset at triton import."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    validate_case(case, f"{module} AOT case" if module else "AOT case")
    fn = unwrap_kernel(case["kernel"])
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so kernels are not compilable in this "
                           "process; use collect(), which compiles in subprocesses without it")
    start = time.perf_counter()
    # The runtime's attributes (tt.divisibility of aligned pointers and ints divisible by 16), keyed by argument
    # path as JITFunction._pack_args passes them.
    attrs = {(fn.arg_names.index(name),): [list(pair) for pair in value]
             for name, value in case.get("attrs", {}).items()}
    source = ASTSource(fn=fn, signature=dict(case["signature"]), constexprs=dict(case["constexprs"]), attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", int(arch), 32),
                              options={"num_warps": case["num_warps"], "num_stages": case["num_stages"],
                                       **({"maxnreg": case["maxnreg"]} if "maxnreg" in case else {})})
    seconds = time.perf_counter() - start
    usage = cubin_resources(compiled.asm["cubin"])
    name = compiled.metadata.name
    if name not in usage:
        if len(usage) != 1:
            raise RuntimeError(f"cuobjdump lists {sorted(usage)}, not the kernel {name}")
        name = next(iter(usage))
    fields = usage[name]
    return KernelResources(
        module=module, case=case["name"], kernel=fn.__name__, config=_describe_config(case),
        dtype=_describe_dtype(case["signature"]), arch=int(arch), registers=fields.get("REG", 0),
        stack_bytes=fields.get("STACK", 0), local_bytes=fields.get("LOCAL", 0),
        static_shared_bytes=fields.get("SHARED", 0), dynamic_shared_bytes=int(compiled.metadata.shared),
        compile_seconds=round(seconds, 2),
    )


# ----------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------


def kernel_modules() -> list[str]:
    """The ``fastmsc.kernels.<op>_aot`` modules that declare the ops' compilations, found without importing them."""
    return [f"fastmsc.kernels.{path.stem}" for path in sorted(KERNELS_DIR.glob("*_aot.py"))]


def _without_duplicates(tasks):
    """Drop tasks that compile exactly what an earlier one compiles (same :func:`case_key` and arch), e.g. when
    two ops' recorded launches coincide."""
    seen, unique = set(), []
    for task in tasks:
        _, _, case, arch = task
        try:
            key = (*case_key(case), arch)
        except (TypeError, KeyError, AttributeError):  # a malformed case: let compile_case report it
            unique.append(task)
            continue
        if key not in seen:
            seen.add(key)
            unique.append(task)
    return unique


def _worker(modules: list[str], archs: list[int], shard: int, shards: int) -> int:
    """Compile this shard's (module, case, arch) tasks; print one JSON record per line."""
    def emit(record):
        print(json.dumps(record), flush=True)

    tasks = []
    for spec in modules:
        try:
            module = load_module(spec)
            cases = module.aot_cases()
            if not isinstance(cases, (list, tuple)):
                raise CaseError(f"aot_cases() must return a list of case dicts, got {type(cases).__name__}")
        except Exception as exc:
            if shard == 0:
                emit({"error": f"{spec}: cannot build its cases ({type(exc).__name__}: {exc})"})
            continue
        if shard == 0:
            emit({"uncovered": uncovered_kernels(module.KERNELS, cases), "module": spec})
        tasks += [(spec, index, case, arch) for index, case in enumerate(cases) for arch in archs]
    tasks = _without_duplicates(tasks)
    for spec, index, case, arch in tasks[shard::shards]:
        label = case.get("name", f"#{index}") if isinstance(case, dict) else f"#{index}"
        emit({"started": f"{spec}:{label} on sm_{arch}"})
        try:
            emit({"result": asdict(compile_case(case, arch, spec))})
        except Exception as exc:  # report the case and carry on with the others
            message = f"{exc}".strip().splitlines()
            emit({"error": f"{spec}:{label} on sm_{arch} did not compile ({type(exc).__name__}: "
                           f"{' '.join(message)[:2000]})"})
    return 0


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def default_jobs() -> int:
    if os.environ.get("FASTMSC_AOT_JOBS"):
        return max(1, int(os.environ["FASTMSC_AOT_JOBS"]))
    return max(1, min(8, os.cpu_count() or 1))


def default_timeout() -> float:
    """Seconds allowed for a whole :func:`collect` run: $FASTMSC_AOT_TIMEOUT, else 1200."""
    return float(os.environ.get("FASTMSC_AOT_TIMEOUT") or 1200.0)


def collect(modules: list[str] | None = None, archs=ARCHS, jobs: int | None = None,
            timeout: float | None = None) -> AotReport:
    """Compile every case of ``modules`` (dotted names or .py paths; default: all kernel modules) for every
    arch in ``jobs`` worker subprocesses without TRITON_INTERPRET. A case that fails to compile, or the
    ``timeout`` (seconds for the whole run) expiring, becomes an entry of ``errors``; a worker that dies
    raises RuntimeError."""
    modules = kernel_modules() if modules is None else list(modules)
    report = AotReport()
    if not modules:
        return report
    jobs = default_jobs() if jobs is None else max(1, jobs)
    timeout = default_timeout() if timeout is None else timeout
    start = time.perf_counter()
    workers = []
    for shard in range(jobs):
        command = [sys.executable, "-m", "fastmsc.tools.aot", "--worker", f"--shard={shard}", f"--shards={jobs}",
                   *[f"--arch={a}" for a in archs], *[f"--module={m}" for m in modules]]
        workers.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=_clean_env(), cwd=str(REPO_ROOT)))
    deadline = time.monotonic() + timeout
    outputs, timed_out = [], False
    for proc in workers:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        outputs.append((proc, out, err))
    for shard, (proc, out, err) in enumerate(outputs):
        if proc.returncode != 0 and not timed_out:
            raise RuntimeError(f"AOT worker {shard} exited with {proc.returncode}:\n{err[-4000:]}")
        in_flight = None
        for line in out.splitlines():
            if not line.startswith("{"):
                continue  # a kernel module printing something
            record = json.loads(line)
            if "started" in record:
                in_flight = record["started"]
            elif "result" in record:
                in_flight = None
                report.results.append(KernelResources(**record["result"]))
            elif "error" in record:
                in_flight = None
                report.errors.append(record["error"])
            elif "uncovered" in record and record["uncovered"]:
                report.uncovered[record["module"]] = record["uncovered"]
        if timed_out and proc.returncode != 0:
            report.errors.append(f"AOT compilation stopped after {timeout:.0f} s; worker {shard} was compiling "
                                 f"{in_flight or 'nothing yet (still importing)'}")
    order = {m: i for i, m in enumerate(modules)}
    report.results.sort(key=lambda r: (order.get(r.module, 0), r.kernel, r.case, -r.arch))
    report.seconds = round(time.perf_counter() - start, 1)
    return report


def format_table(results: list[KernelResources]) -> str:
    """One row per (kernel, config, dtype, arch): registers, spill stack, local, shared bytes and its limit."""
    header = ("module", "kernel", "case", "config", "dtype", "arch", "regs", "stack", "local", "shared", "limit",
              "compile_s", "status")
    rows = [header]
    for r in results:
        status = "ok" if not r.problems() else "FAIL"
        module = Path(r.module).stem if r.module.endswith(".py") else r.module.rsplit(".", 1)[-1]
        rows.append((module, r.kernel, r.case, r.config, r.dtype, f"sm_{r.arch}",
                     str(r.registers), str(r.stack_bytes), str(r.local_bytes), str(r.shared_bytes),
                     str(r.shared_limit_bytes or "?"), f"{r.compile_seconds:.1f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmsc.tools.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable; "
                        "default 90 and 80)")
    parser.add_argument("--module", action="append", help="kernel module (dotted name or .py path; repeatable; "
                        "default: every fastmsc/kernels/<op>_aot.py)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = args.arch or list(ARCHS)
    if args.worker:
        return _worker(args.module or [], archs, args.shard, args.shards)
    reason = toolchain_unavailable()
    if reason is not None:
        print(f"cannot compile ahead of time: {reason}", file=sys.stderr)
        return 2
    modules = args.module or kernel_modules()
    if not modules:
        print(f"no <op>_aot.py under {KERNELS_DIR}", file=sys.stderr)
        return 0
    report = collect(modules, archs, args.jobs)
    if args.json:
        print(json.dumps([asdict(r) for r in report.results], indent=2))
    else:
        print(format_table(report.results))
        print(f"{len(report.results)} compilations in {report.seconds:.1f} s with {args.jobs or default_jobs()} jobs")
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
