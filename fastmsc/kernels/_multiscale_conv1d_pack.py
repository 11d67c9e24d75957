"""Packing of the multi-scale conv's branch weights, once per weight version (the design is in
:mod:`fastmsc.kernels.multiscale_conv1d`): ``pack_weights`` and ``branch_layout`` build the packed tensors,
``packed_parameters`` serves them from a cache of detached copies, or packs inline while torch.compile or
torch.jit.trace records."""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F


def pack_weights(weights, biases):
    """Pack branch weights into one (C_total, C_in, K_max) tensor, each branch centred and zero-padded to K_max
    taps, and the biases into one (C_total,) tensor (zeros for a branch without one), or None without any.
    Torch ops on the tensors given (differentiable if they are; ``packed_parameters`` passes detached ones)."""
    k_max = max(w.shape[-1] for w in weights)
    packed_weight = torch.cat([F.pad(w, ((k_max - w.shape[-1]) // 2,) * 2) for w in weights], dim=0)
    packed_bias = None
    if biases is not None and any(b is not None for b in biases):
        packed_bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b
                                 for w, b in zip(weights, biases, strict=True)])
    return packed_weight, packed_bias


def branch_layout(weights) -> torch.Tensor:
    """int32 (2, C_total): row 0 each packed output channel's own kernel size k_i (the kernels multiply only those
    taps of a channel, never its zero padding, so a NaN or inf input stays within each branch's receptive field);
    row 1 where channel o's (C_in, k_i) weight gradient starts in the flat dW that _packed_backward returns
    (branch after branch, each (C_out_i, C_in, k_i) contiguous). Built from shapes only, on the host."""
    taps, offsets, start = [], [], 0
    for w in weights:
        c_out, c_in, k = w.shape
        taps += [k] * c_out
        offsets += range(start, start + c_out * c_in * k, c_in * k)
        start += c_out * c_in * k
    return torch.tensor([taps, offsets], dtype=torch.int32, device=weights[0].device)


class _PackCache:
    """The packed (weight, bias, layout) of recent branch parameter lists, detached, so a layer called again with
    unchanged weights launches nothing to pack them.

    An entry is keyed by the id() of each branch weight and bias and holds weak references to them: a hit needs
    every reference to still return the very tensor passed (``is``, so a freed tensor whose id or address is
    reused never hits), with the same _version (bumped by every in-place write through the tensor or a view,
    including optimizer steps under no_grad), data_ptr (``.data`` or ``set_`` swaps), shape, stride, dtype and
    device. A dead tensor's weakref callback drops its entry at once, so the cache never keeps packed copies of
    freed parameters; at most ``capacity`` entries live (least recently used evicted)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.RLock()  # the GC may run a weakref callback in any thread, mid-lookup too
        self.packs = 0  # how many times the packing ran (tests count hits and misses with it)

    @staticmethod
    def _state(t: torch.Tensor) -> tuple:
        return (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def get(self, weights, biases):
        tensors = list(weights) + ([] if biases is None else [b for b in biases if b is not None])
        key = (tuple(id(t) for t in weights),
               None if biases is None else tuple(None if b is None else id(b) for b in biases))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                _, refs, states, packed = entry
                if (len(refs) == len(tensors) and all(ref() is t for ref, t in zip(refs, tensors, strict=True))
                        and states == [self._state(t) for t in tensors]):
                    self._entries.move_to_end(key)
                    return packed
        packed = _pack_detached(weights, biases)
        with self._lock:
            self.packs += 1
            token = self.packs
            # The callback holds the key and a token, not the entry: a reference to the entry would close a cycle
            # (entry -> weakref -> callback -> entry) that only the cycle collector frees.
            drop = functools.partial(self._drop, key, token)
            self._entries[key] = (token, [weakref.ref(t, drop) for t in tensors], [self._state(t) for t in tensors],
                                  packed)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return packed

    def _drop(self, key, token, _ref) -> None:
        """Weakref callback of a tensor of entry ``token``: forget that entry (not a newer one under the same key)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == token:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_PACK_CACHE = _PackCache(capacity=16)


def _pack_detached(weights, biases):
    weight, bias = pack_weights([w.detach() for w in weights],
                                None if biases is None else [None if b is None else b.detach() for b in biases])
    return weight.contiguous(), None if bias is None else bias.contiguous(), branch_layout(weights)


def _cacheable(t: torch.Tensor) -> bool:
    """Plain tensors and parameters only: an inference tensor has no version counter, and a subclass or functorch
    wrapper (fake tensors, DTensor, torch.func transforms) may have no data pointer or version of its own."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_inference()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def packed_parameters(weights, biases):
    """(packed weight (C_total, C_in, K_max), packed bias (C_total,) or None, layout int32 (2, C_total)), detached.

    Eager (grad mode or not): from the pack cache, computed once per weight version. While torch.compile or
    torch.jit.trace records: packed inline with torch ops, which land in the graph (a cached tensor would be baked
    in as a constant, and the compiler would have to guard on versions); likewise for tensors the cache cannot key
    (``_cacheable``)."""
    tensors = list(weights) + ([] if biases is None else [b for b in biases if b is not None])
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not all(_cacheable(t) for t in tensors):
        return _pack_detached(weights, biases)
    return _PACK_CACHE.get(weights, biases)


def clear_pack_cache() -> None:
    """Forget every packed weight: for code that writes a weight through ``.data`` (which, unlike every other
    in-place write, does not bump the version counter the cache checks)."""
    _PACK_CACHE.clear()
