"""Drop-in nn.Modules backed by the fastmsc ops."""

from .lstm import LSTM, swap_modules
from .max_avg_pool import MaxAvgPool1d
from .multiscale_conv1d import MultiScaleConv1d
from .self_attention import SelfAttention

__all__ = ["LSTM", "MaxAvgPool1d", "MultiScaleConv1d", "SelfAttention", "swap_modules"]
