"""Flash-style scaled-dot-product attention in Triton: forward and deterministic backward.

Shapes: q, k, v (B, T, D) or (B, H, T, D), any strides, fp32/fp16/bf16, head dim D in [1, 256] (padded in
registers to BLOCK_D = next power of two >= 16 with masked loads). ``lengths`` (B,) int64 or None.

Forward (one program per BLOCK_M query rows of one (batch, head)): streams key/value blocks with the online
softmax and keeps only the output O (B, H, T, D) and the per-row log-sum-exp LSE (B, H, T) in fp32, in base-2
units of the scaled scores, so no T x T tensor ever exists. Query rows at t >= lengths[b], and rows whose scores
are all -inf, get O = 0 and LSE = +inf: every backward kernel then computes p = exp2(s - LSE) = 0 for them, which
gives them zero gradients and removes them from dK/dV without any further masking.

NaN/Inf: a row whose softmax is NaN (a NaN score, or inf - inf) gets O = NaN and LSE = NaN, so its NaN reaches
the gradients as in F.scaled_dot_product_attention. Keys and values at t >= lengths[b] are masked loads, query rows
past the length are kept out of dK/dV and written as zeros in O and dQ, so a non-finite value in the padding
changes nothing.

Backward (FlashAttention-2 style, no atomics, bitwise reproducible): a pre-pass writes delta = rowsum(dO * O)
(B, H, T) fp32. Then one program per BLOCK_N keys of one (batch, head) loops over the query blocks with the
scores transposed (keys along rows): Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2e - LSE), dV += Pᵀ dO, dPᵀ = V dOᵀ,
dSᵀ = Pᵀ ⊙ (dPᵀ - delta), dK += dSᵀ Q, and, the fifth product, this key block's share of dQ, dS K (BLOCK_M, D),
stored in fp32 to a partial buffer dq_part (n_key_blocks, B, H, T, D); a reduction kernel then sums the partials
of each row over the key blocks in increasing order (the same order every run) into dQ · scale. That is 5 matrix
products per (query block, key block) pair, 10·T²·D flops per head, against 14·T²·D when a separate dQ kernel
(one program per BLOCK_M queries looping over the key blocks) recomputes S and dP. The partials cost bytes
instead: n_key_blocks · T · D · 4 per (b, h), written once and read once (n_key_blocks = ceil(T / BLOCK_N), so
T²·D·4 / BLOCK_N, growing with T²). Their read is the extra traffic (their writes overlap the compute-bound kernel
that makes them), T·D·4 bytes per key block against the 4·T·BLOCK_N·D flops it saves, so the partials pay where
BLOCK_N > F / BW, F the products' achieved rate and BW the HBM bandwidth: on an H200 (4.8 TB/s; ~35% of the
tensor-core peaks achieved) 72 keys for half inputs, 36 for TF32 and 12 for 3xTF32 (MIN_PARTIAL_KEYS). Narrower
key blocks (half inputs with D > 64), fp32 with D > 32 (whose tiles read D in column strips and leave no registers
for a whole-D dQ share: every variant tried spilled), and sequences whose partials would take more than
DQ_PARTIAL_BYTES_RATIO (32) times q's own bytes (long T: past 16 key blocks for half inputs), run the separate dQ
kernel instead (dq_partial_blocks decides; both paths are tested against float64). The backward block sizes are
chosen independently of the forward's: the only forward state the backward reads is the per-row LSE.

Precision: fp16/bf16 inputs feed tl.dot with half operands (including the probabilities and dS, rounded to the
input dtype as FlashAttention does) and accumulate in fp32. fp32 inputs run on tensor cores too, following torch's
fp32 matmul setting (kernels._common.matmul_precision): TF32 where torch.backends.cuda.matmul.allow_tf32 allows it,
else 3xTF32 (head·head + head·tail + tail·head of each operand's TF32 split, written out in
_attention_triton._mm: tl.dot's own "tf32x3" keeps all four split operands live and spills at any useful tile),
about 2^-21 relative per product. Emulated (TF32 tails truncated, fp32 accumulation) over 440 random cases (D 16-256,
T 2-300) the worst 3xTF32 error of the forward and the gradients against float64 is 0.30 of test_attention.TOL's
float32 bound (IEEE fp32: 0.21), so that bound stands.

Tiles (the _FWD_BLOCKS, _BWD_BLOCKS and _DQ_BLOCKS tables): chosen so that every launch compiles without register
spills on sm_80 and sm_90 with the runtime's specialisation (attention_aot records the launchers' real launches,
tests/test_triton_aot.py compiles them), within the 99 KB of shared memory per block that sm_86/sm_89 GPUs give
(shared_bytes_bound). Half inputs, 8 warps: the forward takes BLOCK_M = 128 query rows against 64 keys (64 x 64 at
D = 256), the backward 128 keys against 64 query rows (32 at D = 64, 64 x 64 at D = 128), the dQ kernel 128 x 64
(64 x 64 at D = 128, 64 x 16 at D = 256): on sm_90 these products are wgmma (HGMMA in the SASS; only the dQ share
at D = 64, 32 rows, is mma.sync; at D = 256 the dQ kernel's 16-key scores are narrow 64x8 wgmma). At D = 256 the
backward's dK/dV accumulators (2 x BLOCK_N x 256 fp32) leave room only for 32 x 32 tiles (64-key tiles spill 250-
1100 bytes in every variant tried: 8 or 16 warps, 1 or 2 stages, 64-wide D strips), which run mma.sync (HMMA),
not wgmma. fp32 operands take twice the registers and a 3xTF32 product splits both, so fp32 tiles are
smaller (BLOCK_M 16-64, BLOCK_N 16-64; wgmma TF32 where BLOCK_M >= 64) and for BLOCK_D >= 64 the D-long products
(q kᵀ, dO vᵀ) are sums over 32-wide column strips loaded one at a time (_row_dots, D_CHUNK) instead of one product
over register-resident (rows, D) tiles; the accumulators (O, dQ, dK, dV) still span the whole head dim. Tiles
shrink to short sequences (tl.dot's minimum of 16) with the same warps and stages. The tables are tight (several
entries sit at 240-255 registers on sm_80): a change needs the AOT check again.

Roofline on an H200 (132 SMs, 4.8 TB/s HBM, ~990 TF/s dense bf16, ~495 TF/s TF32), bf16, estimated (no GPU has run
these kernels yet):

* the default model's attention, B = 32, H = 1, T = 512, D = 256: forward 4·T²·D·B·H = 8.6 GFLOP (8.7 µs at peak)
  and 33.6 MB of q, k, v, O (7.0 µs), 256 programs of 64 rows (one 8-warp block per SM at ~236 registers: 1.94
  waves); expected ~35-45% of peak, ~20-25 µs, about SDPA's flash kernel (FlashAttention-2 in torch, ~45-55% at
  D = 256 on Hopper): 0.8-1.0x its speed. Backward: 32-key blocks are too narrow for the partials (16 of them
  would add 268 MB written and read, ~112 µs, to save 8.6 GFLOP, ~9 µs), so 7 products, 14·T²·D·B·H = 30.1 GFLOP
  (30.4 µs at peak) and ~109 MB (22.7 µs): 512 dK/dV programs of 32 x 32 tiles on mma.sync (one 8-warp block
  per SM: 3.9 waves) and 256 dQ programs of 64 rows on narrow wgmma (one block per SM: 1.9 waves); expected
  ~20-25% of peak, 120-150 µs, against SDPA's ~70 µs (5 products at ~30%): ~0.5x its speed.
* B = 32, H = 8, T = 512, D = 64: forward 17.2 GFLOP (17.4 µs at peak) and 67 MB (14 µs), 1024 programs of 128
  rows (two 8-warp blocks per SM: 3.9 waves), wgmma; expected ~45-55%, 32-38 µs, 0.9-1.1x SDPA. Backward with the
  partials: 5 products, 10·T²·D·B·H = 42.9 GFLOP (43.4 µs at peak; ~124 µs at 35%) in 1024 programs of 128 keys
  against 32-row query steps (one 8-warp block per SM at ~145 registers: 7.8 waves), 4 partials of 33.6 MB each
  (134 MB written, then read by the reduction, ~31 µs with dQ's write) and ~151 MB of inputs and gradients:
  ~160 µs in all, against ~180 µs with the separate dQ kernel (7 products) and SDPA's ~130 µs (5 products with
  atomic dQ): ~0.8x its speed.

fp32 (3xTF32, 165 TF/s peak, 1/6 of bf16's) takes the smaller tiles above and runs ~6x longer than bf16; SDPA has
no flash kernel for fp32 (it runs the memory-efficient one).
"""

import math

import torch
import triton

from .._double_backward import graph_wanted, recomputed_grads
from ..ops.reference.attention import attention_reference
from ._attention_triton import (
    _attention_bwd_delta_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_dq_reduce_kernel,
    _attention_bwd_kernel,
    _attention_fwd_kernel,
)
from ._common import INTERPRETED, dtype_name, matmul_precision, new_output, triton_call_unsupported

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Shared memory per block the kernels need, checked for every AOT case (tests/test_triton_aot.py): every case, in
# every dtype and head dim, fits the 99 KB that sm_86/sm_89 GPUs (RTX 30xx/40xx, A10, L4, L40S) give a block in the
# sm_80 code that those GPUs run (at most 88 KB, the fp32 dQ kernel at head dims 33-64; the rest within 82 KB;
# sm_90 code may take more, see shared_bytes_bound). fused_unsupported declines a call whose bound exceeds the
# device's limit, where Triton would refuse the launch.
SMALL_SHARED_BYTES = 99 * 1024
# The interpreter has no bf16 arithmetic: there the kernels upcast bf16 tiles to fp32 right after loading (and
# round the probabilities through bf16 first, so the numerics still follow the GPU path).
_INTERPRETED = INTERPRETED


# ----------------------------------------------------------------------------------------------- launch settings

# (BLOCK_M, BLOCK_N, D_CHUNK, num_warps, num_stages, maxnreg) per kernel, by BLOCK_D, for half (fp16/bf16) and fp32
# operands. See the module docstring for why these sizes. maxnreg None leaves ptxas its default: every entry
# compiles without spills so (maxnreg=255 on the fp32 entries made ptxas take all 255 registers and spill 8-32
# bytes in several of them).
_FWD_BLOCKS = {
    16: ((128, 64, 16, 8, 3, None), (64, 32, 16, 4, 2, None)),
    32: ((128, 64, 32, 8, 3, None), (64, 32, 32, 8, 2, None)),
    64: ((128, 64, 64, 8, 3, None), (64, 32, 32, 8, 2, None)),
    128: ((128, 64, 128, 8, 2, None), (32, 32, 32, 8, 2, None)),
    256: ((64, 64, 256, 8, 1, None), (32, 16, 32, 8, 1, None)),
}
# The dK/dV (and dQ-partial) backward: BLOCK_N keys per program, BLOCK_M queries per step.
_BWD_BLOCKS = {
    16: ((64, 128, 16, 8, 2, None), (32, 64, 16, 4, 2, None)),
    32: ((64, 128, 32, 8, 1, None), (16, 32, 32, 8, 1, 255)),
    64: ((32, 128, 64, 8, 1, None), (64, 16, 32, 8, 1, None)),
    128: ((64, 64, 128, 8, 2, None), (32, 16, 32, 8, 1, 255)),
    256: ((32, 32, 256, 8, 1, None), (16, 16, 32, 8, 1, None)),
}
# The separate dQ kernel: BLOCK_M queries per program, BLOCK_N keys per step.
_DQ_BLOCKS = {
    16: ((128, 64, 16, 8, 2, None), (64, 64, 16, 8, 2, None)),
    32: ((128, 64, 32, 8, 2, None), (64, 32, 32, 8, 1, None)),
    64: ((128, 64, 64, 8, 2, None), (64, 32, 32, 8, 2, None)),
    128: ((64, 64, 128, 8, 2, None), (32, 32, 32, 8, 1, None)),
    256: ((64, 16, 256, 8, 2, None), (16, 16, 16, 8, 1, None)),
}
# Whether the backward sums dQ from per-key-block partials (5 products) or runs the separate dQ kernel (7
# products): a partial costs an extra read of T x D x 4 bytes (its write overlaps the compute-bound kernel that
# makes it) and saves the separate kernel's 4 x T x BLOCK_N x D flops, so it pays where BLOCK_N > F / BW, F the
# products' achieved rate and BW the HBM bandwidth. On an H200 (4.8 TB/s; ~35% of the 990 TF/s half, 495 TF/s
# TF32 and 165 TF/s 3xTF32 peaks achieved): 72, 36 and 12 keys by tl.dot precision (see the module docstring).
MIN_PARTIAL_KEYS = {"ieee": 72, "tf32": 36, "tf32x3": 12}
# And the partials, n_key_blocks x 4 bytes per element of q, may take at most this many times q's own bytes (their
# footprint grows with T^2): past it, the separate dQ kernel.
DQ_PARTIAL_BYTES_RATIO = 32
_DELTA_TILE = 2048  # elements of O (and of dO, or of one dQ partial) per delta/reduce program
_DELTA_NUM_WARPS = 4


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fit(block: int, seq: int) -> int:
    """Shrink a block to the sequence (tl.dot needs >= 16) so short sequences do not compute padding."""
    return min(block, max(16, triton.next_power_of_2(seq)))


def _blocks(table, head_dim: int, dtype: torch.dtype, seq: int):
    """(BLOCK_M, BLOCK_N, D_CHUNK, num_warps, num_stages, maxnreg) of one kernel for these inputs, tiles shrunk to short
    sequences."""
    block_m, block_n, *rest = table[_block_d(head_dim)][dtype == torch.float32]
    return _fit(block_m, seq), _fit(block_n, seq), *rest


def _launch_options(num_warps, num_stages, maxnreg):
    return dict(num_warps=num_warps, num_stages=num_stages, **({} if maxnreg is None else {"maxnreg": maxnreg}))


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's precision: fp32 on tensor cores, TF32 where torch's fp32 matmuls may use it, else 3xTF32."""
    return matmul_precision(dtype)


def _dot_fp32(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) view with a unit stride along D and, wherever D allows it, 16-byte aligned rows: other
    layouts (a transposed tensor, a view at an odd offset or with odd row strides, e.g. q, k, v sliced from one
    packed buffer) are copied, so that the kernels run their vectorised, divisibility-hinted specialisation (the one
    attention_aot checks; the unhinted one of a misaligned view spills registers at D = 256)."""
    size = t.element_size()
    rows_can_align = t.shape[-1] * size % 16 == 0
    misaligned = t.data_ptr() % 16 != 0 or (rows_can_align and any(s * size % 16 for s in t.stride()[:-1]))
    if (t.stride(-1) != 1 and t.shape[-1] > 1) or misaligned:
        t = t.clone(memory_format=torch.contiguous_format)  # contiguous() would keep a contiguous odd-offset view
    return t if t.dim() == 4 else t.unsqueeze(1)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def dq_partial_blocks(head_dim: int, dtype: torch.dtype, seq: int) -> int:
    """The number of dQ partials (one per key block) the backward sums for these inputs, or 0 when the separate dQ
    kernel computes dQ (key blocks narrower than MIN_PARTIAL_KEYS, a configuration that reads D in column strips:
    fp32 with D > 32, or partials past DQ_PARTIAL_BYTES_RATIO)."""
    block_d = _block_d(head_dim)
    _, block_n, d_chunk, *_ = _BWD_BLOCKS[block_d][dtype == torch.float32]
    n_key_blocks = triton.cdiv(seq, _fit(block_n, seq))
    bytes_ratio = n_key_blocks * 4 // torch.empty((), dtype=dtype).element_size()
    wide_enough = block_n >= MIN_PARTIAL_KEYS[_input_precision(dtype)]
    # A configuration that reads D in strips has no registers left for a (BLOCK_M, BLOCK_D) dQ share beside dK, dV.
    return n_key_blocks if wide_enough and d_chunk == block_d and bytes_ratio <= DQ_PARTIAL_BYTES_RATIO else 0


# ----------------------------------------------------------------------------------------------- launchers


def _forward(q, k, v, lengths, scale):
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    B, H, T, D = q4.shape
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # B = 0 or H = 0: nothing to compute, and an empty grid must never be launched
        return out, lse
    o4 = _as_4d(out)
    block_m, block_n, d_chunk, *options = _blocks(_FWD_BLOCKS, D, q.dtype, T)
    grid = (triton.cdiv(T, block_m) * B * H,)
    _attention_fwd_kernel[grid](
        q4, k4, v4, o4, lse, lengths,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(o4),
        H, T, scale * _LOG2E,
        HEAD_DIM=D, HAS_LENGTHS=lengths is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        D_CHUNK=d_chunk, INPUT_PRECISION=_input_precision(q.dtype), DOT_FP32=_dot_fp32(q.dtype),
        **_launch_options(*options),
    )
    return out, lse


def _backward(grad_out, q, k, v, out, lse, lengths, scale):
    grad_out = grad_out.to(q.dtype)
    if q.numel() == 0:  # B = 0 or H = 0: the gradients are empty too
        return tuple(q.new_empty(q.shape) for _ in range(3))
    q4, k4, v4, o4, do4 = _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(out), _as_4d(grad_out)
    B, H, T, D = q4.shape
    block_d = _block_d(D)
    has_lengths = lengths is not None
    precision, dot_fp32 = _input_precision(q.dtype), _dot_fp32(q.dtype)

    delta = new_output((B, H, T), dtype=torch.float32, device=q.device)
    rows = _fit(_DELTA_TILE // block_d, T)
    _attention_bwd_delta_kernel[(triton.cdiv(T, rows) * B * H,)](
        o4, do4, delta, lengths, *_strides(o4), *_strides(do4), H, T,
        HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=rows, BLOCK_D=block_d, num_warps=_DELTA_NUM_WARPS,
    )

    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(q.shape, dtype=q.dtype, device=q.device)
    dv = new_output(q.shape, dtype=q.dtype, device=q.device)
    dq4, dk4, dv4 = _as_4d(dq), _as_4d(dk), _as_4d(dv)

    n_partials = dq_partial_blocks(D, q.dtype, T)
    # Poisoned under FASTMSC_POISON=1 like every output: a partial the reduction reads but no program wrote fails.
    dq_part = new_output((n_partials, B, H, T, D) if n_partials else (1,), dtype=torch.float32,
                         device=q.device)
    stride_part = B * H * T * D
    block_m, block_n, d_chunk, *options = _blocks(_BWD_BLOCKS, D, q.dtype, T)
    _attention_bwd_kernel[(triton.cdiv(T, block_n) * B * H,)](
        q4, k4, v4, do4, lse, delta, dk4, dv4, dq_part, lengths,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(do4), *_strides(dk4), *_strides(dv4), stride_part,
        H, T, scale * _LOG2E, scale,
        HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        D_CHUNK=d_chunk, DQ_PARTIAL=n_partials > 0, INPUT_PRECISION=precision, DOT_FP32=dot_fp32,
        **_launch_options(*options),
    )
    if n_partials:
        _attention_bwd_dq_reduce_kernel[(triton.cdiv(T, rows) * B * H,)](
            dq_part, dq4, lengths, *_strides(dq4), stride_part, H, T, scale,
            HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=rows, BLOCK_D=block_d, KEY_BLOCK=block_n,
            num_warps=_DELTA_NUM_WARPS,
        )
        return dq, dk, dv
    block_m, block_n, d_chunk, *options = _blocks(_DQ_BLOCKS, D, q.dtype, T)
    _attention_bwd_dq_kernel[(triton.cdiv(T, block_m) * B * H,)](
        q4, k4, v4, do4, lse, delta, dq4, lengths,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(do4), *_strides(dq4),
        H, T, scale * _LOG2E, scale,
        HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        D_CHUNK=d_chunk, INPUT_PRECISION=precision, DOT_FP32=dot_fp32, **_launch_options(*options),
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastmsc::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out shaped like q, contiguous; lse (B, H, T) fp32, H = 1 for 3-D inputs)."""
    return _forward(q, k, v, lengths, scale)


@attention_forward.register_fake
def _(q, k, v, lengths, scale):
    B, T = q.shape[0], q.shape[-2]
    H = q.shape[1] if q.dim() == 4 else 1
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("fastmsc::attention_backward", mutates_args=())
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, lengths: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), each shaped like q and contiguous."""
    return _backward(grad_out, q, k, v, out, lse, lengths, scale)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, lengths, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, lengths)
    ctx.scale = scale


def _attention_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, lengths = ctx.saved_tensors
    if graph_wanted(grad_out, q, k, v):
        dq, dk, dv = recomputed_grads(lambda q, k, v: attention_reference(q, k, v, lengths, ctx.scale), (q, k, v),
                                      ctx.needs_input_grad[:3], (grad_out,))
        return dq, dk, dv, None, None
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, lengths, ctx.scale)
    return dq, dk, dv, None, None


attention_forward.register_autograd(_attention_autograd, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public entry points


def fused(q, k, v, lengths=None, scale=None):
    """Attention with the Triton kernels: q, k, v (B, T, D) or (B, H, T, D) -> same shape as q (contiguous)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return attention_forward(q, k, v, lengths, float(scale))[0]


def fused_unsupported(device_type: str, *, allow_interpreter: bool = False, **call_args) -> str | None:
    """None when the kernels can run these arguments on ``device_type``, else why not; ``allow_interpreter``:
    whether CPU tensors may run in the Triton interpreter (the caller's policy, see fastmsc.kernels._common)."""
    q = call_args.get("q")
    reason = triton_call_unsupported(device_type, q, kernels="the attention kernels",
                                     allow_interpreter=allow_interpreter)
    if reason is not None or q is None:
        return reason
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the attention kernels take head dims up to {MAX_HEAD_DIM}, got D={q.shape[-1]}"
    if q.device.type == "cuda":
        needed, available = shared_bytes_bound(q.dtype, q.shape[-1]), _device_shared_bytes(q.device)
        if needed > available:
            return (f"{dtype_name(q.dtype)} attention with head dim {q.shape[-1]} needs up to {needed // 1024} KB "
                    f"of shared memory per block, and this GPU gives a block {available // 1024} KB")
    return None


def expected_slower(device_type: str, **call_args) -> str | None:
    """On CUDA, the design estimate of the module docstring: 0.8-1.0x SDPA's flash kernel forward and 0.5-0.8x
    backward on an H200, so backend ``auto`` runs SDPA wherever the dispatch table has not measured the kernels
    faster (``fastmsc bench --device cuda --write-dispatch``). Elsewhere (the interpreter) no estimate applies."""
    if device_type != "cuda":
        return None
    return ("the design estimate puts these kernels at 0.8-1.0x SDPA's flash kernel forward and 0.5-0.8x backward "
            "on an H200, and no measurement on this GPU says otherwise")


def shared_bytes_bound(dtype: torch.dtype, head_dim: int) -> int:
    """Most shared memory per block that any attention kernel takes for this dtype and head dim on GPUs before
    Hopper (sm_80 code, which sm_86/sm_89 run too): SMALL_SHARED_BYTES for every one since the 3xTF32 redesign
    (tensor-core fp32 tiles are smaller than the IEEE ones were). sm_90 code stages tensor-core operands in shared
    memory and may take more (up to 105 KB), always within the 227 KB every sm_90 GPU gives a block."""
    return SMALL_SHARED_BYTES


_SHARED_BYTES_PER_DEVICE: dict[int, int] = {}


@torch.compiler.assume_constant_result  # a device property: torch.compile takes it as a constant, no graph break
def _device_shared_bytes(device: torch.device) -> int:
    """The per-block shared memory limit (after opting in) that Triton checks at launch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_BYTES_PER_DEVICE:
        properties = triton.runtime.driver.active.utils.get_device_properties(index)
        _SHARED_BYTES_PER_DEVICE[index] = int(properties["max_shared_mem"])
    return _SHARED_BYTES_PER_DEVICE[index]
