"""The Triton kernels of the fused attention (:mod:`fastmsc.kernels.attention` holds their design, launchers and
custom ops). Shapes follow that module: Q, K, V, O (B, H, T, D) by strides, LSE and delta (B, H, T) fp32 in base-2
units of the scaled scores; head dim D padded to BLOCK_D with masked loads; the dQ partials (n_key_blocks, B, H, T,
D) fp32, contiguous."""

import triton
import triton.language as tl


@triton.jit
def _program(T, H, LENGTHS, BLOCK: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """(block index along T, b * H + h, b, h, valid length) of this program: the grid runs over (b, h, block) with
    the block fastest; the length is lengths[b] clamped to T (T without lengths)."""
    num_blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    pid_bh = pid // num_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    seq_len = T
    if HAS_LENGTHS:
        seq_len = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), T)
    return pid % num_blocks, pid_bh, b, h, seq_len


@triton.jit
def _load_tile(PTR, rows, row_ok, stride_t, cols, col_ok, stride_d):
    """PTR[rows, cols] as a (len(rows), len(cols)) tile; entries outside row_ok x col_ok load as zeros."""
    return tl.load(PTR + rows[:, None] * stride_t + cols[None, :] * stride_d, mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _dot_operand(x, DOT_FP32: tl.constexpr):
    """x as the kernels' tl.dot takes it: upcast to fp32 where they multiply in fp32 (DOT_FP32)."""
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tf32_head(x):
    """x with the 13 low mantissa bits cleared: exactly a TF32 value, and x - head is exact in fp32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _split_head(x):
    """The TF32 head of x, clamped to the largest finite TF32 magnitude: an infinite x then keeps its infinity in
    the tail x - head, and each cross term multiplies it by the other operand's head, as an fp32 product multiplies
    it by the other operand (an infinite head would meet the other tail, often exactly 0, and give inf·0 = NaN
    where a·b is ±inf). The clamped head's own products overflow to the same signed infinity. NaN stays in the tail
    (min/max return the non-NaN operand), so it reaches every product it takes part in. Two min/max, which cost
    fewer registers in the fp32 backward than a compare and select."""
    return tl.minimum(tl.maximum(_tf32_head(x), -3.4011621342146535e38), 3.4011621342146535e38)  # the largest TF32


@triton.jit
def _mm(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """a @ b (+ acc) in fp32. "tf32x3": three TF32 tensor-core products of the operands' TF32 heads and tails,
    tail·head + head·tail + head·head (the tail·tail term, ~2^-22 relative, is dropped), written out here
    instead of tl.dot's own "tf32x3", whose lowering keeps all four split operands live and spills at these
    tiles (the heads are recomputed from a and b rather than held). Non-finite operands give what an fp32 product
    gives, except inf·inf (NaN here; attention turns both into NaN rows anyway)."""
    if INPUT_PRECISION == "tf32x3":
        acc = tl.dot(a - _split_head(a), _split_head(b), acc, input_precision="tf32")
        acc = tl.dot(_split_head(a), b - _split_head(b), acc, input_precision="tf32")
        acc = tl.dot(_split_head(a), _split_head(b), acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _row_dots(A, rows_a, a_ok, stride_at, stride_ad, B, rows_b, b_ok, stride_bt, stride_bd,
              ROWS_A: tl.constexpr, ROWS_B: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """A[rows_a, :HEAD_DIM] @ B[rows_b, :HEAD_DIM]ᵀ as a (ROWS_A, ROWS_B) fp32 tile, summed over D_CHUNK-wide
    column strips loaded one at a time (rows outside a_ok / b_ok load as zeros). For fp32 operands: a 3xTF32
    tl.dot splits each operand into a TF32 head and tail held side by side in registers, so one dot over a
    register-resident (rows, 128 or 256) fp32 tile spills, while 32-wide strips (reloaded from L1/L2) do not."""
    acc = tl.zeros([ROWS_A, ROWS_B], dtype=tl.float32)
    offs_c = tl.arange(0, D_CHUNK)
    for start_d in tl.static_range(0, HEAD_DIM, D_CHUNK):
        cols = start_d + offs_c
        col_ok = cols < HEAD_DIM
        a = _dot_operand(_load_tile(A, rows_a, a_ok, stride_at, cols, col_ok, stride_ad), DOT_FP32)
        b = _dot_operand(_load_tile(B, rows_b, b_ok, stride_bt, cols, col_ok, stride_bd), DOT_FP32)
        acc = _mm(a, tl.trans(b), acc, INPUT_PRECISION)
    return acc


@triton.jit
def _fwd_key_block(acc, l_i, m_i, q, Q, K, V, offs_m, row_in, stride_qt, stride_qd, stride_kt, stride_kd, stride_vt,
                   stride_vd, start_n, seq_len, qk_scale, offs_n, offs_d, d_ok, MASK_KEYS: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N); MASK_KEYS only for the last, partial block.
    With D_CHUNK < BLOCK_D the scores read q and k in column strips (q is then not held in registers)."""
    cols = start_n + offs_n
    key_ok = cols < seq_len
    if D_CHUNK < BLOCK_D:
        s = _row_dots(Q, offs_m, row_in, stride_qt, stride_qd, K, cols, key_ok, stride_kt, stride_kd, BLOCK_M,
                      BLOCK_N, HEAD_DIM, D_CHUNK, INPUT_PRECISION, DOT_FP32) * qk_scale
        v = _load_tile(V, cols, key_ok, stride_vt, offs_d, d_ok, stride_vd)
    else:
        # k and v issued together, ahead of the first dot: the software pipeliner then stages both.
        k = _load_tile(K, cols, key_ok, stride_kt, offs_d, d_ok, stride_kd)
        v = _load_tile(V, cols, key_ok, stride_vt, offs_d, d_ok, stride_vd)
        s = _mm(q, tl.trans(_dot_operand(k, DOT_FP32)), None, INPUT_PRECISION) * qk_scale
    if MASK_KEYS:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no valid key so far has m_new = -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p_op = _dot_operand(p.to(V.dtype.element_ty), DOT_FP32)
    acc = _mm(p_op, _dot_operand(v, DOT_FP32), acc, INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, OUT, LSE, LENGTHS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m, pid_bh, b, h, seq_len = _program(T, H, LENGTHS, BLOCK_M, HAS_LENGTHS)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    LSE += pid_bh.to(tl.int64) * T

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_in = offs_m < T
    if D_CHUNK < BLOCK_D:
        q = 0.0  # the scores reload q strip by strip
    else:
        q = _dot_operand(_load_tile(Q, offs_m, row_in, stride_qt, offs_d, d_ok, stride_qd), DOT_FP32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # A block whose query rows all lie past the length visits no key: its rows are zero anyway.
    kv_end = tl.where(pid_m * BLOCK_M < seq_len, seq_len, 0)
    full_end = (kv_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, Q, K, V, offs_m, row_in, stride_qt, stride_qd, stride_kt,
                                       stride_kd, stride_vt, stride_vd, start_n, seq_len, qk_scale, offs_n, offs_d,
                                       d_ok, False, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, INPUT_PRECISION,
                                       DOT_FP32)
    for start_n in range(full_end, kv_end, BLOCK_N):  # the partial last block, if any
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, Q, K, V, offs_m, row_in, stride_qt, stride_qd, stride_kt,
                                       stride_kd, stride_vt, stride_vd, start_n, seq_len, qk_scale, offs_n, offs_d,
                                       d_ok, True, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK, INPUT_PRECISION,
                                       DOT_FP32)

    # l_i = 0 only where every score of the row is -inf: zeros then, as SDPA gives; a NaN l_i (a NaN or an
    # inf - inf among the scores) must stay NaN in O and in the LSE, which carries it into the gradients.
    row_ok = (offs_m < seq_len) & (l_i != 0.0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(row_ok, m_i + tl.log2(l_safe), float("inf"))
    tl.store(OUT + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty),
             mask=row_in[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m, lse, mask=row_in)


@triton.jit
def _attention_bwd_delta_kernel(
    OUT, DO, DELTA, LENGTHS,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO * O over valid rows (0 past the length, where dO is ignored)."""
    pid_m, pid_bh, b, h, seq_len = _program(T, H, LENGTHS, BLOCK_M, HAS_LENGTHS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    d_ok = offs_d < HEAD_DIM
    o = _load_tile(OUT + b * stride_ob + h * stride_oh, offs_m, row_ok, stride_ot, offs_d, d_ok,
                   stride_od).to(tl.float32)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, row_ok, stride_dot, offs_d, d_ok,
                    stride_dod).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attention_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_PART, LENGTHS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_part,
    H, T, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, DQ_PARTIAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """dK and dV for BLOCK_N keys of one (batch, head), looping over the query blocks with transposed scores
    (keys along rows): Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·qk_scale - LSE), dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ - delta),
    dK += dSᵀ Q. With DQ_PARTIAL, also this key block's unscaled share of dQ, dS K (BLOCK_M, D) per query block,
    stored in fp32 to DQ_PART[pid_n, b, h] (slot stride ``stride_part`` = B·H·T·HEAD_DIM elements): the fifth
    product, summed over the key blocks by _attention_bwd_dq_reduce_kernel. Without it dQ is left to
    _attention_bwd_dq_kernel. With D_CHUNK < BLOCK_D, k and v are not held in registers: Sᵀ and dPᵀ read k, v, q
    and dO in column strips (such configurations take no dQ partials)."""
    pid_n, pid_bh, b, h, seq_len = _program(T, H, LENGTHS, BLOCK_N, HAS_LENGTHS)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += pid_bh.to(tl.int64) * T
    DELTA += pid_bh.to(tl.int64) * T
    # The dQ share multiplies by the whole (BLOCK_N, BLOCK_D) k tile: strip-reading configurations have no room for it.
    tl.static_assert(not DQ_PARTIAL or D_CHUNK == BLOCK_D)
    if DQ_PARTIAL:
        DQ_PART += pid_n.to(tl.int64) * stride_part + pid_bh.to(tl.int64) * T * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_in = offs_n < T
    key_ok = offs_n < seq_len
    # Keys past the length load as zeros: their (discarded) rows of dK/dV then stay finite.
    if D_CHUNK == BLOCK_D:
        k = _dot_operand(_load_tile(K, offs_n, key_ok, stride_kt, offs_d, d_ok, stride_kd), DOT_FP32)
        v = _dot_operand(_load_tile(V, offs_n, key_ok, stride_vt, offs_d, d_ok, stride_vd), DOT_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Only query rows below the length see any key; keys past the length get zero gradients (stored below) and
    # a key block wholly past the length writes no dQ partial (the reduction stops before it).
    q_end = tl.where(pid_n * BLOCK_N < seq_len, seq_len, 0)
    for start_m in range(0, q_end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seq_len
        q = _dot_operand(_load_tile(Q, rows, row_ok, stride_qt, offs_d, d_ok, stride_qd), DOT_FP32)
        do = _dot_operand(_load_tile(DO, rows, row_ok, stride_dot, offs_d, d_ok, stride_dod), DOT_FP32)
        lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        if D_CHUNK < BLOCK_D:
            s_t = _row_dots(K, offs_n, key_ok, stride_kt, stride_kd, Q, rows, row_ok, stride_qt, stride_qd, BLOCK_N,
                            BLOCK_M, HEAD_DIM, D_CHUNK, INPUT_PRECISION, DOT_FP32)
        else:
            s_t = _mm(k, tl.trans(q), None, INPUT_PRECISION)
        # Rows with LSE = +inf (past the length, or no valid key) get p = 0 and so contribute nothing; a row past
        # the length is selected away as well, as its zero-loaded q meets an infinite key as 0 * inf = NaN. Keys
        # past the length (zero-loaded, score 0) are selected away for the dQ share, which sums over keys.
        p_t = tl.where(key_ok[:, None] & row_ok[None, :], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        p_op = _dot_operand(p_t.to(DO.dtype.element_ty), DOT_FP32)
        dv = _mm(p_op, do, dv, INPUT_PRECISION)
        if D_CHUNK < BLOCK_D:
            dp_t = _row_dots(V, offs_n, key_ok, stride_vt, stride_vd, DO, rows, row_ok, stride_dot, stride_dod,
                             BLOCK_N, BLOCK_M, HEAD_DIM, D_CHUNK, INPUT_PRECISION, DOT_FP32)
        else:
            dp_t = _mm(v, tl.trans(do), None, INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        ds_op = _dot_operand(ds_t.to(Q.dtype.element_ty), DOT_FP32)
        dk = _mm(ds_op, q, dk, INPUT_PRECISION)
        if DQ_PARTIAL:
            dq = _mm(tl.trans(ds_op), k, None, INPUT_PRECISION)
            # Rows past the length are never read by the reduction (which writes their zeros itself).
            tl.store(DQ_PART + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=row_ok[:, None] & d_ok[None, :])

    # Row j of dK/dV depends only on key j, so keys past the length (masked above) are written as zeros here.
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    out_mask = key_in[:, None] & d_ok[None, :]
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=out_mask)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _attention_bwd_dq_reduce_kernel(
    DQ_PART, DQ, LENGTHS,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_part,
    H, T, sm_scale,
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    KEY_BLOCK: tl.constexpr,
):
    """dQ[b, h, rows] = sm_scale · Σ_j DQ_PART[j, b, h, rows] over the key blocks j that start below the length,
    in increasing j (a fixed order, so dQ is bitwise reproducible); rows past the length are written as zeros."""
    pid_m, pid_bh, b, h, seq_len = _program(T, H, LENGTHS, BLOCK_M, HAS_LENGTHS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    part = DQ_PART + pid_bh.to(tl.int64) * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for _ in range(0, tl.cdiv(seq_len, KEY_BLOCK)):
        dq += tl.load(part, mask=mask, other=0.0)
        part += stride_part  # a 64-bit pointer step: the slots together may pass 2^31 elements
    dq = tl.where(row_ok[:, None], dq * sm_scale, 0.0)
    DQ += b * stride_dqb + h * stride_dqh
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=(offs_m < T)[:, None] & d_ok[None, :])


@triton.jit
def _dq_key_block(dq, q, do, lse, delta, Q, DO, K, V, offs_m, row_in, row_ok, stride_qt, stride_qd, stride_dot,
                  stride_dod, stride_kt, stride_kd, stride_vt, stride_vd, start_n, seq_len, qk_scale, offs_n, offs_d,
                  d_ok, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  DOT_FP32: tl.constexpr):
    cols = start_n + offs_n
    key_ok = cols < seq_len
    k = _dot_operand(_load_tile(K, cols, key_ok, stride_kt, offs_d, d_ok, stride_kd), DOT_FP32)
    if D_CHUNK < BLOCK_D:
        s = _row_dots(Q, offs_m, row_in, stride_qt, stride_qd, K, cols, key_ok, stride_kt, stride_kd, BLOCK_M,
                      BLOCK_N, HEAD_DIM, D_CHUNK, INPUT_PRECISION, DOT_FP32)
        dp = _row_dots(DO, offs_m, row_ok, stride_dot, stride_dod, V, cols, key_ok, stride_vt, stride_vd, BLOCK_M,
                       BLOCK_N, HEAD_DIM, D_CHUNK, INPUT_PRECISION, DOT_FP32)
    else:
        v = _dot_operand(_load_tile(V, cols, key_ok, stride_vt, offs_d, d_ok, stride_vd), DOT_FP32)
        s = _mm(q, tl.trans(k), None, INPUT_PRECISION)
        dp = _mm(do, tl.trans(v), None, INPUT_PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK_KEYS:  # keys past the length were loaded as zeros, which would still score exp2(-lse) > 0
        p = tl.where(key_ok[None, :], p, 0.0)
    ds = p * (dp - delta[:, None])
    ds_op = _dot_operand(ds.to(K.dtype.element_ty), DOT_FP32)
    return _mm(ds_op, k, dq, INPUT_PRECISION)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, LENGTHS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """dQ for BLOCK_M queries of one (batch, head), looping over the key blocks (S and dP recomputed: three
    products). Only for sequences with too many key blocks for the dQ partials (see attention._backward). With
    D_CHUNK < BLOCK_D, q and dO are not held in registers: S and dP read them (and k, v) in column strips."""
    pid_m, pid_bh, b, h, seq_len = _program(T, H, LENGTHS, BLOCK_M, HAS_LENGTHS)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += pid_bh.to(tl.int64) * T
    DELTA += pid_bh.to(tl.int64) * T

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_in = offs_m < T
    row_ok = offs_m < seq_len
    if D_CHUNK < BLOCK_D:
        q = 0.0  # the scores reload q and dO strip by strip
        do = 0.0
    else:
        q = _dot_operand(_load_tile(Q, offs_m, row_in, stride_qt, offs_d, d_ok, stride_qd), DOT_FP32)
        do = _dot_operand(_load_tile(DO, offs_m, row_ok, stride_dot, offs_d, d_ok, stride_dod), DOT_FP32)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_end = tl.where(pid_m * BLOCK_M < seq_len, seq_len, 0)
    full_end = (kv_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse, delta, Q, DO, K, V, offs_m, row_in, row_ok, stride_qt, stride_qd,
                           stride_dot, stride_dod, stride_kt, stride_kd, stride_vt, stride_vd, start_n, seq_len,
                           qk_scale, offs_n, offs_d, d_ok, False, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK,
                           INPUT_PRECISION, DOT_FP32)
    for start_n in range(full_end, kv_end, BLOCK_N):
        dq = _dq_key_block(dq, q, do, lse, delta, Q, DO, K, V, offs_m, row_in, row_ok, stride_qt, stride_qd,
                           stride_dot, stride_dod, stride_kt, stride_kd, stride_vt, stride_vd, start_n, seq_len,
                           qk_scale, offs_n, offs_d, d_ok, True, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNK,
                           INPUT_PRECISION, DOT_FP32)
    dq = dq * sm_scale
    # Rows past the length get zeros, stored apart from the computed rows: there p = 0, but p * (dp - delta) is
    # NaN when a valid key or value (read by dp = dO vᵀ) or the row's own padded query is non-finite.
    dq_ptrs = DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty),
             mask=(row_in & ~row_ok)[:, None] & d_ok[None, :])
