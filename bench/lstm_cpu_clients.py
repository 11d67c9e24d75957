"""CPU training step of client-style LSTM classifiers, stock against swapped (``fastmsc.swap_modules``).

The models are built like the client libraries build them (tsai's LSTM and LSTM_FCN defaults):

* ``bilstm``: a 2-layer bidirectional LSTM of hidden size 100 over (64, 3, 100) series (batch, channels, steps),
  its last step into a linear head, as tsai's ``LSTM(c_in=3, c_out=10, n_layers=2, bidirectional=True)``;
* ``lstm_fcn``: tsai's ``LSTM_FCN`` with its defaults, the LSTM (hidden 100) beside three convolution blocks (128,
  256, 128 channels; kernels 7, 5, 3) and global average pooling; ``shuffle=True`` (tsai's default, from the
  paper) feeds the LSTM the 3 channels as steps of 100 features;
* ``lstm_fcn_steps``: the same with ``shuffle=False``: the LSTM runs over the 100 steps.

Each step is forward, cross-entropy, backward and AdamW. The stock model, its swapped copy (same weights) and a copy
whose LSTMs cost nothing (each answers zeros of its output's shape) alternate step by step in one process
(``fastmsc.bench.timing.time_interleaved``), so load changes fall on all alike. Printed: the median step time of each,
the ratio (stock / swapped: above 1, the swapped model is faster) and the bound (stock / no LSTM): the most any LSTM
implementation can speed that model's step up, since the rest of the step stays as it is (the copy also skips the
LSTM parameters' optimizer update, which makes the bound, if anything, generous).

    python bench/lstm_cpu_clients.py [--threads 1 2] [--backend fused auto] [--steps 15]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

import fastmsc
from fastmsc.bench.timing import time_interleaved


class BiLSTMClassifier(nn.Module):
    """tsai's LSTM: x (B, C, T) -> LSTM over the T steps -> last step -> Linear."""

    def __init__(self, c_in: int, c_out: int, hidden: int = 100, layers: int = 2):
        super().__init__()
        self.rnn = nn.LSTM(c_in, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, c_out)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(1, 2))
        return self.fc(out[:, -1])


class LSTMFCN(nn.Module):
    """tsai's LSTM_FCN: an LSTM branch and a convolution branch (Conv-BN-ReLU x3, global average pool), concatenated
    into a Linear head. ``shuffle`` (the default there): the LSTM reads the channels as steps."""

    def __init__(self, c_in: int, c_out: int, seq_len: int, hidden: int = 100, shuffle: bool = True):
        super().__init__()
        self.shuffle = shuffle
        self.rnn = nn.LSTM(seq_len if shuffle else c_in, hidden, batch_first=True)
        blocks, channels = [], c_in
        for width, kernel in ((128, 7), (256, 5), (128, 3)):
            blocks += [nn.Conv1d(channels, width, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(width),
                       nn.ReLU()]
            channels = width
        self.fcn = nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.fc = nn.Linear(hidden + channels, c_out)

    def forward(self, x):
        out, _ = self.rnn(x if self.shuffle else x.transpose(1, 2))
        return self.fc(torch.cat([out[:, -1], self.fcn(x)], dim=1))


MODELS = {
    "bilstm": lambda: BiLSTMClassifier(3, 10),
    "lstm_fcn": lambda: LSTMFCN(3, 10, 100),
    "lstm_fcn_steps": lambda: LSTMFCN(3, 10, 100, shuffle=False),
}


class FreeLSTM(nn.Module):
    """Stands in for an nn.LSTM at no cost: zeros of the shape its output would have, no states."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.width = (lstm.proj_size or lstm.hidden_size) * (2 if lstm.bidirectional else 1)

    def forward(self, x, hx=None):
        return x.new_zeros(*x.shape[:-1], self.width), None


def without_lstms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every nn.LSTM replaced by a FreeLSTM."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LSTM):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, FreeLSTM(module))
    return model


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def measure(name: str, backend: str, threads: int, steps: int) -> tuple[float, float, float]:
    """Median step times (stock, swapped, without LSTMs) in ms."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stock = MODELS[name]()
    swapped = fastmsc.swap_modules(copy.deepcopy(stock))
    x, y = torch.randn(64, 3, 100), torch.randint(0, 10, (64,))
    runs = {"stock": training_step(stock, x, y), "swapped": training_step(swapped, x, y),
            "no LSTM": training_step(without_lstms(stock), x, y)}
    with fastmsc.use_backend(backend):
        timed = time_interleaved(runs, "cpu", repeats=steps, warmup=2)
    for label, result in timed.items():
        if isinstance(result, Exception):
            raise RuntimeError(f"{name}: the {label} model raised {result!r}") from result
    return tuple(timed[label][0].median_ms for label in runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--backend", nargs="+", default=["fused", "auto"], choices=("fused", "auto"))
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for name in args.models:
        for threads in args.threads:
            for backend in args.backend:
                stock_ms, swapped_ms, free_ms = measure(name, backend, threads, args.steps)
                print(f"{name:<15} {threads}t {backend:<5}  stock {stock_ms:8.2f} ms  swapped {swapped_ms:8.2f} ms  "
                      f"no LSTM {free_ms:8.2f} ms  bound {stock_ms / free_ms:5.2f}x  {stock_ms / swapped_ms:5.2f}x",
                      flush=True)
    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
