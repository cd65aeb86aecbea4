"""Cross-entropy averaged over valid pixels (the baseline every calibration loss is compared with)."""

from __future__ import annotations

from torch import Tensor, nn

from segcal.losses._common import check_reduction, nll_map, prepare, reduce_loss


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int | None = 255, reduction: str = "mean") -> Tensor:
    r"""Pixel-wise cross-entropy, averaged over valid pixels only.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} -\log \mathrm{softmax}(z_i)_{y_i}

    Args:
        logits: raw scores ``z``.
        target: class indices; ``ignore_index`` marks pixels that get no loss.
        ignore_index: label excluded from the loss and from the mean's denominator (``None``: none).
        reduction: ``"mean"`` over valid pixels, ``"sum"``, or ``"none"`` for the per-pixel map (0 at ignore).

    Shape:
        - logits: :math:`(B, C, H, W)`, float (half precision is computed in float32).
        - target: :math:`(B, H, W)`, integer.
        - output: scalar, or :math:`(B, H, W)` with ``reduction="none"``.

    Returns:
        The loss tensor.

    References:
        Standard; the valid-pixel mean avoids the "divide by all pixels" trap of kornia/MMSeg.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 2, 2)
        >>> target = torch.tensor([[[0, 1], [2, 255]]])
        >>> round(cross_entropy(logits, target).item(), 4)  # log(3)
        1.0986
    """
    logits, target, valid, _ = prepare(logits, target, ignore_index, reduction)
    return reduce_loss(nll_map(logits, target, ignore_index), valid, reduction)


class CrossEntropyLoss(nn.Module):
    """Module twin of :func:`cross_entropy`.

    Example:
        >>> import torch
        >>> CrossEntropyLoss()(torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))).shape
        torch.Size([])
    """

    def __init__(self, ignore_index: int | None = 255, reduction: str = "mean") -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target, self.ignore_index, self.reduction)
