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

from segcal._checks import check_tensor
from segcal.metrics._binning import IMAGE_SCALE, check_fixed, from_fixed, refuse_meta, to_fixed

_MIN_BITS = 9  # sign + 8 exponent bits: one bin per octave of each sign
_MAX_BITS = 24


def _format_detection(scores: object, positive: object, valid: object | None) -> tuple[Tensor, Tensor, Tensor]:
    scores = check_tensor(scores, "scores")
    positive = check_tensor(positive, "positive")
    refuse_meta(scores, "scores")
    if scores.ndim != 3:
        raise ValueError(f"`scores` must have shape (N, H, W), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"`scores` must be a floating tensor, got {scores.dtype}")
    # +-inf are ordered (lowest / highest score) and kept; NaN has no place in a ranking.
    if scores.numel() and bool(torch.isnan(scores).any()):
        raise ValueError("`scores` contains NaN values")
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
        if valid.device != scores.device:
            raise ValueError(f"`valid` is on {valid.device} but `scores` on {scores.device}")
    if positive.device != scores.device:
        raise ValueError(f"`positive` is on {positive.device} but `scores` on {scores.device}")
    return scores, positive, valid


def _bits(n_thresholds: int) -> int:
    """Key bits of the float mode: ``floor(log2(n_thresholds))`` clipped to ``[_MIN_BITS, _MAX_BITS]``."""
    return min(max(n_thresholds.bit_length() - 1, _MIN_BITS), _MAX_BITS)


def _n_bins(n_thresholds: int, score_range: tuple[float, float] | None) -> int:
    if score_range is not None:
        return n_thresholds
    return 2 ** _bits(n_thresholds)


def _score_key(s: Tensor, n_thresholds: int, score_range: tuple[float, float] | None) -> Tensor:
    """Monotone non-decreasing map from real scores to histogram bins ``[0, _n_bins)``.

    With ``score_range=(lo, hi)``: ``n_thresholds`` equal-width bins on ``[lo, hi]``, values outside clamped to the
    end bins. Without: the score is rounded to float32 (a monotone rounding; float64 scores beyond its range become
    +-inf) and its bit pattern is mapped to an order-preserving integer (negative floats have their 31 magnitude
    bits flipped); the bin is the top ``B = floor(log2(n_thresholds))`` bits of that integer. So every float32
    value has a bin (both signs, subnormals, every exponent, +-inf), each octave of ``|s|`` gets
    ``2**(B - 9)`` bins (relative width ``<= 2**(9 - B)``: 3.9e-3 at B = 17, 9.8e-4 at B = 19) and a bin only merges
    scores that are that close.
    """
    if score_range is not None:
        lo, hi = score_range
        t = (s.to(torch.float64) - lo) * (n_thresholds / (hi - lo))
        return t.floor().clamp_(0, n_thresholds - 1).to(torch.int64)
    bits = _bits(n_thresholds)
    # `+ 0.0` turns -0.0 into +0.0 (they are equal scores and must share a bin).
    b = (s.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    return (b + 2**31) >> (32 - bits)


def _descending(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-bin counts in descending score order and the cumulative TP / FP after each bin (float64)."""
    p = pos.flip(-1).to(torch.float64)
    n = neg.flip(-1).to(torch.float64)
    return p, n, p.cumsum(-1), n.cumsum(-1)


def _rank_metrics(pos: Tensor, neg: Tensor, tpr_level: float = 0.95) -> dict[str, Tensor]:
    """AUROC, AP and FPR@TPR from per-threshold counts ordered by ascending score (ties share a threshold).

    AUROC is the trapezoidal area under the ROC curve (ties count one half), AP is
    ``sum_i (R_i - R_{i-1}) P_i`` over thresholds in descending order (sklearn's definition) and FPR95 is the FPR
    at the highest threshold whose TPR reaches ``tpr_level``. Empty bins are zero-width steps, so no compaction
    (and no host synchronisation) is needed; NaN when positives or negatives are missing.
    """
    p, _, tp, fp = _descending(pos, neg)
    dev = tp.device
    p_all, n_all = tp[..., -1:], fp[..., -1:]
    ok = ((p_all > 0) & (n_all > 0)).squeeze(-1)
    z = torch.zeros_like(tp[..., :1])
    tpr = torch.cat([z, tp / p_all.clamp_min(1.0)], -1)
    fpr = torch.cat([z, fp / n_all.clamp_min(1.0)], -1)
    auroc = torch.trapezoid(tpr, fpr, dim=-1)
    prec = tp / (tp + fp).clamp_min(1.0)
    ap = torch.where(p > 0, p * prec, 0.0).sum(-1) / p_all.squeeze(-1).clamp_min(1.0)
    level = torch.full_like(z, tpr_level - 1e-12)
    i = torch.searchsorted(tpr, level).clamp_(max=fpr.shape[-1] - 1)
    fpr95 = fpr.gather(-1, i).squeeze(-1)
    nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
    return {"auroc": torch.where(ok, auroc, nan), "ap": torch.where(ok, ap, nan),
            "fpr95": torch.where(ok, fpr95, nan)}


def _error_bounds(pos: Tensor, neg: Tensor, tpr_level: float = 0.95) -> dict[str, Tensor]:
    """Guaranteed bounds on ``|binned - exact|`` for AUROC, AP and FPR95 from the histograms alone.

    Binning only merges scores within a bin, so the exact values differ from the binned ones only through the
    unknown order of the pixels inside each bin (the binned value treats a bin as one tie):

    * AUROC: a bin with ``p`` positives and ``n`` negatives contributes ``p n / 2`` of ``P N`` as a tie, anything in
      ``[0, p n]`` exactly, so ``|err| <= sum_b p_b n_b / (2 P N)``.
    * AP: only the terms of a bin's own positives depend on its inner order. With ``t, f`` positives / negatives
      above the bin, a positive's precision is at most ``(t + p) / (t + p + f)`` (all of the bin's positives first,
      tied) and the j-th positive's at least ``(t + j) / (t + j + f + n)`` (all negatives first); the sum of the
      latter is bounded below by ``p - (f + n) log1p(p / (t + f + n + 1/2))`` (midpoint rule on a convex
      function), so ``err`` lies between the summed gaps to these extremes.
    * FPR95: the TPR crosses the level inside one bin; the exact crossing has between ``f`` and ``f + n`` false
      positives, while the binned value takes ``f + n``, so ``|err| <= n_b / N`` for that bin.
    """
    p, n, tp, fp = _descending(pos, neg)
    dev = tp.device
    p_all, n_all = tp[..., -1:], fp[..., -1:]
    ok = ((p_all > 0) & (n_all > 0)).squeeze(-1)
    pa, na = p_all.clamp_min(1.0), n_all.clamp_min(1.0)
    auroc_b = (p * n).sum(-1) / (2.0 * pa * na).squeeze(-1)
    t0, f0 = tp - p, fp - n
    binned = p * tp / (tp + fp).clamp_min(1.0)
    best = p * tp / (tp + f0).clamp_min(1.0)
    worst = p - (f0 + n) * torch.log1p(p / (t0 + f0 + n + 0.5))
    has = p > 0
    up = torch.where(has, best - binned, 0.0).sum(-1)
    down = torch.where(has, binned - worst, 0.0).clamp_min(0.0).sum(-1)
    ap_b = torch.maximum(up, down) / pa.squeeze(-1)
    tpr = tp / pa
    level = torch.full_like(pa, tpr_level - 1e-12)
    i = torch.searchsorted(tpr, level).clamp_(max=tpr.shape[-1] - 1)
    fpr_b = (n.gather(-1, i) / na).squeeze(-1)
    nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
    slack = 1e-12  # float64 rounding of the values themselves
    return {"auroc_error_bound": torch.where(ok, auroc_b + slack, nan),
            "ap_error_bound": torch.where(ok, ap_b + slack, nan),
            "fpr95_error_bound": torch.where(ok, fpr_b + slack, nan)}


def _curves(pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
    keep = (pos + neg) > 0
    tp = pos[keep].flip(0).to(torch.float64).cumsum(0)
    fp = neg[keep].flip(0).to(torch.float64).cumsum(0)
    z = torch.zeros(1, dtype=torch.float64, device=pos.device)
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


def _hist2(key: Tensor, positive: Tensor, valid: Tensor, nb: int) -> Tensor:
    """(N, nb, 2) per-image counts of (negative, positive) pixels by bin; invalid pixels are dropped.

    One ``index_add_`` over a combined index, no boolean compaction, so it runs on any device without a host sync.
    """
    n_img = key.shape[0]
    img = torch.arange(n_img, dtype=torch.int64, device=key.device).view(-1, *[1] * (key.ndim - 1)) * (2 * nb)
    idx = (key * 2 + positive).add_(img).masked_fill_(~valid, n_img * 2 * nb).flatten()
    ones = torch.ones(1, dtype=torch.int64, device=key.device).expand(idx.numel())
    acc = torch.zeros(n_img * 2 * nb + 1, dtype=torch.int64, device=key.device).index_add_(0, idx, ones)
    return acc[:-1].view(n_img, nb, 2)


def _update_detection(scores: Tensor, positive: Tensor, valid: Tensor, n_thresholds: int,
                      score_range: tuple[float, float] | None, exact: bool, per_image: bool) -> dict[str, Tensor]:
    """One validated batch -> increments of the sum states (histograms and per-image sums)."""
    out: dict[str, Tensor] = {}
    nb = _n_bins(n_thresholds, score_range)
    if exact and not per_image:
        return out
    dev = scores.device
    if exact:
        pos_neg = []
        for i in range(scores.shape[0]):
            v = valid[i]
            pos, neg = _exact_counts(scores[i][v], positive[i][v])
            pos_neg.append(_rank_metrics(pos, neg))
        per = {k: torch.stack([r[k] for r in pos_neg]) for k in ("auroc", "ap", "fpr95")}
    else:
        key = _score_key(scores, n_thresholds, score_range)
        if per_image:
            h = _hist2(key, positive, valid, nb)
        else:  # one pooled histogram: no (N, nb, 2) buffer
            h = _hist2(key.view(1, -1), positive.view(1, -1), valid.view(1, -1), nb)
        out["hist_pos"] = h[..., 1].sum(0)
        out["hist_neg"] = h[..., 0].sum(0)
        per = _rank_metrics(h[..., 1], h[..., 0]) if per_image else {}
    if per_image:
        vals = torch.stack([per["auroc"], per["ap"], per["fpr95"]], -1)
        ok = ~torch.isnan(vals[:, 0])
        # Rounded per image, so the state does not depend on how images are batched.
        out["img_sums"] = to_fixed(torch.where(ok.unsqueeze(-1), vals, 0.0), IMAGE_SCALE).sum(0).to(dev)
        out["img_count"] = ok.sum().to(torch.int64)
    return out


class DetectionMetrics(Metric):
    r"""Pixel-level detection of errors / OOD pixels from a score (higher = more likely positive).

    .. math::
        \mathrm{AUROC} = \int \mathrm{TPR}\, d\mathrm{FPR},\quad
        \mathrm{AP} = \sum_i (R_i - R_{i-1}) P_i,\quad
        \mathrm{FPR95} = \mathrm{FPR}(t^*),\ t^* = \max\{t : \mathrm{TPR}(t) \ge 0.95\}

    Pooled over all valid pixels. Binned mode (default) keeps two fixed-size histograms of the scores of positive
    and negative pixels; the bin map is monotone, so it only merges scores that fall in the same bin (see
    ``_score_key``: the top bits of the float32 bit pattern, so every float32 value including +-inf has a bin and
    each octave of ``|s|`` gets the same relative resolution, 9.8e-4 at the default; or ``score_range``).
    ``compute()`` also returns ``auroc_error_bound``, ``ap_error_bound`` and ``fpr95_error_bound``: guaranteed
    bounds on ``|binned - exact|`` from the histograms alone (what the unknown order inside a bin could change, see
    ``_error_bounds``); when one is larger than you can accept, use ``exact=True`` or a larger ``n_thresholds``.
    ``exact=True`` keeps every valid score (memory grows with the data) and equals sklearn's ``roc_auc_score`` /
    ``average_precision_score`` (its bounds are 0). Unlike sklearn, +-inf scores are accepted (ranked lowest /
    highest); NaN is refused.

    With ``per_image=True`` the three values are also computed per image and averaged (``*_per_image`` keys) over
    images that have at least one positive and one negative valid pixel; other images are skipped.

    Args:
        n_thresholds: histogram resolution: the number of bins of ``score_range``; without a range, rounded down
            to a power of two ``2**B`` (``9 <= B <= 24``), i.e. ``2**(B - 9)`` bins per octave of each sign.
        exact: keep the scores and compute exactly.
        score_range: optional ``(lo, hi)`` for equal-width bins; scores outside are clamped into the end bins.
        per_image: also report per-image averages.

    Shape:
        - scores: :math:`(N, H, W)` float; positive, valid: :math:`(N, H, W)` bool

    Returns:
        ``compute()`` -> dict of float64 scalars: auroc, ap, fpr95, auroc_error_bound, ap_error_bound,
        fpr95_error_bound, n_positive, n_negative (+ auroc_per_image,
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

    def __init__(self, n_thresholds: int = 2**19, exact: bool = False,
                 score_range: tuple[float, float] | None = None, per_image: bool = False,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        if isinstance(n_thresholds, bool) or not isinstance(n_thresholds, int) or n_thresholds < 2:
            raise ValueError(f"`n_thresholds` must be an int >= 2, got {n_thresholds!r}")
        if score_range is None and n_thresholds < 2**_MIN_BITS:
            raise ValueError(f"`n_thresholds` must be >= {2**_MIN_BITS} without a `score_range`")
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
        new = {k: getattr(self, k) + v for k, v in inc.items()}
        if self.per_image:
            check_fixed(new, ("img_sums",))  # raises before anything is committed
        for k, v in new.items():
            setattr(self, k, v)
        if self.exact:
            self.scores.append(scores[valid].to(torch.float64))
            self.labels.append(positive[valid])

    def _counts(self) -> tuple[Tensor, Tensor]:
        if self.exact:
            s = _cat(self.scores, torch.float64, self.device)
            y = _cat(self.labels, torch.bool, self.device)
            return _exact_counts(s, y)
        return self.hist_pos, self.hist_neg

    def compute(self) -> dict[str, Tensor]:
        """States -> auroc, ap, fpr95 (pooled) and per-image averages when enabled."""
        pos, neg = self._counts()
        out = _rank_metrics(pos, neg)
        if self.exact:  # ties are the definition there, not an approximation
            out.update({k: torch.where(torch.isnan(out[m]), out[m], 0.0) for k, m in
                        (("auroc_error_bound", "auroc"), ("ap_error_bound", "ap"), ("fpr95_error_bound", "fpr95"))})
        else:
            out.update(_error_bounds(pos, neg))
        out["n_positive"] = pos.sum().to(torch.float64)
        out["n_negative"] = neg.sum().to(torch.float64)
        if self.per_image:
            check_fixed({"img_sums": self.img_sums}, ("img_sums",))
            n = self.img_count.to(torch.float64)
            vals = torch.where(n > 0, from_fixed(self.img_sums, IMAGE_SCALE) / n.clamp_min(1.0), math.nan)
            out.update(auroc_per_image=vals[0], ap_per_image=vals[1], fpr95_per_image=vals[2], n_images=n)
        return out

    def curves(self) -> dict[str, Tensor]:
        """ROC (``fpr``, ``tpr``, starting at (0, 0)) and PR (``recall``, ``precision``) points, one per bin."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=self._should_unsync):
            return _curves(*self._counts())


def _cat(x: list[Tensor] | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.cat(x) if len(x) else torch.zeros(0, dtype=dtype, device=device)
