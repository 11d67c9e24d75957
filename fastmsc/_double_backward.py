"""Double backward for ops whose backward is a kernel.

A kernel backward (a Triton kernel, the LSTM extension, a custom op) returns plain tensors: autograd cannot see
how they depend on the op's inputs or on the incoming gradients, so differentiating them again would give zeros.
When autograd asks a backward to record a graph (``create_graph=True``), the op's backward formulas use
:func:`recomputed_grads` instead: they rerun the forward through the op's reference math (differentiable torch
ops) on the saved original inputs and differentiate that with ``create_graph=True``. The first-order backward,
where no graph is recorded, keeps its kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def graph_wanted(*tensors) -> bool:
    """True when a backward formula must record a graph for the gradients it returns.

    Autograd runs backward formulas with grad mode on only for ``create_graph=True``; the graph is then needed
    when one of ``tensors`` (the saved inputs, the incoming gradients; None and non-tensors allowed) requires
    grad. torch.compile traces backward formulas with grad mode off, so compiled graphs keep the kernels.
    """
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def recomputed_grads(forward: Callable, inputs: Sequence, needs: Sequence[bool],
                     grad_outputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradients of ``forward(*inputs)`` for ``grad_outputs``, recorded so they can be differentiated again.

    Args:
        forward: the op's reference math, differentiable; takes ``inputs`` in order and returns a tensor or a
            tuple of tensors.
        inputs: the op's saved original inputs (tensors, None, or other arguments ``forward`` takes).
        needs: per input, whether its gradient is wanted (``ctx.needs_input_grad``).
        grad_outputs: one per output of ``forward``, shaped like it; None for an output without a gradient.

    Returns one entry per input: where ``needs`` says so and the input is a tensor, its gradient, shaped like
    it and a function of the inputs and of ``grad_outputs`` (zeros where the outputs do not depend on it);
    None elsewhere.
    """
    # Each input enters the recomputation through its own alias: one tensor passed twice (attention(x, x, x))
    # must get one gradient per argument, not the sum of them in every slot.
    aliases = [t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs]
    wanted = [i for i, (t, need) in enumerate(zip(aliases, needs, strict=True))
              if need and isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.enable_grad():
        outputs = forward(*aliases)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs, strict=True)
             if grad is not None and out.requires_grad]
    grads = [None] * len(wanted)
    if pairs and wanted:
        grads = torch.autograd.grad([out for out, _ in pairs], [aliases[i] for i in wanted],
                                    [grad.to(out.dtype) for out, grad in pairs], create_graph=True,
                                    allow_unused=True)
    result = [None] * len(inputs)
    for i, need in enumerate(needs):
        if need and isinstance(inputs[i], torch.Tensor):
            result[i] = torch.zeros_like(inputs[i])
    for i, grad in zip(wanted, grads, strict=True):
        if grad is not None:
            result[i] = grad
    return result
