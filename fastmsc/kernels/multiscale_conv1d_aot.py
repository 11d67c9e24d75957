"""The compilations of the multi-scale conv kernels that the ahead-of-time check (``python -m fastmsc.tools.aot``)
makes: the launches of representative calls, recorded from the op's own launchers. Imported only by that tool
and the tests."""

from __future__ import annotations

import functools

import torch

from ..tools.aot_cases import case_key, record_launches
from . import _multiscale_conv1d_triton
from . import multiscale_conv1d as msc
from ._common import tensor_core_precision

KERNELS = _multiscale_conv1d_triton  # the module whose @triton.jit kernels need a case each

# The default model (fastmsc.models.MSCClassifier): 3 input channels, 64 channels per kernel size 3/5/7, bias,
# no activation (BatchNorm follows), batches of 32; its input needs no gradient.
MODEL = {"c_in": 3, "branches": ((64, 3), (64, 5), (64, 7)), "batch": 32, "activation": "none",
         "need_input": False}
# The most branches the kernels read in place (4, the longest chains of per-channel selects) and one more (the
# flat weights concatenated per call, with a layout tensor).
WIDE_BRANCHES = {4: ((64, 3), (64, 5), (64, 7), (64, 9)), 5: ((32, 1), (32, 3), (32, 5), (32, 7), (32, 9))}
# SM counts of the GPUs the forward's time tiles are chosen for (it keeps 2 programs per SM): H100 SXM, A100.
SM_COUNTS = (132, 108)


def launches():
    """(label, dtype, calls) of the calls whose launches aot_cases() holds, each call a dict of c_in, steps, batch,
    activation, need_input and tf32 (the default model's branches and bias; for float32, tf32 True is
    torch.backends.cudnn.allow_tf32 on, torch's default, and False runs 3xTF32):

    * the default model at T = 150 and T = 512, with its 3 input channels and with 1 (univariate series);
    * with GELU and every gradient, one call per tile the heuristics can pick: the forward / z-recomputing tile
      (BLOCK_R, BLOCK_T, resident) for C_in = 2 (R = 14 -> 16 rows), 4 (28 -> 32), 8 (56 -> 64), 16 (112 -> 128) and
      32 (224, streamed in 32-row chunks); T = 150 gives 32-step tiles and T = 1024 128-step ones, shrunk to 64 by
      the tile limit (C_in = 4, 32) or by too few programs (C_in = 2 with 20 samples). Those calls also reach every
      dW column block (16 to 128) and the dx kernel with 16 and 64 channel blocks at 32 and 128 steps;
    * with GELU and every gradient, 4 branches (the kernels' widest per-channel branch selection) and 5 (more than
      they read in place: flat weights and a layout tensor), at T = 512 with the model's 3 input channels;
    * float32 twice, with TF32 and with 3xTF32 products: the two compile to different code (3xTF32 splits every
      operand into a high and a low TF32 part and issues three products), so every tile is checked in both."""
    model = {"c_in": MODEL["c_in"], "batch": MODEL["batch"], "activation": MODEL["activation"],
             "need_input": MODEL["need_input"]}
    tiles = [(2, 150, 32), (2, 1024, 64), (2, 1024, 20), (4, 150, 32), (4, 1024, 64), (8, 150, 32), (16, 150, 32),
             (32, 150, 32), (32, 1024, 64)]
    launches = []
    for name, dtype, tf32 in (("tf32", torch.float32, True), ("tf32x3", torch.float32, False),
                              ("float16", torch.float16, False), ("bfloat16", torch.bfloat16, False)):
        launches += [(f"{name} model T{steps}", dtype, {**model, "steps": steps, "tf32": tf32}) for steps in (150, 512)]
        launches += [(f"{name} model C_in1 T{steps}", dtype, {**model, "c_in": 1, "steps": steps, "tf32": tf32})
                     for steps in (150, 512)]
        launches += [(f"{name} gelu C_in{c_in} T{steps} B{batch}", dtype,
                      {"c_in": c_in, "steps": steps, "batch": batch, "activation": "gelu", "need_input": True,
                       "tf32": tf32}) for c_in, steps, batch in tiles]
        launches += [(f"{name} gelu {n} branches T512", dtype,
                      {"c_in": 3, "steps": 512, "batch": 32, "activation": "gelu", "need_input": True, "tf32": tf32,
                       "branches": branches}) for n, branches in WIDE_BRANCHES.items()]
    return launches


def _gpu(sm_count: int, tf32: bool) -> dict:
    """Replacements for the module's device queries, so that launchers given meta tensors choose as on a GPU
    with ``sm_count`` SMs, with torch.backends.cudnn.allow_tf32 = ``tf32``."""
    return {"_interpreting": lambda device: False,
            "_parallel_programs": lambda device: msc._PROGRAMS_PER_SM * sm_count,
            "_conv_precision": lambda dtype: tensor_core_precision(dtype, allow_tf32=tf32)}


@functools.cache
def aot_cases() -> list[dict]:
    """The compilations Triton's runtime makes for the calls of :func:`launches` on each GPU of
    SM_COUNTS: the op's own launch functions run on meta tensors while fastmsc.tools.aot_cases.record_launches
    records every kernel launch with the runtime's specialisation (divisibility hints, unit strides as constants)
    and the GPU's choices (SM count, no interpreter-only upcast). Built on first use, not at import."""
    cases, seen = [], set()
    for sm_count in SM_COUNTS:
        for label, dtype, call in launches():
            with record_launches(msc, **_gpu(sm_count, call["tf32"])) as log:
                log.label = f"{label} {sm_count} SMs"
                branches = call.get("branches", MODEL["branches"])
                weights = [torch.empty((c_out, call["c_in"], k), dtype=dtype, device="meta") for c_out, k in branches]
                biases = [torch.empty((c_out,), dtype=dtype, device="meta") for c_out, _ in branches]
                x = torch.empty((call["batch"], call["c_in"], call["steps"]), dtype=dtype, device="meta")
                out = msc._forward(x, weights, biases, call["activation"])
                msc._backward_launches(torch.empty_like(out), x, weights, biases, call["activation"],
                                       call["need_input"], True, True)
            for case in log.cases:
                if case_key(case) not in seen:
                    seen.add(case_key(case))
                    cases.append(case)
    return cases
