"""Triton bodies of the persistent LSTM recurrence (launchers and autograd: :mod:`fastmsc.kernels.lstm_persistent`).

Two kernel pairs: the streaming pair below (any H up to 512: W_hh read from L2 every step, state in memory) and, at
the end of the file, the resident pair (W_hh in shared memory for the whole sequence, state in registers), which
runs wherever W_hh fits the GPU's shared memory (bf16/fp16 up to H = 128, fp32 up to 64 on an A100/H100/H200).

One program owns one (batch tile, direction) and loops over every time step of its sequences; the recurrent weights
are read by every step (W_hh, 4H x H, stays in L2: 128 KB at H=128 in bf16, shared by every program of its
direction). No program ever waits for another: each one's sequences are independent of the others', so the launch is
race-free by construction, one launch per layer covers both directions, and the per-step cost is the program's own
arithmetic and L2 reads instead of a GEMM launch and a gate launch per step (about 2T+1 launches each way in the
stepwise path).

Everything runs in chunks, so that registers hold a bounded tile whatever H is: whole (rows x H) gate tiles and
H x H weight blocks spill at H = 128 at every warp count (measured with the AOT check). A step computes the gates
BLOCK_J output columns at a time, each from BLOCK_K-wide chunks of h_{t-1} and of W_hh. Registers cannot be sliced,
so the state lives in memory the program owns: h_{t-1} is read back from where the previous step stored h (``out``,
which every step writes anyway; h0 at a sequence's first step), c from a (D, B, H) fp32 buffer (c0 on entry, c_n on
exit), and in the backward dh and dc from two such buffers (the incoming gradients on entry, dh0 and dc0 on exit) and
dz from the dz it stores. A barrier after each phase makes its stores visible to the whole program; every other read
is of values the same step's same chunk wrote, or of a (row, t) that only an earlier step wrote.

Per step and program (B_t = BLOCK_B rows, H hidden): reads xproj 4·B_t·H values, W_hh 4·H·H values (L2), h_{t-1}
and c (B_t·H each, L1), and writes out (B_t·H) and c, and when training the gates (4·B_t·H) and cells (B_t·H);
computes 8·B_t·H·H FLOPs on tensor cores. At B_t=16, H=128, bf16: 128 KB of L2 reads and 2.1 MFLOP per step, ~1.5 µs
at ~90 GB/s of L2 per SM, against ~8-12 µs of launch latency per step for cuDNN's stepwise algorithm at B=32 (see
the module docstring of lstm_persistent for the whole estimate).

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
def _dot(a, w, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a @ w with fp32 accumulation: a in w's dtype (in fp32 where the interpreter lacks half arithmetic)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision=INPUT_PRECISION)
    return tl.dot(a.to(w.dtype), w, input_precision=INPUT_PRECISION)


@triton.jit
def _program_rows(B, T, LENGTHS, BLOCK_B: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """This program's direction d, its rows (BLOCK_B sequences) and their lengths (0 for rows past B)."""
    pid_b, d = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    if HAS_LENGTHS:
        seq_len = tl.load(LENGTHS + rows, mask=row_ok, other=0).to(tl.int32)
    else:
        seq_len = tl.where(row_ok, T, 0)
    return d, rows, row_ok, seq_len


@triton.jit
def _step(s, seq_len, reverse):
    """Each row's (time index read at loop step s, whether it is active there, the time of the state it reads,
    whether that state is an earlier step's (else h0/c0), the time it writes: t, or the padded t = s if inactive)."""
    active = s < seq_len
    t = tl.where(active, tl.where(reverse, seq_len - 1 - s, s), 0)
    t_prev = tl.where(reverse, t + 1, t - 1)
    has_prev = active & (t_prev >= 0) & (t_prev < seq_len)
    return t, active, t_prev, has_prev, tl.where(active, t, s)


@triton.jit
def _four_gates(PTR, rows, t, T, G, d, H, j, mask):
    """The four gate slices i, f, g, o (fp32) of a (B, T, D*4H) tensor at each row's time t, columns j."""
    at = PTR + (rows[:, None] * T + t[:, None]) * G + d * 4 * H + j[None, :]
    gate_i = tl.load(at + 0 * H, mask=mask, other=0.0).to(tl.float32)
    gate_f = tl.load(at + 1 * H, mask=mask, other=0.0).to(tl.float32)
    gate_g = tl.load(at + 2 * H, mask=mask, other=0.0).to(tl.float32)
    gate_o = tl.load(at + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return gate_i, gate_f, gate_g, gate_o


@triton.jit
def lstm_persistent_fwd_kernel(
    XPROJ,  # (B, T, D*4H): x W_ihᵀ, no bias
    BIAS,  # (D*4H,) fp32 (b_ih + b_hh), if HAS_BIAS
    W_HH,  # (D, 4H, H)
    H0,  # (D, B, H), if HAS_H0
    C_STATE,  # (D, B, H) fp32: c0 (or zeros) on entry, c_n on exit
    LENGTHS,  # (B,) int64, if HAS_LENGTHS
    OUT,  # (B, T, D*H); also where each step reads h_{t-1} back
    H_N,  # (D, B, H)
    GATES,  # (B, T, D*4H): activated i, f, g, o, if SAVE
    CELLS,  # (B, T, D*H), if SAVE
    B, T, H,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    d, rows, row_ok, seq_len = _program_rows(B, T, LENGTHS, BLOCK_B, HAS_LENGTHS)
    reverse = d == 1
    js = tl.arange(0, BLOCK_J)
    ks = tl.arange(0, BLOCK_K)
    W = W_HH + d * 4 * H * H
    G = D * 4 * H
    for s in range(0, T):
        t, active, t_prev, has_prev, t_out = _step(s, seq_len, reverse)
        first = active & ~has_prev
        keep = active[:, None]
        for j0 in range(0, H, BLOCK_J):
            j = j0 + js
            j_ok = j < H
            act = keep & j_ok[None, :]
            z_i, z_f, z_g, z_o = _four_gates(XPROJ, rows, t, T, G, d, H, j, act)
            if HAS_BIAS:
                z_i += tl.load(BIAS + d * 4 * H + 0 * H + j, mask=j_ok, other=0.0)[None, :]
                z_f += tl.load(BIAS + d * 4 * H + 1 * H + j, mask=j_ok, other=0.0)[None, :]
                z_g += tl.load(BIAS + d * 4 * H + 2 * H + j, mask=j_ok, other=0.0)[None, :]
                z_o += tl.load(BIAS + d * 4 * H + 3 * H + j, mask=j_ok, other=0.0)[None, :]
            for k0 in range(0, H, BLOCK_K):
                k = k0 + ks
                k_ok = k < H
                # h_{t-1}: what the previous step stored at t - 1 (t + 1 reverse), h0 (or zeros) at the first step
                h_k = tl.load(OUT + (rows[:, None] * T + t_prev[:, None]) * (D * H) + d * H + k[None, :],
                              mask=has_prev[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                if HAS_H0:
                    h_k += tl.load(H0 + d * B * H + rows[:, None] * H + k[None, :],
                                   mask=first[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                # Wᵀ[k, j] of each gate: rows j of W read in its row-major order, transposed on chip
                w_at = W + j[:, None] * H + k[None, :]
                w_ok = j_ok[:, None] & k_ok[None, :]
                z_i += _dot(h_k, tl.trans(tl.load(w_at + 0 * H * H, mask=w_ok, other=0.0)), DOT_FP32,
                            INPUT_PRECISION)
                z_f += _dot(h_k, tl.trans(tl.load(w_at + 1 * H * H, mask=w_ok, other=0.0)), DOT_FP32,
                            INPUT_PRECISION)
                z_g += _dot(h_k, tl.trans(tl.load(w_at + 2 * H * H, mask=w_ok, other=0.0)), DOT_FP32,
                            INPUT_PRECISION)
                z_o += _dot(h_k, tl.trans(tl.load(w_at + 3 * H * H, mask=w_ok, other=0.0)), DOT_FP32,
                            INPUT_PRECISION)
            i_t, f_t, g_t, o_t = _sigmoid(z_i), _sigmoid(z_f), _tanh(z_g), _sigmoid(z_o)
            c_at = C_STATE + d * B * H + rows[:, None] * H + j[None, :]
            c_new = f_t * tl.load(c_at, mask=act, other=0.0) + i_t * g_t
            h_new = o_t * _tanh(c_new)
            tl.store(c_at, c_new, mask=act)  # inactive rows keep their state
            tile_ok = row_ok[:, None] & j_ok[None, :]
            out_at = (rows[:, None] * T + t_out[:, None]) * (D * H) + d * H + j[None, :]
            tl.store(OUT + out_at, tl.where(keep, h_new, 0.0).to(OUT.dtype.element_ty), mask=tile_ok)
            if SAVE:
                gate_at = GATES + (rows[:, None] * T + t_out[:, None]) * G + d * 4 * H + j[None, :]
                tl.store(gate_at + 0 * H, tl.where(keep, i_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
                tl.store(gate_at + 1 * H, tl.where(keep, f_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
                tl.store(gate_at + 2 * H, tl.where(keep, g_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
                tl.store(gate_at + 3 * H, tl.where(keep, o_t, 0.0).to(GATES.dtype.element_ty), mask=tile_ok)
                tl.store(CELLS + out_at, tl.where(keep, c_new, 0.0).to(CELLS.dtype.element_ty), mask=tile_ok)
        tl.debug_barrier()  # this step's h is what the next step reads back, chunk by chunk
    # h_n: each row's h after its last step, out at t = lengths - 1 (t = 0 reverse)
    t_last = tl.where(reverse, 0, seq_len - 1)
    for j0 in range(0, H, BLOCK_J):
        j = j0 + js
        tile_ok = row_ok[:, None] & (j < H)[None, :]
        h = tl.load(OUT + (rows[:, None] * T + t_last[:, None]) * (D * H) + d * H + j[None, :], mask=tile_ok,
                    other=0.0)
        tl.store(H_N + d * B * H + rows[:, None] * H + j[None, :], h.to(H_N.dtype.element_ty), mask=tile_ok)


@triton.jit
def lstm_persistent_bwd_kernel(
    GRAD_OUT,  # (B, T, D*H), if HAS_GRAD_OUT
    W_HH,  # (D, 4H, H)
    C0,  # (D, B, H), if HAS_C0
    LENGTHS,  # (B,) int64, if HAS_LENGTHS
    GATES,  # (B, T, D*4H) activated i, f, g, o from the forward
    CELLS,  # (B, T, D*H) from the forward
    DZ,  # (B, T, D*4H) fp32 out: gradient of the gate pre-activations (zeros at padded steps)
    DH_STATE, DC_STATE,  # (D, B, H) fp32: grad h_n / c_n (or zeros) on entry, dh0 / dc0 on exit
    B, T, H,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr, HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The forward's steps in reverse order, two phases per step. Gates: dz from the saved gates and cells and the
    carried dh, dc (dc_{prev} = dc ⊙ f). Recurrence: dh_{prev} = Σ_g dz_g W_g, reading back the dz just stored.
    dz stays in DZ for the deferred GEMMs (dx = dz W_ih, dW_ih = dzᵀ x, dW_hh = dzᵀ h_prev, dbias = Σ dz)."""
    d, rows, row_ok, seq_len = _program_rows(B, T, LENGTHS, BLOCK_B, HAS_LENGTHS)
    reverse = d == 1
    js = tl.arange(0, BLOCK_J)
    ks = tl.arange(0, BLOCK_K)
    W = W_HH + d * 4 * H * H
    G = D * 4 * H
    for step in range(0, T):
        s = T - 1 - step
        t, active, t_prev, has_prev, t_out = _step(s, seq_len, reverse)
        keep = active[:, None]
        dz_row = DZ + (rows[:, None] * T + t_out[:, None]) * G + d * 4 * H
        for j0 in range(0, H, BLOCK_J):  # the gates, BLOCK_J columns at a time
            j = j0 + js
            j_ok = j < H
            act = keep & j_ok[None, :]
            i_t, f_t, g_t, o_t = _four_gates(GATES, rows, t, T, G, d, H, j, act)
            at = (rows[:, None] * T + t[:, None]) * (D * H) + d * H + j[None, :]
            c_t = tl.load(CELLS + at, mask=act, other=0.0).to(tl.float32)
            # The previous step's cell: t - 1 forward, t + 1 reverse; c0 (or zeros) at the sequence's first step
            c_prev = tl.load(CELLS + (rows[:, None] * T + t_prev[:, None]) * (D * H) + d * H + j[None, :],
                             mask=act & has_prev[:, None], other=0.0).to(tl.float32)
            if HAS_C0:
                c_prev += tl.load(C0 + d * B * H + rows[:, None] * H + j[None, :], mask=act & ~has_prev[:, None],
                                  other=0.0).to(tl.float32)
            state_at = d * B * H + rows[:, None] * H + j[None, :]
            dh_total = tl.load(DH_STATE + state_at, mask=act, other=0.0)
            if HAS_GRAD_OUT:
                dh_total += tl.load(GRAD_OUT + at, mask=act, other=0.0).to(tl.float32)
            tanh_c = _tanh(c_t)
            dc_total = tl.load(DC_STATE + state_at, mask=act, other=0.0) + dh_total * o_t * (1.0 - tanh_c * tanh_c)
            tile_ok = row_ok[:, None] & j_ok[None, :]
            tl.store(dz_row + 0 * H + j[None, :], tl.where(keep, dc_total * g_t * i_t * (1.0 - i_t), 0.0),
                     mask=tile_ok)
            tl.store(dz_row + 1 * H + j[None, :], tl.where(keep, dc_total * c_prev * f_t * (1.0 - f_t), 0.0),
                     mask=tile_ok)
            tl.store(dz_row + 2 * H + j[None, :], tl.where(keep, dc_total * i_t * (1.0 - g_t * g_t), 0.0),
                     mask=tile_ok)
            tl.store(dz_row + 3 * H + j[None, :], tl.where(keep, dh_total * tanh_c * o_t * (1.0 - o_t), 0.0),
                     mask=tile_ok)
            tl.store(DC_STATE + state_at, dc_total * f_t, mask=act)  # inactive rows keep their dc
        tl.debug_barrier()  # the dz just stored is read back below, in chunks of the gate outputs
        for k0 in range(0, H, BLOCK_J):  # dh_{prev}, BLOCK_J hidden columns at a time
            k = k0 + js
            k_ok = k < H
            dh_prev = tl.zeros((BLOCK_B, BLOCK_J), tl.float32)
            for j0 in range(0, H, BLOCK_K):
                j = j0 + ks
                j_ok = j < H
                dz_ok = keep & j_ok[None, :]
                w_at = W + j[:, None] * H + k[None, :]  # W[g*H + j, k]: rows j of each gate block
                w_ok = j_ok[:, None] & k_ok[None, :]
                for g in tl.static_range(4):
                    dz_g = tl.load(dz_row + g * H + j[None, :], mask=dz_ok, other=0.0)
                    dh_prev += _dot(dz_g, tl.load(w_at + g * H * H, mask=w_ok, other=0.0), DOT_FP32, INPUT_PRECISION)
            tl.store(DH_STATE + d * B * H + rows[:, None] * H + k[None, :], dh_prev,
                     mask=keep & k_ok[None, :])  # inactive rows keep their dh
        tl.debug_barrier()  # the dh just stored is what the next step's gates read


# ---------------------------------------------------------------------------------------------------------------------
# Resident variant: W_hh in shared memory for the whole sequence, state in registers.
#
# Where the four (H x H) gate blocks of W_hh fit the GPU's shared memory (bf16/fp16 up to H = 128: 128 KB), a program
# loads them once before its step loop and multiplies them from there at every step, and keeps h and c (dh and dc in
# the backward) in registers: no L2 traffic for W_hh and no state round trip through memory, so no barrier either.
# The products are transposed, z_gᵀ = W_g h_{t-1}ᵀ (BLOCK_H x BLOCK_B): W_g is the loop-invariant A operand, which
# Triton stages into shared memory once, outside the loop (ttg.local_alloc hoisted; on sm_90 the product is a wgmma
# reading W_g from there, M = BLOCK_H >= 64; on sm_80 an mma.sync after a shared-memory load per step), and the
# 16-row batch tile is the narrow N side. Every tile of this variant is (hidden unit j, sequence b).
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_w(w, v, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """w @ v with fp32 accumulation: v rounded to w's dtype (both in fp32 where the interpreter lacks half
    arithmetic), as the streaming kernels round the state they read back."""
    if DOT_FP32:
        return tl.dot(w.to(tl.float32), v.to(w.dtype).to(tl.float32), input_precision=INPUT_PRECISION)
    return tl.dot(w, v.to(w.dtype), input_precision=INPUT_PRECISION)


@triton.jit
def _gate_blocks(W, H, j, j_ok):
    """The four (BLOCK_H x BLOCK_H) gate blocks W_g[j, k] = W[g*H + j, k] of one direction's (4H, H) W_hh."""
    w_at = W + j[:, None] * H + j[None, :]
    w_ok = j_ok[:, None] & j_ok[None, :]
    return (tl.load(w_at + 0 * H * H, mask=w_ok, other=0.0), tl.load(w_at + 1 * H * H, mask=w_ok, other=0.0),
            tl.load(w_at + 2 * H * H, mask=w_ok, other=0.0), tl.load(w_at + 3 * H * H, mask=w_ok, other=0.0))


@triton.jit
def _four_gates_t(PTR, rows, t, T, G, d, H, j, mask):
    """The four gate slices (fp32, (BLOCK_H, BLOCK_B)) of a (B, T, D*4H) tensor at each sequence's time t."""
    at = PTR + (rows[None, :] * T + t[None, :]) * G + d * 4 * H + j[:, None]
    return (tl.load(at + 0 * H, mask=mask, other=0.0).to(tl.float32),
            tl.load(at + 1 * H, mask=mask, other=0.0).to(tl.float32),
            tl.load(at + 2 * H, mask=mask, other=0.0).to(tl.float32),
            tl.load(at + 3 * H, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _resident_program(W_HH, LENGTHS, B, T, H, D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                      HAS_LENGTHS: tl.constexpr):
    """What both resident kernels open with: the program's direction, sequences and lengths (_program_rows), its
    hidden units j (BLOCK_H of them, j_ok within H), the gate tensors' row length G = D*4H, and its direction's
    four W_hh gate blocks."""
    d, rows, row_ok, seq_len = _program_rows(B, T, LENGTHS, BLOCK_B, HAS_LENGTHS)
    j = tl.arange(0, BLOCK_H)
    j_ok = j < H
    w_i, w_f, w_g, w_o = _gate_blocks(W_HH + d * 4 * H * H, H, j, j_ok)
    return d, rows, row_ok, seq_len, d == 1, j, j_ok, D * 4 * H, w_i, w_f, w_g, w_o


@triton.jit
def lstm_resident_fwd_kernel(
    XPROJ, BIAS, W_HH, H0, C_STATE, LENGTHS, OUT, H_N, GATES, CELLS,  # as lstm_persistent_fwd_kernel's
    B, T, H,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    d, rows, row_ok, seq_len, reverse, j, j_ok, G, w_i, w_f, w_g, w_o = _resident_program(
        W_HH, LENGTHS, B, T, H, D, BLOCK_B, BLOCK_H, HAS_LENGTHS)
    state_at = d * B * H + rows[None, :] * H + j[:, None]
    state_ok = j_ok[:, None] & row_ok[None, :]
    c = tl.load(C_STATE + state_at, mask=state_ok, other=0.0)
    if HAS_H0:
        h = tl.load(H0 + state_at, mask=state_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_H, BLOCK_B), tl.float32)
    for s in range(0, T):
        t, active, t_prev, has_prev, t_out = _step(s, seq_len, reverse)
        keep = active[None, :]
        z_i, z_f, z_g, z_o = _four_gates_t(XPROJ, rows, t, T, G, d, H, j, j_ok[:, None] & keep)
        if HAS_BIAS:
            z_i += tl.load(BIAS + d * 4 * H + 0 * H + j, mask=j_ok, other=0.0)[:, None]
            z_f += tl.load(BIAS + d * 4 * H + 1 * H + j, mask=j_ok, other=0.0)[:, None]
            z_g += tl.load(BIAS + d * 4 * H + 2 * H + j, mask=j_ok, other=0.0)[:, None]
            z_o += tl.load(BIAS + d * 4 * H + 3 * H + j, mask=j_ok, other=0.0)[:, None]
        z_i += _dot_w(w_i, h, DOT_FP32, INPUT_PRECISION)
        z_f += _dot_w(w_f, h, DOT_FP32, INPUT_PRECISION)
        z_g += _dot_w(w_g, h, DOT_FP32, INPUT_PRECISION)
        z_o += _dot_w(w_o, h, DOT_FP32, INPUT_PRECISION)
        i_t, f_t, g_t, o_t = _sigmoid(z_i), _sigmoid(z_f), _tanh(z_g), _sigmoid(z_o)
        c_new = f_t * c + i_t * g_t
        h_new = o_t * _tanh(c_new)
        c = tl.where(keep, c_new, c)  # inactive sequences keep their state
        # h as the streaming kernels read it back: rounded to the output's dtype
        h = tl.where(keep, h_new.to(OUT.dtype.element_ty).to(tl.float32), h)
        out_at = (rows[None, :] * T + t_out[None, :]) * (D * H) + d * H + j[:, None]
        tl.store(OUT + out_at, tl.where(keep, h_new, 0.0).to(OUT.dtype.element_ty), mask=state_ok)
        if SAVE:
            gate_at = GATES + (rows[None, :] * T + t_out[None, :]) * G + d * 4 * H + j[:, None]
            tl.store(gate_at + 0 * H, tl.where(keep, i_t, 0.0).to(GATES.dtype.element_ty), mask=state_ok)
            tl.store(gate_at + 1 * H, tl.where(keep, f_t, 0.0).to(GATES.dtype.element_ty), mask=state_ok)
            tl.store(gate_at + 2 * H, tl.where(keep, g_t, 0.0).to(GATES.dtype.element_ty), mask=state_ok)
            tl.store(gate_at + 3 * H, tl.where(keep, o_t, 0.0).to(GATES.dtype.element_ty), mask=state_ok)
            tl.store(CELLS + out_at, tl.where(keep, c_new, 0.0).to(CELLS.dtype.element_ty), mask=state_ok)
    tl.store(C_STATE + state_at, c, mask=state_ok)
    tl.store(H_N + state_at, h.to(H_N.dtype.element_ty), mask=state_ok)


@triton.jit
def lstm_resident_bwd_kernel(
    GRAD_OUT, W_HH, C0, LENGTHS, GATES, CELLS, DZ, DH_STATE, DC_STATE,  # as lstm_persistent_bwd_kernel's
    B, T, H,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HAS_GRAD_OUT: tl.constexpr,
    HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The forward's steps in reverse with dh and dc in registers and W_hh in shared memory:
    dh_{prev}ᵀ = Σ_g W_gᵀ dz_gᵀ."""
    d, rows, row_ok, seq_len, reverse, j, j_ok, G, w_i, w_f, w_g, w_o = _resident_program(
        W_HH, LENGTHS, B, T, H, D, BLOCK_B, BLOCK_H, HAS_LENGTHS)
    wt_i, wt_f, wt_g, wt_o = tl.trans(w_i), tl.trans(w_f), tl.trans(w_g), tl.trans(w_o)
    state_at = d * B * H + rows[None, :] * H + j[:, None]
    state_ok = j_ok[:, None] & row_ok[None, :]
    dh = tl.load(DH_STATE + state_at, mask=state_ok, other=0.0)
    dc = tl.load(DC_STATE + state_at, mask=state_ok, other=0.0)
    for step in range(0, T):
        s = T - 1 - step
        t, active, t_prev, has_prev, t_out = _step(s, seq_len, reverse)
        keep = active[None, :]
        act = j_ok[:, None] & keep
        i_t, f_t, g_t, o_t = _four_gates_t(GATES, rows, t, T, G, d, H, j, act)
        at = (rows[None, :] * T + t[None, :]) * (D * H) + d * H + j[:, None]
        c_t = tl.load(CELLS + at, mask=act, other=0.0).to(tl.float32)
        c_prev = tl.load(CELLS + (rows[None, :] * T + t_prev[None, :]) * (D * H) + d * H + j[:, None],
                         mask=act & has_prev[None, :], other=0.0).to(tl.float32)
        if HAS_C0:
            c_prev += tl.load(C0 + state_at, mask=act & ~has_prev[None, :], other=0.0).to(tl.float32)
        dh_total = dh
        if HAS_GRAD_OUT:
            dh_total += tl.load(GRAD_OUT + at, mask=act, other=0.0).to(tl.float32)
        tanh_c = _tanh(c_t)
        dc_total = dc + dh_total * o_t * (1.0 - tanh_c * tanh_c)
        dz_i = tl.where(keep, dc_total * g_t * i_t * (1.0 - i_t), 0.0)
        dz_f = tl.where(keep, dc_total * c_prev * f_t * (1.0 - f_t), 0.0)
        dz_g = tl.where(keep, dc_total * i_t * (1.0 - g_t * g_t), 0.0)
        dz_o = tl.where(keep, dh_total * tanh_c * o_t * (1.0 - o_t), 0.0)
        dz_at = DZ + (rows[None, :] * T + t_out[None, :]) * G + d * 4 * H + j[:, None]
        tl.store(dz_at + 0 * H, dz_i, mask=state_ok)
        tl.store(dz_at + 1 * H, dz_f, mask=state_ok)
        tl.store(dz_at + 2 * H, dz_g, mask=state_ok)
        tl.store(dz_at + 3 * H, dz_o, mask=state_ok)
        dc = tl.where(keep, dc_total * f_t, dc)  # inactive sequences keep their gradients
        dh_prev = _dot_w(wt_i, dz_i, DOT_FP32, INPUT_PRECISION)
        dh_prev += _dot_w(wt_f, dz_f, DOT_FP32, INPUT_PRECISION)
        dh_prev += _dot_w(wt_g, dz_g, DOT_FP32, INPUT_PRECISION)
        dh_prev += _dot_w(wt_o, dz_o, DOT_FP32, INPUT_PRECISION)
        dh = tl.where(keep, dh_prev, dh)
    tl.store(DH_STATE + state_at, dh, mask=state_ok)
    tl.store(DC_STATE + state_at, dc, mask=state_ok)
