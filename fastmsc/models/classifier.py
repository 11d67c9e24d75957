"""Classifier: trained MSCClassifier members with their class labels and input normalisation, as a run folder
holds them (:mod:`fastmsc.models.run_folder`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import znormalise
from ..nn import NotScriptable
from ..ops import time_mask, validate_lengths
from .ensemble import Ensemble
from .msc_classifier import MSCClassifier

# How series are normalised before the model sees them: "znorm" is fastmsc.data.znormalise (per series and
# channel, over the valid steps), what ``fastmsc train --znorm`` trains on.
NORMALISATIONS = ("none", "znorm")


class Classifier(NotScriptable, nn.Module):
    """A trained classifier: ``members`` (one or more :class:`MSCClassifier` of one configuration) whose class
    probabilities are averaged, the K ``classes`` (label strings, in the order of the outputs) and the
    ``normalisation`` the series are given in training.

    forward(x (B, C_in, T), lengths=None) -> (B, K) log-probabilities, on raw series (normalised here).
    :meth:`predict_proba` and :meth:`predict` evaluate in eval mode without gradients, in batches.
    """

    def __init__(self, members, classes, normalisation: str = "none"):
        super().__init__()
        members = [members] if isinstance(members, nn.Module) else list(members)
        if not members:
            raise ValueError("members must hold at least one MSCClassifier, got none")
        for i, member in enumerate(members):
            if not isinstance(member, MSCClassifier):
                raise TypeError(f"members[{i}] must be a fastmsc.models.MSCClassifier, got {type(member).__name__}")
            different = sorted(k for k in member.config if member.config[k] != members[0].config.get(k))
            if different:
                raise ValueError(f"members must share one configuration: members[{i}] differs from members[0] in "
                                 f"{', '.join(different)}")
        classes = tuple(classes)
        if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct strings, got {list(classes)!r}")
        if len(classes) != members[0].num_classes:
            raise ValueError(f"classes must name the model's {members[0].num_classes} outputs, got {len(classes)} "
                             f"labels: {list(classes)!r}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.ensemble = Ensemble(members)
        self.classes, self.normalisation = classes, normalisation
        self.in_channels, self.num_classes = members[0].in_channels, len(classes)

    @property
    def members(self) -> list[MSCClassifier]:
        return list(self.ensemble.members)

    @property
    def config(self) -> dict:
        """The members' MSCClassifier arguments."""
        return dict(self.members[0].config)

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {self.in_channels}, T), got {got}")
        lengths = validate_lengths(lengths, x.shape[0], x.shape[2], x.device)
        if self.normalisation == "znorm":
            x = znormalise(x, None if lengths is None else lengths.tensor)
        return self.ensemble(x, lengths)

    @torch.no_grad()
    def predict_proba(self, x, lengths=None, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities (B, K) on the CPU, in the parameters' dtype.

        ``x``: raw series (B, C_in, T) as a tensor or array, or an object with ``x`` and ``lengths`` (a
        :class:`fastmsc.data.SeriesData` or :class:`fastmsc.data.SeriesInputs`, whose lengths are then used);
        ``lengths``: None or (B,) valid steps in [1, T]. Evaluated ``batch_size`` series at a time.
        """
        if hasattr(x, "x") and hasattr(x, "lengths"):
            if lengths is not None:
                raise ValueError("lengths must be None when x is a SeriesData or SeriesInputs (it has its own)")
            x, lengths = x.x, x.lengths
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        parameter = next(self.parameters())
        x = torch.as_tensor(x).to(parameter.device, parameter.dtype)
        if lengths is not None:
            lengths = torch.as_tensor(lengths)
            lengths = validate_lengths(lengths, x.shape[0], x.shape[2], x.device).tensor if x.dim() == 3 else lengths
        if x.dim() == 3 and x.shape[1] == self.in_channels:
            _check_finite(x, lengths)
        was_training = self.training
        self.eval()
        try:
            if x.dim() == 3 and x.shape[0] == 0:
                self(x, lengths)  # checks the channels
                return torch.empty(0, self.num_classes, dtype=parameter.dtype)
            chunks = []
            for start in range(0, x.shape[0], batch_size):
                part = None if lengths is None else lengths[start:start + batch_size]
                chunks.append(self(x[start:start + batch_size], part).exp().cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks)

    def predict(self, x, lengths=None, batch_size: int = 256) -> np.ndarray:
        """The predicted label of each series: (B,) array of strings from :attr:`classes` (arguments as
        :meth:`predict_proba`)."""
        probabilities = self.predict_proba(x, lengths, batch_size)
        return np.asarray(self.classes, dtype=object)[probabilities.argmax(dim=1).numpy()].astype(str)


def _check_finite(x: torch.Tensor, lengths: torch.Tensor | None) -> None:
    """ValueError naming the series whose valid steps hold NaN or infinity: their class would be meaningless."""
    finite = torch.isfinite(x)
    if lengths is not None:
        finite |= ~time_mask(lengths, x.shape[2])[:, None, :]
    bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        listed = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(f"x holds NaN or infinite values within the valid steps of {len(bad)} series ({listed}); "
                         f"no class can be predicted for them")
