"""Benchmark cases and their input factories, in one place for ``fastmsc bench`` and the ``bench/`` suite.

A :class:`Case` names an op (a key of ``fastmsc.backend.OPS``, or ``"model"`` for MSCClassifier's
training step) and its dimensions. :func:`make_op_inputs` turns an op case into the keyword arguments
of the op's implementations (``reference``, ``torch``, ``fused`` share one signature: the validated
arguments of the public op); :func:`make_model` and :func:`make_model_batch` do the same for the model.

Default shapes follow MSCClassifier's defaults: batch 32, in_channels 3, conv 3 branches x 64 channels
(kernels 3/5/7) -> 192 LSTM inputs, LSTM hidden 128 bidirectional -> attention dim 256 -> pooling over
256 channels; T in {150, 512}, plus 2048 on CUDA, where pooling also gets an input of 2^29 elements
(LARGE_POOL_SHAPE: at least 1 GiB, far beyond L2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..backend import OPS
from ..models import MSCClassifier

MODEL = "model"
BATCH = 32
KERNEL_SIZES = (3, 5, 7)
IN_CHANNELS = 3
CONV_CHANNELS = 64
LSTM_HIDDEN = 128
NUM_CLASSES = 10
CPU_LENGTHS = (150, 512)
CUDA_LENGTHS = (150, 512, 2048)
# (B, T, I, H), bidirectional: short/long/very long sequences and a tiny one where launch overhead dominates.
EXTRA_LSTM_SHAPES = ((32, 150, 192, 128), (64, 512, 96, 64), (8, 1000, 64, 64), (32, 24, 32, 32))
# The LSTM grid (fastmsc bench --lstm-grid): where the persistent kernel, the stepwise path and cuDNN trade places, as
# batch, sequence length and hidden size grow; bidirectional, fed by the model's 3 x 64 conv channels.
LSTM_GRID = tuple((b, t, len(KERNEL_SIZES) * CONV_CHANNELS, h) for b in (8, 32, 64) for t in (150, 512, 1000)
                  for h in (64, 128, 256))
# Pooling on CUDA is also measured far beyond the L2 cache (60 MB on an H200): 2^29 elements, 2 GiB in
# float32 and 1 GiB in bfloat16, so its GB/s is HBM bandwidth, not cache bandwidth.
LARGE_POOL_SHAPE = (512, 4096, 256)  # (B, T, C)

OP_MODES = ("fwd", "fwd+bwd")  # fwd: inference under no_grad; fwd+bwd: forward then backward of every output
MODEL_MODES = ("train step",)  # forward + cross-entropy + backward + AdamW step


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``op`` and its named dimensions, e.g. ``Case("attention", (("B", 32), ...))``."""

    op: str
    dims: tuple[tuple[str, int], ...]

    def __getitem__(self, name: str) -> int:
        return dict(self.dims)[name]

    @property
    def batch(self) -> int:
        return self["B"]

    @property
    def steps(self) -> int:
        return self["T"]

    @property
    def shape(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.dims)

    def with_batch(self, batch: int) -> Case:
        return replace(self, dims=tuple((n, batch if n == "B" else v) for n, v in self.dims))


def _case(op: str, **dims: int) -> Case:
    return Case(op, tuple(dims.items()))


QUICK_CASES = {
    # Tiny but awkward (odd, non-power-of-two) sizes: the whole quick run stays well under a minute.
    "multiscale_conv1d": [_case("multiscale_conv1d", B=3, C_in=2, T=37, C_out=5)],
    "lstm_layer": [_case("lstm_layer", B=3, T=13, I=6, H=5)],
    "attention": [_case("attention", B=3, T=19, E=12)],
    "max_avg_pool": [_case("max_avg_pool", B=3, T=23, C=10)],
    MODEL: [_case(MODEL, B=4, C_in=IN_CHANNELS, T=29, C_conv=4, H=6, F=16, classes=3)],
}


def default_cases(op: str, *, quick: bool, device_type: str) -> list[Case]:
    """The cases ``fastmsc bench`` runs for ``op`` (an OPS name or ``"model"``)."""
    if quick:
        return list(QUICK_CASES[op])
    lengths = CUDA_LENGTHS if device_type == "cuda" else CPU_LENGTHS
    conv_out = len(KERNEL_SIZES) * CONV_CHANNELS
    if op == "multiscale_conv1d":
        return [_case(op, B=BATCH, C_in=IN_CHANNELS, T=t, C_out=CONV_CHANNELS) for t in lengths]
    if op == "lstm_layer":
        shapes = [(BATCH, t, conv_out, LSTM_HIDDEN) for t in lengths]
        shapes += [s for s in EXTRA_LSTM_SHAPES if s not in shapes]
        return [_case(op, B=b, T=t, I=i, H=h) for b, t, i, h in shapes]
    if op == "attention":
        return [_case(op, B=BATCH, T=t, E=2 * LSTM_HIDDEN) for t in lengths]
    if op == "max_avg_pool":
        cases = [_case(op, B=BATCH, T=t, C=2 * LSTM_HIDDEN) for t in lengths]
        if device_type == "cuda":
            b, t, c = LARGE_POOL_SHAPE
            cases.append(_case(op, B=b, T=t, C=c))
        return cases
    if op == MODEL:
        return [_case(op, B=BATCH, C_in=IN_CHANNELS, T=t, C_conv=CONV_CHANNELS, H=LSTM_HIDDEN, F=128,
                      classes=NUM_CLASSES) for t in lengths]
    raise ValueError(f"unknown benchmark op {op!r}; valid ops are {', '.join(all_ops())}")


def lstm_grid_cases() -> list[Case]:
    """lstm_layer on :data:`LSTM_GRID`: B in {8, 32, 64} x T in {150, 512, 1000} x H in {64, 128, 256}."""
    return [_case("lstm_layer", B=b, T=t, I=i, H=h) for b, t, i, h in LSTM_GRID]


def all_ops() -> tuple[str, ...]:
    """Every op registered in fastmsc.backend.OPS, then ``"model"``."""
    return (*OPS, MODEL)


def modes_for(op: str) -> tuple[str, ...]:
    return MODEL_MODES if op == MODEL else OP_MODES


@dataclass
class OpInputs:
    """Keyword arguments for an op's implementations; ``input_names`` are the data arguments, every other
    floating-point tensor in ``kwargs`` is a parameter (left out of saved-activation counts)."""

    kwargs: dict
    input_names: frozenset[str] = field(default_factory=frozenset)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every floating-point tensor in ``kwargs``, named by its path (``weights[1][0]``), in a fixed order."""
        found = []

        def walk(path, value):
            if isinstance(value, torch.Tensor):
                if value.is_floating_point():
                    found.append((path, value))
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    walk(f"{path}[{i}]", item)

        for name, value in self.kwargs.items():
            walk(name, value)
        return found

    def leaves(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors a backward pass differentiates: inputs and parameters that require grad."""
        return [(n, t) for n, t in self.named_tensors() if t.requires_grad]

    def params(self) -> list[torch.Tensor]:
        return [t for n, t in self.named_tensors() if n.split("[")[0] not in self.input_names]

    def converted(self, dtype: torch.dtype) -> OpInputs:
        """Detached copies in ``dtype`` (exact when widening), keeping each tensor's requires_grad."""

        def convert(value):
            if isinstance(value, torch.Tensor):
                if not value.is_floating_point():
                    return value
                return value.detach().to(dtype).requires_grad_(value.requires_grad)
            if isinstance(value, (list, tuple)):
                return type(value)(convert(v) for v in value)
            return value

        return OpInputs({k: convert(v) for k, v in self.kwargs.items()}, self.input_names)


def _uniform(shape, bound, device, dtype):
    return torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound)


def _conv_inputs(case, device, dtype):
    """x (B, C_in, T); per kernel size k: weight (C_out, C_in, k) and bias (C_out,), nn.Conv1d's init."""
    c_in, c_out = case["C_in"], case["C_out"]
    x = torch.randn(case.batch, c_in, case.steps, device=device, dtype=dtype)
    bounds = [1.0 / math.sqrt(c_in * k) for k in KERNEL_SIZES]
    weights = [_uniform((c_out, c_in, k), b, device, dtype) for k, b in zip(KERNEL_SIZES, bounds, strict=True)]
    biases = [_uniform((c_out,), b, device, dtype) for b in bounds]
    return {"x": x, "weights": weights, "biases": biases, "activation": None}, {"x"}


def _lstm_inputs(case, device, dtype):
    """x (B, T, I); two directions of (w_ih (4H, I), w_hh (4H, H), b_ih (4H,), b_hh (4H,)), nn.LSTM's init."""
    i_size, hidden = case["I"], case["H"]
    x = torch.randn(case.batch, case.steps, i_size, device=device, dtype=dtype)
    bound = 1.0 / math.sqrt(hidden)
    weights = tuple(
        (_uniform((4 * hidden, i_size), bound, device, dtype), _uniform((4 * hidden, hidden), bound, device, dtype),
         _uniform((4 * hidden,), bound, device, dtype), _uniform((4 * hidden,), bound, device, dtype))
        for _ in range(2)
    )
    return {"x": x, "weights": weights, "h0": None, "c0": None, "lengths": None}, {"x"}


def _attention_inputs(case, device, dtype):
    """q, k, v (B, T, E) (one head, as in MSCClassifier); scale 1/sqrt(E)."""
    shape = (case.batch, case.steps, case["E"])
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    return {"q": q, "k": k, "v": v, "lengths": None, "scale": 1.0 / math.sqrt(case["E"])}, {"q", "k", "v"}


def _pool_inputs(case, device, dtype):
    """x (B, T, C)."""
    return {"x": torch.randn(case.batch, case.steps, case["C"], device=device, dtype=dtype), "lengths": None}, {"x"}


INPUT_FACTORIES = {
    "multiscale_conv1d": _conv_inputs,
    "lstm_layer": _lstm_inputs,
    "attention": _attention_inputs,
    "max_avg_pool": _pool_inputs,
}


def make_op_inputs(case: Case, device, dtype: torch.dtype, requires_grad: bool) -> OpInputs:
    """Fresh random inputs for an op case (draws from torch's global RNG: seed it to reproduce)."""
    factory = INPUT_FACTORIES.get(case.op)
    if factory is None:
        raise ValueError(f"no input factory for op {case.op!r}; add one to fastmsc.bench.cases.INPUT_FACTORIES "
                         f"(known: {', '.join(INPUT_FACTORIES)})")
    with torch.no_grad():
        kwargs, input_names = factory(case, torch.device(device), dtype)
    inputs = OpInputs(kwargs, frozenset(input_names))
    if requires_grad:
        for _, t in inputs.named_tensors():
            t.requires_grad_(True)
    return inputs


def make_model(case: Case, device, dtype: torch.dtype) -> MSCClassifier:
    """MSCClassifier with the case's sizes (random init from torch's global RNG), in train mode."""
    model = MSCClassifier(case["C_in"], case["classes"], conv_channels=case["C_conv"], kernel_sizes=KERNEL_SIZES,
                          lstm_hidden=case["H"], classifier_hidden=case["F"])
    return model.to(device=device, dtype=dtype).train()


def make_model_batch(case: Case, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C_in, T) and integer labels y (B,)."""
    x = torch.randn(case.batch, case["C_in"], case.steps, device=device, dtype=dtype)
    y = torch.randint(case["classes"], (case.batch,), device=device)
    return x, y
