"""Checks specific to the Triton multiscale_conv1d kernels (fastmsc.kernels.multiscale_conv1d): which tiles the
launch heuristics pick, gradients only for what requires them, determinism, empty batches, the ReLU kink, the
reasons a call is declined, weights read in place (every write seen, ``.data`` ones included; more than 4
branches), and AOT cases for every configuration the heuristics can pick. The forward and every
gradient against the float64 reference (shapes reaching every tile variant among them), opcheck and
torch.compile are in tests/test_op_contract.py.

On CPU the kernels run through the Triton interpreter (tests/conftest.py). Shapes are drawn fresh each run; a
failure prints the seed, and FASTMSC_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import triton
from _helpers import LAYOUTS, Draw, compare_with_reference
from test_multiscale_conv1d import TOL, build_args, call

import fastmsc
from fastmsc.backend import FusedUnavailable
from fastmsc.ops.multiscale_conv1d import multiscale_conv1d_reference

pytest.importorskip("triton", reason="the fused multiscale_conv1d kernels are Triton kernels; triton is not installed")
kernels = pytest.importorskip("fastmsc.kernels.multiscale_conv1d", reason="the Triton kernel module failed to import")
multiscale_conv1d_aot = pytest.importorskip("fastmsc.kernels.multiscale_conv1d_aot",
                                            reason="the AOT declarations need triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1, so the Triton kernels cannot run here", allow_module_level=True)

def _seed() -> int:
    value = os.environ.get("FASTMSC_TEST_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**31)


def _make_inputs(rng: random.Random, gen: torch.Generator, *, batch, c_in, steps, kernel_sizes, out_channels,
                 bias_pattern="random", dtype=torch.float32, x_transposed=False, weights_noncontiguous=False,
                 x_grad=True):
    """x (batch, c_in, steps) and per-branch weights (C_out_i, c_in, k_i) / biases, leaves of the autograd graph."""
    if x_transposed:  # a (B, T, C) tensor viewed as (B, C, T): strides (T*C, 1, C)
        x = torch.randn(batch, steps, c_in, generator=gen).transpose(1, 2)
    else:
        x = torch.randn(batch, c_in, steps, generator=gen)
    x = x.to(device=DEVICE, dtype=dtype).requires_grad_(x_grad)
    weights = []
    for c_out, k in zip(out_channels, kernel_sizes, strict=True):
        scale = (c_in * k) ** -0.5
        if weights_noncontiguous:  # stored (k, C_in, C_out), viewed as (C_out, C_in, k)
            w = (torch.randn(k, c_in, c_out, generator=gen) * scale).permute(2, 1, 0)
        else:
            w = torch.randn(c_out, c_in, k, generator=gen) * scale
        weights.append(w.to(device=DEVICE, dtype=dtype).requires_grad_())
    pattern = rng.choice(["all", "none", "some"]) if bias_pattern == "random" else bias_pattern
    if pattern == "none":
        biases = None
    else:
        present = [True] * len(weights) if pattern == "all" else [rng.random() < 0.5 for _ in weights]
        if pattern == "some" and len(weights) > 1:
            present[0], present[-1] = True, False  # at least one branch with and one without
        biases = [torch.randn(c, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_() if p else None
                  for c, p in zip(out_channels, present, strict=True)]
    return x, weights, biases


def test_forward_tiles_of_the_edge_cases():
    """The tile cases of tests/test_op_contract.py (CONV_TILE_CASES) reach the variants they name (the interpreter
    asks for 2 programs)."""
    config = kernels._forward_config
    assert config(T=45, r=3 * 7, batch=2, programs_wanted=2)["X_RESIDENT"]
    streamed = config(T=33, r=20 * 7, batch=2, programs_wanted=2)
    assert not streamed["X_RESIDENT"] and streamed["BLOCK_R"] < 20 * 7
    assert config(T=128, r=2 * 7, batch=1, programs_wanted=2)["BLOCK_T"] == 64
    assert config(T=128, r=2 * 7, batch=2, programs_wanted=2)["BLOCK_T"] == 128
    # Model shapes on a 132-SM GPU (264 programs wanted): B=32, T=512 splits time into 32-step tiles.
    assert config(T=512, r=1 * 7, batch=32, programs_wanted=264)["BLOCK_T"] == 32
    for r in (7, 70, 126, 140, 700):
        cfg = config(T=4096, r=r, batch=1, programs_wanted=1)
        assert cfg["BLOCK_R"] * cfg["BLOCK_T"] <= max(kernels._IM2COL_TILE_LIMIT, cfg["BLOCK_R"] * 32)
        assert cfg["X_RESIDENT"] == (r <= cfg["BLOCK_R"])


def test_gradients_only_for_what_requires_them():
    """x and one weight frozen: the other gradients still match the reference, and none appears for those two."""
    draw = Draw()
    case = {"B": 2, "C_in": 3, "T": draw.odd(9, 31), "branches": [(4, 3), (6, 5)], "bias": "all",
            "activation": "gelu", "x_layout": draw.choice(LAYOUTS), "w_layout": "contiguous"}
    args = build_args(draw, case)
    args["x"].grad = args["w1"].grad = False
    compare_with_reference("fused", call(case), args, draw, f"x and w1 frozen {case}", torch.float32, TOL)
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=3, steps=21, kernel_sizes=(3, 5), out_channels=(4, 6),
                                      bias_pattern="all", x_grad=False)
    weights[1].requires_grad_(False)
    with fastmsc.use_backend("fused"):
        out = fastmsc.multiscale_conv1d(x, weights, biases, "gelu")
    out.sum().backward()
    assert x.grad is None and weights[1].grad is None and weights[0].grad is not None


def test_weight_and_bias_gradients_are_bitwise_deterministic():
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    # 3 x 40 steps make 9 (batch, time tile) pairs for dW, which the interpreter splits over 3 partial sums.
    x, weights, biases = _make_inputs(rng, gen, batch=3, c_in=4, steps=40, kernel_sizes=(3, 5, 7),
                                      out_channels=(5, 6, 7), bias_pattern="all")
    grad = torch.randn(3, 18, 40, generator=gen).to(DEVICE)
    runs = []
    for _ in range(2):
        with fastmsc.use_backend("fused"):
            out = fastmsc.multiscale_conv1d(x, weights, biases, "relu")
        runs.append(torch.autograd.grad(out, [x, *weights, *biases], grad))
    for name, first, second in zip(["x"] + [f"weights[{i}]" for i in range(3)] + [f"biases[{i}]" for i in range(3)],
                                   *runs, strict=True):
        assert torch.equal(first, second), f"d{name} differs between two identical backward runs (seed={seed})"


def test_empty_batch_gives_empty_output_and_zero_weight_gradients():
    x = torch.randn(0, 3, 9, device=DEVICE, requires_grad=True)
    weights = [torch.randn(2, 3, 3, device=DEVICE, requires_grad=True)]
    biases = [torch.randn(2, device=DEVICE, requires_grad=True)]
    with fastmsc.use_backend("fused"):
        out = fastmsc.multiscale_conv1d(x, weights, biases, "relu")
    assert out.shape == (0, 2, 9)
    out.sum().backward()
    assert torch.equal(weights[0].grad, torch.zeros_like(weights[0]))
    assert torch.equal(biases[0].grad, torch.zeros_like(biases[0]))


def test_unsupported_arguments_are_explained():
    assert kernels.fused_unsupported("mps") is not None
    x64 = torch.randn(1, 2, 5, dtype=torch.float64, device=DEVICE)
    weights64 = [torch.randn(3, 2, 3, dtype=torch.float64, device=DEVICE)]
    # allow_interpreter: the policy backend 'fused' passes down (Op.select), asked of the kernels directly here.
    with fastmsc.use_backend("fused"):
        reason = kernels.fused_unsupported(DEVICE, allow_interpreter=True, x=x64, weights=weights64, biases=None,
                                           activation=None)
        assert reason is not None and "float64" in reason
        with pytest.raises(FusedUnavailable, match="float64"):
            fastmsc.multiscale_conv1d(x64, weights64)
        x32, weights32 = x64.float(), [w.float() for w in weights64]
        assert kernels.fused_unsupported(DEVICE, allow_interpreter=True, x=x32, weights=weights32, biases=None,
                                         activation="gelu") is None
    # 'auto' on float64 falls back to stock torch with the same result as the reference.
    out = fastmsc.multiscale_conv1d(x64, weights64)
    torch.testing.assert_close(out, multiscale_conv1d_reference(x64, weights64), rtol=1e-12, atol=1e-12)


def test_relu_gradient_at_exact_zero_follows_torch():
    """x = 0 without bias puts every pre-activation exactly at the kink, where torch's ReLU passes no gradient."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(2, 3, 7, device=DEVICE, requires_grad=True)
    weights = [torch.randn(4, 3, k, generator=gen).to(DEVICE).requires_grad_() for k in (3, 5)]
    with fastmsc.use_backend("fused"):
        out = fastmsc.multiscale_conv1d(x, weights, None, "relu")
    (dx,) = torch.autograd.grad(out, [x], torch.randn(out.shape, generator=gen).to(DEVICE))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dx, torch.zeros_like(dx)), f"seed={seed}"


def test_aot_cases_reach_every_configuration_the_heuristics_pick():
    """multiscale_conv1d_aot.aot_cases() records the launches of representative calls; those calls must reach every
    tile the heuristics can return, in every dtype and, for float32, with TF32 and with 3xTF32 products, or a
    configuration would go unchecked (tests/test_op_contract.py checks that the cases are valid and cover every
    kernel)."""
    def config(case, *names):
        constexprs = case["constexprs"]
        ptr = next(kind for kind in case["signature"].values() if kind.startswith("*"))  # x or gz: the dtype
        return (case["kernel"].__name__, ptr, *(constexprs[n] for n in names),
                case["num_warps"], case["num_stages"], case.get("maxnreg"))

    def launch(cfg):
        return cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg")

    tile = ("BLOCK_O", "BLOCK_T", "BLOCK_R", "X_RESIDENT", "DOT_PRECISION")
    dx_tile = ("BLOCK_C", "BLOCK_Q", "BLOCK_T", "DOT_PRECISION")
    dw_tile = ("BLOCK_O", "BLOCK_R", "BLOCK_T", "DOT_PRECISION")
    compiled = set()
    for case in multiscale_conv1d_aot.aot_cases():
        names = {"_msc_forward_kernel": tile, "_msc_preactivation_grad_kernel": tile, "_msc_grad_input_kernel": dx_tile,
                 "_msc_grad_weight_partial_kernel": dw_tile}.get(case["kernel"].__name__)
        if names:
            compiled.add(config(case, *names))
    for ptr, precision in (("*fp32", "tf32"), ("*fp32", "tf32x3"), ("*fp16", "ieee"), ("*bf16", "ieee")):
        wanted = []
        for block_r, resident in [(r, True) for r in kernels._RESIDENT_R_BLOCKS] + [(kernels._STREAMED_R_BLOCK, False)]:
            for block_t in kernels._TIME_BLOCKS:
                if block_t <= kernels._largest_time_block(block_r):
                    cfg = kernels._forward_tile_config(block_r, block_t, resident)
                    for name in ("_msc_forward_kernel", "_msc_preactivation_grad_kernel"):
                        wanted.append((name, ptr, *(cfg[n] for n in tile[:-1]), precision, *launch(cfg)))
        for steps in (150, 1024):
            for c_in in (1, 3, 4, 16, 17, 64):
                cfg = kernels._grad_input_config(steps, c_in, precision)
                wanted.append(("_msc_grad_input_kernel", ptr, *(cfg[n] for n in dx_tile[:-1]), precision,
                               *launch(cfg)))
        for block_r in kernels._DW_R_BLOCKS:
            cfg = kernels._grad_weight_config(block_r, precision)
            wanted.append(("_msc_grad_weight_partial_kernel", ptr, *(cfg[n] for n in dw_tile[:-1]), precision,
                           *launch(cfg)))
        missing = [w for w in wanted if w not in compiled]
        assert missing == [], missing


# ------------------------------------------------------------------------- weights read in place, dW splits


def _float64_grads(x, weights, biases, activation, grad):
    """The reference's output and gradients (x, every weight, every present bias) in float64 on the same values."""
    xd = x.detach().double().requires_grad_()
    wd = [w.detach().double().requires_grad_() for w in weights]
    bd = None if biases is None else [None if b is None else b.detach().double().requires_grad_() for b in biases]
    out = multiscale_conv1d_reference(xd, wd, bd, activation)
    leaves = [xd, *wd, *([] if bd is None else [b for b in bd if b is not None])]
    return out, torch.autograd.grad(out, leaves, grad.double())


def _fused_grads(x, weights, biases, activation, grad):
    with fastmsc.use_backend("fused"):
        out = fastmsc.multiscale_conv1d(x, weights, biases, activation)
    leaves = [x, *weights, *([] if biases is None else [b for b in biases if b is not None])]
    return out, torch.autograd.grad(out, leaves, grad)


def _assert_matches_reference(x, weights, biases, activation, grad, what):
    out, grads = _fused_grads(x, weights, biases, activation, grad)
    ref_out, ref_grads = _float64_grads(x, weights, biases, activation, grad)
    names = ["out", "dx", *(f"dweights[{i}]" for i in range(len(weights)))]
    names += [f"dbias {i}" for i in range(len(grads) + 1 - len(names))]
    for name, got, expected in zip(names, [out, *grads], [ref_out, *ref_grads], strict=True):
        assert got.shape == expected.shape, f"{what}: {name} has shape {tuple(got.shape)}"
        torch.testing.assert_close(got.double(), expected, **TOL[torch.float32], msg=f"{what}: {name}")
    return out, grads


def _assert_forward_matches_reference(x, weights, biases, activation, what):
    """The fused forward against the float64 reference on the current values (NaN where the reference has one)."""
    with fastmsc.use_backend("fused"):
        out = fastmsc.multiscale_conv1d(x, weights, biases, activation)
    expected = multiscale_conv1d_reference(x.detach().double(), [w.detach().double() for w in weights],
                                           None if biases is None else
                                           [None if b is None else b.detach().double() for b in biases], activation)
    torch.testing.assert_close(out.double(), expected, **TOL[torch.float32], equal_nan=True, msg=what)
    return out


def test_writes_through_data_are_seen_by_the_next_call():
    """Writes through ``.data`` bump no version counter (WGAN weight clipping ``p.data.clamp_``, re-initialising
    ``m.weight.data.normal_()`` after a first forward): each must change the next call's output and gradients
    exactly as the float64 reference on the new values says. A copy of the weights kept between calls and checked
    by version (the former pack cache) returned the old output here."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=3, steps=19, kernel_sizes=(3, 5, 7),
                                      out_channels=(4, 3, 5), bias_pattern="some")
    grad = torch.randn(2, 12, 19, generator=gen).to(DEVICE)
    bias = next(b for b in biases if b is not None)
    previous, _ = _assert_matches_reference(x, weights, biases, "gelu", grad, f"first call (seed={seed})")
    writes = {
        "weights[1].data.mul_(2)": lambda: weights[1].data.mul_(2.0),
        "weights[0].data.clamp_(-0.05, 0.05)": lambda: weights[0].data.clamp_(-0.05, 0.05),
        "weights[2].data.copy_(...)": lambda: weights[2].data.copy_(torch.randn(weights[2].shape, generator=gen)),
        "bias.data.add_(1)": lambda: bias.data.add_(1.0),
        "weights[1].data = ...": lambda: setattr(weights[1], "data", torch.randn(weights[1].shape, generator=gen)
                                                 .to(DEVICE)),
        "bias.data = ...": lambda: setattr(bias, "data", torch.randn(bias.shape, generator=gen).to(DEVICE)),
    }
    for what, write in writes.items():
        versions = [t._version for t in (*weights, bias)]
        with torch.no_grad():
            write()
        if ".data =" not in what:  # the case the former cache could not see: no version bumped
            assert [t._version for t in (*weights, bias)] == versions, what
        out, _ = _assert_matches_reference(x, weights, biases, "gelu", grad, f"after {what} (seed={seed})")
        assert not torch.equal(out, previous), f"{what} did not change the output (seed={seed})"
        previous = out


def test_in_place_updates_under_no_grad_are_seen():
    """An optimizer-like ``add_`` under no_grad, on a weight and on a bias, between calls in grad mode, no_grad and
    inference_mode."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=2, steps=13, kernel_sizes=(3, 5), out_channels=(3, 2),
                                      bias_pattern="all")
    grad = torch.randn(2, 5, 13, generator=gen).to(DEVICE)
    for step, context in enumerate((torch.no_grad, torch.inference_mode, torch.no_grad)):
        with torch.no_grad():
            weights[step % 2].add_(torch.randn(weights[step % 2].shape, generator=gen).to(DEVICE))
            biases[step % 2].add_(1.0)
        with context():
            _assert_forward_matches_reference(x, weights, biases, None, f"{context.__name__} step {step} (seed={seed})")
        _assert_matches_reference(x, weights, biases, "relu", grad, f"grad mode step {step} (seed={seed})")


def test_module_weights_reinitialised_through_data_after_a_first_forward():
    """nn.MultiScaleConv1d: ``m.branches[i].weight.data.normal_()`` and a bias through ``.data`` after a call."""
    torch.manual_seed(_seed())
    m = fastmsc.nn.MultiScaleConv1d(3, (4, 2), kernel_sizes=(3, 5)).to(DEVICE)
    x = torch.randn(2, 3, 11, device=DEVICE)
    weights = [b.weight for b in m.branches]
    biases = [b.bias for b in m.branches]
    with fastmsc.use_backend("fused"):
        before = m(x)
        m.branches[0].weight.data.normal_()
        m.branches[1].bias.data.fill_(3.0)
        after = m(x)
    expected = multiscale_conv1d_reference(x.double(), [w.detach().double() for w in weights],
                                           [b.detach().double() for b in biases])
    torch.testing.assert_close(after.double(), expected, **TOL[torch.float32])
    assert not torch.equal(before, after)


@pytest.mark.parametrize("bias_pattern", ("all", "some", "none"))
def test_more_branches_than_the_kernels_read_in_place(bias_pattern):
    """5 branches (k = 1, 3, 5, 7, 9) go through the per-call flat concatenation: forward and every gradient against
    float64, then again after a write through ``.data`` (packed afresh on every call, never stale)."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    assert kernels.MAX_BRANCHES == 4
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=3, steps=17, kernel_sizes=(1, 3, 5, 7, 9),
                                      out_channels=(2, 3, 1, 4, 2), bias_pattern=bias_pattern, x_transposed=True)
    grad = torch.randn(2, 12, 17, generator=gen).to(DEVICE)
    for activation in (None, "gelu"):
        _, grads = _assert_matches_reference(x, weights, biases, activation, grad, f"{activation} (seed={seed})")
        for w, g in zip(weights, grads[1:6], strict=True):
            assert g.shape == w.shape and g.is_contiguous()
    weights[3].data.mul_(-2.0)
    _assert_matches_reference(x, weights, biases, "relu", grad, f"after weights[3].data.mul_ (seed={seed})")


def test_more_branches_keep_non_finite_inputs_within_each_receptive_field():
    """The flat path reads each channel's own taps only, as the in-place one: a NaN in x reaches branch i's output
    within k_i // 2 steps of it and no further."""
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(1, 2, 21, generator=gen).to(DEVICE)
    x[0, 1, 10] = float("nan")
    weights = [torch.randn(2, 2, k, generator=gen).to(DEVICE) for k in (1, 3, 5, 7, 9)]
    out = _assert_forward_matches_reference(x, weights, None, None, "NaN input")
    for i, k in enumerate((1, 3, 5, 7, 9)):
        nan_steps = torch.isnan(out[0, 2 * i]).nonzero().flatten().tolist()
        assert nan_steps == list(range(10 - k // 2, 11 + k // 2)), (k, nan_steps)


def test_compiled_calls_see_in_place_updates():
    """Under torch.compile the op reads the weights in place as in eager mode: an in-place update between compiled
    calls, or one through ``.data``, changes the result."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=2, steps=9, kernel_sizes=(3, 5), out_channels=(3, 2),
                                      bias_pattern="all", x_grad=False)
    torch._dynamo.reset()

    def layer(x, w0, w1, b0, b1):
        with fastmsc.use_backend("fused"):
            return fastmsc.multiscale_conv1d(x, [w0, w1], [b0, b1])

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    try:
        for step in range(3):
            out = compiled(x, *weights, *biases)
            expected = multiscale_conv1d_reference(x.double(), [w.double() for w in weights],
                                                   [b.double() for b in biases])
            torch.testing.assert_close(out.double(), expected, **TOL[torch.float32], msg=f"step {step} (seed={seed})")
            with torch.no_grad():
                weights[0].mul_(-1.0)
            biases[1].data.add_(1.0)
    finally:
        torch._dynamo.reset()


def test_gradients_reach_every_branch_of_odd_shapes():
    """Branches of kernel sizes 1, 9 and 3 with odd widths, biases on some, x a transposed view: every branch's
    weight gradient (handed out as a slice of the one packed dW) and every bias gradient against float64."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=3, c_in=5, steps=23, kernel_sizes=(1, 9, 3),
                                      out_channels=(3, 7, 5), bias_pattern="some", x_transposed=True,
                                      weights_noncontiguous=True)
    biases = [biases[0], None, biases[2]] if biases is not None else None
    grad = torch.randn(3, 15, 23, generator=gen).to(DEVICE)
    for activation in (None, "relu"):
        _, grads = _assert_matches_reference(x, weights, biases, activation, grad, f"{activation} (seed={seed})")
        for w, g in zip(weights, grads[1:4], strict=True):
            assert g.shape == w.shape and g.is_contiguous()


def test_grad_weight_splits_stay_within_16_to_32():
    """16 to 32 splits, fewer only with fewer (batch, time tile) pairs, whose ranges cover every pair exactly once
    and none empty."""
    for n_bt in (1, 7, 15, 16, 17, 21, 33, 100, 1000, 1024, 4097):
        for tiles in (1, 3, 12):
            for programs in (4, 432, 528, 10000):
                splits = kernels._grad_weight_splits(n_bt, tiles, programs)
                assert min(n_bt, kernels._MIN_SPLITS) <= splits <= kernels._MAX_SPLITS, (n_bt, tiles, programs)
                per_split, longer = divmod(n_bt, splits)  # the kernel's ranges
                sizes = [per_split + (s < longer) for s in range(splits)]
                assert sum(sizes) == n_bt and min(sizes) >= 1


@pytest.mark.parametrize("allow_tf32", (True, False), ids=("tf32", "tf32x3"))
def test_weight_gradients_over_uneven_splits_are_right_and_bitwise_reproducible(allow_tf32):
    """7 x 150 steps make 21 (batch, time tile) pairs of the TF32 config's 64-step dW tiles over 16 splits (five of
    2 pairs, then eleven of 1), and 35 pairs of the 3xTF32 config's 32-step tiles over 32 splits."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=7, c_in=3, steps=150, kernel_sizes=(3, 5, 7),
                                      out_channels=(4, 5, 3), bias_pattern="all")
    grad = torch.randn(7, 12, 150, generator=gen).to(DEVICE)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=allow_tf32):
        cfg = kernels._grad_weight_config(3 * 7, kernels._conv_precision(torch.float32))
        n_bt = 7 * triton.cdiv(150, cfg["BLOCK_T"])
        splits = kernels._grad_weight_splits(n_bt, 1, kernels._parallel_programs(torch.device(DEVICE)))
        assert n_bt % splits != 0, (n_bt, splits)
        _, first = _assert_matches_reference(x, weights, biases, None, grad, f"seed={seed}")
        _, second = _fused_grads(x, weights, biases, None, grad)
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"gradient {i} differs between two identical backward runs (seed={seed})"


def test_fp32_products_follow_torchs_convolution_tf32_flag():
    """torch.backends.cudnn.allow_tf32 (what nn.Conv1d follows) picks TF32, else 3xTF32; the matmul flag does not
    matter; half types use their own products."""
    try:
        for cudnn_flag, matmul_flag in itertools.product((False, True), repeat=2):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_flag, matmul_flag
            assert kernels._conv_precision(torch.float32) == ("tf32" if cudnn_flag else "tf32x3")
            assert kernels._conv_precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
