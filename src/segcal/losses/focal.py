"""Focal loss ``-(1 - p_y)^γ log p_y``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from segcal.losses._common import check_nonnegative, check_reduction, nll_map, prepare, reduce_loss


def focal(logits: Tensor, target: Tensor, gamma: float = 3.0, ignore_index: int | None = 255,
          reduction: str = "mean") -> Tensor:
    r"""Focal loss, averaged over valid pixels.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} -(1 - p_{y_i}(i))^{\gamma} \log p_{y_i}(i)

    Args:
        logits: raw scores.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        gamma: focusing parameter ``>= 0``; ``0`` is plain cross-entropy (3 as in the MbLS/NACL medical code).
        ignore_index: label excluded from the loss and the mean.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv 1708.02002;
        Mukhoti et al., "Calibrating Deep Neural Networks using Focal Loss", NeurIPS 2020, arXiv 2002.09437.

    Example:
        >>> import torch
        >>> focal(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3)), gamma=3.0).shape
        torch.Size([])
    """
    gamma = check_nonnegative(gamma, "gamma")
    logits, target, valid, _ = prepare(logits, target, ignore_index, reduction)
    nll = nll_map(logits, target, ignore_index)
    if gamma == 0:
        return reduce_loss(nll, valid, reduction)
    # 1 - exp(-nll) can round to a tiny negative; clamping keeps pow() real
    weight = (-torch.expm1(-nll)).clamp_min(0).pow(gamma)
    return reduce_loss(weight * nll, valid, reduction)


class FocalLoss(nn.Module):
    """Module twin of :func:`focal`.

    Example:
        >>> import torch
        >>> FocalLoss(gamma=3.0)(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))).shape
        torch.Size([])
    """

    def __init__(self, gamma: float = 3.0, ignore_index: int | None = 255, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = check_nonnegative(gamma, "gamma")
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal(logits, target, self.gamma, self.ignore_index, self.reduction)
