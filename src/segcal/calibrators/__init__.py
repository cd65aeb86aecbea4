"""segcal.calibrators: post-hoc calibrators on dense logits (one file per method, a shared base in ``_base``).

Every calibrator follows scikit-learn conventions (the contract of :mod:`segcal._estimator`): ``__init__`` stores
hyperparameters, ``fit(logits, target)`` (or ``fit(batches)`` / ``fit(store)``) returns self, learned attributes end
in ``_``, ``transform(logits, images=None) -> logits``, ``predict_proba``, ``get_params`` / ``set_params``,
:func:`clone`, ``save(path)`` / ``Cls.load(path)`` and :func:`load` for any saved calibrator.

A subclass of :class:`Calibrator` that declares ``name = "..."`` is registered in :data:`CALIBRATORS` when it is
defined, so :func:`get_calibrator` (and ``segcal fit`` / ``segcal benchmark``) reach it with no other edit.
See ``docs/calibrators.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segcal._estimator import check_is_fitted, normalize_name
from segcal.calibrators._base import CALIBRATORS, Calibrator, ConvergenceWarning, NotFittedError, clone
from segcal.calibrators.dirichlet import DirichletScaling
from segcal.calibrators.ensemble_temperature import EnsembleTemperatureScaling
from segcal.calibrators.histogram import HistogramBinning
from segcal.calibrators.isotonic import IsotonicCalibration
from segcal.calibrators.local_temperature import LocalTemperatureScaling
from segcal.calibrators.matrix import MatrixScaling
from segcal.calibrators.selective import MispredictionDetector, SelectiveScaling
from segcal.calibrators.temperature import TemperatureScaling
from segcal.calibrators.vector import VectorScaling


def get_calibrator(name: str, **kwargs: Any) -> Calibrator:
    """Unfitted calibrator registered as ``name`` (see :data:`CALIBRATORS`; case-insensitive, ``_`` ≡ ``-``, the
    class name works too), with hyperparameters ``kwargs``.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> get_calibrator("TS", t_bounds=(0.5, 2.0))
        TemperatureScaling(ignore_index=255, t_bounds=(0.5, 2.0), max_pixels=None, seed=0)
    """
    return CALIBRATORS.create(name, **kwargs)


def load(path: str | Path) -> Calibrator:
    """Load any calibrator saved with ``save(path)``."""
    return Calibrator.load(path)


__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "ConvergenceWarning",
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
    "check_is_fitted",
    "clone",
    "get_calibrator",
    "load",
    "normalize_name",
]
