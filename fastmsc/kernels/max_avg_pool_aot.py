"""The compilations of the pooling kernels that the ahead-of-time check (``python -m fastmsc.tools.aot``) makes:
the launches of representative calls, recorded from the op's own launchers. Imported only by that tool and the
tests."""

import functools

import torch

from ..tools.aot_cases import record_launches
from . import max_avg_pool

KERNELS = max_avg_pool  # the module whose @triton.jit kernels need a case each

# The default model (fastmsc.models.MSCClassifier) pools the attention output: 2 x 128 features, batches of 32.
MODEL_CHANNELS = 256
BATCH = 32


def launches():
    """(label, dtype, batch, steps, channels, lengths, misaligned) of the calls whose launches aot_cases() holds:
    the default model at T = 150 with lengths and T = 512 without, and its misaligned-view variant (x a slice
    at element offset 1 of a wider buffer: odd address and strides, no divisibility hints); then every channel
    block the backward's _block_c can pick: 16 (C = 12), 64 (B = 256 sets of 256 channels) and, for half inputs,
    128 (B = 128, C = 1024); the model's 32 is the floor of the halving. T >= 32 keeps 32-step tiles (the only other
    choice, 16 steps for T <= 16, is half that tile). The forward's tiles are _FWD_BLOCKS (or C's and T's next power
    of two where smaller, as at C = 12), its splits of T a runtime argument."""
    launches = []
    for dtype in max_avg_pool._DTYPES:
        name = str(dtype)[6:]
        launches += [(f"{name} model T150 lengths", dtype, BATCH, 150, MODEL_CHANNELS, True, False),
                     (f"{name} model T512", dtype, BATCH, 512, MODEL_CHANNELS, False, False),
                     (f"{name} misaligned T150 lengths", dtype, BATCH, 150, MODEL_CHANNELS, True, True),
                     (f"{name} C12 T150 lengths", dtype, BATCH, 150, 12, True, False),
                     (f"{name} B256 T150 lengths", dtype, 256, 150, MODEL_CHANNELS, True, False)]
        if dtype != torch.float32:
            launches.append((f"{name} B128 C1024 T150 lengths", dtype, 128, 150, 1024, True, False))
    return launches


@functools.cache
def aot_cases():
    """The compilations Triton's runtime makes for the calls of :func:`launches`: the launchers _forward and
    _backward run on meta tensors while fastmsc.tools.aot_cases.record_launches records each kernel launch with the
    runtime's specialisation (divisibility hints, unit channel strides as constants). Built on first use."""
    with record_launches(max_avg_pool) as log:
        for label, dtype, batch, steps, channels, with_lengths, misaligned in launches():
            log.label = label
            if misaligned:
                x = torch.empty((batch, steps, channels + 1), dtype=dtype, device="meta")[..., 1:]
            else:
                x = torch.empty((batch, steps, channels), dtype=dtype, device="meta")
            lengths = torch.empty(batch, dtype=torch.int64, device="meta") if with_lengths else None
            out, idx = max_avg_pool._forward(x, lengths)
            max_avg_pool._backward(torch.empty_like(out), idx, lengths, steps)
    return log.cases
