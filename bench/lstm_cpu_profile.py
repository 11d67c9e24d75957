"""CPU speed and saved-for-backward memory of fastmsc's fused LSTM against torch.nn.LSTM (oneDNN).

Bidirectional, one layer, float32, batch first; both models hold the same weights and run in the same
process, interleaved, so machine load affects both alike. Prints one row per (B, T, I, H): median
milliseconds of a training step (forward + backward) and of inference (no grad), the ratios
(torch / fastmsc, > 1 means fastmsc is faster) and the bytes autograd saves for backward. The load average
is printed before and after: with other processes on the cores (load near or above the thread count) both
sides slow down unevenly (oneDNN's per-step thread barriers suffer most), so only quiet runs are comparable.

    python bench/lstm_cpu_profile.py [--threads 2] [--reps 7] [--profile]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from lstm_cpu_grid import inference_step, training_step  # bench/, the script's own folder

import fastmsc
from fastmsc.bench import saved_tensor_bytes
from fastmsc.nn import LSTM

SHAPES = ((32, 150, 192, 128), (64, 512, 96, 64), (8, 1000, 64, 64), (32, 24, 32, 32))


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(shape, reps: int) -> dict:
    B, T, n_in, H = shape
    reference = torch.nn.LSTM(n_in, H, batch_first=True, bidirectional=True)
    fast = LSTM(n_in, H, batch_first=True, bidirectional=True)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(B, T, n_in, requires_grad=True)

    def train(model):
        return training_step(model, x)

    def infer(model):
        return inference_step(model, x)

    row = {"shape": shape}
    with fastmsc.use_backend("fused"):
        for kind, make in (("train", train), ("infer", infer)):
            steps = {"torch": make(reference), "fastmsc": make(fast)}
            for fn in steps.values():  # warm-up (first-call allocations, oneDNN primitive creation)
                fn()
            samples = {name: [] for name in steps}
            for _ in range(reps):  # interleave so that load changes hit both
                for name, fn in steps.items():
                    samples[name].append(timed(fn, 1))
            for name in steps:
                row[f"{kind}_{name}"] = statistics.median(samples[name])
        row["saved_torch"] = saved_tensor_bytes(reference, x, exclude=reference.parameters())
        row["saved_fastmsc"] = saved_tensor_bytes(fast, x, exclude=fast.parameters())
    return row


def profile(shape) -> None:
    B, T, n_in, H = shape
    fast = LSTM(n_in, H, batch_first=True, bidirectional=True)
    x = torch.randn(B, T, n_in, requires_grad=True)
    with fastmsc.use_backend("fused"), torch.profiler.profile() as prof:
        for _ in range(3):
            out, _ = fast(x)
            out.sum().backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = lambda: ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bidirectional fp32, median of {args.reps}; "
          f"load average {load()}")
    print(f"{'B,T,I,H':<18} {'train torch':>11} {'train fast':>10} {'ratio':>6} {'infer torch':>11} "
          f"{'infer fast':>10} {'ratio':>6} {'saved torch':>12} {'saved fast':>11}")
    train_ratios, infer_ratios = [], []
    for shape in SHAPES:
        r = measure(shape, args.reps)
        tr, ir = r["train_torch"] / r["train_fastmsc"], r["infer_torch"] / r["infer_fastmsc"]
        train_ratios.append(tr)
        infer_ratios.append(ir)
        print(f"{str(shape):<18} {r['train_torch']:>9.2f}ms {r['train_fastmsc']:>8.2f}ms {tr:>5.2f}x "
              f"{r['infer_torch']:>9.2f}ms {r['infer_fastmsc']:>8.2f}ms {ir:>5.2f}x "
              f"{r['saved_torch'] / 2**20:>10.2f}MB {r['saved_fastmsc'] / 2**20:>9.2f}MB")
        if args.profile:
            profile(shape)
    geo = lambda v: math.exp(sum(map(math.log, v)) / len(v))
    print(f"geomean speed-up: train {geo(train_ratios):.2f}x (min {min(train_ratios):.2f}x), "
          f"infer {geo(infer_ratios):.2f}x (min {min(infer_ratios):.2f}x); load average {load()}")


if __name__ == "__main__":
    main()
