"""Triton bodies of the persistent LSTM recurrence (launchers and autograd: :mod:`fastmsc.kernels.lstm_persistent`).

One program owns one (batch tile, direction) and loops over every time step of its sequences, the cell state c
held in registers in float32 and the recurrent weights read by every step (W_hh, 4H x H, stays in L2: 32 KB at
H=64 in bf16, 64 KB in fp32, shared by every program of its direction). No program ever waits for another:
each one's sequences are independent of the others', so the launch is race-free by construction, one launch per
layer covers both directions, and the per-step cost is the program's own arithmetic and L2 reads instead of a
GEMM launch and a gate launch per step (about 2T+1 launches each way in the stepwise path).

The recurrent product h_{t-1} W_hhᵀ runs over the hidden size in BLOCK_K-wide chunks, so that only one chunk of
W_hh (4 x BLOCK_K x H) is in registers at a time: whole gate blocks per product spill (measured with the AOT check
at every warp count), and at H = 128 even the chunked kernels do, so the launcher takes H <= 64. Registers
cannot be sliced, so the chunks of h_{t-1} are read back from where
the previous step stored h (``out``, which every step writes anyway; h0 at a sequence's first step), after a
barrier that makes that step's stores visible to the whole program. The backward reads its chunks of dz back from
the dz it stores the same way.

Per step and program (B_t = BLOCK_B rows, H hidden): reads xproj 4·B_t·H values, W_hh 4·H·H values (L2), and
writes out (B_t·H), and when training the gates (4·B_t·H) and cells (B_t·H); computes 8·B_t·H·H FLOPs on tensor
cores. At B_t=16, H=64, bf16: 32 KB of L2 reads and 0.5 MFLOP per step, ~0.5 µs with the barrier, against ~8-12
µs of launch latency per step for cuDNN's stepwise algorithm at B=32 (see the module docstring of lstm_persistent
for the whole estimate).

Sequence lengths follow pack_padded_sequence: row b is active at loop step s < lengths[b]; the forward direction
reads time t = s, the reverse t = lengths[b] - 1 - s. At an inactive step the row writes zeros at t = s (a padded
position, so each (row, t) is written exactly once per direction) and keeps its state. Gate order i, f, g, o.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): finite for every finite x (exp overflows to inf and gives 1), and exact at
    # the extremes; NaN in, NaN out.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _step_index(s, seq_len, REVERSE):
    """(time index read at loop step s, whether the row is active there) for each row of the tile."""
    active = s < seq_len
    t = tl.where(REVERSE, seq_len - 1 - s, s)
    return tl.where(active, t, 0), active


@triton.jit
def _dot(a, w, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a @ w with fp32 accumulation: a in w's dtype (in fp32 where the interpreter lacks half arithmetic)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=INPUT_PRECISION)
    return tl.dot(a.to(w.dtype), w, input_precision=INPUT_PRECISION)


@triton.jit
def _program_tile(B, T, H, LENGTHS, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_LENGTHS: tl.constexpr):
    """This program's direction d, its rows (BLOCK_B sequences) and their lengths, the hidden columns, the offsets
    of its (rows, columns) in a (D, B, H) state, and the offsets of one BLOCK_K-wide chunk."""
    pid_b, d = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    if HAS_LENGTHS:
        seq_len = tl.load(LENGTHS + rows, mask=row_ok, other=0).to(tl.int32)
    else:
        seq_len = tl.where(row_ok, T, 0)
    state_at = d * B * H + rows[:, None] * H + cols[None, :]
    return d, rows, row_ok, cols, col_ok, row_ok[:, None] & col_ok[None, :], seq_len, state_at, tl.arange(0, BLOCK_K)


@triton.jit
def lstm_persistent_fwd_kernel(
    XPROJ,  # (B, T, D*4H): x W_ihᵀ, no bias
    BIAS,  # (D*4H,) fp32 (b_ih + b_hh), if HAS_BIAS
    W_HH,  # (D, 4H, H)
    H0, C0,  # (D, B, H), if HAS_STATE
    LENGTHS,  # (B,) int64, if HAS_LENGTHS
    OUT,  # (B, T, D*H); also where each step reads h_{t-1} back
    H_N, C_N,  # (D, B, H)
    GATES,  # (B, T, D*4H): activated i, f, g, o, if SAVE
    CELLS,  # (B, T, D*H), if SAVE
    B, T, H,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    d, rows, row_ok, cols, col_ok, tile_ok, seq_len, state_at, ks = _program_tile(
        B, T, H, LENGTHS, BLOCK_B, BLOCK_H, BLOCK_K, HAS_LENGTHS)
    reverse = d == 1
    if HAS_STATE:
        h = tl.load(H0 + state_at, mask=tile_ok, other=0.0).to(tl.float32)
        c = tl.load(C0 + state_at, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        c = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    if HAS_BIAS:
        b_i = tl.load(BIAS + d * 4 * H + 0 * H + cols, mask=col_ok, other=0.0)[None, :]
        b_f = tl.load(BIAS + d * 4 * H + 1 * H + cols, mask=col_ok, other=0.0)[None, :]
        b_g = tl.load(BIAS + d * 4 * H + 2 * H + cols, mask=col_ok, other=0.0)[None, :]
        b_o = tl.load(BIAS + d * 4 * H + 3 * H + cols, mask=col_ok, other=0.0)[None, :]
    else:
        b_i = tl.zeros((1, BLOCK_H), tl.float32)
        b_f = tl.zeros((1, BLOCK_H), tl.float32)
        b_g = tl.zeros((1, BLOCK_H), tl.float32)
        b_o = tl.zeros((1, BLOCK_H), tl.float32)
    W = W_HH + d * 4 * H * H
    G = D * 4 * H
    for s in range(0, T):
        t, active = _step_index(s, seq_len, reverse)
        act = active[:, None] & col_ok[None, :]
        x_at = XPROJ + (rows[:, None] * T + t[:, None]) * G + d * 4 * H + cols[None, :]
        z_i = tl.load(x_at + 0 * H, mask=act, other=0.0).to(tl.float32) + b_i
        z_f = tl.load(x_at + 1 * H, mask=act, other=0.0).to(tl.float32) + b_f
        z_g = tl.load(x_at + 2 * H, mask=act, other=0.0).to(tl.float32) + b_g
        z_o = tl.load(x_at + 3 * H, mask=act, other=0.0).to(tl.float32) + b_o
        # h_{t-1}: h0 (or zeros) at the first step, else what the previous step stored at t - 1 (t + 1 reverse)
        t_prev = tl.where(reverse, t + 1, t - 1)
        has_prev = active & (t_prev >= 0) & (t_prev < seq_len)
        first = active & ~has_prev
        for k0 in tl.static_range(0, BLOCK_H, BLOCK_K):
            k = k0 + ks
            k_ok = k < H
            h_k = tl.load(OUT + (rows[:, None] * T + t_prev[:, None]) * (D * H) + d * H + k[None, :],
                          mask=has_prev[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if HAS_STATE:
                h_k += tl.load(H0 + d * B * H + rows[:, None] * H + k[None, :], mask=first[:, None] & k_ok[None, :],
                               other=0.0).to(tl.float32)
            # Wᵀ chunk of each gate: w[k, j] = W[g*H + j, k], read in W's row-major order and transposed on chip
            w_at = W + cols[None, :] * H + k[:, None]
            w_ok = k_ok[:, None] & col_ok[None, :]
            z_i += _dot(h_k, tl.load(w_at + 0 * H * H, mask=w_ok, other=0.0), DOT_FP32, INPUT_PRECISION)
            z_f += _dot(h_k, tl.load(w_at + 1 * H * H, mask=w_ok, other=0.0), DOT_FP32, INPUT_PRECISION)
            z_g += _dot(h_k, tl.load(w_at + 2 * H * H, mask=w_ok, other=0.0), DOT_FP32, INPUT_PRECISION)
            z_o += _dot(h_k, tl.load(w_at + 3 * H * H, mask=w_ok, other=0.0), DOT_FP32, INPUT_PRECISION)
        i_t, f_t, g_t, o_t = _sigmoid(z_i), _sigmoid(z_f), _tanh(z_g), _sigmoid(z_o)
        c_new = f_t * c + i_t * g_t
        h_new = o_t * _tanh(c_new)
        c = tl.where(active[:, None], c_new, c)
        h = tl.where(active[:, None], h_new, h)
        # Inactive rows write zeros at t = s, a padded position (s >= lengths[b])
        t_out = tl.where(active, t, s)
        keep = active[:, None]
        out_at = (rows[:, None] * T + t_out[:, None]) * (D * H) + d * H + cols[None, :]
        tl.store(OUT + out_at, tl.where(keep, h_new, 0.0).to(OUT.dtype.element_ty), mask=tile_ok)
        if SAVE:
            gate_at = GATES + (rows[:, None] * T + t_out[:, None]) * G + d * 4 * H + cols[None, :]
            tl.store(gate_at + 0 * H, tl.where(keep, i_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
            tl.store(gate_at + 1 * H, tl.where(keep, f_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
            tl.store(gate_at + 2 * H, tl.where(keep, g_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
            tl.store(gate_at + 3 * H, tl.where(keep, o_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
            tl.store(CELLS + out_at, tl.where(keep, c_new, 0.0).to(CELLS.dtype.element_ty), mask=tile_ok)
        tl.debug_barrier()  # this step's h, stored above, is what the next step reads back chunk by chunk
    tl.store(H_N + state_at, h.to(H_N.dtype.element_ty), mask=tile_ok)
    tl.store(C_N + state_at, c.to(C_N.dtype.element_ty), mask=tile_ok)


@triton.jit
def lstm_persistent_bwd_kernel(
    GRAD_OUT,  # (B, T, D*H), if HAS_GRAD_OUT
    GRAD_H_N, GRAD_C_N,  # (D, B, H), if HAS_GRAD_H_N / HAS_GRAD_C_N
    W_HH,  # (D, 4H, H)
    C0,  # (D, B, H), if HAS_C0
    LENGTHS,  # (B,) int64, if HAS_LENGTHS
    GATES,  # (B, T, D*4H) activated i, f, g, o from the forward
    CELLS,  # (B, T, D*H) from the forward
    DZ,  # (B, T, D*4H) fp32 out: gradient of the gate pre-activations (zeros at padded steps)
    DH0, DC0,  # (D, B, H) fp32 out
    B, T, H,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr, HAS_GRAD_C_N: tl.constexpr, HAS_C0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The forward's steps in reverse order: dh_{prev} = Σ_g dz_g W_g, dc_{prev} = dc ⊙ f. Writes dz for the
    deferred GEMMs (dx = dz W_ih, dW_ih = dzᵀ x, dW_hh = dzᵀ h_prev, dbias = Σ dz) and the state gradients; the
    product reads dz back from DZ in BLOCK_K-wide chunks of the gate outputs."""
    d, rows, row_ok, cols, col_ok, tile_ok, seq_len, state_at, ks = _program_tile(
        B, T, H, LENGTHS, BLOCK_B, BLOCK_H, BLOCK_K, HAS_LENGTHS)
    reverse = d == 1
    if HAS_GRAD_H_N:
        dh = tl.load(GRAD_H_N + state_at, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        dh = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    if HAS_GRAD_C_N:
        dc = tl.load(GRAD_C_N + state_at, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        dc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    if HAS_C0:
        c_first = tl.load(C0 + state_at, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        c_first = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    W = W_HH + d * 4 * H * H
    G = D * 4 * H
    for step in range(0, T):
        s = T - 1 - step
        t, active = _step_index(s, seq_len, reverse)
        act = active[:, None] & col_ok[None, :]
        at = (rows[:, None] * T + t[:, None]) * (D * H) + d * H + cols[None, :]
        gate_at = GATES + (rows[:, None] * T + t[:, None]) * G + d * 4 * H + cols[None, :]
        i_t = tl.load(gate_at + 0 * H, mask=act, other=0.0).to(tl.float32)
        f_t = tl.load(gate_at + 1 * H, mask=act, other=0.0).to(tl.float32)
        g_t = tl.load(gate_at + 2 * H, mask=act, other=0.0).to(tl.float32)
        o_t = tl.load(gate_at + 3 * H, mask=act, other=0.0).to(tl.float32)
        c_t = tl.load(CELLS + at, mask=act, other=0.0).to(tl.float32)
        # The previous step's cell: t - 1 forward, t + 1 reverse; c0 at the sequence's first step (s = 0)
        t_prev = tl.where(reverse, t + 1, t - 1)
        has_prev = ((t_prev >= 0) & (t_prev < seq_len))[:, None]
        c_prev = tl.load(CELLS + (rows[:, None] * T + t_prev[:, None]) * (D * H) + d * H + cols[None, :],
                         mask=act & has_prev, other=0.0).to(tl.float32)
        c_prev = tl.where(has_prev, c_prev, c_first)
        if HAS_GRAD_OUT:
            dh_total = dh + tl.load(GRAD_OUT + at, mask=act, other=0.0).to(tl.float32)
        else:
            dh_total = dh
        tanh_c = _tanh(c_t)
        dc_total = dc + dh_total * o_t * (1.0 - tanh_c * tanh_c)
        keep = active[:, None]
        t_out = tl.where(active, t, s)
        dz_row = DZ + (rows[:, None] * T + t_out[:, None]) * G + d * 4 * H
        tl.store(dz_row + 0 * H + cols[None, :], tl.where(keep, dc_total * g_t * i_t * (1.0 - i_t), 0.0),
                 mask=tile_ok)
        tl.store(dz_row + 1 * H + cols[None, :], tl.where(keep, dc_total * c_prev * f_t * (1.0 - f_t), 0.0),
                 mask=tile_ok)
        tl.store(dz_row + 2 * H + cols[None, :], tl.where(keep, dc_total * i_t * (1.0 - g_t * g_t), 0.0),
                 mask=tile_ok)
        tl.store(dz_row + 3 * H + cols[None, :], tl.where(keep, dh_total * tanh_c * o_t * (1.0 - o_t), 0.0),
                 mask=tile_ok)
        tl.debug_barrier()  # the dz just stored is read back below in chunks of the gate outputs
        dh_prev = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        for j0 in range(0, BLOCK_H, BLOCK_K):  # a loop, not unrolled: one chunk's loads in registers at a time
            j = j0 + ks
            j_ok = j < H
            dz_ok = keep & j_ok[None, :]
            w_at = W + j[:, None] * H + cols[None, :]  # W[g*H + j, k]: rows j of each gate block
            w_ok = j_ok[:, None] & col_ok[None, :]
            for g in tl.static_range(4):
                dz_k = tl.load(dz_row + g * H + j[None, :], mask=dz_ok, other=0.0)
                dh_prev += _dot(dz_k, tl.load(w_at + g * H * H, mask=w_ok, other=0.0), DOT_FP32, INPUT_PRECISION)
        dh = tl.where(keep, dh_prev, dh)
        dc = tl.where(keep, dc_total * f_t, dc)
        # No barrier here: every (row, t) of DZ is stored by exactly one step, so no later store can reach what
        # this step reads back.
    tl.store(DH0 + state_at, dh, mask=tile_ok)
    tl.store(DC0 + state_at, dc, mask=tile_ok)
