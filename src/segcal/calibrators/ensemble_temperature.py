"""Ensemble temperature scaling."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator, pixel_chunks, streaming_lbfgs
from segcal.calibrators.temperature import TemperatureScaling

_FLOOR = 1e-3


def _mix(a: Tensor) -> Tensor:
    """Simplex weights with w1 + w2 ≥ 1e-3, so a fit that wants pure uniform output still keeps the argmax."""
    floor = torch.tensor([0.5, 0.5, 0.0], dtype=a.dtype, device=a.device) * _FLOOR
    return torch.softmax(a, 0) * (1 - _FLOOR) + floor


class EnsembleTemperatureScaling(Calibrator):
    r"""Ensemble temperature scaling: a mixture of the tempered, the original and the uniform distribution.

    .. math::
        p = w_1 \operatorname{softmax}(z/T) + w_2 \operatorname{softmax}(z) + w_3 / C, \qquad w \in \Delta^2

    As in the reference implementation, T is first fitted by :class:`TemperatureScaling`, then the weights minimise the
    NLL (convex in w) by streaming L-BFGS over a softmax parameterisation ``w = softmax(a)`` — so they stay on the
    simplex by construction; ``w1 + w2 ≥ 1e-3`` so that degenerate data (uniform weight → 1) cannot erase the
    prediction. ``transform`` returns ``log p`` (a valid logit vector). Every component is monotone in z, so the argmax
    is preserved.

    Args:
        ignore_index: label excluded from fitting.
        max_iter: L-BFGS iterations for the weights.
        max_pixels: if set, fit T and w on a seeded uniform sample of this many valid pixels.
        seed: seed of the pixel sample.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``; ``transform`` returns ``(N, C, H, W)``.

    Attributes:
        temperature_ (float), weights_ (Tensor): ``(3,)`` on the simplex, nll_ (float).

    References:
        Zhang, Kailkhura, Han, "Mix-n-Match: Ensemble and Compositional Methods for Uncertainty Calibration in Deep
        Learning", ICML 2020, arXiv:2003.07329.

    Example:
        >>> z, y = torch.randn(2, 3, 8, 8) * 3, torch.randint(0, 3, (2, 8, 8))
        >>> float(EnsembleTemperatureScaling().fit(z, y).weights_.sum())
        1.0
    """

    name = "ets"
    _learned = ("temperature_", "weights_", "nll_")

    def __init__(self, ignore_index: int | None = 255, *, max_iter: int = 100, max_pixels: int | None = None,
                 seed: int = 0) -> None:
        self.ignore_index = ignore_index
        self.max_iter = max_iter
        self.max_pixels = max_pixels
        self.seed = seed

    def _fit(self, source: BatchSource) -> None:
        ts = TemperatureScaling(self.ignore_index, max_pixels=self.max_pixels, seed=self.seed)
        ts._all_reduce = self._all_reduce  # type: ignore[method-assign]
        ts._fit(source)
        t = ts.temperature_
        chunks = pixel_chunks(source, self.ignore_index, self.max_pixels, self.seed)
        a = torch.tensor([math.log(0.98), math.log(0.01), math.log(0.01)], dtype=torch.float64, requires_grad=True)

        def loss_sum(z: Tensor, y: Tensor) -> Tensor:
            z = z.double()
            idx = y[:, None]
            comp = torch.stack([torch.log_softmax(z / t, 1).gather(1, idx).squeeze(1),
                                torch.log_softmax(z, 1).gather(1, idx).squeeze(1),
                                torch.full_like(y, -math.log(z.shape[1]), dtype=z.dtype)], 1)
            return -torch.logsumexp(comp + _mix(a).log(), 1).sum()

        self.nll_ = streaming_lbfgs([a], loss_sum, chunks, max_iter=self.max_iter, reduce=self._all_reduce)
        self.temperature_ = t
        self.weights_ = _mix(a.detach()).float()

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        lw = self.weights_.to(z.dtype).clamp_min(1e-30).log()
        c = z.shape[1]
        uni = torch.full_like(z, -math.log(c))
        comp = torch.stack([torch.log_softmax(z / self.temperature_, 1), torch.log_softmax(z, 1), uni], 0)
        return torch.logsumexp(comp + lw.view(3, 1, 1, 1, 1), 0)
