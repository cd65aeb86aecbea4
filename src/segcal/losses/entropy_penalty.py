"""Confidence penalty (ECP): cross-entropy minus β times the predictive entropy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segcal.losses._common import check_nonnegative, check_reduction, nll_map, prepare, reduce_loss

ENTROPY_REDUCTIONS = ("sum", "mean")


def _check_entropy_reduction(entropy_reduction: str) -> str:
    if entropy_reduction not in ENTROPY_REDUCTIONS:
        raise ValueError(f"`entropy_reduction` must be one of {ENTROPY_REDUCTIONS}, got {entropy_reduction!r}")
    return entropy_reduction


def entropy_penalty(logits: Tensor, target: Tensor, beta: float = 0.1, ignore_index: int | None = 255,
                    reduction: str = "mean", entropy_reduction: str = "sum") -> Tensor:
    r"""Cross-entropy with an entropy bonus that discourages over-confident (low-entropy) outputs.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} -\log p_{y_i}(i) - \beta\, H(p(i)),
              \qquad H(p) = -\sum_k p_k \log p_k

    Scale of β: H sums over the C classes (the paper's entropy). MbLS's ``PenaltyEntropy`` (github.com/by-liu/MbLS,
    the implementation most segmentation papers use) takes ``ent.mean()`` over pixels *and classes*, i.e. H / C, so
    its ``alpha`` equals ``C · beta`` here; ``entropy_reduction="mean"`` uses H / C and matches it (MbLS also clamps
    p to [1e-8, 1 − 1e-8] inside the entropy, a difference below 1e-6 in the loss).

    Args:
        logits: raw scores.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        beta: weight ``>= 0`` of the entropy term; ``0`` is plain cross-entropy.
        ignore_index: label excluded from the loss and the mean.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.
        entropy_reduction: ``"sum"`` over classes (default, the paper) or ``"mean"`` over classes (MbLS's scale).

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Pereyra et al., "Regularizing Neural Networks by Penalizing Confident Output Distributions", ICLR-W 2017,
        arXiv 1701.06548.

    Example:
        >>> import torch
        >>> entropy_penalty(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3)), beta=0.1).shape
        torch.Size([])
    """
    beta = check_nonnegative(beta, "beta")
    _check_entropy_reduction(entropy_reduction)
    logits, target, valid, _ = prepare(logits, target, ignore_index, reduction)
    nll = nll_map(logits, target, ignore_index)
    if beta == 0:
        return reduce_loss(nll, valid, reduction)
    logp = F.log_softmax(logits, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    if entropy_reduction == "mean":
        entropy = entropy / logits.shape[1]
    return reduce_loss(nll - beta * entropy, valid, reduction)


class EntropyPenaltyLoss(nn.Module):
    """Module twin of :func:`entropy_penalty` (``entropy_reduction="mean"`` matches MbLS's ``PenaltyEntropy`` scale).

    Example:
        >>> import torch
        >>> EntropyPenaltyLoss(beta=0.1)(torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))).shape
        torch.Size([])
    """

    def __init__(self, beta: float = 0.1, ignore_index: int | None = 255, reduction: str = "mean",
                 entropy_reduction: str = "sum") -> None:
        super().__init__()
        self.beta = check_nonnegative(beta, "beta")
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)
        self.entropy_reduction = _check_entropy_reduction(entropy_reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return entropy_penalty(logits, target, self.beta, self.ignore_index, self.reduction, self.entropy_reduction)
