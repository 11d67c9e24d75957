"""fastmsc.nn.LSTM against torch.nn.LSTM called back to back, one model at a time, as a serving or training loop calls
a layer: the grid (lstm_cpu_grid.py) interleaves the two models call by call, which keeps machine load fair but
hides what a model's own previous call leaves behind (its freed memory, its weights in cache).

Per shape and mode: a loop of calls of nn.LSTM, then one of fastmsc (same weights, batch first, ``--backend``),
each warmed up, then timed in rounds of about 0.3 s; prints the best round's milliseconds per call of each and their
ratio (> 1: fastmsc is faster). Run each build in its own process to compare builds.

    python bench/lstm_cpu_loop.py --shape 1,24,256,2 --shape 8,24,256,2 --dtype float32 --threads 1 --mode infer
"""

from __future__ import annotations

import argparse
import time

import torch
from lstm_cpu_grid import inference_step, training_step  # bench/, the script's own folder

import fastmsc
from fastmsc.nn import LSTM


def step_of(model, x, mode: str):
    if mode != "train":
        return inference_step(model, x)
    train = training_step(model, x)

    def step():  # as a training loop's zero_grad(set_to_none=True) leaves things: no gradient kept between steps
        model.zero_grad(set_to_none=True)
        x.grad = None
        train()
    return step


def best_ms(step, rounds: int) -> float:
    for _ in range(10):
        step()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        step()
        calls += 1
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", required=True, metavar="B,T,H,D",
                        help="batch, steps, hidden (= input) size, directions (1 or 2); repeat for more shapes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default="infer", choices=("infer", "train"))
    parser.add_argument("--backend", default="fused", choices=("fused", "auto"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.mode}, {args.dtype}, {args.threads} thread(s), backend {args.backend}; ms per call, best round")
    for text in args.shape:
        B, T, H, D = (int(v) for v in text.split(","))
        if D not in (1, 2):
            raise SystemExit(f"--shape {text}: D must be 1 or 2, got {D}")
        reference = torch.nn.LSTM(H, H, batch_first=True, bidirectional=D == 2).to(dtype)
        fast = LSTM(H, H, batch_first=True, bidirectional=D == 2).to(dtype)
        fast.load_state_dict(reference.state_dict())
        x = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
        with fastmsc.use_backend(args.backend):
            torch_ms = best_ms(step_of(reference, x, args.mode), args.rounds)
            fast_ms = best_ms(step_of(fast, x, args.mode), args.rounds)
        print(f"B={B} T={T} H={H} D={D}: torch {torch_ms:.4g}  fastmsc {fast_ms:.4g}  {torch_ms / fast_ms:.2f}x")


if __name__ == "__main__":
    main()
