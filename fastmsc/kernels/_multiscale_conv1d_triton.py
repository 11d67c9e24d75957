"""The Triton kernels of the fused multi-scale conv (:mod:`fastmsc.kernels.multiscale_conv1d` holds their design,
launchers and custom ops). x (B, C_in, T) and gz/out (B, C_total, T) by strides; the weights read in place from the
branches' own contiguous (C_out_i, C_in, k_i) tensors (see _branch_channels); the reduction runs over
r = c * K_max + j (channel, tap) flattened, tap j of a k_o-tap channel being its own tap j - (K_max - k_o) // 2."""

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
def _select(i, v0, v1, v2, v3, NUM_BRANCHES: tl.constexpr):
    """v_i for a scalar i < NUM_BRANCHES (pointers or ints): a chain of scalar selects, no per-element cost."""
    v = v0
    if NUM_BRANCHES > 1:
        v = tl.where(i >= 1, v1, v)
    if NUM_BRANCHES > 2:
        v = tl.where(i >= 2, v2, v)
    if NUM_BRANCHES > 3:
        v = tl.where(i >= 3, v3, v)
    return v


@triton.jit
def _branch_blocks(first1, first2, first3, C_TOTAL, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Block counts of the branch-by-branch blocking of SCALE units per channel (1: channels; K_MAX: (channel, tap)
    pairs) into BLOCK-unit blocks that never span two branches: (blocks before branch 1, 2, 3, all blocks). Branch i
    has channels [first_i, first_{i+1}) (first_0 = 0, first_4 = C_TOTAL; the host passes C_TOTAL for the firsts
    past the last branch, which then have no block)."""
    n1 = tl.cdiv(first1 * SCALE, BLOCK)
    n2 = n1 + tl.cdiv((first2 - first1) * SCALE, BLOCK)
    n3 = n2 + tl.cdiv((first3 - first2) * SCALE, BLOCK)
    return n1, n2, n3, n3 + tl.cdiv((C_TOTAL - first3) * SCALE, BLOCK)


@triton.jit
def _block_branch(blk, n1, n2, n3, first1, first2, first3, C_TOTAL, SCALE: tl.constexpr, BLOCK: tl.constexpr,
                  NUM_BRANCHES: tl.constexpr):
    """(branch i, first unit of block blk, end unit of its branch, first channel of its branch), scalars: a block's
    weight pointer, kernel size and bias are then scalars too, selected once per block, where a per-channel
    selection cost registers enough to spill."""
    i = (blk >= n1).to(tl.int32) + (blk >= n2).to(tl.int32) + (blk >= n3).to(tl.int32)
    o_first = _select(i, 0, first1, first2, first3, NUM_BRANCHES)
    u0 = o_first * SCALE + (blk - _select(i, 0, n1, n2, n3, NUM_BRANCHES)) * BLOCK
    return i, u0, _select(i, first1, first2, first3, C_TOTAL, NUM_BRANCHES) * SCALE, o_first


@triton.jit
def _branch_channels(o, o_mask, o_first, k_i, layout_ptr, C_TOTAL, C_IN, FLAT: tl.constexpr, K_MAX: tl.constexpr):
    """(k_o, offset of W[o, 0, 0] in the branch's tensor) for the channels ``o`` of one branch (first channel
    o_first, kernel size k_i: k_o is k_i itself, scalar or not), int32: channel o's weights are the contiguous
    (C_IN, k_o) block there. FLAT: the flat concatenation of every branch (more than 4), as one branch whose int32
    (2, C_TOTAL) ``layout_ptr`` gives each channel's k_o (row 0, K_MAX outside o_mask) and offset (row 1)."""
    if FLAT:
        k = tl.load(layout_ptr + o, mask=o_mask, other=K_MAX)
        offset = tl.load(layout_ptr + C_TOTAL + o, mask=o_mask, other=0)
    else:
        k = k_i
        offset = (o - o_first) * C_IN * k_i
    return k, offset


@triton.jit
def _own_tap(tap, k, K_MAX: tl.constexpr):
    """Whether packed tap ``tap`` (0 <= tap < K_MAX) is one of a k-tap channel's own taps (centred in K_MAX)."""
    return tl.abs(tap - K_MAX // 2) <= k // 2


@triton.jit
def _add_non_finite_terms(acc, x_base, w_ptr, w_off, k_o, o_mask, offs_t, T, R, stride_xc, stride_xt,
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
        own_tap = o_mask & _own_tap(tl.zeros_like(w_off) + tap, k_o, K_MAX)  # a block even where k_o is a scalar
        w = tl.load(w_ptr + w_off + channel * k_o + tap - (K_MAX - k_o) // 2, mask=own_tap, other=0.0).to(tl.float32)
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
def _weight_tile(w_ptr, w_off, k_o, o_mask, offs_r, R, FLAT: tl.constexpr, K_MAX: tl.constexpr,
                 UPCAST: tl.constexpr):
    """The (len(w_off), len(offs_r)) tile W[o, r], r = c * K_MAX + j, read in place from channel o's (C_in, k_o) block
    in the branch tensor at w_ptr (_branch_channels): its own tap j - (K_MAX - k_o) // 2, and 0 at the padding taps
    (masked loads, so no packed copy is needed), outside o_mask and for r >= R. k_o is one scalar for the branch
    unless FLAT, so the offsets are a row part plus a column part, as cheap as a packed weight's."""
    tap = offs_r % K_MAX
    if FLAT:
        own = _own_tap(tap[None, :], k_o[:, None], K_MAX)
        offset = w_off[:, None] + (offs_r // K_MAX)[None, :] * k_o[:, None] + tap[None, :] - (K_MAX - k_o[:, None]) // 2
        w = tl.load(w_ptr + offset, mask=o_mask[:, None] & (offs_r < R)[None, :] & own, other=0.0)
    else:
        column = (offs_r // K_MAX) * k_o + tap - (K_MAX - k_o) // 2
        w = tl.load(w_ptr + w_off[:, None] + column[None, :],
                    mask=o_mask[:, None] & ((offs_r < R) & _own_tap(tap, k_o, K_MAX))[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _own_tap_gz(gz_base, out_channel, tap, own_tap, q_mask, offs_t, T, stride_go, stride_gt, K_MAX: tl.constexpr):
    """gz[b, o, t + K_MAX // 2 - j] as a (len(q), len(offs_t)) tile for q = o * K_MAX + j, read only where
    ``own_tap`` (the taps j of o's own branch) and 0 elsewhere, not upcast."""
    src_t = offs_t[None, :] + (K_MAX // 2 - tap[:, None])
    return tl.load(gz_base + out_channel[:, None] * stride_go + src_t * stride_gt,
                   mask=(q_mask & own_tap)[:, None] & (src_t >= 0) & (src_t < T), other=0.0)


@triton.jit
def _preactivation_tile(x_tile, x_non_finite, x_base, w_ptr, b_ptr, has_bias, layout_ptr, o_first, o_end, k_i, offs_o,
                        offs_t, T, C_TOTAL, R, stride_xc, stride_xt, FLAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        K_MAX: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                        X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z[o, t] = bias[o] + sum_{c, j} W[o, c, j] x[b, c, t + j - K_MAX // 2] for a (BLOCK_O, BLOCK_T) tile of the
    channels offs_o of one branch (channels [o_first, o_end), kernel size k_i, weights (C_out_i, C_in, k_i) read in
    place at w_ptr, bias (C_out_i,) at b_ptr when ``has_bias`` is 1), fp32.

    With X_RESIDENT the whole reduction is the one (BLOCK_R >= R, BLOCK_T) im2col tile ``x_tile`` the caller
    loaded (non-finite values already read as 0, ``x_non_finite`` whether it held any); otherwise the tile is
    gathered from ``x_base`` in BLOCK_R chunks. The dots read non-finite x as 0, and _add_non_finite_terms adds
    those terms for the taps of each channel's own branch, only when the time tile holds any."""
    o_mask = offs_o < o_end
    k_o, w_off = _branch_channels(offs_o, o_mask, o_first, k_i, layout_ptr, C_TOTAL, R // K_MAX, FLAT, K_MAX)
    acc = tl.zeros((BLOCK_O, BLOCK_T), dtype=tl.float32)
    if X_RESIDENT:
        w = _weight_tile(w_ptr, w_off, k_o, o_mask, tl.arange(0, BLOCK_R), R, FLAT, K_MAX, UPCAST)
        non_finite = x_non_finite
        acc = tl.dot(w, x_tile, acc, input_precision=DOT_PRECISION)
    else:
        non_finite = 0
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            w = _weight_tile(w_ptr, w_off, k_o, o_mask, offs_r, R, FLAT, K_MAX, UPCAST)
            xs = _im2col_tile(x_base, offs_r, offs_t, T, R, stride_xc, stride_xt, K_MAX, UPCAST)
            finite = _finite(xs)
            non_finite = tl.maximum(non_finite, tl.max(tl.max(tl.where(finite, 0, 1), 1), 0))
            acc = tl.dot(w, tl.where(finite, xs, 0.0), acc, input_precision=DOT_PRECISION)
    if non_finite > 0:
        acc = _add_non_finite_terms(acc, x_base, w_ptr, w_off, k_o, o_mask, offs_t, T, R, stride_xc, stride_xt, K_MAX)
    if HAS_BIAS:
        has = (tl.zeros_like(offs_o) + has_bias) != 0
        acc += tl.load(b_ptr + (offs_o - o_first), mask=o_mask & has, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _branch(i, w0, w1, w2, w3, b0, b1, b2, b3, k0, k1, k2, k3, BIAS_BITS, NUM_BRANCHES: tl.constexpr):
    """Branch i's (weight pointer, bias pointer, 1 if it has a bias else 0, kernel size), scalars."""
    return (_select(i, w0, w1, w2, w3, NUM_BRANCHES), _select(i, b0, b1, b2, b3, NUM_BRANCHES), (BIAS_BITS >> i) & 1,
            _select(i, k0, k1, k2, k3, NUM_BRANCHES))


@triton.jit
def _msc_forward_kernel(x_ptr, w0, w1, w2, w3, b0, b1, b2, b3, layout_ptr, out_ptr, first1, first2, first3,
                        k0, k1, k2, k3, BIAS_BITS, T, C_TOTAL, R, N_T,
                        stride_xb, stride_xc, stride_xt, stride_ob, stride_oc, stride_ot,
                        NUM_BRANCHES: tl.constexpr, FLAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        ACTIVATION: tl.constexpr, K_MAX: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_R: tl.constexpr, X_RESIDENT: tl.constexpr, UPCAST: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """out[b, o, :] = act(z[b, o, :]) over one BLOCK_T time tile of one batch element, every output channel in
    BLOCK_O blocks, branch after branch (a block never spans two branches, so a block's weight pointer, kernel size
    and bias are scalars: per-channel selection cost registers enough to spill)."""
    pid_b, offs_t, x_base, x_tile, x_non_finite = _time_tile(x_ptr, N_T, T, R, stride_xb, stride_xc, stride_xt, K_MAX,
                                                             BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST)
    out_base = out_ptr + pid_b.to(tl.int64) * stride_ob
    n1, n2, n3, n_blocks = _branch_blocks(first1, first2, first3, C_TOTAL, 1, BLOCK_O)
    for blk in range(0, n_blocks):
        i, o0, o_end, o_first = _block_branch(blk, n1, n2, n3, first1, first2, first3, C_TOTAL, 1, BLOCK_O,
                                              NUM_BRANCHES)
        w_ptr, b_ptr, has_bias, k_i = _branch(i, w0, w1, w2, w3, b0, b1, b2, b3, k0, k1, k2, k3, BIAS_BITS,
                                              NUM_BRANCHES)
        offs_o = o0 + tl.arange(0, BLOCK_O)
        z = _preactivation_tile(x_tile, x_non_finite, x_base, w_ptr, b_ptr, has_bias, layout_ptr, o_first, o_end,
                                k_i, offs_o, offs_t, T, C_TOTAL, R, stride_xc, stride_xt, FLAT, HAS_BIAS, K_MAX,
                                BLOCK_O, BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST, DOT_PRECISION)
        y = _activate(z, ACTIVATION)
        out = out_base + offs_o[:, None] * stride_oc + offs_t[None, :] * stride_ot
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_o[:, None] < o_end) & (offs_t[None, :] < T))


@triton.jit
def _msc_preactivation_grad_kernel(x_ptr, w0, w1, w2, w3, b0, b1, b2, b3, layout_ptr, grad_ptr, gz_ptr, first1, first2,
                                   first3, k0, k1, k2, k3, BIAS_BITS, T, C_TOTAL, R, N_T,
                                   stride_xb, stride_xc, stride_xt, stride_gb, stride_go, stride_gt,
                                   NUM_BRANCHES: tl.constexpr, FLAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                   ACTIVATION: tl.constexpr, K_MAX: tl.constexpr, BLOCK_O: tl.constexpr,
                                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, X_RESIDENT: tl.constexpr,
                                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """gz[b, o, t] = grad[b, o, t] * act'(z[b, o, t]), z recomputed from x with the forward's tiles;
    gz is contiguous (B, C_TOTAL, T)."""
    pid_b, offs_t, x_base, x_tile, x_non_finite = _time_tile(x_ptr, N_T, T, R, stride_xb, stride_xc, stride_xt, K_MAX,
                                                             BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST)
    grad_base = grad_ptr + pid_b.to(tl.int64) * stride_gb
    gz_base = gz_ptr + pid_b.to(tl.int64) * C_TOTAL * T
    n1, n2, n3, n_blocks = _branch_blocks(first1, first2, first3, C_TOTAL, 1, BLOCK_O)
    for blk in range(0, n_blocks):
        i, o0, o_end, o_first = _block_branch(blk, n1, n2, n3, first1, first2, first3, C_TOTAL, 1, BLOCK_O,
                                              NUM_BRANCHES)
        w_ptr, b_ptr, has_bias, k_i = _branch(i, w0, w1, w2, w3, b0, b1, b2, b3, k0, k1, k2, k3, BIAS_BITS,
                                              NUM_BRANCHES)
        offs_o = o0 + tl.arange(0, BLOCK_O)
        z = _preactivation_tile(x_tile, x_non_finite, x_base, w_ptr, b_ptr, has_bias, layout_ptr, o_first, o_end,
                                k_i, offs_o, offs_t, T, C_TOTAL, R, stride_xc, stride_xt, FLAT, HAS_BIAS, K_MAX,
                                BLOCK_O, BLOCK_T, BLOCK_R, X_RESIDENT, UPCAST, DOT_PRECISION)
        mask = (offs_o[:, None] < o_end) & (offs_t[None, :] < T)
        grad = tl.load(grad_base + offs_o[:, None] * stride_go + offs_t[None, :] * stride_gt,
                       mask=mask, other=0.0).to(tl.float32)
        gz = grad * _activation_slope(z, ACTIVATION)
        tl.store(gz_base + offs_o[:, None] * T + offs_t[None, :], gz.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _msc_grad_input_kernel(gz_ptr, w0, w1, w2, w3, layout_ptr, dx_ptr, first1, first2, first3, k0, k1, k2, k3,
                           T, C_IN, C_TOTAL, N_C, N_T, stride_gb, stride_go, stride_gt, stride_db, stride_dc, stride_dt,
                           NUM_BRANCHES: tl.constexpr, FLAT: tl.constexpr, K_MAX: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """dx[b, c, t] = sum_{o, j} W[o, c, j] gz[b, o, t + K_MAX // 2 - j] for a (BLOCK_C, BLOCK_T) tile.

    The reduction runs over q = o * K_MAX + j in BLOCK_Q chunks on tensor cores (C_in padded to BLOCK_C >= 16
    rows), branch after branch (a chunk never spans two, so its weight pointer and kernel size are scalars), the
    weights read in place. gz is read only at the taps of o's own branch: at a zero padding tap a NaN or inf in gz
    (GELU's slope at a non-finite z) would still give 0 * NaN = NaN.
    """
    pid = tl.program_id(0)
    pid_c = pid % N_C
    pid_t = (pid // N_C) % N_T
    pid_b = pid // (N_C * N_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    gz_base = gz_ptr + pid_b.to(tl.int64) * stride_gb
    dx_base = dx_ptr + pid_b.to(tl.int64) * stride_db
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_IN
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    n1, n2, n3, n_chunks = _branch_blocks(first1, first2, first3, C_TOTAL, K_MAX, BLOCK_Q)
    for chunk in range(0, n_chunks):
        i, q0, q_end, o_first = _block_branch(chunk, n1, n2, n3, first1, first2, first3, C_TOTAL, K_MAX, BLOCK_Q,
                                              NUM_BRANCHES)
        w_ptr = _select(i, w0, w1, w2, w3, NUM_BRANCHES)
        k_i = _select(i, k0, k1, k2, k3, NUM_BRANCHES)
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = offs_q < q_end
        out_channel = offs_q // K_MAX
        tap = offs_q % K_MAX
        k_o, w_off = _branch_channels(out_channel, q_mask, o_first, k_i, layout_ptr, C_TOTAL, C_IN, FLAT, K_MAX)
        own_tap = _own_tap(tap, k_o, K_MAX)
        if FLAT:
            rows = offs_c[:, None] * k_o[None, :]
        else:  # one kernel size for the chunk: a row part plus a column part
            rows = (offs_c * k_o)[:, None]
        w = tl.load(w_ptr + (w_off + tap - (K_MAX - k_o) // 2)[None, :] + rows,
                    mask=c_mask[:, None] & (q_mask & own_tap)[None, :], other=0.0)
        g = _own_tap_gz(gz_base, out_channel, tap, own_tap, q_mask, offs_t, T, stride_go, stride_gt, K_MAX)
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
def _msc_grad_weight_sum_kernel(part_ptr, layout_ptr, dw_ptr, db_ptr, first1, first2, first3, k0, k1, k2, k3,
                                start1, start2, start3, C_TOTAL, R, S, NUM_BRANCHES: tl.constexpr, FLAT: tl.constexpr,
                                HAS_BIAS: tl.constexpr, K_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """Adds the S partial sums of _msc_grad_weight_partial_kernel in the fixed order s = 0, 1, ... and scatters them
    into the branches' own layouts.

    Element n of a partial row is dW[o, c * K_MAX + j] for n < C_TOTAL * R, else db[n - C_TOTAL * R]. dW goes to
    channel o's (C_in, k_o) block of dw_flat, at its own tap j - (K_MAX - k_o) // 2, only for the taps j of o's own
    branch: each branch's gradient is a contiguous (C_out_i, C_in, k_i) slice of dw_flat starting at start_i (FLAT:
    one branch with ``layout``, see _branch_channels), and the zero padding taps (NaN there when x holds a NaN) are
    dropped."""
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
    # Per element, channel o's branch i (first channel first_i, kernel size k_i, start_i in dw_flat).
    first = tl.zeros_like(channel)
    k_i = k0 + tl.zeros_like(channel)
    start = tl.zeros_like(channel)
    for i in tl.static_range(1, NUM_BRANCHES):
        first_i = _select(i, 0, first1, first2, first3, NUM_BRANCHES)
        in_i = channel >= first_i
        first = tl.where(in_i, first_i, first)
        k_i = tl.where(in_i, _select(i, k0, k1, k2, k3, NUM_BRANCHES), k_i)
        start = tl.where(in_i, _select(i, 0, start1, start2, start3, NUM_BRANCHES), start)
    k_o, offset = _branch_channels(channel, mask & is_w, first, k_i, layout_ptr, C_TOTAL, R // K_MAX, FLAT, K_MAX)
    dest = dw_ptr + start + offset + (r // K_MAX) * k_o + tap - (K_MAX - k_o) // 2
    tl.store(dest, acc.to(dw_ptr.dtype.element_ty), mask=mask & is_w & _own_tap(tap, k_o, K_MAX))
    if HAS_BIAS:
        tl.store(db_ptr + (offs - N_W), acc.to(db_ptr.dtype.element_ty), mask=mask & ~is_w)
