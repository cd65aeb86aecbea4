"""MbLS: margin-based label smoothing — cross-entropy plus a hinge on logit distances above a margin."""

from __future__ import annotations

from torch import Tensor, nn

from segcal.losses._common import MarginPenalty, check_nonnegative, check_reduction, nll_map, prepare, reduce_loss


def mbls(logits: Tensor, target: Tensor, margin: float = 10.0, alpha: float = 0.1, ignore_index: int | None = 255,
         reduction: str = "mean") -> Tensor:
    r"""Margin-based label smoothing, averaged over valid pixels.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} \Big[ -\log p_{y_i}(i)
              + \frac{\alpha}{C} \sum_k \max\big(0,\ \max_j z_j(i) - z_k(i) - m\big) \Big]

    i.e. the penalty is the mean over valid pixels × all C classes (the argmax class contributes 0); ignore pixels are
    dropped from both terms before averaging.

    Args:
        logits: raw scores ``z``.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        margin: logit distance ``m >= 0`` tolerated before the penalty starts (10; 5 in the medical papers).
        alpha: penalty weight ``λ >= 0``; ``0`` (or a huge margin) is plain cross-entropy.
        ignore_index: label excluded from the loss and the mean.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Liu et al., "The Devil is in the Margin: Margin-based Label Smoothing for Network Calibration", CVPR 2022,
        arXiv 2111.15430; Murugesan et al., "Calibrating Segmentation Networks with Margin-based Label Smoothing",
        MedIA 2023, arXiv 2209.09641.

    Example:
        >>> import torch
        >>> mbls(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3)), margin=10.0, alpha=0.1).shape
        torch.Size([])
    """
    margin = check_nonnegative(margin, "margin")
    alpha = check_nonnegative(alpha, "alpha")
    logits, target, valid, _ = prepare(logits, target, ignore_index, reduction)
    nll = nll_map(logits, target, ignore_index)
    if alpha == 0:
        return reduce_loss(nll, valid, reduction)
    penalty = MarginPenalty.apply(logits, margin)
    return reduce_loss(nll + alpha * penalty, valid, reduction)


class MbLSLoss(nn.Module):
    """Module twin of :func:`mbls`.

    Example:
        >>> import torch
        >>> MbLSLoss(margin=10.0, alpha=0.1)(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))).shape
        torch.Size([])
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1, ignore_index: int | None = 255,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.margin = check_nonnegative(margin, "margin")
        self.alpha = check_nonnegative(alpha, "alpha")
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return mbls(logits, target, self.margin, self.alpha, self.ignore_index, self.reduction)
