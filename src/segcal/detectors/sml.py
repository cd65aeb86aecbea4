"""Standardized max logit (SML) and the streaming estimate of its class statistics.

The statistics are accumulated per class as (count, mean, sum of squared deviations) in float64 and merged batch by
batch with Chan et al.'s parallel update: the same single streaming pass as (sum, sum of squares, count), but without
the catastrophic cancellation of ``E[x²] − E[x]²`` when logits are large and their spread small.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from segcal._checks import check_logits_target
from segcal._estimator import FORMAT, NotFittedError, register_value_type
from segcal.detectors._base import Detector
from segcal.detectors._batches import BatchSource, from_store, iterate
from segcal.detectors._scores import as_compute


@register_value_type("sml-statistics")
class SMLStatistics:
    r"""Per-class mean and standard deviation of the max logit over pixels predicted *and* labelled ``c``.

    .. math:: \mu_c = \operatorname{mean}\{\max_k z_k : \hat y = y = c\}, \quad
              \sigma_c = \operatorname{std}\{\max_k z_k : \hat y = y = c\}

    ``σ_c`` is the population standard deviation (ddof = 0). Fallback: a class with fewer than ``min_count`` such
    pixels, or zero spread, gets the statistics pooled over the correctly predicted pixels of *all* classes (its
    ``fallback_`` entry is True). If no pixel at all is correctly predicted, :meth:`compute` raises.

    Args:
        ignore_index: label excluded from the statistics.
        min_count: minimum number of pixels for a class's own statistics.

    Attributes:
        class_mean_: ``(C,)`` float64 means. class_std_: ``(C,)`` float64 standard deviations.
        count_: ``(C,)`` int64 pixel counts. fallback_: ``(C,)`` bool, True where the pooled statistics were used.

    References:
        Jung et al., "Standardized Max Logits: A Simple yet Effective Approach for Identifying Unexpected Road
        Obstacles in Urban-Scene Segmentation", ICCV 2021, arXiv:2107.11264.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 3, 8, 8); y = z.argmax(1)
        >>> stats = SMLStatistics().update(z, y).compute()
        >>> stats.class_mean_.shape
        torch.Size([3])
    """

    def __init__(self, *, ignore_index: int | None = 255, min_count: int = 2) -> None:
        if min_count < 1:
            raise ValueError(f"`min_count` must be >= 1, got {min_count}")
        self.ignore_index = ignore_index
        self.min_count = min_count
        self.reset()

    def reset(self) -> SMLStatistics:
        self._n: Tensor | None = None
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        return self

    def update(self, logits: Tensor, target: Tensor) -> SMLStatistics:
        """Add one batch ``(N, C, H, W)`` logits / ``(N, H, W)`` labels; returns self (call :meth:`compute` after)."""
        num_classes = None if self._n is None else self._n.numel()
        logits, target = check_logits_target(logits, target, self.ignore_index, num_classes)
        c = logits.shape[1]
        if self._n is None:
            self._n = torch.zeros(c, dtype=torch.float64)
            self._mean = torch.zeros(c, dtype=torch.float64)
            self._m2 = torch.zeros(c, dtype=torch.float64)
        top, pred = logits.detach().to(torch.float64).max(dim=1)
        keep = pred == target
        x, cls = top[keep].cpu(), pred[keep].cpu()
        if x.numel() == 0:
            return self
        n_b = torch.zeros(c, dtype=torch.float64).index_add_(0, cls, torch.ones_like(x))
        s_b = torch.zeros(c, dtype=torch.float64).index_add_(0, cls, x)
        mean_b = s_b / n_b.clamp_min(1)
        m2_b = torch.zeros(c, dtype=torch.float64).index_add_(0, cls, (x - mean_b[cls]) ** 2)
        n = self._n + n_b
        delta = mean_b - self._mean
        safe_n = n.clamp_min(1)
        self._mean = self._mean + delta * n_b / safe_n
        self._m2 = self._m2 + m2_b + delta**2 * self._n * n_b / safe_n
        self._n = n
        return self

    def compute(self) -> SMLStatistics:
        """Turn the accumulated moments into ``class_mean_`` / ``class_std_``; returns self."""
        if self._n is None or self._n.sum() == 0:
            raise ValueError("SMLStatistics saw no correctly predicted, non-ignored pixel; cannot estimate "
                             "class statistics (check `target` / `ignore_index`)")
        n, mean, m2 = self._n, self._mean, self._m2
        total = n.sum()
        pooled_mean = (n * mean).sum() / total
        pooled_m2 = (m2 + n * (mean - pooled_mean) ** 2).sum()
        pooled_std = (pooled_m2 / total).sqrt().clamp_min(1e-6)
        std = (m2 / n.clamp_min(1)).sqrt()
        fallback = (n < self.min_count) | (std <= 0)
        self.class_mean_ = torch.where(fallback, pooled_mean, mean)
        self.class_std_ = torch.where(fallback, pooled_std, std)
        self.count_ = n.to(torch.int64)
        self.fallback_ = fallback
        return self

    def fit(self, batches: BatchSource) -> SMLStatistics:
        """Reset, stream ``batches`` once (dicts or ``(logits, target[, features])`` tuples), compute; returns self."""
        self.reset()
        seen = False
        for logits, target, _ in iterate(from_store(batches)):
            if target is None:
                raise ValueError("SMLStatistics.fit needs targets: a batch has no 'target'")
            self.update(logits, target)
            seen = True
        if not seen:
            raise ValueError("`batches` is empty")
        return self.compute()

    def standardize(self, logits: Tensor) -> Tensor:
        r"""``ž_c = (z_c − μ_c) / σ_c`` for every class (float32, float64 kept)."""
        self._check_fitted()
        z = as_compute(logits)
        _check_len(z.shape[1], self.class_mean_.numel())
        inv = (1.0 / self.class_std_).to(z).view(1, -1, 1, 1)
        return torch.addcmul((-self.class_mean_ / self.class_std_).to(z).view(1, -1, 1, 1), z, inv)

    def _check_fitted(self) -> None:
        if not hasattr(self, "class_mean_"):
            raise NotFittedError("SMLStatistics is not fitted: call fit(batches) or update(...).compute() first")

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"class_mean": self.class_mean_.clone(), "class_std": self.class_std_.clone(),
                "count": self.count_.clone(), "fallback": self.fallback_.clone(),
                "ignore_index": self.ignore_index, "min_count": self.min_count}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SMLStatistics:
        obj = cls(ignore_index=state["ignore_index"], min_count=state["min_count"])
        obj.class_mean_ = state["class_mean"].to(torch.float64)
        obj.class_std_ = state["class_std"].to(torch.float64)
        obj.count_ = state["count"]
        obj.fallback_ = state["fallback"]
        return obj


def fit_sml_statistics(batches: BatchSource, ignore_index: int | None = 255, *, min_count: int = 2) -> SMLStatistics:
    """One streaming pass over ``batches``; see :class:`SMLStatistics`.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 3, 8, 8)
        >>> fit_sml_statistics([(z, z.argmax(1))]).class_std_.shape
        torch.Size([3])
    """
    return SMLStatistics(ignore_index=ignore_index, min_count=min_count).fit(batches)


def _check_len(c: int, k: int) -> None:
    if c != k:
        raise ValueError(f"`logits` has C={c} classes but the class statistics have {k} entries")


def _as_stat(x: Tensor | Sequence[float], name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    if t.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence of length C, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"`{name}` contains NaN or inf values")
    return t


def standardized_max_logit(logits: Tensor, class_mean: Tensor | Sequence[float],
                           class_std: Tensor | Sequence[float]) -> Tensor:
    r"""Negative standardized max logit, per pixel.

    .. math:: s = -\frac{\max_c z_c - \mu_{\hat y}}{\sigma_{\hat y}}, \quad \hat y = \arg\max_c z_c

    Only the standardization step of SML; the paper's boundary suppression and dilated smoothing are not applied.

    Args:
        logits: raw class scores.
        class_mean: ``μ_c`` for each class (e.g. ``SMLStatistics.class_mean_``).
        class_std: ``σ_c > 0`` for each class.

    Shape:
        - logits: ``(N, C, H, W)``; class_mean, class_std: ``(C,)``
        - output: ``(N, H, W)``

    Returns:
        The score map; higher = more anomalous.

    References:
        Jung et al., ICCV 2021, arXiv:2107.11264.

    Example:
        >>> import torch
        >>> z = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
        >>> standardized_max_logit(z, [0.0, 2.0], [1.0, 0.5]).item()
        -2.0
    """
    z = as_compute(logits)
    mu, sd = _as_stat(class_mean, "class_mean"), _as_stat(class_std, "class_std")
    _check_len(z.shape[1], mu.numel())
    _check_len(z.shape[1], sd.numel())
    if (sd <= 0).any():
        raise ValueError("`class_std` must be > 0 for every class")
    top, pred = z.max(dim=1)
    return -(top - mu.to(z)[pred]) / sd.to(z)[pred]


class StandardizedMaxLogit(Detector, nn.Module):
    """Module twin of :func:`standardized_max_logit` (registered detector ``"sml"``); statistics given or learned.

    Given ``class_mean`` and ``class_std``, the detector is ready to score; :meth:`fit` (re-)estimates them from the
    batches it is given (:class:`SMLStatistics`, one streaming pass).

    Args:
        class_mean, class_std: ``(C,)`` statistics, or None (both) to learn them with :meth:`fit`.
        ignore_index: label excluded from the statistics (``None`` = no void label).
        min_count: minimum pixels for a class's own statistics (see :class:`SMLStatistics`).

    Attributes:
        class_mean_, class_std_: ``(C,)`` float64 statistics in use.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 3, 8, 8)
        >>> StandardizedMaxLogit().fit([(z, z.argmax(1))]).score(z).shape
        torch.Size([2, 8, 8])
    """

    name = "sml"
    _learned = ("class_mean_", "class_std_")

    def __init__(self, class_mean: Tensor | Sequence[float] | None = None,
                 class_std: Tensor | Sequence[float] | None = None, *, ignore_index: int | None = 255,
                 min_count: int = 2) -> None:
        super().__init__()
        if (class_mean is None) != (class_std is None):
            raise ValueError("give both `class_mean` and `class_std`, or neither (then call fit)")
        self.class_mean, self.class_std = class_mean, class_std
        self.ignore_index = ignore_index
        self.min_count = min_count
        if class_mean is not None:
            self.class_mean_ = _as_stat(class_mean, "class_mean").to(torch.float64)
            self.class_std_ = _as_stat(class_std, "class_std").to(torch.float64)  # type: ignore[arg-type]

    def fit(self, batches: BatchSource) -> StandardizedMaxLogit:
        """Estimate ``class_mean_`` / ``class_std_`` from ``batches`` (one pass); returns self."""
        stats = fit_sml_statistics(batches, self.ignore_index, min_count=self.min_count)
        self.class_mean_, self.class_std_ = stats.class_mean_, stats.class_std_
        return self

    def forward(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        self._check_fitted()
        return standardized_max_logit(logits, self.class_mean_, self.class_std_)

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return self.forward(logits)

    def _set_state(self, state: dict[str, Any]) -> None:
        mean, std = (_as_stat(state.get(k), k) for k in ("class_mean_", "class_std_"))
        if mean.shape != std.shape or not (std > 0).all():
            raise ValueError("class_std_ must be positive and of the same length as class_mean_")
        self.class_mean_, self.class_std_ = mean.to(torch.float64), std.to(torch.float64)

    @classmethod
    def _upgrade(cls, d: Any) -> Any:
        """Read files of the first SML format (``{"kind": "sml", "class_mean", "class_std", "ignore_index"}``)."""
        if isinstance(d, dict) and d.get("kind") == "sml" and "format" not in d:
            return {"format": FORMAT, "version": 1, "kind": "detector", "name": "sml",
                    "class": "StandardizedMaxLogit", "params": {"ignore_index": d.get("ignore_index")},
                    "state": {"class_mean_": d.get("class_mean"), "class_std_": d.get("class_std")}}
        return d


def load_pretrained_sml(name: str) -> StandardizedMaxLogit:
    """SML statistics shipped in ``segcal/assets/sml-<name>.pt`` (training-split statistics of that model).

    Same as ``StandardizedMaxLogit.pretrained(name)`` but raises instead of returning None.
    """
    det = StandardizedMaxLogit.pretrained(name)
    if det is None:
        raise FileNotFoundError(f"no shipped SML statistics 'sml-{name}.pt' in segcal/assets; fit them with "
                                "StandardizedMaxLogit().fit(store) and pass --detector-file")
    return det
