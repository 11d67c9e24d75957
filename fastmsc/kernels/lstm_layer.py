"""Fused LSTM layer: the compiled extension's ``fastmsc::lstm_fwd`` / ``fastmsc::lstm_bwd`` ops with autograd.

Same call as :func:`fastmsc.ops.lstm_layer.lstm_layer_reference`: x (B, T, I), weights one or two
direction tuples ``(w_ih (4H, I), w_hh (4H, H), b_ih (4H,) | None, b_hh (4H,) | None)``, h0/c0
(D, B, H) or None, lengths (B,) int64 on x's device or None; returns out (B, T, D*H), h_n, c_n (D, B, H).

The op works in float32 (float64 for float64 inputs); float16/bfloat16 inputs are cast to float32 and
the results cast back. The autograd formula and the fake (shape-only) implementation are registered
with torch.library, so torch.compile(fullgraph=True) traces the layer as two opaque ops.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .. import _extension

_registered = False
_register_lock = threading.Lock()
_warned = False


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x, w_ih, w_hh, bias, h0, c0, lengths, training):
    B, T, _ = x.shape
    D, G, H = w_hh.shape
    saved = (B, T, D * G) if training else (0,)
    return (x.new_empty(B, T, D * H), x.new_empty(D, B, H), x.new_empty(D, B, H), x.new_empty(saved),
            x.new_empty((B, T, D * H) if training else (0,)))


def _fake_backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                   need_dx, need_dweights, need_dstate):
    B, T, n_in = x.shape
    D, G, H = w_hh.shape
    empty = x.new_empty(0)
    return (
        x.new_empty(B, T, n_in) if need_dx else empty,
        x.new_empty(D * G, n_in) if need_dweights else empty,
        x.new_empty(D, G, H) if need_dweights else empty,
        x.new_empty(D * G) if need_dweights and has_bias else empty,
        x.new_empty(D, B, H) if need_dstate else empty,
        x.new_empty(D, B, H) if need_dstate else empty,
    )


def _setup_context(ctx, inputs, output):
    x, w_ih, w_hh, bias, h0, c0, lengths, training = inputs
    out, _, _, gates, cells = output
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(x, w_ih, w_hh, h0, c0, lengths, out, gates, cells)


def _backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    x, w_ih, w_hh, h0, c0, lengths, out, gates, cells = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dx, need_dweights, need_dstate = needs[0], any(needs[1:4]), needs[4] or needs[5]
    dx, dw_ih, dw_hh, dbias, dh0, dc0 = torch.ops.fastmsc.lstm_bwd(
        grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, ctx.has_bias, h0, c0, lengths, out, gates, cells,
        need_dx, need_dweights, need_dstate)
    return (dx if need_dx else None, dw_ih if needs[1] else None, dw_hh if needs[2] else None,
            dbias if needs[3] else None, dh0 if needs[4] else None, dc0 if needs[5] else None, None, None)


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
        warnings.warn(f"fastmsc.lstm_layer runs on the torch backend: {reason}", RuntimeWarning, stacklevel=4)


def fused_unsupported(device_type: str, **call_args) -> str | None:
    """None when the extension can run this call on ``device_type``, else why not (warned once)."""
    reason = _extension.unavailable_reason()
    if reason is not None:
        _warn_once(reason)
        return reason
    if device_type == "cuda":
        if not _extension.has_cuda_kernels():
            return ("the LSTM extension was built without CUDA kernels (torch without CUDA or no nvcc at build "
                    "time); rebuild it with nvcc available")
    elif device_type != "cpu":
        return f"the LSTM extension has kernels for cpu and cuda only, not {device_type!r}"
    return None


def _combined_bias(weights, dtype):
    """b_ih + b_hh per direction, stacked to (D*4H,); None when the layer has no bias at all."""
    if all(b is None for params in weights for b in params[2:]):
        return None
    parts = []
    for w_ih, _, b_ih, b_hh in weights:
        present = [b.to(dtype) for b in (b_ih, b_hh) if b is not None]
        if not present:
            parts.append(w_ih.new_zeros(w_ih.shape[0], dtype=dtype))
        else:
            parts.append(present[0] if len(present) == 1 else present[0] + present[1])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fused(x, weights, h0=None, c0=None, lengths=None):
    _ensure_registered()
    work = _work_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(work)
    w_ih = torch.cat([cast(p[0]) for p in weights]) if len(weights) == 2 else cast(weights[0][0])
    w_hh = torch.stack([cast(p[1]) for p in weights])
    bias = _combined_bias(weights, work)
    tensors = [x, h0, c0, *(t for params in weights for t in params)]
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, h_n, c_n, _, _ = torch.ops.fastmsc.lstm_fwd(
        x.to(work), w_ih, w_hh, bias, cast(h0), cast(c0), lengths, training)
    if x.dtype != work:
        return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype)
    return out, h_n, c_n
