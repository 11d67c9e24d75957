"""Activation memory: what a training step keeps for backward, counted with saved_tensor_bytes.

MSCClassifier's training step on the fused backend keeps at most half the bytes the torch backend keeps, at
the model case ``fastmsc bench`` runs (B=32, T=512, the model's default widths, full-length sequences) in
float32, the CPU training dtype. Saved bytes are counted during the forward (that is when autograd saves), so
only the forward runs.

The fused side at that size is counted in FakeTensorMode: the same ops run on shape-only tensors through
their registered fake implementations, which autograd saves exactly as it saves real tensors. Running the
Triton kernels through the interpreter at B=32, T=512 takes about 25 minutes (it gave the same 197.7 MiB);
the first test checks, on random small shapes and dtypes, that the fake count equals the interpreter's to the
byte. The torch side runs for real: PyTorch's fake implementation of the oneDNN LSTM reports an empty
workspace, which would undercount it.

The fused LSTM layer keeps its backward state in the input dtype: half inputs keep half tensors, with no
float32 copies of the input, the output or the gates.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmsc
from fastmsc.bench import saved_tensor_bytes
from fastmsc.kernels import lstm_layer as fused_lstm
from fastmsc.models import MSCClassifier

MiB = 2**20


def _require_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU measurement runs the Triton kernels through the interpreter, and TRITON_INTERPRET=1 "
                    "is not set (tests/conftest.py sets it only on machines without a GPU)")


def _model(C_in, dtype):
    # Dropout off: its masks are saved too, and the comparison is about what the ops keep.
    return MSCClassifier(C_in, 5, dropout=0.0).to(dtype).train()


def _saved_real(B, C_in, T, dtype, backend):
    model = _model(C_in, dtype)
    with fastmsc.use_backend(backend):
        return saved_tensor_bytes(model, torch.randn(B, C_in, T, dtype=dtype), exclude=model.parameters())


def _saved_fake(B, C_in, T, dtype, backend):
    model = _model(C_in, dtype)
    with FakeTensorMode() as mode, fastmsc.use_backend(backend):
        # The model runs on fake copies of its parameters and buffers, so that excluding the parameters (which
        # live whether or not a backward is pending) works by storage as in the real count.
        state = {name: mode.from_tensor(t) for name, t in model.state_dict(keep_vars=True).items()}
        x = torch.empty(B, C_in, T, dtype=dtype)
        parameters = [state[name] for name, _ in model.named_parameters()]
        assert all(p.requires_grad for p in parameters)
        return saved_tensor_bytes(torch.func.functional_call, model, state, (x,), exclude=parameters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_count_equals_the_interpreter_count(dtype):
    _require_interpreter()
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    # T >= 2: the model's BatchNorm refuses a single value per channel (B = T = 1) in training.
    B, C_in, T = rng.randint(1, 3), rng.randint(1, 3), rng.randint(2, 40)
    torch.manual_seed(seed)
    real = _saved_real(B, C_in, T, dtype, "fused")
    fake = _saved_fake(B, C_in, T, dtype, "fused")
    assert real > 0 and fake == real, f"seed {seed}, B={B} C_in={C_in} T={T} {dtype}: fake {fake}, real {real}"


def test_fused_training_step_saves_at_most_half_of_torch():
    _require_interpreter()
    B, C_in, T = 32, 3, 512
    torch_bytes = _saved_real(B, C_in, T, torch.float32, "torch")
    fused_bytes = _saved_fake(B, C_in, T, torch.float32, "fused")
    print(f"\nMSCClassifier training step, B={B} T={T} float32, saved for backward: torch {torch_bytes / MiB:.1f} MiB, "
          f"fused {fused_bytes / MiB:.1f} MiB ({fused_bytes / torch_bytes:.2f}x)")
    assert fused_bytes > 0
    assert fused_bytes <= 0.5 * torch_bytes, (
        f"fused keeps {fused_bytes / MiB:.1f} MiB, more than half of torch's {torch_bytes / MiB:.1f} MiB")


def _lstm_case(dtype):
    """x (B, T, I) as a transposed view (as the model feeds it) and two directions of weights, H hidden."""
    B, T, n_in, H = 5, 37, 11, 7
    x = torch.randn(T, B, n_in, dtype=dtype).transpose(0, 1).requires_grad_()
    weights = tuple(tuple(torch.randn(shape, dtype=dtype, requires_grad=True)
                          for shape in ((4 * H, n_in), (4 * H, H), (4 * H,), (4 * H,))) for _ in range(2))
    lengths = torch.tensor([T, 1, 20, 36, 9])
    return x, weights, lengths, (B, T, n_in, H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_lstm_keeps_its_backward_state_in_the_input_dtype(dtype):
    """What the fused layer keeps, in bytes of the input dtype: the input, the weights of both directions
    (w_ih concatenated, w_hh stacked: new tensors, the parameters themselves are excluded), the output it
    returns, the activated gates and the cell states; the int64 lengths; and the combined bias b_ih + b_hh
    (D*4H,), float32 for half inputs as the layer adds it unrounded, which only double backward reads."""
    x, weights, lengths, (B, T, n_in, H) = _lstm_case(dtype)
    params = [p for direction in weights for p in direction]
    saved_dtypes = set()

    def record(t):
        saved_dtypes.add(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        fused_lstm.fused(x, weights, None, None, lengths)
    saved = saved_tensor_bytes(fused_lstm.fused, x, weights, None, None, lengths, exclude=params)
    elements = B * T * n_in + 2 * 4 * H * n_in + 2 * 4 * H * H + B * T * 2 * H + B * T * 2 * 4 * H + B * T * 2 * H
    bias_bytes = 2 * 4 * H * torch.float32.itemsize
    assert saved_dtypes == {dtype, torch.float32, torch.int64}, f"saved dtypes {saved_dtypes} for {dtype} inputs"
    assert saved == elements * dtype.itemsize + bias_bytes + lengths.nbytes, (saved, elements, dtype)
