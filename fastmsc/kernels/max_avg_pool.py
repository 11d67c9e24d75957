"""Global max + average pooling over time in Triton: x (B, T, C) -> (B, 2C) = [max_t x, mean_t x].

Forward: one program per (batch, BLOCK_C channels) streams the valid time steps once, keeping elementwise running
state per (time lane, channel) in registers (max, index of its first occurrence, first NaN, fp32 sum) and reducing
across lanes only at the end, so the loop does no cross-warp reduction. It writes [max, mean] side by side into
(B, 2C) in x's dtype and the int32 index (B, C) of the first maximal valid step: the backward needs only that
index, the lengths and T, never x.

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
def _max_avg_pool_fwd_kernel(
    X, OUT, IDX, LENGTHS,
    stride_xb, stride_xt, stride_xc,
    stride_ob, stride_oc,
    T, C,
    HAS_LENGTHS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    num_c = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    pid_c = pid % num_c
    b = (pid // num_c).to(tl.int64)
    seq_len = T + tl.zeros([], dtype=tl.int32)  # a tensor even when T is specialised to a constant
    if HAS_LENGTHS:
        seq_len = tl.maximum(tl.minimum(tl.load(LENGTHS + b).to(tl.int32), T), 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)
    X += b * stride_xb

    run_max = tl.full([BLOCK_T, BLOCK_C], float("-inf"), dtype=tl.float32)
    run_idx = tl.full([BLOCK_T, BLOCK_C], _NO_INDEX, dtype=tl.int32)
    nan_idx = tl.full([BLOCK_T, BLOCK_C], _NO_INDEX, dtype=tl.int32)
    total = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        t = start + offs_t
        t_ok = t < seq_len
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
    first_nan = tl.min(nan_idx, 0)
    has_nan = first_nan != _NO_INDEX
    peak = tl.where(has_nan, float("nan"), peak)
    peak_idx = tl.where(has_nan, first_nan, peak_idx)
    peak_idx = tl.where(peak_idx == _NO_INDEX, -1, peak_idx)
    mean = tl.sum(total, 0) / seq_len.to(tl.float32)

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
    block_c = _block_c(B, C, x.dtype)
    _max_avg_pool_fwd_kernel[(triton.cdiv(C, block_c) * B,)](
        x, out, idx, lengths, *x.stride(), *out.stride(), T, C,
        HAS_LENGTHS=lengths is not None, BLOCK_T=_block_t(T), BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return out, idx


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
