"""The Triton attention kernels specifically (fastmsc.kernels.attention): the column-strip launch tables, the dQ
partials summed over several key blocks and the separate dQ kernel (both against float64), bitwise reproducible
backward, TF32 / 3xTF32, what autograd saves (no T x T tensor), rows without a valid key, gradients of masked rows,
the fallback reasons and shared-memory limits, AOT cases for every launch configuration. The forward
and every gradient against the float64 reference (the kernels' block and strip regimes among the shapes), opcheck,
torch.compile and auto's choice are in tests/test_op_contract.py. On a machine without a GPU the kernels run in
the Triton interpreter (tests/conftest.py), with every kernel output poisoned with NaN before the launch, so an
element a kernel forgets to write fails."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import Draw, assert_close, require_fused
from test_attention import TOL

import fastmsc
from fastmsc.backend import FusedUnavailable
from fastmsc.kernels._common import poison_enabled
from fastmsc.ops.attention import attention_reference

kernels = pytest.importorskip("fastmsc.kernels.attention", reason="the fused attention module needs triton")
attention_aot = pytest.importorskip("fastmsc.kernels.attention_aot", reason="the AOT declarations need triton")

@pytest.fixture(autouse=True)
def _fused_attention():
    require_fused("attention")
    assert poison_enabled(), "tests/conftest.py must set FASTMSC_POISON=1 so unwritten outputs show up as NaN"


WIDE_HEAD_DIMS = (96, 128, 200, 256)


@pytest.mark.parametrize("head_dim", WIDE_HEAD_DIMS)
def test_float32_wide_head_dims_take_the_column_strip_path(head_dim):
    """The wide-D fp32 regimes of tests/test_op_contract.py test the strip loop only while the launch tables pick it:
    every kernel must read D in strips narrower than BLOCK_D for fp32 (and keep whole-row tiles for half inputs)."""
    block_d = kernels._block_d(head_dim)
    for table in (kernels._FWD_BLOCKS, kernels._BWD_BLOCKS, kernels._DQ_BLOCKS):
        for seq in (1, 37, 4096):
            d_chunk = kernels._blocks(table, head_dim, torch.float32, seq)[2]
            assert d_chunk < block_d and block_d % d_chunk == 0, (head_dim, seq, d_chunk)
            assert kernels._blocks(table, head_dim, torch.float16, seq)[2] == block_d, (head_dim, seq)


def test_float32_wide_head_dim_backward_is_bitwise_reproducible():
    """No atomics: two backward passes over the same inputs give identical gradients."""
    draw = Draw()
    T, D = draw.odd(17, 37), draw.choice((96, 256))
    q, k, v = (draw.randn(2, 2, T, D).float().requires_grad_() for _ in range(3))
    lengths = torch.tensor([draw.int(1, T), T])
    grad_out = draw.randn(2, 2, T, D).float()
    with fastmsc.use_backend("fused"):
        first = torch.autograd.grad(kernels.fused(q, k, v, lengths, None), (q, k, v), grad_out)
        second = torch.autograd.grad(kernels.fused(q, k, v, lengths, None), (q, k, v), grad_out)
    for name, a, b in zip("qkv", first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes: T={T} D={D} {draw.tag()}"


def _grads_against_float64(q, k, v, lengths, grad_out, what):
    """Output and dq, dk, dv of the fused op against the float64 reference on the same (rounded) inputs, within
    test_attention.TOL of the inputs' dtype; returns the fused gradients."""
    tol = TOL[q.dtype]
    qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with fastmsc.use_backend("fused"):
        out = kernels.fused(qf, kf, vf, lengths, None)
    grads = torch.autograd.grad(out, (qf, kf, vf), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, lengths, 1 / math.sqrt(q.shape[-1]))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert_close(out.double(), ref, f"output {what}", **tol)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g.double(), r, f"d{name} {what}", **tol)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dq_partials_over_several_key_blocks_match_float64_and_reproduce(monkeypatch, dtype):
    """The 5-product backward with 16-key blocks (so that a short sequence has several key blocks and dQ sums
    several partials, the last key block partial) at an odd T, mixed lengths (one sequence ending inside a key
    block, so later key blocks write no partial and the reduction must stop before them) and 4-D inputs; and two
    backward passes bitwise equal (the partials are summed in a fixed order)."""
    small = {d: tuple((16, 16, *entry[2:]) for entry in pair) for d, pair in kernels._BWD_BLOCKS.items()}
    monkeypatch.setattr(kernels, "_BWD_BLOCKS", small)
    monkeypatch.setattr(kernels, "MIN_PARTIAL_KEYS", dict.fromkeys(kernels.MIN_PARTIAL_KEYS, 16))
    draw = Draw()
    T, D = draw.odd(35, 45), draw.choice((16, 24))
    assert kernels.dq_partial_blocks(D, dtype, T) == math.ceil(T / 16) >= 3
    q, k, v, grad_out = (draw.randn(2, 2, T, D).to(dtype) for _ in range(4))
    lengths = torch.tensor([draw.int(17, 31), T])
    what = f"{dtype} T={T} D={D} lengths={lengths.tolist()} {draw.tag()}"
    first = _grads_against_float64(q, k, v, lengths, grad_out, f"dQ partials {what}")
    second = _grads_against_float64(q, k, v, lengths, grad_out, f"dQ partials {what}")
    for name, a, b in zip("qkv", first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes: {what}"


def test_dq_partials_with_the_launch_tables_full_tiles_match_float64():
    """The tables' own backward tiles, not shrunk: bfloat16 at D = 64 (128 keys per program, 32-row query steps)
    over two key blocks, the second partial, with a length ending in the first."""
    draw = Draw()
    T, D = draw.odd(131, 161), 64
    assert kernels._blocks(kernels._BWD_BLOCKS, D, torch.bfloat16, T)[1] == 128
    assert kernels.dq_partial_blocks(D, torch.bfloat16, T) == 2
    q, k, v, grad_out = (draw.randn(2, 2, T, D).to(torch.bfloat16) for _ in range(4))
    lengths = torch.tensor([T, draw.int(40, 127)])
    _grads_against_float64(q, k, v, lengths, grad_out, f"bf16 T={T} lengths={lengths.tolist()} {draw.tag()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_separate_dq_kernel_matches_float64_and_the_partials(monkeypatch, dtype):
    """The backward's other dQ path (the separate dQ kernel, taken for narrow key blocks and long sequences),
    forced on inputs that would use the dQ partials: both against float64, and close to each other."""
    draw = Draw()
    T, D = draw.odd(17, 41), 16
    q, k, v, grad_out = (draw.randn(3, T, D).to(dtype) for _ in range(4))
    lengths = torch.tensor([draw.int(1, T - 1), T, draw.int(1, T)])
    what = f"{dtype} T={T} D={D} lengths={lengths.tolist()} {draw.tag()}"
    assert kernels.dq_partial_blocks(D, dtype, T) >= 1
    with_partials = _grads_against_float64(q, k, v, lengths, grad_out, f"dQ partials {what}")
    monkeypatch.setattr(kernels, "DQ_PARTIAL_BYTES_RATIO", 0)
    assert kernels.dq_partial_blocks(D, dtype, T) == 0
    separate = _grads_against_float64(q, k, v, lengths, grad_out, f"separate dQ kernel {what}")
    for name, a, b in zip("qkv", with_partials, separate, strict=True):
        assert_close(a.double(), b.double(), f"d{name}, partials vs separate kernel {what}", **TOL[dtype])


# TF32 rounds each product's operands to 10 mantissa bits (unit roundoff u = 2^-11, fp16's): float16's row of TOL
# bounds it. Emulated (operands truncated to TF32, fp32 accumulation) over 440 random cases, D 16-256, T 2-300, the
# worst error of the output and the gradients against float64 is 0.29 of this bound.
TF32_TOL = TOL[torch.float16]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter has no TF32")
@pytest.mark.parametrize("head_dim", [16, 64, 256], ids=["d16-partials", "d64", "d256"])
def test_float32_with_tf32_allowed_matches_float64_within_tf32_error(head_dim):
    """torch.backends.cuda.matmul.allow_tf32 = True: single TF32 products (both dQ paths among the head dims)."""
    flag = torch.backends.cuda.matmul.allow_tf32
    draw = Draw()
    T = draw.int(100, 300)
    q, k, v, grad_out = (draw.randn(2, 2, T, head_dim).float().cuda() for _ in range(4))
    lengths = torch.tensor([draw.int(1, T), T], device="cuda")
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kernels._input_precision(torch.float32) == "tf32"
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        with fastmsc.use_backend("fused"):
            out = kernels.fused(qf, kf, vf, lengths, None)
        grads = torch.autograd.grad(out, (qf, kf, vf), grad_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, lengths, 1 / math.sqrt(head_dim))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    what = f"TF32 T={T} D={head_dim} lengths={lengths.tolist()} {draw.tag()}"
    assert_close(out.double(), ref, f"output {what}", **TF32_TOL)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g.double(), r, f"d{name} {what}", **TF32_TOL)


def test_misaligned_views_are_copied_so_every_launch_is_the_aligned_specialisation():
    """q, k, v sliced from one packed (B, T, 3D + 1) buffer at odd offsets are copied to aligned contiguous tensors
    (the unhinted specialisation of the half forward at D = 256 spills registers); an aligned tensor, contiguous or
    a (B, T, H, D).transpose(1, 2) head view, is passed as it is. The AOT cases of such calls carry the
    divisibility hints of every input pointer."""
    packed = torch.randn(2, 5, 3 * 256 + 1).to(torch.bfloat16)
    for i in range(3):
        view = packed[..., 1 + i * 256:1 + (i + 1) * 256]
        assert view.data_ptr() % 16 != 0
        copied = kernels._as_4d(view)
        assert copied.data_ptr() % 16 == 0 and copied.is_contiguous() and torch.equal(copied[:, 0], view)
    heads = torch.empty(2, 5, 3 * 64, dtype=torch.bfloat16).view(2, 5, 3, 64).transpose(1, 2)
    contiguous = torch.empty(2, 5, 256, dtype=torch.bfloat16)
    assert kernels._as_4d(heads).data_ptr() == heads.data_ptr()
    assert kernels._as_4d(contiguous).data_ptr() == contiguous.data_ptr()
    for case in attention_aot.aot_cases():
        if "misaligned" in case["name"]:
            hinted = case.get("attrs", {})
            for pointer in ("Q", "K", "V", "OUT", "DO"):
                if pointer in case["signature"]:
                    assert pointer in hinted, (case["name"], pointer)

def test_tf32_only_when_torch_allows_it():
    """fp32 products run on tensor cores: TF32 where torch's fp32 matmuls may use it, else 3xTF32."""
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert kernels._input_precision(torch.float32) == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kernels._input_precision(torch.float32) == "tf32"
        assert kernels._input_precision(torch.float16) == "ieee"  # half operands never go through tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def test_outputs_keep_the_input_dtype_and_shape():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((2, 3, 16), (2, 2, 3, 16)):
            q = torch.randn(shape, dtype=dtype)
            with fastmsc.use_backend("fused"):
                out = fastmsc.attention(q, q, q)
            assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()


def test_autograd_saves_no_time_by_time_tensor():
    """T = 64, D = 16, 2 heads: a (T, T) score or probability matrix (4096 elements per head) would be the
    largest tensor saved; the kernels save q, k, v, the output (2048 elements each) and the LSE (128)."""
    B, H, T, D = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with fastmsc.use_backend("fused"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastmsc.attention(q, k, v, torch.tensor([50]))
    assert saved, "nothing was saved for backward: the fused path was not taken"
    assert (B, H, T) in [shape for shape, _ in saved], f"the per-row LSE is not among the saved tensors: {saved}"
    largest = max(math.prod(shape) for shape, _ in saved)
    assert largest < T * T, f"a tensor with {largest} >= T*T = {T * T} elements is saved for backward: {saved}"
    out.sum().backward()  # and the saved tensors are enough for the backward
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_rows_without_valid_key_give_zero_never_nan():
    """A zero length (refused by fastmsc.attention, possible under torch.compile where lengths are not read)
    leaves every key of a row masked: the LSE guard must give output 0 and zero gradients, not NaN."""
    draw = Draw()
    T, D = draw.int(2, 20), 16
    q, k, v = (draw.randn(2, 2, T, D).float().requires_grad_() for _ in range(3))
    lengths = torch.tensor([0, draw.int(1, T)])
    with fastmsc.use_backend("fused"):
        out = kernels.fused(q, k, v, lengths, 0.25)
    grad_out = draw.randn(*out.shape).float()
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    what = f"T={T} lengths={lengths.tolist()} {draw.tag()}"
    assert torch.all(out[0] == 0), f"batch 0 has no valid key, its output must be 0: {what}"
    for name, g in zip("qkv", grads, strict=True):
        assert torch.all(g[0] == 0), f"d{name} of batch 0 must be 0: {what}"
        assert torch.isfinite(g).all(), f"d{name} is not finite: {what}"
    q64, k64, v64 = (t.detach()[1:].double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, lengths[1:], 0.25)
    assert_close(out[1:].double(), ref, f"batch 1 output {what}", **TOL[torch.float32])
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out[1:].double())
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g[1:].double(), r, f"batch 1 d{name} {what}", **TOL[torch.float32])


def test_masked_query_rows_are_exact_zeros_and_ignore_their_output_gradient():
    """Rows past the length output exactly 0; a NaN in their output gradient (which the masking discards) must
    not reach dq, dk or dv."""
    draw = Draw()
    B, T, D = 2, draw.int(5, 40), 24
    q, k, v = (draw.randn(B, T, D).float().requires_grad_() for _ in range(3))
    lengths = torch.tensor([draw.int(1, T - 1), T])
    with fastmsc.use_backend("fused"):
        out = fastmsc.attention(q, k, v, lengths)
    what = f"T={T} lengths={lengths.tolist()} {draw.tag()}"
    L = int(lengths[0])
    assert torch.all(out[0, L:] == 0), f"rows past the length are not exactly 0: {what}"
    grad_out = draw.randn(B, T, D).float()
    grad_out[0, L:] = float("nan")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, lengths, 1 / math.sqrt(D))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.nan_to_num(grad_out.double(), nan=0.0))
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert_close(g.double(), r, f"d{name} {what}", **TOL[torch.float32])
    assert torch.all(grads[0][0, L:] == 0), f"dq of masked rows must be exactly 0: {what}"


def test_unsupported_arguments_name_the_reason():
    q64 = torch.randn(1, 3, 16, dtype=torch.float64)
    with fastmsc.use_backend("fused"), pytest.raises(FusedUnavailable, match="float64"):
        fastmsc.attention(q64, q64, q64)
    wide = torch.randn(1, 2, kernels.MAX_HEAD_DIM + 1, dtype=torch.float16)
    with fastmsc.use_backend("fused"), pytest.raises(FusedUnavailable, match=r"head dims up to 256, got D=257"):
        fastmsc.attention(wide, wide, wide)
    wide32 = torch.randn(1, 2, kernels.MAX_HEAD_DIM + 1)
    with fastmsc.use_backend("fused"), pytest.raises(FusedUnavailable, match=r"head dims up to 256, got D=257"):
        fastmsc.attention(wide32, wide32, wide32)
    with fastmsc.use_backend("auto"):  # auto falls back to torch for all of them
        assert fastmsc.attention(q64, q64, q64).dtype == torch.float64
        assert fastmsc.attention(wide.float(), wide.float(), wide.float()).shape == wide.shape
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # every head dim of the range, in every dtype
        for head_dim in (1, 65, 96, 128, 255, kernels.MAX_HEAD_DIM):
            q = torch.empty(1, 2, head_dim, dtype=dtype)
            reason = kernels.fused_unsupported("cuda", q=q, k=q, v=q, lengths=None, scale=0.1)
            assert reason is None, (dtype, head_dim, reason)


@pytest.mark.parametrize("shared_kb", [64, 99, 163, 227], ids=["hypothetical64", "sm86-89", "sm80", "sm90"])
def test_calls_needing_more_shared_memory_than_the_gpu_gives_are_declined(monkeypatch, shared_kb):
    """Every call fits the 99 KB per block of sm_86/sm_89 GPUs (tests/test_triton_aot.py checks the bound against
    the compiled kernels), so those and A100/H100 take every dtype and head dim; a GPU giving less is declined
    (auto then uses torch) with the reason. CUDA tensors are fake (shape only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmsc.kernels import _common

    monkeypatch.setattr(kernels, "_device_shared_bytes", lambda device: shared_kb * 1024)
    monkeypatch.setattr(_common, "compute_capability", lambda device: 86 if shared_kb <= 99 else 90)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in (16, 96, 97, 128, 256):
            with FakeTensorMode():
                q = torch.empty(2, 5, head_dim, dtype=dtype, device="cuda")
            reason = kernels.fused_unsupported("cuda", q=q, k=q, v=q, lengths=None, scale=0.1)
            if shared_kb < 99:
                assert reason is not None and f"head dim {head_dim} needs up to 99 KB" in reason, reason
                assert f"gives a block {shared_kb} KB" in reason
            else:
                assert reason is None, (dtype, head_dim, shared_kb, reason)


def _input_pointer(case):
    """The signature type of a case's input tensor (its dtype): "*fp16", "*bf16" or "*fp32"."""
    return next(case["signature"][name] for name in ("Q", "OUT", "DQ") if name in case["signature"])


def test_aot_cases_cover_every_head_dim_block():
    """Every kernel at every BLOCK_D in every dtype, the dQ reduction wherever the partials may be taken
    (tests/test_op_contract.py checks that every kernel has valid cases)."""
    cases = attention_aot.aot_cases()
    for block_d in (16, 32, 64, 128, 256):
        for dtype in ("*fp16", "*bf16", "*fp32"):
            for kernel in {case["kernel"] for case in cases} - {kernels._attention_bwd_dq_reduce_kernel}:
                assert any(case["kernel"] is kernel and case["constexprs"]["BLOCK_D"] == block_d
                           and _input_pointer(case) == dtype for case in cases), (kernel.__name__, block_d, dtype)
    # Every full-size launch configuration of every kernel, whatever the head dim (shorter sequences shrink BLOCK_M
    # and BLOCK_N only), and the dQ-partial variant of the backward wherever the partials may be taken.
    compiled = {(case["kernel"].__name__, case["signature"]["Q"], case["constexprs"]["BLOCK_D"],
                 case["constexprs"]["BLOCK_M"], case["constexprs"]["BLOCK_N"], case["constexprs"]["D_CHUNK"],
                 case["num_warps"], case["num_stages"], case.get("maxnreg"))
                for case in cases if "D_CHUNK" in case["constexprs"]}
    with_partials = {(case["signature"]["Q"], case["constexprs"]["BLOCK_D"]) for case in cases
                     if case["constexprs"].get("DQ_PARTIAL")}
    reduced = {(_input_pointer(case), case["constexprs"]["BLOCK_D"]) for case in cases
               if case["kernel"] is kernels._attention_bwd_dq_reduce_kernel}
    signatures = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype, signature in signatures.items():
        for kernel, table in ((kernels._attention_fwd_kernel, kernels._FWD_BLOCKS),
                              (kernels._attention_bwd_kernel, kernels._BWD_BLOCKS),
                              (kernels._attention_bwd_dq_kernel, kernels._DQ_BLOCKS)):
            for head_dim in range(1, kernels.MAX_HEAD_DIM + 1):
                config = (kernel.__name__, signature, kernels._block_d(head_dim),
                          *kernels._blocks(table, head_dim, dtype, 4096))
                assert config in compiled, (head_dim, config)
        for head_dim in (16, 32, 64, 128, 256):
            if any(kernels.dq_partial_blocks(head_dim, dtype, seq) for seq in (16, 150, 512)):
                assert (signature, head_dim) in with_partials & reduced, (dtype, head_dim)
