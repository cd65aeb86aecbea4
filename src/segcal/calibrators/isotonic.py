"""Isotonic calibration."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator
from segcal.calibrators._binning import accumulate, apply_table, fine_centres


def _pava(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted pool-adjacent-violators: the non-decreasing fit minimising Σ w (y − f)²."""
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w2 = wts[-2] + wts[-1]
            v2 = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w2
            n2 = lens[-2] + lens[-1]
            del vals[-1], wts[-1], lens[-1]
            vals[-1], wts[-1], lens[-1] = v2, w2, n2
    return np.repeat(vals, lens)


class IsotonicCalibration(Calibrator):
    r"""Isotonic regression of the event frequency on the score (non-decreasing, otherwise free-form).

    .. math::
        \hat f = \arg\min_{f \uparrow} \sum_i (f(s_i) - \text{event}_i)^2

    ``mode="top-label"`` (default): s = top-label confidence, event = "prediction correct", other classes rescaled
    to share 1 − f(c). ``mode="one-vs-rest"``: one isotonic map per class on p_k against y = k, then renormalised.
    Solved exactly by weighted PAVA on the 4000-bin fine histogram of logit(s) (one streaming pass; pixels in one fine
    bin — width 0.01 in logit — share a value); empty fine bins interpolate. Outputs clamped to [1e-6, 1 − 1e-6].
    Top-label keeps the argmax (ĉ floored as in :class:`HistogramBinning`); one-vs-rest **can change it**.

    Args:
        ignore_index: label excluded from fitting.
        mode: ``"top-label"`` or ``"one-vs-rest"``.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``; ``transform`` returns ``(N, C, H, W)`` (log-probabilities).

    Attributes:
        table_ (Tensor): calibrated probability per fine bin, ``(1 or C, 4000)``, non-decreasing along the bins.

    References:
        Zadrozny & Elkan, "Transforming classifier scores into accurate multiclass probability estimates", KDD 2002.

    Example:
        >>> z, y = torch.randn(2, 3, 8, 8) * 3, torch.randint(0, 3, (2, 8, 8))
        >>> IsotonicCalibration().fit(z, y).transform(z).shape
        torch.Size([2, 3, 8, 8])
    """

    name = "isotonic"
    _learned = ("table_",)

    @property
    def preserves_argmax(self) -> bool:  # type: ignore[override]
        return self.mode == "top-label"

    def __init__(self, ignore_index: int | None = 255, *, mode: str = "top-label") -> None:
        self.ignore_index = ignore_index
        self.mode = mode

    def _fit(self, source: BatchSource) -> None:
        counts, pos = accumulate(self, source, self.mode)
        centres = fine_centres()
        table = np.empty_like(counts)
        for k in range(counts.shape[0]):
            nz = counts[k] > 0
            if not nz.any():
                table[k] = 1.0 / (1.0 + np.exp(-centres))
                continue
            fit = _pava(pos[k][nz] / counts[k][nz], counts[k][nz])
            table[k] = np.interp(centres, centres[nz], fit)
        self.table_ = torch.from_numpy(table).float()

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        return apply_table(z, self.table_, self.mode)
