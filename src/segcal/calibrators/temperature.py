"""Temperature scaling."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segcal.calibrators._base import (
    BatchSource,
    Calibrator,
    all_reduce_mean,
    column_chunks,
    dense_columns,
    fit_inverse_temperature,
    subsample_pixels,
    temperature_objective,
    warm_sample,
)

#: Pixels of the seeded warm-start sample; the final temperature is the exact optimum on all pixels regardless.
_WARM_PIXELS = 1 << 17


class TemperatureScaling(Calibrator):
    r"""Temperature scaling: one scalar temperature for every pixel and class.

    .. math::
        z' = z / T, \qquad T^\star = \arg\min_T \frac{1}{|V|}\sum_{i \in V} -\log\operatorname{softmax}(z_i/T)_{y_i}

    over valid pixels V. The NLL is convex in β = 1/T, so it is minimised by a safeguarded Newton iteration on β
    whose gradient and curvature are sums over pixels: each iteration is one streaming pass over all pixels (none
    kept in memory). A seeded ~131k-pixel warm-start sample (one cheap pass) gives the start, after which a single
    full pass usually suffices (Newton converges quadratically: a step below 5e-3 relative leaves ~1e-5). T is
    bounded to ``t_bounds``: on separable data (every pixel correct with a large margin) the NLL keeps decreasing as
    T → 0 — the classic unbounded optimiser then diverges — and here T stops at ``t_bounds[0]``.

    Args:
        ignore_index: label excluded from fitting.
        t_bounds: ``(T_min, T_max)``.
        max_pixels: if set, fit on a seeded uniform sample of this many valid pixels instead of all of them.
        seed: seed of the pixel samples.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``; ``transform`` returns ``(N, C, H, W)``.

    Attributes:
        temperature_ (float): the fitted T.
        nll_ (float): mean NLL on the fit pixels at ``temperature_``.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.

    Example:
        >>> z = torch.randn(2, 4, 8, 8) * 5
        >>> y = torch.randint(0, 4, (2, 8, 8))
        >>> ts = TemperatureScaling().fit(z, y)
        >>> ts.transform(z).shape
        torch.Size([2, 4, 8, 8])
    """

    name = "ts"
    _learned = ("temperature_", "nll_")

    def __init__(self, ignore_index: int | None = 255, *, t_bounds: tuple[float, float] = (0.02, 50.0),
                 max_pixels: int | None = None, seed: int = 0) -> None:
        self.ignore_index = ignore_index
        self.t_bounds = t_bounds
        self.max_pixels = max_pixels
        self.seed = seed

    def _fit(self, source: BatchSource) -> None:
        lo, hi = self.t_bounds
        if not 0 < lo <= hi:
            raise ValueError(f"`t_bounds` must satisfy 0 < T_min <= T_max, got {self.t_bounds}")
        gen = torch.Generator().manual_seed(self.seed)
        if self.max_pixels is not None:
            z, y, _ = subsample_pixels(source, self.ignore_index, self.max_pixels, gen)
            sample = temperature_objective(column_chunks(z.T.contiguous(), y))
            beta, nll = fit_inverse_temperature(sample, bounds=self.t_bounds, tol=1e-6, reduce=self._all_reduce)
        else:
            z, y = warm_sample(source, self.ignore_index, _WARM_PIXELS, gen)
            sample = temperature_objective(column_chunks(z, y))
            beta, _ = fit_inverse_temperature(sample, bounds=self.t_bounds, tol=1e-4, reduce=lambda t: t)
            # Ranks' samples differ: agree on one warm start so every rank runs the identical Newton sequence.
            beta = float(all_reduce_mean(torch.tensor([beta], dtype=torch.float64)))
            full = temperature_objective(lambda: dense_columns(source, self.ignore_index))
            beta, nll = fit_inverse_temperature(full, beta0=beta, bounds=self.t_bounds, tol=5e-3,
                                                reduce=self._all_reduce)
        self.temperature_ = 1.0 / beta
        self.nll_ = nll

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        return z / self.temperature_

    @property
    def log_temperature_(self) -> float:
        return math.log(self.temperature_)
