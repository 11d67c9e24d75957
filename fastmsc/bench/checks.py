"""Checking a backend against the float64 reference: tolerances, the error measure, the checked batch size.

Every backend's result (outputs, and in fwd+bwd mode the gradients of every input and parameter for a random
upstream gradient) is compared with the reference run in float64 on the same inputs; see :func:`tolerance` and
:func:`compare` for what passes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cases import Case

# The float64 reference runs on at most this many (batch rows x time steps) per device type; larger cases
# are checked on fewer batch rows, with every time step (the LSTM reference is a Python loop over time).
CHECK_ROWS_X_STEPS = {"cpu": 4096, "cuda": 65536}


@dataclass
class CheckOutcome:
    ok: bool
    max_error: float
    worst: str
    tolerance: float
    checked_on: str


def tf32_enabled() -> bool:
    return (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
            or torch.get_float32_matmul_precision() != "highest")


def tolerance(dtype: torch.dtype, device: torch.device, model: bool = False, tf32: bool | None = None) -> float:
    """Largest accepted error, relative to the largest reference magnitude of the compared tensor.

    float32 accumulates rounding of about 1e-7 per operation; 1e-4 leaves room for the long reductions and
    recurrences of one op (T up to 2048) and still catches any indexing or masking bug, which errs by O(1).
    On CUDA, PyTorch's default lets cuDNN (convolutions, LSTM) use TF32, a 10-bit mantissa (~5e-4 per
    product), hence 5e-3 when TF32 is on (``tf32``; None: any of PyTorch's TF32 switches). Half types keep
    ~3 (bf16: ~2) significant digits per stored value.

    The model's gradients get 20x more: the attention key projection and the conv weights sit behind the
    softmax and BatchNorm backward passes, whose mean subtractions cancel; stock PyTorch float32 itself
    differs from float64 by 0.6e-4 to 3.7e-4 there (B=32, T=150 and 512, CPU).
    """
    factor = 20.0 if model else 1.0
    if dtype == torch.float64:
        return 1e-10 * factor
    if dtype == torch.float32:
        tf32 = tf32_enabled() if tf32 is None else tf32
        return (5e-3 if device.type == "cuda" and tf32 else 1e-4) * factor
    if model:
        return 0.1  # half-precision training steps agree to about one digit; still far below an O(1) bug
    return 2e-2 if dtype == torch.float16 else 6e-2


def mismatch(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 0.0, atol: float | torch.Tensor = 0.0,
             atol_per_max: float = 0.0) -> tuple[float, tuple[int, ...] | None, int]:
    """How far ``actual`` is from ``expected``, element by element, in units of the allowed error
    ``atol + atol_per_max * max|expected| + rtol * |expected|`` (``atol`` may be a tensor of per-element bounds).

    Returns (worst ratio, index of the worst element or None, number of elements with ratio > 1); a ratio <= 1
    everywhere passes. Equal elements (infinities of the same sign included) count 0; NaN on either side, or an
    infinity against anything else, counts as infinite. ``atol_per_max`` serves low-precision results, whose
    rounded intermediates (products, partial sums) follow the tensor's largest values, not each element's.
    The one comparison of a backend against the float64 reference: the tests and the benchmark both use it.
    """
    got = actual.detach().to("cpu", torch.float64)
    want = expected.detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} against expected {tuple(want.shape)}")
    if not got.numel():
        return 0.0, None, 0
    largest = float(want.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max()) if atol_per_max else 0.0
    if isinstance(atol, torch.Tensor):
        atol = atol.detach().to("cpu", torch.float64)
    allowed = atol + atol_per_max * largest + rtol * want.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    allowed = torch.broadcast_to(torch.as_tensor(allowed, dtype=torch.float64), got.shape)
    with torch.no_grad():
        error = (got - want).abs()
        ratio = torch.where(allowed > 0, error / allowed.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.where(error > 0, float("inf"), 0.0))
        ratio = torch.where(got == want, 0.0, ratio.nan_to_num(nan=math.inf, posinf=math.inf))
        ratio = torch.where(got.isnan() | want.isnan(), math.inf, ratio)
    flat = int(ratio.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    return float(ratio.flatten()[flat]), index, int((ratio > 1).sum())


def compare(pairs: Sequence[tuple[str, torch.Tensor | None, torch.Tensor]],
            floor_fraction: float = 1e-2) -> tuple[float, str]:
    """Worst error over (name, got, reference) pairs: max|got - ref| / max|ref|, as float64.

    The denominator is at least ``floor_fraction`` of the largest reference magnitude in the group, so a tensor that
    is mathematically zero (a conv bias feeding BatchNorm has zero gradient) is judged on the group's scale,
    not on its own rounding noise. A missing gradient counts as zeros; NaN or inf counts as infinite error.
    """
    scales = [float(want.abs().max()) if want.numel() else 0.0 for _, _, want in pairs]
    floor = max(max(scales, default=0.0) * floor_fraction, torch.finfo(torch.float64).tiny)
    worst, worst_name = 0.0, ""
    for (name, got, want), scale in zip(pairs, scales, strict=True):
        if got is None:
            got = torch.zeros_like(want)
        if tuple(got.shape) != tuple(want.shape):
            return float("inf"), f"{name} has shape {tuple(got.shape)}, reference {tuple(want.shape)}"
        if got.numel() == 0:
            continue
        error, _, _ = mismatch(got, want, atol=max(scale, floor))
        if error > worst or not worst_name:
            worst, worst_name = error, name
    return worst, worst_name


def check_batch(case: Case, device: torch.device) -> int:
    budget = CHECK_ROWS_X_STEPS.get(device.type, CHECK_ROWS_X_STEPS["cpu"])
    return max(1, min(case.batch, budget // case.steps))


@contextlib.contextmanager
def check_threads(device: torch.device):
    """Run a check single-threaded on CPU: the float64 reference is thousands of tiny ops (the LSTM loops
    over time), and on a busy machine intra-op worker threads waiting for each other made a check 15x slower.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def checked_on_note(case: Case, batch: int) -> str:
    """What a check ran on: the full shape, or the batch rows the float64 reference could afford."""
    if batch == case.batch:
        return "full shape"
    return f"B={batch} of {case.batch} (float64 reference too slow at full size)"


def fresh_seed() -> int:
    """A new seed per check, drawn from the OS: every run tests new random inputs; failures print it."""
    return int.from_bytes(os.urandom(4), "little")
