"""Empty inputs on every backend: a batch of 0 gives the shapes stock torch gives (nn.Conv1d, nn.LSTM,
F.scaled_dot_product_attention, x.max/x.mean), empty input gradients and zero parameter gradients; an empty
time, channel or feature dimension raises the same ValueError on every backend (torch's own choice where it
is consistent, see the op docstrings). The fused kernels and the LSTM extension must never be launched with
an empty grid or batch: the formerly crashing extension call runs once in a subprocess, so a regression
fails this file instead of killing the test run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers import require_fused

import fastmsc
from fastmsc.backend import use_backend
from fastmsc.models import MSCClassifier

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("reference", "torch", "fused", "auto")


def _backend(backend: str, op_names) -> None:
    if backend == "fused":
        for name in op_names:
            require_fused(name)


def _leaf(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _check_grads(inputs, params) -> None:
    """Empty inputs get empty gradients of their own shape; parameters get zero gradients, as in torch."""
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.numel() == 0
    for p in params:
        assert p.grad is not None and p.grad.shape == p.shape
        assert torch.count_nonzero(p.grad) == 0


# ------------------------------------------------------------------------------------------------------ ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", (None, "gelu"))
def test_multiscale_conv1d_empty_batch(backend, activation):
    _backend(backend, ["multiscale_conv1d"])
    x = _leaf(0, 3, 9)
    weights = [_leaf(4, 3, 3), _leaf(2, 3, 5)]
    biases = [_leaf(4), None]
    with use_backend(backend):
        out = fastmsc.multiscale_conv1d(x, weights, biases, activation)
    branches = zip(weights, biases, strict=True)
    expected = torch.cat([F.conv1d(x, w, b, padding=w.shape[-1] // 2) for w, b in branches], dim=1)
    assert out.shape == expected.shape == (0, 6, 9) and out.dtype == x.dtype
    out.sum().backward()
    _check_grads([x], [*weights, biases[0]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions", (1, 2))
@pytest.mark.parametrize("with_lengths", (False, True))
@pytest.mark.parametrize("with_state", (False, True))
@pytest.mark.parametrize("proj", (0, 2))
def test_lstm_layer_empty_batch(backend, directions, with_lengths, with_state, proj):
    _backend(backend, ["lstm_layer"])
    H, n_in, T = 4, 3, 5
    R = proj or H
    x = _leaf(0, T, n_in)
    weights = tuple((_leaf(4 * H, n_in), _leaf(4 * H, R), _leaf(4 * H), _leaf(4 * H), *([_leaf(R, H)] if proj else []))
                    for _ in range(directions))
    h0, c0 = (_leaf(directions, 0, R), _leaf(directions, 0, H)) if with_state else (None, None)
    lengths = torch.zeros(0, dtype=torch.int64) if with_lengths else None
    with use_backend(backend):
        out, h_n, c_n = fastmsc.lstm_layer(x, weights, h0, c0, lengths)
    ref = torch.nn.LSTM(n_in, H, batch_first=True, bidirectional=directions == 2, proj_size=proj)
    ref_out, (ref_h, ref_c) = ref(x.detach())
    assert out.shape == ref_out.shape == (0, T, directions * R)
    assert h_n.shape == ref_h.shape == (directions, 0, R)
    assert c_n.shape == ref_c.shape == (directions, 0, H)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    _check_grads([x] + ([h0, c0] if with_state else []), [p for params in weights for p in params])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((0, 5, 8), (0, 2, 5, 8), (3, 0, 5, 8)), ids=("3d", "4d", "4d_no_heads"))
@pytest.mark.parametrize("with_lengths", (False, True))
def test_attention_empty_batch(backend, shape, with_lengths):
    _backend(backend, ["attention"])
    q, k, v = _leaf(*shape), _leaf(*shape), _leaf(*shape)
    lengths = torch.full((shape[0],), shape[-2], dtype=torch.int64) if with_lengths else None
    with use_backend(backend):
        out = fastmsc.attention(q, k, v, lengths)
    assert out.shape == F.scaled_dot_product_attention(q, k, v).shape == q.shape
    out.sum().backward()
    _check_grads([q, k, v], [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ((0, 5, 3), (2, 5, 0)), ids=("no_batch", "no_channels"))
@pytest.mark.parametrize("with_lengths", (False, True))
def test_max_avg_pool_empty_batch_or_channels(backend, shape, with_lengths):
    _backend(backend, ["max_avg_pool"])
    x = _leaf(*shape)
    lengths = torch.full((shape[0],), shape[1], dtype=torch.int64) if with_lengths else None
    with use_backend(backend):
        out = fastmsc.max_avg_pool(x, lengths)
    assert out.shape == torch.cat([x.max(dim=1).values, x.mean(dim=1)], dim=-1).shape
    out.sum().backward()
    _check_grads([x], [])


# The same ValueError on every backend for an empty time, channel or feature dimension.
def _conv(C, T):
    return lambda: fastmsc.multiscale_conv1d(torch.randn(2, C, T), [torch.randn(4, C, 3)])


def _lstm(T, n_in):
    H = 4
    weights = ((torch.randn(4 * H, n_in), torch.randn(4 * H, H), None, None),)
    return lambda: fastmsc.lstm_layer(torch.randn(2, T, n_in), weights)


def _attention(*shape):
    return lambda: fastmsc.attention(*(torch.randn(*shape) for _ in range(3)))


EMPTY_DIM_ERRORS = {
    "conv_no_channels": ("multiscale_conv1d", _conv(0, 8), r"x must have at least one input channel \(C_in >= 1\)"),
    "conv_no_steps": ("multiscale_conv1d", _conv(3, 0), r"x must have at least one time step \(T >= 1\)"),
    "lstm_no_steps": ("lstm_layer", _lstm(0, 3), r"x must have at least one time step \(T >= 1\)"),
    "lstm_no_features": ("lstm_layer", _lstm(5, 0), r"x must have at least one input feature \(input size >= 1\)"),
    "attention_no_steps": ("attention", _attention(2, 0, 8), r"q must have T >= 1 and D >= 1, got shape \(2, 0, 8\)"),
    "attention_no_features": ("attention", _attention(2, 2, 5, 0), r"q must have T >= 1 and D >= 1"),
    "pool_no_steps": ("max_avg_pool", lambda: fastmsc.max_avg_pool(torch.randn(2, 0, 3)),
                      r"x must have at least one time step \(T >= 1\), got shape \(2, 0, 3\)"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EMPTY_DIM_ERRORS)
def test_empty_time_or_feature_dimension_is_a_clear_error(backend, case):
    op_name, call, message = EMPTY_DIM_ERRORS[case]
    _backend(backend, [op_name])
    with use_backend(backend), pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------------- modules

MODULE_OPS = ["multiscale_conv1d", "lstm_layer", "attention", "max_avg_pool"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiscale_conv1d_module_empty_batch(backend):
    _backend(backend, ["multiscale_conv1d"])
    module = fastmsc.nn.MultiScaleConv1d(3, (4, 2), (3, 5), activation="relu")
    x = _leaf(0, 3, 7)
    with use_backend(backend):
        out = module(x)
    assert out.shape == torch.cat([b(x) for b in module.branches], dim=1).shape == (0, 6, 7)
    out.sum().backward()
    _check_grads([x], list(module.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", (False, True))
@pytest.mark.parametrize("bidirectional", (False, True))
@pytest.mark.parametrize("with_lengths", (False, True))
def test_lstm_module_empty_batch(backend, batch_first, bidirectional, with_lengths):
    _backend(backend, ["lstm_layer"])
    module = fastmsc.nn.LSTM(3, 4, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    stock = torch.nn.LSTM(3, 4, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    x = _leaf(0, 5, 3) if batch_first else _leaf(5, 0, 3)
    D = 2 if bidirectional else 1
    hx = (_leaf(2 * D, 0, 4), _leaf(2 * D, 0, 4))
    lengths = torch.zeros(0, dtype=torch.int64) if with_lengths else None
    with use_backend(backend):
        out, (h_n, c_n) = module(x, hx, lengths=lengths)
    ref_out, (ref_h, ref_c) = stock(x.detach(), tuple(h.detach() for h in hx))
    assert out.shape == ref_out.shape and h_n.shape == ref_h.shape and c_n.shape == ref_c.shape
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    _check_grads([x, *hx], list(module.parameters()))


def test_lstm_module_rejects_input_size_zero_like_torch():
    with pytest.raises(ValueError):
        torch.nn.LSTM(0, 4)
    with pytest.raises(ValueError, match="input_size must be greater than zero, got 0"):
        fastmsc.nn.LSTM(0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_heads", (1, 2))
@pytest.mark.parametrize("with_lengths", (False, True))
def test_self_attention_module_empty_batch(backend, num_heads, with_lengths):
    _backend(backend, ["attention"])
    module = fastmsc.nn.SelfAttention(8, num_heads, out_proj=True)
    x = _leaf(0, 5, 8)
    lengths = torch.zeros(0, dtype=torch.int64) if with_lengths else None
    with use_backend(backend):
        out = module(x, lengths)
    assert out.shape == x.shape
    out.sum().backward()
    _check_grads([x], list(module.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_avg_pool_module_empty_batch(backend):
    _backend(backend, ["max_avg_pool"])
    x = _leaf(0, 5, 3)
    with use_backend(backend):
        out = fastmsc.nn.MaxAvgPool1d()(x)
    assert out.shape == (0, 6)
    out.sum().backward()
    _check_grads([x], [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_lengths", (False, True))
def test_classifier_empty_batch(backend, with_lengths):
    _backend(backend, MODULE_OPS)
    model = MSCClassifier(3, 4, conv_channels=4, kernel_sizes=(3, 5), lstm_hidden=4, lstm_layers=2,
                          num_heads=2, classifier_hidden=8)
    x = _leaf(0, 3, 6)
    lengths = torch.zeros(0, dtype=torch.int64) if with_lengths else None
    with use_backend(backend):
        logits = model(x, lengths)
    assert logits.shape == (0, 4)
    logits.sum().backward()
    _check_grads([x], list(model.parameters()))


# ------------------------------------------------------------------------------- the custom ops called directly


def test_triton_custom_ops_accept_an_empty_batch_directly():
    for name in ("attention", "max_avg_pool"):
        require_fused(name)
    q = torch.randn(0, 2, 5, 8)
    out, lse = torch.ops.fastmsc.attention_forward(q, q, q, None, 0.5)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)
    grads = torch.ops.fastmsc.attention_backward(q, q, q, q, out, lse, None, 0.5)
    assert [g.shape for g in grads] == [q.shape] * 3
    x = torch.randn(0, 5, 3)
    pooled, index = torch.ops.fastmsc.max_avg_pool_forward(x, None)
    assert pooled.shape == (0, 6) and index.shape == (0, 3)
    assert torch.ops.fastmsc.max_avg_pool_backward(pooled, index, None, 5).shape == x.shape
    from fastmsc.kernels import multiscale_conv1d  # noqa: F401  (registers the op)

    weights = [torch.randn(4, 3, 5), torch.randn(2, 3, 3)]
    out = torch.ops.fastmsc.multiscale_conv1d_branches(torch.randn(0, 3, 7), weights, [], [False, False], "relu")
    assert out.shape == (0, 6, 7)


_EXTENSION_EMPTY_BATCH = textwrap.dedent("""
    import torch, fastmsc
    from fastmsc.kernels import lstm_layer as kernel
    kernel._ensure_registered()
    B, T, I, H, D = 0, 5, 3, 4, 2
    x = torch.randn(B, T, I)
    w_ih, w_hh, bias = torch.randn(D * 4 * H, I), torch.randn(D, 4 * H, H), torch.randn(D * 4 * H)
    lengths = torch.zeros(0, dtype=torch.int64)
    for lens in (None, lengths):
        out, h_n, c_n, gates, cells = torch.ops.fastmsc.lstm_fwd(x, w_ih, w_hh, bias, None, None, lens, True)
        assert out.shape == (B, T, D * H) and h_n.shape == c_n.shape == (D, B, H), (out.shape, h_n.shape)
        grads = torch.ops.fastmsc.lstm_bwd(out, h_n, c_n, x, w_ih, w_hh, True, None, None, lens, out, gates, cells,
                                          True, True, True)
        assert [tuple(g.shape) for g in grads] == [(B, T, I), (D * 4 * H, I), (D, 4 * H, H), (D * 4 * H,),
                                                   (D, B, H), (D, B, H), (0,)], [g.shape for g in grads]
        assert all(torch.count_nonzero(g) == 0 for g in grads)
        # With a projection to P: h (and w_hh's last size) P wide, and the w_hr gradient.
        P = 2
        w_hh_p, w_hr = torch.randn(D, 4 * H, P), torch.randn(D, P, H)
        out, h_n, c_n, gates, cells = torch.ops.fastmsc.lstm_fwd(x, w_ih, w_hh_p, bias, None, None, lens, True, w_hr)
        assert out.shape == (B, T, D * P) and h_n.shape == (D, B, P) and c_n.shape == (D, B, H)
        grads = torch.ops.fastmsc.lstm_bwd(out, h_n, c_n, x, w_ih, w_hh_p, True, None, None, lens, out, gates, cells,
                                          True, True, True, w_hr)
        assert [tuple(g.shape) for g in grads] == [(B, T, I), (D * 4 * H, I), (D, 4 * H, P), (D * 4 * H,),
                                                   (D, B, P), (D, B, H), (D, P, H)], [g.shape for g in grads]
        assert all(torch.count_nonzero(g) == 0 for g in grads)
        if torch.ops.fastmsc.lstm_cpu_bf16():  # the bf16 layers' own forward and backward
            half = [t.to(torch.bfloat16) for t in (x, w_ih, w_hh)]
            out, h_n, c_n, gates, cells = torch.ops.fastmsc.lstm_fwd_bf16(*half, bias, None, None, lens, True)
            assert out.shape == (B, T, D * H) and h_n.shape == c_n.shape == (D, B, H), (out.shape, h_n.shape)
            grads = torch.ops.fastmsc.lstm_bwd_bf16(out, h_n, c_n, *half, True, None, None, lens, out, gates, cells,
                                                    True, True, True)
            assert [tuple(g.shape) for g in grads] == [(B, T, I), (D * 4 * H, I), (D, 4 * H, H), (D * 4 * H,),
                                                       (D, B, H), (D, B, H), (0,)], [g.shape for g in grads]
            assert all(torch.count_nonzero(g) == 0 for g in grads)
    with fastmsc.use_backend("fused"):
        y, (h, c) = fastmsc.nn.LSTM(I, H, batch_first=True, bidirectional=True)(x.requires_grad_())
    (y.sum() + h.sum()).backward()
    assert y.shape == (B, T, D * H) and x.grad.shape == x.shape
    print("ok")
""")


def test_lstm_extension_accepts_an_empty_batch_in_a_subprocess():
    """Once an integer division by the batch (SIGFPE, which would kill pytest), hence the subprocess."""
    require_fused("lstm_layer")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run([sys.executable, "-c", _EXTENSION_EMPTY_BATCH], capture_output=True, text=True,
                            timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"exit status {result.returncode} (negative: killed by signal {-result.returncode})\n{result.stderr[-3000:]}")
