"""torch.nn.LSTM's documented behaviours, checked on torch.nn.LSTM itself and on fastmsc.nn.LSTM under every
backend.

Every test runs once per implementation: ``torch.nn`` (so each expectation here is known to be torch's) and
``fastmsc-<backend>`` for the backends reference, torch, fused and auto. Numerical results are compared in
float64 with ``spec_lstm``, torch's documented equations written out one sequence at a time, on the outputs and
on the gradient of the input, the initial states and every parameter; the fastmsc implementations are also
compared with torch.nn.LSTM itself on the same weights (loaded with load_state_dict) and inputs.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from _helpers import Draw, assert_close
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastmsc
from fastmsc.nn import LSTM

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64 on both sides: a few hundred rounding steps stay far below this

BACKENDS = ("reference", "torch", "fused", "auto")


@dataclass(frozen=True)
class Impl:
    """torch.nn.LSTM (backend None) or fastmsc.nn.LSTM run under one fastmsc backend."""

    backend: str | None

    @property
    def is_torch(self) -> bool:
        return self.backend is None

    @property
    def name(self) -> str:
        return "torch.nn" if self.is_torch else f"fastmsc-{self.backend}"

    def build(self, *args, **kwargs) -> nn.Module:
        return (nn.LSTM if self.is_torch else LSTM)(*args, **kwargs)

    def context(self):
        return contextlib.nullcontext() if self.is_torch else fastmsc.use_backend(self.backend)

    def __call__(self, module, *args):
        with self.context():
            return module(*args)


TORCH = Impl(None)
ALL = (TORCH, *(Impl(b) for b in BACKENDS))


def impls() -> list:
    """One pytest param per implementation."""
    return [pytest.param(impl, id=impl.name) for impl in ALL]


def classes() -> list:
    return [pytest.param(nn.LSTM, id="torch.nn"), pytest.param(LSTM, id="fastmsc")]


# ---------------------------------------------------------------- the documented equations


def spec_lstm(params, config, sequences, h0=None, c0=None, drop_between=False):
    """torch.nn.LSTM's equations, one sequence at a time (so packing, lengths and batch order cannot leak in).

    ``params``: torch's parameter names -> tensors; ``sequences``: list of (T_b, input_size); ``h0`` (L*D, B,
    H_out) and ``c0`` (L*D, B, H) or None for zeros; ``drop_between``: dropout with p=1 between layers, i.e.
    every layer after the first sees zeros. Returns ([(T_b, D*H_out)], h_n (L*D, B, H_out), c_n (L*D, B, H)).

        i, f, g, o = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh   (split in four, in this order)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t)                           (then W_hr h_t with proj_size > 0)
    """
    layers, hidden = config.get("num_layers", 1), config["hidden_size"]
    directions = 2 if config.get("bidirectional", False) else 1
    proj = config.get("proj_size", 0)
    out_size = proj or hidden
    any_param = next(iter(params.values()))
    outputs, h_n, c_n = [], [], []
    for b, sequence in enumerate(sequences):
        layer_input, h_b, c_b = sequence, [], []
        for layer in range(layers):
            if layer and drop_between:
                layer_input = torch.zeros_like(layer_input)
            per_direction = []
            for d in range(directions):
                tag = f"l{layer}{'_reverse' if d else ''}"
                w_ih, w_hh = params[f"weight_ih_{tag}"], params[f"weight_hh_{tag}"]
                b_ih, b_hh = params.get(f"bias_ih_{tag}"), params.get(f"bias_hh_{tag}")
                k = layer * directions + d
                h = any_param.new_zeros(out_size) if h0 is None else h0[k, b]
                c = any_param.new_zeros(hidden) if c0 is None else c0[k, b]
                steps = range(len(layer_input)) if d == 0 else reversed(range(len(layer_input)))
                out = [None] * len(layer_input)
                for t in steps:
                    gates = w_ih @ layer_input[t] + w_hh @ h
                    if b_ih is not None:
                        gates = gates + b_ih + b_hh
                    i, f, g, o = gates.chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    if proj:
                        h = params[f"weight_hr_{tag}"] @ h
                    out[t] = h
                per_direction.append(torch.stack(out))
                h_b.append(h)
                c_b.append(c)
            layer_input = torch.cat(per_direction, -1)
        outputs.append(layer_input)
        h_n.append(torch.stack(h_b))
        c_n.append(torch.stack(c_b))
    return outputs, torch.stack(h_n, 1), torch.stack(c_n, 1)


# ---------------------------------------------------------------- running one case on an implementation


def randomize(module: nn.Module, draw: Draw) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(draw.randn(*p.shape, scale=0.6).to(p.dtype))
    return module


@dataclass
class Case:
    """One call: the module's configuration, the input's form and the sequences' lengths."""

    config: dict
    form: str  # "batched" (honours batch_first), "unbatched" (T, I) or "packed" (a PackedSequence)
    lengths: list[int]
    with_hx: bool = False
    enforce_sorted: bool = True
    train: bool = False

    @property
    def directions(self) -> int:
        return 2 if self.config.get("bidirectional", False) else 1

    @property
    def states(self) -> int:
        return self.config.get("num_layers", 1) * self.directions

    @property
    def out_size(self) -> int:
        return self.config.get("proj_size", 0) or self.config["hidden_size"]

    def input_shape(self) -> tuple[int, ...]:
        B, T, n_in = len(self.lengths), max(self.lengths, default=1), self.config["input_size"]
        if self.form == "unbatched":
            return (T, n_in)
        return (B, T, n_in) if self.config.get("batch_first", False) else (T, B, n_in)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        H = self.config["hidden_size"]
        if self.form == "unbatched":
            return (self.states, self.out_size), (self.states, H)
        B = len(self.lengths)
        return (self.states, B, self.out_size), (self.states, B, H)

    def sequences(self, padded: torch.Tensor) -> list[torch.Tensor]:
        """Sequence b, (lengths[b], features), cut from a tensor in the input's (padded) layout."""
        if self.form == "unbatched":
            return [padded[: self.lengths[0]]]
        if self.config.get("batch_first", False):
            return [padded[b, :n] for b, n in enumerate(self.lengths)]
        return [padded[:n, b] for b, n in enumerate(self.lengths)]

    def module_input(self, x: torch.Tensor):
        if self.form != "packed":
            return x
        return pack_padded_sequence(x, torch.tensor(self.lengths), batch_first=self.config.get("batch_first", False),
                                    enforce_sorted=self.enforce_sorted)

    def __str__(self) -> str:
        return (f"{self.config} form={self.form} lengths={self.lengths} hx={self.with_hx} "
                f"enforce_sorted={self.enforce_sorted} train={self.train}")


def run(impl: Impl, module: nn.Module, case: Case, x: torch.Tensor, hx):
    """(per-sequence outputs, h_n, c_n) of ``module`` on ``x``; checks the documented output form on the way."""
    given = case.module_input(x)
    out, (h_n, c_n) = impl(module, given, hx)
    what = f"{impl.name} {case}"
    if case.form == "packed":
        assert isinstance(out, PackedSequence), f"a PackedSequence input gives a PackedSequence: {what}"
        assert torch.equal(out.batch_sizes, given.batch_sizes), what
        for field in ("sorted_indices", "unsorted_indices"):
            got, want = getattr(out, field), getattr(given, field)
            assert (got is None and want is None) or torch.equal(got, want), f"{field}: {what}"
        padded = pad_packed_sequence(out, batch_first=case.config.get("batch_first", False))[0]
    else:
        width = case.directions * case.out_size
        assert out.shape == (*case.input_shape()[:-1], width), f"output shape {tuple(out.shape)}: {what}"
        padded = out
    h_shape, c_shape = case.state_shapes()
    assert h_n.shape == h_shape and c_n.shape == c_shape, f"h_n {tuple(h_n.shape)} c_n {tuple(c_n.shape)}: {what}"
    return case.sequences(padded), h_n, c_n


def gradients(outputs, leaves: dict[str, torch.Tensor], cotangents) -> dict[str, torch.Tensor]:
    """d(sum of cotangent * output)/d(leaf) for every leaf, zeros where the output does not depend on it."""
    loss = sum((c * o).sum() for c, o in zip(cotangents, outputs, strict=True))
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads, strict=True)}


def evaluate(impl: Impl, module: nn.Module, case: Case, x: torch.Tensor, hx, cotangents):
    """Outputs (per sequence, then h_n and c_n) of ``module`` and the gradients of sum(cotangent * output) with
    respect to the input, h_0, c_0 and every parameter, by name."""
    leaves = {"input": x.clone().requires_grad_()}
    if hx is not None:
        leaves["h_0"], leaves["c_0"] = (t.clone().requires_grad_() for t in hx)
    seqs, h_n, c_n = run(impl, module, case, leaves["input"], None if hx is None else (leaves["h_0"], leaves["c_0"]))
    outputs = [*seqs, h_n, c_n]
    return outputs, gradients(outputs, {**leaves, **dict(module.named_parameters())}, cotangents)


def spec_evaluate(case: Case, params: dict, x: torch.Tensor, hx, draw: Draw):
    """Like ``evaluate`` on the documented equations; also draws the cotangents."""
    leaves = {"input": x.clone().requires_grad_()}
    h0 = c0 = None
    if hx is not None:
        h0, c0 = (t.clone().requires_grad_() for t in hx)
        leaves["h_0"], leaves["c_0"] = h0, c0
        if case.form == "unbatched":
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    config = case.config
    drop_between = case.train and config.get("dropout", 0.0) == 1.0
    seqs, h_n, c_n = spec_lstm(params, config, case.sequences(leaves["input"]), h0, c0, drop_between)
    if case.form == "unbatched":
        h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
    outputs = [*seqs, h_n, c_n]
    cotangents = [draw.randn(*t.shape) for t in outputs]
    return outputs, gradients(outputs, {**leaves, **params}, cotangents), cotangents


def compare(got, want, what: str) -> None:
    (outputs, grads), (want_outputs, want_grads) = got, want
    labels = [f"output of sequence {b}" for b in range(len(outputs) - 2)] + ["h_n", "c_n"]
    for label, a, b in zip(labels, outputs, want_outputs, strict=True):
        assert a.shape == b.shape, f"{label} shape {tuple(a.shape)} != {tuple(b.shape)}: {what}"
        assert_close(a, b, f"{label}: {what}", **TOL)
    assert sorted(grads) == sorted(want_grads), f"gradients of {sorted(grads)} != {sorted(want_grads)}: {what}"
    for name, g in grads.items():
        assert_close(g, want_grads[name], f"gradient of {name}: {what}", **TOL)


def check_case(impl: Impl, case: Case, draw: Draw | None = None) -> None:
    """``impl`` on ``case`` against the documented equations and, for fastmsc, against torch.nn.LSTM with the
    same weights: every output and the gradient of the input, h_0, c_0 and every parameter, for one random
    cotangent."""
    draw = draw or Draw()
    source = randomize(nn.LSTM(**case.config, dtype=F64), draw)
    x = draw.randn(*case.input_shape())
    hx = tuple(draw.randn(*shape) for shape in case.state_shapes()) if case.with_hx else None
    params = {n: p.detach().clone().requires_grad_() for n, p in source.named_parameters()}
    spec_outputs, spec_grads, cotangents = spec_evaluate(case, params, x, hx, draw)
    module = impl.build(**case.config, dtype=F64)
    module.load_state_dict(source.state_dict())
    module.train(case.train)
    source.train(case.train)
    got = evaluate(impl, module, case, x, hx, cotangents)
    what = f"{impl.name} {case} [{draw.tag()}]"
    compare(got, (spec_outputs, spec_grads), f"{what} vs the documented equations")
    if not impl.is_torch:
        compare(got, evaluate(TORCH, source, case, x, hx, cotangents), f"{what} vs torch.nn.LSTM")


@pytest.fixture(autouse=True)
def _fused_available(request):
    """fastmsc-fused runs the compiled LSTM extension; where it cannot be built, those cases skip with why."""
    impl = request.node.callspec.params.get("impl") if hasattr(request.node, "callspec") else None
    if isinstance(impl, Impl) and impl.backend == "fused":
        reason = fastmsc.backend.OPS["lstm_layer"].why_not_fused("cpu")
        if reason is not None:
            pytest.skip(f"the fused LSTM cannot run here: {reason}")


def drawn_config(draw: Draw, **fixed) -> dict:
    config = {"input_size": draw.int(1, 4), "hidden_size": draw.int(1, 4), "num_layers": draw.int(1, 2),
              "bias": draw.choice((True, False)), "batch_first": draw.choice((True, False)),
              "bidirectional": draw.choice((True, False))}
    config.update(fixed)
    return config


# ---------------------------------------------------------------- constructor


CONSTRUCTOR_MISUSE = [  # (overrides of input_size=3, hidden_size=4; the class torch raises)
    ({"bias": "True"}, TypeError), ({"bias": 1}, TypeError), ({"batch_first": None}, TypeError),
    ({"input_size": 3.0}, TypeError), ({"input_size": None}, TypeError), ({"input_size": 0}, ValueError),
    ({"input_size": -1}, ValueError), ({"hidden_size": 4.0}, TypeError), ({"hidden_size": 0}, ValueError),
    ({"num_layers": 0}, ValueError), ({"num_layers": -1}, ValueError), ({"num_layers": 0.0}, ValueError),
    ({"num_layers": 2.0}, TypeError), ({"num_layers": None}, TypeError), ({"num_layers": "2"}, TypeError),
    ({"dropout": 1.5}, ValueError), ({"dropout": -0.1}, ValueError), ({"dropout": math.nan}, ValueError),
    ({"dropout": True}, ValueError), ({"dropout": "0.1"}, ValueError), ({"dropout": "high"}, ValueError),
    ({"dropout": None}, TypeError), ({"proj_size": -1}, ValueError), ({"proj_size": -0.5}, ValueError),
    ({"proj_size": 4}, ValueError), ({"proj_size": 5}, ValueError), ({"proj_size": None}, TypeError),
    ({"proj_size": 1.5}, TypeError),
    # Two mistakes: the class of the one torch checks first.
    ({"dropout": 2, "bias": "x"}, ValueError), ({"bias": "x", "input_size": 0}, TypeError),
    ({"input_size": 0, "hidden_size": 4.0}, ValueError), ({"num_layers": 0, "proj_size": 1.5}, ValueError),
]
CONSTRUCTOR_ACCEPTED = [  # torch takes these (bool is an int; a zero proj_size of any type disables projections)
    {"num_layers": True}, {"input_size": True}, {"hidden_size": True}, {"proj_size": False}, {"proj_size": 0.0},
    {"dropout": 1, "num_layers": 2}, {"dropout": 0}, {"bias": False, "batch_first": True},
]


def _ids(overrides) -> str:
    return ",".join(f"{k}={v!r}" for k, v in overrides.items())


@pytest.mark.parametrize("cls", classes())
@pytest.mark.parametrize(("overrides", "expected"), CONSTRUCTOR_MISUSE, ids=[_ids(o) for o, _ in CONSTRUCTOR_MISUSE])
def test_constructor_misuse_raises_torchs_class(cls, overrides, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropout warning comes before some of these errors, as in torch
        with pytest.raises(Exception) as raised:
            cls(**{"input_size": 3, "hidden_size": 4, **overrides})
    assert type(raised.value) is expected, f"{cls.__module__}: {type(raised.value).__name__}: {raised.value}"


@pytest.mark.parametrize("cls", classes())
@pytest.mark.parametrize("overrides", CONSTRUCTOR_ACCEPTED, ids=_ids)
def test_constructor_accepts_what_torch_accepts(cls, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = cls(**{"input_size": 3, "hidden_size": 4, **overrides})
    layers = int(overrides.get("num_layers", 1))
    assert [n for n, _ in module.named_parameters()][-1].endswith(f"_l{layers - 1}")


@pytest.mark.parametrize("cls", classes())
def test_constructor_warns_about_dropout_on_one_layer(cls):
    for overrides in ({"dropout": 0.5}, {"dropout": 1, "num_layers": True}):
        with pytest.warns(UserWarning, match=r"non-zero dropout expects num_layers greater than 1"):
            cls(3, 4, **overrides)
    with pytest.warns(UserWarning, match=r"non-zero dropout"), pytest.raises(TypeError):
        cls(3, 4, dropout=0.5, bias="yes")  # torch warns before it checks the other arguments
    for overrides in ({"dropout": 0.5, "num_layers": 2}, {"dropout": 0.0}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls(3, 4, **overrides)


@pytest.mark.parametrize("cls", classes())
@pytest.mark.parametrize("bias", [True, False])
def test_parameters_are_torchs(cls, bias):
    """Names, order and shapes of the documented parameters: weight_ih_l[k] is (4H, input_size) for k = 0 and
    (4H, D*H) above; weight_hh_l[k] (4H, H); biases (4H,); ``_reverse`` for the second direction."""
    module = cls(3, 5, num_layers=2, bias=bias, bidirectional=True)
    expected = []
    for layer in range(2):
        for suffix in ("", "_reverse"):
            expected += [(f"weight_ih_l{layer}{suffix}", (20, 3 if layer == 0 else 10)),
                         (f"weight_hh_l{layer}{suffix}", (20, 5))]
            if bias:
                expected += [(f"bias_ih_l{layer}{suffix}", (20,)), (f"bias_hh_l{layer}{suffix}", (20,))]
    assert [(n, tuple(p.shape)) for n, p in module.named_parameters()] == expected
    assert list(module.state_dict()) == [n for n, _ in expected]
    bound = 1 / math.sqrt(5)
    assert all(float(p.detach().abs().max()) <= bound for p in module.parameters()), "init U(-1/sqrt(H), 1/sqrt(H))"


@pytest.mark.parametrize("cls", classes())
def test_repr_names_the_arguments_that_differ_from_their_defaults(cls):
    assert repr(cls(3, 4)) == "LSTM(3, 4)"
    module = cls(3, 4, num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)
    assert repr(module) == "LSTM(3, 4, num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)"


# ---------------------------------------------------------------- forward: values and gradients


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx=given"])
def test_initial_states(impl, with_hx):
    draw = Draw()
    B, T = draw.int(1, 3), draw.int(1, 5)
    check_case(impl, Case(drawn_config(draw), "batched", [T] * B, with_hx=with_hx), draw)


@pytest.mark.parametrize("impl", impls())
def test_missing_states_are_zeros_and_hx_may_be_a_list(impl):
    draw = Draw()
    config = drawn_config(draw, batch_first=False)
    module = randomize(impl.build(**config, dtype=F64), draw)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    x = draw.randn(draw.int(1, 5), 2, config["input_size"])
    zeros = torch.zeros(states, 2, config["hidden_size"], dtype=F64)
    without = impl(module, x)
    for hx in ((zeros, zeros), [zeros, zeros]):
        given = impl(module, x, hx)
        for a, b, name in ((given[0], without[0], "output"), (given[1][0], without[1][0], "h_n"),
                           (given[1][1], without[1][1], "c_n")):
            assert_close(a, b, f"{name} with zero {type(hx).__name__} hx vs hx=None [{draw.tag()}]", **TOL)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx=2-D"])
def test_unbatched_input(impl, with_hx):
    """(T, input_size) in, (T, D*H) out, h_n and c_n (L*D, H); a given hx is 2-D; batch_first does not apply."""
    draw = Draw()
    check_case(impl, Case(drawn_config(draw), "unbatched", [draw.int(1, 6)], with_hx=with_hx), draw)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("form", ["batched", "packed"])
def test_batch_first(impl, form):
    """batch_first=True: (B, T, *) input and output; h_n and c_n stay (L*D, B, H)."""
    draw = Draw()
    B, T = draw.int(2, 4), draw.int(2, 6)
    lengths = [T] * B if form == "batched" else sorted(draw.lengths(B, T, "mixed").tolist(), reverse=True)
    check_case(impl, Case(drawn_config(draw, batch_first=True), form, lengths, with_hx=draw.choice((False, True))),
               draw)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["enforce_sorted", "unsorted"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx=given"])
def test_packed_sequences(impl, enforce_sorted, with_hx):
    """A PackedSequence in gives one out with the input's batch_sizes and indices; each sequence runs over its
    own length only (the reverse direction starts at its last step), and h_n, c_n (like a given hx) are in the
    caller's batch order."""
    draw = Draw()
    B, T = draw.int(2, 5), draw.int(2, 6)
    lengths = draw.lengths(B, T, "mixed").tolist()
    if enforce_sorted:
        lengths.sort(reverse=True)
    case = Case(drawn_config(draw), "packed", lengths, with_hx=with_hx, enforce_sorted=enforce_sorted)
    check_case(impl, case, draw)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layers_and_directions(impl, num_layers, bidirectional, bias):
    draw = Draw()
    config = drawn_config(draw, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    B, T = draw.int(1, 3), draw.int(1, 5)
    check_case(impl, Case(config, "batched", [T] * B, with_hx=draw.choice((False, True))), draw)


@pytest.mark.parametrize("impl", impls())
def test_non_contiguous_input_and_states(impl):
    """Strided views (a permuted input, transposed states) give the results of their contiguous copies."""
    draw = Draw()
    module = randomize(impl.build(3, 4, num_layers=2, bidirectional=True, dtype=F64), draw)
    x = draw.randn(3, 5, 2).permute(1, 2, 0)  # (T=5, B=2, I=3), not contiguous
    h0, c0 = draw.randn(4, 4, 2).transpose(1, 2), draw.randn(4, 4, 2).transpose(1, 2)  # (L*D, B, H)
    assert not (x.is_contiguous() or h0.is_contiguous() or c0.is_contiguous())
    got = impl(module, x, (h0, c0))
    want = impl(module, x.contiguous(), (h0.contiguous(), c0.contiguous()))
    for name, a, b in (("output", got[0], want[0]), ("h_n", got[1][0], want[1][0]), ("c_n", got[1][1], want[1][1])):
        assert_close(a, b, f"{name} of strided vs contiguous inputs, {impl.name} [{draw.tag()}]", **TOL)


@pytest.mark.parametrize("impl", impls())
def test_backward_twice_with_retain_graph_and_frozen_weights(impl):
    draw = Draw()
    module = randomize(impl.build(3, 4, num_layers=2, dtype=F64), draw).requires_grad_(False)
    x = draw.randn(5, 2, 3).requires_grad_()
    out, (h_n, c_n) = impl(module, x)
    loss = out.sum() + h_n.sum() + c_n.sum()
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]
    assert torch.equal(first, second), f"{impl.name}: a retained graph gives the same gradient twice"
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("impl", impls())
def test_weight_norm_parametrization_matches_torch(impl):
    """torch.nn.utils.parametrizations.weight_norm on a recurrent weight: same outputs and gradients of the
    parametrization's tensors as torch.nn.LSTM with the same parametrization."""
    draw = Draw()
    theirs = randomize(nn.LSTM(3, 4, num_layers=2, dtype=F64), draw)
    ours = impl.build(3, 4, num_layers=2, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours):
        torch.nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = draw.randn(5, 2, 3)
    results = []
    for target, module in ((impl, ours), (TORCH, theirs)):
        out = target(module, x)[0]
        originals = list(module.parametrizations.weight_hh_l0.parameters())
        results.append((out, torch.autograd.grad((out * torch.cos(out)).sum(), originals)))
    (got, got_grads), (want, want_grads) = results
    assert_close(got, want, f"output with weight_norm, {impl.name} [{draw.tag()}]", **TOL)
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close(a, b, f"gradient of weight_norm tensor {i}, {impl.name} [{draw.tag()}]", **TOL)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("impl", impls())
def test_dropout_one_zeroes_what_the_next_layer_sees_in_training_only(impl):
    """dropout=1 in training: every layer after the first gets zeros (deterministic, so exactly comparable);
    in eval mode dropout does nothing; on a single layer it does nothing either (and warns at construction)."""
    draw = Draw()
    config = drawn_config(draw, num_layers=draw.int(2, 3), dropout=1.0)
    B, T = draw.int(1, 3), draw.int(1, 5)
    check_case(impl, Case(config, "batched", [T] * B, with_hx=True, train=True), draw)
    check_case(impl, Case(config, "batched", [T] * B, with_hx=True, train=False), draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about dropout on one layer, tested with the constructor
        check_case(impl, Case(drawn_config(draw, num_layers=1, dropout=0.5), "batched", [T] * B, train=True), draw)


@pytest.mark.parametrize("impl", impls())
def test_dropout_set_after_construction_takes_effect(impl):
    """The dropout attribute is read at each call: set to 1 on a module built without dropout, the second
    layer sees zeros in training mode and everything in eval mode."""
    draw = Draw()
    module = randomize(impl.build(3, 4, num_layers=2, dtype=F64), draw)
    params = {n: p.detach() for n, p in module.named_parameters()}
    config = {"input_size": 3, "hidden_size": 4, "num_layers": 2}
    x = draw.randn(5, 2, 3)
    module.dropout = 1.0
    for train in (True, False):
        want = torch.stack(spec_lstm(params, config, [x[:, b] for b in range(2)], drop_between=train)[0], 1)
        with torch.no_grad():
            got = impl(module.train(train), x)[0]
        assert_close(got, want, f"dropout=1 set later, train={train}, {impl.name} [{draw.tag()}]", **TOL)


def _revealing_lstm(impl: Impl, draw: Draw, p: float, input_size: int, hidden: int) -> nn.Module:
    """Two layers whose second one shows what it was given: output_j = 0.5 tanh(0.5 tanh(x_j)) for its input x
    (g gate = identity, i and o gates at sigmoid(0), forget gate closed), so x = atanh(2 atanh(2 output))."""
    module = impl.build(input_size, hidden, num_layers=2, dropout=p, dtype=F64)
    randomize(module, draw)
    with torch.no_grad():
        module.weight_ih_l1.zero_()
        module.weight_ih_l1[2 * hidden:3 * hidden] = torch.eye(hidden, dtype=F64)
        module.weight_hh_l1.zero_()
        module.bias_hh_l1.zero_()
        module.bias_ih_l1.zero_()
        module.bias_ih_l1[hidden:2 * hidden] = -1e4
    return module


@pytest.mark.parametrize("impl", impls())
def test_dropout_statistics_between_layers(impl):
    """In training, each output of the first layer reaches the second either zeroed (with probability p) or
    scaled by 1/(1-p), independently per element and per call; the last layer's output is not dropped; in
    eval mode nothing is dropped. The random stream need not be torch's, so this checks the distribution."""
    draw = Draw()
    T, B, n_in, H = 4, 32, 3, 16
    for p in (0.0, 0.3, 0.7, 1.0):
        module = _revealing_lstm(impl, draw, p, n_in, H)
        first = nn.LSTM(n_in, H, dtype=F64)
        first.load_state_dict({k: v for k, v in module.state_dict().items() if k.endswith("_l0")})
        x = draw.randn(T, B, n_in)
        with torch.no_grad():
            layer_one = first(x)[0]
            seen = {}
            for mode in ("train", "eval"):
                module.train(mode == "train")
                out = impl(module, x)[0]
                seen[mode] = torch.atanh(2 * torch.atanh(2 * out))
            second_call = torch.atanh(2 * torch.atanh(2 * impl(module.train(), x)[0]))
        what = f"{impl.name} p={p} [{draw.tag()}]"
        assert_close(seen["eval"], layer_one, f"eval mode drops nothing: {what}", rtol=1e-8, atol=1e-10)
        dropped = seen["train"].abs() < 1e-12
        kept = torch.where(dropped, torch.zeros_like(layer_one), layer_one / (1 - p) if p < 1 else layer_one)
        assert_close(seen["train"], kept, f"every element is zeroed or scaled by 1/(1-p): {what}", rtol=1e-7,
                     atol=1e-10)
        n = dropped.numel()
        rate = dropped.double().mean().item()
        spread = 6 * math.sqrt(p * (1 - p) / n) + 1e-12
        assert abs(rate - p) <= spread, f"{rate:.3f} of the elements dropped, expected {p} +- {spread:.3f}: {what}"
        if 0 < p < 1:
            again = second_call.abs() < 1e-12
            assert not torch.equal(dropped, again), f"each call draws a new mask: {what}"


# ---------------------------------------------------------------- gradcheck and gradgradcheck


def _functional(impl: Impl, module: nn.Module, form: str, lengths):
    """f(input, h_0, c_0, *parameters) -> (output data, h_n, c_n) for gradcheck."""
    names = [n for n, _ in module.named_parameters()]

    def f(x, h0, c0, *params):
        given = pack_padded_sequence(x, lengths, enforce_sorted=False) if form == "packed" else x
        with impl.context():
            out, (h_n, c_n) = torch.func.functional_call(module, dict(zip(names, params, strict=True)),
                                                         (given, (h0, c0)))
        return (out.data if form == "packed" else out), h_n, c_n

    return f


def _grad_inputs(impl: Impl, draw: Draw, config: dict, T: int, B: int):
    module = randomize(impl.build(**config, dtype=F64), draw)
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    tensors = [draw.randn(T, B, config["input_size"]), draw.randn(states, B, config["hidden_size"]),
               draw.randn(states, B, config["hidden_size"]), *(p.detach().clone() for p in module.parameters())]
    return module, [t.requires_grad_() for t in tensors]


SMALL = ({"input_size": 1, "hidden_size": 1, "num_layers": 1, "bidirectional": True}, 2, 1)  # config, T, B
LARGER = ({"input_size": 2, "hidden_size": 2, "num_layers": 2, "bidirectional": True}, 3, 2)


def _check_gradients(check, impl: Impl, form: str, size, fast_mode: bool) -> None:
    """``check`` (gradcheck or gradgradcheck) on a small bidirectional LSTM with given states, with respect to
    the input, both states and every parameter. fast_mode compares one random projection of the Jacobian
    instead of all of it: far fewer evaluations while it passes (a failure reruns the full check for its
    message, so the double-backward checks that fail today use the small size)."""
    draw = Draw()
    config, T, B = size
    module, tensors = _grad_inputs(impl, draw, config, T=T, B=B)
    lengths = torch.tensor([T] + [max(1, T - 1)] * (B - 1)) if form == "packed" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning about the fused backward's missing autograd kernel
        assert check(_functional(impl, module, form, lengths), tensors, fast_mode=fast_mode), draw.tag()


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("form", ["batched", "packed"])
def test_gradcheck(impl, form):
    _check_gradients(gradcheck, impl, form, LARGER, fast_mode=True)


@pytest.mark.parametrize("impl", impls())
def test_gradgradcheck(impl):
    _check_gradients(gradgradcheck, impl, "batched", SMALL, fast_mode=False)


@pytest.mark.slow
@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("form", ["batched", "packed"])
def test_gradcheck_full_jacobian(impl, form):
    _check_gradients(gradcheck, impl, form, LARGER, fast_mode=False)


@pytest.mark.slow
@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("form", ["batched", "packed"])
def test_gradgradcheck_larger(impl, form):
    _check_gradients(gradgradcheck, impl, form, LARGER, fast_mode=False)


# ---------------------------------------------------------------- proj_size


@pytest.mark.parametrize("impl", impls())
def test_proj_size_parameters_and_state_dict(impl):
    """With proj_size P: weight_hh_l[k] is (4H, P), weight_ih_l[k] (4H, D*P) for k > 0, and weight_hr_l[k]
    (P, H) follows each direction's biases; torch's state_dict loads both ways."""
    module = impl.build(3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=F64)
    expected = []
    for layer in range(2):
        for suffix in ("", "_reverse"):
            expected += [(f"weight_ih_l{layer}{suffix}", (20, 3 if layer == 0 else 4)),
                         (f"weight_hh_l{layer}{suffix}", (20, 2)), (f"bias_ih_l{layer}{suffix}", (20,)),
                         (f"bias_hh_l{layer}{suffix}", (20,)), (f"weight_hr_l{layer}{suffix}", (2, 5))]
    assert [(n, tuple(p.shape)) for n, p in module.named_parameters()] == expected
    assert module.proj_size == 2
    theirs = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=F64)
    module.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(module.state_dict())


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("form", ["batched", "unbatched", "packed"])
def test_proj_size_shapes_and_values(impl, form):
    """output (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B, H); h_t = W_hr (o_t * tanh(c_t))."""
    draw = Draw()
    hidden = draw.int(2, 5)
    config = drawn_config(draw, hidden_size=hidden, proj_size=draw.int(1, hidden - 1))
    B, T = draw.int(2, 4), draw.int(2, 5)
    lengths = {"batched": [T] * B, "unbatched": [T], "packed": draw.lengths(B, T, "mixed").tolist()}[form]
    check_case(impl, Case(config, form, lengths, with_hx=draw.choice((False, True)), enforce_sorted=False), draw)


@pytest.mark.parametrize("impl", impls())
def test_proj_size_state_shapes_are_checked(impl):
    module = impl.build(3, 5, proj_size=2, dtype=F64)
    x = torch.zeros(4, 2, 3, dtype=F64)
    impl(module, x, (torch.zeros(1, 2, 2, dtype=F64), torch.zeros(1, 2, 5, dtype=F64)))
    with pytest.raises(RuntimeError):
        impl(module, x, (torch.zeros(1, 2, 5, dtype=F64), torch.zeros(1, 2, 5, dtype=F64)))
    with pytest.raises(RuntimeError):
        impl(module, x, (torch.zeros(1, 2, 2, dtype=F64), torch.zeros(1, 2, 2, dtype=F64)))


# ---------------------------------------------------------------- empty batch


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch_first"])
def test_empty_batch(impl, batch_first):
    """B = 0 is no error: empty output and states of the documented shapes, an empty input gradient and zero
    parameter gradients."""
    draw = Draw()
    config = drawn_config(draw, batch_first=batch_first)
    module = randomize(impl.build(**config, dtype=F64), draw)
    T, n_in, H = draw.int(1, 4), config["input_size"], config["hidden_size"]
    D = 2 if config["bidirectional"] else 1
    states = config["num_layers"] * D
    for with_hx in (False, True):
        x = torch.zeros((0, T, n_in) if batch_first else (T, 0, n_in), dtype=F64, requires_grad=True)
        hx = (torch.zeros(states, 0, H, dtype=F64, requires_grad=True),) * 2 if with_hx else None
        out, (h_n, c_n) = impl(module, x, hx)
        assert out.shape == ((0, T, D * H) if batch_first else (T, 0, D * H)), (impl.name, config, out.shape)
        assert h_n.shape == c_n.shape == (states, 0, H), (impl.name, config, h_n.shape, c_n.shape)
        grads = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), [x, *module.parameters()], allow_unused=True)
        assert grads[0] is None or grads[0].shape == x.shape
        for g in grads[1:]:
            assert g is None or not g.any(), f"{impl.name} {config}: nonzero parameter gradient for an empty batch"


# ---------------------------------------------------------------- misuse


def _packed(x, lengths):
    return pack_padded_sequence(x, torch.tensor(lengths))


def _z(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


# id -> (constructor keyword overrides of LSTM(3, 4, num_layers=2), input, hx, the class torch raises)
FORWARD_MISUSE = {
    "input is a list": ({}, lambda: [[1.0, 2.0, 3.0]], None, AttributeError),
    "input is None": ({}, lambda: None, None, AttributeError),
    "0-D input": ({}, lambda: _z(), None, ValueError),
    "1-D input": ({}, lambda: _z(3), None, ValueError),
    "4-D input": ({}, lambda: _z(1, 5, 2, 3), None, ValueError),
    "input size": ({}, lambda: _z(5, 2, 2), None, RuntimeError),
    "input size, unbatched": ({}, lambda: _z(5, 2), None, RuntimeError),
    "input size, packed": ({}, lambda: _packed(_z(5, 2, 2), [5, 3]), None, RuntimeError),
    "input dtype float64": ({}, lambda: _z(5, 2, 3, dtype=F64), None, ValueError),
    "input dtype int64": ({}, lambda: _z(5, 2, 3, dtype=torch.int64), None, ValueError),
    "input dtype, packed": ({}, lambda: _packed(_z(5, 2, 3, dtype=F64), [5, 3]), None, RuntimeError),
    "input dtype and input size": ({}, lambda: _z(5, 2, 2, dtype=F64), None, ValueError),
    "zero steps": ({}, lambda: _z(0, 2, 3), None, RuntimeError),
    "zero steps, batch_first": ({"batch_first": True}, lambda: _z(2, 0, 3), None, RuntimeError),
    "zero steps, unbatched": ({}, lambda: _z(0, 3), None, RuntimeError),
    "zero steps and input dtype": ({}, lambda: _z(0, 2, 3, dtype=F64), None, ValueError),
    "zero steps and h_0 shape": ({}, lambda: _z(0, 2, 3), lambda: (_z(2, 3, 4), _z(2, 3, 4)), RuntimeError),
    "hx is one tensor, one layer": ({"num_layers": 1}, lambda: _z(5, 2, 3), lambda: _z(1, 2, 4), IndexError),
    "hx is one tensor, two layers": ({}, lambda: _z(5, 2, 3), lambda: _z(2, 2, 4), RuntimeError),
    "hx is one 4-D tensor": ({}, lambda: _z(5, 2, 3), lambda: _z(2, 2, 2, 4), TypeError),
    "hx is an empty tuple": ({}, lambda: _z(5, 2, 3), lambda: (), IndexError),
    "hx is (h_0,)": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 2, 4),), IndexError),
    "hx has three tensors": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 2, 4),) * 3, RuntimeError),
    "hx is an int": ({}, lambda: _z(5, 2, 3), lambda: 5, TypeError),
    "hx holds None": ({}, lambda: _z(5, 2, 3), lambda: (None, None), AttributeError),
    "h_0 batch": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 3, 4), _z(2, 2, 4)), RuntimeError),
    "h_0 layers": ({}, lambda: _z(5, 2, 3), lambda: (_z(1, 2, 4), _z(2, 2, 4)), RuntimeError),
    "c_0 hidden size": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 2, 4), _z(2, 2, 5)), RuntimeError),
    "2-D hx for batched input": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 4), _z(2, 4)), RuntimeError),
    "3-D hx for unbatched input": ({}, lambda: _z(5, 3), lambda: (_z(2, 1, 4), _z(2, 1, 4)), RuntimeError),
    "2-D hx layers, unbatched": ({}, lambda: _z(5, 3), lambda: (_z(1, 4), _z(2, 4)), RuntimeError),
    "2-D hx and input dtype": ({}, lambda: _z(5, 2, 3, dtype=F64), lambda: (_z(2, 4), _z(2, 4)), RuntimeError),
    "2-D hx for packed input": ({}, lambda: _packed(_z(5, 2, 3), [5, 3]), lambda: (_z(2, 4), _z(2, 4)), IndexError),
    "hx dtype": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 2, 4, dtype=F64),) * 2, RuntimeError),
    "c_0 dtype": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 2, 4), _z(2, 2, 4, dtype=F64)), RuntimeError),
    # The meta device stands in for a second device: the checks are the same for every pair.
    "input on another device": ({}, lambda: _z(5, 2, 3, device="meta"), None, RuntimeError),
    "h_0 on another device": ({}, lambda: _z(5, 2, 3), lambda: (_z(2, 2, 4, device="meta"), _z(2, 2, 4)),
                              RuntimeError),
}


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("misuse", list(FORWARD_MISUSE))
def test_forward_misuse_raises_torchs_class(impl, misuse):
    overrides, make_input, make_hx, expected = FORWARD_MISUSE[misuse]
    module = impl.build(**{"input_size": 3, "hidden_size": 4, "num_layers": 2, **overrides})
    with pytest.raises(Exception) as raised:
        impl(module, make_input(), None if make_hx is None else make_hx())
    assert type(raised.value) is expected, f"{impl.name}: {type(raised.value).__name__}: {raised.value}"
