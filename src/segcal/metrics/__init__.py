"""segcal.metrics: streaming dense calibration / detection metrics with fixed-size states.

Public API: :class:`CalibrationMetrics`, :class:`DetectionMetrics`, :class:`ReliabilityDiagram`,
:func:`boundary_mask` and the one-shot :mod:`segcal.metrics.functional`.
"""

from segcal.metrics import functional
from segcal.metrics.boundary import boundary_mask
from segcal.metrics.calibration import CalibrationMetrics
from segcal.metrics.detection import DetectionMetrics
from segcal.metrics.reliability import ReliabilityDiagram

__all__ = ["CalibrationMetrics", "DetectionMetrics", "ReliabilityDiagram", "boundary_mask", "functional"]
