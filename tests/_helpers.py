"""Shared machinery of the op tests: fresh random draws, awkward memory layouts, and the comparison of
a backend against the float64 reference on the outputs and on every gradient.

Every test draws a fresh seed (``Draw``); failure messages print it, and ``FASTMSC_TEST_SEED=<seed>``
replays that draw.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from fastmsc.backend import OPS, FusedUnavailable, use_backend
from fastmsc.bench.checks import mismatch

SEED_ENV = "FASTMSC_TEST_SEED"

# Tolerances against the float64 reference, per dtype the backend computes in.
# float64: both sides round at eps 2.2e-16; a few hundred accumulated terms stay far below 1e-9.
# float32: eps 1.2e-7; sums of <= ~500 O(1) terms (conv windows, T <= 40 recurrences, softmax rows)
#   give errors ~1e-6, so rtol 1e-4 / atol 1e-5 leaves a 10x margin yet catches any real bug.
TOL_FLOAT64 = {"rtol": 1e-9, "atol": 1e-10}
TOL_FLOAT32 = {"rtol": 1e-4, "atol": 1e-5}

LAYOUTS = ("contiguous", "transposed", "swap01", "sliced", "offset")


class Draw:
    """The random source of one test: ``seed`` from os.urandom, or $FASTMSC_TEST_SEED to replay a failure."""

    def __init__(self) -> None:
        env = os.environ.get(SEED_ENV)
        self.seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
        self.rng = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)

    def int(self, low: int, high: int) -> int:
        """Uniform int in [low, high]."""
        return self.rng.randint(low, high)

    def odd(self, low: int, high: int) -> int:
        return self.rng.choice([n for n in range(low, high + 1) if n % 2])

    def choice(self, options):
        return self.rng.choice(list(options))

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale

    def lengths(self, batch: int, max_len: int, mode: str | None) -> torch.Tensor | None:
        """(B,) int64 lengths in [1, max_len]: None, "ones" (all 1), "full" (all max_len) or "mixed"
        (random, with one full and one length-1 sequence when the batch allows)."""
        if mode is None:
            return None
        if mode == "ones":
            return torch.ones(batch, dtype=torch.int64)
        if mode == "full":
            return torch.full((batch,), max_len, dtype=torch.int64)
        values = [self.int(1, max_len) for _ in range(batch)]
        if batch >= 2:
            values[0] = max_len
        if batch >= 3:
            values[1] = 1
        self.rng.shuffle(values)
        return torch.tensor(values, dtype=torch.int64)

    def tag(self) -> str:
        return f"seed={self.seed} (replay with {SEED_ENV}={self.seed})"


@dataclass
class Arg:
    """One tensor argument: its values (float64), the memory layout the op sees, whether to take its gradient."""

    values: torch.Tensor
    layout: str = "contiguous"
    grad: bool = True

    def materialize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(leaf, view): ``view`` has the values (rounded to dtype) in the chosen layout and is what the op
        receives; gradients accumulate in ``leaf``. Gaps and offsets in the storage hold NaN, so a kernel
        that ignores strides or the storage offset reads NaN and fails the comparison."""
        values = self.values.to(dtype)
        layout = self.layout
        if values.dim() < 2 and layout in ("transposed", "swap01"):
            layout = "sliced"
        if layout == "contiguous":
            leaf = values.clone()
            view_of = lambda t: t
        elif layout == "transposed":
            leaf = values.transpose(-1, -2).contiguous()
            view_of = lambda t: t.transpose(-1, -2)
        elif layout == "swap01":
            leaf = values.transpose(0, 1).contiguous()
            view_of = lambda t: t.transpose(0, 1)
        elif layout == "sliced":
            leaf = torch.full((*values.shape[:-1], 2 * values.shape[-1]), float("nan"), dtype=dtype)
            leaf[..., ::2] = values
            view_of = lambda t: t[..., ::2]
        elif layout == "offset":
            leaf = torch.full((values.shape[0] + 1, *values.shape[1:]), float("nan"), dtype=dtype)
            leaf[1:] = values
            view_of = lambda t: t[1:]
        else:
            raise ValueError(f"unknown layout {self.layout!r}")
        leaf.requires_grad_(self.grad)
        self._view_of = view_of
        return leaf, view_of(leaf)

    def grad_in_op_layout(self, leaf_grad: torch.Tensor) -> torch.Tensor:
        return self._view_of(leaf_grad)


def assert_close(actual, expected, what: str, *, rtol: float, atol: float, atol_per_max: float = 0.0) -> None:
    """``actual`` within ``atol + atol_per_max * max|expected| + rtol * |expected|`` of ``expected`` element by
    element, by fastmsc.bench.checks.mismatch (the benchmark's own check), with ``what`` (shapes, seed) leading
    the failure message. Dtypes must match; NaN matches nothing. Sequences compare element by element."""
    if isinstance(actual, (tuple, list)) or isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} items, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{what} [{i}]", rtol=rtol, atol=atol, atol_per_max=atol_per_max)
        return
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    ratio, index, bad = mismatch(actual, expected, rtol=rtol, atol=atol, atol_per_max=atol_per_max)
    if ratio > 1:
        got, want = actual[index].item(), expected[index].item()
        raise AssertionError(f"{what}: {bad} of {actual.numel()} elements off (rtol={rtol:.3g}, atol={atol:.3g}, "
                             f"atol_per_max={atol_per_max:.3g}); worst at {index}: got {got!r}, expected {want!r}, "
                             f"{ratio:.3g} times the allowed error")


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to dtype and back to float64: the exact values a dtype computation starts from."""
    return t.to(dtype).to(torch.float64)


def require_fused(op_name: str) -> None:
    """Skip when no fused implementation of the op exists; fail when one exists but does not import."""
    op = OPS[op_name]
    with use_backend("fused"):
        reason = op.why_not_fused("cpu")
    if op.fused is not None:
        return
    if op.load_error is not None and importlib.util.find_spec("triton") is not None:
        pytest.fail(f"the fused {op_name} module exists but does not import: {op.load_error}")
    pytest.skip(f"fused {op_name} unavailable on cpu: {reason}")


def _forward(backend, fn, args: dict[str, Arg | None], dtype):
    leaves, views = {}, {}
    for name, arg in args.items():
        if arg is None:
            views[name] = None
            continue
        leaves[name], views[name] = arg.materialize(dtype)
    with use_backend(backend):
        outs = fn(**views)
    return (tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)), leaves


def _backward(outs, leaves, args, cotangents):
    wanted = [name for name, leaf in leaves.items() if leaf.requires_grad]
    cotangents = [c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True)]
    grads = torch.autograd.grad(outs, [leaves[n] for n in wanted], cotangents, allow_unused=True)
    result = {}
    for name, g in zip(wanted, grads, strict=True):
        g = torch.zeros_like(leaves[name]) if g is None else g
        result[name] = args[name].grad_in_op_layout(g)
    return result


def compare_with_reference(
    backend: str,
    fn: Callable,
    args: dict[str, Arg | None],
    draw: Draw,
    what: str,
    dtype: torch.dtype = torch.float64,
    tol: dict[torch.dtype, dict] | None = None,
) -> torch.dtype:
    """Run ``fn(**views)`` under ``backend`` with the args in ``dtype`` and under ``reference`` in float64
    on the same (dtype-rounded) values; compare every output and the gradient of every Arg with
    ``grad=True`` for one random cotangent. Returns the dtype the backend ran in.

    For backend ``fused`` in float64, a FusedUnavailable answer (Triton kernels may not take float64)
    reruns the comparison in float32 against the float64 reference; any other refusal skips with the
    kernel's own reason.
    """
    tol = {torch.float64: TOL_FLOAT64, torch.float32: TOL_FLOAT32, **(tol or {})}
    ref_args = {n: None if a is None else Arg(rounded(a.values, dtype), a.layout, a.grad) for n, a in args.items()}
    try:
        outs, leaves = _forward(backend, fn, args, dtype)
    except FusedUnavailable as exc:
        if backend != "fused" or dtype != torch.float64:
            pytest.skip(f"fused path declines {what} in {dtype}: {exc}")
        return compare_with_reference(backend, fn, args, draw, what, torch.float32, tol)
    ref_outs, ref_leaves = _forward("reference", fn, ref_args, torch.float64)
    cotangents = [rounded(draw.randn(*o.shape), dtype) for o in ref_outs]
    ref_grads = _backward(ref_outs, ref_leaves, ref_args, cotangents)
    grads = _backward(outs, leaves, args, cotangents)

    prefix = f"{what} [{draw.tag()}, backend={backend}, dtype={str(dtype).replace('torch.', '')}]"
    assert len(outs) == len(ref_outs), f"{prefix}: {len(outs)} outputs, reference gives {len(ref_outs)}"
    for i, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert out.shape == ref.shape, f"{prefix}: output {i} has shape {tuple(out.shape)}, want {tuple(ref.shape)}"
        assert out.dtype == dtype, f"{prefix}: output {i} has dtype {out.dtype}, want {dtype}"
        assert_close(out.double(), ref, f"{prefix} output {i}", **tol[dtype])
    for name, ref in ref_grads.items():
        assert_close(grads[name].double(), ref, f"{prefix} grad of {name}", **tol[dtype])
    return dtype


def describe(regime, case, lengths) -> str:
    """The drawn case of a regime, for assertion messages."""
    return f"{regime} {case} lengths={None if lengths is None else lengths.tolist()}"
