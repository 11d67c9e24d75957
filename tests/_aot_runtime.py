"""What Triton's runtime asks its compiler for, captured without a GPU, to check fastmsc.tools.aot against.

Run as ``python tests/_aot_runtime.py`` without TRITON_INTERPRET (the interpreter has no binder): it makes a
stand-in driver for an sm_90 GPU the active one and replaces ``_do_compile`` of each JITFunction it watches, so
``kernel[grid](*args, **kwargs)`` goes through ``JITFunction.run`` (binder, ``_pack_args``) and stops where the
runtime would compile. It prints one JSON object: {"sample": [...], "model": [...]}, each item
{"kernel", "signature", "constexprs", "attrs", "num_warps", "num_stages"} (names for argument paths, attributes
only where not empty), and for "sample" also "specialize", what fastmsc.tools.aot.specialize made of the
same launch.

* "sample": tests/_aot_sample.py's _scale_kernel launched with aligned and misaligned tensors and ints that
  are 1, a multiple of 16 and neither;
* "model": the launches of the default model's calls (fastmsc.models.MSCClassifier defaults: 3 input channels,
  3 x 64 conv channels with kernel sizes 3/5/7 and bias, no activation; one attention head of 256 features;
  pooling over those 256; batches of 32 at T = 150 with lengths and T = 512 without; fp32, fp16, bf16), made by
  the ops' own launch functions on meta tensors (conv sized for an H100's 132 SMs).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
MODEL_BATCH, MODEL_STEPS, MODEL_C_IN, MODEL_FEATURES = 32, (150, 512), 3, 256
MODEL_BRANCHES = ((64, 3), (64, 5), (64, 7))
H100_SMS = 132


class _StandInDriver:
    """Enough of a CUDA driver for JITFunction.run to reach its compile step."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _watch(jit_fn, captured: list) -> None:
    names = list(jit_fn.arg_names)

    def do_compile(key, signature, device, constexprs, options, attrs, warmup):
        captured.append({"kernel": jit_fn.__name__, "signature": dict(signature),
                         "constexprs": {names[p[0]]: v for p, v in constexprs.items()},
                         "attrs": {names[p[0]]: v for p, v in attrs.items() if v},
                         "num_warps": options.num_warps, "num_stages": options.num_stages})
        return None  # the runtime then returns without launching

    jit_fn._do_compile = do_compile


def sample_launches() -> list[dict]:
    from fastmsc.tools import aot as _aot

    sample = _aot.load_module(str(TESTS / "_aot_sample.py"))
    captured: list = []
    _watch(sample._scale_kernel, captured)
    buffer = torch.empty(4096)
    variants = [
        (buffer, torch.empty(4096, dtype=torch.float16), 4096, 0.5),  # aligned pointers, n divisible by 16
        (buffer[1:], buffer[:100], 100, 2.0),  # a view 4 bytes in: misaligned; 100 is not a multiple of 16
        (buffer, buffer, 1, 1.0),  # n == 1 becomes a constant
        (buffer[4:], buffer, 17, 0.0),  # 16 bytes in: still aligned
    ]
    results = []
    for args in variants:
        before = len(captured)
        sample._scale_kernel[(1,)](*args, BLOCK=1024, num_warps=4)
        assert len(captured) == before + 1, "the runtime did not reach its compile step"
        spec = _aot.specialize(sample._scale_kernel, args, {"BLOCK": 1024, "num_warps": 4})
        results.append({**captured[-1], "specialize": spec})
    return results


def model_launches() -> list[dict]:
    from fastmsc.kernels import attention, max_avg_pool, multiscale_conv1d
    from fastmsc.tools import aot as _aot

    captured: list = []
    for module in (attention, multiscale_conv1d, max_avg_pool):
        for name in _aot.entry_kernels(module):
            _watch(getattr(module, name), captured)
    # The conv heuristics size time tiles and dW splits by the SM count, which meta tensors cannot report.
    multiscale_conv1d._parallel_programs = lambda device: multiscale_conv1d._PROGRAMS_PER_SM * H100_SMS

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for steps in MODEL_STEPS:
            lengths = empty(MODEL_BATCH, dtype=torch.int64) if steps == MODEL_STEPS[0] else None
            # conv: x (B, C_in, T) -> (B, 192, T); the input needs no gradient
            weights = [empty(c_out, MODEL_C_IN, k, dtype=dtype) for c_out, k in MODEL_BRANCHES]
            biases = [empty(c_out, dtype=dtype) for c_out, _ in MODEL_BRANCHES]
            x = empty(MODEL_BATCH, MODEL_C_IN, steps, dtype=dtype)
            y = multiscale_conv1d._forward(x, weights, biases, "none")
            multiscale_conv1d._backward_launches(torch.empty_like(y), x, weights, biases, "none", False, True, True)
            # attention: one head, q/k/v (B, T, 256) from the projections
            q, k, v = (empty(MODEL_BATCH, steps, MODEL_FEATURES, dtype=dtype) for _ in range(3))
            scale = 1.0 / math.sqrt(MODEL_FEATURES)
            out, lse = attention._forward(q, k, v, lengths, scale)
            attention._backward(torch.empty_like(out), q, k, v, out, lse, lengths, scale)
            # pooling over the attention output (B, T, 256)
            pooled, index = max_avg_pool._forward(out, lengths)
            max_avg_pool._backward(torch.empty_like(pooled), index, lengths, steps)
    return captured


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1: the interpreter has no runtime binder", file=sys.stderr)
        return 2
    from triton.runtime.driver import driver

    driver.set_active(_StandInDriver())
    print(json.dumps({"sample": sample_launches(), "model": model_launches()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
