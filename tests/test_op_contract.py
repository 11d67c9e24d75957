"""The contract every op of fastmsc.backend.OPS keeps, checked the same way for each:

* the float64 reference agrees with an independent oracle (stock PyTorch, or the definition written out);
* every backend (torch, fused, auto; the reference too in half precision) agrees with the float64 reference
  on the outputs and every gradient, in float64, float32, float16 and bfloat16, under ONE tolerance table per op;
* the custom ops pass torch.library.opcheck, and the public op compiles with fullgraph=True to the same values;
* ``auto`` never picks the Triton interpreter (a CPU run of a Triton op takes torch), and info() says what it picks;
* the AOT cases of a Triton op are valid and compile every entry kernel in every dtype.

Shapes, layouts and lengths come from the per-op test modules (``draw_case``/``build_args``), which keep what is
specific to one op; each draw is fresh (tests/_helpers.py ``Draw``) and a failure prints its seed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import test_attention
import test_lstm_layer
import test_max_avg_pool
import test_multiscale_conv1d
import torch
from _helpers import Arg, Draw, assert_close, compare_with_reference, describe, require_fused

import fastmsc
from fastmsc.backend import OPS
from fastmsc.tools import aot, aot_cases


def aot_module(op: str):
    """fastmsc.kernels.<op>_aot, which declares the compilations of the op's Triton kernels, or None for an op
    without Triton kernels (the LSTM's fused path is the compiled extension)."""
    name = f"fastmsc.kernels.{op}_aot"
    return importlib.import_module(name) if name in aot.kernel_modules() else None


# ---------------------------------------------------------------------------------------------------------------
# One case of an op: the call, its arguments (float64 values, layouts), a description, and the op's tolerance
# table where the case itself widens it (attention's score scale).


@dataclass
class Case:
    fn: Callable
    args: dict[str, Arg | None]
    what: str
    tol: dict[torch.dtype, dict] | None = None


def _conv_case(draw: Draw, regime: str) -> Case:
    t = test_multiscale_conv1d
    case = CONV_TILE_CASES[regime](draw) if regime in CONV_TILE_CASES else t.draw_case(draw, regime)
    return Case(t.call(case), t.build_args(draw, case), f"{regime} {case}")


def _conv_tile(B, C_in, T, branches, activation, x_layout="contiguous", w_layout="contiguous", bias="all"):
    return lambda draw: {"B": B, "C_in": C_in, "T": T, "branches": branches, "bias": bias, "activation": activation,
                         "x_layout": x_layout, "w_layout": w_layout}


# Shapes that reach the fused conv kernels' tile variants (see test_forward_tiles_of_the_edge_cases).
CONV_TILE_CASES = {
    # T = 1: every tap but the centre reads padding; C_in = 1: tl.dot pads the (channel, tap) reduction.
    "tile_t1_cin1": _conv_tile(2, 1, 1, [(3, 3), (4, 5), (2, 7)], "gelu"),
    # C_in >= 8 takes the tl.dot path of dx; odd T spans two 32-step tiles; strided x and weights.
    "tile_cin17_strided": _conv_tile(2, 17, 37, [(10, 3), (9, 5), (8, 7)], "relu", "transposed", "sliced", "some"),
    # C_in = 1 over several time tiles, one bias-less branch of two, more taps than steps.
    "tile_cin1_taps_exceed_t": _conv_tile(3, 1, 5, [(7, 9), (10, 3)], None, bias="some"),
    # 75 output channels: the forward programs loop over two 64-channel blocks reusing one im2col tile.
    "tile_cout75_two_blocks": _conv_tile(2, 3, 45, [(25, 3), (30, 5), (20, 7)], "gelu"),
    # C_in * K_max = 140 > 128: the im2col tile is streamed in 32-row chunks for every output block.
    "tile_cin20_streamed": _conv_tile(2, 20, 33, [(30, 3), (20, 5), (25, 7)], "gelu", "offset"),
    # One sample of 128 steps: the time tile halves to 64 so that two programs share the work.
    "tile_t128_tile64": _conv_tile(1, 2, 128, [(4, 3), (3, 5), (5, 7)], "relu", "swap01"),
}


def _lstm_case(draw: Draw, regime: str) -> Case:
    t = test_lstm_layer
    base, proj = regime.removesuffix("+proj"), regime.endswith("+proj")
    case = t.draw_case(draw, "mixed_lengths" if base == "half" else base, proj=proj)
    if base == "half":
        case["T"] = min(case["T"], 16)  # rounding in half types grows with every step
    args, lengths = t.build_args(draw, case)
    return Case(t.call(case, lengths), args, describe(regime, case, lengths))


def _attention_case(draw: Draw, regime: str) -> Case:
    t = test_attention
    if regime in ATTENTION_KERNEL_CASES:
        case = ATTENTION_KERNEL_CASES[regime](draw)
    else:
        case = t.draw_case(draw, "heads_odd_time_mixed_lengths" if regime == "half" else regime)
    args, lengths = t.build_args(draw, case)
    return Case(t.call(case, lengths), args, describe(regime, case, lengths), t.tolerance(case))


def _attention_kernel_case(B, heads, T, D, lengths, scale=None):
    def make(draw: Draw) -> dict:
        pick = lambda v: v(draw) if callable(v) else v  # noqa: E731
        return {"B": pick(B), "T": pick(T), "heads": pick(heads), "D": pick(D), "lengths": pick(lengths),
                "scale": pick(scale), "layouts": [draw.choice(test_attention.LAYOUTS) for _ in range(3)]}
    return make


# Shapes that reach the fused attention kernels' block and column-strip variants.
ATTENTION_KERNEL_CASES = {
    "kernel_time1": _attention_kernel_case(lambda d: d.int(1, 2), lambda d: d.choice((None, 2)), 1,
                                           lambda d: d.choice((16, 24)), lambda d: d.choice((None, "ones"))),
    # T past one 64-key block and not a multiple of 16, 32 or 64.
    "kernel_several_key_blocks_d16": _attention_kernel_case(2, lambda d: d.choice((None, 2)),
                                                            lambda d: d.choice((65, 67, 69, 70)), 16,
                                                            lambda d: d.choice((None, "mixed"))),
    "kernel_d64_lengths_scale": _attention_kernel_case(lambda d: d.int(1, 2), lambda d: d.choice((None, 2)),
                                                       lambda d: d.int(17, 47), 64, "mixed",
                                                       lambda d: d.choice((0.05, -0.2, 1.3))),
    # D padded to BLOCK_D = 16 with masked loads.
    "kernel_small_odd_d": _attention_kernel_case(2, None, lambda d: d.int(2, 33), lambda d: d.choice((1, 5, 8, 13)),
                                                 lambda d: d.choice((None, "mixed"))),
    # Head dims past 64: fp32 sums the D-long products over column strips in every kernel.
    "kernel_d96_padded_strips": _attention_kernel_case(2, lambda d: d.int(2, 3), lambda d: d.choice((1, 37)), 96,
                                                       "mixed"),
    "kernel_d128_odd_time": _attention_kernel_case(2, lambda d: d.choice((None, 2)), 37, 128, "mixed"),
    "kernel_d256_time1": _attention_kernel_case(lambda d: d.int(1, 2), lambda d: d.choice((None, 2)), 1, 256,
                                                lambda d: d.choice((None, "ones"))),
    "kernel_d256_odd_time_scale": _attention_kernel_case(2, 2, lambda d: d.choice((19, 37)), 256, "mixed",
                                                         lambda d: d.choice((None, 0.02))),
    # Half inputs over several key blocks, and the default MSCClassifier head (D = 256) with few steps.
    "half_long": _attention_kernel_case(2, lambda d: d.choice((None, 2)), lambda d: d.int(20, 70),
                                        lambda d: d.choice((16, 24, 64)), "mixed"),
    "half_d256": _attention_kernel_case(1, lambda d: d.choice((None, 2)), lambda d: d.int(1, 3), 256,
                                        lambda d: d.choice((None, "mixed"))),
}


def _pool_case(draw: Draw, regime: str) -> Case:
    t = test_max_avg_pool
    case = t.draw_case(draw, "mixed_lengths_ties" if regime == "half" else regime)
    if regime == "several_time_blocks_ties":  # T over two 32-step blocks, lengths inside each block
        case.update(B=draw.int(3, 4), T=draw.int(65, 70), C=draw.int(1, 20), lengths="mixed", ties=True)
    elif regime == "odd_time_many_channels":  # C over one channel block and not a multiple of it
        case.update(B=2, T=draw.odd(3, 35), C=draw.choice((33, 65, 67, 70)))
    elif regime == "half_long":  # half inputs over several time blocks
        case.update(B=draw.int(2, 4), T=draw.int(20, 70), C=draw.int(1, 40), lengths="mixed")
    lengths = draw.lengths(case["B"], case["T"], case["lengths"])
    args = {"x": Arg(t.draw_values(draw, case, lengths), case["layout"])}
    return Case(t.pool_with(lengths), args, describe(regime, case, lengths))


# ---------------------------------------------------------------------------------------------------------------
# The regimes each dtype runs, and the op's one tolerance table (``TOL`` of its test module, which says why).


@dataclass(frozen=True)
class Spec:
    case: Callable[[Draw, str], Case]
    regimes: tuple[str, ...]  # float64 (the fused Triton ops decline float64 and are checked in float32)
    float32_regimes: tuple[str, ...]
    half_regimes: tuple[str, ...]
    tol: dict[torch.dtype, dict]


SPECS = {
    "multiscale_conv1d": Spec(
        _conv_case, test_multiscale_conv1d.REGIMES, ("random", "cin1_odd_time", *CONV_TILE_CASES), ("random",),
        test_multiscale_conv1d.TOL),
    "lstm_layer": Spec(
        _lstm_case, (*test_lstm_layer.REGIMES, *(f"{r}+proj" for r in test_lstm_layer.REGIMES)),
        ("mixed_lengths", "random", "mixed_lengths+proj", "random+proj"), ("half", "half+proj"),
        test_lstm_layer.TOL),
    "attention": Spec(
        _attention_case, test_attention.REGIMES,
        ("heads_odd_time_mixed_lengths", "random", *(r for r in ATTENTION_KERNEL_CASES if r.startswith("kernel_"))),
        ("half", "half_long", "half_d256"), test_attention.TOL),
    "max_avg_pool": Spec(
        _pool_case, test_max_avg_pool.REGIMES,
        ("mixed_lengths_ties", "random", "several_time_blocks_ties", "odd_time_many_channels"), ("half", "half_long"),
        test_max_avg_pool.TOL),
}

DTYPES = {"float64": torch.float64, "float32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def test_every_registered_op_has_a_contract():
    assert sorted(SPECS) == sorted(OPS)


# The reference in float64 is the oracle itself, checked against an independent one below; in half types it
# upcasts, so its rounding of the inputs and outputs is checked too.
BACKEND_DTYPES = [(b, d) for b in ("torch", "fused", "auto") for d in DTYPES] + [("reference", "fp16"),
                                                                                  ("reference", "bf16")]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=[f"{b}-{d}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("op", sorted(SPECS))
def test_backend_matches_float64_reference(op, backend, dtype):
    """Outputs and the gradient of every input for a random cotangent, on every regime of the op."""
    if backend == "fused":
        require_fused(op)
    spec, draw = SPECS[op], Draw()
    regimes = {"float64": spec.regimes, "float32": spec.float32_regimes}.get(dtype, spec.half_regimes)
    for regime in regimes:
        case = spec.case(draw, regime)
        compare_with_reference(backend, case.fn, case.args, draw, case.what, DTYPES[dtype], case.tol or spec.tol)


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference against an independent oracle: each per-op module writes its op's definition out
# (check_reference_against_oracle), so a reference that drifts from the definition fails here.

ORACLES = {
    "multiscale_conv1d": test_multiscale_conv1d.check_reference_against_oracle,
    "lstm_layer": test_lstm_layer.check_reference_against_oracle,
    "attention": test_attention.check_reference_against_oracle,
    "max_avg_pool": test_max_avg_pool.check_reference_against_oracle,
}


@pytest.mark.parametrize("backend", ("reference", "torch"))
@pytest.mark.parametrize("op", sorted(SPECS))
def test_reference_matches_independent_oracle(op, backend):
    assert sorted(ORACLES) == sorted(OPS)
    ORACLES[op](backend, Draw())


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: schema, fake (meta) kernels against the real outputs, autograd registration.


def _opcheck_conv(draw: Draw) -> None:
    kernels = importlib.import_module("fastmsc.kernels.multiscale_conv1d")
    T = draw.int(2, 13)
    x = draw.randn(2, 3, T).float().requires_grad_()
    weights = [draw.randn(4, 3, 3).float().requires_grad_(), draw.randn(2, 3, 5).float().requires_grad_()]
    biases = [draw.randn(4).float().requires_grad_()]
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    grad = draw.randn(2, 6, T).float()
    # 2 branches read in place, 5 through the per-call flat concatenation
    assert len(weights) <= kernels.MAX_BRANCHES < len(weights) + 3
    for extra in ([], [draw.randn(1, 3, k).float().requires_grad_() for k in (1, 7, 9)]):
        ws, has_bias = weights + extra, [True, False] + [False] * len(extra)
        torch.library.opcheck(torch.ops.fastmsc.multiscale_conv1d_branches.default,
                              (x, ws, biases, has_bias, "gelu"), test_utils=utils)
        g = torch.cat([grad, draw.randn(2, len(extra), T).float()], dim=1)
        torch.library.opcheck(torch.ops.fastmsc.multiscale_conv1d_branches_backward.default,
                              (g, x.detach(), [w.detach() for w in ws], [biases[0].detach()], has_bias, "gelu", True,
                               True, True), test_utils=("test_schema", "test_faketensor"))


def _opcheck_lstm(draw: Draw) -> None:
    importlib.import_module("fastmsc.kernels.lstm_layer")._ensure_registered()
    B, T, n_in, H, D = 3, draw.int(2, 6), draw.int(1, 4), draw.int(1, 5), 2
    x = draw.randn(B, T, n_in)
    w_ih, w_hh, bias = draw.randn(D * 4 * H, n_in), draw.randn(D, 4 * H, H), draw.randn(D * 4 * H)
    h0, c0 = draw.randn(D, B, H), draw.randn(D, B, H)
    lengths = torch.tensor([T, 1, max(1, T - 1)])
    utils = ("test_schema", "test_faketensor")
    for training in (False, True):
        torch.library.opcheck(torch.ops.fastmsc.lstm_fwd.default, (x, w_ih, w_hh, bias, h0, c0, lengths, training),
                              test_utils=utils)
    out, h_n, c_n, gates, cells = torch.ops.fastmsc.lstm_fwd(x, w_ih, w_hh, bias, h0, c0, lengths, True)
    grads = (draw.randn(*out.shape), draw.randn(*h_n.shape), draw.randn(*c_n.shape))
    for need in ((True, True, True), (False, True, False)):  # gradients not asked for come back empty
        torch.library.opcheck(torch.ops.fastmsc.lstm_bwd.default,
                              (*grads, x, w_ih, w_hh, True, h0, c0, lengths, out, gates, cells, *need),
                              test_utils=utils)
    if not torch.ops.fastmsc.lstm_cpu_bf16():
        return
    # The bf16 layers' ops (traced in compiled bf16 training), x batch-first and time-major (a transposed view, as
    # nn.LSTM's default layout hands it over): their outputs and dx follow its order, and the fakes must say so.
    for x_given in (x, x.transpose(0, 1).contiguous().transpose(0, 1)):
        half = [t.to(torch.bfloat16) for t in (x_given, w_ih, w_hh, h0, c0)]
        for training in (False, True):
            torch.library.opcheck(torch.ops.fastmsc.lstm_fwd_bf16.default,
                                  (*half[:3], bias.float(), *half[3:], lengths, training), test_utils=utils)
        saved = torch.ops.fastmsc.lstm_fwd_bf16(*half[:3], bias.float(), *half[3:], lengths, True)
        for need in ((True, True, True), (False, True, False)):
            torch.library.opcheck(torch.ops.fastmsc.lstm_bwd_bf16.default,
                                  (*(g.to(torch.bfloat16) for g in grads), *half[:3], True, *half[3:], lengths,
                                   *saved[:1], *saved[3:], *need), test_utils=utils)


def _opcheck_attention(draw: Draw) -> None:
    kernels = importlib.import_module("fastmsc.kernels.attention")
    T = draw.int(2, 9)
    q, k, v = (draw.randn(2, 2, T, 16).float().requires_grad_() for _ in range(3))
    lengths = torch.tensor([1, T])
    torch.library.opcheck(kernels.attention_forward, (q, k, v, lengths, 0.25))
    torch.library.opcheck(kernels.attention_forward, (q[:, 0], k[:, 0].transpose(0, 1).contiguous()
                                                      .transpose(0, 1), v[:, 0], None, -0.5))
    out, lse = kernels.attention_forward(q, k, v, lengths, 0.25)
    grad_out = draw.randn(*out.shape).float()
    torch.library.opcheck(kernels.attention_backward,
                          (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, lengths, 0.25))


def _opcheck_pool(draw: Draw) -> None:
    kernels = importlib.import_module("fastmsc.kernels.max_avg_pool")
    T, C = draw.int(2, 9), draw.int(1, 7)
    x = draw.randn(3, T, C).float().requires_grad_()
    lengths = torch.tensor([1, T, max(1, T - 1)])
    torch.library.opcheck(kernels.max_avg_pool_forward, (x, lengths))
    torch.library.opcheck(kernels.max_avg_pool_forward, (x.detach().transpose(1, 2).contiguous().transpose(1, 2)
                                                         .requires_grad_(), None))
    out, index = kernels.max_avg_pool_forward(x, lengths)
    grad = draw.randn(3, 2 * C).float()
    torch.library.opcheck(kernels.max_avg_pool_backward, (grad, index, lengths, T))


OPCHECKS = {"multiscale_conv1d": _opcheck_conv, "lstm_layer": _opcheck_lstm, "attention": _opcheck_attention,
            "max_avg_pool": _opcheck_pool}


@pytest.mark.parametrize("op", sorted(SPECS))
def test_custom_ops_pass_opcheck(op):
    assert sorted(OPCHECKS) == sorted(OPS)
    require_fused(op)
    with fastmsc.use_backend("fused"):
        OPCHECKS[op](Draw())


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break through argument checks, packing and the custom ops; aot_eager
# traces the autograd graph with fake tensors (the backward op too) without needing a C++ or GPU compiler.


@pytest.mark.parametrize("op", sorted(SPECS))
def test_compiles_fullgraph_to_the_eager_values(op):
    require_fused(op)
    spec, draw = SPECS[op], Draw()
    case = spec.case(draw, spec.float32_regimes[0])
    leaves, views = {}, {}
    for name, arg in case.args.items():
        if arg is None:
            views[name] = None
        else:
            leaves[name], views[name] = arg.materialize(torch.float32)
    wanted = [leaf for leaf in leaves.values() if leaf.requires_grad]

    def loss(**views):
        outs = case.fn(**views)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return sum((o * (i + 1.5)).square().sum() for i, o in enumerate(outs))

    with fastmsc.use_backend("fused"):
        expected = loss(**views)
        expected_grads = torch.autograd.grad(expected, wanted)
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = compiled(**views)
        grads = torch.autograd.grad(got, wanted)
    assert_close(got, expected, f"compiled loss {case.what} {draw.tag()}", rtol=0, atol=0)
    for i, (g, e) in enumerate(zip(grads, expected_grads, strict=True)):
        assert_close(g, e, f"compiled gradient {i} {case.what} {draw.tag()}", rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# What ``auto`` runs: never the Triton interpreter (slower than torch by orders of magnitude); the compiled LSTM
# extension on CPU; and info() reports the same choice.


def _is_triton_op(op: str) -> bool:
    """Whether the op's fused path on CPU is Triton's interpreter only (the LSTM's is the compiled extension, its
    Triton kernel being a CUDA path)."""
    return aot_module(op) is not None and OPS[op].why_not_fused("cpu", allow_interpreter=False) is not None


@pytest.mark.parametrize("dtype", ("float32", "float64", "bf16"))
@pytest.mark.parametrize("op", sorted(SPECS))
def test_auto_never_runs_the_interpreter(op, dtype, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton kernels are compiled, not interpreted; test_cuda.py covers auto there")
    require_fused(op)
    impl = OPS[op]
    ran = []
    for name in ("fused", "torch"):
        real = getattr(impl, name)
        monkeypatch.setattr(impl, name, lambda *a, _real=real, _name=name, **k: (ran.append(_name), _real(*a, **k))[1])
    draw = Draw()
    case = SPECS[op].case(draw, "random")
    views = {n: None if a is None else a.materialize(DTYPES[dtype])[1] for n, a in case.args.items()}
    with fastmsc.use_backend("auto"):
        case.fn(**views)
    want = "torch" if _is_triton_op(op) else "fused"
    assert ran == [want], f"auto ran {ran} for {case.what} in {dtype}, want {want} [{draw.tag()}]"
    row = fastmsc.info()["ops"][op]["cpu"]
    assert row["auto"] == want, row
    if want == "torch":
        assert "interpreter" in row["fused_unavailable"], row
    else:
        assert row["fused_unavailable"] is None and row["dispatch"] == [], row


# ---------------------------------------------------------------------------------------------------------------
# AOT compilation cases: valid, and every entry kernel compiled in every dtype the op takes.


@pytest.mark.parametrize("op", sorted(SPECS))
def test_aot_cases_cover_every_kernel_in_every_dtype(op):
    require_fused(op)
    declared = aot_module(op)
    if declared is None:
        kernels = importlib.import_module(f"fastmsc.kernels.{op}")
        assert aot_cases.entry_kernels(kernels) == {}, f"{kernels.__name__} defines Triton kernels but no AOT cases"
        return
    cases = declared.aot_cases()
    assert cases, f"{declared.__name__} lists no AOT cases"
    for case in cases:
        aot_cases.validate_case(case)
    assert aot_cases.uncovered_kernels(declared.KERNELS, cases) == []
    seen = set()
    for case in cases:
        kernel = case["kernel"] if isinstance(case["kernel"], str) else aot_cases.unwrap_kernel(case["kernel"]).__name__
        seen.update((kernel, kind) for kind in case["signature"].values() if isinstance(kind, str))
    missing = [(kernel, kind) for kernel in aot_cases.entry_kernels(declared.KERNELS)
               for kind in ("*fp32", "*fp16", "*bf16") if (kernel, kind) not in seen]
    assert missing == [], f"kernels never compiled for a dtype: {missing}"
