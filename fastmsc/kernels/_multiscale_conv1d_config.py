"""Launch heuristics of the multi-scale conv kernels (:mod:`fastmsc.kernels.multiscale_conv1d` holds their design
and launchers): pure functions of the shapes, the precision and the device's program count, so the backward's
recomputation of z picks exactly the forward's blocks and multiscale_conv1d_aot can enumerate every choice."""

from __future__ import annotations

import triton

# Every configuration the heuristics below can pick; multiscale_conv1d_aot compiles each of them.
_TIME_BLOCKS = (32, 64, 128)
_FORWARD_O_BLOCK = 64
_RESIDENT_R_BLOCKS = (16, 32, 64, 128)  # an im2col tile this tall stays in registers for every output block
_STREAMED_R_BLOCK = 32  # wider reductions stream the tile in chunks of this many rows
_IM2COL_TILE_LIMIT = 2048  # elements of the (BLOCK_R, BLOCK_T) gathered tile: its pointers cost 2 registers each
_DX_C_BLOCKS = (16, 64)
_DW_R_BLOCKS = (16, 32, 64, 128)
_DW_O_BLOCK = 64
_MIN_SPLITS, _MAX_SPLITS = 16, 32  # of the dW reduction over batch x time (_grad_weight_splits)
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
    8 warps from 64 steps or a 4096-element gathered tile on, where even 8 warps take up to 255 registers per
    thread for 3xTF32 on sm_80 (split operands, three products); one stage, because software-pipelining the
    nested output-block / reduction loops spilled fp32 tiles on sm_80."""
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


def _grad_input_config(T: int, c_in: int, precision: str) -> dict:
    """Blocks of the dx kernel: tl.dot on tensor cores with C_in padded to 16 (or 64) rows, so the gz tile is read
    once for all input channels; the padding costs tensor-core time only, which the kernel has to spare (it is
    bound by reading gz)."""
    block_c = _smallest_block_covering(c_in, _DX_C_BLOCKS)
    block_t = _time_block(T)
    # (BLOCK_Q, BLOCK_T) pairs without spills on sm_80/sm_90 in tf32, tf32x3, fp16 and bf16 (checked by the AOT tool).
    # 3xTF32 at 128 steps takes 16-row chunks: with the branch weights read in place (per-chunk branch selection
    # and tap masks) 32 spilled on sm_90 with 4 branches.
    block_q = (16 if precision == "tf32x3" else 32) if block_t > 32 else 64
    return {"BLOCK_C": block_c, "BLOCK_Q": block_q, "BLOCK_T": block_t,
            "num_warps": 8 if (block_t > 32 or block_c > 16) else 4, "num_stages": 2}


def _grad_weight_config(r: int, precision: str) -> dict:
    """Blocks of the dW kernel: up to 128 (channel, tap) columns, so that for C_in <= 18 with 7 taps one
    program column covers them all and gz is read once.

    The kernel streams gz (the only large operand) through few programs (16-32 splits x a few dW tiles: 96 for
    the model), so each program must keep much of it in flight: up to 32 columns (C_in <= 4, the model's inputs)
    it takes 64-step chunks three stages deep (about 48 KB of loads in flight per program, ~4.6 MB for 96 of them,
    enough to cover HBM latency on an H200), 32-step ones for 3xTF32, whose split operands need 255 registers on
    sm_80 at 64 steps. Wider column blocks take 16-step chunks, two stages deep (their (BLOCK_T, BLOCK_R)
    gathered x tile is already large). No maxnreg: every variant fits without spills (checked by the AOT tool)."""
    block_r = _smallest_block_covering(r, _DW_R_BLOCKS)
    if block_r <= 32:
        return {"BLOCK_O": _DW_O_BLOCK, "BLOCK_R": block_r, "BLOCK_T": 32 if precision == "tf32x3" else 64,
                "num_warps": 8, "num_stages": 3}
    return {"BLOCK_O": _DW_O_BLOCK, "BLOCK_R": block_r, "BLOCK_T": 16, "num_warps": 8, "num_stages": 2}


def _grad_weight_splits(n_bt: int, tiles: int, programs: int) -> int:
    """How many splits S the batch x time reduction of dW is cut into: split s sums a fixed, contiguous range of
    n_bt // S (batch, time tile) pairs, one more for the first n_bt % S splits, one program per split and dW tile
    (``tiles`` of them).

    S = clamp(cdiv(programs, tiles), 16, 32), at most n_bt: at least 16 so that even a single dW tile streams gz
    through 16 SMs, at most 32 so the fp32 partial buffer and the summing kernel's reads stay within 32 x dW
    (under 1 MB for the model) instead of growing with B x T. The model's 3 dW tiles get 32 (96 programs). S
    depends only on the shapes and the device, so the order of the sums (and every bit of dW) is the same on
    every run."""
    return max(1, min(n_bt, _MAX_SPLITS, max(_MIN_SPLITS, triton.cdiv(programs, tiles))))
