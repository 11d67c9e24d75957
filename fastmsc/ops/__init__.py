"""The functional ops, one per file; each holds its reference, its stock-PyTorch path and its fused path."""

from .attention import attention
from .lstm_layer import lstm_layer
from .max_avg_pool import max_avg_pool
from .multiscale_conv1d import multiscale_conv1d

__all__ = ["attention", "lstm_layer", "max_avg_pool", "multiscale_conv1d"]
