"""torch.compile(fullgraph=True) on CPU: MSCClassifier and fastmsc.nn.LSTM trace without a graph break
under backends "torch" and "auto", with and without ``lengths``, and the compiled forward and every
gradient match eager mode.

Compiles are slow on small CPUs, so the tests are few: the aot_eager compiler (Dynamo + AOTAutograd,
the parts that decide graph breaks and trace the backward) for most, and one real inductor compile.
Everything runs in float64 so that compiled and eager results agree to rounding.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
from _helpers import Draw, assert_close

import fastmsc
from fastmsc.models import MSCClassifier
from fastmsc.nn import LSTM

# float64 on both sides; the compiled graph may reorder sums, which moves results by a few ulps only.
TOL = {"rtol": 1e-9, "atol": 1e-11}

_COMPILE_SECONDS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_recorder(graphs):
    """A torch.compile backend that keeps Dynamo's FX graphs, then runs them like "aot_eager"."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def _called_ops(graphs) -> set[str]:
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def _run(model, x, lengths, grad_of):
    """Forward + backward of a scalar loss that weighs every output differently; returns (outputs, grads)."""
    outputs = model(x, lengths=lengths)
    flat = [outputs] if isinstance(outputs, torch.Tensor) else [outputs[0], *outputs[1]]
    weights = [torch.linspace(-1.0, 2.0, o.numel(), dtype=o.dtype).view_as(o) for o in flat]
    loss = sum((o * w).sum() for o, w in zip(flat, weights, strict=True))
    grads = torch.autograd.grad(loss, grad_of)
    return [o.detach() for o in flat], grads


def _compare(compiled_result, eager_result, names, what):
    (out_c, grads_c), (out_e, grads_e) = compiled_result, eager_result
    for i, (a, b) in enumerate(zip(out_c, out_e, strict=True)):
        assert_close(a, b, f"{what}: output {i}", **TOL)
    for name, a, b in zip(names, grads_c, grads_e, strict=True):
        assert_close(a, b, f"{what}: grad of {name}", **TOL)


def _lengths(draw, batch, steps):
    """Random lengths in [1, steps] with one full-length and one length-1 sequence (batch >= 2)."""
    values = [draw.int(1, steps) for _ in range(batch)]
    values[:2] = [steps, 1]
    draw.rng.shuffle(values)
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj_size"])
def test_compiled_lstm_alone_matches_eager_and_reference(proj):
    """fastmsc.nn.LSTM (2 layers, bidirectional, with or without proj_size) under backend 'torch': the lengths
    path goes through the fastmsc::lstm_layer_packed custom op instead of breaking the graph at
    pack_padded_sequence."""
    draw = Draw()
    B, T, F, H = draw.int(3, 5), draw.int(5, 8), draw.int(2, 5), draw.int(3, 6)
    P = draw.int(1, H - 1) if proj else 0
    model = LSTM(F, H, num_layers=2, batch_first=True, bidirectional=True, proj_size=P, dtype=torch.float64)
    x = draw.randn(B, T, F).requires_grad_()
    h0 = draw.randn(4, B, P or H).requires_grad_()
    c0 = draw.randn(4, B, H).requires_grad_()
    params = list(model.parameters())
    names = ["x", "h0", "c0"] + [n for n, _ in model.named_parameters()]

    class WithState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = model

        def forward(self, x, lengths=None):
            return self.lstm(x, (h0, c0), lengths=lengths)

    wrapper = WithState()
    graphs = []
    compiled = torch.compile(wrapper, fullgraph=True, backend=_graph_recorder(graphs), dynamic=False)
    start = time.perf_counter()
    for lengths in (_lengths(draw, B, T), None):
        what = f"LSTM B={B} T={T} F={F} H={H} P={P} lengths={lengths}, {draw.tag()}"
        with fastmsc.use_backend("torch"):
            got = _run(compiled, x, lengths, [x, h0, c0, *params])
            eager = _run(wrapper, x, lengths, [x, h0, c0, *params])
        with fastmsc.use_backend("reference"):
            reference = _run(wrapper, x, lengths, [x, h0, c0, *params])
        _compare(got, eager, names, what + " (compiled vs eager)")
        _compare(got, reference, names, what + " (compiled vs reference)")
    _COMPILE_SECONDS["lstm aot_eager x2"] = time.perf_counter() - start
    assert len(graphs) == 2, f"expected one graph per lengths case, got {len(graphs)}"
    with_lengths, without = _called_ops(graphs[:1]), _called_ops(graphs[1:])
    assert "fastmsc.lstm_layer_packed" in with_lengths, with_lengths
    assert "fastmsc.lstm_layer_packed" not in without, without


def _classifier(draw, in_channels, num_classes):
    # dropout 0 so eager and compiled runs draw no random masks; train mode keeps BatchNorm's batch statistics.
    return MSCClassifier(in_channels, num_classes, conv_channels=draw.int(2, 4), lstm_hidden=draw.int(3, 5),
                         classifier_hidden=draw.int(4, 6), dropout=0.0).double().train()


@pytest.mark.parametrize(
    ("backend", "with_lengths", "compiler"),
    [
        ("torch", True, "inductor"),
        ("torch", False, "aot_eager"),
        ("auto", True, "aot_eager"),
        ("auto", False, "aot_eager"),
    ],
)
def test_compiled_classifier_matches_eager(backend, with_lengths, compiler):
    draw = Draw()
    B, C, T, K = draw.int(2, 4), draw.int(1, 3), draw.int(5, 9), draw.int(2, 4)
    eager_model = _classifier(draw, C, K)
    compiled_model = copy.deepcopy(eager_model)
    x = draw.randn(B, C, T).requires_grad_()
    lengths = _lengths(draw, B, T) if with_lengths else None
    what = f"MSCClassifier backend={backend} compiler={compiler} B={B} C={C} T={T} lengths={lengths}, {draw.tag()}"
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler, dynamic=False)
    names = ["x"] + [n for n, _ in eager_model.named_parameters()]
    with fastmsc.use_backend(backend):
        start = time.perf_counter()
        got = _run(compiled, x, lengths, [x, *compiled_model.parameters()])
        _COMPILE_SECONDS[f"classifier {backend} lengths={with_lengths} {compiler}"] = time.perf_counter() - start
        eager = _run(eager_model, x, lengths, [x, *eager_model.parameters()])
    _compare(got, eager, names, what)
    # BatchNorm's running statistics moved identically in both.
    assert_close(compiled_model.conv_norm.running_mean, eager_model.conv_norm.running_mean, what, **TOL)


FIRST_CALL_SCRIPT = """
import torch, fastmsc
from fastmsc.models import MSCClassifier
model = MSCClassifier(2, 3, conv_channels=2, lstm_hidden=3, classifier_hidden=4, dropout=0.0)
compiled = torch.compile(model, fullgraph=True, backend="eager")
x = torch.randn(3, 2, 7)
for lengths in (torch.tensor([7, 1, 4]), None):
    torch.testing.assert_close(compiled(x, lengths), model(x, lengths), rtol=1e-5, atol=1e-6)
print("first compiled call ok")
"""


def test_first_call_of_a_fresh_process_may_be_compiled():
    """Backend 'auto' in a new process whose very first model call is the compiled one: lazy set-up on
    the first call (importing kernel modules, loading the LSTM extension, registering its fake and
    autograd implementations) must not happen while Dynamo traces, or fullgraph=True fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMSC_BACKEND", "TRITON_INTERPRET")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    _COMPILE_SECONDS["fresh process, auto, Dynamo only"] = time.perf_counter() - start
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
    assert done.returncode == 0 and "first compiled call ok" in done.stdout, tail


def test_report_compile_times():
    """Prints how long each compile above took (shown with -s or -rA); runs last in this file."""
    if not _COMPILE_SECONDS:
        pytest.skip("no compile test ran in this session (deselected), so there are no times to report")
    lines = [f"  {name:<45} {seconds:6.1f} s" for name, seconds in _COMPILE_SECONDS.items()]
    print("\ncompile + first run times:\n" + "\n".join(lines) + f"\n  total {sum(_COMPILE_SECONDS.values()):.1f} s")
