"""Scalar calibration metrics in the torchmetrics idiom: one ``torchmetrics.Metric`` per number.

Each class is a :class:`~segcal.metrics.CalibrationMetrics` whose ``compute()`` returns one float64 scalar tensor
instead of the dict, so ``self.log("val/ece", metric, on_epoch=True)`` works in Lightning and ``.plot()`` works as in
torchmetrics. There is no second implementation: the states, ``update`` (``_format_calibration`` ->
``_update_calibration``) and ``compute`` (``_compute_calibration``) are those of ``CalibrationMetrics``, so a scalar
metric equals the matching key of ``CalibrationMetrics(...).compute()`` exactly (same bits).

In one :class:`torchmetrics.MetricCollection` the scalar metrics share one pass: their states have the same names,
shapes and values, so torchmetrics' compute groups put them in one group and ``update`` runs once per batch for all
of them. Every metric therefore keeps the full state (classwise histogram included, as ``CalibrationMetrics`` does by
default); pass ``classwise=False`` to every non-classwise metric of a collection to skip the classwise histogram.
A small ``config_key`` state (a checksum of the arguments that change ``update`` without changing a state's shape)
keeps metrics with different ``ignore_index`` / ``input`` / ``exclude_classes`` / ``boundary_width`` /
``classwise`` out of each other's groups.

Example:
    >>> import torch
    >>> from torchmetrics import MetricCollection
    >>> from segcal.metrics import ExpectedCalibrationError, NegativeLogLikelihood
    >>> ece = ExpectedCalibrationError(num_classes=3, n_bins=15, ignore_index=255)
    >>> ece.update(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
    >>> ece.compute().ndim
    0
    >>> both = MetricCollection({"ece": ExpectedCalibrationError(3), "nll": NegativeLogLikelihood(3)})
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from segcal.metrics.calibration import CalibrationMetrics, _compute_calibration
from segcal.metrics.detection import DetectionMetrics

__all__ = [
    "AdaptiveCalibrationError", "BrierScore", "ClasswiseCalibrationError", "DetectionAUROC",
    "DetectionAveragePrecision", "DetectionFPR95", "ExpectedCalibrationError", "MaximumCalibrationError",
    "NegativeLogLikelihood", "OverconfidenceError",
]


def _config_key(metric: CalibrationMetrics) -> int:
    """Deterministic checksum (same in every process) of the settings that do not show in the state shapes."""
    c = metric._cfg
    text = repr((c.ignore_index, c.input, c.exclude_classes, c.boundary_width, c.classwise))
    return zlib.crc32(text.encode())


class _ScalarCalibrationMetric(CalibrationMetrics):
    """Shared body of the scalar metrics: ``compute()`` -> ``_compute_calibration(...)[_key]``."""

    _key: ClassVar[str]
    _needs_classwise: ClassVar[bool] = False
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = 1.0

    def __init__(self, num_classes: int, n_bins: int = 15, ignore_index: int | None = 255, input: str = "logits",
                 exclude_classes: Iterable[int] | None = None, boundary_width: int | None = None,
                 ace_resolution: int = 2**16, classwise: bool = True, validate_args: bool = True,
                 **kwargs: Any) -> None:
        if self._needs_classwise and not classwise:
            raise ValueError(f"`classwise` must be True for {type(self).__name__}")
        super().__init__(num_classes, n_bins=n_bins, ignore_index=ignore_index, input=input,
                         exclude_classes=exclude_classes, boundary_width=boundary_width,
                         ace_resolution=ace_resolution, classwise=classwise, validate_args=validate_args, **kwargs)
        # "max" keeps the value under DDP sync (every process holds the same checksum).
        self.add_state("config_key", default=torch.tensor(_config_key(self), dtype=torch.int64),
                       dist_reduce_fx="max")

    def compute(self) -> Tensor:
        """States -> the metric value (float64 scalar tensor; NaN when no valid pixel was seen)."""
        return _compute_calibration(self._states(), self._cfg)[self._key]

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot one value or a sequence of values (e.g. one per epoch), as torchmetrics' ``Metric.plot``.

        Args:
            val: a result of ``compute()``/``forward()`` or a list of them; ``None`` plots ``compute()``.
            ax: matplotlib axes to draw on (a new figure otherwise).

        Returns:
            ``(fig, ax)``. For a reliability diagram use :class:`segcal.metrics.ReliabilityDisplay`.
        """
        return self._plot(val, ax)


class ExpectedCalibrationError(_ScalarCalibrationMetric):
    r"""Top-label expected calibration error over equal-width bins (``CalibrationMetrics`` key ``ece``).

    .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,|\mathrm{acc}_b - \mathrm{conf}_b|

    Args: as :class:`~segcal.metrics.CalibrationMetrics`.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.
    """

    _key = "ece"


class MaximumCalibrationError(_ScalarCalibrationMetric):
    r"""Largest per-bin gap over non-empty equal-width bins (key ``mce``).

    .. math:: \mathrm{MCE} = \max_{b:\,|B_b|>0} |\mathrm{acc}_b - \mathrm{conf}_b|

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.
    """

    _key = "mce"


class AdaptiveCalibrationError(_ScalarCalibrationMetric):
    r"""ECE over ``n_bins`` equal-mass bins of the sorted confidences (key ``ace``), from the fine histogram.

    The distance to the sorted-pixel value is bounded by ``CalibrationMetrics(...).compute()["ace_error_bound"]``.

    References:
        Nixon et al., "Measuring Calibration in Deep Learning", CVPRW 2019, arXiv:1904.01685.
    """

    _key = "ace"


class ClasswiseCalibrationError(_ScalarCalibrationMetric):
    r"""Mean over classes of the equal-width ECE of :math:`p_k` against :math:`1[y = k]` (key ``cw_ece``).

    .. math:: \mathrm{cwECE} = \frac{1}{C} \sum_k \sum_b \frac{1}{N}\Big|\sum_{i \in B_{kb}} (1[y_i = k] - p_{ik})\Big|

    References:
        Nixon et al., "Measuring Calibration in Deep Learning", CVPRW 2019, arXiv:1904.01685;
        Kull et al., "Beyond temperature scaling", NeurIPS 2019, arXiv:1910.12656.
    """

    _key = "cw_ece"
    _needs_classwise = True


class NegativeLogLikelihood(_ScalarCalibrationMetric):
    r"""Mean negative log-likelihood of the label over valid pixels (key ``nll``).

    .. math:: \mathrm{NLL} = -\frac{1}{N} \sum_i \log p_{i, y_i}

    References:
        Quiñonero-Candela et al., "Evaluating Predictive Uncertainty Challenge", MLCW 2005.
    """

    _key = "nll"
    plot_upper_bound = None


class BrierScore(_ScalarCalibrationMetric):
    r"""Mean multiclass Brier score (key ``brier``), :math:`\frac1N\sum_i \sum_k (p_{ik} - 1[y_i = k])^2 \in [0, 2]`.

    References:
        Brier, "Verification of forecasts expressed in terms of probability", Monthly Weather Review 1950.
    """

    _key = "brier"
    plot_upper_bound = 2.0


class OverconfidenceError(_ScalarCalibrationMetric):
    r"""Over-confidence error (key ``oe``): the ECE terms of over-confident bins, weighted by their confidence.

    .. math:: \mathrm{OE} = \sum_b \frac{|B_b|}{N}\,\mathrm{conf}_b\,\max(\mathrm{conf}_b - \mathrm{acc}_b, 0)

    References:
        Thulasidasan et al., "On Mixup Training", NeurIPS 2019, arXiv:1905.11001.
    """

    _key = "oe"


class _ScalarDetectionMetric(DetectionMetrics):
    """Shared body of the scalar detection metrics: ``DetectionMetrics.compute()[_key]`` (same states and steps).

    In one ``MetricCollection`` with the same arguments they form one compute group, like the calibration scalars.
    """

    _key: ClassVar[str]
    is_differentiable = False
    full_state_update = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = 1.0

    def compute(self) -> Tensor:
        """States -> the metric value (float64 scalar; NaN without both positive and negative pixels)."""
        return super().compute()[self._key]

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot one value or a sequence of values as torchmetrics' ``Metric.plot``; returns ``(fig, ax)``."""
        return self._plot(val, ax)


class DetectionAUROC(_ScalarDetectionMetric):
    """Pooled pixel AUROC of a score for the positive (error / OOD) pixels (``DetectionMetrics`` key ``auroc``).

    Args: as :class:`~segcal.metrics.DetectionMetrics`.
    """

    _key = "auroc"
    higher_is_better = True


class DetectionAveragePrecision(_ScalarDetectionMetric):
    """Pooled pixel average precision, positives as the positive class (key ``ap``)."""

    _key = "ap"
    higher_is_better = True


class DetectionFPR95(_ScalarDetectionMetric):
    """False-positive rate at the highest threshold whose TPR reaches 95 % (key ``fpr95``)."""

    _key = "fpr95"
    higher_is_better = False
