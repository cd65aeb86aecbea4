"""One-shot functional twins of :class:`CalibrationMetrics` and :class:`DetectionMetrics`.

Each function runs the same private ``_format`` -> ``_update`` -> ``_compute`` steps as the classes, so a function
and a class fed the same data cannot disagree. See the classes for the definitions and references.

Example:
    >>> import torch
    >>> from segcal.metrics import functional as F
    >>> logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    >>> 0.0 <= float(F.ece(logits, target)) <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor

from segcal.metrics.calibration import (
    _compute_calibration,
    _format_calibration,
    _make_config,
    _update_calibration,
)
from segcal.metrics.detection import DetectionMetrics

__all__ = [
    "adaptive_ece", "auroc", "average_precision", "brier", "calibration_metrics", "classwise_ece",
    "detection_metrics", "ece", "fpr_at_tpr", "mce", "miou", "nll", "overconfidence_error",
]


def calibration_metrics(preds: Tensor, target: Tensor, n_bins: int = 15, ignore_index: int | None = 255,
                        input: str = "logits", exclude_classes: Iterable[int] | None = None,
                        boundary_width: int | None = None, ace_resolution: int = 2**16,
                        classwise: bool = True) -> dict[str, Tensor]:
    """Every value of :class:`CalibrationMetrics` for one (N, C, H, W) / (N, H, W) batch; C from ``preds``."""
    if not isinstance(preds, Tensor) or preds.ndim != 4:
        shape = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
        raise ValueError(f"`preds` must be a (N, C, H, W) tensor, got {shape}")
    cfg = _make_config(int(preds.shape[1]), n_bins, ignore_index, input, exclude_classes, boundary_width,
                       ace_resolution, classwise)
    preds, target = _format_calibration(preds, target, cfg)
    return _compute_calibration(_update_calibration(preds, target, cfg), cfg)


def _one(key: str, classwise: bool = False) -> Callable[..., Tensor]:
    def f(preds: Tensor, target: Tensor, n_bins: int = 15, ignore_index: int | None = 255,
          input: str = "logits", exclude_classes: Iterable[int] | None = None) -> Tensor:
        return calibration_metrics(preds, target, n_bins, ignore_index, input, exclude_classes,
                                   classwise=classwise)[key]
    f.__name__ = key
    return f


ece = _one("ece")
ece.__doc__ = "Top-label equal-width ECE, ``sum_b |B_b|/N |acc_b - conf_b|`` (see CalibrationMetrics)."
mce = _one("mce")
mce.__doc__ = "Maximum calibration error, ``max_b |acc_b - conf_b|`` over non-empty bins."
adaptive_ece = _one("ace")
adaptive_ece.__doc__ = "Equal-mass ECE (ACE) from the fine confidence histogram."
classwise_ece = _one("cw_ece", classwise=True)
classwise_ece.__doc__ = "Mean over classes of the equal-width ECE of ``p_k`` against ``1[y = k]``."
nll = _one("nll")
nll.__doc__ = "Mean negative log-likelihood ``mean(-log p_y)`` over valid pixels."
brier = _one("brier")
brier.__doc__ = "Mean multiclass Brier score ``mean(sum_k (p_k - 1[y=k])^2)``."
overconfidence_error = _one("oe")
overconfidence_error.__doc__ = "Over-confidence error ``sum_b |B_b|/N conf_b max(conf_b - acc_b, 0)``."
miou = _one("miou")
miou.__doc__ = "Mean IoU over classes with a non-empty union."


def detection_metrics(scores: Tensor, positive: Tensor, valid: Tensor | None = None, n_thresholds: int = 2**19,
                      exact: bool = False, score_range: tuple[float, float] | None = None,
                      per_image: bool = False) -> dict[str, Tensor]:
    """Every value of :class:`DetectionMetrics` for one batch of (N, H, W) scores."""
    m = DetectionMetrics(n_thresholds=n_thresholds, exact=exact, score_range=score_range, per_image=per_image)
    m.update(scores, positive, valid)
    return m.compute()


def auroc(scores: Tensor, positive: Tensor, valid: Tensor | None = None, n_thresholds: int = 2**19,
          exact: bool = False, score_range: tuple[float, float] | None = None) -> Tensor:
    """Area under the ROC curve of ``scores`` for the ``positive`` pixels (ties count one half)."""
    return detection_metrics(scores, positive, valid, n_thresholds, exact, score_range)["auroc"]


def average_precision(scores: Tensor, positive: Tensor, valid: Tensor | None = None, n_thresholds: int = 2**19,
                      exact: bool = False, score_range: tuple[float, float] | None = None) -> Tensor:
    """Average precision ``sum_i (R_i - R_{i-1}) P_i`` (sklearn's ``average_precision_score``)."""
    return detection_metrics(scores, positive, valid, n_thresholds, exact, score_range)["ap"]


def fpr_at_tpr(scores: Tensor, positive: Tensor, valid: Tensor | None = None, n_thresholds: int = 2**19,
               exact: bool = False, score_range: tuple[float, float] | None = None) -> Tensor:
    """FPR at the highest threshold whose TPR reaches 0.95 (FPR95)."""
    return detection_metrics(scores, positive, valid, n_thresholds, exact, score_range)["fpr95"]
