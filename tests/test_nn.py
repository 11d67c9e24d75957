"""fastmsc.nn modules: MultiScaleConv1d, LSTM (drop-in for torch.nn.LSTM), SelfAttention, MaxAvgPool1d,
and fastmsc.swap_modules. Compared in float64 with the stock modules or the explicit math, forward
and gradients, on fresh random sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import Draw, assert_close
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastmsc
from fastmsc.nn import LSTM, MaxAvgPool1d, MultiScaleConv1d, SelfAttention

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 on both sides
# "auto" runs the fused path wherever it supports the call (the compiled LSTM extension on CPU).
MODULE_BACKENDS = ("reference", "torch", "auto")


def grads_of(outputs, tensors, cotangents):
    return torch.autograd.grad(outputs, tensors, cotangents, allow_unused=True)


# ---------------------------------------------------------------- MultiScaleConv1d


class SeparateConvs(nn.Module):
    """How a model without fastmsc holds the branches: separate convs, concatenated in forward."""

    def __init__(self, in_channels, out_channels, kernel_sizes, activation, bias=True):
        super().__init__()
        self.activation = activation
        self.branches = nn.ModuleList(
            nn.Conv1d(in_channels, c, k, padding=k // 2, bias=bias) for c, k in zip(out_channels, kernel_sizes,
                                                                                    strict=True)
        )

    def forward(self, x):
        act = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu}[self.activation]
        return torch.cat([act(branch(x)) for branch in self.branches], 1)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_multiscale_conv1d_loads_separate_convs_and_matches_them(backend):
    draw = Draw()
    for _ in range(3):
        c_in, kernels = draw.int(1, 5), [draw.odd(1, 9) for _ in range(draw.int(1, 3))]
        outs = [draw.int(1, 5) for _ in kernels]
        activation, bias = draw.choice((None, "relu", "gelu")), draw.choice((True, False))
        what = f"C_in={c_in} kernels={kernels} out={outs} {activation} bias={bias} {draw.tag()}"
        separate = SeparateConvs(c_in, outs, kernels, activation, bias).double()
        fast = MultiScaleConv1d(c_in, outs, kernels, activation, bias).double()
        fast.load_state_dict(separate.state_dict())
        assert all(type(b) is nn.Conv1d for b in fast.branches), what
        assert fast.out_channels == sum(outs)
        x = draw.randn(draw.int(1, 3), c_in, draw.int(1, 20)).requires_grad_()
        with fastmsc.use_backend(backend):
            got = fast(x)
        want = separate(x)
        cot = draw.randn(*want.shape)
        assert_close(got, want, what, **TOL)
        for a, b in zip(grads_of(got, [x, *fast.parameters()], cot), grads_of(want, [x, *separate.parameters()], cot),
                        strict=True):
            assert_close(a, b, f"gradient {what}", **TOL)
        separate.load_state_dict(fast.state_dict())  # and back


def test_multiscale_conv1d_constructor():
    conv = MultiScaleConv1d(3, 4)
    assert [b.kernel_size[0] for b in conv.branches] == [3, 5, 7] and conv.out_channels == 12
    assert [b.padding[0] for b in conv.branches] == [1, 2, 3]
    assert MultiScaleConv1d(3, (2, 5), (1, 9)).out_channels == 7
    with pytest.raises(ValueError, match=r"kernel_sizes must be odd"):
        MultiScaleConv1d(3, 4, (3, 4))
    with pytest.raises(ValueError, match=r"out_channels must be .* one positive int per kernel size \(3\)"):
        MultiScaleConv1d(3, (4, 4))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        MultiScaleConv1d(3, 4, activation="swish")


# ---------------------------------------------------------------- LSTM


def lstm_pair(draw: Draw, **config):
    """A float64 torch.nn.LSTM and a fastmsc.nn.LSTM with the same configuration and weights."""
    stock = nn.LSTM(**config, dtype=torch.float64)
    fast = LSTM(**config, dtype=torch.float64)
    fast.load_state_dict(stock.state_dict())
    return stock, fast


def draw_config(draw: Draw, proj: bool = False, **fixed) -> dict:
    """Random constructor arguments; ``proj``: with proj_size in [1, hidden_size)."""
    config = {
        "input_size": draw.int(1, 6), "hidden_size": draw.int(2 if proj else 1, 7), "num_layers": draw.int(1, 3),
        "bias": draw.choice((True, False)), "batch_first": draw.choice((True, False)),
        "dropout": draw.choice((0.0, 0.4)), "bidirectional": draw.choice((True, False)),
    }
    if proj:
        config["proj_size"] = draw.int(1, config["hidden_size"] - 1)
    config.update(fixed)
    if config["num_layers"] == 1:
        config["dropout"] = 0.0  # torch.nn.LSTM warns about dropout with one layer
    return config


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_lstm_parameters_and_state_dict_match_torch(num_layers, bidirectional, bias, proj_size):
    config = {"input_size": 3, "hidden_size": 5, "num_layers": num_layers, "bias": bias,
              "bidirectional": bidirectional, "proj_size": proj_size}
    stock, fast = nn.LSTM(**config), LSTM(**config)
    assert [(n, p.shape) for n, p in fast.named_parameters()] == [(n, p.shape) for n, p in stock.named_parameters()]
    assert [(k, v.shape) for k, v in fast.state_dict().items()] == \
        [(k, v.shape) for k, v in stock.state_dict().items()]
    assert repr(fast) == repr(stock)
    fast.load_state_dict(stock.state_dict())
    stock.load_state_dict(fast.state_dict())
    for name, param in stock.named_parameters():
        assert torch.equal(param, fast.get_parameter(name)), name
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size"):
        assert getattr(fast, attr) == getattr(stock, attr), attr
    bound = 1 / math.sqrt(5)
    assert all(p.abs().max() <= bound for p in LSTM(**config).parameters()), "init must match nn.LSTM's range"


def hx_shapes(config, *batch):
    """(h_0 shape, c_0 shape) for ``config``; ``batch`` is (B,) or () for unbatched input."""
    states = config["num_layers"] * (2 if config["bidirectional"] else 1)
    return (states, *batch, config.get("proj_size") or config["hidden_size"]), (states, *batch, config["hidden_size"])


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_lstm_forward_and_gradients_match_torch(backend, proj):
    """Batched (both layouts), unbatched, with and without hx, 1-3 layers, dropout in eval mode; with ``proj`` a
    proj_size (torch's weights loaded, every gradient weight_hr's included)."""
    draw = Draw()
    for unbatched in (False, True, False):
        config = draw_config(draw, proj)
        stock, fast = lstm_pair(draw, **config)
        stock.eval(), fast.eval()
        B, T = draw.int(1, 4), draw.int(1, 12)
        if unbatched:
            x, (h_shape, c_shape) = draw.randn(T, config["input_size"]), hx_shapes(config)
        else:
            shape = (B, T) if config["batch_first"] else (T, B)
            x, (h_shape, c_shape) = draw.randn(*shape, config["input_size"]), hx_shapes(config, B)
        hx = draw.choice((None, (draw.randn(*h_shape), draw.randn(*c_shape))))
        what = f"{config} unbatched={unbatched} x={tuple(x.shape)} hx={hx is not None} {draw.tag()}"

        def run(module, x=x, hx=hx):
            inputs = [x.clone().requires_grad_()] + ([] if hx is None else [h.clone().requires_grad_() for h in hx])
            with fastmsc.use_backend(backend):
                out, (h_n, c_n) = module(inputs[0], None if hx is None else tuple(inputs[1:]))
            outs = (out, h_n, c_n)
            cot = [torch.cos(torch.arange(o.numel(), dtype=o.dtype)).reshape(o.shape) for o in outs]
            return outs, grads_of(outs, inputs + list(module.parameters()), cot)

        (want, want_grads), (got, got_grads) = run(stock), run(fast)
        for name, a, b in zip(("output", "h_n", "c_n"), got, want, strict=True):
            assert a.shape == b.shape, f"{name} shape {tuple(a.shape)} != {tuple(b.shape)}: {what}"
            assert_close(a, b, f"{name} {what}", **TOL)
        for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
            assert_close(a, b, f"gradient {i} (input, hx, then parameters) {what}", **TOL)


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_lstm_packed_sequence_in_packed_sequence_out(backend, enforce_sorted, proj):
    draw = Draw()
    config = draw_config(draw, proj, batch_first=draw.choice((True, False)))
    stock, fast = lstm_pair(draw, **config)
    stock.eval(), fast.eval()
    B, T = draw.int(2, 5), draw.int(2, 12)
    lengths = draw.lengths(B, T, "mixed")
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    x = draw.randn(B, T, config["input_size"])
    h_shape, c_shape = hx_shapes(config, B)
    hx = draw.choice((None, (draw.randn(*h_shape), draw.randn(*c_shape))))  # in the caller's batch order
    what = f"{config} lengths={lengths.tolist()} enforce_sorted={enforce_sorted} hx={hx is not None} {draw.tag()}"

    def run(module):
        leaves = [x.clone().requires_grad_()] + ([] if hx is None else [h.clone().requires_grad_() for h in hx])
        padded = leaves[0] if config["batch_first"] else leaves[0].transpose(0, 1)
        packed = pack_padded_sequence(padded, lengths, batch_first=config["batch_first"], enforce_sorted=enforce_sorted)
        with fastmsc.use_backend(backend):
            out, (h_n, c_n) = module(packed, None if hx is None else tuple(leaves[1:]))
        cot = [torch.sin(torch.arange(o.numel(), dtype=o.dtype)).reshape(o.shape) for o in (out.data, h_n, c_n)]
        return out, h_n, c_n, grads_of((out.data, h_n, c_n), [*leaves, *module.parameters()], cot)

    want, got = run(stock), run(fast)
    assert isinstance(got[0], nn.utils.rnn.PackedSequence), what
    assert torch.equal(got[0].batch_sizes, want[0].batch_sizes), what
    for field in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(got[0], field), getattr(want[0], field)
        assert (a is None and b is None) or torch.equal(a, b), f"{field}: {what}"
    for name, a, b in zip(("output", "h_n", "c_n"), (got[0].data, *got[1:3]), (want[0].data, *want[1:3]), strict=True):
        assert_close(a, b, f"{name} {what}", **TOL)
    for i, (a, b) in enumerate(zip(got[3], want[3], strict=True)):
        assert_close(a, b, f"gradient {i} (input, hx, then parameters) {what}", **TOL)


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_lstm_lengths_equals_packing(backend, proj):
    """forward(padded, lengths=L) gives nn.LSTM's packed result, padded with zeros; outputs and every gradient."""
    draw = Draw()
    config = draw_config(draw, proj, batch_first=True, num_layers=2, bidirectional=True)
    stock, fast = lstm_pair(draw, **config)
    stock.eval(), fast.eval()
    B, T = draw.int(2, 5), draw.int(2, 12)
    lengths, x = draw.lengths(B, T, "mixed"), draw.randn(B, T, config["input_size"])
    h_shape, c_shape = hx_shapes(config, B)
    hx = (draw.randn(*h_shape), draw.randn(*c_shape))

    def run(module, packed):
        leaves = [t.clone().requires_grad_() for t in (x, *hx)]
        if packed:
            out, (h_n, c_n) = module(pack_padded_sequence(leaves[0], lengths, batch_first=True, enforce_sorted=False),
                                     tuple(leaves[1:]))
            out = pad_packed_sequence(out, batch_first=True, total_length=T)[0]
        else:
            with fastmsc.use_backend(backend):
                out, (h_n, c_n) = module(leaves[0], tuple(leaves[1:]), lengths=lengths)
        cot = [torch.cos(torch.arange(o.numel(), dtype=o.dtype)).reshape(o.shape) for o in (out, h_n, c_n)]
        return (out, h_n, c_n), grads_of((out, h_n, c_n), [*leaves, *module.parameters()], cot)

    (want, want_grads), (got, got_grads) = run(stock, True), run(fast, False)
    what = f"{config} lengths={lengths.tolist()} {draw.tag()}"
    for name, a, b in zip(("output", "h_n", "c_n"), got, want, strict=True):
        assert_close(a, b, f"{name} {what}", **TOL)
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close(a, b, f"gradient {i} (input, hx, then parameters) {what}", **TOL)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_lstm_projection_loads_torch_state_and_matches_every_output_and_gradient(backend, num_layers, bidirectional):
    """proj_size on every layer count and direction: torch's state_dict loaded into ours, then padded input with
    hx, a PackedSequence and ``lengths`` each give torch's outputs and gradients (input, hx, every parameter)."""
    draw = Draw()
    H = draw.int(2, 7)
    config = {"input_size": draw.int(1, 6), "hidden_size": H, "proj_size": draw.int(1, H - 1),
              "num_layers": num_layers, "bidirectional": bidirectional, "batch_first": draw.choice((True, False)),
              "bias": draw.choice((True, False))}
    stock = nn.LSTM(**config, dtype=torch.float64)
    fast = LSTM(**config, dtype=torch.float64)
    fast.load_state_dict(stock.state_dict())
    assert list(fast.state_dict()) == list(stock.state_dict()) == stock._flat_weights_names
    B, T = draw.int(2, 5), draw.int(2, 10)
    lengths = draw.lengths(B, T, "mixed")
    x = draw.randn(B, T, config["input_size"])  # batch first; transposed below when the modules are not
    hx = tuple(draw.randn(*shape) for shape in hx_shapes(config, B))

    def run(module, mode):
        leaves = [t.clone().requires_grad_() for t in (x, *hx)]
        inp = leaves[0] if config["batch_first"] else leaves[0].transpose(0, 1)
        with fastmsc.use_backend(backend):
            if mode == "padded":
                out, (h_n, c_n) = module(inp, tuple(leaves[1:]))
            elif mode == "packed" or module is stock:
                packed = pack_padded_sequence(inp, lengths, batch_first=config["batch_first"], enforce_sorted=False)
                out, (h_n, c_n) = module(packed, tuple(leaves[1:]))
                out = pad_packed_sequence(out, batch_first=config["batch_first"], total_length=T)[0]
            else:
                out, (h_n, c_n) = module(inp, tuple(leaves[1:]), lengths=lengths)
        outs = (out, h_n, c_n)
        cot = [torch.sin(torch.arange(o.numel(), dtype=o.dtype)).reshape(o.shape) for o in outs]
        return outs, grads_of(outs, [*leaves, *module.parameters()], cot)

    for mode in ("padded", "packed", "lengths"):
        what = f"{mode} {config} lengths={lengths.tolist()} {draw.tag()}"
        (want, want_grads), (got, got_grads) = run(stock, mode), run(fast, mode)
        for name, a, b in zip(("output", "h_n", "c_n"), got, want, strict=True):
            assert a.shape == b.shape, f"{name} shape {tuple(a.shape)} != {tuple(b.shape)}: {what}"
            assert_close(a, b, f"{name} {what}", **TOL)
        for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
            assert_close(a, b, f"gradient {i} (input, h_0, c_0, then parameters) {what}", **TOL)


def test_lstm_dropout_only_between_layers_in_training():
    draw = Draw()
    stock, fast = lstm_pair(draw, input_size=3, hidden_size=4, num_layers=2, dropout=0.5)
    x = draw.randn(5, 2, 3)
    fast.train()
    first = fast(x)[0]
    assert not torch.equal(first, fast(x)[0]), "dropout between layers must be random in training mode"
    fast.eval(), stock.eval()
    assert_close(fast(x)[0], stock(x)[0], "eval mode: no dropout", **TOL)
    single_stock, single_fast = lstm_pair(draw, input_size=3, hidden_size=4, num_layers=1)
    single_stock.train(), single_fast.train()
    assert_close(single_fast(x)[0], single_stock(x)[0], "one layer in training mode", **TOL)


CONSTRUCTOR_MISUSE = [
    dict(bias="True"), dict(batch_first="False"), dict(input_size=3.0), dict(input_size=0), dict(hidden_size=0),
    dict(hidden_size=4.0), dict(num_layers=0), dict(num_layers=2.0), dict(dropout=1.5), dict(dropout=True),
    dict(dropout="0.1"), dict(proj_size=-1), dict(proj_size=4),
]


@pytest.mark.parametrize("overrides", CONSTRUCTOR_MISUSE, ids=lambda d: ",".join(f"{k}={v!r}" for k, v in d.items()))
def test_lstm_constructor_misuse_raises_what_torch_raises(overrides):
    arguments = {"input_size": 3, "hidden_size": 4, **overrides}
    with pytest.raises(Exception) as theirs:
        nn.LSTM(**arguments)
    with pytest.raises(theirs.type) as ours:
        LSTM(**arguments)
    assert type(ours.value) is theirs.type, (ours.value, theirs.value)


def test_lstm_dropout_on_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        LSTM(3, 4, dropout=0.5)


FORWARD_MISUSE = {  # name -> (batch_first, input shape, hx shapes or None, input dtype, hx dtype)
    "4-D input": (True, (1, 2, 5, 3), None, torch.float32, None),
    "1-D input": (True, (3,), None, torch.float32, None),
    "wrong input size": (True, (2, 5, 2), None, torch.float32, None),
    "input dtype": (True, (2, 5, 3), None, torch.float64, None),
    "h_0 shape": (True, (2, 5, 3), ((1, 2, 4), (2, 2, 4)), torch.float32, torch.float32),
    "c_0 shape": (True, (2, 5, 3), ((2, 2, 4), (2, 3, 4)), torch.float32, torch.float32),
    "2-D hx for batched input": (True, (2, 5, 3), ((2, 4), (2, 4)), torch.float32, torch.float32),
    "3-D hx for unbatched input": (True, (5, 3), ((2, 1, 4), (2, 1, 4)), torch.float32, torch.float32),
    "hx dtype": (True, (2, 5, 3), ((2, 2, 4), (2, 2, 4)), torch.float32, torch.float64),
    "zero steps": (False, (0, 2, 3), None, torch.float32, None),
}


@pytest.mark.parametrize("misuse", list(FORWARD_MISUSE))
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_lstm_forward_misuse_raises_what_torch_raises(misuse, backend):
    """Code written against torch.nn.LSTM catches the class torch raises; ours raises the same (with its own,
    clearer message)."""
    batch_first, shape, hx_shapes, dtype, hx_dtype = FORWARD_MISUSE[misuse]
    torch_lstm = nn.LSTM(3, 4, num_layers=2, batch_first=batch_first)
    ours_lstm = LSTM(3, 4, num_layers=2, batch_first=batch_first)
    x = torch.randn(shape, dtype=dtype)
    hx = None if hx_shapes is None else tuple(torch.zeros(s, dtype=hx_dtype) for s in hx_shapes)
    with pytest.raises(Exception) as theirs:
        torch_lstm(x, hx)
    with fastmsc.use_backend(backend), pytest.raises(theirs.type) as ours:
        ours_lstm(x, hx)
    assert type(ours.value) is theirs.type, (ours.value, theirs.value)


def test_lstm_messages_name_what_was_expected_and_given():
    lstm = LSTM(3, 4, num_layers=2, batch_first=True)
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 3, got 2"):
        lstm(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match=r"expected input to be a 2-D \(unbatched\) or 3-D tensor"):
        lstm(torch.randn(5))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 4\), got \(1, 2, 4\)"):
        lstm(torch.randn(2, 5, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(RuntimeError, match=r"hx should be a tuple \(h_0, c_0\), not one tensor"):
        lstm(torch.randn(2, 5, 3), torch.zeros(2, 2, 4))
    with pytest.raises(IndexError, match=r"hx should be a tuple \(h_0, c_0\) of two tensors, got a tuple of 1"):
        lstm(torch.randn(2, 5, 3), (torch.zeros(2, 2, 4),))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        lstm(torch.randn(2, 5, 3), lengths=[6, 1])
    projected = LSTM(3, 4, num_layers=2, batch_first=True, proj_size=2)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 2\), got \(2, 2, 4\): h_0 is "
                                           r"\(layers\*directions, batch, proj_size\)"):
        projected(torch.randn(2, 5, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 2, 4\), got \(2, 2, 2\)"):
        projected(torch.randn(2, 5, 3), (torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_lstm_exposes_all_weights_and_flat_weights_like_torch(bias, proj_size):
    theirs = nn.LSTM(3, 4, num_layers=2, bidirectional=True, bias=bias, proj_size=proj_size)
    ours = LSTM(3, 4, num_layers=2, bidirectional=True, bias=bias, proj_size=proj_size)
    ours.load_state_dict(theirs.state_dict())
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert all(torch.equal(a, b) for a, b in zip(ours._flat_weights, theirs._flat_weights, strict=True))
    assert [[tuple(p.shape) for p in group] for group in ours.all_weights] == \
        [[tuple(p.shape) for p in group] for group in theirs.all_weights]
    assert all(p is getattr(ours, name) for p, name in zip(ours._flat_weights, ours._flat_weights_names, strict=True))


# ---------------------------------------------------------------- swap_modules


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 3)
        self.encoder = nn.Sequential(nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True))
        self.head = nn.LSTM(8, 5)

    def forward(self, x):
        h, _ = self.encoder[0](self.embed(x))
        return self.head(h.transpose(0, 1))[0]


def test_swap_modules_replaces_nested_lstms_keeping_weights():
    draw = Draw()
    model = Tagger().double().eval()
    x = draw.randn(3, 6, 2)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert fastmsc.swap_modules(model) is model
    assert isinstance(model.encoder[0], LSTM) and isinstance(model.head, LSTM)
    assert model.encoder[0].bidirectional and model.encoder[0].batch_first and model.encoder[0].num_layers == 2
    assert not model.head.training and all(p.dtype == torch.float64 for p in model.parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for backend in MODULE_BACKENDS:
        with fastmsc.use_backend(backend):
            assert_close(model(x), before, f"swapped model, backend {backend} {draw.tag()}", **TOL)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_swap_modules_replaces_projected_lstms_keeping_weights_and_results(bidirectional):
    draw = Draw()
    stock = nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=bidirectional, dtype=torch.float64)
    model = nn.Sequential(stock)
    x = draw.randn(6, 2, 3)
    before, state = stock(x), {k: v.clone() for k, v in stock.state_dict().items()}
    fastmsc.swap_modules(model)
    fast = model[0]
    assert isinstance(fast, LSTM) and fast.proj_size == 2, fast
    assert list(fast.state_dict()) == list(state)
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in state.items())
    after = fast(x)
    for name, a, b in (("output", after[0], before[0]), ("h_n", after[1][0], before[1][0]),
                       ("c_n", after[1][1], before[1][1])):
        assert_close(a, b, f"{name} bidirectional={bidirectional} {draw.tag()}", **TOL)


def test_swap_modules_errors():
    with pytest.raises(TypeError, match=r"swap_modules replaces LSTMs inside a model"):
        fastmsc.swap_modules(nn.LSTM(2, 3))


class ForecastingLSTM(nn.LSTM):
    """A client library's subclass whose forward takes an extra argument (as pytorch-forecasting's does)."""

    def forward(self, x, hx=None, enforce_sorted=True):
        return super().forward(x, hx)


class WeightDropout(nn.Module):
    """fastai's pattern: the raw weight lives on the wrapper and the LSTM's parameter is deleted, then set as a
    plain tensor before every forward."""

    def __init__(self, lstm, p=0.5):
        super().__init__()
        self.module, self.p = lstm, p
        self.weight_hh_l0_raw = nn.Parameter(lstm.weight_hh_l0.detach().clone())
        del lstm._parameters["weight_hh_l0"]

    def forward(self, x):
        self.module.weight_hh_l0 = nn.functional.dropout(self.weight_hh_l0_raw, self.p, self.training)
        return self.module(x)


def test_swap_modules_leaves_subclasses_rewired_and_hooked_lstms_and_says_why(caplog):
    hooked = nn.LSTM(3, 4)
    hooked.register_forward_hook(lambda module, args, out: out)
    model = nn.ModuleDict({
        "plain": nn.LSTM(3, 4), "sub": ForecastingLSTM(3, 4), "dropped": WeightDropout(nn.LSTM(3, 4)),
        "hooked": hooked, "projected": nn.LSTM(3, 4, proj_size=2),
    })
    before = {name: type(module) for name, module in model.named_modules()}
    with caplog.at_level("INFO", logger="fastmsc"):
        assert fastmsc.swap_modules(model) is model
    assert isinstance(model["plain"], LSTM) and isinstance(model["projected"], LSTM)
    for name in ("sub", "dropped.module", "hooked"):
        assert type(model.get_submodule(name)) is before[name], name
    messages = [r.getMessage() for r in caplog.records]
    assert "swap_modules: replaced 2 torch.nn.LSTM by fastmsc.nn.LSTM: plain, projected" in messages
    reasons = {"sub": "subclass of torch.nn.LSTM", "dropped.module": "parameters were rewired (missing weight_hh_l0",
               "hooked": "it has hooks (_forward_hooks)"}
    for path, reason in reasons.items():
        assert any(m.startswith(f"swap_modules: left {path} as it is: ") and reason in m for m in messages), messages
    # The models left alone still run as before.
    x = torch.randn(5, 2, 3)
    model["sub"](x, enforce_sorted=False)
    model["dropped"](x)


# ---------------------------------------------------------------- SelfAttention, MaxAvgPool1d


def split_heads(t, num_heads):
    """(B, T, E) -> (B, heads, T, E / heads)."""
    return t.view(*t.shape[:2], num_heads, -1).transpose(1, 2)


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_self_attention_matches_explicit_math(backend):
    draw = Draw()
    for num_heads, out_proj in ((1, False), (draw.int(2, 3), True)):
        head_dim = draw.int(1, 5)
        E, B, T = num_heads * head_dim, draw.int(1, 3), draw.int(1, 10)
        module = SelfAttention(E, num_heads, out_proj=out_proj).double()
        x, lengths = draw.randn(B, T, E), draw.lengths(B, T, draw.choice((None, "mixed")))
        with fastmsc.use_backend(backend):
            got = module(x, lengths)
        q, k, v = (split_heads(proj(x), num_heads) for proj in (module.query, module.key, module.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if lengths is not None:
            scores = scores.masked_fill(torch.arange(T)[None, None, None, :] >= lengths[:, None, None, None], -math.inf)
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, E)
        if lengths is not None:
            want = want.masked_fill(torch.arange(T)[None, :, None] >= lengths[:, None, None], 0.0)
        if out_proj:
            want = module.out_proj(want)
        what = f"heads={num_heads} E={E} B={B} T={T} lengths={lengths} {draw.tag()}"
        assert_close(got, want, what, **TOL)


def test_self_attention_errors():
    with pytest.raises(ValueError, match=r"embed_dim must be a positive multiple of num_heads"):
        SelfAttention(10, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 8\)"):
        SelfAttention(8, 2)(torch.randn(2, 5, 6))


def test_max_avg_pool1d_is_the_op():
    draw = Draw()
    x, lengths = draw.randn(3, 7, 4), draw.lengths(3, 7, "mixed")
    got = MaxAvgPool1d()(x, lengths)
    want = torch.stack([torch.cat([x[b, :L].amax(0), x[b, :L].mean(0)]) for b, L in enumerate(lengths.tolist())])
    assert_close(got, want, f"lengths={lengths.tolist()} {draw.tag()}", **TOL)
