"""The persistent Triton LSTM kernel (fastmsc.kernels.lstm_persistent), run through the Triton interpreter on CPU
tensors (backend 'fused', LSTM implementation 'persistent'): outputs and every gradient against the float64
reference on awkward shapes (batch not a multiple of the 16-row tile, hidden sizes not a power of two, T = 1,
lengths 1 and T, one and two directions, with and without h0/c0 and bias, strided x), in float32, float16 and
bfloat16; one and several chunks of columns and of the recurrent product; empty batches; NaN confinement;
determinism; the policy (FASTMSC_LSTM_IMPL) and what the kernel refuses.

Random shapes and values are drawn fresh each run; failure messages carry the seed (FASTMSC_TEST_SEED=<seed>).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

import fastmsc
from fastmsc.backend import FusedUnavailable, set_lstm_impl, use_lstm_impl
from fastmsc.kernels import _common, lstm_persistent
from fastmsc.ops.lstm_layer import OP, lstm_layer_reference

# Marked cuda as well, so that the GPU check's `pytest -m cuda` runs these tests compiled on the GPU; without one
# they run in the Triton interpreter.
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (_common.INTERPRETED or torch.cuda.is_available()),
                                 reason="the persistent kernel runs on CUDA or in the Triton interpreter "
                                        "(TRITON_INTERPRET=1, which the test suite sets without a GPU)")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def rng():
    seed = int(os.environ.get("FASTMSC_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    return random.Random(seed), seed


@pytest.fixture
def persistent_calls(monkeypatch):
    """Counts the persistent kernel's forward launches, so a test knows the kernel (not a fallback) ran."""
    calls = []
    original = lstm_persistent.forward

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(lstm_persistent, "forward", counting)
    return calls


@pytest.fixture(params=["resident", "streaming"])
def variant(request, monkeypatch):
    """Runs a test on each of the two kernel pairs: W_hh resident in shared memory with the state in registers, and
    W_hh streamed from L2 in chunks with the state in memory (what layers too large for shared memory run)."""
    chosen = request.param == "resident"
    asked, original = [], lstm_persistent.resident

    def choose(H, dtype, device):
        asked.append(H)
        if chosen and device.type == "cuda" and not original(H, dtype, device):
            pytest.skip(f"W_hh at H={H} in {dtype} does not fit this GPU's shared memory: it runs the streaming pair")
        return chosen

    monkeypatch.setattr(lstm_persistent, "resident", choose)
    yield request.param
    assert asked, "the launchers never chose between the kernel pairs"


def _case(r, B, T, H, D, dtype, *, lengths=True, state=True, bias=True, strided=False):
    n_in = r.randint(1, 6)
    if strided:
        x = torch.randn(T, B, n_in, dtype=torch.float64).transpose(0, 1)
    else:
        x = torch.randn(B, T, n_in, dtype=torch.float64)
    weights = tuple((torch.randn(4 * H, n_in, dtype=torch.float64) * 0.5,
                     torch.randn(4 * H, H, dtype=torch.float64) * 0.5,
                     torch.randn(4 * H, dtype=torch.float64) * 0.5 if bias else None,
                     torch.randn(4 * H, dtype=torch.float64) * 0.5 if bias and r.random() < 0.7 else None)
                    for _ in range(D))
    h0 = torch.randn(D, B, H, dtype=torch.float64) if state else None
    c0 = torch.randn(D, B, H, dtype=torch.float64) if state else None
    lens = None
    if lengths:
        lens = torch.tensor([r.randint(1, T) for _ in range(B)])
        lens[0], lens[-1] = T, 1  # both extremes in every case
    upstream = (torch.randn(B, T, D * H, dtype=torch.float64), torch.randn(D, B, H, dtype=torch.float64),
                torch.randn(D, B, H, dtype=torch.float64))
    return (x, weights, h0, c0, lens), upstream


def _as(args, dtype):
    """The case's tensors in ``dtype`` on DEVICE, as fresh leaves requiring grad (layout of x kept)."""
    x, weights, h0, c0, lengths = args

    def leaf(t):
        return None if t is None else t.to(DEVICE, dtype).detach().requires_grad_()

    x = leaf(x) if x.is_contiguous() else leaf(x.transpose(0, 1).contiguous()).transpose(0, 1)
    return (x, tuple(tuple(leaf(p) for p in params) for params in weights), leaf(h0), leaf(c0),
            None if lengths is None else lengths.to(DEVICE))


def _outputs_and_grads(fn, args, upstream):
    x, weights, h0, c0, lengths = args
    out, h_n, c_n = fn(x, weights, h0, c0, lengths)
    leaves = [t for t in (x, h0, c0, *(p for params in weights for p in params)) if t is not None]
    loss = sum((o * u.to(o.device, o.dtype)).sum() for o, u in zip((out, h_n, c_n), upstream, strict=True))
    return [out, h_n, c_n, *torch.autograd.grad(loss, leaves)]


def _names(args):
    x, weights, h0, c0, _ = args
    names = ["out", "h_n", "c_n", "dx"] + (["dh0"] if h0 is not None else []) + (["dc0"] if c0 is not None else [])
    for d, params in enumerate(weights):
        names += [f"d{name}[{d}]" for name, p in zip(("w_ih", "w_hh", "b_ih", "b_hh"), params, strict=True)
                  if p is not None]
    return names


def _persistent(x, weights, h0, c0, lengths):
    with fastmsc.use_backend("fused"), use_lstm_impl("persistent"):
        return fastmsc.lstm_layer(x, weights, h0, c0, lengths)


# Error per tensor relative to its largest float64 reference magnitude, or to 1 where that is smaller (h lies in
# (-1, 1); a tiny tensor, such as the one output of B = T = H = 1, can sit on a cancelling sum, which no
# rounding-level relative bound holds). float32: the interpreter's tl.dot is an IEEE fp32 product (on a GPU the
# float32 products run as 3xTF32, within a few ulps of it), so the kernel rounds like any fp32 LSTM: over 1,080 random
# cases (B <= 20, T <= 10, H <= 60, both kernel pairs) the worst was 2.2e-6 (about 18 fp32 roundoffs); 1e-5 is
# allowed. Half types: x W_ihᵀ is rounded to the half type, h is rounded to it before each step's product (as
# cuDNN's half LSTMs do), and the gates and cells kept for the backward are half, so rounding errors compound
# through the recurrence: in units u of the type's roundoff (2^-11 float16, 2^-8 bfloat16) the worst over the same
# cases was 7.4u for the outputs and 17.0u for the gradients; 12u and 36u are allowed. An indexing or masking
# mistake errs by O(1): 256u in bfloat16.
FP32_BOUND = 1e-5
HALF_BOUNDS = (12, 36)


def _check(got, expected, names, dtype, context):
    unit = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}.get(dtype)
    for i, (name, g, e) in enumerate(zip(names, got, expected, strict=True)):
        assert g.dtype == dtype, f"{context}: {name} came back as {g.dtype}"
        g, e = g.detach().double().cpu(), e.detach()
        error = float((g - e).abs().max() / e.abs().max().clamp_min(1.0))
        if unit is None:
            assert error <= FP32_BOUND, f"{context}: {name} off by {error:.2e} (relative to its max)"
        else:
            bound = HALF_BOUNDS[0] if i < 3 else HALF_BOUNDS[1]
            assert error / unit <= bound, f"{context}: {name} off by {error / unit:.1f}u > {bound}u"


@pytest.mark.parametrize("B, T, H, D", [(1, 1, 1, 1), (5, 7, 20, 2), (19, 4, 33, 2), (3, 9, 16, 1), (17, 2, 7, 2),
                                        (4, 3, 70, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_against_float64_reference(rng, persistent_calls, B, T, H, D, dtype, variant):
    r, seed = rng
    args, upstream = _case(r, B, T, H, D, dtype, lengths=r.random() < 0.8, state=r.random() < 0.7,
                           bias=r.random() < 0.8, strided=r.random() < 0.3)
    rounded = _as(args, dtype)
    expected = _outputs_and_grads(lstm_layer_reference, _double_of(rounded), upstream)
    got = _outputs_and_grads(_persistent, rounded, upstream)
    assert len(persistent_calls) == 1, "the persistent kernel did not run"
    lengths = None if args[4] is None else args[4].tolist()
    _check(got, expected, _names(args), dtype, f"seed {seed}, (B,T,H,D)={(B, T, H, D)}, {dtype}, lengths={lengths}")


def _double_of(args):
    """The same (rounded) values in float64 as fresh leaves: the reference sees exactly what the kernel saw."""
    x, weights, h0, c0, lengths = args

    def leaf(t):
        return None if t is None else t.detach().cpu().double().requires_grad_()

    return (leaf(x), tuple(tuple(leaf(p) for p in params) for params in weights), leaf(h0), leaf(c0),
            None if lengths is None else lengths.cpu())


def test_the_cases_cover_several_chunks():
    """The kernels work in BLOCK_J-wide column chunks and BLOCK_K-wide reduction chunks: the cases above include one
    of each (H = 7), several reduction chunks with a partial last one (H = 20 and 33 in fp32) and several column
    chunks with a partial last one (H = 70)."""
    def chunks(H, dtype):
        config = lstm_persistent._config(H, dtype)
        return -(-H // config["BLOCK_J"]), -(-H // config["BLOCK_K"])

    assert chunks(7, torch.float32) == (1, 1)
    assert chunks(20, torch.float32) == (1, 2) and chunks(33, torch.float32) == (1, 3)
    assert chunks(70, torch.float32) == (2, 5) and chunks(70, torch.bfloat16) == (2, 5)


def test_empty_batch(persistent_calls):
    x = torch.zeros(0, 5, 3, device=DEVICE, requires_grad=True)
    weights = ((torch.randn(8, 3, device=DEVICE, requires_grad=True), torch.randn(8, 2, device=DEVICE,
                                                                                  requires_grad=True), None, None),)
    out, h_n, c_n = _persistent(x, weights, None, None, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert out.shape == (0, 5, 2) and h_n.shape == (1, 0, 2) and c_n.shape == (1, 0, 2)
    dx, dw = torch.autograd.grad(out.sum() + h_n.sum(), (x, weights[0][0]))
    assert dx.shape == (0, 5, 3) and not dw.any()


def test_nan_stays_in_its_sequence_and_padding_is_never_read(rng, variant):
    r, seed = rng
    args, upstream = _case(r, 6, 7, 9, 2, torch.float32, lengths=True, state=True)
    x, weights, h0, c0, lengths = _as(args, torch.float32)
    lengths[2] = 4
    with torch.no_grad():
        x[2, 1, 0] = float("nan")  # a valid step of sequence 2
        x[3, int(lengths[3]):] = float("nan")  # padding of sequence 3 (empty when its length is T)
    got = _outputs_and_grads(_persistent, (x, weights, h0, c0, lengths), upstream)
    out, h_n = got[0], got[1]
    others = [b for b in range(6) if b != 2]
    assert torch.isfinite(out[others]).all() and torch.isfinite(h_n[:, others]).all(), f"seed {seed}"
    assert torch.isnan(out[2, 1, :9]).all() and torch.isnan(out[2, :2, 9:]).all(), f"seed {seed}: NaN must reach " \
        "the forward direction from step 1 on and the reverse direction up to step 1"
    assert (out[2, 4:] == 0).all(), f"seed {seed}: padding stays zero"
    dx = got[3]
    assert torch.isfinite(dx[3]).all() and torch.isfinite(dx[others]).all(), f"seed {seed}"


def test_deterministic(rng, variant):
    r, _ = rng
    args, upstream = _case(r, 19, 6, 24, 2, torch.float32)
    first = _outputs_and_grads(_persistent, _as(args, torch.float32), upstream)
    second = _outputs_and_grads(_persistent, _as(args, torch.float32), upstream)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_second_order_gradients_through_the_reference(rng):
    r, seed = rng
    args, _ = _case(r, 3, 4, 5, 2, torch.float32)
    x, weights, h0, c0, lengths = _as(args, torch.float32)
    out, _, _ = _persistent(x, weights, h0, c0, lengths)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)
    xd, wd, h0d, c0d, _ = _double_of((x, weights, h0, c0, lengths))
    out_d, _, _ = lstm_layer_reference(xd, wd, h0d, c0d, None if lengths is None else lengths.cpu())
    (gxd,) = torch.autograd.grad(out_d.square().sum(), xd, create_graph=True)
    (ggxd,) = torch.autograd.grad(gxd.square().sum(), xd)
    torch.testing.assert_close(ggx.double().cpu(), ggxd, rtol=1e-4, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def test_refusals_name_the_reason(persistent_calls):
    x = torch.randn(2, 3, 4, device=DEVICE)
    plain = ((torch.randn(4 * 513, 4, device=DEVICE), torch.randn(4 * 513, 513, device=DEVICE), None, None),)
    projected = ((torch.randn(16, 4, device=DEVICE), torch.randn(16, 2, device=DEVICE), None, None,
                  torch.randn(2, 4, device=DEVICE)),)
    cases = [(x, plain, "takes hidden sizes up to 512, got 513"),
             (x, projected, r"has no projection \(proj_size\)"),
             (x.double(), tuple(tuple(p.double() for p in w[:2]) + (None, None) for w in plain),
              "take float32, float16 or bfloat16 inputs, got float64")]
    for xs, weights, message in cases:
        with pytest.raises(FusedUnavailable, match=message):
            _persistent(xs, weights, None, None, None)
    assert not persistent_calls


def test_policy(persistent_calls):
    """auto never runs the interpreter; 'stepwise' is the extension; a bad name is refused naming the variable."""
    x = torch.randn(2, 3, 4, device=DEVICE)
    weights = ((torch.randn(16, 4, device=DEVICE), torch.randn(16, 4, device=DEVICE), None, None),)
    assert OP.why_not_fused(DEVICE, allow_interpreter=True, lstm_impl="persistent", x=x, weights=weights) is None
    if DEVICE == "cpu":
        with use_lstm_impl("persistent"):
            fastmsc.lstm_layer(x, weights)  # backend auto: never the interpreter
        assert OP.why_not_fused("cpu", allow_interpreter=False, lstm_impl="persistent", x=x,
                                weights=weights).startswith("Triton kernels run on CUDA tensors")
    # 'stepwise' never runs the persistent kernel (under 'auto': the extension, or torch where it is unavailable, as
    # in the GPU check's dry run)
    with fastmsc.use_backend("auto"), use_lstm_impl("stepwise"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fastmsc.lstm_layer(x, weights)
    assert not persistent_calls
    with pytest.raises(ValueError, match="unknown fastmsc LSTM implementation 'fast' .*FASTMSC_LSTM_IMPL"):
        set_lstm_impl("fast")
    done = subprocess.run([sys.executable, "-c", "import fastmsc.backend as b; print(b.get_lstm_impl())"],
                          env={**os.environ, "FASTMSC_LSTM_IMPL": "persistent"}, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "persistent", done.stderr[-2000:]


def test_opcheck(rng):
    r, _ = rng
    args, _ = _case(r, 3, 4, 5, 2, torch.float32, lengths=True, state=True)
    x, weights, h0, c0, lengths = _as(args, torch.float32)
    w_ih = torch.cat([p[0] for p in weights]).detach().requires_grad_()
    w_hh = torch.stack([p[1] for p in weights]).detach().requires_grad_()
    bias = torch.randn(w_ih.shape[0], device=DEVICE)
    torch.library.opcheck(torch.ops.fastmsc.lstm_persistent_fwd, (x, w_ih, w_hh, bias, h0, c0, lengths, True))


def test_info_names_the_lstm_implementation():
    from fastmsc.backend import LSTM_IMPLS
    from fastmsc.info import _LSTM_IMPL_TEXT, format_info

    assert set(_LSTM_IMPL_TEXT) == set(LSTM_IMPLS)
    assert f"hidden size <= {lstm_persistent.MAX_HIDDEN}," in _LSTM_IMPL_TEXT["auto"]
    with use_lstm_impl("stepwise"):
        assert "lstm_impl: stepwise (FASTMSC_LSTM_IMPL)" in format_info()


def test_any_layout_of_state_lengths_bias_and_incoming_gradients(rng, variant):
    """c0, h0, the gradients coming into h_n and c_n, lengths and a bias may be permuted or strided views: the
    kernels see their values, not their memory order."""
    r, seed = rng
    B, T, H, D = 5, 6, 9, 2
    args, upstream = _case(r, B, T, H, D, torch.float32, lengths=True, state=True)
    x, weights, h0, c0, lengths = _as(args, torch.float32)

    def permuted(t):  # the same values as a (D, B, H) view of a (B, D, H) tensor
        return t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()

    def strided(t):  # the same values at every other element of a larger buffer
        buffer = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        buffer[..., ::2] = t.detach()
        return buffer[..., ::2].requires_grad_()

    odd_lengths = torch.stack([lengths, lengths], dim=1)[:, 1]
    odd_weights = tuple((w_ih, w_hh, None if b_ih is None else strided(b_ih), b_hh)
                        for w_ih, w_hh, b_ih, b_hh in weights)
    odd_upstream = (upstream[0], permuted(upstream[1].to(DEVICE, torch.float32)),
                    permuted(upstream[2].to(DEVICE, torch.float32)))
    assert not odd_lengths.is_contiguous() and not odd_upstream[1].is_contiguous()
    got = _outputs_and_grads(_persistent, (x, odd_weights, permuted(h0), permuted(c0), odd_lengths), odd_upstream)
    expected = _outputs_and_grads(lstm_layer_reference, _double_of((x, weights, h0, c0, lengths)), upstream)
    for name, g, e in zip(_names(args), got, expected, strict=True):
        torch.testing.assert_close(g.detach().double().cpu(), e.detach(), rtol=0, atol=FP32_BOUND * 10,
                                   msg=lambda m, name=name: f"seed {seed}, {name}: {m}")


def test_persistent_calls_never_load_the_extension(monkeypatch):
    """A call the persistent kernel serves needs no compiled extension: none is loaded or built for it (the first
    such call would otherwise compile it for minutes, and warn about it where no compiler exists)."""
    from fastmsc import _extension

    def refuse():
        raise AssertionError("the extension was loaded for a persistent call")

    monkeypatch.setattr(_extension, "unavailable_reason", refuse)
    x = torch.randn(2, 3, 4, device=DEVICE)
    weights = ((torch.randn(16, 4, device=DEVICE), torch.randn(16, 4, device=DEVICE), None, None),)
    _persistent(x, weights, None, None, None)


@pytest.mark.parametrize("dtype, H, B, D, sm_count, expected", [
    (torch.bfloat16, 128, 32, 2, 132, True),  # the model's layer: 128 KB of W_hh per step
    (torch.bfloat16, 256, 64, 2, 132, True),  # 512 KB: the design's limit
    (torch.bfloat16, 257, 64, 2, 132, False),
    (torch.float32, 181, 8, 1, 132, True),  # 4·181²·4 bytes = 524,176 <= 512 KB
    (torch.float32, 182, 8, 1, 132, False),
    (torch.float16, 512, 8, 2, 132, False),  # 2 MB per step: the stepwise path's GEMMs
    (torch.bfloat16, 64, 16 * 66, 2, 132, True),  # 132 programs: one wave
    (torch.bfloat16, 64, 16 * 66 + 1, 2, 132, False),  # 134 programs: a second wave would wait for the first
    (torch.bfloat16, 64, 16 * 54, 2, 108, True),  # an A100's 108 SMs
    (torch.bfloat16, 64, 16 * 55, 2, 108, False),
])
def test_auto_takes_the_persistent_kernel_where_the_design_expects_it_to_win(monkeypatch, dtype, H, B, D, sm_count,
                                                                              expected):
    """FASTMSC_LSTM_IMPL=auto on CUDA (fake tensors: no GPU needed): persistent where W_hh per step is at most
    PREFERRED_W_HH_BYTES and every program fits one wave on the GPU's SMs; stepwise elsewhere, unless the extension
    cannot run at all, where the persistent kernel takes every layer it supports."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmsc.kernels import lstm_layer as kernels

    monkeypatch.setattr(_common, "compute_capability", lambda device: 90)
    monkeypatch.setattr(lstm_persistent, "_sm_count", lambda device: sm_count)
    monkeypatch.setattr(kernels, "_stepwise_unsupported", lambda device_type: None)
    with FakeTensorMode():
        x = torch.empty(B, 7, 5, device="cuda", dtype=dtype)
        weights = tuple((torch.empty(4 * H, 5, device="cuda", dtype=dtype),
                         torch.empty(4 * H, H, device="cuda", dtype=dtype), None, None) for _ in range(D))
    assert kernels._uses_persistent(x, weights, "auto") is expected
    assert kernels.fused_unsupported("cuda", lstm_impl="auto", x=x, weights=weights) is None  # either way it runs
    monkeypatch.setattr(kernels, "_stepwise_unsupported", lambda device_type: "no extension")
    assert kernels._uses_persistent(x, weights, "auto")
    assert kernels.fused_unsupported("cuda", lstm_impl="auto", x=x, weights=weights) is None
    assert kernels._uses_persistent(x, weights, "persistent") and not kernels._uses_persistent(x, weights, "stepwise")
