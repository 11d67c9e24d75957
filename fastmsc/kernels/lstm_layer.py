"""Fused LSTM layer: the compiled extension's ``fastmsc::lstm_fwd`` / ``fastmsc::lstm_bwd`` ops with autograd.

Same call as :func:`fastmsc.ops.reference.lstm_layer.lstm_layer_reference`: x (B, T, I), weights one or two
direction tuples ``(w_ih (4H, I), w_hh (4H, R), b_ih (4H,) | None, b_hh (4H,) | None[, w_hr (P, H)])``,
h0 (D, B, R) and c0 (D, B, H) or None, lengths (B,) int64 on x's device or None; returns out (B, T, D*R),
h_n (D, B, R), c_n (D, B, H), where R is P with the projection w_hr and H without.

The extension works in float32 (float64 for float64 inputs). float16/bfloat16 inputs go through
``fastmsc::lstm_fwd_half``: it widens them, runs the extension and returns out, h_n, c_n and the state the
backward reads (activated gates, cell states) in the input dtype, as stock PyTorch's half-precision LSTMs
keep theirs. A half training step thus keeps half tensors (its input, the output it returns, which the
next layer keeps anyway, gates and cells) instead of float32 copies of them, besides the (D*4H,) float32 bias
that only double backward reads; the backward widens them again,
so its gradients carry the rounding of that state (a few units of the half type's roundoff, checked in
tests/test_lstm_layer_fused.py). The autograd formula and the fake (shape-only) implementations are
registered with torch.library, so torch.compile(fullgraph=True) traces the layer as opaque ops. Double
backward (create_graph=True) differentiates the reference layer recomputed on the saved inputs, since
lstm_bwd's gradients carry no graph.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .. import _extension
from .._double_backward import graph_wanted, recomputed_grads
from ..ops._checks import compute_dtype, time_mask
from ..ops.reference.lstm_layer import lstm_layer_reference

_registered = False
_register_lock = threading.Lock()
_warned = False


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _fake_forward(x, w_ih, w_hh, bias, h0, c0, lengths, training, w_hr=None):
    B, T, _ = x.shape
    D, G, R = w_hh.shape
    H = G // 4
    saved = (B, T, D * G) if training else (0,)
    return (x.new_empty(B, T, D * R), x.new_empty(D, B, R), x.new_empty(D, B, H), x.new_empty(saved),
            x.new_empty((B, T, D * H) if training else (0,)))


def _fake_backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                   need_dx, need_dweights, need_dstate, w_hr=None):
    B, T, n_in = x.shape
    D, G, R = w_hh.shape
    H = G // 4
    empty = x.new_empty(0)
    return (
        x.new_empty(B, T, n_in) if need_dx else empty,
        x.new_empty(D * G, n_in) if need_dweights else empty,
        x.new_empty(D, G, R) if need_dweights else empty,
        x.new_empty(D * G) if need_dweights and has_bias else empty,
        x.new_empty(D, B, R) if need_dstate else empty,
        x.new_empty(D, B, H) if need_dstate else empty,
        x.new_empty(D, R, H) if need_dweights and w_hr is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, bias, h0, c0, lengths, training, *rest = inputs
    w_hr = rest[0] if rest else None
    out, _, _, gates, cells = output
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(gates, cells)
    # Unused outputs get None, not zero tensors: gates and cells never receive a gradient, and zero-filling
    # their (B, T, D*4H) and (B, T, D*H) grads cost more than the rest of the backward's pointwise work.
    ctx.set_materialize_grads(False)
    # The bias only for double backward, which recomputes the layer (first order reads the saved gates).
    ctx.save_for_backward(x, w_ih, w_hh, h0, c0, lengths, out, gates, cells, w_hr, bias)


def _zero_past_lengths(seq: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """seq (B, T, F) with its steps t >= lengths[b] set to 0. The extension's weight gradient dW_ih = dGᵀ x and
    its dx = dG W_ih run over every step, padded ones with dG = 0, and 0 * NaN would carry a non-finite
    padded input (or weight) into them; torch.nn.LSTM on packed sequences never reads the padding."""
    if lengths is None:
        return seq
    return seq.masked_fill(~time_mask(lengths, seq.shape[1])[:, :, None], 0.0)


def _backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    """Shared by lstm_fwd and lstm_fwd_half: saved half tensors are widened to float32 for lstm_bwd (exact),
    and each gradient is returned in the dtype of its input. lstm_bwd's result carries no graph, so for
    create_graph=True the gradients come from the reference layer recomputed on the saved inputs instead."""
    x, w_ih, w_hh, h0, c0, lengths, out, gates, cells, w_hr, bias = ctx.saved_tensors
    # One flag per argument the call passed: the dispatcher drops a trailing w_hr left at its default (None).
    needs = ctx.needs_input_grad
    if graph_wanted(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, bias, h0, c0, w_hr):
        inputs, wanted = (x, w_ih, w_hh, bias, h0, c0, lengths), needs[:7]
        if w_hr is not None:
            inputs, wanted = (*inputs, w_hr), (*wanted, needs[8])
        grads = recomputed_grads(_reference_packed, inputs, wanted, (grad_out, grad_h_n, grad_c_n))
        return (*grads[:7], None, *grads[7:])
    work = compute_dtype(x.dtype)
    need_dw_hr = w_hr is not None and needs[8]
    need_dx, need_dweights, need_dstate = needs[0], any(needs[1:4]) or need_dw_hr, needs[4] or needs[5]
    dx, dw_ih, dw_hh, dbias, dh0, dc0, dw_hr = torch.ops.fastmsc.lstm_bwd(
        _to(grad_out, work), _to(grad_h_n, work), _to(grad_c_n, work),
        _zero_past_lengths(x, lengths).to(work), w_ih.to(work), w_hh.to(work),
        ctx.has_bias, _to(h0, work), _to(c0, work), lengths, out.to(work), gates.to(work), cells.to(work),
        need_dx, need_dweights, need_dstate, _to(w_hr, work))
    dx = _zero_past_lengths(dx, lengths) if need_dx else dx
    grads = (dx.to(x.dtype) if need_dx else None, dw_ih.to(w_ih.dtype) if needs[1] else None,
             dw_hh.to(w_hh.dtype) if needs[2] else None, dbias if needs[3] else None,
             dh0.to(h0.dtype) if needs[4] else None, dc0.to(c0.dtype) if needs[5] else None, None, None,
             dw_hr.to(w_hr.dtype) if need_dw_hr else None)
    return grads[:len(needs)]


def _reference_packed(x, w_ih, w_hh, bias, h0, c0, lengths, w_hr=None):
    """The layer of lstm_fwd's packed arguments (w_ih (D*4H, I), w_hh (D, 4H, R), bias (D*4H,) or None, w_hr
    (D, P, H) or None) through the reference's differentiable math; bias enters as b_ih, b_hh as None (lstm_fwd
    takes their sum)."""
    D, G = w_hh.shape[0], w_hh.shape[1]
    weights = tuple((w_ih[d * G:(d + 1) * G], w_hh[d], None if bias is None else bias[d * G:(d + 1) * G], None,
                     *(() if w_hr is None else (w_hr[d],)))
                    for d in range(D))
    return lstm_layer_reference(x, weights, h0, c0, lengths)


@torch.library.custom_op("fastmsc::lstm_fwd_half", mutates_args=())
def _lstm_fwd_half(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor | None,
                   h0: torch.Tensor | None, c0: torch.Tensor | None, lengths: torch.Tensor | None, training: bool,
                   w_hr: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastmsc::lstm_fwd for float16/bfloat16 x, w_ih (D*4H, I), w_hh (D, 4H, R), h0 (D, B, R), c0 (D, B, H),
    w_hr (D, P, H) or None and a float32 bias (D*4H,) (b_ih + b_hh summed unrounded): the layer runs in float32
    and out (B, T, D*R), h_n (D, B, R), c_n (D, B, H), gates (B, T, D*4H) and cells (B, T, D*H) come back in
    x's dtype."""
    outputs = torch.ops.fastmsc.lstm_fwd(x.float(), w_ih.float(), w_hh.float(), bias, _to(h0, torch.float32),
                                         _to(c0, torch.float32), lengths, training, _to(w_hr, torch.float32))
    return tuple(t.to(x.dtype) for t in outputs)


_lstm_fwd_half.register_fake(_fake_forward)
_lstm_fwd_half.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result  # runs once, eagerly, even when torch.compile meets it first
def _ensure_registered() -> None:
    """Load the extension and attach the fake implementations and the autograd formula (once)."""
    global _registered
    if _registered:
        return
    _extension.load()
    with _register_lock:
        if not _registered:
            torch.library.register_fake("fastmsc::lstm_fwd")(_fake_forward)
            torch.library.register_fake("fastmsc::lstm_bwd")(_fake_backward)
            torch.library.register_autograd("fastmsc::lstm_fwd", _backward, setup_context=_setup_context)
            _registered = True


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fastmsc.lstm_layer runs on the torch backend: {reason}", RuntimeWarning, stacklevel=5)


def prepare(*, fallback: bool) -> str | None:
    """Load the extension for a call about to run (the first one may build it, about a minute per source file);
    None when loaded, else why not. ``fallback``: the caller then runs stock PyTorch instead (backend 'auto'),
    which is warned once with the reason."""
    reason = _extension.unavailable_reason()
    if reason is not None and fallback:
        _warn_once(reason)
    return reason


def fused_unsupported(device_type: str, *, allow_interpreter: bool = False, **call_args) -> str | None:
    """None when the extension can run this call on ``device_type`` (loaded, or loadable on first use), else why
    not. A question only: it never builds, loads or warns (see :func:`prepare`). ``allow_interpreter`` concerns
    Triton ops and is ignored."""
    reason = _extension.availability()
    if reason is not None:
        return reason
    if device_type == "cuda":
        if not _extension.cuda_kernels_expected():
            return ("the LSTM extension was built without CUDA kernels (torch without CUDA or no nvcc at build "
                    "time); rebuild it with nvcc available")
    elif device_type != "cpu":
        return f"the LSTM extension has kernels for cpu and cuda only, not {device_type!r}"
    return None


def _combined_bias(weights, dtype):
    """b_ih + b_hh per direction, stacked to (D*4H,); None when the layer has no bias at all."""
    if all(b is None for params in weights for b in params[2:4]):
        return None
    parts = []
    for w_ih, _, b_ih, b_hh, *_ in weights:
        present = [b.to(dtype) for b in (b_ih, b_hh) if b is not None]
        if not present:
            parts.append(w_ih.new_zeros(w_ih.shape[0], dtype=dtype))
        else:
            parts.append(present[0] if len(present) == 1 else present[0] + present[1])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fused(x, weights, h0=None, c0=None, lengths=None):
    _ensure_registered()
    work = compute_dtype(x.dtype)
    half = x.dtype in HALF_DTYPES
    # Half weights stay half (float32 copies of them would be what backward keeps); the op widens them.
    weight_dtype = x.dtype if half else work
    w_ih = torch.cat([p[0].to(weight_dtype) for p in weights]) if len(weights) == 2 else weights[0][0].to(weight_dtype)
    w_hh = torch.stack([p[1].to(weight_dtype) for p in weights])
    projected = len(weights[0]) > 4 and weights[0][4] is not None
    w_hr = torch.stack([p[4].to(weight_dtype) for p in weights]) if projected else None
    bias = _combined_bias(weights, work)
    tensors = [x, h0, c0, *(t for params in weights for t in params)]
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    forward = torch.ops.fastmsc.lstm_fwd_half if half else torch.ops.fastmsc.lstm_fwd
    if projected:
        out, h_n, c_n, _, _ = forward(x, w_ih, w_hh, bias, h0, c0, lengths, training, w_hr)
    else:  # the call without projection keeps its original arguments (and traced graphs their original form)
        out, h_n, c_n, _, _ = forward(x, w_ih, w_hh, bias, h0, c0, lengths, training)
    return out, h_n, c_n
