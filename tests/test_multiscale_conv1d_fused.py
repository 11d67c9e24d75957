"""Checks specific to the Triton multiscale_conv1d kernels (fastmsc.kernels.multiscale_conv1d).

Every check runs the public op with backend 'fused' forced (on CPU through the Triton interpreter, which
tests/conftest.py selects) and compares the forward and every gradient with the float64 reference on
upcast copies of the same inputs. Shapes are drawn fresh each run; a failure prints the seed, and
FASTMSC_TEST_SEED=<seed> replays it.

Tolerances are bounds, not guesses. The kernels multiply exactly-representable inputs and accumulate in
fp32, so an n-term dot product is off by at most about n * u32 * sum_k |a_k b_k| (u32 = 2**-24; see
Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3). sum_k |a_k b_k| is computed per output
element by running the float64 reference on |x|, |w|, |b| and back-propagating |grad| times the largest
slope of the activation. We allow 8x that bound, plus, for half-precision inputs, two roundings of the
half type (the stored output / the stored pre-activation gradient; see CONVERSION_ERROR). A wrong tap,
channel, time shift or missing term moves an element by about one average term, sum |a b| / n, far above
n * u32 * sum |a b|.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

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

U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Error of one conversion of an fp32 value to the half type: the unit roundoff on the GPU (round to nearest),
# but the Triton interpreter converts fp32 to bf16 by truncation (toward zero), which is off by up to one ulp.
CONVERSION_ERROR = {**UNIT_ROUNDOFF, torch.bfloat16: 2.0**-8 * (2 if DEVICE == "cpu" else 1)}
MAX_SLOPE = {None: 1.0, "relu": 1.0, "gelu": 1.13}  # max of d/dz z * Phi(z) is 1.1289 at z = sqrt(2)
MAX_CURVATURE = {None: 0.0, "relu": 0.0, "gelu": 0.8}  # max |gelu''(z)| = 2 phi(0) = 0.798


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


def _leaves(x, weights, biases):
    named = [("x", x)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
    named += [(f"biases[{i}]", b) for i, b in enumerate(biases or []) if b is not None]
    return [(name, t) for name, t in named if t.requires_grad]


def _float64_copies(x, weights, biases, transform=lambda t: t):
    def copy(t):
        return None if t is None else transform(t.detach().double()).requires_grad_(t.requires_grad)
    return copy(x), [copy(w) for w in weights], None if biases is None else [copy(b) for b in biases]


def _check_against_reference(x, weights, biases, activation, *, seed, what):
    """Fused forward and every gradient vs the float64 reference, within the bounds of the module docstring."""
    context = f"seed={seed} ({what}; x {tuple(x.shape)} {x.dtype}, activation={activation!r})"
    dtype = x.dtype
    c_in, steps, batch = x.shape[1], x.shape[2], x.shape[0]
    k_max = max(w.shape[-1] for w in weights)
    c_total = sum(w.shape[0] for w in weights)
    half_roundoff = 0.0 if dtype == torch.float32 else CONVERSION_ERROR[dtype]

    # Magnitude bounds in float64: sum |w||x| + |b| per output element; its max feeds the error of z.
    ax, aws, abs_ = _float64_copies(x, weights, biases, torch.abs)
    forward_bound = multiscale_conv1d_reference(ax, aws, abs_, None).detach()
    n_forward = c_in * k_max
    z_error = 8 * n_forward * U32 * forward_bound

    x64, ws64, bs64 = _float64_copies(x, weights, biases)
    z64 = multiscale_conv1d_reference(x64.detach(), [w.detach() for w in ws64],
                                      None if bs64 is None else [None if b is None else b.detach() for b in bs64], None)
    grad_gen = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(z64.shape, dtype=torch.float64, generator=grad_gen).to(device=DEVICE, dtype=dtype).double()
    if activation == "relu":
        # Where |z| is within the forward's rounding bound fp32 may legitimately take the other side of the kink;
        # the gradient there is not a continuous function of the inputs, so it is not compared.
        grad = torch.where(z64.abs() <= z_error, torch.zeros_like(grad), grad)

    with fastmsc.use_backend("fused"):
        out = fastmsc.multiscale_conv1d(x, weights, biases, activation)
    expected = multiscale_conv1d_reference(x64, ws64, bs64, activation)
    assert out.shape == expected.shape and out.dtype == dtype, context
    _assert_within(out, expected, (8 * n_forward * U32 + 2 * half_roundoff) * forward_bound, f"output, {context}")

    leaves = _leaves(x, weights, biases)
    if not leaves:
        return
    grads = torch.autograd.grad(out, [t for _, t in leaves], grad.to(dtype))
    leaves64 = _leaves(x64, ws64, bs64)
    expected_grads = torch.autograd.grad(expected, [t for _, t in leaves64], grad)
    # sum |W||gz|, sum |gz||x|, sum |gz|: the reference without activation, backward of |grad| * max slope.
    ax, aws, abs_ = _float64_copies(x, weights, biases, torch.abs)
    abs_leaves = _leaves(ax, aws, abs_)
    grad_bounds = torch.autograd.grad(multiscale_conv1d_reference(ax, aws, abs_, None), [t for _, t in abs_leaves],
                                      grad.abs() * MAX_SLOPE[activation])
    # An error dz in z moves gz = grad * act'(z) by up to |grad| * max|act''| * dz.
    z_scale = MAX_CURVATURE[activation] * float(forward_bound.max()) if forward_bound.numel() else 0.0
    for (name, _), got, want, bound in zip(leaves, grads, expected_grads, grad_bounds, strict=True):
        n_backward = c_total * k_max if name == "x" else batch * steps
        terms = 8 * (n_backward + n_forward * max(1.0, z_scale)) * U32 + 3 * half_roundoff
        assert got.shape == want.shape and got.dtype == dtype, f"d{name}: {context}"
        _assert_within(got, want, terms * bound, f"d{name}, {context}")


def _assert_within(actual, expected, tolerance, what):
    actual = actual.detach().double()
    expected = expected.detach()
    tolerance = tolerance.detach() + 1e-30  # elements whose every term is zero must come out exactly zero
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element left unwritten?)"
    error = (actual - expected).abs()
    bad = error > tolerance
    if bad.any():
        worst = int((error / tolerance).flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        raise AssertionError(f"{what}: {int(bad.sum())} of {error.numel()} elements off; worst at {index}: "
                             f"got {actual[index].item():.8g}, expected {expected[index].item():.8g}, "
                             f"allowed {tolerance[index].item():.3g}")


def _random_shape(rng: random.Random, kernel_sizes):
    return {
        "batch": rng.randint(1, 3),
        "c_in": rng.choice([1, rng.randint(2, 20)]),
        "steps": rng.choice([1, rng.randint(2, 40)]),
        "kernel_sizes": kernel_sizes,
        "out_channels": [rng.randint(1, 10) for _ in kernel_sizes],
    }


@pytest.mark.parametrize(("kernel_sizes", "activation"), [
    ((3, 5, 7), None), ((3, 5, 7), "relu"), ((3, 5, 7), "gelu"), ((1,), "relu"), ((3, 9), "gelu"), ((7, 3), None),
], ids=["357-none", "357-relu", "357-gelu", "1-relu", "39-gelu", "73-none"])
def test_random_shapes_match_reference(kernel_sizes, activation):
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shape = _random_shape(rng, kernel_sizes)
    x, weights, biases = _make_inputs(rng, gen, **shape, x_transposed=rng.random() < 0.3,
                                      weights_noncontiguous=rng.random() < 0.3)
    _check_against_reference(x, weights, biases, activation, seed=seed, what=f"random {shape}")


@pytest.mark.parametrize(("case", "activation"), [
    # T = 1: every tap but the centre reads padding; C_in = 1: tl.dot pads the (channel, tap) reduction.
    ({"batch": 2, "c_in": 1, "steps": 1, "kernel_sizes": (3, 5, 7), "out_channels": (3, 4, 2)}, "gelu"),
    # C_in >= 8 takes the tl.dot path of dx; odd T spans two 32-step tiles; transposed x and weights.
    ({"batch": 2, "c_in": 17, "steps": 37, "kernel_sizes": (3, 5, 7), "out_channels": (10, 9, 8),
      "x_transposed": True, "weights_noncontiguous": True, "bias_pattern": "some"}, "relu"),
    # C_in = 1 over several time tiles, one bias-less branch of two, more taps than steps.
    ({"batch": 3, "c_in": 1, "steps": 5, "kernel_sizes": (9, 3), "out_channels": (7, 10), "bias_pattern": "some"},
     None),
    # 75 output channels: the forward programs loop over two 64-channel blocks reusing one im2col tile.
    ({"batch": 2, "c_in": 3, "steps": 45, "kernel_sizes": (3, 5, 7), "out_channels": (25, 30, 20)}, "gelu"),
    # C_in * K_max = 140 > 128: the im2col tile is streamed in 32-row chunks for every output block.
    ({"batch": 2, "c_in": 20, "steps": 33, "kernel_sizes": (3, 5, 7), "out_channels": (30, 20, 25)}, "gelu"),
    # One sample of 128 steps: the time tile halves to 64 so that two programs share the work.
    ({"batch": 1, "c_in": 2, "steps": 128, "kernel_sizes": (3, 5, 7), "out_channels": (4, 3, 5)}, "relu"),
], ids=["T1-Cin1", "Cin17-strided", "Cin1-taps-exceed-T", "Cout75-two-blocks", "Cin20-streamed", "T128-tile64"])
def test_edge_shapes_match_reference(case, activation):
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, **case)
    _check_against_reference(x, weights, biases, activation, seed=seed, what=f"edge case {case}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_match_upcast_reference(dtype):
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shape = _random_shape(rng, (3, 5, 7))
    x, weights, biases = _make_inputs(rng, gen, **shape, dtype=dtype, bias_pattern="all")
    _check_against_reference(x, weights, biases, "gelu", seed=seed, what=f"{dtype} {shape}")


def test_forward_tiles_of_the_edge_cases():
    """The edge cases above reach the tile variants they name (the interpreter asks for 2 programs)."""
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
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=3, steps=21, kernel_sizes=(3, 5), out_channels=(4, 6),
                                      bias_pattern="all", x_grad=False)
    weights[1].requires_grad_(False)
    _check_against_reference(x, weights, biases, "gelu", seed=seed, what="x and weights[1] frozen")
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


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration, as torch.compile relies on them."""
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(2, 3, 11, generator=gen).to(DEVICE).requires_grad_()
    weight, bias = kernels.pack_weights([torch.randn(4, 3, 3, generator=gen), torch.randn(2, 3, 5, generator=gen)],
                                        [torch.randn(4, generator=gen), None])
    weight, bias = weight.to(DEVICE).requires_grad_(), bias.to(DEVICE).requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    with fastmsc.use_backend("fused"):
        torch.library.opcheck(torch.ops.fastmsc.multiscale_conv1d_packed.default, (x, weight, bias, "gelu"),
                              test_utils=utils)
        grad = torch.randn(2, 6, 11, generator=gen).to(DEVICE)
        torch.library.opcheck(torch.ops.fastmsc.multiscale_conv1d_packed_backward.default,
                              (grad, x.detach(), weight.detach(), bias.detach(), "gelu", True, True, True),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_through_packing_and_custom_op():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 13, generator=gen).to(DEVICE).requires_grad_()
    weights = [torch.randn(c, 3, k, generator=gen).to(DEVICE).requires_grad_() for c, k in ((3, 3), (2, 7))]
    biases = [None, torch.randn(2, generator=gen).to(DEVICE).requires_grad_()]

    def layer(x, weights, biases):
        return fastmsc.multiscale_conv1d(x, weights, biases, "gelu")

    with fastmsc.use_backend("fused"):
        eager = layer(x, weights, biases)
        eager_grads = torch.autograd.grad(eager.square().sum(), [x, *weights, biases[1]])
        # aot_eager traces the autograd graph (fake tensors, the backward op) without needing a GPU compiler.
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
        out = compiled(x, weights, biases)
        grads = torch.autograd.grad(out.square().sum(), [x, *weights, biases[1]])
    assert torch.equal(out, eager), f"seed={seed}"
    for got, want in zip(grads, eager_grads, strict=True):
        assert torch.equal(got, want), f"seed={seed}"


def test_unsupported_arguments_are_explained():
    assert kernels.fused_unsupported("mps") is not None
    x64 = torch.randn(1, 2, 5, dtype=torch.float64, device=DEVICE)
    weights64 = [torch.randn(3, 2, 3, dtype=torch.float64, device=DEVICE)]
    with fastmsc.use_backend("fused"):
        reason = kernels.fused_unsupported(DEVICE, x=x64, weights=weights64, biases=None, activation=None)
        assert reason is not None and "float64" in reason
        with pytest.raises(FusedUnavailable, match="float64"):
            fastmsc.multiscale_conv1d(x64, weights64)
        x32, weights32 = x64.float(), [w.float() for w in weights64]
        assert kernels.fused_unsupported(DEVICE, x=x32, weights=weights32, biases=None, activation="gelu") is None
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
    """multiscale_conv1d_aot.aot_cases() records the launches of representative calls
    (fastmsc.tools.aot_cases.record_launches); those calls
    must reach every tile the heuristics can return, in every dtype, or a configuration would go unchecked."""
    def config(case, *names):
        constexprs = case["constexprs"]
        ptr = next(kind for kind in case["signature"].values() if kind.startswith("*"))  # x or gz: the dtype
        return (case["kernel"].__name__, ptr, *(constexprs[n] for n in names),
                case["num_warps"], case["num_stages"])

    tile = ("BLOCK_O", "BLOCK_T", "BLOCK_R", "X_RESIDENT", "DOT_PRECISION")
    dx_tile = ("BLOCK_C", "BLOCK_Q", "BLOCK_T", "USE_DOT", "DOT_PRECISION")
    dw_tile = ("BLOCK_O", "BLOCK_R", "BLOCK_T", "DOT_PRECISION")
    compiled = set()
    for case in multiscale_conv1d_aot.aot_cases():
        names = {"_msc_forward_kernel": tile, "_msc_preactivation_grad_kernel": tile, "_msc_grad_input_kernel": dx_tile,
                 "_msc_grad_weight_partial_kernel": dw_tile}.get(case["kernel"].__name__)
        if names:
            compiled.add(config(case, *names))
    for ptr, dtype in (("*fp32", torch.float32), ("*fp16", torch.float16), ("*bf16", torch.bfloat16)):
        wanted = []
        for block_r, resident in [(r, True) for r in kernels._RESIDENT_R_BLOCKS] + [(kernels._STREAMED_R_BLOCK, False)]:
            for block_t in kernels._TIME_BLOCKS:
                if block_t <= kernels._largest_time_block(block_r):
                    cfg = kernels._forward_tile_config(block_r, block_t, resident)
                    for name in ("_msc_forward_kernel", "_msc_preactivation_grad_kernel"):
                        wanted.append((name, ptr, *(cfg[n] for n in tile[:-1]), "ieee", cfg["num_warps"],
                                       cfg["num_stages"]))
        for steps in (150, 1024):
            for c_in in (1, 3, 4, 16, 17, 64):
                cfg = kernels._grad_input_config(steps, c_in, tensor_cores=dtype != torch.float32)
                wanted.append(("_msc_grad_input_kernel", ptr, *(cfg[n] for n in dx_tile[:-1]), "ieee",
                               cfg["num_warps"], cfg["num_stages"]))
        for block_r in kernels._DW_R_BLOCKS:
            cfg = kernels._grad_weight_config(block_r)
            wanted.append(("_msc_grad_weight_partial_kernel", ptr, *(cfg[n] for n in dw_tile[:-1]), "ieee",
                           cfg["num_warps"], cfg["num_stages"]))
        missing = [w for w in wanted if w not in compiled]
        assert missing == [], missing
    # TF32 (torch.backends.cuda.matmul.allow_tf32) runs other code: its largest tiles are compiled too.
    assert {name for name, ptr, *rest in compiled if "tf32" in rest} == {
        "_msc_forward_kernel", "_msc_preactivation_grad_kernel", "_msc_grad_input_kernel",
        "_msc_grad_weight_partial_kernel"}
