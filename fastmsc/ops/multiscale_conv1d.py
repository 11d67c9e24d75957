"""Multi-scale Conv1d + concat: ``cat([act(conv1d(x, w_i, b_i, padding=k_i // 2)) for i], dim=1)``.

Shapes: x (B, C_in, T); weights[i] (C_out_i, C_in, k_i) with odd k_i; biases[i] (C_out_i,) or None.
Output (B, sum C_out_i, T), same dtype as x.

NaN/Inf as the per-branch F.conv1d composition, on every backend: a non-finite x[b, c, t] makes branch i's
outputs non-finite only within its own receptive field (t - k_i // 2 .. t + k_i // 2), never the wider one of
another branch, and reaches the gradients only where that math reads it. ReLU keeps NaN (and passes its
gradient, as torch.relu does). The fused kernels' erf GELU gives +inf at +inf where torch's CPU GELU gives NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backend import Op, import_failure, register
from ._checks import check_same, check_tensor
from .reference.multiscale_conv1d import activate, multiscale_conv1d_reference

# The fused path. A failed import (no triton, a broken install) is recorded in the op, shown by
# `fastmsc info`, and never raised at `import fastmsc`.
try:
    from ..kernels import multiscale_conv1d as _kernels
except Exception as exc:
    _kernels, _kernels_error = None, import_failure("fastmsc.kernels.multiscale_conv1d", exc)
else:
    _kernels_error = None

ACTIVATIONS = (None, "relu", "gelu")


def multiscale_conv1d_torch(x, weights, biases=None, activation=None):
    """What a user writes: one cuDNN/oneDNN conv per branch, then torch.cat."""
    outs = []
    for i, w in enumerate(weights):
        b = None if biases is None else biases[i]
        outs.append(activate(F.conv1d(x, w, b, padding=w.shape[-1] // 2), activation))
    return torch.cat(outs, dim=1)


OP = register(Op("multiscale_conv1d", multiscale_conv1d_reference, multiscale_conv1d_torch,
                 fused=getattr(_kernels, "fused", None), fused_unsupported=getattr(_kernels, "fused_unsupported", None),
                 load_error=_kernels_error))


def _validate(x, weights, biases, activation):
    check_tensor("x", x, ndim=3)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'relu', 'gelu', got {activation!r}")
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or len(weights) == 0:
        raise TypeError("weights must be a non-empty sequence of (C_out_i, C_in, k_i) tensors")
    weights = list(weights)
    c_in = x.shape[1]
    if c_in == 0:
        raise ValueError(f"x must have at least one input channel (C_in >= 1), got shape {tuple(x.shape)}")
    if x.shape[2] == 0:
        raise ValueError(f"x must have at least one time step (T >= 1), got shape {tuple(x.shape)}")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, ndim=3)
        check_same(f"weights[{i}]", w, "x", x)
        if w.shape[1] != c_in:
            raise ValueError(
                f"weights[{i}] must have shape (C_out, {c_in}, k) to match x's C_in={c_in}, got {tuple(w.shape)}"
            )
        if w.shape[2] % 2 == 0 or w.shape[0] == 0:
            raise ValueError(
                f"weights[{i}] must have an odd kernel size and C_out >= 1 ('same' padding), got {tuple(w.shape)}"
            )
    if biases is not None:
        if isinstance(biases, torch.Tensor) or not isinstance(biases, Sequence) or len(biases) != len(weights):
            raise TypeError(f"biases must be None or a sequence of {len(weights)} tensors/None, one per weight")
        biases = list(biases)
        for i, b in enumerate(biases):
            if b is None:
                continue
            check_tensor(f"biases[{i}]", b, ndim=1)
            check_same(f"biases[{i}]", b, "x", x)
            if b.shape[0] != weights[i].shape[0]:
                raise ValueError(f"biases[{i}] must have shape ({weights[i].shape[0]},), got {tuple(b.shape)}")
        if all(b is None for b in biases):
            biases = None
    return weights, biases


def multiscale_conv1d(x, weights, biases=None, activation=None):
    """Multi-scale "same" Conv1d with fused concat.

    Args:
        x: (B, C_in, T).
        weights: sequence of (C_out_i, C_in, k_i) tensors, k_i odd.
        biases: None or a sequence of (C_out_i,) tensors (entries may be None).
        activation: None, ``"relu"`` or ``"gelu"`` (exact erf GELU), applied per branch.

    Returns:
        (B, sum_i C_out_i, T).

    Empty inputs: B = 0 gives a (0, sum_i C_out_i, T) output, an empty x gradient and zero weight and bias
    gradients, as nn.Conv1d does. C_in = 0 and T = 0 raise ValueError on every backend: torch's own conv
    returns a wrongly shaped (B, 0, T) result for C_in = 0 and a kernel-size error for T = 0.
    """
    weights, biases = _validate(x, weights, biases, activation)
    impl = OP.select(x.device.type, x=x, weights=weights, biases=biases, activation=activation)
    return impl(x, weights, biases, activation)
