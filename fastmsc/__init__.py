"""fastmsc: fused kernels for a multi-scale conv + BiLSTM + attention time-series classifier."""

from . import models
from ._version import __version__
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .info import info
from .nn import swap_modules
from .ops import attention, lstm_layer, max_avg_pool, multiscale_conv1d

__all__ = [
    "BACKENDS", "attention", "get_backend", "info", "lstm_layer", "max_avg_pool", "models", "multiscale_conv1d",
    "set_backend", "swap_modules", "use_backend", "__version__",
]
