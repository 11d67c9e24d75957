"""One LSTM layer, batch first, one or two directions; gate order i, f, g, o as in torch.nn.LSTM.

Shapes: x (B, T, I); weights a tuple of one or two direction tuples ``(w_ih (4H, I), w_hh (4H, H),
b_ih (4H,) | None, b_hh (4H,) | None)``, the second one the reverse direction; h0, c0 (D, B, H).
Returns out (B, T, D*H), h_n (D, B, H), c_n (D, B, H).

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

from ..backend import Op, register
from ._checks import check_lengths, check_same, check_shape, check_tensor, compute_dtype, time_mask


def lstm_cell_reference(x_t, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step: x_t (B, I), h and c (B, H) -> (h', c')."""
    gates = x_t @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_next), c_next


def lstm_layer_reference(x, weights, h0=None, c0=None, lengths=None):
    work = compute_dtype(x.dtype)
    B, T, _ = x.shape
    H = weights[0][1].shape[1]
    valid = None if lengths is None else time_mask(lengths, T)
    if valid is not None:
        # Padded steps still run through the cell (torch.where discards their results), and the cell's backward
        # multiplies their zero gradients by its inputs: a non-finite padded x, or a carried state that is
        # infinite, would give 0 * inf = NaN there and reach the weight and earlier-step gradients. The cell
        # therefore sees zeros at padded steps, for x here and for the carried state below.
        x = torch.where(valid[:, :, None], x, 0.0)
    outputs, h_last, c_last = [], [], []
    for d, params in enumerate(weights):
        w_ih, w_hh, b_ih, b_hh = (None if p is None else p.to(work) for p in params)
        h = x.new_zeros(B, H, dtype=work) if h0 is None else h0[d].to(work)
        c = x.new_zeros(B, H, dtype=work) if c0 is None else c0[d].to(work)
        steps = range(T) if d == 0 else range(T - 1, -1, -1)
        out = [None] * T
        for t in steps:
            h_in, c_in = (h, c) if valid is None else (torch.where(valid[:, t, None], s, 0.0) for s in (h, c))
            h_next, c_next = lstm_cell_reference(x[:, t].to(work), h_in, c_in, w_ih, w_hh, b_ih, b_hh)
            if valid is None:
                h, c = h_next, c_next
                out[t] = h
            else:
                keep = valid[:, t, None]
                h, c = torch.where(keep, h_next, h), torch.where(keep, c_next, c)
                out[t] = torch.where(keep, h_next, torch.zeros_like(h_next))
        outputs.append(torch.stack(out, dim=1))
        h_last.append(h)
        c_last.append(c)
    cast = x.dtype
    return torch.cat(outputs, dim=-1).to(cast), torch.stack(h_last).to(cast), torch.stack(c_last).to(cast)


def _flat_weights(weights):
    """nn.LSTM's flat weight list; a missing bias among present ones becomes zeros."""
    has_bias = any(b is not None for params in weights for b in params[2:])
    flat = []
    for w_ih, w_hh, b_ih, b_hh in weights:
        flat += [w_ih, w_hh]
        if has_bias:
            zeros = w_ih.new_zeros(w_ih.shape[0])
            flat += [zeros if b_ih is None else b_ih, zeros if b_hh is None else b_hh]
    return flat, has_bias


def lstm_layer_torch(x, weights, h0=None, c0=None, lengths=None):
    """torch.nn.LSTM's own kernel (cuDNN on CUDA, oneDNN/ATen on CPU); packed sequences for ``lengths``."""
    B = x.shape[0]
    D, H = len(weights), weights[0][1].shape[1]
    flat, has_bias = _flat_weights(weights)
    h0 = x.new_zeros(D, B, H) if h0 is None else h0
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
    """nn.LSTM's kernel on a packed batch: x (B, T, I), lengths (B,) -> out (B, T, D*H), h_n, c_n (D, B, H)."""
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
# single-forward autograd. Double backward through the compiled path is not supported.


@torch.library.custom_op("fastmsc::lstm_layer_packed", mutates_args=())
def _lstm_packed_op(x: torch.Tensor, flat: list[torch.Tensor], h0: torch.Tensor, c0: torch.Tensor,
                    lengths: torch.Tensor, has_bias: bool, bidirectional: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Contiguous outputs, as the fake implementation promises (pad_packed_sequence returns a transposed view).
    return tuple(t.contiguous() for t in _lstm_packed(x, flat, h0, c0, lengths, has_bias, bidirectional))


@_lstm_packed_op.register_fake
def _(x, flat, h0, c0, lengths, has_bias, bidirectional):
    D, B, H = h0.shape
    return x.new_empty(B, x.shape[1], D * H), h0.new_empty(D, B, H), c0.new_empty(D, B, H)


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
    grads = torch.ops.fastmsc.lstm_layer_packed_backward(grad_out, grad_h_n, grad_c_n, x, flat, h0, c0, lengths,
                                                         ctx.has_bias, ctx.bidirectional)
    grad_x, grad_h0, grad_c0, grad_flat = grads[0], grads[1], grads[2], list(grads[3:])
    return grad_x, grad_flat, grad_h0, grad_c0, None, None, None


_lstm_packed_op.register_autograd(_lstm_packed_backward, setup_context=_lstm_packed_setup_context)


OP = register(Op("lstm_layer", lstm_layer_reference, lstm_layer_torch, fused_module="fastmsc.kernels.lstm_layer"))


def _validate(x, weights, h0, c0):
    check_tensor("x", x, ndim=3)
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (tuple, list)) or len(weights) not in (1, 2):
        raise TypeError("weights must be a tuple of one or two direction tuples (w_ih, w_hh, b_ih, b_hh)")
    B, T, input_size = x.shape
    if T == 0:
        raise ValueError(f"x must have at least one time step (T >= 1), got shape {tuple(x.shape)}")
    if input_size == 0:
        raise ValueError(f"x must have at least one input feature (input size >= 1), got shape {tuple(x.shape)}")
    checked = []
    H = None
    for d, params in enumerate(weights):
        if not isinstance(params, (tuple, list)) or len(params) != 4:
            raise TypeError(f"weights[{d}] must be a tuple (w_ih, w_hh, b_ih, b_hh), got {type(params).__name__}")
        w_ih, w_hh, b_ih, b_hh = params
        check_tensor(f"weights[{d}].w_hh", w_hh, ndim=2)
        if H is None:
            H = w_hh.shape[1]
            if H == 0:
                raise ValueError("the hidden size (w_hh.shape[1]) must be >= 1")
        check_shape(f"weights[{d}].w_hh", w_hh, (4 * H, H), "4H x H")
        check_tensor(f"weights[{d}].w_ih", w_ih, ndim=2)
        check_shape(f"weights[{d}].w_ih", w_ih, (4 * H, input_size), "4H x input size")
        for name, p in ((f"weights[{d}].w_ih", w_ih), (f"weights[{d}].w_hh", w_hh)):
            check_same(name, p, "x", x)
        for name, b in ((f"weights[{d}].b_ih", b_ih), (f"weights[{d}].b_hh", b_hh)):
            if b is not None:
                check_tensor(name, b, ndim=1)
                check_same(name, b, "x", x)
                check_shape(name, b, (4 * H,))
        checked.append((w_ih, w_hh, b_ih, b_hh))
    D = len(checked)
    for name, state in (("h0", h0), ("c0", c0)):
        if state is not None:
            check_tensor(name, state, ndim=3)
            check_same(name, state, "x", x)
            check_shape(name, state, (D, B, H), "directions x batch x hidden")
    return tuple(checked)


def lstm_layer(x, weights, h0=None, c0=None, lengths=None):
    """One (bi)directional LSTM layer; see the module docstring for shapes and ``lengths``.

    Empty inputs: B = 0 gives out (0, T, D*H), h_n and c_n (D, 0, H), an empty x gradient and zero weight
    gradients, as torch.nn.LSTM does (also with ``lengths``, which nn.LSTM cannot pack). T = 0 and an input
    size of 0 raise ValueError on every backend, as nn.LSTM refuses both.
    """
    weights = _validate(x, weights, h0, c0)
    lengths = check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    impl = OP.select(x.device.type, x=x, weights=weights, h0=h0, c0=c0, lengths=lengths)
    return impl(x, weights, h0, c0, lengths)
