"""segcal.detectors: per-pixel error / OOD scores (higher = more anomalous) and FlowEneDet.

Functions map ``(N, C, H, W)`` logits to ``(N, H, W)`` scores: :func:`msp`, :func:`max_logit`, :func:`entropy`,
:func:`energy`, :func:`standardized_max_logit`. Learned detectors: :class:`StandardizedMaxLogit` (statistics from
:func:`fit_sml_statistics`), :class:`FlowEneDet` (FED-U / FED-C) and :class:`SelectiveDetector`. By name:
:func:`get_detector`, :data:`DETECTORS`.
"""

from segcal.detectors.energy import Energy, energy
from segcal.detectors.entropy import Entropy, entropy
from segcal.detectors.flowenedet import FlowEneDet, load_pretrained
from segcal.detectors.max_logit import MaxLogit, max_logit
from segcal.detectors.msp import MSP, msp
from segcal.detectors.registry import DETECTORS, get_detector
from segcal.detectors.selective import SelectiveDetector
from segcal.detectors.sml import (
    SMLStatistics,
    StandardizedMaxLogit,
    fit_sml_statistics,
    load_pretrained_sml,
    standardized_max_logit,
)

__all__ = [
    "DETECTORS",
    "MSP",
    "Energy",
    "Entropy",
    "FlowEneDet",
    "MaxLogit",
    "SMLStatistics",
    "SelectiveDetector",
    "StandardizedMaxLogit",
    "energy",
    "entropy",
    "fit_sml_statistics",
    "get_detector",
    "load_pretrained",
    "load_pretrained_sml",
    "max_logit",
    "msp",
    "standardized_max_logit",
]
