"""Free-energy score."""

from __future__ import annotations

from torch import Tensor, nn

from segcal.detectors._base import Detector
from segcal.detectors._scores import as_compute


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Free energy of the logits, per pixel.

    .. math:: E(z; T) = -T \log \sum_c \exp(z_c / T)

    In-distribution pixels have large logits and hence low (very negative) energy; higher = more anomalous.

    Args:
        logits: raw class scores.
        temperature: ``T > 0``.

    Shape:
        - logits: ``(N, C, H, W)``
        - output: ``(N, H, W)``

    Returns:
        The score map (unbounded).

    Raises:
        ValueError: if ``temperature`` is not a positive finite number.

    References:
        Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020, arXiv:2010.03759.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 5, 3, 3)
        >>> torch.allclose(energy(z), -torch.logsumexp(z, dim=1))
        True
    """
    t = _check_temperature(temperature)
    z = as_compute(logits)
    return -t * (z / t).logsumexp(dim=1)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and t < float("inf")):
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature}")
    return t


class Energy(Detector, nn.Module):
    """Module twin of :func:`energy` (registered detector ``"energy"``; no fit needed); stores ``temperature``."""

    name = "energy"
    requires_fit = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return energy(logits, self.temperature)

    def score(self, logits: Tensor, features: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return energy(logits, self.temperature)
