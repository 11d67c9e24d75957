"""MSCClassifier: the backends agree in float64 (logits and every parameter gradient), with and without
lengths, and lengths really cut each sequence (padding content never changes its logits)."""

from __future__ import annotations

import pytest
import torch
from _helpers import Draw, assert_close

import fastmsc
from fastmsc.models import MSCClassifier

TOL = {"rtol": 1e-9, "atol": 1e-10}  # float64 on both sides, through ~10 layers


def small_model(draw: Draw, **overrides) -> tuple[MSCClassifier, dict]:
    config = {
        "in_channels": draw.int(1, 3), "num_classes": draw.int(2, 4), "conv_channels": draw.int(1, 4),
        "kernel_sizes": (3, 5, 7), "lstm_hidden": draw.int(2, 6), "lstm_layers": draw.int(1, 2),
        "num_heads": draw.choice((1, 2)), "classifier_hidden": draw.int(2, 6), "dropout": 0.0,
        "conv_norm": draw.choice((True, False)),
    }
    config.update(overrides)
    torch.manual_seed(draw.seed)  # the weights follow the test's seed too, so that a replay rebuilds this model
    model = MSCClassifier(**config).double()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BatchNorm does something
        if model.conv_norm is not None:
            model.conv_norm.running_mean.uniform_(-0.5, 0.5)
            model.conv_norm.running_var.uniform_(0.5, 2.0)
    return model, config


def logits_and_gradients(model, x, lengths, backend, cotangent):
    leaf = x.clone().requires_grad_()
    with fastmsc.use_backend(backend):
        logits = model(leaf, lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    return logits, torch.autograd.grad(logits, [leaf, *params], cotangent, allow_unused=True)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("lengths_mode", [None, "mixed"], ids=["no_lengths", "lengths"])
def test_backends_agree_on_logits_and_all_gradients(lengths_mode, training):
    """reference vs torch (and vs auto, which takes the fused path where supported) in float64.
    Training mode uses batch statistics in BatchNorm; dropout is 0 so the runs are deterministic."""
    draw = Draw()
    model, config = small_model(draw)
    model.train(training)
    B, T = draw.int(2, 4), draw.int(1, 14)
    x, lengths = draw.randn(B, config["in_channels"], T), draw.lengths(B, T, lengths_mode)
    cotangent = draw.randn(B, config["num_classes"])
    what = f"{config} B={B} T={T} lengths={lengths} training={training} {draw.tag()}"
    want, want_grads = logits_and_gradients(model, x, lengths, "reference", cotangent)
    names = ["x"] + [n for n, p in model.named_parameters() if p.requires_grad]
    for backend in ("torch", "auto"):
        got, got_grads = logits_and_gradients(model, x, lengths, backend, cotangent)
        assert got.shape == (B, config["num_classes"])
        assert_close(got, want, f"logits, backend {backend}: {what}", **TOL)
        for name, a, b in zip(names, got_grads, want_grads, strict=True):
            assert a is not None and b is not None, f"no gradient for {name}: {what}"
            assert_close(a, b, f"gradient of {name}, backend {backend}: {what}", **TOL)


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_lengths_cut_each_sequence(backend):
    """In eval mode each sample's logits with lengths equal those of the sample alone, truncated to its
    length; garbage past the length changes nothing; without lengths the padding does count."""
    draw = Draw()
    model, config = small_model(draw)
    model.eval()
    B, T = draw.int(3, 4), draw.int(8, 16)
    lengths = draw.lengths(B, T, "mixed")
    x = draw.randn(B, config["in_channels"], T)
    garbage = x.clone()
    for b, L in enumerate(lengths.tolist()):
        garbage[b, :, L:] = 50 * draw.randn(config["in_channels"], T - L)
    what = f"{config} lengths={lengths.tolist()} {draw.tag()}"
    with fastmsc.use_backend(backend), torch.no_grad():
        logits = model(x, lengths)
        assert_close(model(garbage, lengths), logits, f"padding changed the logits: {what}", **TOL)
        for b, L in enumerate(lengths.tolist()):
            alone = model(x[b:b + 1, :, :L])
            assert_close(logits[b:b + 1], alone, f"sample {b} vs itself truncated: {what}", **TOL)
        unmasked = model(garbage)
    cut = lengths < T
    assert not torch.allclose(unmasked[cut], logits[cut]), f"without lengths the padding must count: {what}"


def test_default_configuration_runs_in_float32():
    model = MSCClassifier(in_channels=2, num_classes=3).eval()
    x = torch.randn(2, 2, 24)
    with torch.no_grad():
        logits = model(x, lengths=torch.tensor([24, 9]))
    assert logits.shape == (2, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_model_errors():
    model = MSCClassifier(in_channels=2, num_classes=3, conv_channels=2, lstm_hidden=3, classifier_hidden=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, T\), got \(2, 3, 10\)"):
        model(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, T\)"):
        model(torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 10\]"):
        model(torch.randn(2, 2, 10), lengths=[11, 3])
    with pytest.raises(TypeError, match=r"lengths must hold integers"):
        model(torch.randn(2, 2, 10), lengths=torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match=r"num_classes must be >= 2"):
        MSCClassifier(in_channels=2, num_classes=1)
