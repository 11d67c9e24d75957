"""Drop-in nn.Modules backed by the fastmsc ops, and ``NotScriptable``, the TorchScript refusal for models built
from them."""

from ._torchscript import NotScriptable
from .lstm import LSTM, swap_modules
from .max_avg_pool import MaxAvgPool1d
from .multiscale_conv1d import MultiScaleConv1d
from .self_attention import SelfAttention

__all__ = ["LSTM", "MaxAvgPool1d", "MultiScaleConv1d", "NotScriptable", "SelfAttention", "swap_modules"]
