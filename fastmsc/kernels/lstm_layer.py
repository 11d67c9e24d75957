"""Fused LSTM layer: the compiled extension's ``fastmsc::lstm_fwd`` / ``fastmsc::lstm_bwd`` ops with autograd.

Same call as :func:`fastmsc.ops.reference.lstm_layer.lstm_layer_reference`: x (B, T, I), weights one or two
direction tuples ``(w_ih (4H, I), w_hh (4H, R), b_ih (4H,) | None, b_hh (4H,) | None[, w_hr (P, H)])``,
h0 (D, B, R) and c0 (D, B, H) or None, lengths (B,) int64 on x's device or None; returns out (B, T, D*R),
h_n (D, B, R), c_n (D, B, H), where R is P with the projection w_hr and H without.

The extension works in float32 (float64 for float64 inputs). float16/bfloat16 inputs go through
``fastmsc::lstm_fwd_half``: it widens them, runs the extension and returns out, h_n, c_n and the state the
backward reads (activated gates, cell states) in the input dtype, as stock PyTorch's half-precision LSTMs
keep theirs. A half training step thus keeps half tensors (its input, the output it returns, which the
next layer keeps anyway, gates and cells) instead of float32 copies of them, besides the (D*4H,) float32 bias
that only double backward reads; the backward widens them again,
so its gradients carry the rounding of that state (a few units of the half type's roundoff, checked in
tests/test_lstm_layer_fused.py). The autograd formula and the fake (shape-only) implementations are
registered with torch.library, so torch.compile(fullgraph=True) traces the layer as opaque ops. Double
backward (create_graph=True) differentiates the reference layer recomputed on the saved inputs, since
lstm_bwd's gradients carry no graph.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .. import _extension
from .._device import dtype_name
from ..ops._checks import compute_dtype
from . import lstm_cpu_measured, lstm_persistent
from ._common import triton_call_unsupported
from ._lstm_shared import (
    HALF_DTYPES,
    backward,
    call_forward,
    combined_bias,
    eager_function,
    fake_forward,
    new_sequence,
    setup_context,
    to_dtype,
)

_registered = False
_register_lock = threading.Lock()
_warned = False


def _fake_backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                   need_dx, need_dweights, need_dstate, w_hr=None, *, grad_dtype=None):
    """lstm_bwd: the gradients asked for in x's dtype (or ``grad_dtype``); the others empty, each its own tensor in x's
    dtype."""
    B, T, n_in = x.shape
    D, G, R = w_hh.shape
    H = G // 4
    dtype = grad_dtype or x.dtype

    def new(wanted, *shape):
        return x.new_empty(shape, dtype=dtype) if wanted else x.new_empty(0)

    return (
        new_sequence(x, B, T, n_in, dtype) if need_dx else x.new_empty(0),
        new(need_dweights, D * G, n_in),
        new(need_dweights, D, G, R),
        new(need_dweights and has_bias, D * G),
        new(need_dstate, D, B, R),
        new(need_dstate, D, B, H),
        new(need_dweights and w_hr is not None, D, R, H),
    )


def _fake_backward_bf16(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                        need_dx, need_dweights, need_dstate):
    """lstm_bwd_bf16: lstm_bwd's gradients in float32 from bfloat16 inputs."""
    return _fake_backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                          need_dx, need_dweights, need_dstate, grad_dtype=torch.float32)


def _bf16_backward(x, w_hr):
    """``fastmsc::lstm_bwd_bf16`` where lstm_fwd_half ran ``fastmsc::lstm_fwd_bf16`` (bf16 on a CPU with AVX512_BF16,
    no projection): it reads the saved bf16 state as it is, where lstm_bwd would need it widened to float32 first, and
    multiplies bf16 factors for dx and the weight gradients. Else None."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and w_hr is None and torch.ops.fastmsc.lstm_cpu_bf16():
        return torch.ops.fastmsc.lstm_bwd_bf16
    return None


def _backward(ctx, *grads):
    return backward(ctx, *grads, run_bwd=torch.ops.fastmsc.lstm_bwd, widen_saved=True, native_bwd=_bf16_backward)


def _half_forward(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor | None,
                   h0: torch.Tensor | None, c0: torch.Tensor | None, lengths: torch.Tensor | None, training: bool,
                   w_hr: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastmsc::lstm_fwd for float16/bfloat16 x, w_ih (D*4H, I), w_hh (D, 4H, R), h0 (D, B, R), c0 (D, B, H),
    w_hr (D, P, H) or None and a float32 bias (D*4H,) (b_ih + b_hh summed unrounded): the layer runs in float32
    and out (B, T, D*R), h_n (D, B, R), c_n (D, B, H), gates (B, T, D*4H) and cells (B, T, D*H) come back in
    x's dtype. On CPUs with AVX512_BF16 a bfloat16 layer without projection runs ``fastmsc::lstm_fwd_bf16`` instead:
    products in bf16 with float32 sums (as oneDNN's bf16 LSTM), the cell state and math in float32, h rounded to
    bf16 each step (its output, and the next step's product input)."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and w_hr is None
            and torch.ops.fastmsc.lstm_cpu_bf16()):
        return torch.ops.fastmsc.lstm_fwd_bf16(x, w_ih, w_hh, bias, h0, c0, lengths, training)
    outputs = torch.ops.fastmsc.lstm_fwd(x.float(), w_ih.float(), w_hh.float(), bias, to_dtype(h0, torch.float32),
                                         to_dtype(c0, torch.float32), lengths, training, to_dtype(w_hr, torch.float32))
    return tuple(t.to(x.dtype) for t in outputs)


_lstm_fwd_half = torch.library.custom_op("fastmsc::lstm_fwd_half", mutates_args=())(_half_forward)
_lstm_fwd_half.register_fake(fake_forward)
_lstm_fwd_half.register_autograd(_backward, setup_context=setup_context)
# Eager calls run the op's body directly: a Python custom op's own dispatch costs about 10 us a call.
_eager_half = eager_function("lstm_fwd_half", _half_forward, _backward)
_eager_float = None  # eager_function of fastmsc::lstm_fwd, once the extension has registered it


@torch.compiler.assume_constant_result  # runs once, eagerly, even when torch.compile meets it first
def _ensure_registered() -> None:
    """Load the extension and attach the fake implementations and the autograd formula (once)."""
    global _registered, _eager_float
    if _registered:
        return
    _extension.load()
    with _register_lock:
        if not _registered:
            torch.library.register_fake("fastmsc::lstm_fwd")(fake_forward)
            torch.library.register_fake("fastmsc::lstm_bwd")(_fake_backward)
            torch.library.register_fake("fastmsc::lstm_bwd_bf16")(_fake_backward_bf16)
            # Eager calls run lstm_fwd_half's body, which calls it (under FakeTensorMode too).
            torch.library.register_fake("fastmsc::lstm_fwd_bf16")(fake_forward)
            # FakeTensorMode and make_fx meet it in eager code (_stack_in_extension_memory).
            torch.library.register_fake("fastmsc::lstm_cpu_stack")(lambda parts: torch.stack(parts))
            torch.library.register_autograd("fastmsc::lstm_fwd", _backward, setup_context=setup_context)
            _eager_float = eager_function("lstm_fwd", torch.ops.fastmsc.lstm_fwd, _backward)
            _registered = True


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fastmsc.lstm_layer runs on the torch backend: {reason}", RuntimeWarning, stacklevel=5)


def prepare(*, fallback: bool, lstm_impl: str = "auto", **call_args) -> str | None:
    """Load the extension for a call about to run (the first one may build it, about a minute per source file);
    None when loaded, else why not. ``fallback``: the caller then runs stock PyTorch instead (backend 'auto'),
    which is warned once with the reason. A call the persistent Triton kernel will run needs no extension: nothing
    is loaded or built for it."""
    x = call_args.get("x")
    if x is not None and _uses_persistent(x, call_args.get("weights"), lstm_impl):
        return None
    reason = _extension.unavailable_reason()
    if reason is not None and fallback:
        _warn_once(reason)
    return reason


def expected_slower(device_type: str, **call_args) -> str | None:
    """On CPU, why the extension is expected to be slower than torch.nn.LSTM for this call on this CPU class, from
    the measured record (:mod:`fastmsc.kernels.lstm_cpu_measured`; auto then runs the torch path, backend 'fused'
    still runs the extension), else None. Asked about the device in general (no call), None: the rule is per shape.
    CUDA layers are judged by the dispatch table and the persistent kernel's design (fused_unsupported)."""
    x, weights = call_args.get("x"), call_args.get("weights")
    if device_type != "cpu" or x is None or weights is None or _projected(weights):
        return None
    B, T, _ = x.shape
    mode = "train" if _training(x, call_args.get("h0"), call_args.get("c0"), weights) else "infer"
    return _measured_slower(_CPU_CAPABILITY, dtype_name(x.dtype), mode, int(B), int(T),
                            int(weights[0][1].shape[0]) // 4, len(weights))


@torch.compiler.assume_constant_result
def _measured_slower(cpu_class: str, dtype: str, mode: str, B: int, T: int, H: int, D: int) -> str | None:
    # torch.compile traces neither torch.get_num_threads() nor the rule's cache: it takes the answer at tracing time
    # as a constant, as the choice of implementation is fixed in a traced graph anyway.
    return lstm_cpu_measured.rule().slower(cpu_class, dtype, mode, torch.get_num_threads(), B, T, H, D)


def cpu_dispatch_note() -> str | None:
    """What the measured CPU rule holds for this CPU class (fastmsc info), or None where nothing was measured."""
    return lstm_cpu_measured.rule().summary(_CPU_CAPABILITY)


# Read once: a property of the machine, and torch.compile cannot trace the call (it returns a str).
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()


def fused_unsupported(device_type: str, *, allow_interpreter: bool = False, lstm_impl: str = "auto",
                      **call_args) -> str | None:
    """None when the fused LSTM can run this call on ``device_type``, else why not. A question only: it never
    builds, loads or warns (see :func:`prepare`).

    ``lstm_impl`` (the policy, :data:`fastmsc.backend.LSTM_IMPLS`): "persistent" needs the Triton kernel to support
    the call (on CPU tensors only through the interpreter, when ``allow_interpreter``); "stepwise" needs the
    compiled extension (loaded, or loadable on first use); "auto" is satisfied by either, the persistent kernel
    counting on CUDA only, for the layers :func:`_auto_persistent` gives it.
    """
    if lstm_impl == "persistent" or (lstm_impl == "auto" and device_type == "cuda"):
        persistent = _persistent_unsupported(device_type, allow_interpreter, call_args)
        if lstm_impl == "persistent":
            return persistent
        x, weights = call_args.get("x"), call_args.get("weights")
        if persistent is None and device_type == "cuda" and (x is None or weights is None
                                                             or _auto_persistent(x, weights)):
            return None
    return _stepwise_unsupported(device_type)


def _stepwise_unsupported(device_type: str) -> str | None:
    reason = _extension.availability()
    if reason is not None:
        return reason
    if device_type == "cuda":
        if not _extension.cuda_kernels_expected():
            return ("the LSTM extension was built without CUDA kernels (torch without CUDA or no nvcc at build "
                    "time); rebuild it with nvcc available")
    elif device_type != "cpu":
        return f"the LSTM extension has kernels for cpu and cuda only, not {device_type!r}"
    return None


def _persistent_unsupported(device_type: str, allow_interpreter: bool, call_args: dict) -> str | None:
    x, weights = call_args.get("x"), call_args.get("weights")
    reason = triton_call_unsupported(device_type, x, kernels="the persistent LSTM kernels",
                                     allow_interpreter=allow_interpreter)
    if reason is not None or x is None or weights is None:
        return reason
    return lstm_persistent.unsupported(x, weights[0][1], _projected(weights), len(weights))


def _uses_persistent(x, weights, lstm_impl: str) -> bool:
    """Whether the persistent kernel runs this call: always under 'persistent' (fused_unsupported refused the calls
    it cannot take), under 'auto' on CUDA where it takes the layer and :func:`_auto_persistent` picks it."""
    if lstm_impl == "persistent":
        return True
    return (lstm_impl == "auto" and weights is not None and x.device.type == "cuda"
            and _persistent_unsupported("cuda", False, {"x": x, "weights": weights}) is None
            and _auto_persistent(x, weights))


def _auto_persistent(x, weights) -> bool:
    """Under 'auto', for a layer the persistent kernel takes on CUDA: where its design expects it to be faster
    (lstm_persistent.design_prefers), or where the stepwise extension cannot run at all."""
    return (lstm_persistent.design_prefers(x, weights[0][1], len(weights))
            or _stepwise_unsupported("cuda") is not None)


def _projected(weights) -> bool:
    return len(weights[0]) > 4 and weights[0][4] is not None


def fused(x, weights, h0=None, c0=None, lengths=None, lstm_impl: str = "auto"):
    """The layer on the implementation ``lstm_impl`` picks (see :func:`fused_unsupported`): the persistent Triton
    kernel or the compiled extension's stepwise one."""
    if _uses_persistent(x, weights, lstm_impl):
        return _fused_persistent(x, weights, h0, c0, lengths)
    _ensure_registered()
    work = compute_dtype(x.dtype)
    half = x.dtype in HALF_DTYPES
    # Half weights stay half (float32 copies of them would be what backward keeps); the op widens them.
    weight_dtype = x.dtype if half else work
    w_ih, w_hh = _stacked_weights(weights, weight_dtype, extension_memory=True)
    projected = _projected(weights)
    w_hr = torch.stack([p[4].to(weight_dtype) for p in weights]) if projected else None
    bias = combined_bias(weights, work)
    training = _training(x, h0, c0, weights)
    forward, function = (torch.ops.fastmsc.lstm_fwd_half, _eager_half) if half else \
        (torch.ops.fastmsc.lstm_fwd, _eager_float)
    # The call without projection keeps its original arguments (and traced graphs their original form).
    inputs = (x, w_ih, w_hh, bias, h0, c0, lengths, training, *((w_hr,) if projected else ()))
    out, h_n, c_n, _, _ = call_forward(forward, function, inputs, training)
    return out, h_n, c_n


def _stacked_weights(weights, dtype, extension_memory: bool = False):
    """(w_ih (D*4H, I), w_hh (D, 4H, R)) in ``dtype``; one direction's as views of its weights, not copies.
    ``extension_memory``: the caller has loaded the extension, whose memory may then hold large stacks."""
    if len(weights) == 1:
        return to_dtype(weights[0][0], dtype), to_dtype(weights[0][1], dtype).unsqueeze(0)
    w_ih = _stack([to_dtype(p[0], dtype) for p in weights], extension_memory)
    return w_ih.flatten(0, 1), _stack([to_dtype(p[1], dtype) for p in weights], extension_memory)


# Stacks of at least this many bytes take the extension's memory in eager CPU calls (_StackInExtensionMemory).
EXTENSION_STACK_BYTES = 2 << 20


def _stack(parts, extension_memory: bool) -> torch.Tensor:
    """torch.stack(parts); in the extension's memory where allowed and large enough, in eager CPU calls."""
    first = parts[0]
    if (not extension_memory or first.device.type != "cpu"
            or len(parts) * first.numel() * first.element_size() < EXTENSION_STACK_BYTES
            or torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None):
        return torch.stack(parts)
    return _stack_in_extension_memory(parts)


def _stack_in_extension_memory(parts) -> torch.Tensor:
    """torch.stack(parts) in the extension's memory; through autograd only where a gradient is wanted (the Function's
    Python costs a few microseconds, the whole of a small layer's inference)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return _StackInExtensionMemory.apply(*parts)
    return torch.ops.fastmsc.lstm_cpu_stack(parts)


class _StackInExtensionMemory(torch.autograd.Function):
    """torch.stack(parts) (D tensors of one shape and dtype on the CPU) in the memory the extension keeps for its large
    tensors (fastmsc::lstm_cpu_stack). torch's allocator takes 2 MB blocks from glibc's heap, which returns them to the
    system when they are freed and faults them in again on the next call: bidirectional float32 layers at H = 256 spent
    2.2-2.4 ms a call (B = 1, T = 1) instead of 0.3 ms stacking their weights. Eager calls only: torch.compile and
    functorch transforms trace torch.stack."""

    @staticmethod
    def forward(ctx, *parts):
        return torch.ops.fastmsc.lstm_cpu_stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


def _training(x, h0, c0, weights) -> bool:
    tensors = [x, h0, c0, *(t for params in weights for t in params)]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_persistent(x, weights, h0, c0, lengths):
    w_ih, w_hh = _stacked_weights(weights, x.dtype)
    out, h_n, c_n, _, _ = lstm_persistent.forward(x, w_ih, w_hh, combined_bias(weights, torch.float32), h0, c0,
                                                  lengths, _training(x, h0, c0, weights))
    return out, h_n, c_n
