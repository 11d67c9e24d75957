"""The Triton kernels of the fused multi-scale conv (:mod:`fastmsc.kernels.multiscale_conv1d` holds their design,
launchers and custom ops). x (B, C_in, T), the packed weight (C_total, C_in, K_max) and gz/out (B, C_total, T) by
strides; the reduction runs over r = c * K_max + j (channel, tap) flattened."""

from __future__ import annotations

import triton
import triton.language as tl


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
def _time_tile(x_ptr, N_T, T, R, stride_xb, stride_xc, stride_xt, K_MAX: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_R: tl.constexpr, X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr):
    """(batch index, time offsets, x[b] base pointer, im2col tile and its non-finite flag from _resident_x_tile) of
    a program of the forward-shaped kernels, whose grid runs over (b, time tile) with the time tile fastest."""
    pid = tl.program_id(0)
    pid_b = pid // N_T
    offs_t = (pid % N_T) * BLOCK_T + tl.arange(0, BLOCK_T)
    x_base = x_ptr + pid_b.to(tl.int64) * stride_xb
    x_tile, x_non_finite = _resident_x_tile(x_base, offs_t, T, R, stride_xc, stride_xt, K_MAX, BLOCK_R, X_RESIDENT,
                                            UPCAST)
    return pid_b, offs_t, x_base, x_tile, x_non_finite


@triton.jit
def _weight_tile(w_ptr, offs_o, o_mask, offs_r, R, UPCAST: tl.constexpr):
    """The (len(offs_o), len(offs_r)) slice W[o, r] of the packed (C_TOTAL, R) weight, 0 outside o_mask x r < R."""
    w = tl.load(w_ptr + offs_o[:, None] * R + offs_r[None, :], mask=o_mask[:, None] & (offs_r < R)[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _own_tap_gz(gz_base, out_channel, tap, q_mask, taps_ptr, offs_t, T, stride_go, stride_gt, K_MAX: tl.constexpr):
    """gz[b, o, t + K_MAX // 2 - j] as a (len(q), len(offs_t)) tile for q = o * K_MAX + j, read only at the taps j of
    o's own branch (``taps_ptr``: its kernel size) and 0 elsewhere, not upcast."""
    own_tap = tl.abs(tap - K_MAX // 2) <= tl.load(taps_ptr + out_channel, mask=q_mask, other=0) // 2
    src_t = offs_t[None, :] + (K_MAX // 2 - tap[:, None])
    return tl.load(gz_base + out_channel[:, None] * stride_go + src_t * stride_gt,
                   mask=(q_mask & own_tap)[:, None] & (src_t >= 0) & (src_t < T), other=0.0)


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
        w = _weight_tile(w_ptr, offs_o, o_mask, tl.arange(0, BLOCK_R), R, UPCAST)
        non_finite = x_non_finite
        acc = tl.dot(w, x_tile, acc, input_precision=DOT_PRECISION)
    else:
        non_finite = 0
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            w = _weight_tile(w_ptr, offs_o, o_mask, offs_r, R, UPCAST)
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
    pid_b, offs_t, x_base, x_tile, x_non_finite = _time_tile(x_ptr, N_T, T, R, stride_xb, stride_xc, stride_xt, K_MAX,
                                                             BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST)
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
    pid_b, offs_t, x_base, x_tile, x_non_finite = _time_tile(x_ptr, N_T, T, R, stride_xb, stride_xc, stride_xt, K_MAX,
                                                             BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST)
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
                           UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dx[b, c, t] = sum_{o, j} W[o, c, j] gz[b, o, t + K_MAX // 2 - j] for a (BLOCK_C, BLOCK_T) tile.

    The reduction runs over q = o * K_MAX + j in BLOCK_Q chunks on tensor cores (C_in padded to BLOCK_C >= 16
    rows). gz is read only at the taps of o's own branch (``taps_ptr``: its kernel size): at a zero padding tap a
    NaN or inf in gz (GELU's slope at a non-finite z) would still give 0 * NaN = NaN.
    """
    pid = tl.program_id(0)
    pid_c = pid % N_C
    pid_t = (pid // N_C) % N_T
    pid_b = pid // (N_C * N_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    gz_base = gz_ptr + pid_b.to(tl.int64) * stride_gb
    dx_base = dx_ptr + pid_b.to(tl.int64) * stride_db
    Q = C_TOTAL * K_MAX
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
        g = _own_tap_gz(gz_base, out_channel, tap, q_mask, taps_ptr, offs_t, T, stride_go, stride_gt, K_MAX)
        if UPCAST:
            w = w.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(w, g, acc, input_precision=DOT_PRECISION)
    dx = dx_base + offs_c[:, None] * stride_dc + offs_t[None, :] * stride_dt
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=c_mask[:, None] & t_mask[None, :])


@triton.jit
def _msc_grad_weight_partial_kernel(gz_ptr, x_ptr, part_ptr, T, C_TOTAL, R, N_O, N_R, N_T, N_BT, N_SPLITS,
                                    stride_gb, stride_go, stride_gt, stride_xb, stride_xc, stride_xt,
                                    HAS_BIAS: tl.constexpr, K_MAX: tl.constexpr, BLOCK_O: tl.constexpr,
                                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr):
    """Partial sums of dW[o, r] = sum_{b, t} gz[b, o, t] x[b, c, t + j - K_MAX // 2] (r = c * K_MAX + j) and
    db[o] = sum_{b, t} gz[b, o, t] over split s's fixed range of (b, time tile) pairs: N_BT // N_SPLITS pairs,
    one more for the first N_BT % N_SPLITS splits (none empty: N_SPLITS <= N_BT).

    Writes part[s, o * R + r] and, from the r-block 0 programs, part[s, C_TOTAL * R + o] (fp32, contiguous
    (S, C_TOTAL * (R + 1))): dW and db share one buffer, so one summing kernel finishes both."""
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
    per_split = N_BT // N_SPLITS
    longer = N_BT % N_SPLITS
    start = pid_s * per_split + tl.minimum(pid_s, longer)  # 32-bit: a 64-bit division would cost a stack frame
    end = start + per_split + tl.where(pid_s < longer, 1, 0)
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
    part = part_ptr + pid_s.to(tl.int64) * C_TOTAL * (R + 1)
    tl.store(part + offs_o[:, None] * R + offs_r[None, :], acc, mask=o_mask[:, None] & r_mask[None, :])
    if HAS_BIAS:
        if pid_r == 0:
            tl.store(part + C_TOTAL * R + offs_o, bias_acc, mask=o_mask)


@triton.jit
def _msc_grad_weight_sum_kernel(part_ptr, layout_ptr, dw_ptr, db_ptr, C_TOTAL, R, S, HAS_BIAS: tl.constexpr,
                                K_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """Adds the S partial sums of _msc_grad_weight_partial_kernel in the fixed order s = 0, 1, ... and scatters them
    into the branches' own layouts.

    Element n of a partial row is dW[o, c * K_MAX + j] for n < C_TOTAL * R, else db[n - C_TOTAL * R]. dW goes to
    dw_flat[offset[o] + c * k_o + j - (K_MAX - k_o) // 2], only for the taps j of o's own branch (k_o = taps[o]);
    ``layout`` is int32 (2, C_TOTAL): taps, then offsets, so that each branch's gradient is a contiguous
    (C_out_i, C_in, k_i) slice of dw_flat and the zero padding taps (NaN there when x holds a NaN) are dropped."""
    N_W = C_TOTAL * R
    n_all = N_W + C_TOTAL if HAS_BIAS else N_W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_all
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    part = part_ptr + offs
    for _ in range(0, S):
        acc += tl.load(part, mask=mask, other=0.0)
        part += N_W + C_TOTAL
    is_w = offs < N_W
    channel = tl.where(is_w, offs // R, 0)
    r = offs % R
    tap = r % K_MAX
    k_o = tl.load(layout_ptr + channel, mask=mask & is_w, other=K_MAX)
    offset = tl.load(layout_ptr + C_TOTAL + channel, mask=mask & is_w, other=0)
    own_tap = tl.abs(tap - K_MAX // 2) <= k_o // 2
    dest = offset + (r // K_MAX) * k_o + tap - (K_MAX - k_o) // 2
    tl.store(dw_ptr + dest, acc.to(dw_ptr.dtype.element_ty), mask=mask & is_w & own_tap)
    if HAS_BIAS:
        tl.store(db_ptr + (offs - N_W), acc.to(db_ptr.dtype.element_ty), mask=mask & ~is_w)
