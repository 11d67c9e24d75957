"""saved_tensor_bytes: the activation memory autograd keeps for the backward of one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[object, int]:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        # Tensors without a plain storage (some tensor subclasses): count their own elements.
        return ("tensor", id(t)), t.numel() * t.element_size()
    # The storage object's own address, not its data pointer: fake tensors (shape-only, all at address 0)
    # have distinct storages too, and views share their base's.
    return (t.device, storage._cdata), storage.nbytes()


def saved_tensor_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = (), **kwargs) -> int:
    """Bytes of the tensors that ``fn(*args, **kwargs)`` saves for backward.

    ``fn`` runs once with grad enabled under ``torch.autograd.graph.saved_tensors_hooks``. Every saved
    tensor is charged the full size of its storage, and each distinct storage is counted once: ``x * x``
    saves ``x`` twice but costs ``x.nbytes``; a saved view costs its whole base. Storages of the tensors in
    ``exclude`` (parameters, which live whether or not a backward is pending) are left out, and with them
    any view of them such as ``w.t()``. Tensors saved by custom autograd Functions and compiled graphs are
    seen too, since they pass through the same hooks.

    Example: ``saved_tensor_bytes(torch.mul, x, y)`` with x and y requiring grad is
    ``x.nbytes + y.nbytes``; with ``exclude=[y]`` it is ``x.nbytes``.
    """
    excluded = {_storage_key_and_bytes(t)[0] for t in exclude}
    saved: dict[object, int] = {}
    # Holding every packed tensor until counting ends keeps a storage freed mid-call from being reused
    # at the same address by a later saved tensor, which would merge two storages into one key.
    keep_alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key_and_bytes(t)
        if key not in excluded:
            saved[key] = nbytes
        keep_alive.append(t)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    keep_alive.clear()
    return sum(saved.values())
