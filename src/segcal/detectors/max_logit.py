"""Negative maximum logit score."""

from __future__ import annotations

from torch import Tensor, nn

from segcal.detectors._base import Detector
from segcal.detectors._scores import as_compute


def max_logit(logits: Tensor) -> Tensor:
    r"""Negative maximum logit, per pixel.

    .. math:: s = -\max_c z_c

    Args:
        logits: raw class scores.

    Shape:
        - logits: ``(N, C, H, W)``
        - output: ``(N, H, W)``

    Returns:
        The score map; higher = more anomalous (unbounded).

    References:
        Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022,
        arXiv:1911.11132.

    Example:
        >>> import torch
        >>> max_logit(torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)).item()
        -3.0
    """
    return -as_compute(logits).amax(dim=1)


class MaxLogit(Detector, nn.Module):
    """Module twin of :func:`max_logit` (registered as ``"max_logit"``, no fit needed); ``score`` = ``forward``."""

    name = "max_logit"
    requires_fit = False

    def forward(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return max_logit(logits)

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return max_logit(logits)
