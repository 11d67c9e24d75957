"""CUDA-only checks of the fused ops: every op against the float64 reference (forward and every gradient)
in float32/float16/bfloat16 (the LSTM also with a projection, torch's proj_size), ``auto`` choosing the fused
path, torch.compile(fullgraph=True) of MSCClassifier on the fused backend, and CUDA-graph capture of the LSTM op.

All skip with "needs a CUDA GPU" on machines without one; bench/gpu_check.sh runs them on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import Draw, assert_close

import fastmsc
from fastmsc.backend import OPS
from fastmsc.models import MSCClassifier

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tolerance(dtype: torch.dtype, expected: torch.Tensor, tf32: bool = False) -> dict:
    """Inputs are rounded to ``dtype`` for both sides, so only the kernel's own rounding differs: fp32
    accumulation (~1e-6 relative over the few hundred terms here) and, for half types, intermediates
    stored in the input dtype (softmax probabilities, the saved forward output) whose error follows the
    largest values of a tensor, not each element: hence 8 ulps of the dtype relative to max|expected|.
    fp32 is tight where the products are IEEE or 3xTF32 (torch.backends.cuda.matmul.allow_tf32 off, torch's
    default, for the matmul-based ops; the conv tests turn torch.backends.cudnn.allow_tf32 off).

    ``tf32``: fp32 operands rounded to TF32 (10 mantissa bits, unit roundoff u = 2^-11) inside every product. The
    conv's shapes below, emulated in float64 with operands truncated to TF32 (the tensor cores drop the low 13
    bits; rounding would halve the error), 30 seeds each, without ReLU (whose kink flips wherever TF32 moves z
    across 0): the worst error was 2.2u of max|expected| for the output, 2.4u for dx and 4.7u for dW; 16u is
    allowed, where a wrong index or missed term errs by O(0.1)."""
    if tf32:
        unit = 2.0**-11
        return {"rtol": 8 * unit, "atol": 16 * unit * max(1.0, float(expected.abs().max()))}
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-5 * max(1.0, float(expected.abs().max()))}
    ulp = {torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    return {"rtol": 8 * ulp, "atol": 8 * ulp * max(1.0, float(expected.abs().max()))}


def _place(values: torch.Tensor, dtype: torch.dtype, strided: bool) -> torch.Tensor:
    """values (float64, CPU) rounded to dtype on the GPU, requiring grad; ``strided`` gives a view with
    every other element of a NaN-filled buffer, so a kernel that ignores strides reads NaN."""
    if not strided:
        return values.to(dtype).to(DEVICE).requires_grad_()
    buffer = torch.full((*values.shape[:-1], 2 * values.shape[-1]), float("nan"), dtype=dtype, device=DEVICE)
    buffer[..., ::2] = values.to(dtype).to(DEVICE)
    return buffer.requires_grad_()[..., ::2]


def _check_against_reference(call, values: dict, lengths, dtype, draw, what, strided=(), tf32=False):
    """Run ``call(tensors, lengths)`` with backend 'fused' in ``dtype`` and 'reference' in float64 on the
    same rounded values; compare every output and the gradient of every tensor (``tf32``: see _tolerance)."""
    tensors = {name: _place(v, dtype, name in strided) for name, v in values.items()}
    reference_inputs = {name: v.to(dtype).double().to(DEVICE).requires_grad_() for name, v in values.items()}
    lengths = None if lengths is None else lengths.to(DEVICE)
    with fastmsc.use_backend("fused"):
        outs = call(tensors, lengths)
    with fastmsc.use_backend("reference"):
        ref_outs = call(reference_inputs, lengths)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    cotangents = [draw.randn(*o.shape).to(dtype).to(DEVICE) for o in ref_outs]
    names = list(values)
    grads = torch.autograd.grad(outs, [tensors[n] for n in names], cotangents, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_outs, [reference_inputs[n] for n in names],
                                    [c.double() for c in cotangents], allow_unused=True)
    prefix = f"{what} dtype={str(dtype).replace('torch.', '')} [{draw.tag()}]"
    for i, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert out.dtype == dtype and out.device.type == "cuda", f"{prefix}: output {i} is {out.dtype} on {out.device}"
        assert_close(out.double(), ref, f"{prefix} output {i}", **_tolerance(dtype, ref, tf32))
    for name, grad, ref in zip(names, grads, ref_grads, strict=True):
        ref = torch.zeros_like(reference_inputs[name]) if ref is None else ref
        assert grad is not None, f"{prefix}: no gradient reached {name}"
        assert_close(grad.double(), ref, f"{prefix} grad of {name}", **_tolerance(dtype, ref, tf32))


def _mixed_lengths(draw, batch, steps):
    values = [draw.int(1, steps) for _ in range(batch)]
    values[:2] = [steps, 1]
    draw.rng.shuffle(values)
    return torch.tensor(values, dtype=torch.int64)


# (batch, channels in, time, channels out per branch): odd sizes; 12 channels in (the im2col tile held in
# registers) and 20 (streamed), both with several 64-channel output blocks and T no block size divides.
CONV_SHAPES = [(2, 3, 17, 5), (4, 12, 301, 48), (3, 20, 130, 32)]


# The fused conv's float32 products follow torch.backends.cudnn.allow_tf32 (on by default, as for nn.Conv1d): TF32,
# else 3xTF32. "float32" runs with the flag off (3xTF32, the fp32 tolerance), "tf32" with it on.
CONV_PRECISIONS = {"float32": (torch.float32, False), "tf32": (torch.float32, True),
                   "float16": (torch.float16, False), "bfloat16": (torch.bfloat16, False)}


@pytest.mark.parametrize("precision", list(CONV_PRECISIONS))
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_multiscale_conv1d_fused_matches_reference(shape, precision):
    dtype, tf32 = CONV_PRECISIONS[precision]
    draw = Draw()
    B, C, T, C_out = shape
    kernels = (3, 5, 7)
    values = {"x": draw.randn(B, C, T)}
    for i, k in enumerate(kernels):
        values[f"w{i}"] = draw.randn(C_out, C, k, scale=(C * k) ** -0.5)
        values[f"b{i}"] = draw.randn(C_out)
    # TF32 moves z by ~1e-3, enough to flip ReLU's kink against the float64 reference; GELU is smooth there.
    activation = draw.choice([None, "gelu"] if tf32 else [None, "relu", "gelu"])

    def call(t, lengths):
        weights = [t[f"w{i}"] for i in range(len(kernels))]
        biases = [t[f"b{i}"] for i in range(len(kernels))]
        return fastmsc.multiscale_conv1d(t["x"], weights, biases, activation)

    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=tf32):
        _check_against_reference(call, values, None, dtype, draw, f"multiscale_conv1d {shape} act={activation}",
                                 strided=("x",) if T > 100 else (), tf32=tf32)


# (batch, heads, time, head dim)
ATTENTION_SHAPES = [(2, 1, 13, 16), (3, 2, 150, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_attention_fused_matches_reference(shape, dtype, with_lengths):
    draw = Draw()
    B, H, T, D = shape
    values = {name: draw.randn(B, H, T, D) for name in ("q", "k", "v")}
    lengths = _mixed_lengths(draw, B, T) if with_lengths else None
    _check_against_reference(lambda t, lens: fastmsc.attention(t["q"], t["k"], t["v"], lens), values, lengths,
                             dtype, draw, f"attention {shape}", strided=("k",) if T > 100 else ())


# (batch, time, channels)
POOL_SHAPES = [(3, 11, 7), (4, 300, 160)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_max_avg_pool_fused_matches_reference(shape, dtype, with_lengths):
    draw = Draw()
    B, T, C = shape
    values = {"x": draw.randn(B, T, C)}
    lengths = _mixed_lengths(draw, B, T) if with_lengths else None
    _check_against_reference(lambda t, lens: fastmsc.max_avg_pool(t["x"], lens), values, lengths, dtype, draw,
                             f"max_avg_pool {shape}", strided=("x",) if T > 100 else ())


def _lstm_extension_reason() -> str | None:
    from fastmsc import _extension

    reason = _extension.unavailable_reason()
    if reason is None and not _extension.has_cuda_kernels():
        reason = "the LSTM extension was built without CUDA kernels"
    return reason


def _skip_without_lstm_extension() -> None:
    reason = _lstm_extension_reason()
    if reason is not None:
        pytest.skip(f"LSTM extension unavailable (build it with nvcc and ninja present): {reason}")


# (batch, time, input size, hidden size)
LSTM_SHAPES = [(3, 7, 5, 6), (5, 40, 24, 64)]


def _lstm_values(draw, shape, directions=2, proj=False):
    """Layer inputs; ``proj``: with a projection w_hr (P, H), P = H // 3 (odd-sized for the shapes here)."""
    B, T, F, H = shape
    P = max(1, H // 3) if proj else 0
    values = {"x": draw.randn(B, T, F), "h0": draw.randn(directions, B, P or H), "c0": draw.randn(directions, B, H)}
    for d in range(directions):
        values[f"w_ih{d}"] = draw.randn(4 * H, F, scale=H**-0.5)
        values[f"w_hh{d}"] = draw.randn(4 * H, P or H, scale=H**-0.5)
        values[f"b_ih{d}"] = draw.randn(4 * H, scale=0.1)
        values[f"b_hh{d}"] = draw.randn(4 * H, scale=0.1)
        if proj:
            values[f"w_hr{d}"] = draw.randn(P, H, scale=H**-0.5)
    return values


def _lstm_weights(t, directions=2):
    names = ("w_ih", "w_hh", "b_ih", "b_hh") + (("w_hr",) if "w_hr0" in t else ())
    return tuple(tuple(t[f"{name}{d}"] for name in names) for d in range(directions))


def _lstm_call(t, lengths, directions=2):
    return fastmsc.lstm_layer(t["x"], _lstm_weights(t, directions), t["h0"], t["c0"], lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LSTM_SHAPES, ids=str)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_lstm_layer_fused_matches_reference(shape, dtype, with_lengths, proj):
    _skip_without_lstm_extension()
    draw = Draw()
    values = _lstm_values(draw, shape, proj=proj)
    lengths = _mixed_lengths(draw, shape[0], shape[1]) if with_lengths else None
    _check_against_reference(_lstm_call, values, lengths, dtype, draw, f"lstm_layer {shape}",
                             strided=("x",) if shape[1] > 20 else ())


def _sample_args(name: str, draw) -> dict:
    """Arguments of one typical float32 call of each op, for asking the backend what it picks."""
    x3 = torch.randn(2, 9, 8, device=DEVICE)
    if name == "multiscale_conv1d":
        return {"x": x3, "weights": [torch.randn(4, 9, k, device=DEVICE) for k in (3, 5, 7)], "biases": None,
                "activation": None}
    if name == "attention":
        return {"q": x3, "k": x3, "v": x3, "lengths": None, "scale": 8**-0.5}
    if name == "max_avg_pool":
        return {"x": x3, "lengths": None}
    if name == "lstm_layer":
        w = (torch.randn(16, 8, device=DEVICE), torch.randn(16, 4, device=DEVICE), None, None)
        return {"x": x3, "weights": (w,), "h0": None, "c0": None, "lengths": None}
    raise AssertionError(f"no sample arguments for op {name}")


@pytest.mark.parametrize("name", sorted(OPS))
def test_auto_picks_fused_on_cuda(name):
    """auto runs fused on CUDA wherever it can, except where the kernels' design estimate expects torch to be faster
    (attention, until the dispatch table measures otherwise; the shipped table measures nothing)."""
    if name == "lstm_layer":
        _skip_without_lstm_extension()
    op = OPS[name]
    args = _sample_args(name, Draw())
    expected_slower = op.expected_slower("cuda", **args)
    with fastmsc.use_backend("auto"):
        reason = op.why_not_fused("cuda", **args)
        assert reason is None, f"auto does not pick fused for {name} on CUDA: {reason}"
        assert op.select("cuda", **args) is (op.fused if expected_slower is None else op.torch)
    assert fastmsc.info()["ops"][name]["cuda"]["auto"] == ("fused" if expected_slower is None else "torch")


def test_attention_declines_only_where_shared_memory_is_short():
    from fastmsc.kernels import attention as kernels
    limit = kernels._device_shared_bytes(torch.device(DEVICE))
    assert 48 * 1024 <= limit <= 256 * 1024, limit
    q = torch.empty(1, 4, 256, device=DEVICE)
    reason = kernels.fused_unsupported("cuda", q=q, k=q, v=q, lengths=None, scale=None)
    assert (reason is None) == (limit >= kernels.shared_bytes_bound(q.dtype, 256)), (limit, reason)
    half = q.to(torch.bfloat16)
    assert kernels.fused_unsupported("cuda", q=half, k=half, v=half, lengths=None, scale=None) is None


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_compiled_classifier_on_fused_backend_matches_eager(with_lengths):
    _skip_without_lstm_extension()
    draw = Draw()
    B, C, T, K = 4, 3, draw.int(20, 40), 5
    model = MSCClassifier(C, K, conv_channels=16, lstm_hidden=32, classifier_hidden=32, dropout=0.0).to(DEVICE)
    compiled_model = copy.deepcopy(model)
    x = draw.randn(B, C, T).float().to(DEVICE)
    lengths = _mixed_lengths(draw, B, T).to(DEVICE) if with_lengths else None
    target = torch.randint(0, K, (B,), device=DEVICE)
    what = f"compiled MSCClassifier T={T} lengths={lengths} [{draw.tag()}]"
    results = []
    with fastmsc.use_backend("fused"):
        for m in (torch.compile(compiled_model, fullgraph=True), model):
            logits = m(x, lengths)
            loss = torch.nn.functional.cross_entropy(logits, target)
            grads = torch.autograd.grad(loss, list(m.parameters()))
            results.append((logits.detach(), grads))
    (logits_c, grads_c), (logits_e, grads_e) = results
    assert_close(logits_c, logits_e, f"{what}: logits", rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads_c, grads_e, strict=True):
        assert_close(a, b, f"{what}: grad of {name}", rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_lstm_fused_is_cuda_graph_capturable(with_lengths, proj):
    """Forward and backward of the fused LSTM captured in a CUDA graph, then replayed on new inputs,
    give what eager mode gives: no host sync, no allocation outside the graph pool in the launch path."""
    _skip_without_lstm_extension()
    draw = Draw()
    shape = (4, 12, 8, 32)
    values = _lstm_values(draw, shape, proj=proj)
    static = {n: v.float().to(DEVICE).requires_grad_() for n, v in values.items()}
    lengths = _mixed_lengths(draw, shape[0], shape[1]).to(DEVICE) if with_lengths else None
    grad_out = torch.randn(shape[0], shape[1], 2 * static["h0"].shape[-1], device=DEVICE)
    fused = OPS["lstm_layer"].fused  # the public op reads lengths on the host to validate them

    def step():
        out, _, _ = fused(static["x"], _lstm_weights(static), static["h0"], static["c0"], lengths)
        return (out, *torch.autograd.grad(out, list(static.values()), grad_out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = _lstm_values(draw, shape)
    with torch.no_grad():
        for n, v in fresh.items():
            static[n].copy_(v.float().to(DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    what = f"CUDA graph replay of the fused LSTM lengths={lengths} [{draw.tag()}]"
    for i, (got, want) in enumerate(zip(captured, expected, strict=True)):
        assert_close(got, want, f"{what}: output {i}", rtol=1e-5, atol=1e-6)
