"""Label smoothing: cross-entropy against ``(1 - ε)·onehot + ε/C``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segcal.losses._common import check_nonnegative, check_reduction, nll_map, prepare, reduce_loss


def _check_epsilon(epsilon: float) -> float:
    epsilon = check_nonnegative(epsilon, "epsilon")
    if epsilon > 1:
        raise ValueError(f"`epsilon` must be in [0, 1], got {epsilon}")
    return epsilon


def label_smoothing(logits: Tensor, target: Tensor, epsilon: float = 0.1, ignore_index: int | None = 255,
                    reduction: str = "mean") -> Tensor:
    r"""Label-smoothing cross-entropy, averaged over valid pixels.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} (1 - \epsilon)\,(-\log p_{y_i}(i))
              + \epsilon \cdot \frac{1}{C} \sum_k -\log p_k(i)

    Args:
        logits: raw scores.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        epsilon: smoothing mass in ``[0, 1]``; ``0`` is plain cross-entropy.
        ignore_index: label excluded from the loss and the mean.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016, arXiv 1512.00567.

    Example:
        >>> import torch
        >>> label_smoothing(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3)), epsilon=0.1).shape
        torch.Size([])
    """
    epsilon = _check_epsilon(epsilon)
    logits, target, valid, _ = prepare(logits, target, ignore_index, reduction)
    uniform = -F.log_softmax(logits, dim=1).mean(dim=1)
    per_pixel = (1 - epsilon) * nll_map(logits, target, ignore_index) + epsilon * uniform
    return reduce_loss(per_pixel, valid, reduction)


class LabelSmoothingLoss(nn.Module):
    """Module twin of :func:`label_smoothing`.

    Example:
        >>> import torch
        >>> LabelSmoothingLoss(epsilon=0.1)(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))).shape
        torch.Size([])
    """

    def __init__(self, epsilon: float = 0.1, ignore_index: int | None = 255, reduction: str = "mean") -> None:
        super().__init__()
        self.epsilon = _check_epsilon(epsilon)
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return label_smoothing(logits, target, self.epsilon, self.ignore_index, self.reduction)
