"""The reference of fastmsc.lstm_layer: one (bi)directional LSTM layer, in plain PyTorch written straight from the math
(float64-capable); the oracle of the tests and what the fused path's double backward differentiates. Shapes: see
fastmsc.ops.lstm_layer."""

from __future__ import annotations

import torch

from .._checks import compute_dtype, time_mask


def direction_params(params):
    """(w_ih, w_hh, b_ih, b_hh, w_hr or None) of a direction tuple of 4 or 5."""
    return (*params[:4], params[4] if len(params) > 4 else None)


def lstm_cell_reference(x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None):
    """One step: x_t (B, I), h (B, R), c (B, H) -> (h', c'); R = P with the projection w_hr (P, H), else H."""
    gates = x_t @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.t()
    return h_next, c_next


def lstm_layer_reference(x, weights, h0=None, c0=None, lengths=None):
    work = compute_dtype(x.dtype)
    B, T, _ = x.shape
    H, R = weights[0][1].shape[0] // 4, weights[0][1].shape[1]
    valid = None if lengths is None else time_mask(lengths, T)
    if valid is not None:
        # Padded steps still run through the cell (torch.where discards their results), and the cell's backward
        # multiplies their zero gradients by its inputs: a non-finite padded x, or a carried state that is
        # infinite, would give 0 * inf = NaN there and reach the weight and earlier-step gradients. The cell
        # therefore sees zeros at padded steps, for x here and for the carried state below.
        x = torch.where(valid[:, :, None], x, 0.0)
    outputs, h_last, c_last = [], [], []
    for d, params in enumerate(weights):
        w_ih, w_hh, b_ih, b_hh, w_hr = (None if p is None else p.to(work) for p in direction_params(params))
        h = x.new_zeros(B, R, dtype=work) if h0 is None else h0[d].to(work)
        c = x.new_zeros(B, H, dtype=work) if c0 is None else c0[d].to(work)
        steps = range(T) if d == 0 else range(T - 1, -1, -1)
        out = [None] * T
        for t in steps:
            h_in, c_in = (h, c) if valid is None else (torch.where(valid[:, t, None], s, 0.0) for s in (h, c))
            h_next, c_next = lstm_cell_reference(x[:, t].to(work), h_in, c_in, w_ih, w_hh, b_ih, b_hh, w_hr)
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
