"""The detector family of the method contract (:mod:`segcal._estimator`): base class and registry.

Every detector has ``score(logits, features=None, images=None) -> (N, H, W)`` (higher = more anomalous) and
``fit(batches) -> self``; closed-form scores declare ``requires_fit = False`` and their ``fit`` does nothing. A subclass
of :class:`Detector` that declares ``name = "..."`` is registered in :data:`DETECTORS` when it is defined.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from segcal._estimator import Estimator, NotFittedError, Registry, check_is_fitted, clone

#: Every detector class that declares a ``name``, by name (filled by the classes themselves).
DETECTORS = Registry("detector", "segcal.detectors")


class Detector(Estimator):
    """Base class of detectors: ``fit(batches)`` → self, ``score(logits, features=None, images=None)`` → ``(N, H, W)``.

    ``batches`` is anything the fit of the method accepts — at least a ``LogitsStore``, a list of batches, or a
    zero-argument callable returning an iterator of dicts with ``logits`` (N, C, H, W), ``target`` (N, H, W) and,
    when the class declares it needs them, ``features`` (N, F, h, w) / ``images`` (N, 3, H, W) in [0, 1].
    """

    _registry = DETECTORS

    def fit(self, batches: Any) -> Detector:
        """Learn from ``batches``; closed-form detectors (``requires_fit = False``) return self unchanged."""
        if self.requires_fit:  # pragma: no cover - learned detectors override fit
            raise NotImplementedError(f"{type(self).__name__} declares requires_fit but does not implement fit")
        return self

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        """Per-pixel score ``(N, H, W)``, higher = more likely an error / OOD pixel."""
        raise NotImplementedError  # pragma: no cover - abstract


def get_detector(name: str, **kwargs: Any) -> Any:
    """Unfitted detector registered as ``name`` (see :data:`DETECTORS`; case-insensitive, ``_`` ≡ ``-``, the class
    name works too), with hyperparameters ``kwargs``.

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> import torch
        >>> get_detector("energy", temperature=2.0).score(torch.zeros(1, 3, 2, 2)).shape
        torch.Size([1, 2, 2])
    """
    return DETECTORS.create(name, **kwargs)


__all__ = ["DETECTORS", "Detector", "NotFittedError", "check_is_fitted", "clone", "get_detector"]
