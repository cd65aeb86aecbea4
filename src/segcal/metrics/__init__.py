"""segcal.metrics: streaming dense calibration / detection metrics with fixed-size states.

Public API: :class:`CalibrationMetrics` and :class:`DetectionMetrics` (dicts of values), the scalar torchmetrics
metrics (:class:`ExpectedCalibrationError`, :class:`MaximumCalibrationError`, :class:`AdaptiveCalibrationError`,
:class:`ClasswiseCalibrationError`, :class:`NegativeLogLikelihood`, :class:`BrierScore`,
:class:`OverconfidenceError`; :class:`DetectionAUROC`, :class:`DetectionAveragePrecision`, :class:`DetectionFPR95`),
:class:`ReliabilityDisplay`, the paired bootstrap over images
(:class:`PerImageCalibrationStats`, :func:`paired_bootstrap`), :func:`boundary_mask` and the one-shot
:mod:`segcal.metrics.functional`.
"""

import warnings
from typing import Any

from segcal.metrics import functional
from segcal.metrics.bootstrap import PerImageCalibrationStats, bootstrap_indices, paired_bootstrap
from segcal.metrics.boundary import boundary_mask
from segcal.metrics.calibration import CalibrationMetrics
from segcal.metrics.detection import DetectionMetrics
from segcal.metrics.reliability import ReliabilityDisplay
from segcal.metrics.scalar import (
    AdaptiveCalibrationError,
    BrierScore,
    ClasswiseCalibrationError,
    DetectionAUROC,
    DetectionAveragePrecision,
    DetectionFPR95,
    ExpectedCalibrationError,
    MaximumCalibrationError,
    NegativeLogLikelihood,
    OverconfidenceError,
)

__all__ = [
    "AdaptiveCalibrationError", "BrierScore", "CalibrationMetrics", "ClasswiseCalibrationError", "DetectionAUROC",
    "DetectionAveragePrecision", "DetectionFPR95", "DetectionMetrics",
    "ExpectedCalibrationError", "MaximumCalibrationError", "NegativeLogLikelihood", "OverconfidenceError",
    "PerImageCalibrationStats", "ReliabilityDisplay", "bootstrap_indices", "boundary_mask", "functional",
    "paired_bootstrap",
]


def __getattr__(name: str) -> Any:
    if name == "ReliabilityDiagram":
        warnings.warn("segcal.metrics.ReliabilityDiagram is deprecated; use segcal.metrics.ReliabilityDisplay "
                      "(from_metric/from_predictions draw and return the display; plot() returns self)",
                      DeprecationWarning, stacklevel=2)
        return ReliabilityDisplay
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
