"""Models: :class:`MSCClassifier` (the network), :class:`Ensemble` (members' probabilities averaged),
:class:`Classifier` (trained members with their class labels and input normalisation: ``predict``,
``predict_proba``), and run folders: :func:`save` and :func:`load` (what ``fastmsc train`` writes)."""

from .classifier import NORMALISATIONS, Classifier
from .ensemble import Ensemble
from .msc_classifier import MSCClassifier
from .run_folder import MODEL_FILE, RUN_FORMAT, WEIGHTS_FILE, MissingRunFile, RunFolderError, load, save

__all__ = [
    "MODEL_FILE", "NORMALISATIONS", "RUN_FORMAT", "WEIGHTS_FILE", "Classifier", "Ensemble", "MSCClassifier",
    "MissingRunFile", "RunFolderError", "load", "save",
]
