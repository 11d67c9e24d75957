"""Checks specific to the Triton multiscale_conv1d kernels (fastmsc.kernels.multiscale_conv1d): which tiles the
launch heuristics pick, gradients only for what requires them, determinism, empty batches, the ReLU kink, the
reasons a call is declined, and AOT cases for every configuration the heuristics can pick. The forward and every
gradient against the float64 reference (shapes reaching every tile variant among them), opcheck and
torch.compile are in tests/test_op_contract.py.

On CPU the kernels run through the Triton interpreter (tests/conftest.py). Shapes are drawn fresh each run; a
failure prints the seed, and FASTMSC_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import weakref

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
                cfg = kernels._grad_input_config(steps, c_in)
                wanted.append(("_msc_grad_input_kernel", ptr, *(cfg[n] for n in dx_tile[:-1]), precision,
                               *launch(cfg)))
        for block_r in kernels._DW_R_BLOCKS:
            cfg = kernels._grad_weight_config(block_r, precision)
            wanted.append(("_msc_grad_weight_partial_kernel", ptr, *(cfg[n] for n in dw_tile[:-1]), precision,
                           *launch(cfg)))
        missing = [w for w in wanted if w not in compiled]
        assert missing == [], missing


# ---------------------------------------------------------------------------------------------- packing, dW splits


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


def test_pack_cache_hits_while_weights_are_unchanged_and_misses_after_an_in_place_update():
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=3, steps=19, kernel_sizes=(3, 5, 7),
                                      out_channels=(4, 3, 5), bias_pattern="some")
    grad = torch.randn(2, 12, 19, generator=gen).to(DEVICE)
    cache = kernels._PACK_CACHE
    kernels.clear_pack_cache()
    packs = cache.packs
    first = kernels.packed_parameters(weights, biases)
    _assert_matches_reference(x, weights, biases, "gelu", grad, f"first call (seed={seed})")
    _assert_matches_reference(x, weights, biases, "gelu", grad, f"second call (seed={seed})")
    assert cache.packs == packs + 1, "unchanged weights were packed again"
    assert all(a is b for a, b in zip(first, kernels.packed_parameters(weights, biases), strict=True))

    with torch.no_grad():  # what an optimizer step does: an in-place write that bumps the version counter
        weights[1].add_(1.0)
    _assert_matches_reference(x, weights, biases, "gelu", grad, f"after weights[1].add_(1) (seed={seed})")
    assert cache.packs == packs + 2, "an in-place weight update did not invalidate the packed weight"
    present = next(b for b in biases if b is not None)
    present.grad = torch.ones_like(present)
    torch.optim.SGD([present], lr=0.5).step()
    _assert_matches_reference(x, weights, biases, "gelu", grad, f"after a bias update (seed={seed})")
    assert cache.packs == packs + 3, "an in-place bias update did not invalidate the packed bias"
    # A weight replaced by another tensor (same shape, same module slot) is another key.
    weights[0] = weights[0].detach().clone().mul_(0.5).requires_grad_()
    _assert_matches_reference(x, weights, biases, "gelu", grad, f"after replacing weights[0] (seed={seed})")
    assert cache.packs == packs + 4


def test_pack_cache_serves_no_grad_and_inference_mode_but_not_inference_tensors():
    """Parameters called under torch.no_grad() or torch.inference_mode() hit the cache as in training; weights
    made inside inference_mode (no version counter) are packed on every call, never cached."""
    gen = torch.Generator().manual_seed(_seed())
    x = torch.randn(2, 2, 13, generator=gen).to(DEVICE)
    weights = [torch.randn(3, 2, 3, generator=gen).to(DEVICE).requires_grad_(),
               torch.randn(2, 2, 5, generator=gen).to(DEVICE).requires_grad_()]
    expected = multiscale_conv1d_reference(x.double(), [w.detach().double() for w in weights])
    kernels.clear_pack_cache()
    packs = kernels._PACK_CACHE.packs
    for context in (torch.no_grad, torch.inference_mode, torch.no_grad):
        with context(), fastmsc.use_backend("fused"):
            out = fastmsc.multiscale_conv1d(x, weights)
        torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
    assert kernels._PACK_CACHE.packs == packs + 1
    with torch.inference_mode():
        frozen = [w.detach().clone() for w in weights]
        assert all(w.is_inference() for w in frozen)
        for _ in range(2):
            with fastmsc.use_backend("fused"):
                out = fastmsc.multiscale_conv1d(x, frozen)
            torch.testing.assert_close(out.double(), expected, **TOL[torch.float32])
    assert kernels._PACK_CACHE.packs == packs + 1 and len(kernels._PACK_CACHE) == 1


def test_pack_cache_drops_freed_weights():
    """The cache holds weak references only: a freed weight takes its entry and packed copy with it."""
    kernels.clear_pack_cache()
    cache = kernels._PACK_CACHE
    gen = torch.Generator().manual_seed(_seed())
    weights = [torch.randn(4, 3, 3, generator=gen).to(DEVICE), torch.randn(2, 3, 5, generator=gen).to(DEVICE)]
    packed_ref = weakref.ref(kernels.packed_parameters(weights, None)[0])
    assert len(cache) == 1
    del weights[1]
    gc.collect()
    assert len(cache) == 0 and packed_ref() is None, "the cache kept a freed weight's packed copy alive"


def test_pack_cache_never_hits_a_new_tensor_where_a_freed_one_was(monkeypatch):
    """A new tensor can take a freed one's id() and, from the allocator, its address; with the same shape, strides
    and version (0) only the identity check tells them apart. Forged deterministically: a private cache whose
    weakref callbacks do nothing keeps the freed tensor's entry, which is moved under the new tensor's id(); the new
    tensor views the same memory, refilled through ``.data`` (which bumps no version)."""
    gen = torch.Generator().manual_seed(_seed())
    cache = kernels._pack._PackCache(capacity=4)
    monkeypatch.setattr(cache, "_drop", lambda *args: None)
    memory = torch.randn(4 * 3 * 3, generator=gen).to(DEVICE)
    old = memory.view(4, 3, 3)
    cache.get([old], None)
    old_key = next(iter(cache._entries))
    del old
    gc.collect()
    memory.data.copy_(torch.randn(4 * 3 * 3, generator=gen).to(DEVICE))
    new = memory.view(4, 3, 3)
    cache._entries[((id(new),), None)] = cache._entries.pop(old_key)
    packs = cache.packs
    packed = cache.get([new], None)[0]
    assert cache.packs == packs + 1, "a new tensor hit a freed tensor's entry"
    assert torch.equal(packed, new)


def test_pack_cache_is_bounded_and_frees_what_it_evicts_at_once():
    """Past ``capacity`` live weight lists the least recently used entry goes, and its packed copy is freed then,
    not at the next cycle collection (nothing in an entry refers back to it)."""
    kernels.clear_pack_cache()
    alive = [[torch.randn(2, 1, 3, device=DEVICE)] for _ in range(kernels._PACK_CACHE.capacity + 5)]
    gc.disable()
    try:
        first = weakref.ref(kernels.packed_parameters(alive[0], None)[0])
        for weights in alive[1:]:
            kernels.packed_parameters(weights, None)
        assert len(kernels._PACK_CACHE) == kernels._PACK_CACHE.capacity
        assert first() is None, "an evicted packed weight outlived its entry"
    finally:
        gc.enable()


def test_compiled_calls_pack_inline_not_through_the_cache():
    """While torch.compile traces, the packing is torch ops in the graph (no guard on weight versions): the
    cache is never consulted, and an in-place update between compiled calls still changes the result."""
    seed = _seed()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    x, weights, biases = _make_inputs(rng, gen, batch=2, c_in=2, steps=9, kernel_sizes=(3, 5), out_channels=(3, 2),
                                      bias_pattern="all", x_grad=False)
    torch._dynamo.reset()
    kernels.clear_pack_cache()
    packs = kernels._PACK_CACHE.packs

    def layer(x, w0, w1, b0, b1):
        with fastmsc.use_backend("fused"):
            return fastmsc.multiscale_conv1d(x, [w0, w1], [b0, b1])

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    try:
        for step in range(2):
            out = compiled(x, *weights, *biases)
            expected = multiscale_conv1d_reference(x.double(), [w.double() for w in weights],
                                                   [b.double() for b in biases])
            torch.testing.assert_close(out.double(), expected, **TOL[torch.float32], msg=f"step {step} (seed={seed})")
            with torch.no_grad():
                weights[0].mul_(-1.0)
    finally:
        torch._dynamo.reset()
    assert kernels._PACK_CACHE.packs == packs and len(kernels._PACK_CACHE) == 0


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
