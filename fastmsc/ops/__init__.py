"""The functional ops, one per file; each holds its reference, its stock-PyTorch path and its fused path.

Also the helpers models and layers share with the ops: ``validate_lengths`` (validate a model's ``lengths`` once,
at its entry; the :class:`ValidLengths` it returns passes to the inner ops with no further host sync) and
``time_mask`` (the (B, T) mask of valid steps)."""

from ._checks import ValidLengths, time_mask, validate_lengths
from .attention import attention
from .lstm_layer import lstm_layer
from .max_avg_pool import max_avg_pool
from .multiscale_conv1d import multiscale_conv1d

__all__ = ["ValidLengths", "attention", "lstm_layer", "max_avg_pool", "multiscale_conv1d", "time_mask",
           "validate_lengths"]
