"""Fused multi-scale "same" Conv1d + concat in Triton: forward in one kernel, backward in two to four.

Shapes: x (B, C_in, T); weights[i] (C_out_i, C_in, k_i) with odd k_i; biases[i] (C_out_i,) or None;
output (B, C_total, T) with C_total = sum_i C_out_i, branch i in channels [sum_{j<i} C_out_j, ...).

Design
------
* No packing, no cache: the kernels read the branch weights where they are. Every branch is a K_max "same" conv
  in the kernels' view (packed tap j of a k_o-tap channel o is its own tap j - (K_max - k_o) // 2, a zero padding
  tap otherwise), but that view is built by the loads, not in memory: the kernels take up to MAX_BRANCHES = 4
  branch weight pointers (each branch's own contiguous (C_out_i, C_in, k_i) tensor, ``w.contiguous()``, no copy
  for parameters), NUM_BRANCHES as a constexpr, and per branch its first channel first_i and kernel size k_i as
  runtime ints. The output-channel blocks (forward, z recomputation) and the (channel, tap) chunks (dx) run branch
  after branch and never span two branches, so a block's branch is one scalar (compares of the block index with
  the branches' block counts) and its weight pointer, k_i and bias pointer are scalar selects (``tl.where``);
  channel o's weights start (o - first_i) * C_in * k_i into the branch's tensor, and the padding taps are masked
  loads (other=0). That costs a partial block per branch whose width is no multiple of the block (none for the
  model's 64-channel branches); a per-channel select of 64-bit pointers, or one masked load per branch, cost
  registers enough to spill. Biases likewise: up to 4 bias pointers and a bit mask of the branches that have
  one, no launch (a ``torch.cat`` of the present biases and zeros would cost one or two launches per call for
  C_total values). The dW scatter selects per element (first_i, k_i and the branch's start start_i in the flat
  dW). So every write to a weight or bias is seen by the next call, whether it bumps the version counter or not
  (``p.data.clamp_``, ``m.weight.data.normal_()``, ``.data =``), in grad mode, no_grad, inference_mode, under
  torch.compile (the op is opaque and reads its inputs at run time) and torch.jit.trace alike: no copy of a
  weight outlives a call. The former pack cache, keyed by each weight's identity and ``_version``, returned a
  stale packed weight after a write through ``.data``; re-packing with torch ops on every call cost about five
  launches.

  - More than MAX_BRANCHES branches: ``pack_weights`` concatenates the weights flat per call (one ``torch.cat``,
    in the order of the flat dW) and the biases into one (C_total,) vector (another, plus a zeros fill per absent
    bias), and an int32 (2, C_total) ``branch_layout`` (row 0 each channel's k_o, row 1 where its (C_in, k_o) block
    starts in the flat weights and dW) is copied from pinned host memory without blocking (a pageable copy would
    wait for the stream every call); the kernels (FLAT: one branch of every channel) take k_o and the offset from
    it. Correct always, at two to four extra launches and a small host-to-device copy per call.
  - Autograd sees the branch weights and the present biases themselves as the custom op's differentiable inputs,
    and the backward hands each branch its gradient, a contiguous view of one flat dW.

  A zero padding tap must never meet a NaN or inf input (0 * NaN = NaN would widen the branch's receptive
  field): the reductions read non-finite x as 0 and add their products back for each channel's own taps only
  (k_o), the dx kernel reads gz only at a channel's own taps, and dW at the padding taps (NaN there
  when x holds one) is never written out.
* Forward. A program owns one BLOCK_T time tile of one batch element and computes every output channel
  of every branch, in BLOCK_O = 64 channel blocks (per branch), so the input tile is read from memory once for all
  branches. The reduction runs over r = c * K_max + j (channel, tap) flattened: the x operand is the
  (BLOCK_R, BLOCK_T) im2col view x[b, c, t + j - K_max // 2] of the input tile plus its halo of
  K_max // 2 steps, the weight operand the (BLOCK_O, BLOCK_R) tile of the padded view, and tl.dot does
  the reduction with fp32 accumulation. When r fits one 128-row block (C_in <= 18 with K_max = 7, the
  model's inputs) the im2col tile is gathered once into registers and every output block reuses it;
  wider inputs stream it in 32-row chunks per output block, re-read from L1/L2. Flattening (c, j) keeps
  tl.dot's 16-wide minimum cheap for tiny C_in (C_in=1, K_max=7 pads 7 -> 16 rather than 1 -> 16).
  Time tiles shrink from 128 steps until there are two programs per SM. Bias and activation run in the
  epilogue and each block is stored straight into its channel slice of the output.
* Backward. Nothing of size (B, C_total, T) is saved: the custom op keeps only x and the branch parameters
  (saving z or the output would keep a (B, C_total, T) tensor alive from the forward to the backward, which is
  what this layer exists to avoid; recomputing z costs one more forward-sized reduction). With an activation,
  kernel 1 recomputes z from x by the forward's own reduction (same blocks, so bitwise the same z and the same
  ReLU mask) and writes gz = grad * act'(z), a transient buffer the size of grad_out that lives only during the
  backward; without one gz is grad_out itself. Then
  - dx (kernel 2, only when x requires grad): the transposed conv, dx[b, c, t] = sum_{o, j} W[o, c, j]
    gz[b, o, t + K_max//2 - j], reduced over (o, j) flattened with tl.dot (C_in padded to 16 rows; gz read once
    for all input channels);
  - dW, db (kernels 3 and 4): a deterministic two-stage reduction over batch x time. Kernel 3 gives each of S
    programs per (BLOCK_O, BLOCK_R) block of dW a fixed contiguous range of (b, time tile) pairs (n_bt // S, one
    more for the first n_bt % S splits) and writes its fp32 partial sums of dW and db to one
    (S, C_total * (C_in * K_max + 1)) buffer; kernel 4 adds the S partials in the fixed order s = 0, 1, ... and
    scatters dW straight into the branches' own (C_out_i, C_in, k_i) layouts, one flat buffer of which each
    branch's gradient is a contiguous view, and db beside it. S = clamp(cdiv(4 * SMs, dW blocks), 16, 32), at
    most n_bt (``_grad_weight_splits``): 32 for the model on an H200 (3 dW blocks, 96 programs), so the partials
    stay under 1 MB (32 x dW) where one split per (b, time tile) pair grew with B x T. No atomics, so two runs
    give bitwise identical gradients. A last-program-finishes reduction would save kernel 4's launch but needs a
    zeroed counter per dW block (a memset launch, or state shared between calls and streams) and acquire/release
    ordering; with the counter's launch it saves nothing.
  - One read of gz: not done. dx and dW each read gz once (dx only when x requires grad: never in the model,
    whose input is data, so the model's backward reads gz exactly once). A fused program would hold a dW
    accumulator for every channel (C_total x R fp32: up to 96 registers per thread at C_in = 16) across its
    (b, time tile) range beside dx's per-tile tiles, and dx's reads of gz are shifted per tap where dW's are
    not. The second read costs B * C_total * T elements (12.6 MB, 2.6 us at 4.8 TB/s, for the model at T = 512
    in fp32) when x needs a gradient.
* Precision: fp32 accumulation always, every product on tensor cores. Float32 operands follow torch's
  convolution flag, torch.backends.cudnn.allow_tf32 (``_conv_precision``): on (torch's default, under which
  nn.Conv1d and cuDNN on CUDA already use TF32) "tf32", off "tf32x3" (three TF32 products per product, about
  fp32 accuracy). That flag, not torch.backends.cuda.matmul.allow_tf32 (off by default,
  torch.set_float32_matmul_precision), because this op replaces convolutions and a user's setting for them
  should carry over: with the matmul flag the fused layer would silently be more precise and slower than the
  nn.Conv1d it replaces, or less precise than a user who turned cuDNN's TF32 off asked for. The consequence:
  GPU tests comparing float32 with the float64 reference turn the cudnn flag off or use a TF32 tolerance
  (tests/test_cuda.py does both). IEEE fp32 tl.dot (FMA units, whole reduction strips per thread in registers)
  is no longer used, and with it went dx's elementwise path for IEEE fp32 with C_in < 4. Half inputs feed tl.dot
  natively on the GPU; under the interpreter (no bf16 arithmetic in numpy) they are upcast to fp32 after
  loading, and tl.dot there is an fp32 product whatever the precision.
* Launch configurations come from heuristics on the shapes and the precision (_multiscale_conv1d_config; no
  autotuning), so the backward's recomputation uses exactly the forward's blocks.

Roofline (H200: 4.8 TB/s HBM, ~495 TF/s TF32, ~990 TF/s bf16, 132 SMs; the default model's layer: B = 32,
three branches of 64 channels with k = 3/5/7, bias, no activation, x without gradient; estimates, not
measurements)
------------------------------------------------------------------------------------------------------------
* Work. Forward FLOPs 2 * B * T * 64 * C_in * 15: 9.2 / 31.5 MFLOP (C_in = 1, T = 150 / 512), 27.6 / 94.4
  (C_in = 3); tl.dot executes 2 * B * T * 192 * BLOCK_R with BLOCK_R = 16 (C_in = 1) or 32 (C_in = 3): 29.5-201
  MFLOP, 0.06-0.41 us at the TF32 rate. dW costs the same. Every kernel is bound by memory (and at T = 150 by
  launch latency), by two orders of magnitude.
* Bytes, fp32 (bf16 halves the activations). Output and gz are B * 192 * T elements: 3.69 MB at T = 150,
  12.58 MB at T = 512. Forward: x + output, 3.7 / 12.8 MB (0.78 / 2.66 us). Backward: gz once + x + the dW
  partials written and read (2 x 32 x 192 x (7 C_in + 1) x 4 B: 0.39 MB at C_in = 1, 1.08 MB at C_in = 3, mostly
  in the 50 MB L2): 4.1-4.8 / 13.0-13.9 MB (0.85-1.0 / 2.7-2.9 us). Fwd+bwd: 1.6-1.8 us at T = 150, 5.4-5.6 us
  at T = 512 (bf16: 0.85-1.0 and 2.7-2.9 us).
* Programs. Forward: 160 at T = 150 (32-step tiles, 1.2 per SM), 512 at T = 512 (3.9 per SM). dW: 3 blocks x
  32 splits = 96 (0.73 per SM), each streaming 64-step gz chunks three stages deep (~48 KB in flight per
  program, ~4.6 MB in all, about what HBM latency x bandwidth needs). Kernel 4: 17 programs.
* Expected. T = 512: the three launches' fixed costs (~2 us each) plus ~65% of HBM bandwidth give ~10 us fwd+bwd
  in fp32, about 55% of the roofline. T = 150: ~6-8 us, latency-bound (about 25%).
* Against eager torch (3 cuDNN convs, their bias adds, cat; backward: a contiguous copy of each branch's
  gradient slice, cuDNN wgrad, bias sums): about 9 output-sized passes in 16-19 launches, 113 MB / 23.7 us at
  the roofline for T = 512 in fp32, realistically 40-60 us; at T = 150 ~19 launches of 3-4 us: ~4-5x at
  T = 512 and more at T = 150, counted on the GPU. torch.compile (Inductor keeps the cuDNN convs as extern
  kernels and fuses bias + cat, and the backward's copies and bias sums): about 6 passes in ~8 launches,
  76 MB / 15.9 us at the roofline for T = 512, ~25-30 us realistically: ~2.5-3x. Both ratios assume the GPU,
  not the host, sets the pace: the custom op costs about one Python dispatch and one or two Triton launches
  per direction (up to 4 branches nothing else: the weights are read in place; more add two to four launches).
"""

from __future__ import annotations

import torch
import triton

from .._double_backward import graph_wanted, recomputed_grads
from ..ops.reference.multiscale_conv1d import multiscale_conv1d_reference
from ._common import interpreting as _interpreting
from ._common import new_output, tensor_core_precision, triton_call_unsupported
from ._multiscale_conv1d_config import (  # noqa: F401  (the tests and the AOT cases read the heuristics here)
    _DW_R_BLOCKS,
    _IM2COL_TILE_LIMIT,
    _MAX_SPLITS,
    _MIN_SPLITS,
    _RESIDENT_R_BLOCKS,
    _STREAMED_R_BLOCK,
    _SUM_BLOCK,
    _TIME_BLOCKS,
    _forward_config,
    _forward_tile_config,
    _grad_input_config,
    _grad_weight_config,
    _grad_weight_splits,
    _largest_time_block,
)
from ._multiscale_conv1d_pack import branch_layout, pack_weights
from ._multiscale_conv1d_triton import (
    _msc_forward_kernel,
    _msc_grad_input_kernel,
    _msc_grad_weight_partial_kernel,
    _msc_grad_weight_sum_kernel,
    _msc_preactivation_grad_kernel,
)

_ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2}
_INT32_LIMIT = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

_SM_COUNTS: dict[int, int] = {}


_PROGRAMS_PER_SM = 4


def _parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy: 4 per SM on CUDA; a few under the interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROGRAMS_PER_SM * _SM_COUNTS[index]


def _conv_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: for float32 "tf32" while torch.backends.cudnn.allow_tf32 (torch's convolution flag,
    on by default, which nn.Conv1d on CUDA follows) is set, else "tf32x3"; half types their native products."""
    return tensor_core_precision(dtype, allow_tf32=torch.backends.cudnn.allow_tf32)


def _common_constexprs(dtype: torch.dtype, device: torch.device) -> dict:
    return {"UPCAST": _interpreting(device) and dtype != torch.float32, "DOT_PRECISION": _conv_precision(dtype)}


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

MAX_BRANCHES = 4  # branches whose tensors the kernels read in place; more are concatenated per call


def _to_device(rows: list, device: torch.device) -> torch.Tensor:
    """An int32 tensor of ``rows`` on ``device``. From pinned memory without blocking on CUDA: a plain copy from
    pageable memory would wait for the stream to drain on every call."""
    host = torch.tensor(rows, dtype=torch.int32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _branch_args(weights, biases) -> tuple[list, dict]:
    """The kernels' view of the branches: (the leading pointer arguments w0..w3, b0..b3, layout; the scalar and
    constexpr arguments). ``biases``: one per branch (None where absent) or None.

    Up to MAX_BRANCHES branches, nothing is copied or cached: the kernels read branch i's own contiguous
    (C_out_i, C_in, k_i) weight and (C_out_i,) bias (BIAS_BITS bit i) in place, located by its first channel
    first_i, its kernel size k_i and, for the flat dW, its start start_i; so every write to a weight or bias,
    through ``.data`` or not, is seen by the next call. More branches: the weights are concatenated flat (one
    torch.cat, in the flat dW's order) and the biases into one (C_total,) vector (zeros where absent) by
    ``pack_weights``, and an int32 (2, C_total) ``branch_layout`` gives each channel's k_o and offset (FLAT, one
    branch): per call, one to two launches plus one per absent bias, and a pinned host-to-device copy."""
    weights = [w.contiguous() for w in weights]
    biases = [None] * len(weights) if biases is None else [None if b is None else b.contiguous() for b in biases]
    c_total = sum(w.shape[0] for w in weights)
    if len(weights) > MAX_BRANCHES:
        flat, bias = pack_weights(weights, biases)
        layout = _to_device(branch_layout(weights), flat.device)
        ptrs = [flat] * 4 + [flat if bias is None else bias] * 4 + [layout]
        return ptrs, {"firsts": [c_total] * 3, "taps": [1] * 4, "starts": [0] * 3,
                      "BIAS_BITS": 0 if bias is None else 1, "layout": {"NUM_BRANCHES": 1, "FLAT": True},
                      "HAS_BIAS": bias is not None}
    pad = MAX_BRANCHES - len(weights)
    firsts, starts, o, n = [], [], 0, 0
    for w in weights:
        firsts.append(o)
        starts.append(n)
        o, n = o + w.shape[0], n + w.numel()
    present = [b if b is not None else weights[0] for b in biases]
    ptrs = weights + [weights[0]] * pad + present + [weights[0]] * pad + [weights[0]]
    return ptrs, {"firsts": (firsts[1:] + [c_total] * pad)[:3], "taps": [w.shape[-1] for w in weights] + [1] * pad,
                  "starts": (starts[1:] + [n] * pad)[:3],
                  "BIAS_BITS": sum(1 << i for i, b in enumerate(biases) if b is not None),
                  "layout": {"NUM_BRANCHES": len(weights), "FLAT": False},
                  "HAS_BIAS": any(b is not None for b in biases)}


def _launch_forward(x, ptrs, br, c_total, k_max, activation, grad=None) -> torch.Tensor:
    """The forward kernel (``grad`` None) or, given grad (B, C_total, T), the z-recomputing pre-activation-gradient
    kernel, with the same blocks: (B, C_total, T) output or gz."""
    B, c_in, T = x.shape
    r = c_in * k_max
    out = new_output((B, c_total, T), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg = _forward_config(T, r, B, _parallel_programs(x.device) // 2)
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    common = dict(**br["layout"], HAS_BIAS=br["HAS_BIAS"], ACTIVATION=_ACTIVATION_CODES[activation], K_MAX=k_max,
                  **cfg, **_common_constexprs(x.dtype, x.device))
    scalars = (*br["firsts"], *br["taps"], br["BIAS_BITS"], T, c_total, r, n_t, *x.stride())
    if grad is None:
        _msc_forward_kernel[(n_t * B,)](x, *ptrs, out, *scalars, *out.stride(), **common)
    else:
        _msc_preactivation_grad_kernel[(n_t * B,)](x, *ptrs, grad, out, *scalars, *grad.stride(), **common)
    return out


def _launch_grad_input(gz, ptrs, br, c_total, k_max, x_shape, dtype) -> torch.Tensor:
    B, c_in, T = x_shape
    dx = new_output((B, c_in, T), dtype=dtype, device=gz.device)
    cfg = _grad_input_config(T, c_in, _conv_precision(dtype))
    n_c = triton.cdiv(c_in, cfg["BLOCK_C"])
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    _msc_grad_input_kernel[(n_c * n_t * B,)](
        gz, *ptrs[:4], ptrs[8], dx, *br["firsts"], *br["taps"], T, c_in, c_total, n_c, n_t, *gz.stride(),
        *dx.stride(), **br["layout"], K_MAX=k_max, **cfg, **_common_constexprs(dtype, gz.device))
    return dx


def _launch_grad_weight(gz, x, ptrs, br, c_total, k_max, with_bias: bool, weight_numel: int, w_dtype):
    """dW in the branches' own layouts, flat (weight_numel,) (see _msc_grad_weight_sum_kernel), and db (C_total,) or
    None: fp32 partial sums over S fixed ranges of (batch, time tile) pairs, then one kernel adds them in order."""
    B, c_in, T = x.shape
    r = c_in * k_max
    cfg = _grad_weight_config(r, _conv_precision(x.dtype))
    n_o, n_r = triton.cdiv(c_total, cfg["BLOCK_O"]), triton.cdiv(r, cfg["BLOCK_R"])
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    n_bt = B * n_t
    splits = _grad_weight_splits(n_bt, n_o * n_r, _parallel_programs(x.device))
    partials = new_output((splits, c_total * (r + 1)), dtype=torch.float32, device=x.device)
    _msc_grad_weight_partial_kernel[(n_o * n_r * splits,)](
        gz, x, partials, T, c_total, r, n_o, n_r, n_t, n_bt, splits, *gz.stride(), *x.stride(),
        HAS_BIAS=with_bias, K_MAX=k_max, **cfg, **_common_constexprs(x.dtype, x.device))
    dw = new_output((weight_numel,), dtype=w_dtype, device=x.device)
    db = new_output((c_total,), dtype=x.dtype, device=x.device) if with_bias else None
    n = c_total * (r + 1 if with_bias else r)
    _msc_grad_weight_sum_kernel[(triton.cdiv(n, _SUM_BLOCK),)](
        partials, ptrs[8], dw, dw if db is None else db, *br["firsts"], *br["taps"], *br["starts"], c_total, r,
        splits, **br["layout"], HAS_BIAS=with_bias, K_MAX=k_max, BLOCK=_SUM_BLOCK, num_warps=4)
    return dw, db


# ----------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as opaque nodes with fake implementations and an autograd formula)
# ----------------------------------------------------------------------------------------------------------


def _forward(x: torch.Tensor, weights, biases, activation: str) -> torch.Tensor:
    """The forward op's launches: x (B, C_in, T), weights[i] (C_out_i, C_in, k_i), biases one (C_out_i,) or None
    per branch, or None -> (B, C_total, T)."""
    ptrs, br = _branch_args(weights, biases)
    return _launch_forward(x, ptrs, br, sum(w.shape[0] for w in weights), max(w.shape[-1] for w in weights),
                           activation)


def _backward_launches(grad, x, weights, biases, activation, need_input, need_weight, need_bias):
    """The backward op's launches: (dx (B, C_in, T), dW flat (sum_i C_out_i * C_in * k_i,): each branch's
    (C_out_i, C_in, k_i) gradient one after another, db (C_total,)), a gradient not asked for an empty (0,)."""
    empty = x.new_empty((0,))
    c_total, k_max = sum(w.shape[0] for w in weights), max(w.shape[-1] for w in weights)
    weight_numel = sum(w.numel() for w in weights)
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    need_bias = need_bias and biases is not None and any(b is not None for b in biases)
    if grad.numel() == 0:
        dx = torch.zeros_like(x) if need_input else empty
        dw = weights[0].new_zeros((weight_numel,)) if need_weight else empty
        db = x.new_zeros((c_total,)) if need_bias else empty
        return dx, dw, db
    ptrs, br = _branch_args(weights, biases)
    gz = grad if activation == "none" else _launch_forward(x, ptrs, br, c_total, k_max, activation, grad=grad)
    dx = _launch_grad_input(gz, ptrs, br, c_total, k_max, x.shape, x.dtype) if need_input else empty
    dw, db = empty, empty
    if need_weight or need_bias:
        dw_flat, db_full = _launch_grad_weight(gz, x, ptrs, br, c_total, k_max, need_bias, weight_numel,
                                               weights[0].dtype)
        dw = dw_flat if need_weight else empty
        db = db_full if need_bias else empty
    return dx, dw, db


def _full_biases(weights, biases, has_bias):
    """One bias or None per branch, from the present ``biases`` and the per-branch ``has_bias`` flags."""
    present = iter(biases)
    return [next(present) if has else None for has in has_bias] if has_bias else [None] * len(weights)


@torch.library.custom_op("fastmsc::multiscale_conv1d_branches", mutates_args=())
def _branches_forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                      has_bias: list[bool], activation: str) -> torch.Tensor:
    """x (B, C_in, T) -> (B, C_total, T): weights[i] (C_out_i, C_in, k_i), biases (C_out_i,) of the branches that
    have one (``has_bias`` per branch), all read by the kernels in place."""
    return _forward(x, weights, _full_biases(weights, biases, has_bias), activation)


@_branches_forward.register_fake
def _(x, weights, biases, has_bias, activation):
    return x.new_empty((x.shape[0], sum(w.shape[0] for w in weights), x.shape[2]))


@torch.library.custom_op("fastmsc::multiscale_conv1d_branches_backward", mutates_args=())
def _branches_backward(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                       has_bias: list[bool], activation: str, need_input: bool, need_weight: bool,
                       need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (B, C_in, T), dW (sum_i C_out_i * C_in * k_i,): every branch's (C_out_i, C_in, k_i) gradient flattened
    one after another, db (C_total,)); a gradient not asked for is an empty (0,)."""
    return _backward_launches(grad, x, weights, _full_biases(weights, biases, has_bias), activation, need_input,
                              need_weight, need_bias)


@_branches_backward.register_fake
def _(grad, x, weights, biases, has_bias, activation, need_input, need_weight, need_bias):
    empty = x.new_empty((0,))
    return (x.new_empty(x.shape) if need_input else empty,
            weights[0].new_empty((sum(w.numel() for w in weights),)) if need_weight else empty,
            x.new_empty((sum(w.shape[0] for w in weights),)) if (need_bias and any(has_bias)) else empty)


def _setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, activation = inputs
    # Saving the branch parameters also gives the usual error when one is changed in place between the forward and
    # the backward (the backward kernels read them again).
    ctx.save_for_backward(x, *weights, *biases)
    ctx.n_weights, ctx.has_bias, ctx.activation = len(weights), tuple(has_bias), activation


def _backward(ctx, grad):
    x, *params = ctx.saved_tensors
    n = ctx.n_weights
    weights, biases = params[:n], params[n:]
    needs = ctx.needs_input_grad  # (x, [per weight], [per present bias], has_bias, activation)
    need_x, need_w, need_b = bool(needs[0]), [bool(f) for f in needs[1]], [bool(f) for f in needs[2]]
    rest = (None, None)
    if graph_wanted(grad, x, *weights, *biases):
        activation = None if ctx.activation == "none" else ctx.activation

        def reference(x, *p):
            present = iter(p[n:])
            full = [next(present) if has else None for has in ctx.has_bias]
            return multiscale_conv1d_reference(x, list(p[:n]), full if p[n:] else None, activation)

        grads = recomputed_grads(reference, (x, *weights, *biases), (need_x, *need_w, *need_b), (grad,))
        return (grads[0], list(grads[1:n + 1]), list(grads[n + 1:]), *rest)
    dx, dw, db = _branches_backward(grad, x, list(weights), list(biases), list(ctx.has_bias), ctx.activation, need_x,
                                    any(need_w), any(need_b))
    dws, start = [], 0
    for w, need in zip(weights, need_w, strict=True):
        dws.append(dw[start:start + w.numel()].view(w.shape) if need else None)
        start += w.numel()
    dbs, present, o0 = [], iter(need_b), 0
    for w, has in zip(weights, ctx.has_bias, strict=True):
        if has:
            dbs.append(db[o0:o0 + w.shape[0]] if next(present) else None)
        o0 += w.shape[0]
    return (dx if need_x else None, dws, dbs, *rest)


_branches_forward.register_autograd(_backward, setup_context=_setup_context)


def fused(x, weights, biases=None, activation=None):
    """Multi-scale "same" Conv1d + concat: x (B, C_in, T) -> (B, sum_i C_out_i, T); arguments validated by
    fastmsc.ops.multiscale_conv1d (weights[i] (C_out_i, C_in, k_i), k_i odd; biases None or per branch)."""
    weights = list(weights)
    has_bias = [False] * len(weights) if biases is None else [b is not None for b in biases]
    present = [] if biases is None else [b for b in biases if b is not None]
    return _branches_forward(x, weights, present, has_bias, "none" if activation is None else activation)


def fused_unsupported(device_type: str, *, allow_interpreter: bool = False, **call_args) -> str | None:
    """None when the fused kernels can run these arguments on ``device_type``, else the reason;
    ``allow_interpreter``: whether CPU tensors may run in the Triton interpreter (the caller's policy, see
    fastmsc.kernels._common)."""
    x = call_args.get("x")
    reason = triton_call_unsupported(device_type, x, kernels="the fused kernels", allow_interpreter=allow_interpreter)
    if reason is not None or x is None:
        return reason
    weights = call_args.get("weights") or ()
    c_total = sum(w.shape[0] for w in weights)
    k_max = max([w.shape[-1] for w in weights] or [1])
    per_sample = max(x.shape[1], c_total) * x.shape[2]
    largest_stride_offset = sum((size - 1) * abs(stride)
                                for size, stride in zip(x.shape[1:], x.stride()[1:], strict=True))
    if max(per_sample, largest_stride_offset, c_total * x.shape[1] * k_max) > _INT32_LIMIT:
        return "one sample of x or of the output spans more than 2**31 elements, beyond the kernels' 32-bit offsets"
    return None


__all__ = ["MAX_BRANCHES", "branch_layout", "fused", "fused_unsupported", "pack_weights"]
