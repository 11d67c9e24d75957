"""Achieved rates against the device's ceilings, both measured in the same run.

Each benchmark row is given the fewest bytes it must move through memory (each input read once, each output
written once) and the floating-point operations its math needs (:func:`work`). Over the row's median time
these are the achieved GB/s and TFLOP/s. The ceilings are measured, not taken from a spec sheet
(:func:`measure_peaks`): a large device-to-device copy (bytes read plus bytes written) and a large matrix
product in each dtype of the run (float32 under the run's TF32 setting). The row's ``% peak`` is its
roofline fraction: the larger of bytes / copy bandwidth and FLOPs / matmul rate, over the measured time;
``bound`` says which of the two it is (``mem`` or ``math``).

Counts per op (B batch, T steps; element size s of the dtype):

* multiscale_conv1d, kernels 3/5/7 (sum 15), C_out per branch: 2*B*T*C_out*C_in*15 FLOPs forward; bytes
  x + weights + biases + output. fwd+bwd: 3x the FLOPs (dx and dW each cost a forward), bytes plus the
  upstream gradient, x again, dx and dW.
* lstm_layer, bidirectional: 2 directions x 2*B*T*4H*(I+H) FLOPs; bytes x, weights, output, final states.
  fwd+bwd: 3x FLOPs; plus the upstream gradient, x again, dx and the weight gradients.
* attention, one head of dim E: 4*B*T^2*E FLOPs (QK^T and PV); bytes q, k, v, o. fwd+bwd: 3.5x the FLOPs
  (backward recomputes QK^T: five T^2 products in all), bytes q, k, v, o, dO read and dq, dk, dv written.
* max_avg_pool: 2*B*T*C FLOPs; bytes x + output; fwd+bwd: x, upstream gradient, dx.
* model train step: the sum of its ops' fwd+bwd counts plus the q/k/v projections (3 x 2*B*T*E^2, x3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..dispatch import dtype_name
from .cases import KERNEL_SIZES, MODEL, Case
from .timing import time_step


@dataclass(frozen=True)
class Work:
    flops: float
    bytes: float


@dataclass
class Peaks:
    """Ceilings measured on the benchmark's device: copy bandwidth (GB/s, read + write) and matmul TFLOP/s per
    dtype name."""

    copy_gbps: float
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        rates = ", ".join(f"{dtype} {tflops:.3g}" for dtype, tflops in self.matmul_tflops.items())
        return (f"ceilings measured in this run: copy {self.copy_gbps:.4g} GB/s (read + write); matmul TFLOP/s: "
                f"{rates}{f' ({self.note})' if self.note else ''}")


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    return time_step(fn, device, repeats, warmup=2)[0].median_ms


def _copy_ms(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src), device, repeats)


def _matmul_ms(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _median_ms(lambda: torch.matmul(a, b), device, repeats)


def measure_peaks(device: torch.device, dtypes: list[torch.dtype]) -> Peaks:
    """A copy of 2 GiB on CUDA (256 MiB on CPU) and an n^3 matmul per dtype (n = 8192 on CUDA, 4096 for
    float64 and 1024 on CPU), each the median of 10 timed runs (5 on CPU) after warm-up, on random data."""
    cuda = device.type == "cuda"
    copy_bytes = (2 << 30) if cuda else (256 << 20)
    if cuda:
        copy_bytes = min(copy_bytes, torch.cuda.mem_get_info(device)[0] // 8)
    repeats = 10 if cuda else 5
    peaks = Peaks(copy_gbps=2 * copy_bytes / (_copy_ms(device, copy_bytes, repeats) * 1e-3) / 1e9)
    for dtype in dict.fromkeys(dtypes):
        n = 1024 if not cuda else (4096 if dtype == torch.float64 else 8192)
        try:
            ms = _matmul_ms(device, dtype, n, repeats)
        except RuntimeError as exc:  # a dtype without a matmul on this device
            peaks.note += f"no {dtype} matmul here ({exc}); "
            continue
        peaks.matmul_tflops[dtype_name(dtype)] = 2 * n**3 / (ms * 1e-3) / 1e12
    if cuda:
        torch.cuda.empty_cache()
        if torch.backends.cuda.matmul.allow_tf32:
            peaks.note = (peaks.note + "float32 matmul with TF32").strip()
    return peaks


def _conv(case: Case, mode: str, size: int) -> Work:
    b, c_in, t, c_out = case.batch, case["C_in"], case.steps, case["C_out"]
    taps = sum(KERNEL_SIZES)
    branches = len(KERNEL_SIZES)
    x, out = b * c_in * t, b * branches * c_out * t
    params = c_out * c_in * taps + branches * c_out
    flops = 2.0 * b * t * c_out * c_in * taps
    if mode == "fwd":
        return Work(flops, size * (x + params + out))
    return Work(3 * flops, size * (x + params + out + out + x + x + params))


def _lstm(case: Case, mode: str, size: int) -> Work:
    b, t, i, h = case.batch, case.steps, case["I"], case["H"]
    x, out, states = b * t * i, b * t * 2 * h, 2 * 2 * b * h
    params = 2 * (4 * h * i + 4 * h * h + 8 * h)
    flops = 2 * 2.0 * b * t * 4 * h * (i + h)
    if mode == "fwd":
        return Work(flops, size * (x + params + out + states))
    return Work(3 * flops, size * (x + params + out + states + out + x + x + params))


def _attention(case: Case, mode: str, size: int) -> Work:
    b, t, e = case.batch, case.steps, case["E"]
    flops = 4.0 * b * t * t * e
    if mode == "fwd":
        return Work(flops, size * 4 * b * t * e)
    return Work(3.5 * flops, size * 12 * b * t * e)


def _pool(case: Case, mode: str, size: int) -> Work:
    b, t, c = case.batch, case.steps, case["C"]
    x, out = b * t * c, b * 2 * c
    if mode == "fwd":
        return Work(2.0 * x, size * (x + out))
    return Work(2.0 * x, size * (x + out + out + x))


def _model(case: Case, size: int) -> Work:
    b, t, c_conv, h = case.batch, case.steps, case["C_conv"], case["H"]
    conv_out, e = len(KERNEL_SIZES) * c_conv, 2 * h
    parts = [
        _conv(Case("multiscale_conv1d", (("B", b), ("C_in", case["C_in"]), ("T", t), ("C_out", c_conv))), "fwd+bwd",
              size),
        _lstm(Case("lstm_layer", (("B", b), ("T", t), ("I", conv_out), ("H", h))), "fwd+bwd", size),
        _attention(Case("attention", (("B", b), ("T", t), ("E", e))), "fwd+bwd", size),
        _pool(Case("max_avg_pool", (("B", b), ("T", t), ("C", e))), "fwd+bwd", size),
        Work(3 * 3 * 2.0 * b * t * e * e, size * 3 * (b * t * e * 3 + e * e)),  # q/k/v projections
    ]
    return Work(sum(p.flops for p in parts), sum(p.bytes for p in parts))


WORK = {"multiscale_conv1d": _conv, "lstm_layer": _lstm, "attention": _attention, "max_avg_pool": _pool}


def work(case: Case, mode: str, dtype: torch.dtype) -> Work | None:
    """FLOPs and fewest bytes of one call of ``case`` in ``mode``; None for an op without a count."""
    size = torch.empty((), dtype=dtype).element_size()
    if case.op == MODEL:
        return _model(case, size)
    counter = WORK.get(case.op)
    return None if counter is None else counter(case, mode, size)


@dataclass(frozen=True)
class Rates:
    tflops: float
    gbps: float
    pct_of_peak: float | None  # roofline fraction in percent; None without a measured ceiling
    bound: str  # mem | math | ""


def rates(w: Work, median_ms: float, dtype: str, peaks: Peaks | None) -> Rates:
    """Achieved TFLOP/s and GB/s of ``w`` done in ``median_ms``, and its fraction of the roofline."""
    seconds = median_ms * 1e-3
    tflops, gbps = w.flops / seconds / 1e12, w.bytes / seconds / 1e9
    if peaks is None or dtype not in peaks.matmul_tflops or peaks.copy_gbps <= 0:
        return Rates(tflops, gbps, None, "")
    memory_s = w.bytes / (peaks.copy_gbps * 1e9)
    math_s = w.flops / (peaks.matmul_tflops[dtype] * 1e12)
    bound = "mem" if memory_s >= math_s else "math"
    return Rates(tflops, gbps, 100.0 * max(memory_s, math_s) / seconds, bound)
