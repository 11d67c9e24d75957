"""The per-call packing of a multi-scale conv with more than ``MAX_BRANCHES`` branches (the design is in
:mod:`fastmsc.kernels.multiscale_conv1d`): up to that many the kernels read every branch's tensors in place, and
nothing is packed or cached."""

from __future__ import annotations

import torch


def pack_weights(weights, biases):
    """(every branch weight flattened and concatenated, (sum_i C_out_i * C_in * k_i,), in the same order as the flat
    dW of _branches_backward; the biases as one (C_total,) tensor, zeros for a branch without one, or None without
    any). Torch ops on the tensors given, on every call: one concatenation each, plus a zeros fill per absent bias."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    bias = None
    if biases is not None and any(b is not None for b in biases):
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b.reshape(-1)
                          for w, b in zip(weights, biases, strict=True)])
    return flat, bias


def branch_layout(weights) -> list[list[int]]:
    """Two rows of C_total ints, from the shapes only: row 0 each output channel's own kernel size k_i (the kernels
    multiply only those taps of a channel, never its zero padding, so a NaN or inf input stays within each branch's
    receptive field); row 1 where channel o's (C_in, k_i) block starts in the flat dW that _branches_backward returns
    and in the flat weights of ``pack_weights`` (branch after branch, each (C_out_i, C_in, k_i) contiguous)."""
    taps, offsets, start = [], [], 0
    for w in weights:
        c_out, c_in, k = w.shape
        taps += [k] * c_out
        offsets += range(start, start + c_out * c_in * k, c_in * k)
        start += c_out * c_in * k
    return [taps, offsets]
