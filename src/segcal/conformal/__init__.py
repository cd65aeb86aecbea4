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

#: Short names for the CLI / protocol (``segcal conformal --controller NAME``).
CONTROLLERS: dict[str, type[RiskControl]] = {"coverage": CoverageRiskControl, "fnr": FNRControl}


def get_controller(name: str, **kwargs: object) -> RiskControl:
    """Unfitted risk controller by short name (``"coverage"``, ``"fnr"``) or class name, with ``kwargs``."""
    key = name.lower()
    by_class = {c.__name__.lower(): c for c in CONTROLLERS.values()}
    cls = CONTROLLERS.get(key) or by_class.get(key)
    if cls is None:
        raise ValueError(f"unknown risk controller {name!r}; choose one of {sorted(CONTROLLERS)}")
    return cls(**kwargs)  # type: ignore[arg-type]


def load(path: str) -> RiskControl:
    """Load any risk controller saved with ``save(path)``."""
    return RiskControl.load(path)


__all__ = [
    "CONTROLLERS",
    "CoverageRiskControl",
    "FNRControl",
    "NotFittedError",
    "RiskControl",
    "class_scores",
    "clopper_pearson",
    "crc_index",
    "evaluate",
    "get_controller",
    "image_curves",
    "load",
    "make_grid",
    "resplit_thresholds",
    "threshold_from_curves",
]
