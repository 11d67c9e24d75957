"""The compilations the ahead-of-time check (:mod:`fastmsc.tools.aot`) makes: one case dict per compilation.

A case (see :func:`validate_case`) names a @triton.jit kernel, its signature, constants, compiler attributes,
warps and stages. Triton's runtime compiles a kernel per specialisation of its arguments: a pointer whose address
is a multiple of 16 bytes and an int divisible by 16 get a ``tt.divisibility`` hint, an int equal to 1 becomes a
constant, and these change the generated code and its register needs. So the cases describe real launches: each
``fastmsc/kernels/<op>_aot.py`` runs its op's own launch functions on meta tensors of representative shapes under
:func:`record_launches`, which stands in for the kernels and turns each ``kernel[grid](*args, **kwargs)`` into the
case the runtime would compile (:func:`specialize`, which calls Triton's own binder), so a change to a launcher is
checked without any case to update. Nothing here runs at import of fastmsc or of a kernel module.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

CASE_KEYS = ("name", "kernel", "signature", "constexprs", "num_warps", "num_stages")
# The architecture whose CUDA backend specialises recorded launches (see specialize). Triton's CUDA backend
# specialises arguments the same way for every architecture, so one is enough.
SPECIALIZATION_ARCH = 90


class CaseError(ValueError):
    """An AOT case dict that does not describe its kernel."""




def unwrap_kernel(obj):
    """The JITFunction (or, under TRITON_INTERPRET=1, the interpreter's stand-in) a case names."""
    if not hasattr(obj, "arg_names") or python_function(obj) is None:
        raise CaseError("kernel is not a @triton.jit function")
    return obj


def python_function(obj):
    """The plain Python function of a @triton.jit kernel, or None."""
    fn = obj if inspect.isfunction(obj) else getattr(obj, "fn", None)
    return fn if inspect.isfunction(fn) else None


def _is_triton_kernel_object(obj) -> bool:
    try:
        from triton.runtime.jit import JITFunction
    except Exception:
        return False
    kinds = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        kinds.append(InterpretedFunction)
    except Exception:
        pass
    return isinstance(obj, tuple(kinds))


def case_key(case: dict) -> tuple:
    """What a compilation of ``case`` depends on: kernel, signature, constants, attributes and launch settings.
    Two cases with the same key compile to the same binary."""
    return (id(python_function(case["kernel"])), tuple(case["signature"].items()),
            tuple(sorted((k, repr(v)) for k, v in case["constexprs"].items())),
            tuple(sorted((k, repr(v)) for k, v in case.get("attrs", {}).items())),
            case["num_warps"], case["num_stages"], case.get("maxnreg"))


def validate_case(case, where: str = "AOT case") -> None:
    """Check one case dict: ``name``, ``kernel`` (a @triton.jit function), ``signature`` (every parameter in
    order: "*fp32", "i32", ..., "constexpr"), ``constexprs`` (a value for every "constexpr" parameter),
    ``num_warps`` and ``num_stages`` (ints), optionally ``maxnreg`` (the launch's register limit per thread, an
    int), and optionally ``attrs``: {parameter: [["tt.divisibility", 16]]},
    the compiler attributes of the runtime's specialisation (see :func:`specialize`); a parameter without an
    entry gets none. Raises CaseError naming the case and the problem."""
    if not isinstance(case, dict):
        raise CaseError(f"{where} must be a dict, got {type(case).__name__}")
    where = f"{where} {case.get('name', '<unnamed>')!r}"
    missing = [k for k in CASE_KEYS if k not in case]
    if missing:
        raise CaseError(f"{where} lacks keys {missing}; expected {list(CASE_KEYS)}")
    try:
        fn = unwrap_kernel(case["kernel"])
    except CaseError as exc:
        raise CaseError(f"{where}: {exc}") from None
    signature, constexprs = case["signature"], case["constexprs"]
    if not isinstance(signature, dict) or not isinstance(constexprs, dict):
        raise CaseError(f"{where}: signature and constexprs must be dicts")
    if list(signature) != list(fn.arg_names):
        raise CaseError(f"{where}: signature must name every parameter of {fn.__name__} in order "
                        f"{list(fn.arg_names)}, got {list(signature)}")
    wanted = [name for name, kind in signature.items() if kind == "constexpr"]
    if sorted(constexprs) != sorted(wanted):
        raise CaseError(f"{where}: constexprs must give exactly the constexpr parameters {wanted}, "
                        f"got {list(constexprs)}")
    bad = {name: kind for name, kind in signature.items() if not isinstance(kind, str) or not kind}
    if bad:
        raise CaseError(f"{where}: signature types must be strings like '*fp32', 'i32' or 'constexpr', got {bad}")
    for key in ("num_warps", "num_stages", "maxnreg"):
        value = case.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CaseError(f"{where}: {key} must be a positive int, got {value!r}")
    attrs = case.get("attrs", {})
    if not isinstance(attrs, dict):
        raise CaseError(f"{where}: attrs must be a dict {{parameter: [[attribute, value], ...]}}")
    for name, value in attrs.items():
        if signature.get(name) in (None, "constexpr"):
            raise CaseError(f"{where}: attrs name {name!r}, which is not a non-constexpr parameter")
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) for pair in value):
            raise CaseError(f"{where}: attrs[{name!r}] must be a list of [attribute, value] pairs, got {value!r}")



# ----------------------------------------------------------------------------------------------------------
# Runtime specialisation
# ----------------------------------------------------------------------------------------------------------


def runtime_kernel(kernel):
    """The JITFunction whose binder Triton's launcher runs for ``kernel``.
    Under TRITON_INTERPRET=1 @triton.jit makes an InterpretedFunction, which has no binder: then a JITFunction
    of the same Python function and specialisation options (nothing is compiled by building it)."""
    fn = unwrap_kernel(kernel)
    if hasattr(fn, "params") and hasattr(fn, "_pack_args"):
        return fn
    from triton.runtime.jit import JITFunction

    options = getattr(fn, "kwargs", {})
    cached = getattr(fn, "_fastmsc_runtime_kernel", None)
    if cached is None:
        cached = JITFunction(python_function(fn), **{k: options[k] for k in (
            "do_not_specialize", "do_not_specialize_on_alignment") if options.get(k) is not None})
        fn._fastmsc_runtime_kernel = cached
    return cached


_BINDERS: dict = {}


def _runtime_binder(jit_fn, arch: int):
    """(backend, binder) as JITFunction.create_binder makes them on an sm_<arch> GPU."""
    key = (id(jit_fn), arch)
    if key not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", int(arch), 32))
        _BINDERS[key] = (jit_fn, backend, create_function_from_signature(jit_fn.signature, jit_fn.params, backend))
    return _BINDERS[key][1:]


def specialize(kernel, args, kwargs, arch: int = SPECIALIZATION_ARCH) -> dict:
    """The compilation Triton's runtime asks for when a launcher calls ``kernel[grid](*args, **kwargs)`` on an
    sm_<arch> GPU: {"signature", "constexprs", "attrs", "num_warps", "num_stages"[, "maxnreg"]} as in a case dict.

    This runs Triton's own code, so it cannot drift from the runtime: the binder of
    ``triton.runtime.jit.create_function_from_signature`` (which specialises each argument with
    ``native_specialize_impl``: a pointer whose address is a multiple of 16 bytes and an int divisible by 16 get
    "D", an int equal to 1 becomes the constexpr 1, None a constexpr None, floats "fp32" without attributes),
    then ``JITFunction._pack_args`` (``backend.parse_attr``: "D" -> [["tt.divisibility", 16]]). Tensors may live
    on any device: only their dtype and address matter, and a fresh CPU, CUDA or meta tensor is 16-byte aligned
    (a view at an offset may not be)."""
    jit_fn = runtime_kernel(kernel)
    backend, binder = _runtime_binder(jit_fn, arch)
    kwargs = dict(kwargs)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    names = list(jit_fn.arg_names)
    if any(len(path) != 1 for path in [*constexprs, *attrs]):
        raise CaseError(f"{jit_fn.__name__} takes tuple arguments, which AOT cases do not describe")
    return {"signature": dict(signature), "constexprs": {names[path[0]]: value for path, value in constexprs.items()},
            "attrs": {names[path[0]]: value for path, value in attrs.items() if value},
            "num_warps": options.num_warps, "num_stages": options.num_stages,
            **({"maxnreg": options.maxnreg} if getattr(options, "maxnreg", None) is not None else {})}


def launch_case(name: str, kernel, args, kwargs, arch: int = SPECIALIZATION_ARCH) -> dict:
    """A case dict for one launch ``kernel[grid](*args, **kwargs)`` (see :func:`specialize`)."""
    return {"name": name, "kernel": unwrap_kernel(kernel), **specialize(kernel, args, kwargs, arch)}


class LaunchLog:
    """The cases recorded by :func:`record_launches`, without repeats: a launch whose compilation an earlier
    one already asked for (same :func:`case_key`) adds nothing. A case is named ``<kernel>[<label>]`` after
    the ``label`` set when it was first launched."""

    def __init__(self):
        self.cases: list[dict] = []
        self.label = ""
        self._keys: set = set()

    def add(self, kernel, args, kwargs) -> None:
        name = f"{unwrap_kernel(kernel).__name__.strip('_')}[{self.label}]"
        case = launch_case(name, kernel, args, kwargs)
        key = case_key(case)
        if key not in self._keys:
            self._keys.add(key)
            self.cases.append(case)


class _LaunchRecorder:
    """Stands in for a kernel: ``recorder[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, log: LaunchLog):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.add(self.kernel, args, kwargs)


@contextlib.contextmanager
def record_launches(module, **overrides):
    """Run ``module``'s launcher functions without launching anything: inside the block every entry kernel of
    ``module`` (see :func:`entry_kernels`) is replaced by a recorder, so each ``kernel[grid](*args, **kwargs)``
    adds the case Triton's runtime would compile for it to the yielded :class:`LaunchLog`. Each keyword
    replaces the module global of that name meanwhile, e.g. a function that asks the device, so that the
    launchers, given meta or CPU tensors, choose as on a GPU. Everything is put back on exit.

    The launchers' own code then defines the cases: a change to their arguments, layouts or heuristics is
    compiled by the next check without any case to update. The replacement is process-wide: nothing else may
    launch the module's kernels meanwhile (the AOT check and the tests build cases in their own processes)."""
    log = LaunchLog()
    saved = {}
    try:
        for name, value in overrides.items():
            if not hasattr(module, name):
                raise AttributeError(f"{module.__name__} has no global {name!r} to override")
            saved[name] = getattr(module, name)
            setattr(module, name, value)
        for name in entry_kernels(module):
            saved[name] = getattr(module, name)
            setattr(module, name, _LaunchRecorder(saved[name], log))
        yield log
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def load_module(spec: str):
    """Import a module by dotted name, or from a .py file path."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        name = f"_fastmsc_aot_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _referenced_names(func) -> set[str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return set()
    body = tree.body[0].body if tree.body and hasattr(tree.body[0], "body") else []
    return {node.id for stmt in body for node in ast.walk(stmt) if isinstance(node, ast.Name)}


def entry_kernels(module) -> dict[str, object]:
    """The @triton.jit functions among ``module``'s globals (defined there or imported, as a launcher module
    imports its op's kernels) that are launched from Python, by global name.

    A jit function another jit function of the module calls is a device helper, inlined into its
    callers and compiled with them, so it needs no case of its own.
    """
    jitted = {}
    for name, obj in vars(module).items():
        if _is_triton_kernel_object(obj):
            base = python_function(obj)
            if base is not None:
                jitted[name] = base
    called = set()
    for name, base in jitted.items():
        called |= _referenced_names(base) - {name}
    return {name: base for name, base in jitted.items() if name not in called}


def uncovered_kernels(module, cases) -> list[str]:
    """Entry kernels of ``module`` that no case compiles."""
    covered = set()
    for case in cases:
        if isinstance(case, dict) and "kernel" in case:
            base = python_function(case["kernel"])
            if base is not None:
                covered.add(base)
    return sorted(name for name, base in entry_kernels(module).items() if base not in covered)
