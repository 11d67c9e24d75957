"""fastmsc.attention: the shapes and the tolerance table that tests/test_op_contract.py checks every backend with
(output and the gradients of q, k, v), the definition (an explicit per-sequence softmax) the reference is checked
against, odd head dims, numerical stability and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import LAYOUTS, TOL_FLOAT64, Arg, Draw, assert_close, compare_with_reference, describe, require_fused

import fastmsc

BACKENDS = ("torch", "fused")

# Shape regimes every run covers; sizes inside each are drawn fresh. D stays in {16, 24} here, the
# head sizes the fused kernels are written for; other D are in test_odd_head_dims.
REGIMES = ("batch1_time1", "heads_odd_time_mixed_lengths", "all_length1", "full_length", "random")


def draw_case(draw: Draw, regime: str) -> dict:
    B, T = draw.int(1, 3), draw.int(2, 40)
    heads = draw.choice((None, 1, 2, 3))
    lengths = draw.choice((None, "mixed"))
    if regime == "batch1_time1":
        B, T = 1, 1
    elif regime == "heads_odd_time_mixed_lengths":
        B, T, heads, lengths = draw.int(3, 4), draw.odd(3, 39), draw.int(2, 3), "mixed"
    elif regime == "all_length1":
        lengths = "ones"
    elif regime == "full_length":
        lengths = "full"
    return {
        "B": B, "T": T, "heads": heads, "D": draw.choice((16, 24)), "lengths": lengths,
        "scale": draw.choice((None, None, 0.3, -0.7, 0.0)),
        "layouts": [draw.choice(LAYOUTS) for _ in range(3)],
    }


def build_args(draw: Draw, case: dict):
    heads = () if case["heads"] is None else (case["heads"],)
    shape = (case["B"], *heads, case["T"], case["D"])
    args = {name: Arg(draw.randn(*shape), layout) for name, layout in zip("qkv", case["layouts"], strict=True)}
    return args, draw.lengths(case["B"], case["T"], case["lengths"])


def call(case, lengths):
    return lambda q, k, v: fastmsc.attention(q, k, v, lengths, case["scale"])


# The one tolerance table of this op (every backend, against the float64 reference on the same rounded inputs).
# float32: each score is a dot product of D <= 256 terms (summed over 32-wide column strips for wide heads) and
# each output a softmax-weighted sum of T <= 70 rows of O(1) values, accumulated in fp32 (unit roundoff 6e-8);
# the gradients add one more such sum. With the default scale 1/sqrt(D) (scores of O(1) whatever D) observed
# errors stay around 1e-6 absolute or below (D = 256: at most 0.16 of the bound), so rtol 2e-5 / atol 5e-6
# leaves a margin of about 5x while any masking or indexing bug (errors of O(0.1)) fails. The fused kernels' 3xTF32
# products on a GPU (the interpreter runs them as fp32 dots) reach 0.30 of the bound in emulation over T <= 300
# (fastmsc.kernels.attention's docstring), so the row holds for them too. A larger scale makes
# the scores (and their rounding errors, which reach the gradients linearly) |scale| * sqrt(D) times larger:
# tolerance() widens the float32 row by that factor. Large scores also make each softmax row nearly one-hot, and
# the cancellation in dS = P (dP - rowsum) then leaves gradient elements of q and k far smaller than the terms whose
# rounding they carry, as in the half rows below: over 150 draws of scale 1.3 at D = 64 (growth 10.4) the worst
# error was 21 u x growth x max|grad| (u = 2^-24; grad of q, which broke rtol and atol alone at 1.46x their sum),
# so the float32 row also allows 64 u x max|grad| before the growth.
# Half (unit roundoff u: fp16 2^-11, bf16 2^-8): the forward error is the rounding of the scores, of the softmax
# weights and of the O(1) output (a few u). A flash-style backward also rounds P and dS to the input dtype before
# its products and computes rowsum(dO * O) from the stored low-precision output; those errors follow the largest
# terms of each gradient and add up over up to 70 keys, and cancellation in dS = P (dP - rowsum) can leave an
# element far smaller than its terms. Measured: up to ~5u x max|grad| (fused bf16); 16u x max|grad| bounds it.
TOL = {
    torch.float64: TOL_FLOAT64,
    torch.float32: {"rtol": 2e-5, "atol": 5e-6, "atol_per_max": 64 * 2**-24},
    torch.float16: {"rtol": 8 * 2**-11, "atol": 8 * 2**-11, "atol_per_max": 16 * 2**-11},
    torch.bfloat16: {"rtol": 8 * 2**-8, "atol": 8 * 2**-8, "atol_per_max": 16 * 2**-8},
}


def tolerance(case: dict) -> dict:
    """TOL for a case: the float32 row grown by |scale| * sqrt(D) where the scale makes scores larger."""
    growth = 1.0 if case["scale"] is None else max(1.0, abs(case["scale"]) * math.sqrt(case["D"]))
    return {**TOL, torch.float32: {k: v * growth for k, v in TOL[torch.float32].items()}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_head_dims(backend):
    """D = 1 and odd D: a kernel that pads D to a power of two must mask the padding."""
    if backend == "fused":
        require_fused("attention")
    draw = Draw()
    for D in (1, draw.choice((3, 5, 7)), draw.choice((9, 13, 17))):
        case = draw_case(draw, "random")
        case["D"] = D
        args, lengths = build_args(draw, case)
        compare_with_reference(backend, call(case, lengths), args, draw, describe("odd D", case, lengths),
                               tol=tolerance(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_are_stable(backend):
    """Scores near ±300 overflow exp() in float32 unless the row maximum is subtracted first."""
    if backend == "fused":
        require_fused("attention")
    draw = Draw()
    case = draw_case(draw, "heads_odd_time_mixed_lengths")
    case["scale"] = None
    args, lengths = build_args(draw, case)
    args["q"].values *= 300 / math.sqrt(case["D"])
    # The output is a convex combination of rows of v, so it stays O(1); a score's fp32 rounding at
    # magnitude 300 is 300 * 6e-8 = 2e-5, which moves the softmax weights by about as much, and the
    # gradients carry the factor 300 on q's side: rtol/atol 1e-3 bounds both with margin.
    tol = {torch.float32: {"rtol": 1e-3, "atol": 1e-3}}
    compare_with_reference(backend, call(case, lengths), args, draw, describe("large scores", case, lengths),
                           torch.float32, tol)


def check_reference_against_oracle(backend: str, draw: Draw) -> None:
    """The definition: for each sequence alone, softmax(q kᵀ scale) v over its first L steps, zeros after."""
    for heads in (None, 3):
        case = draw_case(draw, "heads_odd_time_mixed_lengths")
        case["heads"], case["D"] = heads, draw.int(1, 9)
        args, lengths = build_args(draw, case)
        q, k, v = (args[n].values for n in "qkv")
        scale = 1 / math.sqrt(case["D"]) if case["scale"] is None else case["scale"]
        with fastmsc.use_backend(backend):
            got = fastmsc.attention(q, k, v, lengths, case["scale"])
        for b, L in enumerate(lengths.tolist()):
            qb, kb, vb = q[b, ..., :L, :], k[b, ..., :L, :], v[b, ..., :L, :]
            scores = qb @ kb.transpose(-1, -2) * scale
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            expected = (weights / weights.sum(-1, keepdim=True)) @ vb
            what = f"{describe('explicit', case, lengths)} b={b} {draw.tag()}"
            assert_close(got[b, ..., :L, :], expected, what, rtol=1e-12, atol=1e-12)
            assert torch.all(got[b, ..., L:, :] == 0), f"query rows past the length are not zero: {what}"


def _inputs():
    return torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)


BAD_CALLS = [
    ("q 2-D", lambda q, k, v: dict(q=q[0], k=k[0], v=v[0]), ValueError, r"q must be 3-D or 4-D"),
    ("q 5-D", lambda q, k, v: dict(q=q[None, None], k=k, v=v), ValueError, r"q must be 3-D or 4-D"),
    ("q int", lambda q, k, v: dict(q=q.long(), k=k, v=v), TypeError, r"q must have dtype"),
    ("v complex", lambda q, k, v: dict(q=q, k=k, v=v.to(torch.complex64)), TypeError, r"v must have dtype"),
    ("k dtype mismatch", lambda q, k, v: dict(q=q, k=k.double(), v=v), TypeError, r"k has dtype float64 but q"),
    ("v other length", lambda q, k, v: dict(q=q, k=k, v=v[:, :3]), ValueError, r"v must have the shape of q"),
    ("k other ndim", lambda q, k, v: dict(q=q, k=k[:, None], v=v), ValueError, r"k must have the shape of q"),
    ("no steps", lambda q, k, v: dict(q=q[:, :0], k=k[:, :0], v=v[:, :0]), ValueError, r"q must have T >= 1"),
    ("scale string", lambda q, k, v: dict(q=q, k=k, v=v, scale="0.5"), TypeError, r"scale must be None or a finite"),
    ("scale nan", lambda q, k, v: dict(q=q, k=k, v=v, scale=float("nan")), TypeError,
     r"scale must be None or a finite"),
    ("scale inf", lambda q, k, v: dict(q=q, k=k, v=v, scale=float("inf")), TypeError,
     r"scale must be None or a finite"),
    ("scale tensor", lambda q, k, v: dict(q=q, k=k, v=v, scale=torch.tensor(0.5)), TypeError, r"scale must be"),
    ("lengths zero", lambda q, k, v: dict(q=q, k=k, v=v, lengths=[0, 3]), ValueError, r"lengths must lie in \[1, 5\]"),
    ("lengths past T", lambda q, k, v: dict(q=q, k=k, v=v, lengths=[6, 3]), ValueError,
     r"lengths must lie in \[1, 5\]"),
    ("lengths float", lambda q, k, v: dict(q=q, k=k, v=v, lengths=torch.tensor([1.0, 2.0])), TypeError,
     r"lengths must hold integers"),
    ("lengths wrong batch", lambda q, k, v: dict(q=q, k=k, v=v, lengths=[1]), ValueError,
     r"lengths must have shape \(2,\)"),
]


@pytest.mark.parametrize("make_args, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", ("reference", "torch", "fused", "auto"))
def test_bad_arguments_raise_clear_errors(backend, make_args, error, match):
    with fastmsc.use_backend(backend), pytest.raises(error, match=match):
        fastmsc.attention(**make_args(*_inputs()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to put one argument on another device")
def test_mismatched_devices_name_the_argument():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"v is on cpu but q is on cuda"):
        fastmsc.attention(q.cuda(), k.cuda(), v)
