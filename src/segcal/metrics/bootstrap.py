r"""Paired bootstrap over images for the difference of a calibration metric between two methods.

Pixels of one image are strongly correlated, so a confidence interval must resample **images**, not pixels
(Efron & Tibshirani 1993, ch. 6, 16). Every pooled calibration metric of :class:`CalibrationMetrics` is a function
of sums over images of per-image states (per-bin count, correct count and confidence sum; NLL / Brier sums;
confusion matrix), so a resample is a weighted sum of per-image states — no pixel is read twice:

.. math::
    S^{*} = \sum_i w_i\, S_i,\quad w = \mathrm{bincount}(i^{*}_1, \dots, i^{*}_n),\quad
    \Delta^{*} = m(S^{*}_A) - m(S^{*}_B)

with the same resampled indices :math:`i^*` for both methods (paired: the image effect cancels). The interval is the
percentile interval of :math:`\Delta^{*}` over ``n_resamples`` resamples; the difference is *significant* when the
interval excludes 0.

:class:`PerImageCalibrationStats` collects the per-image states with ``CalibrationMetrics``' own private steps
(``_format_calibration``, ``_update_calibration`` called per image, ``_compute_calibration`` on the recombined
sums), so a resample of all images once equals ``CalibrationMetrics`` on the same data (up to the per-update
fixed-point rounding, < 1e-12). Memory is O(images x (3 n_bins + C^2)) int64 (+ 3 C n_bins with ``classwise``):
about 2 KB per image at 11 classes and 15 bins. ``ace`` is not supported (its fine histogram would cost 0.5 MB per
image).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from segcal.metrics.calibration import (
    _compute_calibration,
    _format_calibration,
    _make_config,
    _state_shapes,
    _update_calibration,
    _zero_states,
)

__all__ = ["PerImageCalibrationStats", "bootstrap_indices", "paired_bootstrap"]

# States that are sums over images (everything but the adaptive-ECE fine histogram).
_FINE = ("fine_count", "fine_correct", "fine_conf")
_CLASSWISE = ("cw_pos", "cw_conf")


class PerImageCalibrationStats(Metric):
    """Per-image sufficient statistics of the pooled calibration metrics, for :func:`paired_bootstrap`.

    Args:
        num_classes, n_bins, ignore_index, input, exclude_classes, boundary_width: as
            :class:`~segcal.metrics.CalibrationMetrics`.
        classwise: also keep the per-image classwise histogram (needed for ``cw_ece``; 3 C n_bins int64 per image).
        validate_args: check every batch (``False`` skips the checks, as torchmetrics).

    ``compute()`` returns ``{state name: (n_images, ...) int64}``; images are kept in update order (under DDP,
    gathered in rank order), which is what pairs two collectors fed the same images in the same order.

    Example:
        >>> s = PerImageCalibrationStats(num_classes=3)
        >>> s.update(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8)))
        >>> s.n_images, tuple(s.compute()["bin_count"].shape)
        (4, (4, 1, 15))
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes: int, n_bins: int = 15, ignore_index: int | None = 255, input: str = "logits",
                 exclude_classes: Iterable[int] | None = None, boundary_width: int | None = None,
                 classwise: bool = False, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The fine histogram is not kept per image; the smallest resolution keeps the per-image step cheap.
        self._cfg = _make_config(num_classes, n_bins, ignore_index, input, exclude_classes, boundary_width, 16,
                                 bool(classwise))
        self.num_classes, self.n_bins, self.ignore_index, self.input = num_classes, n_bins, ignore_index, input
        self.exclude_classes, self.boundary_width, self.classwise = self._cfg.exclude_classes, boundary_width, classwise
        self.validate_args = bool(validate_args)
        self._names = tuple(k for k in _state_shapes(self._cfg) if k not in _FINE
                            and (classwise or k not in _CLASSWISE))
        for name in self._names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of (N, C, H, W) scores and (N, H, W) labels: N per-image rows."""
        if self.validate_args:
            preds, target = _format_calibration(preds, target, self._cfg)
        for i in range(preds.shape[0]):
            inc = _update_calibration(preds[i: i + 1], target[i: i + 1], self._cfg)
            for name in self._names:
                getattr(self, name).append(inc[name].unsqueeze(0))

    @property
    def n_images(self) -> int:
        first = getattr(self, self._names[0])
        return int(first.shape[0]) if isinstance(first, Tensor) else sum(int(t.shape[0]) for t in first)

    def compute(self) -> dict[str, Tensor]:
        """``{state: (n_images, ...) int64}`` (an empty collector gives ``n_images = 0`` rows)."""
        shapes = _state_shapes(self._cfg)
        out = {}
        for name in self._names:
            v = getattr(self, name)
            if isinstance(v, Tensor):
                out[name] = v
            else:
                out[name] = torch.cat(v) if v else torch.zeros((0, *shapes[name]), dtype=torch.int64)
        return out

    def pooled(self, weights: Tensor | None = None) -> dict[str, Tensor]:
        """``CalibrationMetrics``' values from the per-image states summed with integer ``weights`` (n_images,).

        ``weights=None`` sums every image once (the full-data value).
        """
        return _values(self.compute(), self._cfg, weights)


def _values(per_image: dict[str, Tensor], cfg: Any, weights: Tensor | None) -> dict[str, Tensor]:
    device = next(iter(per_image.values())).device
    states = _zero_states(cfg, device)
    for name, rows in per_image.items():
        if weights is None:
            states[name] = rows.sum(0)
        else:
            w = weights.to(rows.device, torch.int64).view(-1, *([1] * (rows.ndim - 1)))
            states[name] = (rows * w).sum(0)
    return _compute_calibration(states, cfg)


def bootstrap_indices(n_images: int, n_resamples: int, seed: int) -> Tensor:
    """(n_resamples, n_images) image indices drawn with replacement; the same seed gives the same indices."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"`n_images` must be a positive int, got {n_images!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"`n_resamples` must be a positive int, got {n_resamples!r}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_images, (n_resamples, n_images), generator=g)


def _resampled_diffs(a: PerImageCalibrationStats, b: PerImageCalibrationStats, metric: str,
                     indices: Tensor) -> Tensor:
    sa, sb = a.compute(), b.compute()
    n = a.n_images
    out = torch.empty(indices.shape[0], dtype=torch.float64)
    for r, idx in enumerate(indices):
        w = torch.bincount(idx, minlength=n)
        out[r] = _values(sa, a._cfg, w)[metric] - _values(sb, b._cfg, w)[metric]
    return out


def paired_bootstrap(a: PerImageCalibrationStats, b: PerImageCalibrationStats, metric: str = "ece", *,
                     n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over images of ``metric(a) - metric(b)`` (e.g. ECE(TS) - ECE(uncalibrated)).

    Args:
        a, b: collectors fed the same images in the same order (e.g. calibrated and uncalibrated logits).
        metric: a key of ``CalibrationMetrics.compute()`` that is a pooled scalar: ece, mce, oe, accuracy, nll,
            brier, miou, image_ece, cw_ece (with ``classwise=True``), boundary_ece / interior_ece (with
            ``boundary_width``). ``ace`` is not supported.
        n_resamples: bootstrap resamples.
        level: two-sided coverage of the percentile interval.
        seed: seed of the resampling (:func:`bootstrap_indices`); the same seed gives the same interval.

    Returns:
        ``{metric, diff, low, high, level, n_resamples, seed, significant}`` (python floats / ints / bool): ``diff``
        on all images, ``[low, high]`` the percentile interval, ``significant`` = the interval excludes 0.
    """
    for name, s in (("a", a), ("b", b)):
        if not isinstance(s, PerImageCalibrationStats):
            raise TypeError(f"`{name}` must be a PerImageCalibrationStats, got {type(s).__name__}")
    if a.n_images != b.n_images:
        raise ValueError(f"`a` and `b` must hold the same images (paired), got {a.n_images} and {b.n_images} images")
    if a.n_images == 0:
        raise ValueError("`a` and `b` hold no image")
    if (a.n_bins, a.num_classes, a.ignore_index, a.exclude_classes, a.boundary_width) != \
            (b.n_bins, b.num_classes, b.ignore_index, b.exclude_classes, b.boundary_width):
        raise ValueError("`a` and `b` must use the same num_classes, n_bins, ignore_index, exclude_classes and "
                         "boundary_width")
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"`level` must be a float in (0, 1), got {level!r}")
    full_a, full_b = a.pooled(), b.pooled()
    if metric in ("ace", "ace_error_bound") or metric not in full_a or full_a[metric].ndim != 0:
        supported = sorted(k for k, v in full_a.items() if v.ndim == 0 and not k.startswith("ace")
                           and k != "n_pixels")
        raise ValueError(f"`metric` must be one of {supported}, got {metric!r}")
    diffs = _resampled_diffs(a, b, metric, bootstrap_indices(a.n_images, n_resamples, seed))
    diffs = diffs[~torch.isnan(diffs)]
    alpha = (1.0 - level) / 2.0
    if diffs.numel():
        low, high = (float(v) for v in torch.quantile(diffs, torch.tensor([alpha, 1.0 - alpha],
                                                                          dtype=torch.float64)))
    else:
        low = high = math.nan
    return {"metric": metric, "diff": float(full_a[metric] - full_b[metric]), "low": low, "high": high,
            "level": level, "n_resamples": n_resamples, "seed": int(seed),
            "significant": bool(low > 0.0 or high < 0.0)}
