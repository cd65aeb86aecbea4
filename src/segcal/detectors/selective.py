"""Selective-Scaling misprediction probability as a detector score."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from segcal._estimator import Estimator, NotFittedError, clone
from segcal.detectors._base import Detector
from segcal.detectors._scores import as_compute


class SelectiveDetector(Detector):
    """Score = the misprediction probability of Selective Scaling's detector (registered detector ``"selective"``).

    Built from a fitted ``segcal.calibrators.SelectiveScaling`` (ready to score, no fit needed), or :meth:`fit` fits
    one itself — a clone of ``calibrator`` when an unfitted one is given as a template, else
    ``SelectiveScaling(base=None, ignore_index=ignore_index)`` (the score does not depend on ``base``).
    ``segcal.calibrators`` is imported only then, so the detectors
    package does not depend on it at import time.

    Args:
        calibrator: a fitted SelectiveScaling (or any object with ``misprediction_proba(logits) -> (N, H, W)``), an
            unfitted SelectiveScaling used as the template of :meth:`fit`, or None.
        ignore_index: label excluded from fitting (given to the SelectiveScaling fitted here).

    Attributes:
        calibrator_: the SelectiveScaling in use.

    References:
        Wang et al., "On Calibrating Semantic Segmentation Models: Analyses and An Algorithm", CVPR 2023,
        arXiv:2212.12053.

    Example:
        >>> import torch
        >>> class Fake:
        ...     def misprediction_proba(self, z): return z.softmax(1).amax(1)
        >>> SelectiveDetector(Fake()).score(torch.zeros(1, 2, 3, 3)).shape
        torch.Size([1, 3, 3])
    """

    name = "selective"
    _learned = ("calibrator_",)

    def __init__(self, calibrator: Any = None, *, ignore_index: int | None = 255) -> None:
        if calibrator is not None and not hasattr(calibrator, "misprediction_proba"):
            raise TypeError(f"`calibrator` must have a misprediction_proba(logits) method, got "
                            f"{type(calibrator).__name__}")
        self.calibrator = calibrator
        self.ignore_index = ignore_index
        if calibrator is not None and (not isinstance(calibrator, Estimator) or calibrator.is_fitted()):
            self.calibrator_ = calibrator

    def fit(self, batches: Any) -> SelectiveDetector:
        """Fit a new SelectiveScaling on ``batches`` (anything its ``fit`` accepts: a LogitsStore, a list of
        batches, a callable); returns self."""
        if isinstance(self.calibrator, Estimator):
            cal = clone(self.calibrator).set_params(ignore_index=self.ignore_index)
        else:
            from segcal.calibrators import SelectiveScaling  # lazy: optional sibling package

            cal = SelectiveScaling(base=None, ignore_index=self.ignore_index)
        self.calibrator_ = cal.fit(batches)
        return self

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        if "calibrator_" not in self.__dict__:
            raise NotFittedError("SelectiveDetector has no calibrator: pass a fitted SelectiveScaling or call fit")
        return self.calibrator_.misprediction_proba(as_compute(logits))

    __call__ = score
