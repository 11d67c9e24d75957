"""The reference implementations the fused paths share with the ops: plain PyTorch written straight from the math,
float64-capable; the oracle of the tests, and what the fused paths' double backward differentiates.

Here, below both fastmsc.ops.<op> (which imports its kernel module) and fastmsc.kernels.<op> (which recomputes the
reference), so that neither imports the other in a circle. Shapes and contracts: see each op's module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import compute_dtype, time_mask

# ------------------------------------------------------------------------------------------------ attention


def attention_masks(lengths, q):
    """Key mask (B, [1,] 1, T) and query mask (B, [1,] T, 1), True where t < lengths[b]."""
    valid = time_mask(lengths, q.shape[-2])
    if q.dim() == 4:
        valid = valid[:, None]
    return valid[..., None, :], valid[..., :, None]


def zero_padding(lengths, *tensors):
    """The tensors with their steps past the length set to 0: a masked score still multiplies its value
    (0 * NaN = NaN), so padding must not hold non-finite values once it enters the math."""
    valid = time_mask(lengths, tensors[0].shape[-2])
    valid = (valid[:, None] if tensors[0].dim() == 4 else valid)[..., None]
    return tuple(torch.where(valid, t, 0.0) for t in tensors)


def attention_reference(q, k, v, lengths=None, scale=None):
    dtype, work = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    if lengths is not None:
        q, k, v = zero_padding(lengths, q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if lengths is not None:
        # Query rows past the length are masked whole: their zero output gradient would still meet the values in
        # the softmax's backward (0 * inf = NaN) and reach the keys through their probabilities.
        key_valid, query_valid = attention_masks(lengths, q)
        scores = scores.masked_fill(~(key_valid & query_valid), float("-inf"))
    # SDPA's convention for a row whose scores are all -inf (padded rows, or -inf scores): zeros, not softmax's
    # 0/0 = NaN, and zero gradients (so the softmax must not see the -inf row).
    empty = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = torch.matmul(probs, v)
    if lengths is not None:
        out = out.masked_fill(~query_valid, 0.0)
    return out.to(dtype)


# ------------------------------------------------------------------------------------------------ lstm_layer


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


# ------------------------------------------------------------------------------------------------ multiscale_conv1d


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)  # exact erf form
    return y


def multiscale_conv1d_reference(x, weights, biases=None, activation=None):
    """Straight from the definition of cross-correlation: out[b, o, t] = sum_{c, j} w[o, c, j] x[b, c, t + j - k//2]."""
    work = compute_dtype(x.dtype)
    xw = x.to(work)
    outs = []
    for i, w in enumerate(weights):
        k = w.shape[-1]
        padded = F.pad(xw, (k // 2, k // 2))
        windows = padded.unfold(2, k, 1)  # (B, C_in, T, k)
        y = torch.einsum("bctj,ocj->bot", windows, w.to(work))
        if biases is not None and biases[i] is not None:
            y = y + biases[i].to(work)[None, :, None]
        outs.append(activate(y, activation))
    return torch.cat(outs, dim=1).to(x.dtype)
