"""fastmsc.multiscale_conv1d: the shapes and the tolerance table that tests/test_op_contract.py checks every
backend with, the definition (F.conv1d) the reference is checked against, half inputs, argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import LAYOUTS, TOL_FLOAT32, TOL_FLOAT64, Arg, Draw, assert_close, rounded

import fastmsc

# Shape regimes every run covers; the sizes inside each are drawn fresh. Sizes stay small because
# the fused kernels run in the Triton interpreter on CPU.
REGIMES = ("batch1_time1", "cin1_odd_time", "kernel_wider_than_time", "random", "random")


def draw_case(draw: Draw, regime: str) -> dict:
    B, C_in, T = draw.int(1, 3), draw.int(1, 6), draw.int(2, 40)
    if regime == "batch1_time1":
        B, T = 1, 1
    elif regime == "cin1_odd_time":
        C_in, T = 1, draw.odd(3, 39)
    elif regime == "kernel_wider_than_time":
        T = draw.int(1, 4)
    n_branches = draw.int(1, 3)
    kernels = [draw.choice((1, 3, 5, 7, 9)) for _ in range(n_branches)]
    if regime != "random":
        kernels[0] = 7
    return {
        "B": B, "C_in": C_in, "T": T,
        "branches": [(draw.int(1, 6), k) for k in kernels],
        "bias": draw.choice(("all", "none", "some")),
        "activation": draw.choice((None, "relu", "gelu")),
        "x_layout": draw.choice(LAYOUTS),
        "w_layout": draw.choice(("contiguous", "sliced", "offset")),
    }


def build_args(draw: Draw, case: dict) -> dict[str, Arg | None]:
    args = {"x": Arg(draw.randn(case["B"], case["C_in"], case["T"]), case["x_layout"])}
    for i, (c_out, k) in enumerate(case["branches"]):
        args[f"w{i}"] = Arg(draw.randn(c_out, case["C_in"], k, scale=1 / math.sqrt(case["C_in"] * k)), case["w_layout"])
        has_bias = case["bias"] == "all" or (case["bias"] == "some" and i % 2 == 0)
        args[f"b{i}"] = Arg(draw.randn(c_out)) if has_bias else None
    return args


def call(case: dict) -> callable:
    n = len(case["branches"])

    def fn(x, **params):
        biases = None if case["bias"] == "none" else [params[f"b{i}"] for i in range(n)]
        return fastmsc.multiscale_conv1d(x, [params[f"w{i}"] for i in range(n)], biases, case["activation"])

    return fn


# The one tolerance table of this op (every backend, against the float64 reference on the same rounded inputs).
# float64, float32: tests/_helpers.py. Half (unit roundoff u: fp16 2^-11, bf16 2^-8): the fused kernels round only
# the O(1) output and each gradient (8u relative). Eager torch also rounds its intermediates to the half type:
# the conv output before the activation and the activation's gradient, each term of the weight and bias
# gradients, which sum B*T <= 120 such terms: a random walk of roundings of ~u/2 each, up to ~9u absolute on a
# small element and ~1.3u of the largest (measured over 6000 seeds per dtype), whatever the element's own size.
# 16u absolute plus 4u of max|expected| gives ~2x margin; a wrong index or missed term is off by O(0.1) still.
TOL = {
    torch.float64: TOL_FLOAT64,
    torch.float32: TOL_FLOAT32,
    torch.float16: {"rtol": 8 * 2**-11, "atol": 16 * 2**-11, "atol_per_max": 4 * 2**-11},
    torch.bfloat16: {"rtol": 8 * 2**-8, "atol": 16 * 2**-8, "atol_per_max": 4 * 2**-8},
}


def check_reference_against_oracle(backend: str, draw: Draw) -> None:
    """The definition: per-branch F.conv1d with padding k//2, the activation (GELU in its erf form), concat."""
    for activation in (None, "relu", "gelu"):
        B, C_in, T = draw.int(1, 3), draw.int(1, 5), draw.int(1, 30)
        weights = [draw.randn(draw.int(1, 5), C_in, k) for k in (3, 5, 7)]
        biases = [draw.randn(w.shape[0]) for w in weights]
        x = draw.randn(B, C_in, T, scale=2.0)
        with fastmsc.use_backend(backend):
            got = fastmsc.multiscale_conv1d(x, weights, biases, activation)
        branches = []
        for w, b in zip(weights, biases, strict=True):
            y = F.conv1d(x, w, b, padding=w.shape[-1] // 2)
            if activation == "relu":
                y = y.clamp_min(0)
            elif activation == "gelu":
                y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            branches.append(y)
        assert_close(got, torch.cat(branches, 1), f"{activation} B={B} C_in={C_in} T={T} {draw.tag()}",
                     rtol=1e-12, atol=1e-12)


def test_half_inputs_keep_dtype_and_upcast_reference():
    """A float16 call returns float16, close to the float64 result on the same (rounded) values."""
    draw = Draw()
    x, w = draw.randn(2, 3, 9), draw.randn(4, 3, 5)
    out = fastmsc.multiscale_conv1d(x.half(), [w.half()])
    assert out.dtype == torch.float16
    exact = F.conv1d(rounded(x, torch.float16), rounded(w, torch.float16), padding=2)
    # One rounding of the O(1) output to fp16 (plus fp32 sums): 8 unit roundoffs.
    torch.testing.assert_close(out.double(), exact, rtol=8 * 2**-11, atol=8 * 2**-11)


def _inputs():
    return torch.randn(2, 3, 8), [torch.randn(4, 3, 3), torch.randn(2, 3, 5)], [torch.randn(4), torch.randn(2)]


BAD_CALLS = [
    ("x 2-D", lambda x, w, b: (x[0], w, b, None), ValueError, r"x must be 3-D"),
    ("x int", lambda x, w, b: (x.long(), w, b, None), TypeError, r"x must have dtype"),
    ("x complex", lambda x, w, b: (x.to(torch.complex64), w, b, None), TypeError, r"x must have dtype"),
    ("weights dtype mismatch", lambda x, w, b: (x, [w[0].double(), w[1]], b, None), TypeError, r"weights\[0\]"),
    ("bias dtype mismatch", lambda x, w, b: (x, w, [b[0], b[1].double()], None), TypeError, r"biases\[1\]"),
    ("weights C_in mismatch", lambda x, w, b: (x, [w[0], torch.randn(2, 4, 5)], b, None), ValueError,
     r"weights\[1\] must have shape \(C_out, 3, k\)"),
    ("weights 2-D", lambda x, w, b: (x, [w[0][0], w[1]], b, None), ValueError, r"weights\[0\] must be 3-D"),
    ("even kernel", lambda x, w, b: (x, [torch.randn(4, 3, 4), w[1]], b, None), ValueError,
     r"weights\[0\] must have an odd kernel size"),
    ("empty weights", lambda x, w, b: (x, [], None, None), TypeError, r"weights must be a non-empty sequence"),
    ("weights a tensor", lambda x, w, b: (x, w[0], None, None), TypeError, r"weights must be a non-empty sequence"),
    ("bias wrong shape", lambda x, w, b: (x, w, [b[0], torch.randn(3)], None), ValueError,
     r"biases\[1\] must have shape \(2,\)"),
    ("bias count", lambda x, w, b: (x, w, [b[0]], None), TypeError, r"biases must be None or a sequence of 2"),
    ("bad activation", lambda x, w, b: (x, w, b, "tanh"), ValueError, r"activation must be one of"),
    ("activation wrong case", lambda x, w, b: (x, w, b, "GELU"), ValueError, r"activation must be one of"),
]


@pytest.mark.parametrize("make_args, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", ("reference", "torch", "fused", "auto"))
def test_bad_arguments_raise_clear_errors(backend, make_args, error, match):
    with fastmsc.use_backend(backend), pytest.raises(error, match=match):
        fastmsc.multiscale_conv1d(*make_args(*_inputs()))


@pytest.mark.parametrize("backend", ("reference", "torch"))
def test_bias_entries_may_be_none(backend):
    """biases=[b0, None] means branch 1 has no bias; all-None equals biases=None."""
    x, w, b = _inputs()
    with fastmsc.use_backend(backend):
        mixed = fastmsc.multiscale_conv1d(x, w, [b[0], None])
        no_bias = fastmsc.multiscale_conv1d(x, w, [None, None])
        none = fastmsc.multiscale_conv1d(x, w, None)
    expected = torch.cat([F.conv1d(x, w[0], b[0], padding=1), F.conv1d(x, w[1], None, padding=2)], 1)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_bias, none, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to put one argument on another device")
def test_mismatched_devices_name_the_argument():
    x, w, b = _inputs()
    with pytest.raises(ValueError, match=r"weights\[1\] is on cpu but x is on cuda"):
        fastmsc.multiscale_conv1d(x.cuda(), [w[0].cuda(), w[1]])
    with pytest.raises(ValueError, match=r"biases\[0\] is on cpu but x is on cuda"):
        fastmsc.multiscale_conv1d(x.cuda(), [t.cuda() for t in w], b)
