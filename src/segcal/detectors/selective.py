"""Selective-Scaling misprediction probability as a detector score."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from segcal.detectors._batches import BatchSource
from segcal.detectors._scores import as_compute


class SelectiveDetector:
    """Wrap a fitted ``segcal.calibrators.SelectiveScaling``: score = its ``misprediction_proba(logits)``.

    ``segcal.calibrators`` is imported only when :meth:`fit` has to build a calibrator, so the detectors package does
    not depend on it at import time.

    Args:
        calibrator: a fitted SelectiveScaling (or any object with ``misprediction_proba(logits) -> (N, H, W)``);
            ``None`` to build one with ``SelectiveScaling(**calibrator_kwargs)`` in :meth:`fit`.
        **calibrator_kwargs: forwarded to ``SelectiveScaling`` when it is built here.

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

    def __init__(self, calibrator: Any = None, **calibrator_kwargs: Any) -> None:
        if calibrator is not None and not hasattr(calibrator, "misprediction_proba"):
            raise TypeError(f"`calibrator` must have a misprediction_proba(logits) method, got "
                            f"{type(calibrator).__name__}")
        self.calibrator = calibrator
        self.calibrator_kwargs = calibrator_kwargs

    def fit(self, batches: BatchSource) -> SelectiveDetector:
        """Fit a new SelectiveScaling on ``batches`` (anything its ``fit`` accepts: a LogitsStore, a list of
        batches, a callable), returns self."""
        from segcal.calibrators import SelectiveScaling  # lazy: optional sibling package

        self.calibrator = SelectiveScaling(**self.calibrator_kwargs).fit(batches)
        return self

    def score(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        if self.calibrator is None:
            raise RuntimeError("SelectiveDetector has no calibrator: pass a fitted SelectiveScaling or call fit")
        return self.calibrator.misprediction_proba(as_compute(logits))

    __call__ = score
