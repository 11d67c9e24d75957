"""Small Triton kernels that exercise fastmsc.tools.aot: an elementwise kernel with a device helper,
a tl.dot kernel (uses shared memory), and a kernel built to spill registers.

``AOT_CASES`` covers the well-behaved kernels; ``SPILL_CASES`` holds the spilling one; ``ALL_CASES`` both, which
``aot_cases()`` returns as an ``<op>_aot.py`` module does for the tool.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl


@triton.jit
def _squash(x):
    # A device helper: inlined into its caller, so it needs no case of its own.
    return x / (1.0 + tl.abs(x))


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(y_ptr + offsets, _squash(x * scale).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, inner = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * K + (k + inner)[None, :])
        b = tl.load(b_ptr + (k + inner)[:, None] * BLOCK_N + cols[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], acc)


@triton.jit
def _spill_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # Two BLOCK-wide fp32 vectors live across the loop in one warp: 2 * BLOCK / 32 values per thread,
    # far beyond the 255 registers a thread can hold, so ptxas must spill.
    offsets = tl.arange(0, BLOCK)
    first = tl.load(x_ptr + offsets)
    acc = first
    for i in range(n):
        acc = acc * first + tl.load(x_ptr + offsets + i)
    tl.store(y_ptr + offsets, acc + first)


AOT_CASES = [
    {"name": f"scale_{dtype}", "kernel": _scale_kernel,
     "signature": {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "n": "i32", "scale": "fp32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1}
    for dtype in ("fp32", "fp16", "bf16")
] + [
    {"name": "matmul_fp16", "kernel": _matmul_kernel,
     "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
     "constexprs": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, "num_warps": 4, "num_stages": 3},
]

SPILL_CASES = [
    {"name": "spill_fp32", "kernel": _spill_kernel,
     "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": 4096}, "num_warps": 1, "num_stages": 1},
]

ALL_CASES = AOT_CASES + SPILL_CASES
KERNELS = sys.modules[__name__]


def aot_cases():
    return ALL_CASES
