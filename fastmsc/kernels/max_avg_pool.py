"""Global max + average pooling over time in Triton: x (B, T, C) -> (B, 2C) = [max_t x, mean_t x].

Forward, two passes. Pass 1: one program per (batch, channel block, split of T) streams its split's valid steps
once, in 64 x 64 (fp32) or 32 x 128 (half) tiles, 3 tiles in flight (a software-pipelined loop: cp.async into
shared memory), keeping elementwise running state per (time lane, channel) in registers (max, index of its first
occurrence, first NaN, fp32 sum) and reducing across lanes only at the end; it writes the split's partial state
(B, splits, C). T is split so that (batch x channel blocks x splits) gives at least 8 waves of programs on 132 SMs
where T has the tiles for it. Pass 2: one program per (batch, channel block) folds the splits in order (the first
maximal step wins ties; the sum is the same on every run) into [max, mean] side by side in (B, 2C) in x's dtype and
the int32 index (B, C) of the first maximal valid step: the backward needs only that index, the lengths and T,
never x.

Roofline (H200, 4.8 TB/s): the forward reads x once (B·T·C·itemsize) and writes 16 bytes per (batch, split,
channel) of partials plus the output; at B = 32, T = 512, C = 256 in fp32 that is 16.8 MB in, 0.4 MB of partials
(4 splits), ~3.5 µs at HBM speed. 1,024 pass-1 programs of 8 warps, one per SM at a time (185 registers at most),
each with 3 x 16 KB tiles in flight (48 KB per SM, above the ~36 KB per SM that Little's law asks of 4.8 TB/s at
~1 µs latency): designed for >= 80% of the copy bandwidth; not yet measured on a GPU.

Backward: one program per (batch, BLOCK_T steps, BLOCK_C channels) writes its tile of dx exactly once:
dx[b, t, c] = g_max[b, c] * (t == index[b, c]) + g_mean[b, c] / len[b] * (t < len[b]).

NaN: the maximum follows torch.max: a channel with a NaN among its valid steps has max NaN, and its max gradient
goes to the first NaN step; the mean of such a channel is NaN too (the NaN enters the sum).
Lengths are clamped to [0, T] in the kernels (the public op has already checked them, except under torch.compile);
a zero length gives max -inf, index -1 (no max gradient anywhere) and mean NaN (0/0), as torch gives for an empty
reduction.
"""


import torch
import triton
import triton.language as tl

from .._double_backward import graph_wanted
from ..ops._checks import compute_dtype, time_mask
from ._common import new_output, triton_call_unsupported

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NO_INDEX = tl.constexpr(2147483647)  # larger than every time step: "no candidate yet" in the running first-index state


@triton.jit
def _max_avg_pool_partial_kernel(
    X, PMAX, PIDX, PNAN, PSUM, LENGTHS,
    stride_xb, stride_xt, stride_xc,
    T, C, SPLITS, SPLIT_STEPS,
    HAS_LENGTHS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Pass 1: program (b, channel block, split s) streams the valid steps of [s * SPLIT_STEPS, (s + 1) *
    SPLIT_STEPS) once and writes the split's partial state per channel to (B, SPLITS, C): its maximum, the first
    step holding it, its first NaN step (_NO_INDEX where none) and its fp32 sum."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    pid_c = pid % num_c
    split = (pid // num_c) % SPLITS
    b = (pid // (num_c * SPLITS)).to(tl.int64)
    seq_len = T + tl.zeros([], dtype=tl.int32)  # a tensor even when T is specialised to a constant
    if HAS_LENGTHS:
        seq_len = tl.maximum(tl.minimum(tl.load(LENGTHS + b).to(tl.int32), T), 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)
    X += b * stride_xb
    lo = split * SPLIT_STEPS
    hi = tl.minimum(lo + SPLIT_STEPS, seq_len)

    # Running state per (time lane, channel): no cross-warp reduction inside the loop
    run_max = tl.full([BLOCK_T, BLOCK_C], float("-inf"), dtype=tl.float32)
    run_idx = tl.full([BLOCK_T, BLOCK_C], _NO_INDEX, dtype=tl.int32)
    nan_idx = tl.full([BLOCK_T, BLOCK_C], _NO_INDEX, dtype=tl.int32)
    total = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    # Software-pipelined: NUM_STAGES tiles in flight, so a program keeps enough bytes in flight to stream at HBM speed
    for start in tl.range(lo, hi, BLOCK_T, num_stages=NUM_STAGES):
        t = start + offs_t
        t_ok = t < hi
        x = tl.load(X + t[:, None] * stride_xt + offs_c[None, :] * stride_xc, mask=t_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        total += x
        is_nan = x != x
        steps = tl.broadcast_to(t[:, None], [BLOCK_T, BLOCK_C])
        # Each lane sees its steps in increasing order, so a strict > keeps the first maximal one; the first valid
        # step of a lane is always taken so that an all -inf channel still gets an index.
        take = t_ok[:, None] & ~is_nan & ((x > run_max) | (run_idx == _NO_INDEX))
        run_max = tl.where(take, x, run_max)
        run_idx = tl.where(take, steps, run_idx)
        nan_idx = tl.where(is_nan & (nan_idx == _NO_INDEX), steps, nan_idx)

    peak = tl.max(run_max, 0)
    peak_idx = tl.min(tl.where((run_max == peak[None, :]) & (run_idx != _NO_INDEX), run_idx, _NO_INDEX), 0)
    at = (b * SPLITS + split) * C + offs_c
    tl.store(PMAX + at, peak, mask=c_ok)
    tl.store(PIDX + at, peak_idx, mask=c_ok)
    tl.store(PNAN + at, tl.min(nan_idx, 0), mask=c_ok)
    tl.store(PSUM + at, tl.sum(total, 0), mask=c_ok)


@triton.jit
def _max_avg_pool_combine_kernel(
    PMAX, PIDX, PNAN, PSUM, OUT, IDX, LENGTHS,
    stride_ob, stride_oc,
    T, C, SPLITS,
    HAS_LENGTHS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pass 2: program (b, channel block) folds the splits' partial states in split order (so the first maximal
    step wins ties and the sum is the same on every run) into [max, mean] (B, 2C) and the index (B, C)."""
    num_c = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    pid_c = pid % num_c
    b = (pid // num_c).to(tl.int64)
    seq_len = T + tl.zeros([], dtype=tl.int32)
    if HAS_LENGTHS:
        seq_len = tl.maximum(tl.minimum(tl.load(LENGTHS + b).to(tl.int32), T), 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    peak = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    peak_idx = tl.full([BLOCK_C], _NO_INDEX, dtype=tl.int32)
    first_nan = tl.full([BLOCK_C], _NO_INDEX, dtype=tl.int32)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for split in range(0, SPLITS):
        at = (b * SPLITS + split) * C + offs_c
        split_max = tl.load(PMAX + at, mask=c_ok, other=float("-inf"))
        split_idx = tl.load(PIDX + at, mask=c_ok, other=_NO_INDEX)
        take = (split_idx != _NO_INDEX) & ((split_max > peak) | (peak_idx == _NO_INDEX))
        peak = tl.where(take, split_max, peak)
        peak_idx = tl.where(take, split_idx, peak_idx)
        first_nan = tl.minimum(first_nan, tl.load(PNAN + at, mask=c_ok, other=_NO_INDEX))
        total += tl.load(PSUM + at, mask=c_ok, other=0.0)
    has_nan = first_nan != _NO_INDEX
    peak = tl.where(has_nan, float("nan"), peak)
    peak_idx = tl.where(has_nan, first_nan, peak_idx)
    peak_idx = tl.where(peak_idx == _NO_INDEX, -1, peak_idx)
    mean = total / seq_len.to(tl.float32)
    OUT += b * stride_ob
    tl.store(OUT + offs_c * stride_oc, peak.to(OUT.dtype.element_ty), mask=c_ok)
    tl.store(OUT + (C + offs_c) * stride_oc, mean.to(OUT.dtype.element_ty), mask=c_ok)
    tl.store(IDX + b * C + offs_c, peak_idx, mask=c_ok)


@triton.jit
def _max_avg_pool_bwd_kernel(
    G, IDX, DX, LENGTHS,
    stride_gb, stride_gc,
    stride_dxb, stride_dxt, stride_dxc,
    T, C,
    HAS_LENGTHS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    num_c = tl.cdiv(C, BLOCK_C)
    num_t = tl.cdiv(T, BLOCK_T)
    pid = tl.program_id(0)
    pid_c = pid % num_c
    pid_t = (pid // num_c) % num_t
    b = (pid // (num_c * num_t)).to(tl.int64)
    seq_len = T + tl.zeros([], dtype=tl.int32)  # a tensor even when T is specialised to a constant
    if HAS_LENGTHS:
        seq_len = tl.maximum(tl.minimum(tl.load(LENGTHS + b).to(tl.int32), T), 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    G += b * stride_gb
    g_max = tl.load(G + offs_c * stride_gc, mask=c_ok, other=0.0).to(tl.float32)
    g_mean = tl.load(G + (C + offs_c) * stride_gc, mask=c_ok, other=0.0).to(tl.float32)
    peak_idx = tl.load(IDX + b * C + offs_c, mask=c_ok, other=-1)
    g_step = g_mean / tl.maximum(seq_len, 1).to(tl.float32)
    dx = tl.where(t[:, None] == peak_idx[None, :], g_max[None, :], 0.0)
    dx += tl.where(t[:, None] < seq_len, g_step[None, :], 0.0)
    tl.store(DX + b * stride_dxb + t[:, None] * stride_dxt + offs_c[None, :] * stride_dxc, dx.to(DX.dtype.element_ty),
             mask=(t < T)[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------- launch settings

_NUM_WARPS = 4
_BLOCK_T = 32
_MANY_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over
# The forward's pass 1: (channels, steps) per tile, 256-byte rows of channels (coalesced, 16-byte vector loads)
# and 4096 elements per tile (8 warps: 16 per thread, four running states of them in registers); 3 tiles in
# flight per program; at least 8 waves of programs on 132 SMs, split along T where the batch and channels alone
# give fewer.
_FWD_BLOCKS = {torch.float32: (64, 64), torch.float16: (128, 32), torch.bfloat16: (128, 32)}
_FWD_WARPS = 8
_FWD_STAGES = 3
_FWD_PROGRAMS = 8 * 132
# Registers per thread: given only the block size, ptxas caps them at 128 and spills a few bytes in the misaligned
# (scalar-load) specialisation; one 8-warp block per SM with 3 tiles in flight (48-96 KB) already covers HBM latency.
_FWD_MAXNREG = 192


def _block_c(batch: int, channels: int, dtype: torch.dtype) -> int:
    """256-byte rows of channels for coalesced loads, halved while that leaves too few programs for the GPU."""
    block = 64 if dtype == torch.float32 else 128
    while block > 32 and batch * triton.cdiv(channels, block) < _MANY_PROGRAMS:
        block //= 2
    return min(block, max(16, triton.next_power_of_2(channels)))


def _block_t(steps: int) -> int:
    return min(_BLOCK_T, max(16, triton.next_power_of_2(steps)))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Copy a layout whose channels are not adjacent, so the kernels always run their coalesced unit-stride
    specialisation (the one max_avg_pool_aot checks); reading such a layout channel-wise would be uncoalesced anyway."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _forward(x, lengths):
    x = _unit_last_stride(x)
    B, T, C = x.shape
    out = new_output((B, 2 * C), dtype=x.dtype, device=x.device)
    idx = new_output((B, C), dtype=torch.int32, device=x.device)
    if out.numel() == 0:  # B = 0 or C = 0: nothing to compute, and an empty grid must never be launched
        return out, idx
    block_c, block_t = _FWD_BLOCKS[x.dtype]
    block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    block_t = min(block_t, max(16, triton.next_power_of_2(T)))
    splits, split_steps = _splits(B * triton.cdiv(C, block_c), T, block_t)
    partial = dict(dtype=torch.float32, device=x.device)
    pmax, psum = new_output((B, splits, C), **partial), new_output((B, splits, C), **partial)
    pidx = new_output((B, splits, C), dtype=torch.int32, device=x.device)
    pnan = new_output((B, splits, C), dtype=torch.int32, device=x.device)
    _max_avg_pool_partial_kernel[(triton.cdiv(C, block_c) * splits * B,)](
        x, pmax, pidx, pnan, psum, lengths, *x.stride(), T, C, splits, split_steps,
        HAS_LENGTHS=lengths is not None, BLOCK_T=block_t, BLOCK_C=block_c, NUM_STAGES=_FWD_STAGES,
        num_warps=_FWD_WARPS, maxnreg=_FWD_MAXNREG,
    )
    _max_avg_pool_combine_kernel[(triton.cdiv(C, block_c) * B,)](
        pmax, pidx, pnan, psum, out, idx, lengths, *out.stride(), T, C, splits,
        HAS_LENGTHS=lengths is not None, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return out, idx


def _splits(programs: int, steps: int, block_t: int) -> tuple[int, int]:
    """(splits of T, steps per split, a multiple of block_t): enough (batch, channel block, split) programs for
    _FWD_PROGRAMS where T has the tiles for it."""
    tiles = triton.cdiv(steps, block_t)
    wanted = min(tiles, max(1, triton.cdiv(_FWD_PROGRAMS, programs)))
    split_steps = triton.cdiv(tiles, wanted) * block_t
    return triton.cdiv(steps, split_steps), split_steps


def _backward(grad, idx, lengths, steps):
    grad = _unit_last_stride(grad)
    B, C = idx.shape
    dx = new_output((B, steps, C), dtype=grad.dtype, device=grad.device)
    if dx.numel() == 0:  # B = 0 or C = 0
        return dx
    block_c, block_t = _block_c(B, C, grad.dtype), _block_t(steps)
    _max_avg_pool_bwd_kernel[(triton.cdiv(C, block_c) * triton.cdiv(steps, block_t) * B,)](
        grad, idx, dx, lengths, *grad.stride(), *dx.stride(), steps, C,
        HAS_LENGTHS=lengths is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return dx


# ----------------------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastmsc::max_avg_pool_forward", mutates_args=())
def max_avg_pool_forward(x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, 2C) in x's dtype, index (B, C) int32 of the first maximal valid step)."""
    return _forward(x, lengths)


@max_avg_pool_forward.register_fake
def _(x, lengths):
    B, _, C = x.shape
    return x.new_empty((B, 2 * C)), x.new_empty((B, C), dtype=torch.int32)


@torch.library.custom_op("fastmsc::max_avg_pool_backward", mutates_args=())
def max_avg_pool_backward(grad: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor | None,
                          steps: int) -> torch.Tensor:
    """grad (B, 2C), index (B, C) int32 -> dx (B, steps, C) in grad's dtype."""
    return _backward(grad, index, lengths, steps)


@max_avg_pool_backward.register_fake
def _(grad, index, lengths, steps):
    B, C = index.shape
    return grad.new_empty((B, steps, C))


def _setup_context(ctx, inputs, output):
    x, lengths = inputs
    _, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(index, lengths)
    ctx.steps = x.shape[1]


def _pool_autograd(ctx, grad_out, grad_index):
    index, lengths = ctx.saved_tensors
    if graph_wanted(grad_out):
        return _differentiable_backward(grad_out, index, lengths, ctx.steps), None
    return max_avg_pool_backward(grad_out, index, lengths, ctx.steps), None


def _differentiable_backward(grad, index, lengths, steps):
    """The backward kernel's dx (B, steps, C) from grad (B, 2C), index (B, C) and lengths, in torch ops.

    For double backward: dx is linear in grad and, away from ties, independent of x (the index is piecewise
    constant), so recording how it depends on grad is the whole second-order graph."""
    B, C = index.shape
    work = compute_dtype(grad.dtype)
    g_max, g_mean = grad.to(work).split(C, dim=1)
    if lengths is None:
        valid = torch.ones(B, steps, dtype=torch.bool, device=grad.device)
        count = torch.full((B,), steps, dtype=work, device=grad.device)
    else:
        valid = time_mask(lengths, steps)
        count = lengths.clamp(1, steps).to(work)
    dx = (g_mean / count[:, None])[:, None, :] * valid[:, :, None]
    found = index >= 0  # -1: an empty sequence (only reachable by a direct call), no maximum to route to
    at = index.clamp_min(0).long()[:, None, :]
    dx = dx.scatter_add(1, at, torch.where(found, g_max, torch.zeros_like(g_max))[:, None, :])
    return dx.to(grad.dtype)


max_avg_pool_forward.register_autograd(_pool_autograd, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- public entry points


def fused(x, lengths=None):
    """Max + mean pooling with the Triton kernels: x (B, T, C) -> (B, 2C) in x's dtype."""
    return max_avg_pool_forward(x, lengths)[0]


def fused_unsupported(device_type: str, *, allow_interpreter: bool = False, **call_args) -> str | None:
    """None when the kernels can run these arguments on ``device_type``, else why not; ``allow_interpreter``:
    whether CPU tensors may run in the Triton interpreter (the caller's policy, see fastmsc.kernels._common)."""
    return triton_call_unsupported(device_type, call_args.get("x"), kernels="the pooling kernels",
                                   allow_interpreter=allow_interpreter)
