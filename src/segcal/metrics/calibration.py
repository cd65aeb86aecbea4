"""Streaming calibration metrics for dense predictions: ECE, MCE, ACE, classwise ECE, NLL, Brier, OE, mIoU.

The class and the functional twins share three private steps: ``_format_calibration`` (validate),
``_update_calibration`` (one batch -> fixed-size integer state increments) and ``_compute_calibration``
(states -> values). States never grow with the number of images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from segcal._checks import check_dense_scores, check_logits_target, check_target
from segcal.metrics import _fused
from segcal.metrics._binning import (
    IMAGE_SCALE,
    MAX_BATCH_PIXELS,
    ace_fine_edges,
    check_fixed,
    check_n_bins,
    from_fixed,
    from_fixed2,
    merge_slots,
    nan,
    refuse_meta,
    to_fixed,
    to_fixed2,
    unit_of,
    units_to_fixed2,
)
from segcal.metrics.boundary import boundary_mask

# Images are processed in chunks of about this many class-scores so that temporaries stay cache-sized and memory
# does not grow with the batch size.
_CHUNK_ELEMENTS = 2**21


@dataclass(frozen=True)
class _CalibrationConfig:
    num_classes: int
    n_bins: int = 15
    ignore_index: int | None = 255
    input: str = "logits"
    exclude_classes: tuple[int, ...] = ()
    boundary_width: int | None = None
    ace_resolution: int = 2**16
    classwise: bool = True

    @property
    def n_regions(self) -> int:
        return 2 if self.boundary_width is not None else 1


def _make_config(num_classes: int, n_bins: int, ignore_index: int | None, input: str,
                 exclude_classes: Iterable[int] | None, boundary_width: int | None, ace_resolution: int,
                 classwise: bool = True) -> _CalibrationConfig:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}")
    check_n_bins(n_bins)
    if input not in ("logits", "probs"):
        raise ValueError(f"`input` must be 'logits' or 'probs', got {input!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"`ignore_index` must be an int or None, got {ignore_index!r}")
    excl = tuple(sorted({int(k) for k in (exclude_classes or ())}))
    if any(k < 0 or k >= num_classes for k in excl):
        raise ValueError(f"`exclude_classes` must be class indices in [0, {num_classes}), got {excl}")
    if len(excl) >= num_classes:
        raise ValueError("`exclude_classes` excludes every class")
    if boundary_width is not None and (isinstance(boundary_width, bool) or not isinstance(boundary_width, int)
                                       or boundary_width < 1):
        raise ValueError(f"`boundary_width` must be None or a positive int, got {boundary_width!r}")
    if (isinstance(ace_resolution, bool) or not isinstance(ace_resolution, int) or ace_resolution < 16
            or ace_resolution > 2**24):
        raise ValueError(f"`ace_resolution` must be an int in [16, 2**24], got {ace_resolution!r}")
    return _CalibrationConfig(num_classes, n_bins, ignore_index, input, excl, boundary_width, ace_resolution,
                              classwise)


def _state_shapes(cfg: _CalibrationConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every (int64, sum-reduced) state."""
    c, n, r = cfg.num_classes, cfg.n_bins, cfg.n_regions
    return {
        "bin_count": (r, n), "bin_correct": (r, n), "bin_conf": (r, n, 2),
        "fine_count": (cfg.ace_resolution,), "fine_correct": (cfg.ace_resolution,),
        "fine_conf": (cfg.ace_resolution, 2),
        "cw_pos": (c, n), "cw_conf": (c, n, 2),
        "nll_sum": (2,), "brier_sum": (2,),
        "confmat": (c, c),
        "image_ece_sum": (), "image_count": (),
    }


# Real-valued (fixed-point) states: checked for overflow before an update is committed and before compute.
_FIXED_STATES = ("bin_conf", "fine_conf", "cw_conf", "nll_sum", "brier_sum", "image_ece_sum")


# the states that _update_calibration accumulates (the others it sets once)
_ADDED_STATES = ("bin_count", "bin_correct", "bin_conf", "image_ece_sum", "image_count")


def _zero_states(cfg: _CalibrationConfig, device: torch.device | None = None,
                 names: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    return {k: torch.zeros(s, dtype=torch.int64, device=device) for k, s in _state_shapes(cfg).items()
            if names is None or k in names}


def _format_calibration(preds: object, target: object, cfg: _CalibrationConfig) -> tuple[Tensor, Tensor]:
    """Validate a batch: (N, C, H, W) logits/probabilities and (N, H, W) labels."""
    refuse_meta(preds, "preds")
    refuse_meta(target, "target")
    # the fused kernels check the logits' values and the labels' range themselves (float16/bfloat16 become float32
    # first, keeping inf); the probabilities' range and sum are checked here on every path
    in_kernel = _in_kernel(preds)
    if cfg.input == "logits":
        return check_logits_target(preds, target, cfg.ignore_index, cfg.num_classes, check_values=not in_kernel)
    preds = check_dense_scores(preds, "preds")
    if preds.shape[1] != cfg.num_classes:
        raise ValueError(f"`preds` has C={preds.shape[1]} classes but num_classes={cfg.num_classes}")
    n, _, h, w = preds.shape
    target = check_target(target, cfg.num_classes, cfg.ignore_index, shape=(n, h, w), check_values=not in_kernel)
    lo, hi = (float(v) for v in torch.aminmax(preds))
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"`preds` with input='probs' must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}")
    tol = 1e-3 if preds.dtype in (torch.float32, torch.float64) else 2e-2
    err = float((preds.sum(1, dtype=torch.float64) - 1.0).abs().max())
    if err > tol:
        raise ValueError(f"`preds` with input='probs' must sum to 1 over dim 1 (C), max deviation {err:.3g}")
    return preds, target


def _in_kernel(preds: object) -> bool:
    """Whether this batch's dense pass runs in the fused CPU kernel (which then also checks the values)."""
    return (isinstance(preds, Tensor) and preds.dtype != torch.float64
            and _fused.fused_applies(preds.new_empty(0, dtype=torch.float32)))


def _labels(preds: Tensor, target: Tensor, cfg: _CalibrationConfig) -> tuple[Tensor, Tensor]:
    """(N, H, W) int32 labels (0 where invalid) and the valid mask (not ignore_index, not an excluded class)."""
    out = _fused.labels(target, cfg.num_classes, cfg.ignore_index, cfg.exclude_classes, fused=_in_kernel(preds))
    if out is None:  # a label out of range reached the kernel (validation was skipped): the detailed message
        check_target(target, cfg.num_classes, cfg.ignore_index)
        raise ValueError(f"`target` has labels outside [0, {cfg.num_classes}) that are not ignore_index")
    return out


def _chunks(shape: torch.Size) -> list[tuple[slice, slice]]:
    """(image, row) slices of about ``_CHUNK_ELEMENTS`` class-scores each: several images, or rows of one."""
    n_img, c, h, w = shape
    per_image = max(1, c * h * w)
    if per_image <= _CHUNK_ELEMENTS:
        step = _CHUNK_ELEMENTS // per_image
        return [(slice(i, i + step), slice(0, h)) for i in range(0, n_img, step)]
    rows = max(1, _CHUNK_ELEMENTS // max(1, c * w))
    return [(slice(i, i + 1), slice(r, r + rows)) for i in range(n_img) for r in range(0, h, rows)]


def _dense_pass(preds: Tensor, y: Tensor, valid: Tensor, cfg: _CalibrationConfig) -> tuple[Tensor, ...]:
    """Everything that reads all C scores of a pixel: per-pixel ``(conf, pred, p_y)``, the summed classwise histogram
    and Brier units and the NLL row sums (:func:`segcal.metrics._fused.dense_rows`). The fused kernel streams image
    rows itself; the PyTorch twin runs on cache-sized chunks so that its temporaries stay small."""
    logits = cfg.input == "logits"
    wd = torch.float64 if preds.dtype == torch.float64 else torch.float32
    if _in_kernel(preds):  # one rule for validation, labels and this pass
        return _fused.dense_rows(preds.to(wd), logits, y, valid, cfg.n_bins, cfg.classwise)
    n_img, c, h, w = preds.shape
    conf = torch.empty(n_img, h, w, dtype=wd, device=preds.device)
    pred = torch.empty(n_img, h, w, dtype=torch.int32, device=preds.device)
    p_y = torch.empty_like(conf)
    nll_rows = torch.empty(n_img, h, dtype=torch.float64, device=preds.device)
    sum_dtype = torch.float64 if wd == torch.float64 else torch.int64  # see segcal.metrics._binning.to_units
    cw = torch.zeros(c if cfg.classwise else 0, cfg.n_bins + 1, dtype=sum_dtype, device=preds.device)
    brier = torch.zeros((), dtype=sum_dtype, device=preds.device)
    for i, r in _chunks(preds.shape):
        conf[i, r], pred[i, r], p_y[i, r], cw_part, brier_part, nll_rows[i, r] = _fused.dense_rows(
            preds[i, :, r].to(wd), logits, y[i, r], valid[i, r], cfg.n_bins, cfg.classwise)
        cw += cw_part
        brier += brier_part
    return conf, pred, p_y, cw, brier, nll_rows


def _add_top_label(top: Tensor, top_sum: Tensor, out: dict[str, Tensor]) -> None:
    """(N, R, n + 1, 2) count / correct histograms and (N, R, n + 1) confidence sums -> bin states and the
    per-image ECE sum."""
    cnt, cor, sums = merge_slots(top[..., 0]), merge_slots(top[..., 1]), merge_slots(top_sum)
    out["bin_count"] += cnt.sum(0)
    out["bin_correct"] += cor.sum(0)
    out["bin_conf"] += units_to_fixed2(sums.sum(0))
    img_n = cnt.sum((1, 2))
    unit = unit_of(sums)
    # |correct - sum of confidences| per image and bin: exact integers (in 1/unit) for float32 input
    img_gap = (cor.sum(1).to(sums.dtype) * unit - sums.sum(1)).abs_().sum(1)
    has = img_n > 0
    # Each image's ECE is rounded to the grid on its own, so the state does not depend on how images are batched.
    img_ece = img_gap[has].to(torch.float64) / unit / img_n[has]
    out["image_ece_sum"] += to_fixed(img_ece, IMAGE_SCALE).sum()
    out["image_count"] += has.sum()


def _update_calibration(preds: Tensor, target: Tensor, cfg: _CalibrationConfig) -> dict[str, Tensor]:
    """One validated batch -> int64 increments of every state (same keys and shapes as the states).

    Two passes, each a fused CPU kernel or its PyTorch twin (bit-identical, :mod:`segcal.metrics._fused`): the
    dense pass over the probabilities (on cache-sized chunks), then the per-pixel histograms over the batch.
    Summed pixel values are integers (``to_units``), so every state is exact and independent of pixel order.
    """
    n_img, _, h, w = preds.shape
    if h * w > MAX_BATCH_PIXELS:
        raise ValueError(f"an image of {h}x{w} pixels is larger than the {MAX_BATCH_PIXELS} pixels the exact "
                         f"int64 sums of one update can hold; evaluate it in tiles")
    step = MAX_BATCH_PIXELS // (h * w)
    if n_img > step:  # split so that every integer sum fits int64
        parts = [_update_calibration(preds[k:k + step], target[k:k + step], cfg) for k in range(0, n_img, step)]
        return {key: sum(part[key] for part in parts) for key in parts[0]}
    out = _zero_states(cfg, preds.device, _ADDED_STATES)
    y, valid = _labels(preds, target, cfg)
    conf, pred, p_y, cw, brier, nll_rows = _dense_pass(preds, y, valid, cfg)
    region = None
    if cfg.boundary_width is not None:
        region = boundary_mask(target, cfg.boundary_width, cfg.ignore_index).to(torch.int32)
    top, top_sum, fine, fine_sum, pos, confmat = _fused.pixel_hist(
        conf, pred, p_y, y, valid, region, cfg.n_bins, cfg.n_regions, cfg.num_classes, cfg.ace_resolution,
        cfg.classwise)
    _add_top_label(top, top_sum, out)
    # the large fine histograms are taken as they are (views): zeroing and adding them is most of this step's cost
    out["fine_count"], out["fine_correct"] = fine[:, 0], fine[:, 1]
    out["fine_conf"] = units_to_fixed2(fine_sum)
    if cfg.classwise:
        out["cw_pos"] = merge_slots(pos)
        out["cw_conf"] = units_to_fixed2(merge_slots(cw))
    else:
        out.update(_zero_states(cfg, preds.device, ("cw_pos", "cw_conf")))
    out["brier_sum"] = units_to_fixed2(brier)
    # the row sums in row order (cumsum adds in element order): the same on every path and for any thread count
    out["nll_sum"] = to_fixed2(nll_rows.flatten().cumsum(0)[-1])
    out["confmat"] = confmat
    return out


def _ece_terms(count: Tensor, correct: Tensor, conf: Tensor) -> dict[str, Tensor]:
    """ECE, MCE, OE and accuracy from float64 per-bin count / correct-sum / confidence-sum."""
    total = count.sum()
    if total <= 0:
        return {"ece": nan(count.device), "mce": nan(count.device), "oe": nan(count.device),
                "accuracy": nan(count.device)}
    nz = count > 0
    acc_b = correct[nz] / count[nz]
    conf_b = conf[nz] / count[nz]
    w = count[nz] / total
    return {
        "ece": (w * (acc_b - conf_b).abs()).sum(),
        "mce": (acc_b - conf_b).abs().max(),
        "oe": (w * conf_b * (conf_b - acc_b).clamp_min(0.0)).sum(),
        "accuracy": correct.sum() / total,
    }


def _adaptive_ece(count: Tensor, correct: Tensor, conf: Tensor, n_bins: int,
                  edges: Tensor) -> tuple[Tensor, Tensor]:
    """Equal-mass ECE from the fine histogram, and a rigorous bound on its distance to the sorted-pixel value.

    Adaptive bin b holds sorted positions ``[bN/n, (b+1)N/n)``; a fine bin cut by such a boundary is split in
    proportion to its count (pixels of equal confidence share fractionally). With ``q`` of ``m`` pixels of a cut
    fine bin of confidence width ``d`` on the left, the split of ``sum(correct - c)`` is off by at most
    ``q (m - q) / m * (1 + d)``, and each adaptive bin's error is the difference of its two boundaries' errors.
    """
    total = count.sum()
    dev = count.device
    if total <= 0:
        return nan(dev), nan(dev)
    nz = count > 0
    z = torch.zeros(1, dtype=torch.float64, device=dev)
    cum_n = torch.cat([z, count[nz].cumsum(0)])
    cum_x = torch.cat([z, (correct[nz] - conf[nz]).cumsum(0)])
    width = (edges[1:] - edges[:-1])[nz]
    beta = total * torch.arange(n_bins + 1, dtype=torch.float64, device=dev) / n_bins
    j = torch.searchsorted(cum_n, beta, right=False).clamp(1, len(cum_n) - 1)
    lo, hi = cum_n[j - 1], cum_n[j]
    frac = ((beta - lo) / (hi - lo)).clamp(0.0, 1.0)
    f = cum_x[j - 1] + frac * (cum_x[j] - cum_x[j - 1])
    ace = (f[1:] - f[:-1]).abs().sum() / total
    q = beta - lo
    m = hi - lo
    err = q * (m - q) / m * (1.0 + width[j - 1])
    # The exact-1.0 bin holds ties only, whose proportional split is the definition rather than an approximation.
    if bool(nz[-1]):
        err = torch.where(j == len(cum_n) - 1, 0.0, err)
    bound = 2.0 * err[1:-1].clamp_min(0.0).sum() / total
    return ace, bound


def _iou(confmat: Tensor) -> Tensor:
    cm = confmat.to(torch.float64)
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1.0), math.nan)


def _compute_calibration(states: dict[str, Tensor], cfg: _CalibrationConfig) -> dict[str, Tensor]:
    """Fixed-size states -> metric values (float64 scalars; per-class tensors of shape (C,)).

    Raises ``OverflowError`` if a fixed-point state overflowed (never a wrong number).
    """
    check_fixed(states, _FIXED_STATES)
    count = states["bin_count"].to(torch.float64)
    dev = count.device
    correct = states["bin_correct"].to(torch.float64)
    conf = from_fixed2(states["bin_conf"])
    out = _ece_terms(count.sum(0), correct.sum(0), conf.sum(0))
    total = count.sum()
    ace, bound = _adaptive_ece(states["fine_count"].to(torch.float64), states["fine_correct"].to(torch.float64),
                               from_fixed2(states["fine_conf"]), cfg.n_bins, ace_fine_edges(cfg.ace_resolution, dev))
    out["ace"] = ace
    out["ace_error_bound"] = bound
    keep = torch.ones(cfg.num_classes, dtype=torch.bool, device=dev)
    keep[list(cfg.exclude_classes)] = False
    if cfg.classwise:
        if total > 0:
            per_class = (states["cw_pos"].to(torch.float64) - from_fixed2(states["cw_conf"])).abs().sum(1) / total
        else:
            per_class = torch.full((cfg.num_classes,), math.nan, dtype=torch.float64, device=dev)
        out["cw_ece"] = per_class[keep].mean()
        out["cw_ece_per_class"] = per_class
    safe = torch.where(total > 0, total, math.nan)
    out["nll"] = from_fixed2(states["nll_sum"]) / safe
    out["brier"] = from_fixed2(states["brier_sum"]) / safe
    iou = _iou(states["confmat"])
    ok = keep & ~torch.isnan(iou)
    out["miou"] = iou[ok].mean() if ok.any() else nan(dev)
    out["iou"] = iou
    n_img = states["image_count"].to(torch.float64)
    out["image_ece"] = torch.where(n_img > 0, from_fixed(states["image_ece_sum"], IMAGE_SCALE) / n_img.clamp_min(1.0),
                                   math.nan)
    out["n_pixels"] = total
    if cfg.boundary_width is not None:
        out["interior_ece"] = _ece_terms(count[0], correct[0], conf[0])["ece"]
        out["boundary_ece"] = _ece_terms(count[1], correct[1], conf[1])["ece"]
        out["boundary_fraction"] = count[1].sum() / safe
    return out


def _reliability(states: dict[str, Tensor], cfg: _CalibrationConfig, region: int | None = None) -> dict[str, Tensor]:
    count = states["bin_count"].to(torch.float64)
    correct = states["bin_correct"].to(torch.float64)
    conf = from_fixed2(states["bin_conf"])
    if region is None:
        count, correct, conf = count.sum(0), correct.sum(0), conf.sum(0)
    else:
        count, correct, conf = count[region], correct[region], conf[region]
    denom = torch.where(count > 0, count, math.nan)
    return {
        "edges": torch.linspace(0.0, 1.0, cfg.n_bins + 1, dtype=torch.float64, device=count.device),
        "count": count,
        "confidence": conf / denom,
        "accuracy": correct / denom,
    }


class CalibrationMetrics(Metric):
    r"""Streaming calibration and segmentation metrics over the valid pixels of a dataset.

    With top-label confidence :math:`c = \max_k p_k`, equal-width bins :math:`B_b = \{c \in (b/n, (b+1)/n]\}`
    (``c = 0`` in bin 0, so ``c = 1`` is in the last bin) and :math:`N` valid pixels:

    .. math::
        \mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,|\mathrm{acc}_b - \mathrm{conf}_b|,\quad
        \mathrm{MCE} = \max_{b: |B_b|>0} |\mathrm{acc}_b - \mathrm{conf}_b|,\quad
        \mathrm{OE} = \sum_b \frac{|B_b|}{N}\,\mathrm{conf}_b\,\max(\mathrm{conf}_b - \mathrm{acc}_b, 0)

    ``ace`` uses ``n_bins`` equal-mass bins (from a fine histogram; ``ace_error_bound`` is a rigorous bound on the
    distance to the sorted-pixel value), ``cw_ece`` is the mean over classes of the equal-width ECE of :math:`p_k`
    against :math:`1[y = k]`, ``nll = mean(-log p_y)``, ``brier = mean(sum_k (p_k - 1[y=k])^2)``, ``miou`` is over
    classes with non-empty union, ``image_ece`` is the mean over images (with a valid pixel) of per-image ECE.

    All states are fixed-size int64 sums (fixed point for real-valued sums), so memory does not grow with the data
    and any split into batches or processes of the same batches gives bit-identical results.

    Args:
        num_classes: number of classes C.
        n_bins: equal-width (and equal-mass) bins.
        ignore_index: label excluded from everything (``None``: none).
        input: ``"logits"`` (softmax is applied, in float32; float64 stays float64) or ``"probs"``.
        exclude_classes: pixels whose label is one of these are excluded (e.g. background, "foreground only");
            excluded classes are also left out of the ``cw_ece`` and ``miou`` means.
        boundary_width: if set, also report ``boundary_ece`` / ``interior_ece`` for pixels within this Chebyshev
            distance of a different valid label (see :func:`segcal.metrics.boundary.boundary_mask`).
        ace_resolution: number of bins of the adaptive-ECE fine histogram (on ``t = -log2(1 - c)``).
        classwise: compute ``cw_ece`` (the only part that bins all C probabilities of every pixel; ``False`` saves
            about 35 % of the update time on the CPU kernel, measured in ``benchmarks/metrics_speed.py``).
        validate_args: check every batch (shapes, dtypes, finite values, label range); ``False`` skips the checks
            (and their host syncs) as torchmetrics' ``validate_args`` does: wrong input then gives wrong numbers (the
            CPU kernel still refuses NaN/inf logits and out-of-range labels: it never reads out of bounds).

    Shape:
        - preds: :math:`(N, C, H, W)` float (float16/bfloat16 accepted)
        - target: :math:`(N, H, W)` integer

    Returns:
        ``compute()`` -> dict of float64 tensors: ece, mce, ace, ace_error_bound, cw_ece, cw_ece_per_class (C,),
        nll, brier, oe, accuracy, miou, iou (C,), image_ece, n_pixels (+ boundary_ece, interior_ece,
        boundary_fraction with ``boundary_width``); NaN when no valid pixel was seen.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599 (ECE/MCE);
        Nixon et al., "Measuring Calibration in Deep Learning", CVPRW 2019, arXiv:1904.01685 (ACE, classwise);
        Thulasidasan et al., "On Mixup Training", NeurIPS 2019, arXiv:1905.11001 (OE).

    Example:
        >>> metric = CalibrationMetrics(num_classes=3)
        >>> metric.update(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))
        >>> out = metric.compute()
        >>> 0.0 <= float(out["ece"]) <= 1.0
        True
    """

    is_differentiable = False
    higher_is_better = None  # mixed: errors (lower is better) next to accuracy and mIoU (higher is better)
    full_state_update = False

    def __init__(self, num_classes: int, n_bins: int = 15, ignore_index: int | None = 255, input: str = "logits",
                 exclude_classes: Iterable[int] | None = None, boundary_width: int | None = None,
                 ace_resolution: int = 2**16, classwise: bool = True, validate_args: bool = True,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.validate_args = bool(validate_args)
        self._cfg = _make_config(num_classes, n_bins, ignore_index, input, exclude_classes, boundary_width,
                                 ace_resolution, bool(classwise))
        self.classwise = bool(classwise)
        self.num_classes, self.n_bins, self.ignore_index, self.input = num_classes, n_bins, ignore_index, input
        self.exclude_classes, self.boundary_width = self._cfg.exclude_classes, boundary_width
        self.ace_resolution = ace_resolution
        for name, shape in _state_shapes(self._cfg).items():
            self.add_state(name, default=torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum")

    def _states(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in _state_shapes(self._cfg)}

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch of (N, C, H, W) scores and (N, H, W) labels to the states."""
        if self.validate_args:
            preds, target = _format_calibration(preds, target, self._cfg)
        new = {k: getattr(self, k) + v.to(getattr(self, k).device)
               for k, v in _update_calibration(preds, target, self._cfg).items()}
        check_fixed(new, _FIXED_STATES)  # raises before anything is committed
        for k, v in new.items():
            setattr(self, k, v)

    def compute(self) -> dict[str, Tensor]:
        """States -> dict of metric values (see the class docstring)."""
        return _compute_calibration(self._states(), self._cfg)

    def reliability(self, region: str | None = None) -> dict[str, Tensor]:
        """Reliability-diagram data: ``edges`` (n_bins+1,), per-bin ``count``, mean ``confidence``, ``accuracy``.

        Args:
            region: ``None`` for all valid pixels, or ``"boundary"`` / ``"interior"`` (needs ``boundary_width``).
        """
        if region is not None and (self._cfg.boundary_width is None or region not in ("boundary", "interior")):
            raise ValueError(f"`region` must be None, or 'boundary'/'interior' with boundary_width set, got {region!r}")
        # Like compute(): under DDP, read the states summed over all processes.
        with self.sync_context(should_sync=self._to_sync, should_unsync=self._should_unsync):
            return _reliability(self._states(), self._cfg, None if region is None else int(region == "boundary"))
