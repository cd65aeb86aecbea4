"""segcal.detectors: per-pixel error / OOD scores (higher = more anomalous) and FlowEneDet.

Functions map ``(N, C, H, W)`` logits to ``(N, H, W)`` scores: :func:`msp`, :func:`max_logit`, :func:`entropy`,
:func:`energy`, :func:`standardized_max_logit`. Every detector class follows the method contract of
:mod:`segcal._estimator` (``fit(batches)``, ``score(logits, features=None, images=None)``, ``get_params``,
:func:`clone`, ``save`` / ``load``, ``needs_features``, ``requires_fit``, ``pretrained(model_name)``). Learned
detectors: :class:`StandardizedMaxLogit` (statistics from :func:`fit_sml_statistics`), :class:`FlowEneDet` (FED-U /
FED-C) and :class:`SelectiveDetector`. By name: :func:`get_detector`, :data:`DETECTORS` (a subclass of
:class:`Detector` declaring ``name`` is registered when it is defined).
"""

from pathlib import Path

from segcal._estimator import NotFittedError, check_is_fitted, clone, normalize_name
from segcal.detectors._base import DETECTORS, Detector, get_detector
from segcal.detectors.energy import Energy, energy
from segcal.detectors.entropy import Entropy, entropy
from segcal.detectors.flowenedet import FlowEneDet, FlowEneDetC, FlowEneDetU, load_pretrained
from segcal.detectors.max_logit import MaxLogit, max_logit
from segcal.detectors.msp import MSP, msp
from segcal.detectors.selective import SelectiveDetector
from segcal.detectors.sml import (
    SMLStatistics,
    StandardizedMaxLogit,
    fit_sml_statistics,
    load_pretrained_sml,
    standardized_max_logit,
)


def load(path: str | Path) -> Detector:
    """Load any detector saved with ``save(path)``."""
    return Detector.load(path)


__all__ = [
    "DETECTORS",
    "MSP",
    "Detector",
    "Energy",
    "Entropy",
    "FlowEneDet",
    "FlowEneDetC",
    "FlowEneDetU",
    "MaxLogit",
    "NotFittedError",
    "SMLStatistics",
    "SelectiveDetector",
    "StandardizedMaxLogit",
    "check_is_fitted",
    "clone",
    "energy",
    "entropy",
    "fit_sml_statistics",
    "get_detector",
    "load",
    "load_pretrained",
    "load_pretrained_sml",
    "max_logit",
    "msp",
    "normalize_name",
    "standardized_max_logit",
]
