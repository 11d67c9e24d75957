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

Backward: a pre-pass writes delta = rowsum(dO * O) (B, H, T) fp32; then one kernel owns BLOCK_N keys and loops over
query blocks to accumulate dK and dV, and another owns BLOCK_M queries and loops over key blocks to accumulate dQ.
No atomics, so gradients are bitwise reproducible. The backward block sizes are chosen independently of the
forward's: the only forward state the backward reads is the per-row LSE, which does not depend on the blocking.

fp32 inputs multiply in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set; fp16/bf16 inputs feed
tl.dot with half operands (including the probabilities, rounded to the input dtype as FlashAttention does) and
accumulate in fp32. An IEEE fp32 tl.dot runs on FMA units and keeps its whole reduction strip per thread in
registers, so for fp32 with D > 64 the D-long products (q kᵀ, dO vᵀ) are sums of tl.dot over D_CHUNK-wide column
strips loaded one at a time (``_row_dots``) instead of one dot over a register-resident (rows, D) tile; the
accumulators (O, dQ, dK, dV) still span the whole head dim. Every head dim from 1 to 256 runs in every dtype.
"""

import math

import torch
import triton

from .._double_backward import graph_wanted, recomputed_grads
from ..ops.reference.attention import attention_reference
from ._attention_triton import (
    _attention_bwd_delta_kernel,
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_fwd_kernel,
)
from ._common import INTERPRETED, dtype_name, new_output, triton_call_unsupported
from ._common import dot_precision as _input_precision

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Shared memory per block the kernels need, checked for every AOT case (tests/test_triton_aot.py): the float32
# backward with head dims above 96 stages D-wide fp32 tiles and needs up to 134 KB (sm_90), more than the 99 KB
# that sm_86/sm_89 GPUs (RTX 30xx/40xx, A10, L4, L40S) give a block, where Triton would refuse the launch; every
# other case fits those 99 KB in the sm_80 code that those GPUs run (sm_90 code may take more, see
# shared_bytes_bound). fused_unsupported declines a call whose bound exceeds the device's limit.
_LARGE_SHARED_HEAD_DIM = 96
SMALL_SHARED_BYTES = 99 * 1024
LARGE_SHARED_BYTES = 136 * 1024
# The interpreter has no bf16 arithmetic: there the kernels upcast bf16 tiles to fp32 right after loading (and
# round the probabilities through bf16 first, so the numerics still follow the GPU path).
_INTERPRETED = INTERPRETED


# ----------------------------------------------------------------------------------------------- launch settings

# (BLOCK_M, BLOCK_N, D_CHUNK, num_warps, num_stages) per kernel, by BLOCK_D, for half (fp16/bf16) and fp32
# operands. D_CHUNK = BLOCK_D holds the (BLOCK_M or BLOCK_N, BLOCK_D) operand tiles of the D-long products in
# registers across the loop; D_CHUNK < BLOCK_D reloads them in D_CHUNK-wide column strips (see _row_dots).
# Chosen so that no configuration spills registers on sm_80 or sm_90 when compiled as the runtime compiles it:
# Triton specialises each launch on its arguments (16-byte aligned pointers and strides divisible by 16 get
# divisibility hints, unit strides and H = 1 become constants), which changes the generated code and its register
# needs, so attention_aot records the launchers' real launches (the default model's and one per head-dim bucket) and
# the check compiles them with that specialisation (tests/test_triton_aot.py). 8 warps for the 64-128 row tiles
# of half inputs (4 warps spill at 128 x 64), and small tiles for IEEE fp32, whose tl.dot runs on FMA units with
# each thread's operand rows and columns over the whole reduction in registers: past D = 64, fp32 reads D in
# 32-wide strips.
# ptxas holds some kernels at an occupancy step (128 registers for 8 warps, 64 for 16, 80 for some 8-warp half
# kernels) and spills a few bytes rather than exceed it, so a configuration must need clearly fewer registers than
# a step, or clearly more: the fp32 forward at BLOCK_D = 256 (with 8 warps and 2 stages the hinted
# specialisations spilled 16-24 bytes on sm_90 and, at D = 200, 8 on sm_80; 16 warps with 2 stages sat at 64
# registers on sm_80 and spilled 8 bytes at D = 200) runs 16 warps without software pipelining: the same 32 x 16
# tile and grid, each thread holding half as much of the 32 x 256 accumulator, at 82-102 registers (one block per
# SM, no K/V prefetch across key blocks); the half-precision dQ at BLOCK_D = 16 steps over 32 keys (128 x 64 score
# tiles sat at 80 registers and spilled 8 bytes on sm_80; the same work in twice the key steps, at 64 registers).
# fp32 tiles are never shrunk for short sequences (see _blocks), and a change here needs the AOT check again.
_FWD_BLOCKS = {
    16: ((128, 64, 16, 8, 3), (32, 32, 16, 4, 2)),
    32: ((128, 64, 32, 8, 3), (32, 32, 32, 4, 2)),
    64: ((128, 64, 64, 8, 3), (32, 32, 64, 4, 2)),
    128: ((64, 64, 128, 8, 3), (32, 16, 32, 4, 2)),
    256: ((32, 32, 256, 8, 2), (32, 16, 32, 16, 1)),
}
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step.
_DKDV_BLOCKS = {
    16: ((32, 128, 16, 8, 2), (32, 32, 16, 4, 2)),
    32: ((32, 128, 32, 8, 2), (32, 32, 32, 4, 2)),
    64: ((32, 128, 64, 8, 2), (32, 32, 64, 4, 2)),
    128: ((32, 64, 128, 8, 2), (32, 32, 32, 8, 2)),
    256: ((32, 32, 256, 8, 2), (16, 32, 32, 8, 2)),
}
# dQ: BLOCK_M queries per program, BLOCK_N keys per step.
_DQ_BLOCKS = {
    16: ((128, 32, 16, 8, 2), (32, 32, 16, 4, 2)),
    32: ((128, 64, 32, 8, 2), (32, 32, 32, 4, 2)),
    64: ((128, 64, 64, 8, 2), (32, 32, 64, 4, 2)),
    128: ((64, 64, 128, 8, 2), (32, 16, 32, 4, 2)),
    256: ((32, 32, 256, 8, 2), (32, 16, 32, 8, 2)),
}
_DELTA_TILE = 4096  # elements of O (and of dO) per delta program: BLOCK_M = _DELTA_TILE // BLOCK_D rows
_DELTA_NUM_WARPS = 4


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _fit(block: int, seq: int) -> int:
    """Shrink a block to the sequence (tl.dot needs >= 16) so short sequences do not compute padding."""
    return min(block, max(16, triton.next_power_of_2(seq)))


def _blocks(table, head_dim: int, dtype: torch.dtype, seq: int):
    """(BLOCK_M, BLOCK_N, D_CHUNK, num_warps, num_stages) of one kernel for these inputs. Half-precision tiles
    shrink to short sequences; fp32 tiles (32 long at most) keep their size, as the 16 x 16 variants of some
    (e.g. dQ with BLOCK_D = 128 on sm_80, the 64-wide forward on sm_90) spill registers."""
    block_m, block_n, d_chunk, num_warps, num_stages = table[_block_d(head_dim)][dtype == torch.float32]
    if dtype != torch.float32:
        block_m, block_n = _fit(block_m, seq), _fit(block_n, seq)
    return block_m, block_n, d_chunk, num_warps, num_stages


def _dot_fp32(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) view with a unit stride along D: other layouts are copied, so that the kernels always run
    their vectorised unit-stride specialisation (the one attention_aot checks) instead of element-wise loads."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        t = t.contiguous()
    return t if t.dim() == 4 else t.unsqueeze(1)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


# ----------------------------------------------------------------------------------------------- launchers


def _forward(q, k, v, lengths, scale):
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    B, H, T, D = q4.shape
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = new_output((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # B = 0 or H = 0: nothing to compute, and an empty grid must never be launched
        return out, lse
    o4 = _as_4d(out)
    block_m, block_n, d_chunk, num_warps, num_stages = _blocks(_FWD_BLOCKS, D, q.dtype, T)
    grid = (triton.cdiv(T, block_m) * B * H,)
    _attention_fwd_kernel[grid](
        q4, k4, v4, o4, lse, lengths,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(o4),
        H, T, scale * _LOG2E,
        HEAD_DIM=D, HAS_LENGTHS=lengths is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        D_CHUNK=d_chunk, INPUT_PRECISION=_input_precision(q.dtype), DOT_FP32=_dot_fp32(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
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
    block_m = _fit(_DELTA_TILE // block_d, T)
    _attention_bwd_delta_kernel[(triton.cdiv(T, block_m) * B * H,)](
        o4, do4, delta, lengths, *_strides(o4), *_strides(do4), H, T,
        HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_DELTA_NUM_WARPS,
    )

    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(q.shape, dtype=q.dtype, device=q.device)
    dv = new_output(q.shape, dtype=q.dtype, device=q.device)
    dq4, dk4, dv4 = _as_4d(dq), _as_4d(dk), _as_4d(dv)

    block_m, block_n, d_chunk, num_warps, num_stages = _blocks(_DKDV_BLOCKS, D, q.dtype, T)
    _attention_bwd_dkdv_kernel[(triton.cdiv(T, block_n) * B * H,)](
        q4, k4, v4, do4, lse, delta, dk4, dv4, lengths,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(do4), *_strides(dk4), *_strides(dv4),
        H, T, scale * _LOG2E, scale,
        HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNK=d_chunk,
        INPUT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=num_warps, num_stages=num_stages,
    )
    block_m, block_n, d_chunk, num_warps, num_stages = _blocks(_DQ_BLOCKS, D, q.dtype, T)
    _attention_bwd_dq_kernel[(triton.cdiv(T, block_m) * B * H,)](
        q4, k4, v4, do4, lse, delta, dq4, lengths,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(do4), *_strides(dq4),
        H, T, scale * _LOG2E, scale,
        HEAD_DIM=D, HAS_LENGTHS=has_lengths, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_CHUNK=d_chunk,
        INPUT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=num_warps, num_stages=num_stages,
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
                    f"of shared memory per block, and this GPU gives a block {available // 1024} KB "
                    f"(float16/bfloat16 inputs, or float32 with head dims up to {_LARGE_SHARED_HEAD_DIM}, fit)")
    return None


def shared_bytes_bound(dtype: torch.dtype, head_dim: int) -> int:
    """Most shared memory per block that any attention kernel takes for this dtype and head dim on GPUs before
    Hopper (sm_80 code, which sm_86/sm_89 run too). sm_90 code stages tensor-core operands in shared memory and
    may take more (up to 115 KB for half inputs), always within the 227 KB every sm_90 GPU gives a block."""
    large = dtype == torch.float32 and head_dim > _LARGE_SHARED_HEAD_DIM
    return LARGE_SHARED_BYTES if large else SMALL_SHARED_BYTES


_SHARED_BYTES_PER_DEVICE: dict[int, int] = {}


@torch.compiler.assume_constant_result  # a device property: torch.compile takes it as a constant, no graph break
def _device_shared_bytes(device: torch.device) -> int:
    """The per-block shared memory limit (after opting in) that Triton checks at launch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_BYTES_PER_DEVICE:
        properties = triton.runtime.driver.active.utils.get_device_properties(index)
        _SHARED_BYTES_PER_DEVICE[index] = int(properties["max_shared_mem"])
    return _SHARED_BYTES_PER_DEVICE[index]
