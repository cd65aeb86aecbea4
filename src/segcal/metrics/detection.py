"""Pixel-level error / OOD detection metrics: AUROC, average precision and FPR at 95% TPR.

Shared private steps for the class and the functional twins: ``_format_detection`` (validate), ``_score_key``
(score -> histogram bin), ``_update_detection`` (batch -> state increments), ``_rank_metrics`` (per-threshold
positive/negative counts -> values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from segcal._checks import check_finite, check_tensor
from segcal.metrics._binning import IMAGE_SCALE, from_fixed, to_fixed

_OCTAVES = 64
_MIN_EXP = -40  # |s| < 2**-40 shares the zero bin; |s| >= 2**24 shares the last bin of its sign.


def _format_detection(scores: object, positive: object, valid: object | None) -> tuple[Tensor, Tensor, Tensor]:
    scores = check_tensor(scores, "scores")
    positive = check_tensor(positive, "positive")
    if scores.ndim != 3:
        raise ValueError(f"`scores` must have shape (N, H, W), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"`scores` must be a floating tensor, got {scores.dtype}")
    check_finite(scores, "scores")
    if positive.shape != scores.shape:
        raise ValueError(f"`positive` shape {tuple(positive.shape)} does not match `scores` {tuple(scores.shape)}")
    if positive.dtype != torch.bool:
        raise TypeError(f"`positive` must be a bool tensor, got {positive.dtype}")
    if valid is None:
        valid = torch.ones_like(positive)
    else:
        valid = check_tensor(valid, "valid")
        if valid.shape != scores.shape or valid.dtype != torch.bool:
            raise ValueError(f"`valid` must be a bool tensor of shape {tuple(scores.shape)}, got "
                             f"{valid.dtype} {tuple(valid.shape)}")
    return scores, positive, valid


def _n_bins(n_thresholds: int, score_range: tuple[float, float] | None) -> int:
    if score_range is not None:
        return n_thresholds
    return 2 * _OCTAVES * (n_thresholds // (2 * _OCTAVES)) + 1


def _score_key(s: Tensor, n_thresholds: int, score_range: tuple[float, float] | None) -> Tensor:
    """Monotone non-decreasing map from real scores to histogram bins ``[0, _n_bins)``.

    With ``score_range=(lo, hi)``: ``n_thresholds`` equal-width bins on ``[lo, hi]``, values outside clamped to the
    end bins. Without: a sign-symmetric logarithmic ("float-like") scale, ``K = n_thresholds // 128`` bins per
    octave of ``|s|`` over ``[2**-40, 2**24)``, so the relative resolution ``2**(1/K) - 1`` (5e-4 at the default)
    is the same at every magnitude and any finite score fits.
    """
    if score_range is not None:
        lo, hi = score_range
        t = (s.to(torch.float64) - lo) * (n_thresholds / (hi - lo))
        return t.floor().clamp_(0, n_thresholds - 1).to(torch.int64)
    k = n_thresholds // (2 * _OCTAVES)
    a = s.abs()
    mant, ex = torch.frexp(a)
    octave = (ex.to(torch.int64) - (_MIN_EXP + 1)).clamp_(0, _OCTAVES - 1)
    pos = ((mant.to(torch.float64) - 0.5) * (2 * k)).to(torch.int64).clamp_(0, k - 1)
    big = ex.to(torch.int64) > _MIN_EXP + _OCTAVES
    mag = torch.where(big, _OCTAVES * k - 1, octave * k + pos)
    mid = _OCTAVES * k
    key = torch.where(s > 0, mid + 1 + mag, mid - 1 - mag)
    return torch.where(a < 2.0**_MIN_EXP, mid, key)


def _rank_metrics(pos: Tensor, neg: Tensor, tpr_level: float = 0.95) -> dict[str, Tensor]:
    """AUROC, AP and FPR@TPR from per-threshold counts ordered by ascending score (ties share a threshold).

    AUROC is the trapezoidal area under the ROC curve (ties count one half), AP is
    ``sum_i (R_i - R_{i-1}) P_i`` over thresholds in descending order (sklearn's definition) and FPR95 is the FPR
    at the highest threshold whose TPR reaches ``tpr_level``.
    """
    nan = torch.tensor(math.nan, dtype=torch.float64)
    keep = (pos + neg) > 0
    tp = pos[keep].flip(0).to(torch.float64).cumsum(0)
    fp = neg[keep].flip(0).to(torch.float64).cumsum(0)
    if tp.numel() == 0 or tp[-1] == 0 or fp[-1] == 0:
        return {"auroc": nan, "ap": nan, "fpr95": nan}
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), tp / tp[-1]])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), fp / fp[-1]])
    auroc = torch.trapezoid(tpr, fpr)
    ap = ((tpr[1:] - tpr[:-1]) * (tp / (tp + fp))).sum()
    i = int(torch.searchsorted(tpr, torch.tensor([tpr_level - 1e-12], dtype=torch.float64)))
    return {"auroc": auroc, "ap": ap, "fpr95": fpr[min(i, len(fpr) - 1)]}


def _curves(pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
    keep = (pos + neg) > 0
    tp = pos[keep].flip(0).to(torch.float64).cumsum(0)
    fp = neg[keep].flip(0).to(torch.float64).cumsum(0)
    z = torch.zeros(1, dtype=torch.float64)
    p_all, n_all = tp[-1] if tp.numel() else z[0], fp[-1] if fp.numel() else z[0]
    return {
        "fpr": torch.cat([z, fp / n_all]), "tpr": torch.cat([z, tp / p_all]),
        "recall": tp / p_all, "precision": tp / (tp + fp),
    }


def _exact_counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Per distinct score (ascending): positive and negative counts."""
    uniq, inv = torch.unique(scores.to(torch.float64), return_inverse=True)
    pos = torch.bincount(inv[positive], minlength=len(uniq))
    neg = torch.bincount(inv[~positive], minlength=len(uniq))
    return pos, neg


def _update_detection(scores: Tensor, positive: Tensor, valid: Tensor, n_thresholds: int,
                      score_range: tuple[float, float] | None, exact: bool, per_image: bool) -> dict[str, Tensor]:
    """One validated batch -> increments of the sum states (histograms and per-image sums)."""
    out: dict[str, Tensor] = {}
    nb = _n_bins(n_thresholds, score_range)
    if not exact:
        key = _score_key(scores[valid], n_thresholds, score_range)
        pv = positive[valid]
        out["hist_pos"] = torch.bincount(key[pv], minlength=nb)
        out["hist_neg"] = torch.bincount(key[~pv], minlength=nb)
    if per_image:
        sums = torch.zeros(3, dtype=torch.float64)
        count = torch.zeros((), dtype=torch.int64)
        for i in range(scores.shape[0]):
            v = valid[i]
            if exact:
                pos, neg = _exact_counts(scores[i][v], positive[i][v])
            else:
                key = _score_key(scores[i][v], n_thresholds, score_range)
                pv = positive[i][v]
                pos, neg = torch.bincount(key[pv], minlength=nb), torch.bincount(key[~pv], minlength=nb)
            r = _rank_metrics(pos, neg)
            if not math.isnan(float(r["auroc"])):
                sums += torch.stack([r["auroc"], r["ap"], r["fpr95"]])
                count += 1
        out["img_sums"] = to_fixed(sums, IMAGE_SCALE)
        out["img_count"] = count
    return out


class DetectionMetrics(Metric):
    r"""Pixel-level detection of errors / OOD pixels from a score (higher = more likely positive).

    .. math::
        \mathrm{AUROC} = \int \mathrm{TPR}\, d\mathrm{FPR},\quad
        \mathrm{AP} = \sum_i (R_i - R_{i-1}) P_i,\quad
        \mathrm{FPR95} = \mathrm{FPR}(t^*),\ t^* = \max\{t : \mathrm{TPR}(t) \ge 0.95\}

    Pooled over all valid pixels. Binned mode (default) keeps two fixed-size histograms of the scores of positive
    and negative pixels; the bin map is monotone, so it only merges scores that fall in the same bin (see
    ``_score_key``: a logarithmic scale with 5e-4 relative resolution at every magnitude, or ``score_range``).
    ``exact=True`` keeps every valid score (memory grows with the data) and equals sklearn's ``roc_auc_score`` /
    ``average_precision_score``.

    With ``per_image=True`` the three values are also computed per image and averaged (``*_per_image`` keys) over
    images that have at least one positive and one negative valid pixel; other images are skipped.

    Args:
        n_thresholds: histogram resolution (number of bins of ``score_range``; without a range, bins per octave
            are ``n_thresholds // 128``).
        exact: keep the scores and compute exactly.
        score_range: optional ``(lo, hi)`` for equal-width bins; scores outside are clamped into the end bins.
        per_image: also report per-image averages.

    Shape:
        - scores: :math:`(N, H, W)` float; positive, valid: :math:`(N, H, W)` bool

    Returns:
        ``compute()`` -> dict of float64 scalars: auroc, ap, fpr95, n_positive, n_negative (+ auroc_per_image,
        ap_per_image, fpr95_per_image, n_images); NaN when positives or negatives are missing.

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017,
        arXiv:1610.02136.

    Example:
        >>> m = DetectionMetrics()
        >>> s = torch.tensor([[[0.1, 0.9], [0.2, 0.8]]])
        >>> m.update(s, s > 0.5)
        >>> float(m.compute()["auroc"])
        1.0
    """

    is_differentiable = False
    higher_is_better = None  # mixed: AUROC and AP (higher is better) next to FPR95 (lower is better)
    full_state_update = False

    def __init__(self, n_thresholds: int = 2**17, exact: bool = False,
                 score_range: tuple[float, float] | None = None, per_image: bool = False,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        if isinstance(n_thresholds, bool) or not isinstance(n_thresholds, int) or n_thresholds < 2:
            raise ValueError(f"`n_thresholds` must be an int >= 2, got {n_thresholds!r}")
        if score_range is None and n_thresholds < 2 * _OCTAVES:
            raise ValueError(f"`n_thresholds` must be >= {2 * _OCTAVES} without a `score_range`")
        if score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"`score_range` must be finite (lo, hi) with lo < hi, got {score_range!r}")
            score_range = (lo, hi)
        self.n_thresholds, self.exact, self.score_range, self.per_image = n_thresholds, exact, score_range, per_image
        if exact:
            self.add_state("scores", default=[], dist_reduce_fx="cat")
            self.add_state("labels", default=[], dist_reduce_fx="cat")
        else:
            nb = _n_bins(n_thresholds, score_range)
            self.add_state("hist_pos", default=torch.zeros(nb, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state("hist_neg", default=torch.zeros(nb, dtype=torch.int64), dist_reduce_fx="sum")
        if per_image:
            self.add_state("img_sums", default=torch.zeros(3, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state("img_count", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, positive: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch of (N, H, W) scores, positive mask and optional valid mask."""
        scores, positive, valid = _format_detection(scores, positive, valid)
        inc = _update_detection(scores, positive, valid, self.n_thresholds, self.score_range, self.exact,
                                self.per_image)
        for k, v in inc.items():
            setattr(self, k, getattr(self, k) + v)
        if self.exact:
            self.scores.append(scores[valid].to(torch.float64))
            self.labels.append(positive[valid])

    def _counts(self) -> tuple[Tensor, Tensor]:
        if self.exact:
            s = _cat(self.scores, torch.float64)
            y = _cat(self.labels, torch.bool)
            return _exact_counts(s, y)
        return self.hist_pos, self.hist_neg

    def compute(self) -> dict[str, Tensor]:
        """States -> auroc, ap, fpr95 (pooled) and per-image averages when enabled."""
        pos, neg = self._counts()
        out = _rank_metrics(pos, neg)
        out["n_positive"] = pos.sum().to(torch.float64)
        out["n_negative"] = neg.sum().to(torch.float64)
        if self.per_image:
            n = self.img_count.to(torch.float64)
            vals = (from_fixed(self.img_sums, IMAGE_SCALE) / n if n > 0
                    else torch.full((3,), math.nan, dtype=torch.float64))
            out.update(auroc_per_image=vals[0], ap_per_image=vals[1], fpr95_per_image=vals[2], n_images=n)
        return out

    def curves(self) -> dict[str, Tensor]:
        """ROC (``fpr``, ``tpr``, starting at (0, 0)) and PR (``recall``, ``precision``) points, one per bin."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=self._should_unsync):
            return _curves(*self._counts())


def _cat(x: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.cat(x) if len(x) else torch.zeros(0, dtype=dtype)
