r"""Pixel-level prediction sets with image-level coverage risk control.

Every pixel gets a multi-label set :math:`S_λ = \{k : s_k \le λ\}` (LAC: :math:`p_k \ge 1 - λ`; or APS). For image i
with :math:`n_i` valid pixels, the miss fraction is
:math:`m_i(λ) = \frac{1}{n_i} \#\{ \text{valid pixels whose true class is not in } S_λ \}`, and the controlled loss is

.. math::
    L_i(λ) = \mathbb 1[m_i(λ) > ε] \quad (\texttt{loss="indicator"}), \qquad L_i(λ) = m_i(λ) \quad
    (\texttt{loss="fraction"}),

both in [0, 1] and non-increasing in λ. With λ̂ from conformal risk control (:mod:`segcal.conformal.risk`),
``loss="indicator"`` guarantees that, on average over calibration splits, at least 1 − α of new exchangeable images
have at most ε of their valid pixels left out of the set; ``loss="fraction"`` bounds the expected miss fraction of an
image by α. Images without valid pixels have m_i = 0 (nothing to miss) and count in n.

References:
    Angelopoulos et al., "Conformal Risk Control", arXiv:2208.02814; Mossina, Dalmau, Andéol, "Conformal Semantic
    Image Segmentation: Post-hoc Quantification of Predictive Uncertainty", CVPRW 2024, arXiv:2304.06052 (the
    image-level ε-coverage loss with LAC sets is theirs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcal.calibrators import Calibrator
from segcal.conformal._bounds import exceed_counts
from segcal.conformal.risk import RiskControl

LOSSES = ("indicator", "fraction")


class CoverageRiskControl(RiskControl):
    r"""Prediction sets per pixel whose image-level coverage is controlled: P(miss fraction > ε) ≤ α (in expectation).

    Args:
        alpha: risk level α: the expected share of images with more than ε uncovered pixels (``"indicator"``), or the
            expected miss fraction (``"fraction"``).
        epsilon: tolerated fraction ε ∈ [0, 1) of an image's valid pixels left out of their sets (``"indicator"``).
        ignore_index: void label (excluded everywhere); None = no void label.
        loss: ``"indicator"`` (1[m_i > ε]) or ``"fraction"`` (m_i).
        score: ``"lac"`` or ``"aps"``.
        calibrator, calibrator_split: a post-hoc calibrator applied to the logits first (fitted: used as is;
            unfitted: fitted on a ``calibrator_split`` share of the calibration images); see ``RiskControl``.
        n_grid, refine, batch_size: see :class:`~segcal.conformal.RiskControl`.

    Shape:
        fit: logits ``(N, C, H, W)``, target ``(N, H, W)``. ``predict`` → bool ``(N, C, H, W)``;
        ``set_size`` → int64 ``(N, H, W)``.

    Attributes:
        threshold_ / lambda_hat_, risk_bound_, empirical_risk_, set_size_ (mean classes per valid pixel on the
        calibration split at λ̂), n_calibration_, grid_, risk_curve_, set_size_curve_, feasible_, num_classes_.

    References:
        Angelopoulos et al., arXiv:2208.02814; Mossina et al., arXiv:2304.06052.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z, y = torch.randn(50, 4, 8, 8, generator=g) * 3, torch.randint(0, 4, (50, 8, 8), generator=g)
        >>> crc = CoverageRiskControl(alpha=0.1, epsilon=0.1).fit(z, y)
        >>> crc.predict(z).shape, crc.risk_bound_ <= 0.1
        (torch.Size([50, 4, 8, 8]), True)
    """

    def __init__(self, alpha: float = 0.1, epsilon: float = 0.1, ignore_index: int | None = 255, *,
                 loss: str = "indicator", score: str = "lac", calibrator: Calibrator | None = None,
                 calibrator_split: float = 0.5, n_grid: int = 1001, refine: bool = True, batch_size: int = 4) -> None:
        self.alpha = alpha
        self.epsilon = epsilon
        self.ignore_index = ignore_index
        self.loss = loss
        self.score = score
        self.calibrator = calibrator
        self.calibrator_split = calibrator_split
        self.n_grid = n_grid
        self.refine = refine
        self.batch_size = batch_size
        self.bound = 1.0

    def _check_params(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}")
        if not (isinstance(self.epsilon, (int, float)) and 0.0 <= self.epsilon < 1.0):
            raise ValueError(f"`epsilon` must be in [0, 1), got {self.epsilon!r}")
        super()._check_params()

    def _miss_counts(self, scores: Tensor, target: Tensor, valid: Tensor, grid: Tensor) -> Tensor:
        s_true = scores.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
        return exceed_counts(s_true, valid, grid)

    def _curves(self, scores: Tensor, target: Tensor, valid: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
        missed = self._miss_counts(scores, target, valid, grid)
        n_valid = valid.flatten(1).sum(1, dtype=torch.int64)[:, None]
        if self.loss == "indicator":
            losses = (missed.double() > self.epsilon * n_valid.double()).double()
        else:
            losses = missed.double() / n_valid.clamp_min(1).double()
        return losses, torch.ones(scores.shape[0], dtype=torch.bool)
