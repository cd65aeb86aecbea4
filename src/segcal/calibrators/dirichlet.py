"""Dirichlet calibration."""

from __future__ import annotations

import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator, chunks_and_classes, fit_nll, lbfgs_report


def _log_probs(z: Tensor) -> Tensor:
    return torch.log_softmax(z.double(), 1)


class DirichletScaling(Calibrator):
    r"""Dirichlet calibration: an affine map of the log-probabilities, with optional ODIR regularisation.

    .. math::
        z' = W \log\operatorname{softmax}(z) + b, \qquad
        \mathcal{L} = \mathrm{NLL} + \frac{\lambda}{C(C-1)} \sum_{k \ne j} W_{kj}^2 + \frac{\mu}{C} \sum_k b_k^2

    (ODIR: off-diagonal and intercept regularisation). Identity initialisation; convex; streaming full-batch L-BFGS in
    float64. Can change the argmax.

    Args:
        ignore_index: label excluded from fitting.
        reg_lambda: λ, off-diagonal penalty (0 = unregularised matrix version).
        reg_mu: μ, bias penalty; None uses ``reg_lambda``.
        max_iter: cap on L-BFGS iterations (2·max_iter evaluations); a fit stopped by it warns
            (:class:`~segcal.calibrators.ConvergenceWarning`) and sets ``converged_ = False``.
        max_pixels: if set, fit on a seeded uniform sample of this many valid pixels held in memory.
        seed: seed of the pixel sample.
        tol: convergence tolerance on the largest entry of the gradient of the mean objective.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``; ``transform`` returns ``(N, C, H, W)``.

    Attributes:
        weight_ (Tensor): ``(C, C)``. bias_ (Tensor): ``(C,)``. nll_ (float): final objective.
        n_iter_ (int): L-BFGS iterations. converged_ (bool): whether the tolerance was met.

    References:
        Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet
        calibration", NeurIPS 2019, arXiv:1910.12656.

    Example:
        >>> z, y = torch.randn(2, 3, 8, 8) * 3, torch.randint(0, 3, (2, 8, 8))
        >>> DirichletScaling(reg_lambda=1e-3).fit(z, y).transform(z).shape
        torch.Size([2, 3, 8, 8])
    """

    preserves_argmax = False
    name = "dirichlet"
    _learned = ("weight_", "bias_", "nll_", "n_iter_", "converged_")

    def __init__(self, ignore_index: int | None = 255, *, reg_lambda: float = 0.0, reg_mu: float | None = None,
                 max_iter: int = 1000, max_pixels: int | None = None, seed: int = 0, tol: float = 1e-7) -> None:
        self.ignore_index = ignore_index
        self.reg_lambda = reg_lambda
        self.reg_mu = reg_mu
        self.max_iter = max_iter
        self.max_pixels = max_pixels
        self.seed = seed
        self.tol = tol

    def _fit(self, source: BatchSource) -> None:
        chunks, c = chunks_and_classes(source, self.ignore_index, self.max_pixels, self.seed, _log_probs)
        w = torch.eye(c, dtype=torch.float64).requires_grad_(True)
        b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        lam = self.reg_lambda
        mu = lam if self.reg_mu is None else self.reg_mu
        off = 1.0 - torch.eye(c, dtype=torch.float64)
        penalty = None
        if lam > 0 or mu > 0:
            def penalty() -> Tensor:
                return lam * (w * off).square().sum() / max(1, c * (c - 1)) + mu * b.square().sum() / c
        info: dict = {}
        self.nll_ = fit_nll([w, b], lambda q: q @ w.T + b, chunks, max_iter=self.max_iter,
                            penalty=penalty, reduce=self._all_reduce, tol=self.tol, info=info)
        lbfgs_report(self, info)
        self.weight_, self.bias_ = w.detach().float(), b.detach().float()

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        out = torch.einsum("kc,nchw->nkhw", self.weight_.to(z.dtype), torch.log_softmax(z, 1))
        return out + self.bias_.to(z.dtype).view(1, -1, 1, 1)
