"""The compilations of the attention kernels that the ahead-of-time check (``python -m fastmsc.tools.aot``)
makes: the launches of representative calls, recorded from the op's own launchers. Imported only by that tool
and the tests."""

import contextlib
import functools
import math

import torch

from ..tools.aot_cases import record_launches
from . import _attention_triton, attention

KERNELS = _attention_triton  # the module whose @triton.jit kernels need a case each

# The default model (fastmsc.models.MSCClassifier): one head of the BiLSTM's 2 x 128 features, batches of 32.
MODEL_HEAD_DIM = 256
BATCH = 32
LONG_STEPS = 4096  # past attention.DQ_PARTIAL_BYTES_RATIO for every head dim: the separate dQ kernel's launches


def _inputs(dtype, batch, steps, head_dim, heads, layout):
    """q, k, v on the meta device (shapes, strides and alignment only) laid out as callers pass them:
    "model" (B, T, D), what SelfAttention's projections give with one head; "heads" (B, H, T, D) views
    (B, T, H, D).transpose(1, 2), what SelfAttention passes for several heads; "misaligned" (B, T, D) slices of one
    (B, T, 3D + 1) buffer at element offsets 1, D + 1, 2D + 1, whose odd addresses and strides would get no
    divisibility hints: the launchers copy such views (attention._as_4d), so their launches must be the aligned
    specialisations (which the unhinted one of the half forward at D = 256 would not fit without spills)."""
    def empty(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    if layout == "model":
        return empty(batch, steps, head_dim), empty(batch, steps, head_dim), empty(batch, steps, head_dim)
    if layout == "heads":
        return tuple(empty(batch, steps, heads * head_dim).view(batch, steps, heads, head_dim).transpose(1, 2)
                     for _ in range(3))
    packed = empty(batch, steps, 3 * head_dim + 1)
    return tuple(packed[..., 1 + i * head_dim:1 + (i + 1) * head_dim] for i in range(3))


def launches():
    """(label, dtype, batch, steps, head_dim, heads, layout, lengths) of the calls whose launches aot_cases() holds:

    * the default model (D = 256, one head, B = 32) at T = 150 with lengths and T = 512 without, in every dtype,
      and its misaligned-view variant (whose views the launchers copy: the same aligned specialisations);
    * every other head-dim bucket (BLOCK_D 16, 32, 64, 128) in every dtype with four heads, T = 150 and lengths;
    * every head-dim bucket in every dtype at T = 4096 (B = 2, one head, no lengths), where every configuration
      takes the separate dQ kernel (attention.dq_partial_blocks is 0), as the short sequences above do for key
      blocks narrower than attention.MIN_PARTIAL_KEYS and fp32 tiles that read D in strips.
    T >= 128 keeps the full tiles of attention's _FWD_BLOCKS/_BWD_BLOCKS/_DQ_BLOCKS (shorter sequences shrink
    BLOCK_M/BLOCK_N: smaller tiles of the same kernels, with the same warps and stages).
    float32 launches at T = 150 are recorded in both of its precisions, 3xTF32 and TF32 (see aot_cases)."""
    launches = []
    for dtype in attention._DTYPES:
        name = str(dtype)[6:]
        for label, steps, layout, with_lengths in (("model T150 lengths", 150, "model", True),
                                                   ("model T512", 512, "model", False),
                                                   ("misaligned T150 lengths", 150, "misaligned", True)):
            launches.append((f"{name} {label}", dtype, BATCH, steps, MODEL_HEAD_DIM, 1, layout, with_lengths))
        for head_dim in (16, 24, 64, 128):
            launches.append((f"{name} D{head_dim} H4 T150 lengths", dtype, BATCH, 150, head_dim, 4, "heads", True))
        for head_dim in (16, 24, 64, 128, MODEL_HEAD_DIM):
            launches.append((f"{name} D{head_dim} T{LONG_STEPS} separate dQ", dtype, 2, LONG_STEPS, head_dim, 1,
                             "model", False))
    return launches


@contextlib.contextmanager
def _tf32(allowed: bool):
    """torch's fp32 matmul flag set for the recording (TF32 products when allowed, else 3xTF32), whatever the
    caller set."""
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


@functools.cache
def aot_cases():
    """The compilations Triton's runtime makes for the launches of :func:`launches`: the launchers _forward
    and _backward run on meta tensors while fastmsc.tools.aot_cases.record_launches records each kernel launch with
    the runtime's specialisation (divisibility hints, constants such as unit strides and H = 1) and the GPU's
    choices (no interpreter-only upcast). float32 launches are recorded with 3xTF32 (torch's default), and those
    at T = 150 once more with TF32 (torch.backends.cuda.matmul.allow_tf32), which changes the products and, for
    some head dims, the dQ path. Built on first use, not at import."""
    with record_launches(attention, _INTERPRETED=False) as log:
        for label, dtype, batch, steps, head_dim, heads, layout, with_lengths in launches():
            for tf32 in (False, True) if dtype == torch.float32 and steps == 150 else (False,):
                log.label = f"{label} tf32" if tf32 else label
                q, k, v = _inputs(dtype, batch, steps, head_dim, heads, layout)
                lengths = torch.empty(batch, dtype=torch.int64, device="meta") if with_lengths else None
                scale = 1.0 / math.sqrt(head_dim)
                with _tf32(tf32):
                    out, lse = attention._forward(q, k, v, lengths, scale)
                    attention._backward(torch.empty_like(out), q, k, v, out, lse, lengths, scale)
    return log.cases
