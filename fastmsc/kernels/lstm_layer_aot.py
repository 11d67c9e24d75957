"""The compilations of the persistent LSTM kernels that the ahead-of-time check (``python -m fastmsc.tools.aot``)
makes: the launches of representative calls, recorded from the op's own launchers. Imported only by that tool and
the tests."""

import functools

import torch

from ..tools.aot_cases import record_launches
from . import _lstm_layer_triton, lstm_persistent

KERNELS = _lstm_layer_triton  # the module whose @triton.jit kernels need a case each

BATCH, STEPS, INPUTS = 32, 150, 192  # the default model: 3 x 64 conv channels into the BiLSTM, batches of 32


def launches():
    """(label, dtype, hidden) of the calls whose launches aot_cases() holds, each a training step of a
    bidirectional layer with lengths and initial state (forward with saved state, backward) plus the inference
    forward: the default model's H = 128 (two 64-wide column chunks), H = 64 (one; the same compilation as 128, H
    being a runtime argument) and H = 16 (one 16-wide chunk), in float32 (which multiplies as 3xTF32) and bfloat16,
    all with 16-wide reduction chunks; float16 (bf16's tiles and dot width) at H = 128. Every other H runs these
    tiles over more or fewer chunks."""
    return [(f"{name} H{hidden}", dtype, hidden) for hidden in (128, 64, 16)
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))] + [
        ("float16 H128", torch.float16, 128)]


@functools.cache
def aot_cases():
    """The compilations Triton's runtime makes for the calls of :func:`launches` (launchers run on meta tensors
    while record_launches records each kernel launch with the runtime's specialisation). Built on first use.

    Recorded twice: as on an H100/H200 (227 KB of shared memory: the resident kernels wherever W_hh fits), and
    with no shared memory to spare (the streaming kernels everywhere, as on GPUs with 99 KB at H = 128)."""
    cases = []
    for shared_bytes in (lstm_persistent.INTERPRETER_SHARED_BYTES, 0):
        with record_launches(lstm_persistent, _INTERPRETED=False, INTERPRETER_SHARED_BYTES=shared_bytes) as log:
            for label, dtype, hidden in launches():
                def empty(*shape, dtype=dtype):
                    return torch.empty(shape, dtype=dtype, device="meta")

                kind = "resident" if lstm_persistent.resident(hidden, dtype, torch.device("meta")) else "streaming"
                x, w_ih, w_hh = empty(BATCH, STEPS, INPUTS), empty(8 * hidden, INPUTS), empty(2, 4 * hidden, hidden)
                bias, lengths = empty(8 * hidden, dtype=torch.float32), empty(BATCH, dtype=torch.int64)
                h0, c0 = empty(2, BATCH, hidden), empty(2, BATCH, hidden)
                log.label = f"{label} {kind} inference"
                lstm_persistent.launch_forward(x, w_ih, w_hh, bias, h0, c0, lengths, False)
                log.label = f"{label} {kind} training"
                out, _, _, gates, cells = lstm_persistent.launch_forward(x, w_ih, w_hh, bias, h0, c0, lengths, True)
                lstm_persistent.launch_backward(empty(BATCH, STEPS, 2 * hidden), empty(2, BATCH, hidden),
                                                empty(2, BATCH, hidden), x, w_ih, w_hh, True, h0, c0, lengths, out,
                                                gates, cells, True, True, True)
        cases += log.cases
    return cases
