"""NaN and ±Inf propagate on every backend as stock PyTorch's composition propagates them, forward and backward.

For each op and backend a fresh draw places NaN, +Inf and -Inf at random valid positions of one input (or, for
ops with ``lengths``, in the padding past the lengths only), runs the op and its backward for a finite upstream
gradient, and checks every output and every gradient against the same math written with plain torch ops on
each sequence's valid steps (F.conv1d per branch, torch.max / mean, F.scaled_dot_product_attention,
torch.nn.LSTM): the NaN / +Inf / -Inf pattern must be identical and the finite values must match it (and the
float64 reference backend) numerically. Padding therefore never influences anything: outputs and gradients
past the lengths are exactly zero, and a non-finite value there changes no other number.

The Triton kernels run in float32 here (interpreted on CPU); the LSTM extension and the other backends run in
float64. Where stock PyTorch disagrees with itself the expected side is SDPA's math kernel (PyTorch's CPU flash
kernel gives 0 instead of NaN for a query row holding NaN, and NaN gradients for a row whose scores are all
-inf). Four corners are left out, each noted where it applies: the torch backend for such an all -inf row,
and its gradients when an infinite valid key or value meets its padded query rows;
non-finite conv weights in the fused dx (torch's dx drops their products with the zero padding, the fused dx
multiplies them); GELU at +inf (torch's CPU GELU gives NaN, the kernels' erf form +inf).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import TOL_FLOAT32, TOL_FLOAT64, Draw
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastmsc.backend import OPS, use_backend
from fastmsc.ops.attention import attention
from fastmsc.ops.lstm_layer import lstm_layer
from fastmsc.ops.max_avg_pool import max_avg_pool
from fastmsc.ops.multiscale_conv1d import multiscale_conv1d

BACKENDS = ("reference", "torch", "fused", "auto")
KINDS = ("nan", "inf", "mixed")
NONFINITE = {"nan": (float("nan"),), "inf": (float("inf"), float("-inf")),
             "mixed": (float("nan"), float("inf"), float("-inf"))}


# ----------------------------------------------------------------------------------------------- machinery


def _dtype(op: str, backend: str) -> torch.dtype:
    """float32 where the Triton kernels may run (they take no float64), float64 elsewhere."""
    if op != "lstm_layer" and backend == "fused":
        return torch.float32
    return torch.float64


def _skip_without_fused(op: str, backend: str) -> None:
    """Backend ``fused`` needs the op's fused path on CPU; ``auto`` runs whichever path it picks."""
    if backend == "fused":
        with use_backend("fused"):
            reason = OPS[op].why_not_fused("cpu")
        if reason is not None:
            pytest.skip(f"fused {op} unavailable on cpu: {reason}")


def _inject(draw: Draw, t: torch.Tensor, kind: str, allowed: torch.Tensor) -> list[tuple]:
    """Write 1-3 values of ``kind`` at random positions where ``allowed`` (bool, t's shape) holds; returns them."""
    positions = allowed.nonzero().tolist()
    chosen = []
    values = NONFINITE[kind]
    for i in range(min(len(positions), draw.int(1, 3))):
        index = tuple(draw.choice(positions))
        value = values[i % len(values)] if kind == "mixed" else draw.choice(values)
        t[index] = value
        chosen.append((index, value))
    return chosen


def _valid_steps(shape, lengths: torch.Tensor | None, time_dim: int) -> torch.Tensor:
    """bool of ``shape``: True at steps t < lengths[b] along ``time_dim`` (everywhere without lengths)."""
    if lengths is None:
        return torch.ones(shape, dtype=torch.bool)
    steps = torch.arange(shape[time_dim])
    view = [1] * len(shape)
    view[time_dim] = shape[time_dim]
    valid = steps.view(view) < lengths.view([-1] + [1] * (len(shape) - 1))
    return valid.expand(shape).clone()


def _run(fn, inputs: dict, dtype: torch.dtype, cotangents, backend: str | None):
    """fn(**inputs) on leaves of ``dtype`` (under ``backend``; None: plain torch), then its backward for the
    float64 ``cotangents``; returns (outputs, gradients by input name), all float64."""
    leaves = {name: value.to(dtype).requires_grad_() if isinstance(value, torch.Tensor) and value.is_floating_point()
              else value for name, value in inputs.items()}
    if backend is None:
        outs = fn(**leaves)
    else:
        with use_backend(backend):
            outs = fn(**leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    names = [n for n, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    cotangents = [c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True)]
    grads = torch.autograd.grad(outs, [leaves[n] for n in names], cotangents, allow_unused=True)
    grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads, strict=True)}
    return [o.detach().double() for o in outs], {n: g.double() for n, g in grads.items()}


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: dict) -> None:
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        want, got = test(expected), test(actual)
        if not torch.equal(want, got):
            extra = (got & ~want).nonzero().tolist()[:8]
            missing = (want & ~got).nonzero().tolist()[:8]
            raise AssertionError(f"{what}: {name} pattern differs; unexpected at {extra}, missing at {missing}")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], **tol, msg=lambda m: f"{what}: finite values: {m}")


def check(op: str, backend: str, fn, expected_fn, inputs: dict, draw: Draw, what: str,
          compare_grads: bool = True, skip_grads: tuple[str, ...] = ()) -> None:
    """``fn`` under ``backend`` against ``expected_fn`` (plain torch ops, float64) on the same values, rounded to
    the backend's dtype: outputs and (unless ``compare_grads`` is False) every gradient but ``skip_grads``,
    patterns and finite values; and against the reference backend."""
    dtype = _dtype(op, backend)
    rounded = {n: v.to(dtype).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for n, v in inputs.items()}
    with torch.no_grad():
        probe = expected_fn(**rounded)
    probe = tuple(probe) if isinstance(probe, (tuple, list)) else (probe,)
    cotangents = [draw.randn(*o.shape).to(dtype).double() for o in probe]
    expected_outs, expected_grads = _run(expected_fn, rounded, torch.float64, cotangents, None)
    ref_outs, ref_grads = _run(fn, rounded, torch.float64, cotangents, "reference")
    outs, grads = _run(fn, inputs, dtype, cotangents, backend)
    tol = TOL_FLOAT32 if dtype == torch.float32 else TOL_FLOAT64
    prefix = f"{what} [{draw.tag()}, backend={backend}, dtype={str(dtype)[6:]}]"
    for i, (out, want, ref) in enumerate(zip(outs, expected_outs, ref_outs, strict=True)):
        _assert_matches(out, want, f"{prefix} output {i}", tol)
        _assert_matches(out, ref, f"{prefix} output {i} vs the reference backend", tol)
    for name, want in expected_grads.items() if compare_grads else ():
        if name in skip_grads:
            continue
        _assert_matches(grads[name], want, f"{prefix} grad of {name}", tol)
        _assert_matches(grads[name], ref_grads[name], f"{prefix} grad of {name} vs the reference backend", tol)


def _where_cases():
    return [(backend, kind, where) for backend in BACKENDS for kind in KINDS for where in ("valid", "padding")]


def _lengths_for(draw: Draw, batch: int, steps: int, where: str) -> torch.Tensor | None:
    """Mixed lengths (one of them 1, so with steps >= 2 there is padding) for ``padding``; None or mixed else."""
    if where == "padding" or draw.choice((True, False)):
        return draw.lengths(batch, steps, "mixed")
    return None


def _targets(draw: Draw, tensors: dict, lengths, where: str, time_dims: dict) -> tuple[str, torch.Tensor]:
    """Allowed positions in one drawn tensor: its valid steps (anywhere for tensors without a time dimension),
    or for ``padding`` its steps past the lengths."""
    name = draw.choice(sorted(time_dims if where == "padding" else tensors))
    t = tensors[name]
    if name not in time_dims:
        return name, torch.ones(t.shape, dtype=torch.bool)
    valid = _valid_steps(t.shape, lengths, time_dims[name])
    return name, ~valid if where == "padding" else valid


# ----------------------------------------------------------------------------------------------- max_avg_pool


def _pool_expected(x, lengths=None):
    rows = []
    for b in range(x.shape[0]):
        xb = x[b] if lengths is None else x[b, : int(lengths[b])]
        rows.append(torch.cat([xb.max(dim=0).values, xb.mean(dim=0)]))
    return torch.stack(rows)


@pytest.mark.parametrize(("backend", "kind", "where"), _where_cases())
def test_max_avg_pool(backend, kind, where):
    _skip_without_fused("max_avg_pool", backend)
    draw = Draw()
    B, T, C = draw.int(3, 4), draw.int(2, 12), draw.int(1, 5)
    lengths = _lengths_for(draw, B, T, where)
    x = draw.randn(B, T, C)
    name, allowed = _targets(draw, {"x": x}, lengths, where, {"x": 1})
    placed = _inject(draw, x, kind, allowed)
    what = f"max_avg_pool B={B} T={T} C={C} lengths={None if lengths is None else lengths.tolist()} {name}: {placed}"
    check("max_avg_pool", backend, max_avg_pool, _pool_expected, {"x": x, "lengths": lengths}, draw, what)


# ----------------------------------------------------------------------------------------------- multiscale_conv1d


def _conv_call(activation, n):
    def call(x, **params):
        weights = [params[f"w{i}"] for i in range(n)]
        biases = [params[f"b{i}"] for i in range(n)]
        return multiscale_conv1d(x, weights, biases, activation)

    def expected(x, **params):
        outs = []
        for i in range(n):
            w = params[f"w{i}"]
            y = F.conv1d(x, w, params[f"b{i}"], padding=w.shape[-1] // 2)
            outs.append(y if activation is None else F.relu(y) if activation == "relu" else F.gelu(y))
        return torch.cat(outs, dim=1)

    return call, expected


@pytest.mark.parametrize(("backend", "kind"), [(b, k) for b in BACKENDS for k in KINDS])
def test_multiscale_conv1d(backend, kind):
    """Each branch's outputs turn non-finite only within that branch's own receptive field (k_i taps), and the
    gradients only where the branch's math reads the value."""
    _skip_without_fused("multiscale_conv1d", backend)
    draw = Draw()
    # C_in = 19 with 7 taps streams the im2col tile in chunks; smaller ones keep it resident. The dx kernel
    # multiplies elementwise below 4 float32 channels and with tl.dot from 4 on.
    B, c_in, T = draw.int(1, 2), draw.choice((1, 3, 5, 19)), draw.int(4, 14)
    sizes = sorted({draw.odd(1, 7) for _ in range(draw.int(1, 3))} | {draw.choice((5, 7))})
    # torch's CPU GELU gives NaN at +inf where the kernels' erf form gives +inf: only NaN meets GELU here.
    activation = draw.choice((None, "relu", "gelu") if kind == "nan" else (None, "relu"))
    inputs = {"x": draw.randn(B, c_in, T)}
    for i, k in enumerate(sizes):
        inputs[f"w{i}"] = draw.randn(draw.int(1, 3), c_in, k, scale=0.5)
        inputs[f"b{i}"] = draw.randn(inputs[f"w{i}"].shape[0])
    # Mostly x; sometimes a weight with NaN (its whole output channel turns NaN, padding of x included). Next to
    # the sequence ends torch's dx drops a weight's products with the zero padding (col2im) where the fused dx
    # kernel multiplies them (NaN * 0, inf * 0): infinite weights are left out, and with a NaN weight the fused
    # backend's dx is not compared.
    name = "x" if kind != "nan" or draw.int(0, 3) else draw.choice([f"w{i}" for i in range(len(sizes))])
    placed = _inject(draw, inputs[name], kind, torch.ones(inputs[name].shape, dtype=torch.bool))
    call, expected = _conv_call(activation, len(sizes))
    what = f"multiscale_conv1d B={B} C_in={c_in} T={T} k={sizes} activation={activation} {name}: {placed}"
    skip = ("x",) if backend == "fused" and name != "x" else ()
    check("multiscale_conv1d", backend, call, expected, inputs, draw, what, skip_grads=skip)


# ----------------------------------------------------------------------------------------------- attention


def _attention_expected(q, k, v, lengths=None):
    four_d = q.dim() == 4
    if not four_d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    rows = []
    for b in range(q.shape[0]):
        n = q.shape[-2] if lengths is None else int(lengths[b])
        # The math kernel: PyTorch's CPU flash kernel returns 0 for a query row holding a NaN.
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        rows.append(torch.cat([out, out.new_zeros(1, q.shape[1], q.shape[-2] - n, q.shape[-1])], dim=-2))
    out = torch.cat(rows)
    return out if four_d else out.squeeze(1)


def _has_empty_row(q, k, lengths) -> bool:
    for b in range(q.shape[0]):
        n = q.shape[-2] if lengths is None else int(lengths[b])
        scores = q[b, ..., :n, :] @ k[b, ..., :n, :].transpose(-1, -2)
        if bool((scores == float("-inf")).all(-1).any()):
            return True
    return False


@pytest.mark.parametrize(("backend", "kind", "where"), _where_cases())
def test_attention(backend, kind, where):
    """A NaN query row gives a NaN output row, a NaN key every valid row, a NaN value its column; padded
    queries, keys and values change nothing."""
    _skip_without_fused("attention", backend)
    draw = Draw()
    B, T, D = draw.int(3, 4), draw.int(2, 9), draw.int(1, 8)
    shape = (B, draw.int(1, 2), T, D) if draw.choice((True, False)) else (B, T, D)
    lengths = _lengths_for(draw, B, T, where)
    inputs = {name: draw.randn(*shape) for name in "qkv"}
    name, allowed = _targets(draw, inputs, lengths, where, {n: len(shape) - 2 for n in "qkv"})
    placed = _inject(draw, inputs[name], kind, allowed)
    what = f"attention shape={shape} lengths={None if lengths is None else lengths.tolist()} {name}: {placed}"
    # A valid row whose scores are all -inf (an infinite query or key can cause it) gives zeros with zero
    # gradients in SDPA's math kernel on the sequence alone; SDPA as the torch backend calls it, on the padded
    # batch with a mask, adds the mask to the scores of the (zeroed) padded keys, inf * 0 = NaN, and its CPU
    # flash backward gives that row NaN gradients. That corner is PyTorch's own disagreement: not compared.
    if backend in ("torch", "auto") and _has_empty_row(inputs["q"], inputs["k"], lengths):
        pytest.skip(f"{what}: a row whose scores are all -inf, where SDPA disagrees with itself [{draw.tag()}]")
    # The torch backend runs SDPA over the padded batch: its padded query rows (zeroed) still meet the valid keys
    # and values, and in the backward an infinite one gives 0 * inf = NaN there, which reaches the gradients of
    # the other keys. Its outputs are compared, its gradients only without such a key or value.
    padded_inf = lengths is not None and bool((lengths < T).any()) and any(
        bool(torch.isinf(inputs[n][_valid_steps(shape, lengths, len(shape) - 2)]).any()) for n in "kv")
    compare_grads = backend in ("reference", "fused") or not padded_inf
    check("attention", backend, attention, _attention_expected, {**inputs, "lengths": lengths}, draw, what,
          compare_grads)


# ----------------------------------------------------------------------------------------------- lstm_layer


def _lstm_call(directions):
    def weights_of(params):
        return tuple((params[f"w_ih{d}"], params[f"w_hh{d}"], params[f"b_ih{d}"], params[f"b_hh{d}"])
                     for d in range(directions))

    def call(x, h0, c0, lengths=None, **params):
        return lstm_layer(x, weights_of(params), h0, c0, lengths)

    def expected(x, h0, c0, lengths=None, **params):
        """torch.nn.LSTM on each sequence's valid steps (what pack_padded_sequence gives), zeros past them."""
        B, T, n_in = x.shape
        H = h0.shape[-1]
        lstm = torch.nn.LSTM(n_in, H, batch_first=True, bidirectional=directions == 2, dtype=x.dtype)
        names = {}
        for d in range(directions):
            suffix = "_reverse" if d else ""
            names.update({f"weight_ih_l0{suffix}": params[f"w_ih{d}"], f"weight_hh_l0{suffix}": params[f"w_hh{d}"],
                          f"bias_ih_l0{suffix}": params[f"b_ih{d}"], f"bias_hh_l0{suffix}": params[f"b_hh{d}"]})
        outs, hs, cs = [], [], []
        for b in range(B):
            n = T if lengths is None else int(lengths[b])
            out, (h, c) = torch.func.functional_call(lstm, names, (x[b:b + 1, :n], (h0[:, b:b + 1], c0[:, b:b + 1])))
            outs.append(torch.cat([out, out.new_zeros(1, T - n, out.shape[-1])], dim=1))
            hs.append(h)
            cs.append(c)
        return torch.cat(outs), torch.cat(hs, dim=1), torch.cat(cs, dim=1)

    return call, expected


@pytest.mark.parametrize(("backend", "kind", "where"), _where_cases())
def test_lstm_layer(backend, kind, where):
    """A non-finite input at a valid step reaches only its own sequence; padding reaches nothing (the weight
    gradients included)."""
    _skip_without_fused("lstm_layer", backend)
    draw = Draw()
    B, T, n_in, H, directions = draw.int(3, 4), draw.int(2, 6), draw.int(1, 3), draw.int(1, 3), draw.int(1, 2)
    lengths = _lengths_for(draw, B, T, where)
    inputs = {"x": draw.randn(B, T, n_in), "h0": draw.randn(directions, B, H), "c0": draw.randn(directions, B, H)}
    for d in range(directions):
        inputs.update({f"w_ih{d}": draw.randn(4 * H, n_in, scale=0.5), f"w_hh{d}": draw.randn(4 * H, H, scale=0.5),
                       f"b_ih{d}": draw.randn(4 * H), f"b_hh{d}": draw.randn(4 * H)})
    # Valid positions: mostly x, sometimes an initial state.
    candidates = {"x": inputs["x"]} if where == "padding" or draw.int(0, 2) else {n: inputs[n] for n in ("h0", "c0")}
    name, allowed = _targets(draw, candidates, lengths, where, {"x": 1})
    placed = _inject(draw, inputs[name], kind, allowed)
    call, expected = _lstm_call(directions)
    what = (f"lstm_layer B={B} T={T} I={n_in} H={H} D={directions} "
            f"lengths={None if lengths is None else lengths.tolist()} {name}: {placed}")
    check("lstm_layer", backend, call, expected, {**inputs, "lengths": lengths}, draw, what)
