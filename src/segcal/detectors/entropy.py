"""Predictive entropy score."""

from __future__ import annotations

from torch import Tensor, nn

from segcal.detectors._base import Detector
from segcal.detectors._scores import as_compute


def entropy(logits: Tensor) -> Tensor:
    r"""Shannon entropy of the softmax, per pixel (nats).

    .. math:: s = -\sum_c p_c \log p_c, \quad p = \operatorname{softmax}(z)

    Computed from ``log_softmax`` so that saturated classes (``p_c = 0``) contribute exactly 0.

    Args:
        logits: raw class scores.

    Shape:
        - logits: ``(N, C, H, W)``
        - output: ``(N, H, W)``

    Returns:
        The score map in ``[0, log C]``; higher = more anomalous.

    References:
        Shannon, "A Mathematical Theory of Communication", 1948; as an uncertainty score e.g. Hendrycks & Gimpel,
        arXiv:1610.02136.

    Example:
        >>> import math, torch
        >>> round(entropy(torch.zeros(1, 4, 1, 1)).item() - math.log(4), 6)
        0.0
    """
    logp = as_compute(logits).log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


class Entropy(Detector, nn.Module):
    """Module twin of :func:`entropy` (registered as ``"entropy"``, no fit needed); ``score`` = ``forward``."""

    name = "entropy"
    requires_fit = False

    def forward(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return entropy(logits)

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return entropy(logits)
