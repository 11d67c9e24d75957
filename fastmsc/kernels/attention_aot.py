"""The compilations of the attention kernels that the ahead-of-time check (``python -m fastmsc.tools.aot``)
makes: the launches of representative calls, recorded from the op's own launchers. Imported only by that tool
and the tests."""

import functools
import math

import torch

from ..tools.aot_cases import record_launches
from . import _attention_triton, attention

KERNELS = _attention_triton  # the module whose @triton.jit kernels need a case each

# The default model (fastmsc.models.MSCClassifier): one head of the BiLSTM's 2 x 128 features, batches of 32.
MODEL_HEAD_DIM = 256
BATCH = 32


def _inputs(dtype, batch, steps, head_dim, heads, layout):
    """q, k, v on the meta device (shapes, strides and alignment only) laid out as callers pass them:
    "model" (B, T, D), what SelfAttention's projections give with one head; "heads" (B, H, T, D) views
    (B, T, H, D).transpose(1, 2), what SelfAttention passes for several heads; "misaligned" (B, T, D) slices of one
    (B, T, 3D + 1) buffer at element offsets 1, D + 1, 2D + 1, whose odd addresses and strides get no divisibility
    hints (the unhinted specialisation a user's view can reach)."""
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
      and its misaligned-view variant;
    * every other head-dim bucket (BLOCK_D 16, 32, 64, 128) in every dtype with four heads, T = 150 and lengths;
      for fp32 also D = 96 (four heads) and D = 200 (one head, T = 512, no lengths: the specialisation that came
      closest to spilling in the forward), whose last D_CHUNK-wide strip is partial.
    T >= 128 keeps the full tiles of attention's _FWD_BLOCKS/_DKDV_BLOCKS/_DQ_BLOCKS (shorter sequences shrink the
    half-precision BLOCK_M/BLOCK_N: smaller tiles of the same kernels, with the same warps and stages; fp32 tiles
    never shrink).
    tf32 uses tensor cores instead of the register-hungrier IEEE fp32 path, so the IEEE cases bound it."""
    launches = []
    for dtype in attention._DTYPES:
        name = str(dtype)[6:]
        for label, steps, layout, with_lengths in (("model T150 lengths", 150, "model", True),
                                                   ("model T512", 512, "model", False),
                                                   ("misaligned T150 lengths", 150, "misaligned", True)):
            launches.append((f"{name} {label}", dtype, BATCH, steps, MODEL_HEAD_DIM, 1, layout, with_lengths))
        head_dims = (16, 24, 64, 96, 128) if dtype == torch.float32 else (16, 24, 64, 128)
        for head_dim in head_dims:
            launches.append((f"{name} D{head_dim} H4 T150 lengths", dtype, BATCH, 150, head_dim, 4, "heads", True))
        if dtype == torch.float32:
            launches.append((f"{name} D200 T512", dtype, BATCH, 512, 200, 1, "model", False))
    return launches


@functools.cache
def aot_cases():
    """The compilations Triton's runtime makes for the launches of :func:`launches`: the launchers _forward
    and _backward run on meta tensors while fastmsc.tools.aot_cases.record_launches records each kernel launch with
    the runtime's specialisation (divisibility hints, constants such as unit strides and H = 1) and the GPU's
    choices (no interpreter-only upcast). Built on first use, not at import."""
    with record_launches(attention, _INTERPRETED=False) as log:
        for label, dtype, batch, steps, head_dim, heads, layout, with_lengths in launches():
            log.label = label
            q, k, v = _inputs(dtype, batch, steps, head_dim, heads, layout)
            lengths = torch.empty(batch, dtype=torch.int64, device="meta") if with_lengths else None
            scale = 1.0 / math.sqrt(head_dim)
            out, lse = attention._forward(q, k, v, lengths, scale)
            attention._backward(torch.empty_like(out), q, k, v, out, lse, lengths, scale)
    return log.cases
