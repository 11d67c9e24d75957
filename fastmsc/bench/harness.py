"""The measuring loop: for each case and mode, check every backend against the reference, then time them
round-robin.

Backends (``BACKEND_CHOICES``):

* ``reference``: the float64-capable oracle, run at the benchmark dtype (slow: only in --quick or on request);
* ``torch``: stock PyTorch, the baseline every speed-up is relative to (attention: SDPA with 4-D inputs, its
  row naming the SDPA kernel that ran);
* ``naive``: for ops with a hand-written baseline in ``fastmsc.bench.baselines`` (attention: softmax(QKᵀ)V
  with plain matmuls); no row for other ops;
* ``fused``: the op's fused implementation when ``fastmsc.backend.OPS[op].why_not_fused`` allows it on this
  device and these arguments, else an ``unavailable`` row carrying that reason (for the model: backend
  ``auto``, i.e. fused wherever an op has a fused path);
* ``compile``: ``torch.compile`` of the torch backend.

Every backend's result (outputs, and in fwd+bwd mode the gradients of every input and parameter for a
random upstream gradient) is compared with the reference run in float64 on the same inputs before any
timing; a mismatch is reported with its error and seed and is not timed.

On CUDA every timed call of an op reads an input set the previous call did not (two sets in rotation), and
a write of twice the L2 cache's size runs before it, outside its timing: each call starts from a cold cache,
as in a network where other layers ran in between, and bandwidth-bound ops are not flattered by L2.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import OPS, use_backend
from ..dispatch import dtype_name
from ..nn import LSTM
from ..ops.attention import sdpa_backend
from .baselines import NAIVE
from .cases import MODEL, Case, default_cases, make_model, make_model_batch, make_op_inputs, modes_for
from .memory import saved_tensor_bytes
from .roofline import Peaks, rates, work
from .timing import Stats, time_interleaved

BACKEND_CHOICES = ("reference", "torch", "naive", "fused", "compile")
# Input sets an op's timed calls rotate through on CUDA, so no call finds its inputs in L2 from the last one.
ROTATING_INPUT_SETS = 2
FAILED = ("mismatch", "error")
# The float64 reference runs on at most this many (batch rows x time steps) per device type; larger cases
# are checked on fewer batch rows, with every time step (the LSTM reference is a Python loop over time).
CHECK_ROWS_X_STEPS = {"cpu": 4096, "cuda": 65536}
# torch.compile decomposes aten.lstm into one cell per time step; past this many steps the compile takes
# minutes (hours on CPU for T=512), so it is skipped unless asked for.
COMPILE_UNROLL_LIMIT = 64


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype = torch.float32
    backends: tuple[str, ...] = ("torch", "fused", "compile")
    repeats: int = 10
    warmup: int = 3
    quick: bool = False
    compile_lstm: bool = False
    modes: tuple[str, ...] | None = None  # None: every mode of each op
    log: Callable[[str], None] | None = None
    peaks: Peaks | None = None  # measured ceilings for each row's achieved rate and % of peak
    time_budget: float | None = None  # seconds: cases that would start later become skipped rows
    on_rows: Callable[[list[Result]], None] | None = None  # called with each case's rows once measured


@dataclass
class CheckOutcome:
    ok: bool
    max_error: float
    worst: str
    tolerance: float
    checked_on: str


@dataclass
class Result:
    """One row of the table and of the CSV."""

    op: str
    mode: str
    shape: str
    dtype: str
    backend: str
    status: str  # ok | mismatch | error | unavailable | skipped
    stats: Stats | None = None
    speedup: float | None = None  # torch median / this median, both from this run
    saved_bytes: int | None = None
    max_error: float | None = None
    tolerance: float | None = None
    worst: str = ""
    checked_on: str = ""
    seed: int | None = None
    first_call_s: float | None = None
    note: str = ""
    tflops: float | None = None  # achieved, from fastmsc.bench.roofline's counts over the median
    gbps: float | None = None
    pct_of_peak: float | None = None  # roofline fraction against the ceilings measured in the same run
    bound: str = ""  # mem | math: which ceiling the roofline fraction is taken against


class Unavailable(NamedTuple):
    status: str  # unavailable | skipped
    reason: str


@dataclass
class Runner:
    """A backend made ready for one workload: check it, build its timed step, count its saved bytes."""

    check: Callable[[], CheckOutcome]
    step: Callable[[], Callable[[], object]]
    saved_bytes: Callable[[], int | None]
    note: str = ""


def tf32_enabled() -> bool:
    return (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
            or torch.get_float32_matmul_precision() != "highest")


def tolerance(dtype: torch.dtype, device: torch.device, model: bool = False, tf32: bool | None = None) -> float:
    """Largest accepted error, relative to the largest reference magnitude of the compared tensor.

    float32 accumulates rounding of about 1e-7 per operation; 1e-4 leaves room for the long reductions and
    recurrences of one op (T up to 2048) and still catches any indexing or masking bug, which errs by O(1).
    On CUDA, PyTorch's default lets cuDNN (convolutions, LSTM) use TF32, a 10-bit mantissa (~5e-4 per
    product), hence 5e-3 when TF32 is on (``tf32``; None: any of PyTorch's TF32 switches). Half types keep
    ~3 (bf16: ~2) significant digits per stored value.

    The model's gradients get 20x more: the attention key projection and the conv weights sit behind the
    softmax and BatchNorm backward passes, whose mean subtractions cancel; stock PyTorch float32 itself
    differs from float64 by 0.6e-4 to 3.7e-4 there (B=32, T=150 and 512, CPU).
    """
    factor = 20.0 if model else 1.0
    if dtype == torch.float64:
        return 1e-10 * factor
    if dtype == torch.float32:
        tf32 = tf32_enabled() if tf32 is None else tf32
        return (5e-3 if device.type == "cuda" and tf32 else 1e-4) * factor
    if model:
        return 0.1  # half-precision training steps agree to about one digit; still far below an O(1) bug
    return 2e-2 if dtype == torch.float16 else 6e-2


def compare(pairs: Sequence[tuple[str, torch.Tensor | None, torch.Tensor]]) -> tuple[float, str]:
    """Worst error over (name, got, reference) pairs: max|got - ref| / max|ref|, as float64.

    The denominator is at least 1e-2 of the largest reference magnitude in the group, so a tensor that is
    mathematically zero (a conv bias feeding BatchNorm has zero gradient) is judged on the group's scale,
    not on its own rounding noise. A missing gradient counts as zeros; NaN or inf counts as infinite error.
    """
    scales = [float(want.abs().max()) if want.numel() else 0.0 for _, _, want in pairs]
    floor = max(max(scales, default=0.0) * 1e-2, torch.finfo(torch.float64).tiny)
    worst, worst_name = 0.0, ""
    for (name, got, want), scale in zip(pairs, scales, strict=True):
        if got is None:
            got = torch.zeros_like(want)
        if tuple(got.shape) != tuple(want.shape):
            return float("inf"), f"{name} has shape {tuple(got.shape)}, reference {tuple(want.shape)}"
        if got.numel() == 0:
            continue
        got = got.detach().to(torch.float64)
        error = float("inf") if not torch.isfinite(got).all() else float((got - want).abs().max()) / max(scale, floor)
        if error > worst or not worst_name:
            worst, worst_name = error, name
    return worst, worst_name


def check_batch(case: Case, device: torch.device) -> int:
    budget = CHECK_ROWS_X_STEPS.get(device.type, CHECK_ROWS_X_STEPS["cpu"])
    return max(1, min(case.batch, budget // case.steps))


@contextlib.contextmanager
def check_threads(device: torch.device):
    """Run a check single-threaded on CPU: the float64 reference is thousands of tiny ops (the LSTM loops
    over time), and on a busy machine intra-op worker threads waiting for each other made a check 15x slower.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _checked_on(case: Case, batch: int) -> str:
    if batch == case.batch:
        return "full shape"
    return f"B={batch} of {case.batch} (float64 reference too slow at full size)"


def fresh_seed() -> int:
    """A new seed per check, drawn from the OS: every run tests new random inputs; failures print it."""
    return int.from_bytes(os.urandom(4), "little")


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on ``device`` here, or None."""
    if device.type == "cpu":
        compilers = (os.environ.get("CXX"), "g++", "clang++", "c++")
        if not any(c and shutil.which(c) for c in compilers):
            return "torch.compile unavailable: inductor needs a C++ compiler (g++ or clang++) for CPU code"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # any import failure means inductor cannot generate GPU code
            return f"torch.compile unavailable: inductor needs triton for CUDA code ({type(exc).__name__}: {exc})"
        return None
    return f"torch.compile is not benchmarked on device type {device.type!r}"


def compile_unrolls_lstm(device: torch.device, dtype: torch.dtype, training: bool) -> bool:
    """Whether torch.compile turns aten.lstm into one traced cell per time step.

    It keeps one mkldnn LSTM layer only for CPU inference in float32/bfloat16 (torch/_decomp's lstm_impl).
    """
    mkldnn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return training or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not mkldnn


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _output_names(outputs) -> list[str]:
    return ["output"] if len(outputs) == 1 else [f"output[{i}]" for i in range(len(outputs))]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class OpWorkload:
    """One op case in one mode (``fwd`` under no_grad, or ``fwd+bwd``) on full-size inputs."""

    def __init__(self, case: Case, mode: str, options: Options):
        self.case, self.mode, self.options = case, mode, options
        self.op = OPS[case.op]
        self.training = mode == "fwd+bwd"
        self.inputs = make_op_inputs(case, options.device, options.dtype, self.training)
        self.input_sets = [self.inputs]
        self.before_each = None
        if options.device.type == "cuda":
            self.input_sets += [make_op_inputs(case, options.device, options.dtype, self.training)
                                for _ in range(ROTATING_INPUT_SETS - 1)]
            self.before_each = l2_evictor(options.device)
        self.check_seed: int | None = None
        self._reference = None
        self._upstream = None

    def _run(self, impl, inputs, upstream):
        if not self.training:
            with torch.no_grad():
                return _outputs(impl(**inputs.kwargs)), []
        outputs = _outputs(impl(**inputs.kwargs))
        if len(outputs) != len(upstream):
            raise RuntimeError(f"returned {len(outputs)} outputs, the reference returns {len(upstream)}")
        differentiable = [(o, g) for o, g in zip(outputs, upstream, strict=True) if o.requires_grad]
        if not differentiable:
            raise RuntimeError("no output requires grad: the implementation is not differentiable")
        leaves = [t for _, t in inputs.leaves()]
        grads = torch.autograd.grad([o for o, _ in differentiable], leaves, [g for _, g in differentiable],
                                    allow_unused=True)
        return outputs, list(grads)

    def _reference_data(self):
        if self._reference is None:
            self.check_seed = fresh_seed()
            torch.manual_seed(self.check_seed)
            batch = check_batch(self.case, self.options.device)
            inputs = make_op_inputs(self.case.with_batch(batch), self.options.device, self.options.dtype,
                                    self.training)
            exact = inputs.converted(torch.float64)
            with torch.set_grad_enabled(self.training):
                ref_outputs = _outputs(self.op.reference(**exact.kwargs))
            upstream, ref_grads = [], []
            if self.training:
                # Drawn in the benchmark dtype, then widened exactly: both sides see identical values.
                upstream = [torch.randn_like(o, dtype=self.options.dtype) for o in ref_outputs]
                ref_grads = torch.autograd.grad(ref_outputs, [t for _, t in exact.leaves()],
                                                [g.to(torch.float64) for g in upstream], allow_unused=True)
                ref_grads = [torch.zeros_like(t) if g is None else g
                             for (_, t), g in zip(exact.leaves(), ref_grads, strict=True)]
            self._reference = (inputs, upstream, [o.detach() for o in ref_outputs], ref_grads, batch)
        return self._reference

    def _check(self, impl, tf32: bool | None) -> CheckOutcome:
        inputs, upstream, ref_outputs, ref_grads, batch = self._reference_data()
        tol = tolerance(self.options.dtype, self.options.device, tf32=tf32)
        checked_on = _checked_on(self.case, batch)
        outputs, grads = self._run(impl, inputs, upstream if self.training else [])
        if len(outputs) != len(ref_outputs):
            return CheckOutcome(False, float("inf"), f"returned {len(outputs)} outputs, reference "
                                f"{len(ref_outputs)}", tol, checked_on)
        names = _output_names(ref_outputs)
        error, worst = compare(list(zip(names, outputs, ref_outputs, strict=True)))
        if self.training:
            grad_pairs = [(f"grad {name}", g, want)
                          for (name, _), g, want in zip(inputs.leaves(), grads, ref_grads, strict=True)]
            grad_error, grad_worst = compare(grad_pairs)
            if grad_error > error:
                error, worst = grad_error, grad_worst
        return CheckOutcome(error <= tol, error, worst, tol, checked_on)

    def _upstream_for_timing(self):
        if self._upstream is None and self.training:
            with torch.no_grad():
                shapes = _outputs(self.op.torch(**self.inputs.kwargs))
            self._upstream = [torch.randn_like(o) for o in shapes]
        return self._upstream or []

    def _runner(self, impl, note: str = "", tf32: bool | None = None) -> Runner:
        def step():
            turns, upstream = itertools.cycle(self.input_sets), self._upstream_for_timing()
            return lambda: self._run(impl, next(turns), upstream)

        def saved():
            if not self.training:
                return None
            return saved_tensor_bytes(lambda: impl(**self.inputs.kwargs), exclude=self.inputs.params())

        return Runner(lambda: self._check(impl, tf32), step, saved, note)

    def resolve(self, backend: str) -> Runner | Unavailable:
        device = self.options.device
        if backend == "reference":
            return self._runner(self.op.reference)
        if backend == "torch":
            note = ""
            if self.case.op == "attention":
                note = f"SDPA kernel {sdpa_backend(**self.inputs.kwargs)} (4-D inputs)"
            return self._runner(self.op.torch, note)
        if backend == "naive":
            return self._runner(NAIVE[self.case.op])
        if backend == "fused":
            # Asked as 'auto' would ask: the Triton interpreter (CPU, testing only) never counts as available.
            with use_backend("auto"):
                reason = self.op.why_not_fused(device.type, **self.inputs.kwargs)
            if reason is not None:
                return Unavailable("unavailable", f"fused unavailable: {reason}")
            # Fused kernels use TF32 only when torch.backends.cuda.matmul.allow_tf32 asks for it, so they are
            # held to the float32 tolerance even while cuDNN's TF32 (on by default) loosens the torch backend's.
            return self._runner(self.op.fused, tf32=torch.backends.cuda.matmul.allow_tf32)
        if backend == "compile":
            reason = compile_unavailable(device)
            if reason is not None:
                return Unavailable("unavailable", reason)
            unrolls = self.case.op == "lstm_layer" and compile_unrolls_lstm(device, self.options.dtype, self.training)
            if unrolls and self.case.steps > COMPILE_UNROLL_LIMIT and not self.options.compile_lstm:
                return Unavailable("skipped", f"torch.compile skipped: it unrolls the LSTM into one cell per time "
                                              f"step here (T={self.case.steps} > {COMPILE_UNROLL_LIMIT}), which "
                                              f"takes minutes to compile; --compile-lstm forces it")
            torch._dynamo.reset()  # a fresh cache per workload: no recompile limit, no shape generalisation
            return self._runner(torch.compile(self.op.torch, dynamic=False))
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(BACKEND_CHOICES)}")


def applies(op: str, backend: str) -> bool:
    """Whether ``backend`` gets a row for ``op`` (an OPS name or "model"): ``naive`` only where a naive baseline
    exists."""
    return backend != "naive" or op in NAIVE


def l2_evictor(device: torch.device) -> Callable[[], object]:
    """A call that writes twice the GPU's L2 cache size, evicting whatever the last timed call left there."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    buffer = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)
    return buffer.zero_


def _disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off (its masks differ between implementations and dtypes); BatchNorm stays in train mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return model


def compile_model(model: nn.Module, compile_lstm: bool = False) -> nn.Module:
    """torch.compile(model) (static shapes); unless ``compile_lstm``, its LSTMs run eager through a graph
    break, because compiling them unrolls every time step."""
    if not compile_lstm:
        for module in model.modules():
            if isinstance(module, (LSTM, nn.LSTM)):
                module.forward = torch.compiler.disable(module.forward)
    return torch.compile(model, dynamic=False)


class ModelWorkload:
    """MSCClassifier's training step: forward, cross-entropy, backward, AdamW step."""

    before_each = None  # a training step is timed as a network runs it: warm caches between steps

    def __init__(self, case: Case, mode: str, options: Options):
        self.case, self.mode, self.options = case, mode, options
        self.base = make_model(case, options.device, options.dtype)
        self.x, self.y = make_model_batch(case, options.device, options.dtype)
        self.check_seed: int | None = None
        self._reference = None

    def _reference_data(self):
        if self._reference is None:
            self.check_seed = fresh_seed()
            torch.manual_seed(self.check_seed)
            batch = check_batch(self.case, self.options.device)
            x, y = make_model_batch(self.case.with_batch(batch), self.options.device, self.options.dtype)
            exact = _disable_dropout(copy.deepcopy(self.base)).double()
            with use_backend("reference"):
                logits = exact(x.double())
                params = [p for _, p in exact.named_parameters()]
                grads = torch.autograd.grad(F.cross_entropy(logits, y), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            self._reference = (x, y, logits.detach(), grads, batch)
        return self._reference

    def _check(self, backend_name: str, build) -> CheckOutcome:
        x, y, ref_logits, ref_grads, batch = self._reference_data()
        model = _disable_dropout(copy.deepcopy(self.base))
        net = build(model)
        named = list(model.named_parameters())
        with use_backend(backend_name):
            logits = net(x)
            grads = torch.autograd.grad(F.cross_entropy(logits, y), [p for _, p in named], allow_unused=True)
        error, worst = compare([("logits", logits, ref_logits)])
        grad_error, grad_worst = compare([(f"grad {n}", g, want)
                                          for (n, _), g, want in zip(named, grads, ref_grads, strict=True)])
        if grad_error > error:
            error, worst = grad_error, grad_worst
        tol = tolerance(self.options.dtype, self.options.device, model=True)
        return CheckOutcome(error <= tol, error, worst, tol, _checked_on(self.case, batch))

    def _runner(self, backend_name: str, build, note: str = "") -> Runner:
        timed = {}

        def step():
            model = copy.deepcopy(self.base)
            net = build(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            timed.update(model=model, net=net)
            x, y = self.x, self.y

            def train_step():
                with use_backend(backend_name):
                    loss = F.cross_entropy(net(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()

            return train_step

        def saved():
            with use_backend(backend_name):
                return saved_tensor_bytes(lambda: F.cross_entropy(timed["net"](self.x), self.y),
                                          exclude=list(timed["model"].parameters()))

        return Runner(lambda: self._check(backend_name, build), step, saved, note)

    def resolve(self, backend: str) -> Runner | Unavailable:
        device = self.options.device
        if backend in ("reference", "torch"):
            return self._runner(backend, lambda m: m)
        if backend == "fused":
            with use_backend("auto"):
                missing = {name: op.why_not_fused(device.type) for name, op in OPS.items()}
            missing = {name: reason for name, reason in missing.items() if reason is not None}
            by_reason: dict[str, list[str]] = {}
            for name, reason in missing.items():
                by_reason.setdefault(reason, []).append(name)
            reasons = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
            if len(missing) == len(OPS):
                return Unavailable("unavailable", f"fused unavailable: {reasons}")
            note = "backend auto (fused where available)" + (f"; torch for {reasons}" if missing else "")
            return self._runner("auto", lambda m: m, note)
        if backend == "compile":
            reason = compile_unavailable(device)
            if reason is not None:
                return Unavailable("unavailable", reason)
            compile_lstm = self.options.compile_lstm

            def build(model):
                torch._dynamo.reset()
                return compile_model(model, compile_lstm)

            note = "" if compile_lstm else ("LSTM left eager (torch.compile would unroll it over T; "
                                            "--compile-lstm compiles it too)")
            return self._runner("torch", build, note)
        raise ValueError(f"unknown backend {backend!r}; valid backends are {', '.join(BACKEND_CHOICES)}")


def make_workload(case: Case, mode: str, options: Options) -> OpWorkload | ModelWorkload:
    """The workload for ``case`` in ``mode``: full-size inputs (or model and batch) made once, shared by backends."""
    return (ModelWorkload if case.op == MODEL else OpWorkload)(case, mode, options)


def _failure(backend: str, stage: str, exc: BaseException) -> tuple[str, str]:
    if backend == "compile":
        # torch.compile of stock PyTorch failing is a property of this torch install, not a fastmsc result.
        return "unavailable", f"torch.compile failed while {stage}: {_describe(exc)}"
    return "error", f"raised while {stage}: {_describe(exc)}"


def _checked(workload, backend: str, options: Options) -> tuple[Result, Runner | None]:
    """Resolve ``backend`` on ``workload`` and check it against the reference: the row so far, and the
    runner to time when the check passed (else None, the row saying why)."""
    case = workload.case
    row = Result(case.op, workload.mode, case.shape, dtype_name(options.dtype), backend, "ok")
    try:
        runner = workload.resolve(backend)
    except Exception as exc:
        row.status, row.note = _failure(backend, "setting up", exc)
        return row, None
    if isinstance(runner, Unavailable):
        row.status, row.note = runner
        return row, None
    row.note = runner.note
    try:
        with check_threads(options.device):
            outcome = runner.check()
    except Exception as exc:
        row.status, row.note = _failure(backend, "checking against the reference", exc)
        row.seed = workload.check_seed
        return row, None
    row.max_error, row.worst, row.tolerance = outcome.max_error, outcome.worst, outcome.tolerance
    row.checked_on, row.seed = outcome.checked_on, workload.check_seed
    if not outcome.ok:
        row.status = "mismatch"
        row.note = (f"differs from the float64 reference: {outcome.worst} error {outcome.max_error:.3g} > "
                    f"{outcome.tolerance:.1g} (seed {workload.check_seed}); not timed")
        return row, None
    return row, runner


def _fail(row: Result, stage: str, exc: BaseException) -> None:
    """Mark a checked row failed at ``stage``, its note leading with the failure and keeping the runner's note."""
    row.stats = None
    row.status, note = _failure(row.backend, stage, exc)
    row.note = f"{note}; {row.note}" if row.note else note


def _record_timing(row: Result, runner: Runner, timing) -> None:
    """Put a time_interleaved result (stats and first-call time, or the exception) and the saved bytes in row."""
    if isinstance(timing, Exception):
        _fail(row, "timing", timing)
        return
    row.stats, row.first_call_s = timing
    try:
        row.saved_bytes = runner.saved_bytes()
    except Exception as exc:
        _fail(row, "timing", exc)


def measure_backends(workload, backends: Sequence[str], options: Options) -> list[Result]:
    """Check every backend on ``workload`` against the reference, then time those that agree round-robin
    (one call of each in turn, see fastmsc.bench.timing), so that their ratios share the machine's state."""
    checked = [(backend, *_checked(workload, backend, options))
               for backend in backends if applies(workload.case.op, backend)]
    steps = {}
    for backend, row, runner in checked:
        if runner is None:
            continue
        try:
            steps[backend] = runner.step()
        except Exception as exc:
            _fail(row, "setting up the timed step", exc)
    timings = {}
    if steps:
        timings = time_interleaved(steps, options.device, options.repeats, options.warmup, workload.before_each)
    for backend, row, runner in checked:
        if backend in timings:
            _record_timing(row, runner, timings[backend])
    return [row for _, row, _ in checked]


def measure(workload, backend: str, options: Options) -> Result:
    """Check ``backend`` on ``workload`` against the reference, then (if it agrees) time it alone."""
    return measure_backends(workload, [backend], options)[0]


def add_speedups(rows: list[Result]) -> None:
    """speedup = torch's median / the row's median, within one (case, mode) measured in this run."""
    baseline = next((r for r in rows if r.backend == "torch" and r.status == "ok" and r.stats), None)
    for r in rows:
        if baseline is not None and r.status == "ok" and r.stats:
            r.speedup = baseline.stats.median_ms / r.stats.median_ms


def add_rates(rows: list[Result], case: Case, mode: str, dtype: torch.dtype, peaks: Peaks | None) -> None:
    """Achieved TFLOP/s, GB/s and the roofline fraction of every timed row (see fastmsc.bench.roofline)."""
    counted = work(case, mode, dtype)
    for r in rows:
        if counted is not None and r.status == "ok" and r.stats:
            found = rates(counted, r.stats.median_ms, r.dtype, peaks)
            r.tflops, r.gbps, r.pct_of_peak, r.bound = found.tflops, found.gbps, found.pct_of_peak, found.bound


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(options: Options, ops: Sequence[str], cases: dict[str, list[Case]] | None = None) -> list[Result]:
    """Measure every backend in ``options.backends`` on every case and mode of ``ops``.

    ``cases`` overrides the default cases per op. Returns one Result per (case, mode, backend), in order.
    """
    log = options.log or (lambda line: print(line, file=sys.stderr, flush=True))
    results: list[Result] = []
    start = time.monotonic()
    for op in ops:
        op_cases = (cases or {}).get(op) or default_cases(op, quick=options.quick, device_type=options.device.type)
        for case in op_cases:
            modes = [m for m in modes_for(op) if options.modes is None or m in options.modes or op == MODEL]
            for mode in modes:
                spent = time.monotonic() - start
                if options.time_budget is not None and spent > options.time_budget:
                    rows = _skipped_rows(case, mode, options, f"not started: the time budget of "
                                                             f"{options.time_budget:g} s was spent ({spent:.0f} s)")
                else:
                    workload = make_workload(case, mode, options)
                    rows = measure_backends(workload, options.backends, options)
                    del workload
                    _release(options.device)
                for row in rows:
                    timing = f"{row.stats.median_ms:.3f} ms" if row.stats else row.note
                    log(f"  {op} {mode} [{case.shape}] {row.backend}: {row.status}  {timing}")
                add_speedups(rows)
                add_rates(rows, case, mode, options.dtype, options.peaks)
                results.extend(rows)
                if options.on_rows is not None:
                    options.on_rows(rows)
    return results


def _skipped_rows(case: Case, mode: str, options: Options, why: str) -> list[Result]:
    backends = [b for b in options.backends if applies(case.op, b)]
    return [Result(case.op, mode, case.shape, dtype_name(options.dtype), b, "skipped", note=why) for b in backends]


__all__ = [
    "BACKEND_CHOICES", "CheckOutcome", "ModelWorkload", "OpWorkload", "Options", "Result", "Unavailable",
    "add_rates", "add_speedups", "applies", "check_threads", "compare", "compile_model", "l2_evictor", "make_workload",
    "measure", "measure_backends", "run_suite", "tolerance",
]
