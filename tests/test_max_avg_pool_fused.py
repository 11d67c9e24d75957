"""The Triton max + average pooling kernels specifically (fastmsc.kernels.max_avg_pool): output dtypes, what
autograd saves (int32 indices, not x), NaN and -inf inputs, zero lengths and the float64 refusal. The forward and
gradient against the float64 reference (several time blocks, many channels, ties among the shapes), opcheck,
torch.compile, auto's choice and the AOT cases are in tests/test_op_contract.py. Without a GPU the kernels run
in the Triton interpreter (tests/conftest.py) with poisoned outputs."""

from __future__ import annotations

import pytest
import torch
from _helpers import Draw, assert_close, require_fused
from test_max_avg_pool import TOL

import fastmsc
from fastmsc.backend import FusedUnavailable
from fastmsc.kernels._common import poison_enabled
from fastmsc.ops.max_avg_pool import max_avg_pool_reference

kernels = pytest.importorskip("fastmsc.kernels.max_avg_pool", reason="the fused pooling module needs triton")
max_avg_pool_aot = pytest.importorskip("fastmsc.kernels.max_avg_pool_aot", reason="the AOT declarations need triton")

@pytest.fixture(autouse=True)
def _fused_pool():
    require_fused("max_avg_pool")
    assert poison_enabled(), "tests/conftest.py must set FASTMSC_POISON=1 so unwritten outputs show up as NaN"


def test_outputs_keep_the_input_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 5, dtype=dtype)
        with fastmsc.use_backend("fused"):
            out = fastmsc.max_avg_pool(x)
        assert out.dtype == dtype and out.shape == (2, 10) and out.is_contiguous()


def test_autograd_saves_int32_indices_not_the_input():
    draw = Draw()
    B, T, C = 2, draw.int(3, 30), draw.int(1, 20)
    x = draw.randn(B, T, C).float().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    lengths = torch.tensor([1, T])
    with fastmsc.use_backend("fused"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastmsc.max_avg_pool(x, lengths)
    found = [(tuple(t.shape), t.dtype) for t in saved]
    assert [t for t in saved if t.dtype == torch.int32 and t.shape == (B, C)], f"no int32 (B, C) index saved: {found}"
    assert not [t for t in saved if t.is_floating_point()], f"floating-point tensors saved for backward: {found}"
    indices = next(t for t in saved if t.dtype == torch.int32)
    assert torch.equal(indices[0], torch.zeros(C, dtype=torch.int32)), "length 1: the max can only be step 0"
    assert torch.equal(indices[1].long(), x[1].detach().argmax(0)), f"first maximal steps differ [{draw.tag()}]"
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_nan_follows_torch_max_and_routes_the_gradient_to_the_first_nan():
    """Documented NaN behaviour: a NaN among a channel's valid steps makes its max and mean NaN, and the max
    gradient goes to the first NaN step (as torch.max); NaN past the length is ignored."""
    draw = Draw()
    B, T, C = 2, draw.int(6, 40), draw.int(3, 9)
    x = draw.randn(B, T, C).float()
    first, second = sorted(draw.rng.sample(range(T - 1), 2))
    x[0, first, 1] = x[0, second, 1] = float("nan")
    x[1, T - 1, 2] = float("nan")  # past the length of batch 1
    lengths = torch.tensor([T, T - 1])
    x.requires_grad_()
    with fastmsc.use_backend("fused"):
        out = fastmsc.max_avg_pool(x, lengths)
    what = f"T={T} C={C} NaN at steps {first}, {second} {draw.tag()}"
    assert torch.isnan(out[0, 1]) and torch.isnan(out[0, C + 1]), f"the NaN channel's max and mean: {what}"
    assert torch.isfinite(out[1]).all(), f"a NaN past the length leaked into the output: {what}"
    grad_out = draw.randn(B, 2 * C).float()
    (dx,) = torch.autograd.grad(out, x, grad_out)
    expected_col = torch.full((T,), float(grad_out[0, C + 1]) / T)
    expected_col[first] += grad_out[0, 1]
    assert_close(dx[0, :, 1], expected_col, f"NaN channel gradient {what}", rtol=1e-6, atol=1e-6)
    # Every other channel matches the torch backend (torch.max semantics).
    x_clean = x.detach().clone().requires_grad_()
    with fastmsc.use_backend("torch"):
        ref = fastmsc.max_avg_pool(x_clean, lengths)
    (ref_dx,) = torch.autograd.grad(ref, x_clean, grad_out)
    keep = torch.ones(C, dtype=torch.bool)
    keep[1] = False
    assert_close(out[1], ref[1], f"batch 1 {what}", rtol=1e-6, atol=1e-6)
    assert_close(dx[0][:, keep], ref_dx[0][:, keep], f"batch 0 clean channels {what}", rtol=1e-6, atol=1e-6)
    assert_close(dx[1], ref_dx[1], f"batch 1 gradient {what}", rtol=1e-6, atol=1e-6)


def test_all_minus_infinity_channel_picks_its_first_valid_step():
    """A channel whose valid steps are all -inf has max -inf, its max gradient at its first step, mean -inf."""
    draw = Draw()
    T = draw.int(3, 40)
    x = torch.full((1, T, 2), float("-inf"))
    x[0, :, 1] = draw.randn(T).float()
    x[0, T - 1, 0] = 5.0  # past the length: must not be the max
    lengths = torch.tensor([T - 1])
    x.requires_grad_()
    with fastmsc.use_backend("fused"):
        out = fastmsc.max_avg_pool(x, lengths)
    x64 = x.detach().double().requires_grad_()
    ref = max_avg_pool_reference(x64, lengths)
    grad_out = draw.randn(1, 4).float()
    (dx,) = torch.autograd.grad(out, x, grad_out)
    (ref_dx,) = torch.autograd.grad(ref, x64, grad_out.double())
    what = f"-inf channel T={T} {draw.tag()}"
    assert_close(out.double(), ref, f"output {what}", **TOL[torch.float32])
    assert_close(dx.double(), ref_dx, f"gradient {what}", **TOL[torch.float32])
    assert out[0, 0] == float("-inf") and dx[0, 0, 0] == grad_out[0, 0] + grad_out[0, 2] / (T - 1)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the interpreter's 0/0
def test_zero_length_gives_no_max_gradient_and_no_crash():
    """Lengths of 0 are refused by fastmsc.max_avg_pool but can reach the kernels under torch.compile: max -inf,
    index -1, mean NaN (an empty mean, as torch), and a zero gradient."""
    x = torch.randn(2, 5, 3, requires_grad=True)
    with fastmsc.use_backend("fused"):
        out, index = kernels.max_avg_pool_forward(x, torch.tensor([0, 5]))
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.all(out[0, :3] == float("-inf")) and torch.isnan(out[0, 3:]).all()
    assert torch.all(index[0] == -1)
    assert torch.all(dx[0] == 0) and torch.isfinite(dx).all()


def test_float64_is_refused_with_the_reason():
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    with fastmsc.use_backend("fused"), pytest.raises(FusedUnavailable, match="float64"):
        fastmsc.max_avg_pool(x)
    with fastmsc.use_backend("auto"):
        assert fastmsc.max_avg_pool(x).dtype == torch.float64


def test_splits_of_t_combine_in_order():
    """The forward splits T across programs (pass 1) and folds the splits in order (pass 2): a maximum tied across
    splits goes to the earlier step, a NaN in a later split wins over a finite maximum in an earlier one, the first
    NaN wins over later ones, lengths that end inside a split count only their steps, and an all -inf channel
    gets its first valid step."""
    draw = Draw()
    B, T, C = 3, 150, 5
    splits, split_steps = kernels._splits(B, T, kernels._FWD_BLOCKS[torch.float32][1])
    assert splits >= 3, "the shape must span several splits"
    x = draw.randn(B, T, C).float()
    x[0, 10, 0] = x[0, 10 + split_steps, 0] = 50.0  # a tie across splits: the earlier step wins
    x[0, 5, 1] = 60.0
    x[0, T - 1, 1] = float("nan")  # a NaN in the last split beats the finite maximum of the first
    x[1, split_steps + 3, 2] = float("nan")
    x[1, 2 * split_steps + 1, 2] = float("nan")  # the first NaN (in the second split) takes the max gradient
    x[2, :, 3] = float("-inf")
    lengths = torch.tensor([T, T, split_steps + 7])
    x[2, split_steps + 7:, 4] = 1e6  # past the length: never read
    x.requires_grad_()
    with fastmsc.use_backend("fused"):
        out = fastmsc.max_avg_pool(x, lengths)
    expected = max_avg_pool_reference(x.detach().double(), lengths)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    g = torch.randn(B, 2 * C)
    (dx,) = torch.autograd.grad(out, x, g)
    xd = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(max_avg_pool_reference(xd, lengths), xd, g.double())
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-6, atol=1e-6)
    assert dx[0, 10, 0] == g[0, 0] + g[0, C] / T and dx[0, 10 + split_steps, 0] == g[0, C] / T
    assert dx[1, split_steps + 3, 2] != dx[1, 2 * split_steps + 1, 2]
