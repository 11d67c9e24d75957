"""Argument checks shared by the ops: each error names the argument, what was expected and what was given."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._device import dtype_name

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: int | tuple[int, ...] | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {dtype_name(t.dtype)}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {dtype_name(t.dtype)} but {ref_name} has "
            f"{dtype_name(ref.dtype)}; use one dtype"
        )


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


class ValidLengths(NamedTuple):
    """``lengths`` already validated by :func:`validate_lengths`: ``tensor`` int64 (B,) on the data's device, every
    value in [1, ``max_len``]. A model validates its ``lengths`` once at its entry and passes this to its inner
    ops and layers, which then check only its shape against their arguments and never read its values (a value
    read of CUDA lengths is a host sync, one per op and layer otherwise). Only validate_lengths makes one."""

    tensor: torch.Tensor
    max_len: int


def check_lengths(lengths, batch: int, max_len: int, device: torch.device) -> torch.Tensor | None:
    """Validate ``lengths`` (B,) of ints in [1, max_len]; returns an int64 tensor on ``device`` or None.

    The range check reads the values, which costs a device sync for CUDA lengths; it is skipped while
    torch.compile traces (the values are not known) and during CUDA-graph capture (a sync is illegal).
    A :class:`ValidLengths` was range-checked already: only its shape and bound are compared, no value is read.
    """
    if lengths is None:
        return None
    if isinstance(lengths, ValidLengths):
        if lengths.tensor.shape != (batch,) or lengths.max_len > max_len:
            raise ValueError(f"lengths validated for {tuple(lengths.tensor.shape)} sequences of at most "
                             f"{lengths.max_len} steps cannot serve a batch of {batch} with {max_len} steps")
        return lengths.tensor.to(device=device, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"lengths must be a sequence of ints or an integer tensor, got {lengths!r}") from exc
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must hold integers, got dtype {dtype_name(lengths.dtype)}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape ({batch},) (one per batch element), got {tuple(lengths.shape)}")
    capturing = lengths.is_cuda and torch.cuda.is_current_stream_capturing()  # reading values would sync
    if not torch.compiler.is_compiling() and not capturing and batch > 0:
        lo, hi = torch.stack(torch.aminmax(lengths)).tolist()  # both bounds in one read: one sync for CUDA lengths
        if lo < 1 or hi > max_len:
            raise ValueError(f"lengths must lie in [1, {max_len}] (the time dimension), got values in [{lo}, {hi}]")
    return lengths.to(device=device, dtype=torch.int64)


def validate_lengths(lengths, batch: int, max_len: int, device: torch.device) -> ValidLengths | None:
    """:func:`check_lengths` once, at a model's entry: the result (None without lengths) passes to inner ops and
    layers with no further value read."""
    checked = check_lengths(lengths, batch, max_len, device)
    if checked is None or isinstance(lengths, ValidLengths):
        return lengths if checked is not None else None
    return ValidLengths(checked, max_len)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reference math runs in float64 for float64 inputs, else in float32 (half types upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def time_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, T) bool: True where t < lengths[b]."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
