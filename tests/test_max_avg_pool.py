"""fastmsc.max_avg_pool: the shapes and the tolerance table that tests/test_op_contract.py checks every backend
with (output and x's gradient), the definition it checks the reference against (the max gradient going to the
first maximal step under ties, padding that must not count), and argument errors."""

from __future__ import annotations

import pytest
import torch
from _helpers import LAYOUTS, TOL_FLOAT64, Draw, assert_close, describe, require_fused

import fastmsc
from fastmsc.backend import FusedUnavailable

# Shape regimes every run covers; sizes inside each are drawn fresh and small for the interpreter.
REGIMES = ("batch1_time1", "channels1_odd_time", "all_length1", "full_length", "mixed_lengths_ties", "random")


def draw_case(draw: Draw, regime: str) -> dict:
    B, T, C = draw.int(1, 4), draw.int(2, 40), draw.int(1, 16)
    lengths, ties = draw.choice((None, "mixed")), draw.choice((True, False))
    if regime == "batch1_time1":
        B, T = 1, 1
    elif regime == "channels1_odd_time":
        C, T = 1, draw.odd(3, 39)
    elif regime == "all_length1":
        lengths = "ones"
    elif regime == "full_length":
        lengths = "full"
    elif regime == "mixed_lengths_ties":
        B, lengths, ties = draw.int(3, 5), "mixed", True
    return {"B": B, "T": T, "C": C, "lengths": lengths, "ties": ties, "layout": draw.choice(LAYOUTS)}


def draw_values(draw: Draw, case: dict, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C); with ``ties`` small integers so that maxima repeat; padding past a length holds values
    above every valid one, so any padding that leaks into the max or the mean is seen."""
    B, T, C = case["B"], case["T"], case["C"]
    if case["ties"]:
        x = torch.randint(-2, 3, (B, T, C), generator=draw.gen).double()
    else:
        x = draw.randn(B, T, C)
    if lengths is not None:
        past = torch.arange(T)[None, :, None] >= lengths[:, None, None]
        x = torch.where(past, 100 + draw.randn(B, T, C).abs(), x)
    return x


def pool_with(lengths):
    return lambda x: fastmsc.max_avg_pool(x, lengths)


# The one tolerance table of this op (every backend, against the float64 reference on the same rounded inputs).
# float32: the max is exact (a copy of an input), the mean an fp32 sum of T <= 70 O(1) terms (error <= T * 6e-8
# relative), and the gradient one fp32 division and at most one addition per element: 1e-6 is 5-10x the worst
# observed error; any wrong index or mask is O(1). Half (unit roundoff u: fp16 2^-11, bf16 2^-8): the max is
# exact; the mean and the gradient (1/L times the cotangent) round once to the output dtype, and padding values
# near 100 must not enter the mean: 4u.
TOL = {
    torch.float64: TOL_FLOAT64,
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {"rtol": 4 * 2**-11, "atol": 4 * 2**-11},
    torch.bfloat16: {"rtol": 4 * 2**-8, "atol": 4 * 2**-8},
}


def run_allowing_float32(backend, x, lengths):
    """(leaf, output) in float64, or in float32 where the fused path declines float64 (integer-valued
    ties stay exact in float32)."""
    for dtype in (torch.float64, torch.float32):
        leaf = x.to(dtype).requires_grad_()
        try:
            with fastmsc.use_backend(backend):
                return leaf, fastmsc.max_avg_pool(leaf, lengths)
        except FusedUnavailable as exc:
            reason = str(exc)
    pytest.skip(f"fused max_avg_pool declines these arguments: {reason}")


def check_reference_against_oracle(backend: str, draw: Draw) -> None:
    """Expected gradient built by hand: the max cotangent to the first t < L where x is maximal, the
    mean cotangent / L to every t < L, nothing to padding."""
    if backend == "fused":
        require_fused("max_avg_pool")
    for lengths_mode in (None, "mixed", "ones"):
        case = draw_case(draw, "mixed_lengths_ties")
        lengths = draw.lengths(case["B"], case["T"], lengths_mode)
        x = draw_values(draw, case, lengths)
        B, T, C = x.shape
        x[0, :, 0] = 1.0  # a column that is one long tie
        leaf, out = run_allowing_float32(backend, x, lengths)
        dtype = leaf.dtype
        cotangent = draw.randn(B, 2 * C).to(dtype)
        (grad,) = torch.autograd.grad(out, leaf, cotangent)
        expected = torch.zeros(B, T, C, dtype=torch.float64)
        for b in range(B):
            L = T if lengths is None else int(lengths[b])
            for c in range(C):
                first = max(range(L), key=lambda t: (x[b, t, c], -t))
                expected[b, first, c] += cotangent[b, c]
                expected[b, :L, c] += cotangent[b, C + c] / L
            valid = x[b, :L]
            torch.testing.assert_close(out[b].double(), torch.cat([valid.amax(0), valid.mean(0)]), rtol=1e-6, atol=1e-6)
        what = f"{describe('ties', case, lengths)} {draw.tag()}"
        assert_close(grad.double(), expected, what, rtol=1e-6, atol=1e-6)


def _x():
    return torch.randn(2, 5, 3)


BAD_CALLS = [
    ("x 2-D", lambda x: dict(x=x[0]), ValueError, r"x must be 3-D"),
    ("x 4-D", lambda x: dict(x=x[None]), ValueError, r"x must be 3-D"),
    ("x int", lambda x: dict(x=x.long()), TypeError, r"x must have dtype"),
    ("x bool", lambda x: dict(x=x > 0), TypeError, r"x must have dtype"),
    ("x complex", lambda x: dict(x=x.to(torch.complex64)), TypeError, r"x must have dtype"),
    ("x a list", lambda x: dict(x=x.tolist()), TypeError, r"x must be a torch.Tensor"),
    ("no steps", lambda x: dict(x=x[:, :0]), ValueError, r"x must have at least one time step"),
    ("lengths zero", lambda x: dict(x=x, lengths=[0, 5]), ValueError, r"lengths must lie in \[1, 5\]"),
    ("lengths negative", lambda x: dict(x=x, lengths=[-1, 5]), ValueError, r"lengths must lie in \[1, 5\]"),
    ("lengths past T", lambda x: dict(x=x, lengths=[5, 6]), ValueError, r"lengths must lie in \[1, 5\]"),
    ("lengths float", lambda x: dict(x=x, lengths=torch.tensor([1.5, 2.0])), TypeError, r"lengths must hold integers"),
    ("lengths python floats", lambda x: dict(x=x, lengths=[1.0, 2.0]), TypeError, r"lengths must hold integers"),
    ("lengths wrong batch", lambda x: dict(x=x, lengths=[1, 2, 3]), ValueError, r"lengths must have shape \(2,\)"),
    ("lengths scalar", lambda x: dict(x=x, lengths=3), ValueError, r"lengths must have shape \(2,\)"),
]


@pytest.mark.parametrize("make_args, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", ("reference", "torch", "fused", "auto"))
def test_bad_arguments_raise_clear_errors(backend, make_args, error, match):
    with fastmsc.use_backend(backend), pytest.raises(error, match=match):
        fastmsc.max_avg_pool(**make_args(_x()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lengths_and_cpu_lengths_agree():
    x, lengths = torch.randn(3, 6, 2, device="cuda"), torch.tensor([6, 1, 4])
    torch.testing.assert_close(fastmsc.max_avg_pool(x, lengths), fastmsc.max_avg_pool(x, lengths.cuda()))
