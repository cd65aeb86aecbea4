r"""False-negative-rate control of one class's binary mask (the medical use case: "recall of the tumour ≥ 1 − α").

The mask of class k at threshold λ is :math:`M_λ = \{ \text{pixels} : p_k \ge 1 - λ \}`; it grows with λ. For image i
with :math:`P_i` valid pixels of class k, the loss is the false-negative rate

.. math::
    L_i(λ) = 1 - \frac{|M_λ \cap \{y = k\}|}{P_i} \in [0, 1],

non-increasing in λ. Conformal risk control then gives :math:`\mathbb E[\mathrm{FNR}_{n+1}(\hat λ)] \le α`.

Images without class-k pixels (:math:`P_i = 0`) have nothing to miss: with ``count_empty=True`` (default) they enter
n with loss 0, so the guarantee is over *all* images — and the FNR of the images that do contain k is only bounded by
α / P(image contains k). With ``count_empty=False`` they are left out of n at calibration and must be left out at
test time too: the guarantee is then conditional on the image containing class k (exchangeability among those
images), which is the statement a clinician usually wants.

References:
    Angelopoulos et al., "Conformal Risk Control", arXiv:2208.02814 (Section 3, FNR control of tumour masks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcal.calibrators import Calibrator
from segcal.conformal._bounds import exceed_counts
from segcal.conformal.risk import RiskControl


class FNRControl(RiskControl):
    r"""Binary mask of class ``class_index`` whose expected per-image false-negative rate is ≤ α.

    Args:
        alpha: level α of the expected FNR (1 − the guaranteed mean recall).
        class_index: the class of interest k ∈ [0, C).
        ignore_index: void label; None = no void label.
        count_empty: images without class-k pixels count with loss 0 (True) or are left out (False); see above.
        calibrator, calibrator_split: a post-hoc calibrator applied to the logits first (fitted: used as is;
            unfitted: fitted on a ``calibrator_split`` share of the calibration images); see ``RiskControl``.
        n_grid, refine, batch_size: see :class:`~segcal.conformal.RiskControl`.

    Shape:
        fit: logits ``(N, C, H, W)``, target ``(N, H, W)``. ``predict`` → bool ``(N, H, W)``.

    Attributes:
        threshold_ / lambda_hat_, risk_bound_, empirical_risk_ (mean FNR at λ̂), set_size_ (fraction of valid
        calibration pixels inside the mask at λ̂), n_calibration_, grid_, risk_curve_, set_size_curve_, feasible_,
        num_classes_.

    References:
        Angelopoulos et al., "Conformal Risk Control", arXiv:2208.02814.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z, y = torch.randn(60, 3, 8, 8, generator=g) * 2, torch.randint(0, 3, (60, 8, 8), generator=g)
        >>> fnr = FNRControl(alpha=0.1, class_index=1).fit(z, y)
        >>> fnr.predict(z).shape, fnr.risk_bound_ <= 0.1
        (torch.Size([60, 8, 8]), True)
    """

    def __init__(self, alpha: float = 0.1, class_index: int = 0, ignore_index: int | None = 255, *,
                 count_empty: bool = True, calibrator: Calibrator | None = None, calibrator_split: float = 0.5,
                 n_grid: int = 1001, refine: bool = True, batch_size: int = 4) -> None:
        self.alpha = alpha
        self.class_index = class_index
        self.ignore_index = ignore_index
        self.count_empty = count_empty
        self.calibrator = calibrator
        self.calibrator_split = calibrator_split
        self.n_grid = n_grid
        self.refine = refine
        self.batch_size = batch_size
        self.bound = 1.0
        self.score = "lac"

    def _check_params(self) -> None:
        k = self.class_index
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"`class_index` must be a non-negative int, got {k!r}")
        super()._check_params()

    def _check_classes(self, c: int) -> None:
        if self.class_index >= c:
            raise ValueError(f"`class_index`={self.class_index} but the logits have only C={c} classes")

    def _mask_class(self) -> int | None:
        return self.class_index

    def _select(self, scores: Tensor) -> Tensor:
        """Score of the class of interest, ``1 - p_k``, float64 ``(N, 1, H, W)``; a pixel is in the mask iff ≤ λ."""
        return scores[:, self.class_index:self.class_index + 1]

    def _curves(self, scores: Tensor, target: Tensor, valid: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
        s = scores[:, 0]
        positive = valid & (target == self.class_index)
        n_pos = positive.flatten(1).sum(1, dtype=torch.int64)
        missed = exceed_counts(s, positive, grid)
        losses = missed.double() / n_pos.clamp_min(1).double()[:, None]
        counted = n_pos > 0 if not self.count_empty else torch.ones_like(n_pos, dtype=torch.bool)
        return losses, counted

    def predict(self, logits: Tensor) -> Tensor:
        """Mask of class ``class_index`` at λ̂: bool ``(N, H, W)``, pixels with ``p_k ≥ 1 - λ̂``."""
        return self._checked_scores(logits)[:, 0] <= self.threshold_

    def set_size(self, logits: Tensor) -> Tensor:
        """The mask as int64 ``(N, H, W)`` (1 inside, 0 outside), for symmetry with the coverage sets."""
        return self.predict(logits).long()
