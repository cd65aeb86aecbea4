"""segcal.conformal: conformal risk control for segmentation — guarantees, not just estimates.

A risk controller is fitted on a labelled calibration split and returns a threshold λ̂ with a finite-sample
guarantee ``E[L(λ̂)] ≤ α`` for a new image exchangeable with the calibration images:

* :class:`CoverageRiskControl` — pixel-level multi-label sets; image-level coverage ("≥ 1 − α of images have at most
  ε of their pixels outside the set"), or the expected miss fraction;
* :class:`FNRControl` — a binary mask of one class with expected false-negative rate ≤ α;
* :class:`RiskControl` — any per-image loss monotone in the threshold (checked; a non-monotone loss is refused).

:func:`evaluate` fits a controller and reports empirical risk with binomial intervals, set sizes, per class and per
image subset. See ``docs/conformal.md``.
"""

from segcal.calibrators import NotFittedError
from segcal.conformal._bounds import clopper_pearson, crc_index, make_grid
from segcal.conformal.coverage import CoverageRiskControl
from segcal.conformal.evaluate import evaluate, resplit_thresholds, threshold_from_curves
from segcal.conformal.fnr import FNRControl
from segcal.conformal.risk import RiskControl, class_scores, image_curves

__all__ = [
    "CoverageRiskControl",
    "FNRControl",
    "NotFittedError",
    "RiskControl",
    "class_scores",
    "clopper_pearson",
    "crc_index",
    "evaluate",
    "image_curves",
    "make_grid",
    "resplit_thresholds",
    "threshold_from_curves",
]
