"""Workloads: one case in one mode, with each backend made ready to check and time (:class:`Runner`).

:class:`OpWorkload` runs one op (forward under no_grad, or forward+backward); :class:`ModelWorkload` runs
MSCClassifier's training step. ``resolve(backend)`` gives a :class:`Runner`, or :class:`Unavailable` with the
reason no row can be measured. On CUDA an op's timed calls rotate through fresh input sets behind an L2 flush.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import OPS, use_backend
from ..nn import LSTM
from ..ops.attention import sdpa_backend
from .baselines import NAIVE
from .cases import MODEL, Case, make_model, make_model_batch, make_op_inputs
from .checks import CheckOutcome, check_batch, checked_on_note, compare, fresh_seed, tolerance
from .memory import saved_tensor_bytes
from .rows import BACKEND_CHOICES, LSTM_IMPL_BACKENDS, Options

# Input sets an op's timed calls rotate through on CUDA, so no call finds its inputs in L2 from the last one.
ROTATING_INPUT_SETS = 2
# torch.compile decomposes aten.lstm into one cell per time step; past this many steps the compile takes
# minutes (hours on CPU for T=512), so it is skipped unless asked for.
COMPILE_UNROLL_LIMIT = 64


def _fused_tf32(op: str) -> bool:
    """Whether the fused kernels of ``op`` run float32 products in TF32 now (see fastmsc.kernels._common)."""
    if op == "multiscale_conv1d":
        return torch.backends.cudnn.allow_tf32
    return torch.backends.cuda.matmul.allow_tf32


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
        checked_on = checked_on_note(self.case, batch)
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
            # Readied as a call would be (the LSTM extension loads or builds here, not inside the timing), so a
            # failed build reads as unavailable, as it would for a user.
            self.op.prepare_fused(fallback=False, **self.inputs.kwargs)
            reason = self.op.why_not_fused(device.type, allow_interpreter=False, **self.inputs.kwargs)
            if reason is not None:
                return Unavailable("unavailable", f"fused unavailable: {reason}")
            # Fused kernels use TF32 only where torch's matching flag asks for it: the conv follows cuDNN's
            # (torch.backends.cudnn.allow_tf32, on by default, as nn.Conv1d does), the others
            # torch.backends.cuda.matmul.allow_tf32; under the other flag they keep the float32 tolerance.
            return self._runner(self.op.fused, tf32=_fused_tf32(self.case.op))
        if backend in LSTM_IMPL_BACKENDS:  # one fused LSTM implementation, as FASTMSC_LSTM_IMPL=<backend> runs it
            self.op.prepare_fused(fallback=False, lstm_impl=backend, **self.inputs.kwargs)
            reason = self.op.why_not_fused(device.type, allow_interpreter=False, lstm_impl=backend,
                                           **self.inputs.kwargs)
            if reason is not None:
                return Unavailable("unavailable", f"{backend} unavailable: {reason}")
            return self._runner(functools.partial(self.op.fused, lstm_impl=backend),
                                tf32=torch.backends.cuda.matmul.allow_tf32)
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
    exists, the LSTM implementations only for lstm_layer."""
    if backend in LSTM_IMPL_BACKENDS:
        return op == "lstm_layer"
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
        # Judged on at least a tenth of the model's largest gradient: at initialisation the attention query and key
        # projections' gradients are 1e-4 to 1e-3 of it (near-uniform softmax rows, whose backward cancels), and
        # stock PyTorch float32 missed them by up to 5% of their own size (1e-2 of the largest gradient; 12 of 2,500
        # draws of the quick case over 2e-3 on a floor of 1e-2, none over 1.4e-3 on 0.1). A gradient lost there
        # still fails on that floor in most draws.
        grad_error, grad_worst = compare([(f"grad {n}", g, want)
                                          for (n, _), g, want in zip(named, grads, ref_grads, strict=True)],
                                         floor_fraction=0.1)
        if grad_error > error:
            error, worst = grad_error, grad_worst
        tol = tolerance(self.options.dtype, self.options.device, model=True)
        return CheckOutcome(error <= tol, error, worst, tol, checked_on_note(self.case, batch))

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
            missing = {name: op.why_not_fused(device.type, allow_interpreter=False) for name, op in OPS.items()}
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
