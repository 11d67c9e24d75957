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

import torch
import torch.nn.functional as F
import triton

from .._double_backward import graph_wanted, recomputed_grads
from ..ops.reference.multiscale_conv1d import multiscale_conv1d_reference
from ._common import dot_precision as _dot_precision
from ._common import interpreting as _interpreting
from ._common import new_output, triton_call_unsupported
from ._multiscale_conv1d_triton import (
    _msc_forward_kernel,
    _msc_grad_input_kernel,
    _msc_grad_weight_partial_kernel,
    _msc_preactivation_grad_kernel,
    _sum_partials_kernel,
)

_ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2}
_INT32_LIMIT = 2**31 - 1


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


def fused_unsupported(device_type: str, *, allow_interpreter: bool = False, **call_args) -> str | None:
    """None when the fused kernels can run these arguments on ``device_type``, else the reason;
    ``allow_interpreter``: whether CPU tensors may run in the Triton interpreter (the caller's policy, see
    fastmsc.kernels._common)."""
    x = call_args.get("x")
    reason = triton_call_unsupported(device_type, x, kernels="the fused kernels", allow_interpreter=allow_interpreter)
    if reason is not None or x is None:
        return reason
    weights = call_args.get("weights") or ()
    c_total = sum(w.shape[0] for w in weights)
    k_max = max([w.shape[-1] for w in weights] or [1])
    per_sample = max(x.shape[1], c_total) * x.shape[2]
    largest_stride_offset = sum((size - 1) * abs(stride)
                                for size, stride in zip(x.shape[1:], x.stride()[1:], strict=True))
    if max(per_sample, largest_stride_offset, c_total * x.shape[1] * k_max) > _INT32_LIMIT:
        return "one sample of x or of the output spans more than 2**31 elements, beyond the kernels' 32-bit offsets"
    return None


__all__ = ["branch_taps", "fused", "fused_unsupported", "pack_weights"]
