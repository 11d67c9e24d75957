"""CPU speed of MSCClassifier's training step with the `auto` backend against the `torch` backend.

Model defaults (conv 3x64, bidirectional LSTM of 128, one attention head), 10 classes, float32, B=32; one
model, one batch. The two backends alternate step by step in the same process, so machine load and clock
changes affect both alike (``fastmsc bench`` times each backend in a block, which on a shared machine can
swing a ratio by 20%). On CPU `auto` runs the LSTM on the compiled extension and the other ops on torch.
Prints the median step time of each backend and their ratio (torch / auto, > 1 means auto is faster), with
the load average before and after.

    python bench/model_cpu_profile.py [--threads 2] [--steps 9] [--lengths 150 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastmsc
from fastmsc.models import MSCClassifier

BACKENDS = ("torch", "auto")


def measure(T: int, steps: int, warmup: int = 2) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = MSCClassifier(3, 10)
    x, y = torch.randn(32, 3, T), torch.randint(0, 10, (32,))

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    times = {name: [] for name in BACKENDS}
    for i in range(warmup + steps):
        for name in BACKENDS:
            with fastmsc.use_backend(name):
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per backend (after 2 warm-up steps)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[150, 512], metavar="T")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = lambda: ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=32 float32, median of {args.steps} "
          f"alternating steps; load average {load()}")
    for T in args.lengths:
        times = measure(T, args.steps)
        median = {name: statistics.median(v) for name, v in times.items()}
        print(f"T={T:<5} torch {median['torch']:8.1f} ms   auto {median['auto']:8.1f} ms   "
              f"ratio {median['torch'] / median['auto']:.2f}x   (min torch {min(times['torch']):.1f}, "
              f"auto {min(times['auto']):.1f})")
    print(f"load average {load()}")


if __name__ == "__main__":
    main()
