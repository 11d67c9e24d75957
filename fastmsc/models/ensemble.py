"""Ensemble: the class probabilities of several independently trained models, averaged."""

from __future__ import annotations

import math

import torch
from torch import nn


class Ensemble(nn.Module):
    """forward(x (B, C_in, T), lengths=None) -> (B, K): the log of the mean of the members' softmax.

    Log-probabilities are valid logits: their argmax is the ensemble's class and cross-entropy on them is the
    negative log-likelihood of the averaged probabilities. Members are any modules called as
    ``member(x, lengths) -> logits (B, K)``.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("an Ensemble needs at least one member")

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(_upcast(member(x, lengths)), dim=-1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) in float32 before the softmax, as for the training loss."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
