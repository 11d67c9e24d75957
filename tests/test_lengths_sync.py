"""``lengths`` are validated once per forward: a model's entry reads their values at most once (one host sync
for CUDA lengths), and the inner ops and layers get a ValidLengths they never read again.

What is counted: host reads of ``lengths`` or of any tensor fastmsc derives from it (``.to``, masks), i.e.
``.item()``, ``.tolist()``, ``int()``/``float()``/``bool()``/``index()``, ``.cpu()``, ``.numpy()``, made by
fastmsc's own code (the calling frame is a file of the fastmsc package). A ``.min()`` or ``.max()`` stays on the
device: a range check counts through the transfer that reads its result, so ``int(lengths.min()),
int(lengths.max())`` counts 2 and one ``.tolist()`` of both bounds 1. Reads made inside triton (the CPU
interpreter copying kernel arguments, which on a GPU read device memory without a sync) or inside torch are not
fastmsc's and are not counted. The torch backend's LSTM is left out: with lengths it packs the batch
(pack_padded_sequence needs the lengths on the CPU), a copy torch's own nn.LSTM makes the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastmsc
from fastmsc.backend import OPS
from fastmsc.models import MSCClassifier
from fastmsc.nn import LSTM
from fastmsc.ops import ValidLengths, validate_lengths

PACKAGE = str(Path(fastmsc.__file__).resolve().parent)
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


class CountingLengths(torch.Tensor):
    """Lengths that log each host read fastmsc's code makes of them or of tensors derived from them."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            caller = sys._getframe(1).f_code.co_filename
            if str(Path(caller).resolve()).startswith(PACKAGE):
                cls.reads.append(f"{getattr(func, '__name__', func)} in {Path(caller).name}")
        return super().__torch_function__(func, types, args, kwargs)


def counting(values) -> CountingLengths:
    CountingLengths.reads = []
    return torch.tensor(values).as_subclass(CountingLengths)


def _backends() -> list[str]:
    """auto, and fused where every op's fused path can run on CPU here (Triton interpreter, LSTM extension)."""
    backends = ["auto"]
    with fastmsc.use_backend("fused"):
        if all(op.why_not_fused("cpu") is None for op in OPS.values()):
            backends.append("fused")
    return backends


@pytest.mark.parametrize("backend", _backends())
def test_msc_classifier_reads_lengths_once(backend):
    torch.manual_seed(0)
    model = MSCClassifier(3, 4, conv_channels=4, kernel_sizes=(3, 5), lstm_hidden=4, lstm_layers=2, num_heads=2,
                          classifier_hidden=6, dropout=0.0).eval()
    x = torch.randn(3, 3, 7)
    lengths = counting([7, 3, 5])
    with fastmsc.use_backend(backend), torch.no_grad():
        logits = model(x, lengths)
    assert len(CountingLengths.reads) <= 1, CountingLengths.reads
    with fastmsc.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(logits, model(x, torch.tensor([7, 3, 5])))


@pytest.mark.parametrize("backend", _backends())
def test_two_layer_lstm_reads_lengths_once(backend):
    torch.manual_seed(0)
    lstm = LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(3, 6, 3, requires_grad=True)
    lengths = counting([6, 2, 4])
    with fastmsc.use_backend(backend):
        out, (h_n, c_n) = lstm(x, lengths=lengths)
        (out.sum() + h_n.sum() + c_n.sum()).backward()
    assert len(CountingLengths.reads) <= 1, CountingLengths.reads


def test_the_counter_sees_each_op_validating_its_own_lengths():
    """The public ops keep validating: each reads plain lengths once, and none reads a ValidLengths."""
    x = torch.randn(3, 6, 4)
    lengths = counting([6, 2, 4])
    fastmsc.max_avg_pool(x, lengths)
    fastmsc.attention(x, x, x, lengths)
    assert len(CountingLengths.reads) == 2, CountingLengths.reads
    valid = validate_lengths(counting([6, 2, 4]), 3, 6, x.device)
    assert len(CountingLengths.reads) == 1, CountingLengths.reads
    fastmsc.max_avg_pool(x, valid)
    fastmsc.attention(x, x, x, valid)
    assert len(CountingLengths.reads) == 1, CountingLengths.reads


def test_valid_lengths_must_fit_the_call():
    valid = validate_lengths(torch.tensor([6, 2, 4]), 3, 6, torch.device("cpu"))
    assert isinstance(valid, ValidLengths) and valid.max_len == 6 and valid.tensor.dtype == torch.int64
    assert validate_lengths(valid, 3, 6, torch.device("cpu")) is valid
    assert validate_lengths(None, 3, 6, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="cannot serve a batch of 2"):
        fastmsc.max_avg_pool(torch.randn(2, 6, 4), valid)
    with pytest.raises(ValueError, match="cannot serve a batch of 3 with 5 steps"):
        fastmsc.max_avg_pool(torch.randn(3, 5, 4), valid)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 6\]"):
        validate_lengths(torch.tensor([7, 2, 4]), 3, 6, torch.device("cpu"))
