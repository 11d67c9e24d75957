"""fastmsc.lstm_layer: the shapes (projections, torch.nn.LSTM's proj_size, included) and the tolerance table that
tests/test_op_contract.py checks every backend with (outputs, h_n, c_n and the gradients of x, all weights,
biases, h0, c0), the definition (pack_padded_sequence + torch.nn.LSTM) the reference is checked against,
lengths as lists, and argument errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from _helpers import LAYOUTS, TOL_FLOAT32, TOL_FLOAT64, Arg, Draw, assert_close
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastmsc

# Shape regimes every run covers; the sizes inside each are drawn fresh and kept small (T <= 40,
# sizes <= 16) for the fused path on CPU.
REGIMES = ("batch1_time1", "all_length1", "full_length", "mixed_lengths", "input1_odd_hidden", "random")


def draw_case(draw: Draw, regime: str, proj: bool = False) -> dict:
    """A case of ``regime``; ``proj``: with a projection w_hr (P, H), 1 <= P < H (so H >= 2)."""
    B, T, n_in, H = draw.int(1, 4), draw.int(2, 40), draw.int(1, 16), draw.int(2 if proj else 1, 16)
    lengths = draw.choice((None, "mixed"))
    if regime == "batch1_time1":
        B, T = 1, 1
    elif regime == "all_length1":
        lengths = "ones"
    elif regime == "full_length":
        lengths = "full"
    elif regime == "mixed_lengths":
        B, lengths = draw.int(3, 5), "mixed"
    elif regime == "input1_odd_hidden":
        n_in, H = 1, draw.choice((3, 5, 7, 13))
    if H % 8 == 0 and regime != "random":
        H += 1  # most regimes keep H off multiples of 8, where vectorised kernels have tails
    return {
        "B": B, "T": T, "I": n_in, "H": H, "P": draw.int(1, H - 1) if proj else 0,
        "directions": draw.choice((1, 2)) if regime != "mixed_lengths" else 2,
        "bias": draw.choice(("both", "none", "ih_only")),
        "state": draw.choice(("none", "both", "h0_only")),
        "lengths": lengths,
        "x_layout": draw.choice(LAYOUTS),
        "w_layout": draw.choice(("contiguous", "transposed", "sliced")),
        "state_layout": draw.choice(("contiguous", "swap01", "sliced")),
    }


def build_args(draw: Draw, case: dict) -> tuple[dict[str, Arg | None], torch.Tensor | None]:
    B, T, n_in, H, P = case["B"], case["T"], case["I"], case["H"], case.get("P", 0)
    R = P or H  # the size of h
    bound = 1 / math.sqrt(H)
    args = {"x": Arg(draw.randn(B, T, n_in), case["x_layout"])}
    for d in range(case["directions"]):
        args[f"w_ih{d}"] = Arg(draw.randn(4 * H, n_in, scale=bound), case["w_layout"])
        args[f"w_hh{d}"] = Arg(draw.randn(4 * H, R, scale=bound), case["w_layout"])
        args[f"b_ih{d}"] = None if case["bias"] == "none" else Arg(draw.randn(4 * H, scale=bound))
        args[f"b_hh{d}"] = Arg(draw.randn(4 * H, scale=bound)) if case["bias"] == "both" else None
        if P:
            args[f"w_hr{d}"] = Arg(draw.randn(P, H, scale=bound), case["w_layout"])
    D = case["directions"]
    args["h0"] = None if case["state"] == "none" else Arg(draw.randn(D, B, R), case["state_layout"])
    args["c0"] = Arg(draw.randn(D, B, H), case["state_layout"]) if case["state"] == "both" else None
    return args, draw.lengths(B, T, case["lengths"])


def call(case: dict, lengths) -> callable:
    def fn(x, h0, c0, **p):
        names = ("w_ih", "w_hh", "b_ih", "b_hh") + (("w_hr",) if case.get("P") else ())
        weights = tuple(tuple(p[f"{name}{d}"] for name in names) for d in range(case["directions"]))
        return fastmsc.lstm_layer(x, weights, h0, c0, lengths)

    return fn


# The one tolerance table of this op (every backend, against the float64 reference on the same rounded inputs).
# float64, float32: tests/_helpers.py. Half (unit roundoff u: fp16 2^-11, bf16 2^-8), T <= 16: gates saturate
# (|tanh|, sigmoid <= 1) so rounding does not grow step over step, but each step adds a few output roundings;
# 16u bounds the measured error with margin; a wrong gate or step is off by O(0.1). The input gradient sums the
# four gates' terms (dx = dG w_ih), which can cancel to an element well below the terms it rounded: its error
# follows the tensor's largest values, hence the same 16u of max|expected| (stock nn.LSTM in fp16 exceeded the
# elementwise bound by 15% on one H=1 case).
TOL = {
    torch.float64: TOL_FLOAT64,
    torch.float32: TOL_FLOAT32,
    torch.float16: {"rtol": 16 * 2**-11, "atol": 16 * 2**-11, "atol_per_max": 16 * 2**-11},
    torch.bfloat16: {"rtol": 16 * 2**-8, "atol": 16 * 2**-8, "atol_per_max": 16 * 2**-8},
}


def _outputs_and_gradients(fn, lstm, inputs, cotangents):
    """fn(lstm, lengths, x, h0, c0) and the gradients of x, h0, c0 and lstm's parameters."""
    *tensors, lengths = inputs
    leaves = [t.clone().requires_grad_() for t in tensors]
    outs = fn(lstm, lengths, *leaves)
    return outs, torch.autograd.grad(outs, leaves + list(lstm.parameters()), cotangents)


def _packed_nn_lstm(lstm, lengths, x, h0, c0):
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h_n, c_n) = lstm(packed, (h0, c0))
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], h_n, c_n


def _fastmsc_with_lstm_weights(backend):
    def fn(lstm, lengths, x, h0, c0):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if lstm.proj_size else ())
        suffixes = ("", "_reverse") if lstm.bidirectional else ("",)
        weights = tuple(tuple(getattr(lstm, f"{name}_l0{suffix}") for name in names) for suffix in suffixes)
        with fastmsc.use_backend(backend):
            return fastmsc.lstm_layer(x, weights, h0, c0, lengths)

    return fn


def check_reference_against_oracle(backend: str, draw: Draw) -> None:
    """The definition of ``lengths``: pack_padded_sequence + torch.nn.LSTM, outputs padded with zeros
    to T, h_n/c_n at each sequence's last valid step; gradients of x, h0, c0 and every parameter."""
    for bidirectional, proj in ((True, False), (False, False), (True, True), (False, True)):
        B, T, n_in, H = draw.int(2, 5), draw.int(2, 20), draw.int(1, 7), draw.int(2 if proj else 1, 9)
        P = draw.int(1, H - 1) if proj else 0
        R = P or H
        D = 2 if bidirectional else 1
        lstm = torch.nn.LSTM(n_in, H, batch_first=True, bidirectional=bidirectional, proj_size=P, dtype=torch.float64)
        lengths = draw.lengths(B, T, "mixed")
        inputs = (draw.randn(B, T, n_in), draw.randn(D, B, R), draw.randn(D, B, H), lengths)
        cotangents = (draw.randn(B, T, D * R), draw.randn(D, B, R), draw.randn(D, B, H))
        what = f"B={B} T={T} I={n_in} H={H} P={P} D={D} lengths={lengths.tolist()} {draw.tag()}"
        want, want_grads = _outputs_and_gradients(_packed_nn_lstm, lstm, inputs, cotangents)
        got, got_grads = _outputs_and_gradients(_fastmsc_with_lstm_weights(backend), lstm, inputs, cotangents)
        for name, a, b in zip(("out", "h_n", "c_n"), got, want, strict=True):
            assert_close(a, b, f"{name} {what}", rtol=1e-10, atol=1e-12)
        for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
            assert_close(a, b, f"gradient {i} (x, h0, c0, then parameters) {what}", rtol=1e-10, atol=1e-12)
        for b in range(B):
            assert torch.all(got[0][b, lengths[b]:] == 0), f"output past the length is not zero: {what}"


def test_lengths_may_be_a_list_or_int32():
    draw = Draw()
    x, weights = draw.randn(3, 5, 2), ((draw.randn(12, 2), draw.randn(12, 3), None, None),)
    as_tensor = fastmsc.lstm_layer(x, weights, lengths=torch.tensor([5, 1, 3]))
    for lengths in ([5, 1, 3], torch.tensor([5, 1, 3], dtype=torch.int32)):
        for a, b in zip(fastmsc.lstm_layer(x, weights, lengths=lengths), as_tensor, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _inputs():
    B, T, n_in, H = 2, 5, 3, 4
    x = torch.randn(B, T, n_in)
    direction = (torch.randn(4 * H, n_in), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H))
    return x, (direction, direction), torch.zeros(2, B, H), torch.zeros(2, B, H)


def _with(direction, index, value):
    return tuple(value if i == index else p for i, p in enumerate(direction))


def _projected(x, w, h, c, P=2):
    """The _inputs layer (H = 4) with a projection to P: w_hh (4H, P), w_hr (P, H), h0 (2, B, P)."""
    direction = (w[0][0], torch.randn(16, P), w[0][2], w[0][3], torch.randn(P, 4))
    return (direction, direction), torch.zeros(2, 2, P), c


BAD_CALLS = [
    ("x 2-D", lambda x, w, h, c: dict(x=x[0], weights=w), ValueError, r"x must be 3-D"),
    ("x int", lambda x, w, h, c: dict(x=x.int(), weights=w), TypeError, r"x must have dtype"),
    ("x complex", lambda x, w, h, c: dict(x=x.to(torch.complex64), weights=w), TypeError, r"x must have dtype"),
    ("x no steps", lambda x, w, h, c: dict(x=x[:, :0], weights=w), ValueError, r"x must have at least one time step"),
    ("three directions", lambda x, w, h, c: dict(x=x, weights=(w[0],) * 3), TypeError, r"weights must be a tuple"),
    ("weights a tensor", lambda x, w, h, c: dict(x=x, weights=w[0][0]), TypeError, r"weights must be a tuple"),
    ("direction of 3", lambda x, w, h, c: dict(x=x, weights=(w[0][:3],)), TypeError, r"weights\[0\] must be a tuple"),
    ("w_hh not 4H x H", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 1, torch.randn(16, 5)),)), ValueError,
     r"weights\[0\]\.w_hh must have shape \(20, 5\)"),
    ("w_ih wrong input size", lambda x, w, h, c: dict(x=x, weights=(w[0], _with(w[1], 0, torch.randn(16, 2)))),
     ValueError, r"weights\[1\]\.w_ih must have shape \(16, 3\)"),
    ("b_hh wrong size", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 3, torch.randn(15)),)), ValueError,
     r"weights\[0\]\.b_hh must have shape \(16,\)"),
    ("weight dtype mismatch", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 0, w[0][0].double()),)), TypeError,
     r"weights\[0\]\.w_ih has dtype float64 but x has float32"),
    ("weight int", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 1, w[0][1].long()),)), TypeError,
     r"weights\[0\]\.w_hh must have dtype"),
    ("h0 wrong shape", lambda x, w, h, c: dict(x=x, weights=w, h0=h[:1], c0=c), ValueError,
     r"h0 must have shape \(2, 2, 4\)"),
    ("c0 dtype mismatch", lambda x, w, h, c: dict(x=x, weights=w, h0=h, c0=c.double()), TypeError,
     r"c0 has dtype float64"),
    ("c0 2-D", lambda x, w, h, c: dict(x=x, weights=w, h0=h, c0=c[0]), ValueError, r"c0 must be 3-D"),
    ("lengths zero", lambda x, w, h, c: dict(x=x, weights=w, lengths=torch.tensor([0, 5])), ValueError,
     r"lengths must lie in \[1, 5\]"),
    ("lengths past T", lambda x, w, h, c: dict(x=x, weights=w, lengths=[6, 5]), ValueError,
     r"lengths must lie in \[1, 5\].*\[5, 6\]"),
    ("lengths float", lambda x, w, h, c: dict(x=x, weights=w, lengths=torch.tensor([2.0, 5.0])), TypeError,
     r"lengths must hold integers, got dtype float32"),
    ("lengths bool", lambda x, w, h, c: dict(x=x, weights=w, lengths=torch.tensor([True, True])), TypeError,
     r"lengths must hold integers"),
    ("lengths wrong shape", lambda x, w, h, c: dict(x=x, weights=w, lengths=torch.tensor([5, 5, 5])), ValueError,
     r"lengths must have shape \(2,\)"),
    ("lengths 2-D", lambda x, w, h, c: dict(x=x, weights=w, lengths=torch.tensor([[5, 5]])), ValueError,
     r"lengths must have shape \(2,\)"),
    ("lengths not numbers", lambda x, w, h, c: dict(x=x, weights=w, lengths="long"), TypeError,
     r"lengths must be a sequence of ints"),
    ("direction of 6", lambda x, w, h, c: dict(x=x, weights=(w[0] + (None, None),)), TypeError,
     r"weights\[0\] must be a tuple \(w_ih, w_hh, b_ih, b_hh\) or \(w_ih, w_hh, b_ih, b_hh, w_hr\), got a tuple of 6"),
    ("w_hr in one direction only", lambda x, w, h, c: dict(x=x, weights=(_projected(x, w, h, c)[0][0], w[1])),
     ValueError, r"w_hr \(the projection\) must be given for both directions or for none; weights\[0\] has w_hr"),
    ("w_hr not smaller than H", lambda x, w, h, c: dict(x=x, weights=(w[0] + (torch.randn(4, 4),),)),
     ValueError, r"weights\[0\]\.w_hr must have shape \(P, H\) with 1 <= P < H .*got \(4, 4\)"),
    ("w_hr of the other direction", lambda x, w, h, c: dict(
        x=x, weights=(_projected(x, w, h, c)[0][0], _with(_projected(x, w, h, c)[0][1], 4, torch.randn(3, 4)))),
     ValueError, r"weights\[1\]\.w_hr must have shape \(2, 4\) \(proj size x hidden\), got \(3, 4\)"),
    ("w_hr 1-D", lambda x, w, h, c: dict(x=x, weights=(w[0] + (torch.randn(4),),)), ValueError,
     r"weights\[0\]\.w_hr must be 2-D"),
    ("w_hr dtype mismatch", lambda x, w, h, c: dict(x=x, weights=(_with(_projected(x, w, h, c)[0][0], 4,
                                                                          torch.randn(2, 4).double()),)),
     TypeError, r"weights\[0\]\.w_hr has dtype float64 but x has float32"),
    ("w_hh not 4H x P", lambda x, w, h, c: dict(x=x, weights=(w[0] + (torch.randn(2, 4),),)), ValueError,
     r"weights\[0\]\.w_hh must have shape \(16, 2\) \(4H x proj size\), got \(16, 4\)"),
    ("h0 hidden wide with w_hr", lambda x, w, h, c: dict(x=x, weights=_projected(x, w, h, c)[0], h0=h, c0=c),
     ValueError, r"h0 must have shape \(2, 2, 2\) \(directions x batch x proj size\), got \(2, 2, 4\)"),
    ("c0 proj wide with w_hr", lambda x, w, h, c: dict(x=x, weights=_projected(x, w, h, c)[0],
                                                          h0=_projected(x, w, h, c)[1], c0=c[..., :2]),
     ValueError, r"c0 must have shape \(2, 2, 4\) \(directions x batch x hidden\), got \(2, 2, 2\)"),
]


@pytest.mark.parametrize("make_args, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("backend", ("reference", "torch", "fused", "auto"))
def test_bad_arguments_raise_clear_errors(backend, make_args, error, match):
    with fastmsc.use_backend(backend), pytest.raises(error, match=match):
        fastmsc.lstm_layer(**make_args(*_inputs()))


# Calls that are wrong only in ways lstm_layer's one-pass check of the common call must also refuse (the full
# check names the fault); with BAD_CALLS they are the cases below.
MORE_BAD_CALLS = [
    ("w_hh 6 x 1", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 1, torch.randn(6, 1)),))),
    ("w_hh 3-D", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 1, w[0][1][None]),))),
    ("b_ih 2-D", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 2, w[0][2][None]),))),
    ("w_ih not a tensor", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 0, w[0][0].tolist()),))),
    ("b_hh bfloat16", lambda x, w, h, c: dict(x=x, weights=(_with(w[0], 3, w[0][3].bfloat16()),))),
    ("second direction narrower", lambda x, w, h, c: dict(x=x, weights=(w[0], tuple(p[:12] for p in w[1])))),
    ("h0 as a list", lambda x, w, h, c: dict(x=x, weights=w, h0=h.tolist(), c0=c)),
    ("c0 for one direction", lambda x, w, h, c: dict(x=x, weights=w, h0=h, c0=c[:1])),
    ("x without inputs", lambda x, w, h, c: dict(x=x[..., :0], weights=w)),
]


@pytest.mark.parametrize("make_args", [c[1] for c in BAD_CALLS + MORE_BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS + MORE_BAD_CALLS])
def test_the_one_pass_check_lets_no_bad_call_through(make_args):
    """lstm_layer recognises the common call in one pass and checks every other call in full: what the one pass
    accepts, the full check accepts too, with the same weights (the calls above that are wrong only in their
    lengths, which both leave to check_lengths, pass both)."""
    layer = sys.modules["fastmsc.ops.lstm_layer"]
    args = make_args(*_inputs())
    call = (args["x"], args["weights"], args.get("h0"), args.get("c0"))
    common = layer._common_call(*call)
    if common is not None:
        assert "lengths" in args
        full = layer._validate_in_full(*call)
        assert [[a is b for a, b in zip(d, e, strict=True)] for d, e in zip(common, full, strict=True)] == \
            [[True] * 4] * len(full)


def test_the_one_pass_check_takes_the_common_calls():
    """The calls a model makes (with or without biases and states, one or two directions) take the one pass."""
    layer = sys.modules["fastmsc.ops.lstm_layer"]
    x, w, h, c = _inputs()
    no_bias = tuple(d[:2] + (None, None) for d in w)
    for call in ((x, w, h, c), (x, w[:1], None, None), (x, no_bias, None, c), (x.transpose(0, 1).contiguous()
                                                                                .transpose(0, 1), w, h, None)):
        assert layer._common_call(*call) is call[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to put one argument on another device")
def test_mismatched_devices_name_the_argument():
    x, w, h, c = _inputs()
    cuda_weights = tuple(tuple(p.cuda() for p in d) for d in w)
    with pytest.raises(ValueError, match=r"weights\[0\]\.w_ih is on cpu but x is on cuda"):
        fastmsc.lstm_layer(x.cuda(), w)
    with pytest.raises(ValueError, match=r"h0 is on cpu but x is on cuda"):
        fastmsc.lstm_layer(x.cuda(), cuda_weights, h, c.cuda())
