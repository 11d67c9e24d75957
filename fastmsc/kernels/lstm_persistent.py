"""Persistent LSTM layer (Triton): one launch per layer covers both directions, forward and backward.

The ``fastmsc::lstm_persistent_fwd`` / ``lstm_persistent_bwd`` custom ops take the arguments of the extension's
``lstm_fwd`` / ``lstm_bwd`` (see :mod:`fastmsc.kernels._lstm_shared`) and share their autograd formula. Forward:
xproj = x W_ihᵀ (one large GEMM in x's dtype), then the recurrence kernel (Triton bodies in
:mod:`fastmsc.kernels._lstm_layer_triton`). Backward: the recurrence in reverse writes dz, the gradient of the gate
pre-activations (B, T, D*4H, fp32), and three deferred GEMMs give dx = dz W_ih, dW_ih = dzᵀ x, dW_hh = dzᵀ h_prev.

Saved for the backward, as in the stepwise path: x, out, activated gates (B, T, D*4H) and cells (B, T, D*H) in
x's dtype; nothing else. Half inputs keep half gates and cells (the stepwise path widens them to float32 copies
before its backward; this one reads them as they are, saving 2 x (B, T, D*5H) x 4 bytes of transient copies).

Two kernel pairs (:mod:`fastmsc.kernels._lstm_layer_triton`): the resident pair keeps W_hh in shared memory for the
whole sequence and h, c (dh, dc) in registers, wherever W_hh fits the GPU's per-block shared memory
(``resident``: bf16/fp16 up to H = 128 and fp32 up to 64 on A100/H100/H200, 139-141 KB at H = 128 bf16); the
streaming pair reads W_hh from L2 every step, with the state in memory, for everything else up to MAX_HIDDEN.

Design estimate on an H100/H200 (no GPU has run it yet), per step and program (16 rows of one direction), H = 128:
* resident, bf16: W_hh (128 KB) from shared memory at ~128 B/clock: ~1,000 clocks, ~0.55 µs, the four products
  (8·16·H·H = 2.1 MFLOP) on tensor cores (wgmma on sm_90, A from shared memory) within that; the step's xproj rows
  (16 KB, L2/HBM, ~0.5-1 µs latency) load while the products run; no barrier. ~0.7-1 µs forward, ~1-1.5 µs backward
  (the saved gates and cells load, dz is stored, W_hhᵀ multiplies from shared memory).
* streaming (fp32 at H = 128, or GPUs with 99 KB of shared memory): W_hh, 4·H·H values (128 KB bf16, 256 KB fp32)
  from L2 at ~90 GB/s per SM: ~1.4 µs (bf16), h_{t-1} and c through L1, plus one barrier: ~1.5 µs per step forward,
  ~3 µs backward (two phases, W_hh read once more); fp32 twice the W_hh bytes. At H = 64 a quarter of that.
cuDNN's standard algorithm, which PyTorch uses for bidirectional layers, launches a GEMM and a gate kernel per step:
~8-12 µs per step at B = 32 (launch-latency bound). Expected: ~8-10x per step resident and ~5x streaming at H = 128,
more at H = 64, for B <= 64, hence ≥ 3x fwd+bwd once the deferred GEMMs (which cuDNN also runs) are counted.
B = 32 fills 4 of 132 SMs: the kernel is
latency-bound by design, not throughput-bound; at H = 512 its W_hh reads (2 MB per step) make it ~16x slower per step
than at 128, where the stepwise path's large GEMMs may win. ``auto`` follows this estimate (``design_prefers``) until
the dispatch table has measured the layer's kind (the bench's persistent and stepwise rows).

Limits (else ``fused_unsupported`` says why and the stepwise path or torch runs): no projection (proj_size),
H <= MAX_HIDDEN, float32/float16/bfloat16. float32 products are 3xTF32 (or TF32 where torch allows it).
"""

from __future__ import annotations

import torch

from ..ops._checks import compute_dtype
from ._common import INTERPRETED, TRITON_DTYPES, matmul_precision, new_output
from ._lstm_shared import backward, fake_forward_batch_first, setup_context

try:
    import triton

    from ._lstm_layer_triton import (
        lstm_persistent_bwd_kernel,
        lstm_persistent_fwd_kernel,
        lstm_resident_bwd_kernel,
        lstm_resident_fwd_kernel,
    )
except ImportError:  # no triton: the op is not registered, and unsupported() says why
    triton = None

# Registers hold chunks whatever H is; beyond this the per-step W_hh reads (4·H·H values, 2 MB in bf16 at 512) make
# the stepwise path's large GEMMs the better choice.
MAX_HIDDEN = 512
BLOCK_B = 16  # the smallest tl.dot M: small batches (the case this kernel is for) waste the least


def unsupported(x: torch.Tensor, w_hh: torch.Tensor, projected: bool, directions: int = 2) -> str | None:
    """Why the persistent kernel cannot run this layer, or None (the platform is the caller's question)."""
    if triton is None:
        return "triton is not importable: the persistent LSTM kernel is a Triton kernel"
    if projected:
        return "the persistent LSTM kernel has no projection (proj_size); the stepwise path runs projected layers"
    H = w_hh.shape[-1]
    if H > MAX_HIDDEN:
        return f"the persistent LSTM kernel takes hidden sizes up to {MAX_HIDDEN}, got {H}"
    if x.dtype not in TRITON_DTYPES:
        return f"the persistent LSTM kernel takes float32, float16 or bfloat16, got {x.dtype}"
    gate_values = x.shape[0] * x.shape[1] * directions * 4 * H
    if gate_values >= 2**31:  # the kernels index with 32-bit offsets
        return (f"the persistent LSTM kernel indexes its (B, T, D*4H) gate tensors with 32-bit offsets: "
                f"B*T*D*4H = {gate_values} >= 2^31")
    return None


# Where the design expects the persistent kernel to win (``design_prefers``): each program reads W_hh (4·H·H values)
# from L2 every step at ~90 GB/s per SM, so 512 KB is ~5.7 µs per forward step, about the ~8-12 µs of the stepwise
# path's per-step launches: bfloat16/float16 up to H = 256, float32 up to H = 181. Beyond that, or with more programs
# than the GPU has SMs (a second wave would wait for the first's whole sequence), stepwise runs unless the dispatch
# table measured otherwise.
PREFERRED_W_HH_BYTES = 512 * 1024


def design_prefers(x: torch.Tensor, w_hh: torch.Tensor, directions: int) -> bool:
    """Whether the design estimate expects this layer (x (B, T, I) on a GPU, w_hh (4H, H)) to run faster here than
    on the stepwise path: W_hh per step within PREFERRED_W_HH_BYTES and all programs in one wave."""
    H = w_hh.shape[-1]
    programs = directions * -(-x.shape[0] // BLOCK_B)
    return 4 * H * H * w_hh.element_size() <= PREFERRED_W_HH_BYTES and programs <= _sm_count(x.device)


_SM_COUNTS: dict[int, int] = {}


@torch.compiler.assume_constant_result  # a device property: torch.compile takes it as a constant, no graph break
def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_INTERPRETED = INTERPRETED  # a global so that the AOT check can compile the GPU specialisation under the interpreter


def _config(H: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Chunk widths and warps, chosen with the AOT check (no spills on sm_80 and sm_90 for every tile width):
    BLOCK_J output columns per gate tile, 16-wide reduction chunks (32-wide ones spill in the bf16 backward at
    H = 128)."""
    block_h = max(16, triton.next_power_of_2(H))
    return dict(BLOCK_B=BLOCK_B, BLOCK_J=min(block_h, 64), BLOCK_K=16,
                # The interpreter has no bfloat16 arithmetic: its dots run on float32 copies of the operands.
                DOT_FP32=_INTERPRETED and dtype == torch.bfloat16, INPUT_PRECISION=_input_precision(dtype),
                # One stage: the step loop is a serial chain, and pipelining its W_hh reads would only multiply
                # their shared-memory buffers.
                num_warps=8 if backward else 4, num_stages=1,
                # The whole register file per thread: given the block size alone, ptxas aims at several blocks per SM
                # and spills a few values (8-32 bytes) to stay under ~96-128 registers, while these launches have one
                # block per SM to fill at most (B/16 x 2 programs).
                maxnreg=255)


# W_hh in shared memory (the resident kernels) up to this hidden size: BLOCK_H x BLOCK_H gate blocks in registers
# between the load and the hoisted staging; 256 would hold 512 KB of bf16, beyond every GPU's shared memory.
MAX_RESIDENT_HIDDEN = 128
# The shared memory assumed off a GPU (the interpreter's CPU tensors, the AOT check's meta tensors): an H100/H200's
# per-block opt-in limit, so that those runs take the path such a GPU takes.
INTERPRETER_SHARED_BYTES = 232448


def resident_shared_bytes(H: int, dtype: torch.dtype) -> int:
    """Shared memory the resident kernels need at hidden size H: the four W_hh gate blocks in the weights' dtype
    (float32 twice, as 3xTF32 stages a high and a low part), plus a margin for the state operand and layout
    conversions (the AOT check holds every resident compilation within this bound)."""
    block_h = max(16, triton.next_power_of_2(H))
    copies = 2 if dtype == torch.float32 else 1
    return 4 * block_h * block_h * torch.empty((), dtype=dtype).element_size() * copies + 16 * 1024


def resident(H: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a layer of hidden size H runs the resident kernels on ``device``: W_hh fits its shared memory."""
    if H > MAX_RESIDENT_HIDDEN:
        return False
    limit = _shared_limit(device) if device.type == "cuda" else INTERPRETER_SHARED_BYTES
    return resident_shared_bytes(H, dtype) <= limit


_SHARED_LIMITS: dict[int, int] = {}


@torch.compiler.assume_constant_result  # a device property: torch.compile takes it as a constant, no graph break
def _shared_limit(device: torch.device) -> int:
    """The per-block shared memory limit (after opting in) that Triton checks at launch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_LIMITS:
        _SHARED_LIMITS[index] = int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    return _SHARED_LIMITS[index]


def _resident_config(H: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Launch settings of the resident kernels (no spills on sm_80 and sm_90, checked by the AOT check): 8 warps
    for the backward and for 128-wide forward tiles (4 warps spill 16 bytes in the sm_90 training forward)."""
    block_h = max(16, triton.next_power_of_2(H))
    return dict(BLOCK_B=BLOCK_B, BLOCK_H=block_h,
                DOT_FP32=_INTERPRETED and dtype == torch.bfloat16, INPUT_PRECISION=_input_precision(dtype),
                num_warps=8 if backward or block_h >= 128 else 4, num_stages=1, maxnreg=255)


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 where torch's float32 matmuls may use it, else 3xTF32 (see _common.tensor_core_precision): an IEEE
    fp32 tl.dot holds its operands in registers, which spills at these tile sizes and makes LLVM fail on some."""
    return matmul_precision(dtype)


@torch.library.custom_op("fastmsc::lstm_persistent_fwd", mutates_args=())
def _lstm_persistent_fwd(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor | None,
                         h0: torch.Tensor | None, c0: torch.Tensor | None, lengths: torch.Tensor | None,
                         training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, I), w_ih (D*4H, I), w_hh (D, 4H, H) in x's dtype, bias (D*4H,) float32 or None, h0 and c0
    (D, B, H) both given or both None, lengths (B,) int64 or None -> out (B, T, D*H), h_n, c_n (D, B, H),
    gates (B, T, D*4H) and cells (B, T, D*H) when ``training`` (else empty), all in x's dtype."""
    return launch_forward(x, w_ih, w_hh, bias, h0, c0, lengths, training)


def launch_forward(x, w_ih, w_hh, bias, h0, c0, lengths, training):
    """The forward op's work (also run on meta tensors by the AOT check to record its launches)."""
    B, T, n_in = x.shape
    D, G, H = w_hh.shape
    xproj = torch.mm(x.reshape(B * T, n_in), w_ih.t()).view(B, T, D * G)
    out = new_output((B, T, D * H), dtype=x.dtype, device=x.device)
    h_n = new_output((D, B, H), dtype=x.dtype, device=x.device)
    # The cell state the kernel carries in memory, in fp32: c0 (or zeros) going in, c_n coming out
    c_state = _state_buffer(c0, (D, B, H), x.device)
    gates = new_output((B, T, D * G) if training else (0,), dtype=x.dtype, device=x.device)
    cells = new_output((B, T, D * H) if training else (0,), dtype=x.dtype, device=x.device)
    if B > 0:
        dummy = out  # never read: the constexpr flags disable every load of an absent tensor
        kernel, config = ((lstm_resident_fwd_kernel, _resident_config(H, x.dtype)) if resident(H, x.dtype, x.device)
                          else (lstm_persistent_fwd_kernel, _config(H, x.dtype)))
        kernel[(triton.cdiv(B, BLOCK_B), D)](
            xproj, dummy if bias is None else bias.contiguous(), w_hh.contiguous(),
            dummy if h0 is None else h0.contiguous(), c_state, dummy if lengths is None else lengths.contiguous(),
            out, h_n, gates if training else dummy,
            cells if training else dummy, B, T, H,
            D=D, HAS_BIAS=bias is not None, HAS_H0=h0 is not None, HAS_LENGTHS=lengths is not None, SAVE=training,
            **config,
        )
    return out, h_n, c_state.to(x.dtype), gates, cells


@_lstm_persistent_fwd.register_fake
def _(x, w_ih, w_hh, bias, h0, c0, lengths, training):
    return fake_forward_batch_first(x, w_ih, w_hh, bias, h0, c0, lengths, training)


@torch.library.custom_op("fastmsc::lstm_persistent_bwd", mutates_args=())
def _lstm_persistent_bwd(grad_out: torch.Tensor | None, grad_h_n: torch.Tensor | None,
                         grad_c_n: torch.Tensor | None, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                         has_bias: bool, h0: torch.Tensor | None, c0: torch.Tensor | None,
                         lengths: torch.Tensor | None, out: torch.Tensor, gates: torch.Tensor, cells: torch.Tensor,
                         need_dx: bool, need_dweights: bool, need_dstate: bool, w_hr: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor]:
    """lstm_bwd's contract (x zeroed past the lengths by the caller): (dx (B, T, I), dw_ih (D*4H, I), dw_hh
    (D, 4H, H), dbias (D*4H,), dh0, dc0 (D, B, H), an empty dw_hr), each empty where not asked for; float32."""
    return launch_backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                           need_dx, need_dweights, need_dstate)


def launch_backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells,
                    need_dx, need_dweights, need_dstate):
    """The backward op's work (also run on meta tensors by the AOT check to record its launches)."""
    B, T, n_in = x.shape
    D, G, H = w_hh.shape
    work = compute_dtype(x.dtype)

    def empty():  # one per output: outputs of a custom op may not alias one another
        return x.new_empty(0, dtype=work)

    dz = new_output((B, T, D * G), dtype=torch.float32, device=x.device)
    # The state gradients the kernel carries in memory: the incoming ones (or zeros), then dh0 and dc0
    dh0, dc0 = _state_buffer(grad_h_n, (D, B, H), x.device), _state_buffer(grad_c_n, (D, B, H), x.device)
    if B > 0:
        dummy = dz
        kernel, config = ((lstm_resident_bwd_kernel, _resident_config(H, x.dtype, backward=True))
                          if resident(H, x.dtype, x.device) else
                          (lstm_persistent_bwd_kernel, _config(H, x.dtype, backward=True)))
        kernel[(triton.cdiv(B, BLOCK_B), D)](
            dummy if grad_out is None else grad_out.contiguous(), w_hh.contiguous(),
            dummy if c0 is None else c0.contiguous(), dummy if lengths is None else lengths.contiguous(), gates,
            cells, dz, dh0,
            dc0, B, T, H,
            D=D, HAS_GRAD_OUT=grad_out is not None, HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None,
            **config,
        )
    flat_dz = dz.view(B * T, D * G)
    dx = torch.mm(flat_dz, w_ih.to(work)).view(B, T, n_in) if need_dx else empty()
    dh0, dc0 = (dh0, dc0) if need_dstate else (empty(), empty())
    if not need_dweights:
        return dx, empty(), empty(), empty(), dh0, dc0, empty()
    dw_ih = torch.mm(flat_dz.t(), x.reshape(B * T, n_in).to(work))
    h_prev = _previous_states(out, h0, lengths, D, H).to(work)  # (B, T, D, H)
    dw_hh = torch.einsum("btdg,btdh->dgh", dz.view(B, T, D, G), h_prev)
    dbias = flat_dz.sum(0) if has_bias else empty()
    return dx, dw_ih, dw_hh, dbias, dh0, dc0, empty()


def _state_buffer(values: torch.Tensor | None, shape, device) -> torch.Tensor:
    """A new contiguous fp32 (D, B, H) buffer holding ``values`` (zeros for None): the kernels index it as
    contiguous whatever layout ``values`` has."""
    buffer = torch.zeros(shape, dtype=torch.float32, device=device)
    return buffer if values is None else buffer.copy_(values)


def _previous_states(out: torch.Tensor, h0: torch.Tensor | None, lengths: torch.Tensor | None, D: int,
                     H: int) -> torch.Tensor:
    """(B, T, D, H): the state each step read, h_{t-1} forward and h_{t+1} reverse, h0 at a sequence's first step
    (t = 0 forward, t = lengths[b] - 1 reverse). Padded steps hold zeros or h0; their dz is zero."""
    B, T = out.shape[:2]
    states = out.view(B, T, D, H)
    first = out.new_zeros(D, B, H) if h0 is None else h0.to(out.dtype)
    forward = torch.cat([first[0][:, None], states[:, :-1, 0]], dim=1)
    if D == 1:
        return forward[:, :, None]
    shifted = torch.cat([states[:, 1:, 1], states.new_zeros(B, 1, H)], dim=1)
    last = (torch.full((B,), T, device=out.device) if lengths is None else lengths) - 1
    at_last = torch.arange(T, device=out.device)[None, :] == last[:, None]
    reverse = torch.where(at_last[:, :, None], first[1][:, None], shifted)
    return torch.stack([forward, reverse], dim=2)


@_lstm_persistent_bwd.register_fake
def _(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, has_bias, h0, c0, lengths, out, gates, cells, need_dx,
      need_dweights, need_dstate, w_hr=None):
    B, T, n_in = x.shape
    D, G, H = w_hh.shape
    work = compute_dtype(x.dtype)

    def new(*shape, wanted=True):
        return x.new_empty(shape if wanted else (0,), dtype=work)

    return (new(B, T, n_in, wanted=need_dx), new(D * G, n_in, wanted=need_dweights),
            new(D, G, H, wanted=need_dweights), new(D * G, wanted=need_dweights and has_bias),
            new(D, B, H, wanted=need_dstate), new(D, B, H, wanted=need_dstate), new(0))


def _backward(ctx, *grads):
    return backward(ctx, *grads, run_bwd=torch.ops.fastmsc.lstm_persistent_bwd, widen_saved=False)


_lstm_persistent_fwd.register_autograd(_backward, setup_context=setup_context)


def forward(x, w_ih, w_hh, bias, h0, c0, lengths, training):
    """The persistent layer on lstm_fwd's arguments (h0 and c0 both given or both None; weights in x's dtype)."""
    if (h0 is None) != (c0 is None):
        B, D, H = x.shape[0], w_hh.shape[0], w_hh.shape[-1]
        h0 = x.new_zeros(D, B, H) if h0 is None else h0
        c0 = x.new_zeros(D, B, H) if c0 is None else c0
    return torch.ops.fastmsc.lstm_persistent_fwd(x, w_ih, w_hh, bias, h0, c0, lengths, training)
