"""segcal.calibrators: post-hoc calibrators on dense logits (one file per method, a shared base in ``_base``).

Every calibrator follows scikit-learn conventions: ``__init__`` stores hyperparameters, ``fit(logits, target)`` (or
``fit(batches)`` / ``fit(store)``) returns self, learned attributes end in ``_``, ``transform(logits) -> logits``,
``predict_proba``, ``save(path)`` / ``Cls.load(path)`` and :func:`load` for any saved calibrator.
See ``docs/calibrators.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segcal.calibrators._base import Calibrator, NotFittedError, clone
from segcal.calibrators.dirichlet import DirichletScaling
from segcal.calibrators.ensemble_temperature import EnsembleTemperatureScaling
from segcal.calibrators.histogram import HistogramBinning
from segcal.calibrators.isotonic import IsotonicCalibration
from segcal.calibrators.local_temperature import LocalTemperatureScaling
from segcal.calibrators.matrix import MatrixScaling
from segcal.calibrators.selective import MispredictionDetector, SelectiveScaling
from segcal.calibrators.temperature import TemperatureScaling
from segcal.calibrators.vector import VectorScaling

#: Short names used by ``segcal fit --calibrator NAME``.
CALIBRATORS: dict[str, type[Calibrator]] = {
    "ts": TemperatureScaling,
    "vs": VectorScaling,
    "ms": MatrixScaling,
    "dirichlet": DirichletScaling,
    "ets": EnsembleTemperatureScaling,
    "lts": LocalTemperatureScaling,
    "selective": SelectiveScaling,
    "histogram": HistogramBinning,
    "isotonic": IsotonicCalibration,
}


def get_calibrator(name: str, **kwargs: Any) -> Calibrator:
    """Unfitted calibrator by short name (see :data:`CALIBRATORS`) or class name, with hyperparameters ``kwargs``."""
    key = name.lower()
    by_class = {cls.__name__.lower(): cls for cls in CALIBRATORS.values()}
    cls = CALIBRATORS.get(key) or by_class.get(key)
    if cls is None:
        raise ValueError(f"unknown calibrator {name!r}; choose one of {sorted(CALIBRATORS)}")
    return cls(**kwargs)


def load(path: str | Path) -> Calibrator:
    """Load any calibrator saved with ``save(path)``."""
    return Calibrator.load(path)


__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "DirichletScaling",
    "EnsembleTemperatureScaling",
    "HistogramBinning",
    "IsotonicCalibration",
    "LocalTemperatureScaling",
    "MatrixScaling",
    "MispredictionDetector",
    "NotFittedError",
    "SelectiveScaling",
    "TemperatureScaling",
    "VectorScaling",
    "clone",
    "get_calibrator",
    "load",
]
