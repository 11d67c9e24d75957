"""MSCClassifier: multi-scale conv -> BiLSTM -> self-attention -> max+avg pooling -> MLP classifier."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import LSTM, MaxAvgPool1d, MultiScaleConv1d, NotScriptable, SelfAttention
from ..ops import time_mask, validate_lengths


class MSCClassifier(NotScriptable, nn.Module):
    """forward(x (B, C_in, T), lengths=None) -> logits (B, num_classes); lengths None or (B,) ints in [1, T].

    Every stage calls a fastmsc op, so the backend switch changes the whole model. The conv branches
    are followed by BatchNorm (``conv_norm``, one BatchNorm1d over the concatenated channels, which is
    per-branch BatchNorm since it normalises each channel alone) and GELU.
    """

    def __init__(self, in_channels, num_classes, conv_channels=64, kernel_sizes=(3, 5, 7), lstm_hidden=128,
                 lstm_layers=1, num_heads=1, classifier_hidden=128, dropout=0.3, conv_norm=True):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.in_channels, self.num_classes = in_channels, num_classes
        # The constructor's arguments, as plain values: what a saved model records to be built again.
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "conv_channels": conv_channels,
                       "kernel_sizes": list(kernel_sizes), "lstm_hidden": lstm_hidden, "lstm_layers": lstm_layers,
                       "num_heads": num_heads, "classifier_hidden": classifier_hidden, "dropout": dropout,
                       "conv_norm": conv_norm}
        self.conv = MultiScaleConv1d(in_channels, conv_channels, kernel_sizes, activation=None if conv_norm else "gelu")
        self.conv_norm = nn.BatchNorm1d(self.conv.out_channels) if conv_norm else None
        self.lstm = LSTM(self.conv.out_channels, lstm_hidden, lstm_layers, batch_first=True, bidirectional=True,
                         dropout=dropout if lstm_layers > 1 else 0.0)
        self.attention = SelfAttention(2 * lstm_hidden, num_heads)
        self.pool = MaxAvgPool1d()
        self.classifier = nn.Sequential(
            nn.Linear(4 * lstm_hidden, classifier_hidden),
            nn.LayerNorm(classifier_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(classifier_hidden, num_classes),
        )

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.in_channels}, T), got {got}")
        # Validated once here (at most one host read of the values); the stages below get a ValidLengths and
        # read no value of it again.
        lengths = validate_lengths(lengths, x.shape[0], x.shape[2], x.device)
        if lengths is not None:
            # Values past a sequence's end must not leak into its last valid conv outputs (where, not a product:
            # NaN padding too).
            x = torch.where(time_mask(lengths.tensor, x.shape[2])[:, None, :], x, 0.0)
        h = self.conv(x)
        if self.conv_norm is not None:
            h = nn.functional.gelu(self.conv_norm(h))
        h, _ = self.lstm(h.transpose(1, 2), lengths=lengths)
        h = self.attention(h, lengths)
        return self.classifier(self.pool(h, lengths))
