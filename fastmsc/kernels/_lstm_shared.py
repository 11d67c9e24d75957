"""What the fused LSTM paths share: the extension's (:mod:`fastmsc.kernels.lstm_layer`) and the persistent Triton
kernel's (:mod:`fastmsc.kernels.lstm_persistent`). Both forward ops take x (B, T, I), w_ih (D*4H, I), w_hh (D, 4H, R),
a float32 bias (D*4H,) (b_ih + b_hh) or None, h0, c0, lengths and ``training``, and return out (B, T, D*R), h_n
(D, B, R), c_n (D, B, H) and the state the backward reads: activated gates (B, T, D*4H) and cells (B, T, D*H).
"""

from __future__ import annotations

import torch

from .._double_backward import graph_wanted, recomputed_grads
from ..ops._checks import compute_dtype, time_mask
from ..ops.reference.lstm_layer import lstm_layer_reference

HALF_DTYPES = (torch.float16, torch.bfloat16)


def to_dtype(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """t in dtype; None stays None, and dtype None leaves t as it is."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def follows_time_major(x: torch.Tensor) -> bool:
    """Whether the CPU ops return their (B, T, ·) tensors (out, gates, cells, dx) in time-major memory order: for a
    time-major x, a transposed (T, B, I) view, as torch.nn.LSTM's default layout hands it over. The C++ side's
    is_time_major; the fake implementations must promise the strides the real ones give."""
    B, T, _ = x.shape
    return x.device.type == "cpu" and B > 1 and T > 1 and x.stride(0) < x.stride(1)


def new_sequence(x: torch.Tensor, B: int, T: int, F: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (B, T, F) tensor (x's dtype unless given) in the row order the ops give x's sequences (see
    follows_time_major)."""
    dtype = dtype or x.dtype
    if follows_time_major(x):
        return x.new_empty(T, B, F, dtype=dtype).transpose(0, 1)
    return x.new_empty(B, T, F, dtype=dtype)


def fake_forward(x, w_ih, w_hh, bias, h0, c0, lengths, training, w_hr=None, *, follow_time_major=True):
    """The extension's forward (lstm_fwd, lstm_fwd_half): (B, T, ·) outputs as new_sequence orders them."""
    B, T, _ = x.shape
    D, G, R = w_hh.shape
    H = G // 4

    def sequence(F):
        return new_sequence(x, B, T, F) if follow_time_major else x.new_empty(B, T, F)

    gates = sequence(D * G) if training else x.new_empty(0)
    cells = sequence(D * H) if training else x.new_empty(0)
    return sequence(D * R), x.new_empty(D, B, R), x.new_empty(D, B, H), gates, cells


def fake_forward_batch_first(x, w_ih, w_hh, bias, h0, c0, lengths, training, w_hr=None):
    """The persistent Triton forward: batch-first outputs whatever x's layout."""
    return fake_forward(x, w_ih, w_hh, bias, h0, c0, lengths, training, w_hr, follow_time_major=False)


def setup_context(ctx, inputs, output):
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


def zero_past_lengths(seq: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """seq (B, T, F) with its steps t >= lengths[b] set to 0. The extension's weight gradient dW_ih = dGᵀ x and
    its dx = dG W_ih run over every step, padded ones with dG = 0, and 0 * NaN would carry a non-finite
    padded input (or weight) into them; torch.nn.LSTM on packed sequences never reads the padding."""
    if lengths is None:
        return seq
    # clone + in place keeps seq's layout (a time-major x stays time-major); masked_fill would return it batch-first
    return seq.clone().masked_fill_(~time_mask(lengths, seq.shape[1])[:, :, None], 0.0)


def backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells, *, run_bwd, widen_saved: bool,
             native_bwd=None):
    """The autograd formula of every fused LSTM forward op (lstm_fwd, lstm_fwd_half, lstm_persistent_fwd):
    ``run_bwd`` is the matching backward op, called with lstm_bwd's arguments; ``widen_saved``: the saved half
    tensors are widened to float32 first (exact; the extension computes in float32), else passed as they are.
    ``native_bwd(x, w_hr)``, where given: a backward op that reads this call's saved half tensors as they are, or None
    (then run_bwd). Each gradient is returned in the dtype of its input. The backward ops' results carry no graph, so
    for create_graph=True the gradients come from the reference layer recomputed on the saved inputs instead."""
    x, w_ih, w_hh, h0, c0, lengths, out, gates, cells, w_hr, bias = ctx.saved_tensors
    native = native_bwd(x, w_hr) if native_bwd is not None else None
    if native is not None:
        run_bwd, widen_saved = native, False
    # One flag per argument the call passed: the dispatcher drops a trailing w_hr left at its default (None).
    needs = ctx.needs_input_grad
    if graph_wanted(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, bias, h0, c0, w_hr):
        inputs, wanted = (x, w_ih, w_hh, bias, h0, c0, lengths), needs[:7]
        if w_hr is not None:
            inputs, wanted = (*inputs, w_hr), (*wanted, needs[8])
        grads = recomputed_grads(reference_packed, inputs, wanted, (grad_out, grad_h_n, grad_c_n))
        return (*grads[:7], None, *grads[7:])
    work = compute_dtype(x.dtype)
    need_dw_hr = w_hr is not None and needs[8]
    need_dx, need_dweights, need_dstate = needs[0], any(needs[1:4]) or need_dw_hr, needs[4] or needs[5]
    saved = work if widen_saved else None  # None: the saved tensors as they are
    projection = (to_dtype(w_hr, saved),) if w_hr is not None else ()
    dx, dw_ih, dw_hh, dbias, dh0, dc0, dw_hr = run_bwd(
        to_dtype(grad_out, saved), to_dtype(grad_h_n, saved), to_dtype(grad_c_n, saved),
        to_dtype(zero_past_lengths(x, lengths), saved), to_dtype(w_ih, saved), to_dtype(w_hh, saved),
        ctx.has_bias, to_dtype(h0, saved), to_dtype(c0, saved), lengths, to_dtype(out, saved), to_dtype(gates, saved),
        to_dtype(cells, saved), need_dx, need_dweights, need_dstate, *projection)
    dx = zero_past_lengths(dx, lengths) if need_dx else dx
    grads = (to_dtype(dx, x.dtype) if need_dx else None, to_dtype(dw_ih, w_ih.dtype) if needs[1] else None,
             to_dtype(dw_hh, w_hh.dtype) if needs[2] else None, dbias if needs[3] else None,
             to_dtype(dh0, h0.dtype) if needs[4] else None, to_dtype(dc0, c0.dtype) if needs[5] else None, None, None,
             to_dtype(dw_hr, w_hr.dtype) if need_dw_hr else None)
    return grads[:len(needs)]


def eager_function(name: str, kernel, backward_fn) -> type[torch.autograd.Function]:
    """An autograd.Function running ``kernel`` with the formula ``setup_context`` / ``backward_fn``, for eager calls
    (see :func:`call_forward`). ``kernel``: the forward op the formula is registered on, or the plain function that
    op wraps (a Python custom op's body, which then skips that op's own dispatch); ``EagerForward.kernel`` keeps it
    for calls below autograd."""

    class EagerForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                output = kernel(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward_fn(ctx, *grads)

    EagerForward.kernel = staticmethod(kernel)
    EagerForward.__name__ = EagerForward.__qualname__ = f"EagerForward_{name}"
    return EagerForward


def call_forward(op, function: type[torch.autograd.Function], inputs: tuple, training: bool):
    """``op(*inputs)``, the autograd formula registered on it included, by the shortest route that keeps it.

    The registered route (torch.library's autograd wrapper) costs 15-25 us a call in Python, refilling the schema's
    defaults and building its metadata, about the time of the whole layer at small shapes. Eager calls take
    ``function`` (:func:`eager_function` of the same formula) or, without a graph to record, its kernel below
    autograd. torch.compile and functorch transforms, which trace the registered op, keep it."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return op(*inputs)
    if training:
        return function.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return function.kernel(*inputs)


def reference_packed(x, w_ih, w_hh, bias, h0, c0, lengths, w_hr=None):
    """The layer of lstm_fwd's packed arguments (w_ih (D*4H, I), w_hh (D, 4H, R), bias (D*4H,) or None, w_hr
    (D, P, H) or None) through the reference's differentiable math; bias enters as b_ih, b_hh as None (lstm_fwd
    takes their sum)."""
    D, G = w_hh.shape[0], w_hh.shape[1]
    weights = tuple((w_ih[d * G:(d + 1) * G], w_hh[d], None if bias is None else bias[d * G:(d + 1) * G], None,
                     *(() if w_hr is None else (w_hr[d],)))
                    for d in range(D))
    return lstm_layer_reference(x, weights, h0, c0, lengths)


def combined_bias(weights, dtype):
    """b_ih + b_hh per direction, stacked to (D*4H,); None when the layer has no bias at all."""
    if all(b is None for params in weights for b in params[2:4]):
        return None
    parts = []
    for w_ih, _, b_ih, b_hh, *_ in weights:
        present = [to_dtype(b, dtype) for b in (b_ih, b_hh) if b is not None]
        if not present:
            parts.append(w_ih.new_zeros(w_ih.shape[0], dtype=dtype))
        else:
            parts.append(present[0] if len(present) == 1 else present[0] + present[1])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
