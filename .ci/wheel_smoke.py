"""Smoke test of an installed fastmsc wheel (run by .ci/run from outside the clone, in the venv holding the wheel).

Usage: python wheel_smoke.py VENV EXT_DIR

Fails unless fastmsc is imported from VENV's site-packages, ``fastmsc info`` would report the prebuilt extension
built for this torch, the fused LSTM (a small bidirectional float32 case with lengths, on CPU) matches the reference
backend forward and backward, the ops came from the prebuilt fastmsc._C, and nothing was compiled into EXT_DIR
(the FASTMSC_EXT_DIR of this run).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path


def fail(message: str) -> None:
    raise SystemExit(f"wheel smoke test: {message}")


def main(venv: Path, ext_dir: Path) -> None:
    if Path(os.environ.get("FASTMSC_EXT_DIR", "")).resolve() != ext_dir:
        fail(f"FASTMSC_EXT_DIR must be {ext_dir}, so that a JIT build would show there")
    if any(ext_dir.iterdir()):
        fail(f"{ext_dir} is not empty before the test")

    import torch

    import fastmsc
    from fastmsc import _extension

    site = Path(sysconfig.get_paths()["platlib"]).resolve()
    where = Path(fastmsc.__file__).resolve()
    if not where.is_relative_to(site) or not site.is_relative_to(venv):
        fail(f"fastmsc imported from {where}, not from the site-packages of {venv} ({site})")
    print(f"fastmsc {fastmsc.__version__} from {where.parent}")

    described = _extension.describe()
    print(f"lstm_extension: {described}")
    expected = f"prebuilt fastmsc._C (built for torch {torch.__version__}, "
    if not described.startswith(expected):
        fail(f"expected the extension described as {expected!r}..., got {described!r}")

    torch.manual_seed(0)
    B, T, n_in, H, D = 3, 7, 4, 5, 2
    x = torch.randn(B, T, n_in, requires_grad=True)
    weights = tuple(tuple((torch.randn(*shape) * 0.4).requires_grad_() for shape in
                          ((4 * H, n_in), (4 * H, H), (4 * H,), (4 * H,))) for _ in range(D))
    lengths = torch.tensor([7, 3, 5])
    leaves = [x, *(p for params in weights for p in params)]

    def run(backend: str) -> list[torch.Tensor]:
        with fastmsc.use_backend(backend):
            out, h_n, c_n = fastmsc.lstm_layer(x, weights, lengths=lengths)
        loss = out.square().sum() + h_n.sum() + 2 * c_n.sum()
        return [out, h_n, c_n, *torch.autograd.grad(loss, leaves)]

    fused, reference = run("fused"), run("reference")
    names = ["out", "h_n", "c_n", "grad x"] + [f"grad {n}[{d}]" for d in range(D)
                                               for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
    for name, a, b in zip(names, fused, reference, strict=True):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            fail(f"fused {name} differs from the reference: max |diff| {(a - b).abs().max().item():.3g}")
    print(f"fused lstm_layer (B={B}, T={T}, bidirectional, lengths) matches the reference: forward and "
          f"{len(names) - 3} gradients")

    if _extension.origin() != "fastmsc._C":
        fail(f"the LSTM ops came from {_extension.origin()!r}, not the prebuilt fastmsc._C")
    compiled = sorted(str(p.relative_to(ext_dir)) for p in ext_dir.rglob("*"))
    if compiled:
        fail(f"something was built just in time into {ext_dir}: {compiled[:10]}")
    print(f"ops from {_extension.origin()}; nothing compiled into FASTMSC_EXT_DIR")
    print("wheel smoke test: OK")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
