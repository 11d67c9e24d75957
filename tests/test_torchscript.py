"""TorchScript: torch.jit.script refuses every fastmsc module, alone or inside a model, with one error that says
why and what to use instead; torch.export, which that error suggests besides torch.compile (tested in
test_compile.py), exports them."""

from __future__ import annotations

import io

import pytest
import torch
from _helpers import Draw, assert_close
from torch import nn

import fastmsc
from fastmsc.models import Classifier, MSCClassifier
from fastmsc.nn import LSTM, MaxAvgPool1d, MultiScaleConv1d, SelfAttention

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

MODULES = {
    "LSTM": (lambda: LSTM(3, 4, batch_first=True), "fastmsc.nn.lstm.LSTM"),
    "MultiScaleConv1d": (lambda: MultiScaleConv1d(3, 4), "fastmsc.nn.multiscale_conv1d.MultiScaleConv1d"),
    "SelfAttention": (lambda: SelfAttention(4, 2), "fastmsc.nn.self_attention.SelfAttention"),
    "MaxAvgPool1d": (lambda: MaxAvgPool1d(), "fastmsc.nn.max_avg_pool.MaxAvgPool1d"),
    "MSCClassifier": (lambda: MSCClassifier(3, 2, conv_channels=4, lstm_hidden=4, classifier_hidden=4),
                      "fastmsc.models.msc_classifier.MSCClassifier"),
    "Classifier": (lambda: Classifier(MSCClassifier(3, 2, conv_channels=4, lstm_hidden=4, classifier_hidden=4),
                                      ("a", "b")), "fastmsc.models.classifier.Classifier"),
    # A model of the user's own with a fastmsc module inside (as swap_modules leaves it) names the fastmsc one.
    "inside nn.Sequential": (lambda: nn.Sequential(nn.Linear(3, 3), fastmsc.swap_modules(
        nn.ModuleDict({"rnn": nn.LSTM(3, 4)}))["rnn"]), "fastmsc.nn.lstm.LSTM"),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_torch_jit_script_refuses_with_what_to_use_instead(name):
    make, qualified = MODULES[name]
    with pytest.raises(RuntimeError) as raised:
        torch.jit.script(make())
    message = str(raised.value)
    assert message.startswith(f"torch.jit.script cannot compile {qualified} (nor a model containing it)"), message
    for hint in ("Triton kernels", "custom ops", "torch.compile(model)", "torch.export.export(model, example_inputs)",
                 "torch.nn.LSTM instead of fastmsc.nn.LSTM"):
        assert hint in message, f"{hint!r} missing from: {message}"


def test_torch_nn_modules_still_script():
    """The refusal is the fastmsc modules' own: a model of torch.nn modules scripts as before."""
    torch.jit.script(nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU()))
    torch.jit.script(nn.LSTM(3, 4))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_export_of_the_classifier_matches_eager_and_round_trips(backend):
    draw = Draw()
    model = MSCClassifier(3, 2, conv_channels=4, lstm_hidden=4, classifier_hidden=4).double().eval()
    x = draw.randn(2, 3, 7)
    with fastmsc.use_backend(backend), torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
        for label, got in (("exported", program.module()(x)), ("saved and loaded", loaded.module()(x))):
            assert_close(got, want, f"{label} classifier, backend {backend} [{draw.tag()}]", rtol=1e-12, atol=1e-12)
