"""Second-order gradients (backward with create_graph=True, then backward again) of every op and module on every
backend: gradient penalties, Hessian-vector products and MAML-style updates differentiate a gradient.

Where a backend runs float64, torch.autograd.gradgradcheck checks it against finite differences, including the
derivatives with respect to the incoming gradients. The Triton kernels take no float64: on backend ``fused`` the
first and second-order gradients of a float32 run, with respect to the inputs and to the incoming gradients, are
compared with the float64 reference's. Shapes are tiny and odd (the Triton interpreter runs the forward kernels,
gradgradcheck calls the op many times); every value is a fresh random draw whose seed failures print.

Backend 'torch' is stock PyTorch: where it runs scaled_dot_product_attention through a kernel without double
backward (every SDPA kernel but MATH; on CPU, flash), the tests require PyTorch's RuntimeError, never numbers.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import TOL_FLOAT32, Draw, assert_close, rounded
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call

import fastmsc
from fastmsc import _extension
from fastmsc.backend import FusedUnavailable, use_backend
from fastmsc.kernels import _lstm_shared as lstm_shared
from fastmsc.kernels import attention as attention_kernels
from fastmsc.kernels import lstm_layer as lstm_kernels
from fastmsc.kernels import max_avg_pool as pool_kernels
from fastmsc.kernels import multiscale_conv1d as conv_kernels
from fastmsc.nn import LSTM, MaxAvgPool1d, MultiScaleConv1d, SelfAttention
from fastmsc.ops.attention import sdpa_backend

BACKENDS = ("reference", "torch", "fused", "auto")

# The float32 second-order gradients of backend 'fused' come from the reference math recomputed in float32 (eps
# 1.2e-7) over these few-step, few-channel shapes, so each element is off by ~1e-6 of the largest terms it sums;
# those terms are products of first-order terms and follow max|expected|, not each element, hence the atol share
# of the largest value. Float32 first-order tolerances (TOL_FLOAT32) with that share keep a 10x margin. A second-order
# gradient that is zero in exact arithmetic still sums terms of the others' size (the attention key bias: softmax
# ignores a constant added to a row of scores, yet its float32 second-order gradient came out at 1.3e-5 beside others
# of 5-12 with errors up to 2.4e-5; seed 3836015458): one whose largest value is under SECOND_ORDER_ZERO of the call's
# largest takes the share of that instead (_compare_float32).
TOL_SECOND_FLOAT32 = {**TOL_FLOAT32, "atol_per_max": 1e-5}
SECOND_ORDER_ZERO = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _lstm_extension():
    """Load (or build) the LSTM extension before the tests, so no test's time includes it; where it cannot load,
    backend 'fused' declines the LSTM and those cases skip."""
    if _extension.unavailable_reason() is None:
        lstm_kernels._ensure_registered()


def _weights_lstm(draw, D, n_in, H, bias, proj=0):
    """nn.LSTM's flat weights of one layer: per direction w_ih, w_hh[, b_ih, b_hh][, w_hr (proj, H)]."""
    R = proj or H
    return [t for _ in range(D) for t in (draw.randn(4 * H, n_in, scale=0.5), draw.randn(4 * H, R, scale=0.5),
                                           *((draw.randn(4 * H), draw.randn(4 * H)) if bias else ()),
                                           *((draw.randn(proj, H, scale=0.5),) if proj else ()))]


def _direction_tuples(flat, bias, proj):
    per = (4 if bias else 2) + (1 if proj else 0)
    return tuple((*flat[i:i + 2], *(flat[i + 2:i + 4] if bias else (None, None)),
                  *((flat[i + per - 1],) if proj else ()))
                 for i in range(0, len(flat), per))


def _lstm_case(draw, large=False):
    """(fn, float64 input values, description): one (bi)directional layer with states and mixed lengths.

    gradgradcheck's cost grows with the element count of inputs and outputs times the cost of one double
    backward, which for torch's packed LSTM is many small ops: ``large`` shapes take tens of seconds."""
    if large:
        B, T, n_in, H, D = 4, draw.int(4, 6), draw.int(2, 4), draw.int(2, 3), 2
    else:
        B, T, n_in, H, D = draw.int(2, 3), draw.int(2, 3), draw.int(1, 2), draw.int(1, 2), draw.int(1, 2)
    bias = draw.choice((True, False))
    proj = draw.choice((0, 1))  # torch.nn.LSTM's proj_size, which needs proj < H
    H = max(H, 2) if proj else H
    lengths = draw.lengths(B, T, "mixed")

    def fn(x, h0, c0, *flat):
        return fastmsc.lstm_layer(x, _direction_tuples(flat, bias, proj), h0, c0, lengths)

    values = [draw.randn(B, T, n_in), draw.randn(D, B, proj or H), draw.randn(D, B, H),
              *_weights_lstm(draw, D, n_in, H, bias, proj)]
    return fn, values, (f"lstm_layer B={B} T={T} I={n_in} H={H} D={D} bias={bias} proj={proj} "
                        f"lengths={lengths.tolist()}")


def _conv_case(draw):
    B, C_in, T = draw.int(1, 2), draw.int(1, 2), draw.int(3, 6)
    branches = [(draw.int(1, 2), draw.odd(1, 5)) for _ in range(draw.int(1, 2))]
    activation = draw.choice((None, "relu", "gelu"))
    with_bias = [draw.choice((True, False)) for _ in branches]
    if activation == "relu":
        # A draw whose pre-activations are all negative has no second-order gradient to compare: a first branch
        # with a bias of 3 or more keeps most of them positive (its conv sums have a standard deviation near 1.6).
        with_bias[0] = True
    n = len(branches)

    def fn(x, *params):
        biases = iter(params[n:])
        return fastmsc.multiscale_conv1d(x, list(params[:n]), [next(biases) if b else None for b in with_bias],
                                         activation)

    values = [draw.randn(B, C_in, T), *(draw.randn(c, C_in, k, scale=0.5) for c, k in branches),
              *(draw.randn(c) for (c, _), b in zip(branches, with_bias, strict=True) if b)]
    if activation == "relu":
        values[1 + n] = values[1 + n].abs() + 3.0
    return fn, values, f"multiscale_conv1d B={B} C_in={C_in} T={T} branches={branches} bias={with_bias} {activation}"


def _attention_case(draw):
    B, T, D = draw.int(2, 3), draw.int(2, 4), draw.int(1, 3)
    heads = draw.choice((None, 2))
    shape = (B, T, D) if heads is None else (B, heads, T, D)
    lengths = draw.lengths(B, T, "mixed")
    scale = draw.choice((None, 0.7))

    def fn(q, k, v):
        return fastmsc.attention(q, k, v, lengths, scale)

    values = [draw.randn(*shape) for _ in range(3)]
    return fn, values, f"attention shape={shape} scale={scale} lengths={lengths.tolist()}"


def _pool_case(draw):
    B, T, C = draw.int(2, 3), draw.int(2, 5), draw.int(1, 3)
    lengths = draw.lengths(B, T, draw.choice(("mixed", None)))

    def fn(x):
        return fastmsc.max_avg_pool(x, lengths)

    return fn, [draw.randn(B, T, C)], f"max_avg_pool B={B} T={T} C={C} lengths={lengths}"


def _module_case(name, draw):
    """(fn, float64 values, description) for an nn module: fn(x, *parameters) through torch.func.functional_call,
    so the parameters are gradgradcheck inputs too."""
    if name == "LSTM":
        B, T, n_in, H, proj = draw.int(2, 3), draw.int(2, 3), draw.int(1, 2), draw.int(2, 3), draw.choice((0, 1))
        module = LSTM(n_in, H, num_layers=2, bidirectional=draw.choice((True, False)), batch_first=True,
                      proj_size=proj)
        lengths = draw.lengths(B, T, "mixed")
        x = draw.randn(B, T, n_in)
        call = lambda m, p, x: functional_call(m, p, (x,), {"lengths": lengths})  # noqa: E731
        what = (f"LSTM B={B} T={T} I={n_in} H={H} proj_size={proj} bidirectional={module.bidirectional} "
                f"lengths={lengths.tolist()}")
    elif name == "MultiScaleConv1d":
        B, C_in, T = draw.int(1, 2), draw.int(1, 2), draw.int(3, 6)
        module = MultiScaleConv1d(C_in, (1, 2), kernel_sizes=(1, 3), activation=draw.choice((None, "gelu")))
        x = draw.randn(B, C_in, T)
        call = lambda m, p, x: functional_call(m, p, (x,))  # noqa: E731
        what = f"MultiScaleConv1d B={B} C_in={C_in} T={T} activation={module.activation}"
    elif name == "SelfAttention":
        B, T = draw.int(2, 3), draw.int(2, 3)
        module = SelfAttention(4, num_heads=2, out_proj=True)
        lengths = draw.lengths(B, T, "mixed")
        x = draw.randn(B, T, 4)
        call = lambda m, p, x: functional_call(m, p, (x,), {"lengths": lengths})  # noqa: E731
        what = f"SelfAttention B={B} T={T} E=4 heads=2 lengths={lengths.tolist()}"
    else:
        B, T, C = draw.int(2, 3), draw.int(2, 4), draw.int(1, 3)
        module = MaxAvgPool1d()
        lengths = draw.lengths(B, T, "mixed")
        x = draw.randn(B, T, C)
        call = lambda m, p, x: functional_call(m, p, (x,), {"lengths": lengths})  # noqa: E731
        what = f"MaxAvgPool1d B={B} T={T} C={C} lengths={lengths.tolist()}"
    names = [n for n, _ in module.named_parameters()]
    for p in module.parameters():  # fresh draws, not the module's own initialisation
        p.data = draw.randn(*p.shape, scale=0.5).to(p.dtype)

    def fn(x, *params):
        m = module.to(x.dtype)
        out = call(m, dict(zip(names, params, strict=True)), x)
        return out if isinstance(out, torch.Tensor) else (out[0], *out[1])

    return fn, [x, *(p.detach().double() for p in module.parameters())], what


CASES = {"lstm_layer": _lstm_case, "multiscale_conv1d": _conv_case, "attention": _attention_case,
         "max_avg_pool": _pool_case}
MODULES = ("LSTM", "MultiScaleConv1d", "SelfAttention", "MaxAvgPool1d")


def _as_tuple(outs):
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def _runs_float64(backend, fn, values) -> bool:
    """Whether ``backend`` takes this call in float64 (the Triton kernels decline it on backend 'fused')."""
    try:
        with use_backend(backend):
            fn(*(v.clone() for v in values))
    except FusedUnavailable:
        return False
    return True


def _runs_float32(backend, fn, values) -> bool:
    try:
        with use_backend(backend):
            fn(*(v.float() for v in values))
    except FusedUnavailable:
        return False
    return True


def _sdpa_without_double_backward(backend, name, values) -> str | None:
    """The SDPA kernel that the torch backend's attention would run here when that kernel has no double
    backward in PyTorch (every one but MATH), else None."""
    if name != "attention" or backend not in ("torch", "auto"):
        return None
    q = values[0]
    kernel = sdpa_backend(q, q, q, torch.ones(q.shape[0], dtype=torch.int64))
    return None if kernel == "MATH" else kernel


def _gradgradcheck(backend, fn, values, what, draw, fast_mode=False):
    inputs = [v.clone().requires_grad_() for v in values]

    def call(*args):
        with use_backend(backend):
            return fn(*args)

    try:
        torch.autograd.gradgradcheck(call, inputs, raise_exception=True, fast_mode=fast_mode)
    except GradcheckError as exc:
        pytest.fail(f"{what} [{draw.tag()}, backend={backend}]: gradgradcheck failed: {exc}")


def _second_order(backend, fn, values, dtype, cotangents, directions):
    """First-order gradients of fn's outputs for ``cotangents`` (which require grad), then the gradient of their
    dot product with ``directions`` with respect to the inputs and the cotangents; all in float64."""
    leaves = [v.to(dtype).requires_grad_() for v in values]
    with use_backend(backend):
        outs = _as_tuple(fn(*leaves))
    cots = [c.to(dtype).requires_grad_() for c in cotangents]
    grads = torch.autograd.grad(outs, leaves, cots, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves, strict=True)]
    total = sum((g * d.to(dtype)).sum() for g, d in zip(grads, directions, strict=True))
    targets = leaves + cots
    second = (torch.autograd.grad(total, targets, allow_unused=True) if total.requires_grad
              else [None] * len(targets))
    second = [torch.zeros_like(t) if g is None else g for g, t in zip(second, targets, strict=True)]
    return [g.double() for g in grads], [g.double() for g in second]


def _compare_float32(backend, fn, values, what, draw):
    """Backend ``backend`` in float32 against the float64 reference on the same rounded values."""
    rounded_values = [rounded(v, torch.float32) for v in values]
    if not _runs_float32(backend, fn, rounded_values):
        pytest.skip(f"{what}: backend {backend} declines float32 too")
    with use_backend("reference"):
        shapes = [o.shape for o in _as_tuple(fn(*rounded_values))]
    cotangents = [rounded(draw.randn(*s), torch.float32) for s in shapes]
    directions = [rounded(draw.randn(*v.shape), torch.float32) for v in values]
    grads, second = _second_order(backend, fn, rounded_values, torch.float32, cotangents, directions)
    ref_grads, ref_second = _second_order("reference", fn, rounded_values, torch.float64, cotangents, directions)
    prefix = f"{what} [{draw.tag()}, backend={backend}, float32]"
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(got, want, f"{prefix} first-order gradient {i}", **TOL_SECOND_FLOAT32)
    n = len(values)
    largest = max(float(g.abs().max()) for g in ref_second if g.numel())
    for i, (got, want) in enumerate(zip(second, ref_second, strict=True)):
        target = f"input {i}" if i < n else f"incoming gradient {i - n}"
        tolerance = dict(TOL_SECOND_FLOAT32)
        if want.numel() == 0 or float(want.abs().max()) < SECOND_ORDER_ZERO * largest:
            tolerance["atol"] += tolerance["atol_per_max"] * largest
        assert_close(got, want, f"{prefix} second-order gradient w.r.t. {target}", **tolerance)
    assert any(g.abs().max() > 0 for g in ref_second), f"{prefix}: the draw gives no second-order gradient at all"


def _check(backend, fn, values, what, draw, name, fast_mode=False):
    kernel = _sdpa_without_double_backward(backend, name, values)
    if kernel is not None:
        # Backend 'torch' is stock PyTorch: its SDPA kernels other than MATH have no double backward, and PyTorch
        # says so; what matters is that it raises instead of returning numbers.
        inputs = [v.clone().requires_grad_() for v in values]
        with use_backend(backend):
            out = _as_tuple(fn(*inputs))[0]
        grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
        try:
            torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)
        except RuntimeError as exc:
            assert "not implemented" in str(exc), f"{what} [{draw.tag()}, backend={backend}]: {exc}"
        else:
            pytest.fail(f"{what} [{draw.tag()}, backend={backend}]: SDPA's {kernel} kernel has no double backward "
                        f"in PyTorch, yet the second backward returned")
        return
    if _runs_float64(backend, fn, values):
        _gradgradcheck(backend, fn, values, what, draw, fast_mode)
    else:
        assert backend == "fused", f"{what}: backend {backend} declined float64"
        _compare_float32(backend, fn, values, what, draw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_op_second_order(name, backend):
    draw = Draw()
    fn, values, what = CASES[name](draw)
    _check(backend, fn, values, what, draw, name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_layer_second_order_larger(backend):
    draw = Draw()
    fn, values, what = _lstm_case(draw, large=True)
    _check(backend, fn, values, what, draw, "lstm_layer")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODULES)
def test_module_second_order(name, backend):
    draw = Draw()
    fn, values, what = _module_case(name, draw)
    # A module brings dozens of parameters, each a column of the full Jacobians gradgradcheck would build; its fast
    # mode checks them along random directions instead (one column), which the ops' full checks complement.
    _check(backend, fn, values, what, draw, "attention" if name == "SelfAttention" else name, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_gradient_penalty_matches_reference(backend):
    """d/dx |d/dx |lstm(x)|^2|^2 on one layer with biases, float64: the backends agree with the reference."""
    draw = Draw()
    B, T, n_in, H = draw.int(1, 3), draw.int(1, 4), draw.int(1, 3), draw.int(1, 3)
    values = [draw.randn(B, T, n_in), *_weights_lstm(draw, 1, n_in, H, True)]

    def penalty(name):
        x = values[0].clone().requires_grad_()
        with use_backend(name):
            out, _, _ = fastmsc.lstm_layer(x, (tuple(values[1:]),))
        g, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), x)[0]

    expected = penalty("reference")
    what = f"lstm_layer B={B} T={T} I={n_in} H={H} [{draw.tag()}, backend={backend}]"
    assert expected.abs().max() > 0, what
    assert_close(penalty(backend), expected, what, rtol=1e-9, atol=1e-10)


def test_compiled_packed_lstm_op_second_order():
    """The torch backend's packed LSTM op (what torch.compile runs for lengths), called eagerly, differentiates
    twice through the recomputed reference layer."""
    draw = Draw()
    B, T, n_in, H, D = 3, draw.int(2, 3), draw.int(1, 2), draw.int(1, 2), draw.int(1, 2)
    lengths = draw.lengths(B, T, "mixed")
    bias = draw.choice((True, False))
    proj = draw.choice((0, 1))
    H = max(H, 2) if proj else H

    def fn(x, h0, c0, *flat):
        return torch.ops.fastmsc.lstm_layer_packed(x, list(flat), h0, c0, lengths, bias, D == 2)

    values = [draw.randn(B, T, n_in), draw.randn(D, B, proj or H), draw.randn(D, B, H),
              *_weights_lstm(draw, D, n_in, H, bias, proj)]
    what = (f"lstm_layer_packed B={B} T={T} I={n_in} H={H} D={D} bias={bias} proj={proj} "
            f"lengths={lengths.tolist()}")
    _gradgradcheck("torch", fn, values, what, draw)


@pytest.mark.parametrize("name", list(CASES))
def test_first_order_keeps_kernels(name, monkeypatch):
    """Without create_graph the fused backward runs its kernels, never the recomputation."""
    def refuse(*args, **kwargs):
        raise AssertionError("the first-order backward recomputed the reference")

    for module in (attention_kernels, lstm_shared, conv_kernels):
        monkeypatch.setattr(module, "recomputed_grads", refuse)
    monkeypatch.setattr(pool_kernels, "_differentiable_backward", refuse)
    draw = Draw()
    fn, values, what = CASES[name](draw)
    dtype = torch.float64 if _runs_float64("fused", fn, values) else torch.float32
    leaves = [v.to(dtype).requires_grad_() for v in values]
    with use_backend("fused"):
        outs = _as_tuple(fn(*leaves))
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves, allow_unused=True)
    assert any(g is not None for g in grads), f"{what} [{draw.tag()}]"


@pytest.mark.parametrize("name", list(CASES))
def test_half_inputs_second_order_match_reference(name):
    """float16 inputs on backend 'fused': the recomputation runs the reference's float32 math on the same half
    inputs and returns each gradient in its input's dtype, as the reference backend does."""
    draw = Draw()
    fn, values, what = CASES[name](draw)
    values = [rounded(v, torch.float16) for v in values]
    cotangents = [draw.randn(*o.shape) for o in _as_tuple(fn(*values))]
    directions = [draw.randn(*v.shape) for v in values]
    results = {}
    for backend in ("fused", "reference"):
        leaves = [v.to(torch.float16).requires_grad_() for v in values]
        with use_backend(backend):
            outs = _as_tuple(fn(*leaves))
        cots = [c.to(torch.float16).requires_grad_() for c in cotangents]
        grads = torch.autograd.grad(outs, leaves, cots, create_graph=True, allow_unused=True)
        assert all(g is None or g.dtype == torch.float16 for g in grads), f"{what} [{draw.tag()}, {backend}]"
        grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves, strict=True)]
        total = sum((g.float() * d.float()).sum() for g, d in zip(grads, directions, strict=True))
        targets = leaves + cots
        second = (torch.autograd.grad(total, targets, allow_unused=True) if total.requires_grad
                  else [None] * len(targets))
        results[backend] = [g.double() for g in grads] + [
            torch.zeros_like(t, dtype=torch.float64) if g is None else g.double()
            for g, t in zip(second, targets, strict=True)]
    # Both sides run one float32 computation from the same float16 values; only the order of a few float32
    # accumulations may differ, far below float16's rounding of the results (eps 9.8e-4).
    for i, (got, want) in enumerate(zip(results["fused"], results["reference"], strict=True)):
        assert_close(got, want, f"{what} [{draw.tag()}] gradient {i}", rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ("reference", "fused"))
def test_one_tensor_as_query_key_and_value(backend):
    """attention(x, x, x): the fused recomputation gives q, k and v one gradient each, whose sum reaches x."""
    draw = Draw()
    B, T, D = draw.int(2, 3), draw.int(2, 4), draw.int(1, 3)
    lengths = draw.lengths(B, T, "mixed")

    def fn(x):
        return fastmsc.attention(x, x, x, lengths)

    _check(backend, fn, [draw.randn(B, 2, T, D)], f"attention(x, x, x) B={B} T={T} D={D}", draw, "attention")
