"""Fused multi-scale "same" Conv1d + concat in Triton: forward in one kernel, backward in three or four.

Shapes: x (B, C_in, T); weights[i] (C_out_i, C_in, k_i) with odd k_i; biases[i] (C_out_i,) or None;
output (B, C_total, T) with C_total = sum_i C_out_i, branch i in channels [sum_{j<i} C_out_j, ...).

Design
------
* Packing. Before the custom-op boundary the branch weights are packed with torch ops into one
  (C_total, C_in, K_max) tensor, each branch zero-padded by (K_max - k_i) // 2 taps on both sides, so
  every branch becomes a K_max "same" conv and the whole layer is one conv with C_total outputs.
  The packed tensor is tiny next to the activations (C_total * C_in * K_max elements), one compiled
  kernel then serves any number of branches and kernel sizes, and autograd carries the packed
  weight's gradient back to each branch through the pad/cat ops. Biases are packed the same way
  (zeros for a branch without one). A zero padding tap must still never meet a NaN or inf input
  (0 * NaN = NaN would widen the branch's receptive field): the reductions read non-finite x as 0 and
  add their products back for each channel's own taps only (``branch_taps``), and the dx kernel reads
  gz only at a channel's own taps. dW at the padding taps may turn NaN; the pad's backward drops it.
* Forward. A program owns one BLOCK_T time tile of one batch element and computes every output channel
  of every branch, in BLOCK_O = 64 channel blocks, so the input tile is read from memory once for all
  branches. The reduction runs over r = c * K_max + j (channel, tap) flattened: the x operand is the
  (BLOCK_R, BLOCK_T) im2col view x[b, c, t + j - K_max // 2] of the input tile plus its halo of
  K_max // 2 steps, the weight operand the (BLOCK_O, BLOCK_R) slice of the packed weight, and tl.dot does
  the reduction with fp32 accumulation. When r fits one 128-row block (C_in <= 18 with K_max = 7, the
  model's inputs) the im2col tile is gathered once into registers and every output block reuses it;
  wider inputs stream it in 32-row chunks per output block, re-read from L1/L2. Flattening (c, j) keeps
  tl.dot's 16-wide minimum cheap for tiny C_in (C_in=1, K_max=7 pads 7 -> 16 rather than 1 -> 16).
  Time tiles shrink from 128 steps until there are two programs per SM. Bias and activation run in the
  epilogue and each block is stored straight into its channel slice of the output.
* Backward. Nothing of size (B, C_total, T) is saved: the custom op keeps only x and the packed
  weight/bias (saving z or the output would keep a (B, C_total, T) tensor alive from the forward to the
  backward, which is what this layer exists to avoid; recomputing z costs one more forward-sized
  reduction). With an activation, kernel 1 recomputes z from x by the forward's own reduction (same
  blocks, so bitwise the same z and the same ReLU mask) and writes gz = grad * act'(z), a transient
  buffer the size of grad_out that lives only during the backward; without one gz is grad_out itself.
  Then
  - dx (kernel 2): the transposed conv, dx[b, c, t] = sum_{o, j} W[o, c, j] gz[b, o, t + K_max//2 - j],
    reduced over (o, j) flattened, with tl.dot (C_in padded to 16 rows; gz read once for all channels),
    except for IEEE fp32 with C_in < 4, where the padding would cost FMA-unit time and an elementwise
    multiply-add loop over the input channels does less work;
  - dW, db (kernels 3 and 4): deterministic two-stage reductions over batch x time. Kernel 3 gives each
    of S programs per (BLOCK_O, BLOCK_R) block of dW a fixed contiguous range of (b, time tile) pairs
    and writes its fp32 partial sums to an (S, C_total, C_in * K_max) buffer; kernel 4 adds the S
    partials in a fixed order. No atomics, so two runs give bitwise identical gradients; S depends
    only on the shapes and the device.
* Precision: fp32 accumulation always; fp32 operands use IEEE products unless
  torch.backends.cuda.matmul.allow_tf32 is set. Half inputs feed tl.dot natively on the GPU; under the
  interpreter (no bf16 arithmetic in numpy) they are upcast to fp32 after loading.
* Launch configurations come from a heuristic on the shapes (no autotuning), so the backward's
  recomputation uses exactly the forward's blocks.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._double_backward import graph_wanted, recomputed_grads
from ..ops.multiscale_conv1d import multiscale_conv1d_reference
from ._common import capability_unsupported, new_output, triton_unsupported

_ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2}
_INT32_LIMIT = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu (tl.maximum may drop it on the GPU)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _activation_slope(z, ACTIVATION: tl.constexpr):
    """d act / d z at z (ReLU: 0 at z <= 0 and 1 elsewhere, NaN included, as torch's threshold_backward)."""
    if ACTIVATION == 1:
        slope = tl.where(z <= 0.0, 0.0, 1.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        slope = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    return slope


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")  # false for NaN too


@triton.jit
def _add_non_finite_terms(acc, x_base, w_ptr, o_taps, offs_o, o_mask, offs_t, T, R, stride_xc, stride_xt,
                          K_MAX: tl.constexpr):
    """acc[o, t] + sum over the taps j of o's own branch of W[o, c, j] x[b, c, t + j - K_MAX // 2] for the non-finite
    x only. The tl.dot reductions see non-finite x as 0, because a branch's zero padding taps would otherwise
    multiply them (0 * NaN = NaN, 0 * inf = NaN) and spread them past the branch's receptive field; this adds
    their exact products (NaN, ±inf, or NaN for inf - inf or 0 * inf) back, one tap at a time."""
    for r in range(0, R):
        channel = r // K_MAX
        tap = r % K_MAX
        src_t = offs_t + (tap - K_MAX // 2)
        xs = tl.load(x_base + channel * stride_xc + src_t * stride_xt, mask=(src_t >= 0) & (src_t < T),
                     other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_o * R + r, mask=o_mask, other=0.0).to(tl.float32)
        own_tap = tl.abs(tap - K_MAX // 2) <= o_taps // 2
        acc += tl.where(own_tap[:, None] & ~_finite(xs)[None, :], w[:, None] * xs[None, :], 0.0)
    return acc


@triton.jit
def _im2col_tile(x_base, offs_r, offs_t, T, R, stride_xc, stride_xt, K_MAX: tl.constexpr, UPCAST: tl.constexpr):
    """x[b, c, t + j - K_MAX // 2] for r = c * K_MAX + j in offs_r (rows) and t in offs_t (columns), 0 outside.
    Not finite-filtered: callers replace non-finite values before a reduction (see _preactivation_tile)."""
    channel = offs_r // K_MAX
    tap = offs_r % K_MAX
    src_t = offs_t[None, :] + (tap[:, None] - K_MAX // 2)
    mask = (offs_r < R)[:, None] & (src_t >= 0) & (src_t < T)
    xs = tl.load(x_base + channel[:, None] * stride_xc + src_t * stride_xt, mask=mask, other=0.0)
    if UPCAST:
        xs = xs.to(tl.float32)
    return xs


@triton.jit
def _resident_x_tile(x_base, offs_t, T, R, stride_xc, stride_xt, K_MAX: tl.constexpr, BLOCK_R: tl.constexpr,
                     X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr):
    """With X_RESIDENT the whole (BLOCK_R >= R, BLOCK_T) im2col tile of a program's time tile, gathered once for
    every output block, with its non-finite values read as 0, and whether it held any (see _preactivation_tile);
    otherwise placeholders that _preactivation_tile does not read."""
    if X_RESIDENT:
        x_tile = _im2col_tile(x_base, tl.arange(0, BLOCK_R), offs_t, T, R, stride_xc, stride_xt, K_MAX, UPCAST)
        finite = _finite(x_tile)
        non_finite = tl.max(tl.max(tl.where(finite, 0, 1), 1), 0)
        x_tile = tl.where(finite, x_tile, 0.0)
    else:
        x_tile = 0.0
        non_finite = 0
    return x_tile, non_finite


@triton.jit
def _preactivation_tile(x_tile, x_non_finite, x_base, w_ptr, b_ptr, taps_ptr, offs_o, offs_t, T, C_TOTAL, R, stride_xc,
                        stride_xt, HAS_BIAS: tl.constexpr, K_MAX: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """z[o, t] = bias[o] + sum_{c, j} W[o, c, j] x[b, c, t + j - K_MAX // 2] for a (BLOCK_O, BLOCK_T) tile, fp32.

    With X_RESIDENT the whole reduction is the one (BLOCK_R >= R, BLOCK_T) im2col tile ``x_tile`` the caller
    loaded (non-finite values already read as 0, ``x_non_finite`` whether it held any); otherwise the tile is
    gathered from ``x_base`` in BLOCK_R chunks. The dots read non-finite x as 0, and _add_non_finite_terms adds
    those terms for the taps of each channel's own branch (``taps_ptr``: its kernel size), only when the time
    tile holds any."""
    o_mask = offs_o < C_TOTAL
    acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
    if X_RESIDENT:
        offs_r = tl.arange(0, BLOCK_R)
        w = tl.load(w_ptr + offs_o[:, None] * R + offs_r[None, :], mask=o_mask[:, None] & (offs_r < R)[None, :],
                    other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        non_finite = x_non_finite
        acc = tl.dot(w, x_tile, acc, input_precision=DOT_PRECISION)
    else:
        non_finite = 0
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            w = tl.load(w_ptr + offs_o[:, None] * R + offs_r[None, :],
                        mask=o_mask[:, None] & (offs_r < R)[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            xs = _im2col_tile(x_base, offs_r, offs_t, T, R, stride_xc, stride_xt, K_MAX, UPCAST)
            finite = _finite(xs)
            non_finite = tl.maximum(non_finite, tl.max(tl.max(tl.where(finite, 0, 1), 1), 0))
            acc = tl.dot(w, tl.where(finite, xs, 0.0), acc, input_precision=DOT_PRECISION)
    if non_finite > 0:
        o_taps = tl.load(taps_ptr + offs_o, mask=o_mask, other=K_MAX)
        acc = _add_non_finite_terms(acc, x_base, w_ptr, o_taps, offs_o, o_mask, offs_t, T, R, stride_xc, stride_xt,
                                    K_MAX)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _msc_forward_kernel(x_ptr, w_ptr, b_ptr, taps_ptr, out_ptr, T, C_TOTAL, R, N_T,
                        stride_xb, stride_xc, stride_xt, stride_ob, stride_oc, stride_ot,
                        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, K_MAX: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                        X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[b, o, :] = act(z[b, o, :]) over one BLOCK_T time tile of one batch element, every output channel
    (all branches) in BLOCK_O blocks."""
    pid = tl.program_id(0)
    pid_t = pid % N_T
    pid_b = pid // N_T
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    x_tile, x_non_finite = _resident_x_tile(x_base, offs_t, T, R, stride_xc, stride_xt, K_MAX, BLOCK_R, X_RESIDENT,
                                            UPCAST)
    out_base = out_ptr + pid_b.to(tl.int64) * stride_ob
    for o0 in range(0, C_TOTAL, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        z = _preactivation_tile(x_tile, x_non_finite, x_base, w_ptr, b_ptr, taps_ptr, offs_o, offs_t, T, C_TOTAL, R,
                                stride_xc, stride_xt, HAS_BIAS, K_MAX, BLOCK_O, BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST,
                                DOT_PRECISION)
        y = _activate(z, ACTIVATION)
        out = out_base + offs_o[:, None] * stride_oc + offs_t[None, :] * stride_ot
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_o[:, None] < C_TOTAL) & (offs_t[None, :] < T))


@triton.jit
def _msc_preactivation_grad_kernel(x_ptr, w_ptr, b_ptr, taps_ptr, grad_ptr, gz_ptr, T, C_TOTAL, R, N_T,
                                   stride_xb, stride_xc, stride_xt, stride_gb, stride_go, stride_gt,
                                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, K_MAX: tl.constexpr,
                                   BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                                   X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """gz[b, o, t] = grad[b, o, t] * act'(z[b, o, t]), z recomputed from x with the forward's tiles;
    gz is contiguous (B, C_TOTAL, T)."""
    pid = tl.program_id(0)
    pid_t = pid % N_T
    pid_b = pid // N_T
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    x_tile, x_non_finite = _resident_x_tile(x_base, offs_t, T, R, stride_xc, stride_xt, K_MAX, BLOCK_R, X_RESIDENT,
                                            UPCAST)
    grad_base = grad_ptr + pid_b.to(tl.int64) * stride_gb
    gz_base = gz_ptr + pid_b.to(tl.int64) * C_TOTAL * T
    for o0 in range(0, C_TOTAL, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        z = _preactivation_tile(x_tile, x_non_finite, x_base, w_ptr, b_ptr, taps_ptr, offs_o, offs_t, T, C_TOTAL, R,
                                stride_xc, stride_xt, HAS_BIAS, K_MAX, BLOCK_O, BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST,
                                DOT_PRECISION)
        mask = (offs_o[:, None] < C_TOTAL) & (offs_t[None, :] < T)
        grad = tl.load(grad_base + offs_o[:, None] * stride_go + offs_t[None, :] * stride_gt,
                       mask=mask, other=0.0).to(tl.float32)
        gz = grad * _activation_slope(z, ACTIVATION)
        tl.store(gz_base + offs_o[:, None] * T + offs_t[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _msc_grad_input_kernel(gz_ptr, w_ptr, taps_ptr, dx_ptr, T, C_IN, C_TOTAL, R, N_C, N_T,
                           stride_gb, stride_go, stride_gt, stride_db, stride_dc, stride_dt,
                           K_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
                           USE_DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dx[b, c, t] = sum_{o, j} W[o, c, j] gz[b, o, t + K_MAX // 2 - j] for a (BLOCK_C, BLOCK_T) tile.

    The reduction runs over q = o * K_MAX + j. Without tl.dot (small C_in) one program covers every
    input channel (N_C == 1) and accumulates products elementwise, one channel at a time. gz is read only at
    the taps of o's own branch (``taps_ptr``: its kernel size): at a zero padding tap a NaN or inf in gz (GELU's
    slope at a non-finite z) would still give 0 * NaN = NaN.
    """
    HALF: tl.constexpr = K_MAX // 2
    pid = tl.program_id(0)
    pid_c = pid % N_C
    pid_t = (pid // N_C) % N_T
    pid_b = pid // (N_C * N_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    gz_base = gz_ptr + pid_b.to(tl.int64) * stride_gb
    dx_base = dx_ptr + pid_b.to(tl.int64) * stride_db
    Q = C_TOTAL * K_MAX
    if USE_DOT:
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C_IN
        acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_mask = offs_q < Q
            out_channel = offs_q // K_MAX
            tap = offs_q % K_MAX
            w = tl.load(w_ptr + out_channel[None, :] * R + offs_c[:, None] * K_MAX + tap[None, :],
                        mask=c_mask[:, None] & q_mask[None, :], other=0.0)
            own_tap = tl.abs(tap - HALF) <= tl.load(taps_ptr + out_channel, mask=q_mask, other=0) // 2
            src_t = offs_t[None, :] + (HALF - tap[:, None])
            g = tl.load(gz_base + out_channel[:, None] * stride_go + src_t * stride_gt,
                        mask=(q_mask & own_tap)[:, None] & (src_t >= 0) & (src_t < T), other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
                g = g.to(tl.float32)
            acc = tl.dot(w, g, acc, input_precision=DOT_PRECISION)
        dx = dx_base + offs_c[:, None] * stride_dc + offs_t[None, :] * stride_dt
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=c_mask[:, None] & t_mask[None, :])
    else:
        for c in range(0, C_IN):
            acc = tl.zeros((BLOCK_Q, BLOCK_T), dtype=tl.float32)
            for q0 in range(0, Q, BLOCK_Q):
                offs_q = q0 + tl.arange(0, BLOCK_Q)
                q_mask = offs_q < Q
                out_channel = offs_q // K_MAX
                tap = offs_q % K_MAX
                w = tl.load(w_ptr + out_channel * R + c * K_MAX + tap, mask=q_mask, other=0.0).to(tl.float32)
                own_tap = tl.abs(tap - HALF) <= tl.load(taps_ptr + out_channel, mask=q_mask, other=0) // 2
                src_t = offs_t[None, :] + (HALF - tap[:, None])
                g = tl.load(gz_base + out_channel[:, None] * stride_go + src_t * stride_gt,
                            mask=(q_mask & own_tap)[:, None] & (src_t >= 0) & (src_t < T), other=0.0).to(tl.float32)
                acc += w[:, None] * g
            row = tl.sum(acc, axis=0)
            tl.store(dx_base + c * stride_dc + offs_t * stride_dt, row.to(dx_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def _msc_grad_weight_partial_kernel(gz_ptr, x_ptr, dw_part_ptr, db_part_ptr, T, C_TOTAL, R, N_O, N_R, N_T, N_BT,
                                    CHUNK, stride_gb, stride_go, stride_gt, stride_xb, stride_xc, stride_xt,
                                    HAS_BIAS: tl.constexpr, K_MAX: tl.constexpr, BLOCK_O: tl.constexpr,
                                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr):
    """Partial sums of dW[o, r] = sum_{b, t} gz[b, o, t] x[b, c, t + j - K_MAX // 2] (r = c * K_MAX + j) and
    db[o] = sum_{b, t} gz[b, o, t] over the (b, time tile) pairs [s * CHUNK, (s + 1) * CHUNK) of split s.

    Writes dw_part[s, o, r] (fp32, (S, C_TOTAL, R)) and, from the r-block 0 programs, db_part[s, o]."""
    HALF: tl.constexpr = K_MAX // 2
    pid = tl.program_id(0)
    pid_o = pid % N_O
    pid_r = (pid // N_O) % N_R
    pid_s = pid // (N_O * N_R)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_mask = offs_o < C_TOTAL
    r_mask = offs_r < R
    channel = offs_r // K_MAX
    tap = offs_r % K_MAX
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, N_BT)
    for n in range(start, end):
        b = n // N_T
        offs_t = (n % N_T) * BLOCK_T + tl.arange(0, BLOCK_T)
        g = tl.load(gz_ptr + b.to(tl.int64) * stride_gb + offs_o[:, None] * stride_go + offs_t[None, :] * stride_gt,
                    mask=o_mask[:, None] & (offs_t[None, :] < T), other=0.0)
        src_t = offs_t[:, None] + (tap[None, :] - HALF)
        xs = tl.load(x_ptr + b.to(tl.int64) * stride_xb + channel[None, :] * stride_xc + src_t * stride_xt,
                     mask=r_mask[None, :] & (src_t >= 0) & (src_t < T) & (offs_t[:, None] < T), other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            xs = xs.to(tl.float32)
        acc = tl.dot(g, xs, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=1)
    part = dw_part_ptr + pid_s.to(tl.int64) * C_TOTAL * R + offs_o[:, None] * R + offs_r[None, :]
    tl.store(part, acc, mask=o_mask[:, None] & r_mask[None, :])
    if HAS_BIAS:
        if pid_r == 0:
            tl.store(db_part_ptr + pid_s.to(tl.int64) * C_TOTAL + offs_o, bias_acc, mask=o_mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, N, S, BLOCK: tl.constexpr):
    """out[i] = sum_{s < S} part[s, i] in order s = 0, 1, ... (part is contiguous fp32 (S, N))."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    part = part_ptr + offs
    for _ in range(0, S):
        acc += tl.load(part, mask=mask, other=0.0)
        part += N
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

# Every configuration the heuristics below can pick; multiscale_conv1d_aot compiles each of them.
_TIME_BLOCKS = (32, 64, 128)
_FORWARD_O_BLOCK = 64
_RESIDENT_R_BLOCKS = (16, 32, 64, 128)  # an im2col tile this tall stays in registers for every output block
_STREAMED_R_BLOCK = 32  # wider reductions stream the tile in chunks of this many rows
_IM2COL_TILE_LIMIT = 2048  # elements of the (BLOCK_R, BLOCK_T) gathered tile: its pointers cost 2 registers each
_DX_C_BLOCKS = (16, 64)
_DW_R_BLOCKS = (16, 32, 64, 128)
_DW_O_BLOCK = 64
_DW_TIME_BLOCK = 32
_DX_DOT_MIN_CHANNELS = 4
_SUM_BLOCK = 256


def _smallest_block_covering(n: int, blocks) -> int:
    for block in blocks:
        if n <= block:
            return block
    return blocks[-1]


def _time_block(T: int) -> int:
    """128 steps unless that pads T by more than 1/8 (T=150 -> 32, 5 tiles with 10 steps of padding)."""
    padded = triton.cdiv(T, 128) * 128
    return 128 if (padded - T) * 8 <= T else 32


def _largest_time_block(block_r: int) -> int:
    """Time tiles stay within _IM2COL_TILE_LIMIT gathered elements (but at least 32 steps)."""
    return max(_TIME_BLOCKS[0], _IM2COL_TILE_LIMIT // block_r)


def _forward_tile_config(block_r: int, block_t: int, resident: bool) -> dict:
    """Launch settings of the forward / z-recomputing kernels for one tile shape (checked by the AOT tool):
    8 warps from 64 steps or a 4096-element gathered tile on, where 4 warps need over 200 registers per
    thread for fp32 on sm_80 (no tensor cores for IEEE fp32 products); one stage, because software-pipelining
    the nested output-block / reduction loops spills fp32 tiles on sm_80."""
    big = block_t >= 64 or block_r * block_t >= 4096
    return {"BLOCK_O": _FORWARD_O_BLOCK, "BLOCK_T": block_t, "BLOCK_R": block_r, "X_RESIDENT": resident,
            "num_warps": 8 if big else 4, "num_stages": 1}


def _forward_config(T: int, r: int, batch: int, programs_wanted: int) -> dict:
    """Blocks of the forward kernel; the backward's recomputation of z uses the same ones (same shapes, same
    device), so it reproduces z bit for bit.

    A program owns one time tile of one batch element and computes every output channel, all branches, in
    64-channel blocks, so the input tile is read from memory once. When the reduction r = C_in * K_max fits
    one 128-row block (C_in <= 18 with K_max = 7) the im2col tile is gathered once into registers and reused
    by every output block; wider inputs stream it in 32-row chunks per output block (those re-reads hit L1/L2).
    Time tiles shrink (128 -> 64 -> 32) until the gathered tile stays small and there are ``programs_wanted``
    programs to fill the device."""
    resident = r <= _RESIDENT_R_BLOCKS[-1]
    block_r = _smallest_block_covering(r, _RESIDENT_R_BLOCKS) if resident else _STREAMED_R_BLOCK
    block_t = _time_block(T)
    while block_t > _TIME_BLOCKS[0] and (block_t > _largest_time_block(block_r)
                                         or batch * triton.cdiv(T, block_t) < programs_wanted):
        block_t //= 2
    return _forward_tile_config(block_r, block_t, resident)


def _grad_input_config(T: int, c_in: int, tensor_cores: bool = True) -> dict:
    """Blocks of the dx kernel. tl.dot pads C_in up to 16 rows: on tensor cores (half inputs, TF32) that is
    nearly free and the gz tile is read once for all channels; with IEEE fp32 products (FMA units) and fewer
    than 4 channels the kernel instead multiplies and adds elementwise, one channel at a time, over
    (BLOCK_Q, BLOCK_T) tiles of (output channel, tap) x time."""
    use_dot = tensor_cores or c_in >= _DX_DOT_MIN_CHANNELS
    block_c = _smallest_block_covering(c_in, _DX_C_BLOCKS) if use_dot else 1
    block_t = _time_block(T)
    # (BLOCK_Q, BLOCK_T) pairs without spills on sm_80/sm_90 in fp32/fp16/bf16 (checked by the AOT tool); the
    # IEEE fp32 dot over 128 steps takes 16-row chunks, as 32 spilled on sm_80 once gz reads only a channel's own
    # taps.
    block_q = (32 if tensor_cores else 16) if (use_dot and block_t > 32) else 64
    return {"BLOCK_C": block_c, "BLOCK_Q": block_q, "BLOCK_T": block_t, "USE_DOT": use_dot,
            "num_warps": 8 if (block_t > 32 or block_c > 16) else 4, "num_stages": 2}


def _grad_weight_config(r: int) -> dict:
    """Blocks of the dW kernel: up to 128 (channel, tap) columns, so that for C_in <= 18 with 7 taps one
    program column covers them all and gz is read once."""
    block_r = _smallest_block_covering(r, _DW_R_BLOCKS)
    # Wider column blocks take 16-step chunks: the (BLOCK_T, BLOCK_R) gathered x tile and the fp32 FMA dot of
    # sm_80 otherwise spill there.
    return {"BLOCK_O": _DW_O_BLOCK, "BLOCK_R": block_r, "BLOCK_T": 16 if block_r >= 32 else _DW_TIME_BLOCK,
            "num_warps": 8 if block_r >= 32 else 4, "num_stages": 2}


_SM_COUNTS: dict[int, int] = {}


_PROGRAMS_PER_SM = 4


def _parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy: 4 per SM on CUDA; a few under the interpreter, so that the
    two-stage reduction is exercised there too."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROGRAMS_PER_SM * _SM_COUNTS[index]


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _common_constexprs(dtype: torch.dtype, device: torch.device) -> dict:
    return {"UPCAST": _interpreting(device) and dtype != torch.float32, "DOT_PRECISION": _dot_precision(dtype)}


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _launch_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                    taps: torch.Tensor) -> torch.Tensor:
    B, c_in, T = x.shape
    c_total, _, k_max = weight.shape
    r = c_in * k_max
    out = new_output((B, c_total, T), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg = _forward_config(T, r, B, _parallel_programs(x.device) // 2)
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    _msc_forward_kernel[(n_t * B,)](
        x, weight, weight if bias is None else bias, taps, out, T, c_total, r, n_t,
        *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATION_CODES[activation], K_MAX=k_max,
        **cfg, **_common_constexprs(x.dtype, x.device))
    return out


def _launch_preactivation_grad(grad, x, weight, bias, activation, taps) -> torch.Tensor:
    B, c_in, T = x.shape
    c_total, _, k_max = weight.shape
    r = c_in * k_max
    gz = new_output((B, c_total, T), dtype=x.dtype, device=x.device)
    cfg = _forward_config(T, r, B, _parallel_programs(x.device) // 2)
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    _msc_preactivation_grad_kernel[(n_t * B,)](
        x, weight, weight if bias is None else bias, taps, grad, gz, T, c_total, r, n_t,
        *x.stride(), *grad.stride(),
        HAS_BIAS=bias is not None, ACTIVATION=_ACTIVATION_CODES[activation], K_MAX=k_max,
        **cfg, **_common_constexprs(x.dtype, x.device))
    return gz


def _launch_grad_input(gz, weight, taps, x_shape, dtype) -> torch.Tensor:
    B, c_in, T = x_shape
    c_total, _, k_max = weight.shape
    dx = new_output((B, c_in, T), dtype=dtype, device=gz.device)
    cfg = _grad_input_config(T, c_in, tensor_cores=_dot_precision(dtype) == "tf32" or dtype != torch.float32)
    n_c = triton.cdiv(c_in, cfg["BLOCK_C"]) if cfg["USE_DOT"] else 1
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    _msc_grad_input_kernel[(n_c * n_t * B,)](
        gz, weight, taps, dx, T, c_in, c_total, c_in * k_max, n_c, n_t, *gz.stride(), *dx.stride(),
        K_MAX=k_max, **cfg, **_common_constexprs(dtype, gz.device))
    return dx


def _sum_partials(partials: torch.Tensor, out: torch.Tensor) -> None:
    splits, n = partials.shape[0], out.numel()
    _sum_partials_kernel[(triton.cdiv(n, _SUM_BLOCK),)](partials, out, n, splits, BLOCK=_SUM_BLOCK, num_warps=4)


def _launch_grad_weight(gz, x, weight, with_bias: bool):
    B, c_in, T = x.shape
    c_total, _, k_max = weight.shape
    r = c_in * k_max
    cfg = _grad_weight_config(r)
    n_o, n_r = triton.cdiv(c_total, cfg["BLOCK_O"]), triton.cdiv(r, cfg["BLOCK_R"])
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    n_bt = B * n_t
    # Split the batch x time reduction so the grid fills the device; the split depends only on the shapes
    # and the device, so the summation order (and every bit of dW) is the same on every run.
    splits = max(1, min(n_bt, triton.cdiv(_parallel_programs(x.device), n_o * n_r)))
    chunk = triton.cdiv(n_bt, splits)
    splits = triton.cdiv(n_bt, chunk)
    dw_part = new_output((splits, c_total, r), dtype=torch.float32, device=x.device)
    db_part = new_output((splits, c_total), dtype=torch.float32, device=x.device) if with_bias else dw_part
    _msc_grad_weight_partial_kernel[(n_o * n_r * splits,)](
        gz, x, dw_part, db_part, T, c_total, r, n_o, n_r, n_t, n_bt, chunk, *gz.stride(), *x.stride(),
        HAS_BIAS=with_bias, K_MAX=k_max, **cfg, **_common_constexprs(x.dtype, x.device))
    dw = new_output((c_total, c_in, k_max), dtype=weight.dtype, device=x.device)
    _sum_partials(dw_part, dw)
    db = None
    if with_bias:
        db = new_output((c_total,), dtype=x.dtype, device=x.device)
        _sum_partials(db_part, db)
    return dw, db


# ----------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as opaque nodes with fake implementations and an autograd formula)
# ----------------------------------------------------------------------------------------------------------


def _channel_taps(weight: torch.Tensor, taps: torch.Tensor | None) -> torch.Tensor:
    """Each packed output channel's own kernel size, int32 (C_total,); without ``taps`` every channel has K_max."""
    if taps is None:
        return torch.full((weight.shape[0],), weight.shape[-1], dtype=torch.int32, device=weight.device)
    return taps.to(device=weight.device, dtype=torch.int32).contiguous()


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
             taps: torch.Tensor | None = None) -> torch.Tensor:
    """The forward op's launches: x (B, C_in, T), packed weight (C_total, C_in, K_max), bias -> (B, C_total, T)."""
    # pack_weights already returns contiguous tensors; a direct caller's strided packed weight is tiny to copy.
    return _launch_forward(x, weight.contiguous(), None if bias is None else bias.contiguous(), activation,
                           _channel_taps(weight, taps))


def _backward_launches(grad, x, weight, bias, activation, need_input, need_weight, need_bias, taps=None):
    """The backward op's launches: (dx, dW, db), a gradient not asked for an empty (0,)."""
    empty = x.new_empty((0,))
    taps = _channel_taps(weight, taps)
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    need_bias = need_bias and bias is not None
    if grad.numel() == 0:
        dx = torch.zeros_like(x) if need_input else empty
        dw = torch.zeros_like(weight) if need_weight else empty
        db = torch.zeros_like(bias) if need_bias else empty
        return dx, dw, db
    gz = grad if activation == "none" else _launch_preactivation_grad(grad, x, weight, bias, activation, taps)
    dx = _launch_grad_input(gz, weight, taps, x.shape, x.dtype) if need_input else empty
    dw, db = empty, empty
    if need_weight or need_bias:
        dw_full, db_full = _launch_grad_weight(gz, x, weight, need_bias)
        dw = dw_full if need_weight else empty
        db = db_full if need_bias else empty
    return dx, dw, db


@torch.library.custom_op("fastmsc::multiscale_conv1d_packed", mutates_args=())
def _packed_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str, taps: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C_in, T), packed weight (C_total, C_in, K_max), bias (C_total,) or None -> (B, C_total, T); taps
    (C_total,) each channel's own kernel size (``branch_taps``), None for K_max everywhere."""
    return _forward(x, weight, bias, activation, taps)


@_packed_forward.register_fake
def _(x, weight, bias, activation, taps=None):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2]))


@torch.library.custom_op("fastmsc::multiscale_conv1d_packed_backward", mutates_args=())
def _packed_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str, need_input: bool, need_weight: bool, need_bias: bool,
                     taps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (B, C_in, T), dW (C_total, C_in, K_max), db (C_total,)); a gradient not asked for is an empty (0,)."""
    return _backward_launches(grad, x, weight, bias, activation, need_input, need_weight, need_bias, taps)


@_packed_backward.register_fake
def _(grad, x, weight, bias, activation, need_input, need_weight, need_bias, taps=None):
    empty = x.new_empty((0,))
    return (x.new_empty(x.shape) if need_input else empty,
            weight.new_empty(weight.shape) if need_weight else empty,
            x.new_empty((weight.shape[0],)) if (need_bias and bias is not None) else empty)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, taps = inputs
    ctx.save_for_backward(x, weight, bias, taps)
    ctx.activation = activation


def _reference_packed(x, weight, bias, activation, taps):
    """The layer through the reference's differentiable math, each branch (a run of channels with one kernel size in
    ``taps``) on its own taps of the packed weight: a zero padding tap would carry a non-finite x beyond the
    branch's receptive field (0 * NaN)."""
    k_max = weight.shape[-1]
    sizes = [k_max] * weight.shape[0] if taps is None else taps.tolist()  # a host sync, on this path only
    weights, biases, start = [], [], 0
    for k, run in itertools.groupby(sizes):
        n, pad = len(list(run)), (k_max - k) // 2
        weights.append(weight[start:start + n, :, pad:k_max - pad])
        biases.append(None if bias is None else bias[start:start + n])
        start += n
    return multiscale_conv1d_reference(x, weights, None if bias is None else biases,
                                       None if activation == "none" else activation)


def _backward(ctx, grad):
    x, weight, bias, taps = ctx.saved_tensors
    needs = ctx.needs_input_grad  # 4 or 5 flags: the dispatcher drops a trailing taps left at its default
    if graph_wanted(grad, x, weight, bias):
        dx, dw, db = recomputed_grads(lambda x, w, b: _reference_packed(x, w, b, ctx.activation, taps),
                                      (x, weight, bias), needs[:3], (grad,))
        return (dx, dw, db, None, None)[:len(needs)]
    need_input, need_weight = needs[0], needs[1]
    need_bias = bias is not None and needs[2]
    dx, dw, db = _packed_backward(grad, x, weight, bias, ctx.activation, need_input, need_weight, need_bias, taps)
    return (dx if need_input else None, dw if need_weight else None, db if need_bias else None, None, None)[:len(needs)]


_packed_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public entry points (contract of fastmsc.backend.Op)
# ----------------------------------------------------------------------------------------------------------


def pack_weights(weights, biases):
    """Pack branch weights into one (C_total, C_in, K_max) tensor, each branch centred and zero-padded to K_max
    taps, and the biases into one (C_total,) tensor (zeros for a branch without one), or None without any.

    Differentiable torch ops, so autograd routes the packed tensors' gradients back to each branch."""
    k_max = max(w.shape[-1] for w in weights)
    packed_weight = torch.cat([F.pad(w, ((k_max - w.shape[-1]) // 2,) * 2) for w in weights], dim=0)
    packed_bias = None
    if biases is not None and any(b is not None for b in biases):
        packed_bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b
                                 for w, b in zip(weights, biases, strict=True)])
    return packed_weight, packed_bias


def branch_taps(weights) -> torch.Tensor:
    """Each packed output channel's own kernel size k_i, int32 (C_total,): the kernels multiply only those taps
    of a channel, never its zero padding, so a NaN or inf input stays within each branch's receptive field."""
    return torch.cat([torch.full((w.shape[0],), w.shape[-1], dtype=torch.int32, device=w.device) for w in weights])


def fused(x, weights, biases=None, activation=None):
    """Multi-scale "same" Conv1d + concat: x (B, C_in, T) -> (B, sum_i C_out_i, T); arguments validated by
    fastmsc.ops.multiscale_conv1d (weights[i] (C_out_i, C_in, k_i), k_i odd; biases None or per branch)."""
    packed_weight, packed_bias = pack_weights(weights, biases)
    return _packed_forward(x, packed_weight, packed_bias, "none" if activation is None else activation,
                           branch_taps(weights))


def fused_unsupported(device_type: str, **call_args) -> str | None:
    """None when the fused kernels can run these arguments on ``device_type``, else the reason."""
    reason = triton_unsupported(device_type)
    if reason is not None or not call_args:
        return reason
    x = call_args.get("x")
    weights = call_args.get("weights") or ()
    if x is not None:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            given = str(x.dtype).replace("torch.", "")
            return f"the fused kernels take float32, float16 or bfloat16 inputs, got {given}"
        c_total = sum(w.shape[0] for w in weights)
        k_max = max([w.shape[-1] for w in weights] or [1])
        per_sample = max(x.shape[1], c_total) * x.shape[2]
        largest_stride_offset = sum((size - 1) * abs(stride)
                                    for size, stride in zip(x.shape[1:], x.stride()[1:], strict=True))
        if max(per_sample, largest_stride_offset, c_total * x.shape[1] * k_max) > _INT32_LIMIT:
            return "one sample of x or of the output spans more than 2**31 elements, beyond the kernels' 32-bit offsets"
    return capability_unsupported(x)


__all__ = ["branch_taps", "fused", "fused_unsupported", "pack_weights"]
