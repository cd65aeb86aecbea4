"""Maximum softmax probability (MSP) score."""

from __future__ import annotations

from torch import Tensor, nn

from segcal.detectors._base import Detector
from segcal.detectors._scores import as_compute


def msp(logits: Tensor) -> Tensor:
    r"""One minus the maximum softmax probability, per pixel.

    .. math:: s = 1 - \max_c \operatorname{softmax}(z)_c

    Higher means more likely an error / OOD pixel; values lie in ``[0, 1 - 1/C]``.

    Args:
        logits: raw class scores.

    Shape:
        - logits: ``(N, C, H, W)``
        - output: ``(N, H, W)``

    Returns:
        The score map (float32, or float64 for float64 input).

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural
        Networks", ICLR 2017, arXiv:1610.02136.

    Example:
        >>> import torch
        >>> msp(torch.zeros(1, 4, 2, 2))[0, 0, 0].item()
        0.75
    """
    z = as_compute(logits)
    return 1.0 - z.softmax(dim=1).amax(dim=1)


class MSP(Detector, nn.Module):
    """Module twin of :func:`msp` (registered as ``"msp"``, no fit needed); ``score`` = ``forward``."""

    name = "msp"
    requires_fit = False

    def forward(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return msp(logits)

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return msp(logits)
