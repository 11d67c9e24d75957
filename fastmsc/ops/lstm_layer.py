"""One LSTM layer, batch first, one or two directions; gate order i, f, g, o as in torch.nn.LSTM.

Shapes: x (B, T, I); weights a tuple of one or two direction tuples ``(w_ih (4H, I), w_hh (4H, R),
b_ih (4H,) | None, b_hh (4H,) | None[, w_hr (P, H)])``, the second one the reverse direction; h0 (D, B, R),
c0 (D, B, H). Returns out (B, T, D*R), h_n (D, B, R), c_n (D, B, H).

R is the size of the hidden state h: H without projection, P with ``w_hr`` (torch.nn.LSTM's ``proj_size``,
1 <= P < H, given for both directions or for none): then h_t = w_hr · (o_t ⊙ tanh(c_t)).

With ``lengths`` (B,), sequence b is processed over its first lengths[b] steps only: the reverse
direction starts at step lengths[b] - 1, outputs past the length are zero and h_n/c_n are taken at
each sequence's last valid step, as pack_padded_sequence + nn.LSTM gives.

NaN/Inf as nn.LSTM on packed sequences, on every backend: a non-finite input at a valid step of sequence b
reaches that sequence's outputs from that step on (in the scan's direction), its h_n/c_n, and the gradients
that flow through them; other sequences stay finite, and values at t >= lengths[b] never reach an output
or a gradient.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .._double_backward import graph_wanted, recomputed_grads
from ..backend import Op, import_failure, lstm_impl_for, register
from ._checks import FLOAT_DTYPES, check_lengths, check_same, check_shape, check_tensor
from .reference.lstm_layer import direction_params, lstm_layer_reference

# The fused path. A failed import (a broken torch.library registration) is recorded in the op, shown by
# `fastmsc info`, and never raised at `import fastmsc`.
try:
    from ..kernels import lstm_layer as _kernels
except Exception as exc:
    _kernels, _kernels_error = None, import_failure("fastmsc.kernels.lstm_layer", exc)
else:
    _kernels_error = None


def _flat_weights(weights):
    """nn.LSTM's flat weight list (w_ih, w_hh[, b_ih, b_hh][, w_hr] per direction); a missing bias among present
    ones becomes zeros."""
    weights = [direction_params(params) for params in weights]
    has_bias = any(b is not None for params in weights for b in params[2:4])
    flat = []
    for w_ih, w_hh, b_ih, b_hh, w_hr in weights:
        flat += [w_ih, w_hh]
        if has_bias:
            zeros = w_ih.new_zeros(w_ih.shape[0])
            flat += [zeros if b_ih is None else b_ih, zeros if b_hh is None else b_hh]
        if w_hr is not None:
            flat.append(w_hr)
    return flat, has_bias


def lstm_layer_torch(x, weights, h0=None, c0=None, lengths=None):
    """torch.nn.LSTM's own kernel (cuDNN on CUDA, oneDNN/ATen on CPU); packed sequences for ``lengths``."""
    B = x.shape[0]
    D, H, R = len(weights), weights[0][1].shape[0] // 4, weights[0][1].shape[1]
    flat, has_bias = _flat_weights(weights)
    # The kernel tells a projected layer (one more weight per direction) by h0's last size differing from c0's.
    h0 = x.new_zeros(D, B, R) if h0 is None else h0
    c0 = x.new_zeros(D, B, H) if c0 is None else c0
    if lengths is None or B == 0:  # an empty batch cannot be packed; without sequences lengths change nothing
        out, h_n, c_n = torch._VF.lstm(x, (h0, c0), flat, has_bias, 1, 0.0, False, D == 2, True)
        return out, h_n, c_n
    if torch.compiler.is_compiling():
        # Dynamo refuses to trace pack_padded_sequence (and its batch sizes depend on the values of
        # lengths), so under torch.compile the packed kernel runs as one opaque op.
        out, h_n, c_n = torch.ops.fastmsc.lstm_layer_packed(x, flat, h0, c0, lengths, has_bias, D == 2)
        return out, h_n, c_n
    return _lstm_packed(x, flat, h0, c0, lengths, has_bias, D == 2)


def _lstm_packed(x, flat, h0, c0, lengths, has_bias, bidirectional):
    """nn.LSTM's kernel on a packed batch: x (B, T, I), lengths (B,) -> out (B, T, D*R), h_n (D, B, R),
    c_n (D, B, H)."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    hx = (h0.index_select(1, order), c0.index_select(1, order))
    data, h_n, c_n = torch._VF.lstm(packed.data, packed.batch_sizes, hx, flat, has_bias, 1, 0.0, False, bidirectional)
    out, _ = pad_packed_sequence(
        PackedSequence(data, packed.batch_sizes, order, unorder), batch_first=True, total_length=x.shape[1]
    )
    return out, h_n.index_select(1, unorder), c_n.index_select(1, unorder)


# torch.compile path for lengths: the eager packed kernel wrapped as custom ops, opaque to the compiler.
# The backward op recomputes the packed forward under autograd and differentiates it, so a compiled
# training step runs the LSTM forward twice (about +50% LSTM time); eager mode keeps nn.LSTM's own
# single-forward autograd. Double backward (eager create_graph=True) differentiates the recomputed reference
# layer instead; torch.compile itself does not compile double backward.


@torch.library.custom_op("fastmsc::lstm_layer_packed", mutates_args=())
def _lstm_packed_op(x: torch.Tensor, flat: list[torch.Tensor], h0: torch.Tensor, c0: torch.Tensor,
                    lengths: torch.Tensor, has_bias: bool, bidirectional: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Contiguous outputs, as the fake implementation promises (pad_packed_sequence returns a transposed view).
    return tuple(t.contiguous() for t in _lstm_packed(x, flat, h0, c0, lengths, has_bias, bidirectional))


@_lstm_packed_op.register_fake
def _(x, flat, h0, c0, lengths, has_bias, bidirectional):
    D, B, R = h0.shape
    return x.new_empty(B, x.shape[1], D * R), h0.new_empty(D, B, R), c0.new_empty(c0.shape)


def _autograd_recording():
    """Re-enable autograd recording inside a custom op's implementation.

    The dispatcher runs custom op implementations below the autograd layer (autograd dispatch keys
    excluded in thread-local state), where enable_grad alone records nothing; lifting the exclusion
    for this block lets the recomputed forward build a graph to differentiate.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("fastmsc::lstm_layer_packed_backward", mutates_args=())
def _lstm_packed_backward_op(grad_out: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor,
                             x: torch.Tensor, flat: list[torch.Tensor], h0: torch.Tensor, c0: torch.Tensor,
                             lengths: torch.Tensor, has_bias: bool, bidirectional: bool) -> list[torch.Tensor]:
    """Gradients [dx, dh0, dc0, *dflat] of the packed layer, by recomputing its forward."""
    with _autograd_recording(), torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (x, h0, c0, *flat)]
        outputs = _lstm_packed(inputs[0], inputs[3:], inputs[1], inputs[2], lengths, has_bias, bidirectional)
        grads = torch.autograd.grad(outputs, inputs, (grad_out, grad_h_n, grad_c_n), allow_unused=True)
    return [t.new_zeros(t.shape) if g is None else g.contiguous() for t, g in zip(inputs, grads, strict=True)]


@_lstm_packed_backward_op.register_fake
def _(grad_out, grad_h_n, grad_c_n, x, flat, h0, c0, lengths, has_bias, bidirectional):
    return [t.new_empty(t.shape) for t in (x, h0, c0, *flat)]


def _lstm_packed_setup_context(ctx, inputs, output):
    x, flat, h0, c0, lengths, has_bias, bidirectional = inputs
    ctx.has_bias, ctx.bidirectional, ctx.num_flat = has_bias, bidirectional, len(flat)
    ctx.save_for_backward(x, h0, c0, lengths, *flat)


def _lstm_packed_backward(ctx, grad_out, grad_h_n, grad_c_n):
    x, h0, c0, lengths, *flat = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], x.shape[1], h0.shape[0] * h0.shape[2])
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    if graph_wanted(grad_out, grad_h_n, grad_c_n, x, h0, c0, *flat):
        return _lstm_packed_recorded_backward(ctx, grad_out, grad_h_n, grad_c_n, x, flat, h0, c0, lengths)
    grads = torch.ops.fastmsc.lstm_layer_packed_backward(grad_out, grad_h_n, grad_c_n, x, flat, h0, c0, lengths,
                                                         ctx.has_bias, ctx.bidirectional)
    grad_x, grad_h0, grad_c0, grad_flat = grads[0], grads[1], grads[2], list(grads[3:])
    return grad_x, grad_flat, grad_h0, grad_c0, None, None, None


def _lstm_packed_recorded_backward(ctx, grad_out, grad_h_n, grad_c_n, x, flat, h0, c0, lengths):
    """_lstm_packed_backward's gradients as a graph (create_graph=True): the reference layer recomputed on the
    saved inputs and differentiated, since the backward op's result carries no graph."""
    projected = h0.shape[-1] != c0.shape[-1]  # as torch's kernel tells a projected layer
    per = (4 if ctx.has_bias else 2) + projected

    def forward(x, h0, c0, *flat):
        weights = tuple((*flat[i:i + 2], *(flat[i + 2:i + 4] if ctx.has_bias else (None, None)),
                         *((flat[i + per - 1],) if projected else ()))
                        for i in range(0, len(flat), per))
        return lstm_layer_reference(x, weights, h0, c0, lengths)

    inputs = (x, h0, c0, *flat)
    grads = recomputed_grads(forward, inputs, [t.requires_grad for t in inputs], (grad_out, grad_h_n, grad_c_n))
    return grads[0], list(grads[3:]), grads[1], grads[2], None, None, None


_lstm_packed_op.register_autograd(_lstm_packed_backward, setup_context=_lstm_packed_setup_context)


OP = register(Op("lstm_layer", lstm_layer_reference, lstm_layer_torch,
                 fused=getattr(_kernels, "fused", None), fused_unsupported=getattr(_kernels, "fused_unsupported", None),
                 fused_prepare=getattr(_kernels, "prepare", None),
                 load_error=_kernels_error, fused_expected_slower=getattr(_kernels, "expected_slower", None),
                 fused_cpu_dispatch_note=getattr(_kernels, "cpu_dispatch_note", None)))


_DIRECTION = "(w_ih, w_hh, b_ih, b_hh) or (w_ih, w_hh, b_ih, b_hh, w_hr)"


def _common_call(x, weights, h0, c0):
    """The weights as _validate returns them when the call is the common one, recognised in one pass: tensors
    only where expected, all on x's device and in its dtype, no projection, every shape as _validate requires.
    None for anything else; _validate then checks in full and names what is wrong."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in FLOAT_DTYPES:
        return None
    if not isinstance(weights, tuple) or len(weights) not in (1, 2):
        return None
    B, T, n_in = x.shape
    dtype, device = x.dtype, x.device
    first = weights[0]
    if not isinstance(first, tuple) or len(first) != 4 or not isinstance(first[1], torch.Tensor) or first[1].dim() != 2:
        return None
    H = first[1].shape[1]
    gates = 4 * H
    if T == 0 or n_in == 0 or H == 0:
        return None
    shapes = ((gates, n_in), (gates, H), (gates,), (gates,))
    for params in weights:
        if not isinstance(params, tuple) or len(params) != 4:
            return None
        for t, shape in zip(params, shapes, strict=True):
            if t is None and len(shape) == 1:
                continue
            if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dtype or t.device != device:
                return None
    for state, size in ((h0, H), (c0, H)):
        if state is not None and (not isinstance(state, torch.Tensor) or state.shape != (len(weights), B, size)
                                  or state.dtype != dtype or state.device != device):
            return None
    return weights


def _validate(x, weights, h0, c0):
    """The weights, direction tuples without a projection cut to 4, once every argument checks out; else the error
    that names the argument (TypeError or ValueError)."""
    common = _common_call(x, weights, h0, c0)
    return common if common is not None else _validate_in_full(x, weights, h0, c0)


def _validate_in_full(x, weights, h0, c0):
    check_tensor("x", x, ndim=3)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (tuple, list)) or len(weights) not in (1, 2):
        raise TypeError(f"weights must be a tuple of one or two direction tuples {_DIRECTION}")
    B, T, input_size = x.shape
    if T == 0:
        raise ValueError(f"x must have at least one time step (T >= 1), got shape {tuple(x.shape)}")
    if input_size == 0:
        raise ValueError(f"x must have at least one input feature (input size >= 1), got shape {tuple(x.shape)}")
    checked = []
    H = R = None
    for d, params in enumerate(weights):
        if not isinstance(params, (tuple, list)) or len(params) not in (4, 5):
            kind = f"a {type(params).__name__} of {len(params)}" if isinstance(params, (tuple, list)) else \
                type(params).__name__
            raise TypeError(f"weights[{d}] must be a tuple {_DIRECTION}, got {kind}")
        w_ih, w_hh, b_ih, b_hh, w_hr = direction_params(params)
        if d == 1 and (w_hr is None) != (checked[0][4] is None):
            given = "weights[1] has w_hr and weights[0] has none" if w_hr is not None else \
                "weights[0] has w_hr and weights[1] has none"
            raise ValueError(f"w_hr (the projection) must be given for both directions or for none; {given}")
        if w_hr is not None:
            check_tensor(f"weights[{d}].w_hr", w_hr, ndim=2)
            check_same(f"weights[{d}].w_hr", w_hr, "x", x)
            if H is None:
                R, H = w_hr.shape
                if not 1 <= R < H:
                    raise ValueError(f"weights[{d}].w_hr must have shape (P, H) with 1 <= P < H (proj size smaller "
                                     f"than the hidden size, as torch.nn.LSTM requires), got {tuple(w_hr.shape)}")
            check_shape(f"weights[{d}].w_hr", w_hr, (R, H), "proj size x hidden")
        check_tensor(f"weights[{d}].w_hh", w_hh, ndim=2)
        if H is None:
            H = R = w_hh.shape[1]
            if H == 0:
                raise ValueError("the hidden size (w_hh.shape[1]) must be >= 1")
        if w_hr is None:
            check_shape(f"weights[{d}].w_hh", w_hh, (4 * H, H), "4H x H")
        else:
            check_shape(f"weights[{d}].w_hh", w_hh, (4 * H, R), "4H x proj size")
        check_tensor(f"weights[{d}].w_ih", w_ih, ndim=2)
        check_shape(f"weights[{d}].w_ih", w_ih, (4 * H, input_size), "4H x input size")
        for name, p in ((f"weights[{d}].w_ih", w_ih), (f"weights[{d}].w_hh", w_hh)):
            check_same(name, p, "x", x)
        for name, b in ((f"weights[{d}].b_ih", b_ih), (f"weights[{d}].b_hh", b_hh)):
            if b is not None:
                check_tensor(name, b, ndim=1)
                check_same(name, b, "x", x)
                check_shape(name, b, (4 * H,))
        checked.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    D = len(checked)
    for name, state, size, what in (("h0", h0, R, "proj size" if R != H else "hidden"), ("c0", c0, H, "hidden")):
        if state is not None:
            check_tensor(name, state, ndim=3)
            check_same(name, state, "x", x)
            check_shape(name, state, (D, B, size), f"directions x batch x {what}")
    # Layers without projection keep their 4-tuples, so every backend sees what it saw before projections existed.
    return tuple(params if params[4] is not None else params[:4] for params in checked)


def _call_tensors(x, weights, h0, c0) -> list:
    """The call's tensors whose requires_grad decides the dispatch mode (as Op.select sees them)."""
    return [x, *(w for params in weights for w in params if w is not None), h0, c0]


def lstm_layer(x, weights, h0=None, c0=None, lengths=None):
    """One (bi)directional LSTM layer; see the module docstring for shapes and ``lengths``.

    Empty inputs: B = 0 gives out (0, T, D*R), h_n (D, 0, R) and c_n (D, 0, H), an empty x gradient and zero weight
    gradients, as torch.nn.LSTM does (also with ``lengths``, which nn.LSTM cannot pack). T = 0 and an input
    size of 0 raise ValueError on every backend, as nn.LSTM refuses both.
    """
    weights = _validate(x, weights, h0, c0)
    lengths = check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    lstm_impl = lstm_impl_for(x, _call_tensors(x, weights, h0, c0))
    impl = OP.select(x.device.type, x=x, weights=weights, h0=h0, c0=c0, lengths=lengths, lstm_impl=lstm_impl)
    if impl is OP.fused:
        return impl(x, weights, h0, c0, lengths, lstm_impl=lstm_impl)
    return impl(x, weights, h0, c0, lengths)
