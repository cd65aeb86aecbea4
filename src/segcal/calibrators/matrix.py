"""Matrix scaling."""

from __future__ import annotations

import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator, chunks_and_classes, fit_nll, lbfgs_report


class MatrixScaling(Calibrator):
    r"""Matrix scaling: a full affine map of the logits.

    .. math::
        z' = W z + b, \qquad (W, b) = \arg\min \frac{1}{|V|}\sum_{i \in V} -\log\operatorname{softmax}(W z_i + b)_{y_i}
        + \lambda \lVert W - I \rVert_F^2

    Convex; fitted by streaming full-batch L-BFGS in float64 from the identity. ``l2`` (λ, default 0) shrinks W towards
    the identity — useful with many classes and few pixels. Can change the argmax.

    Args:
        ignore_index: label excluded from fitting.
        l2: weight λ of the penalty towards the identity.
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
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.

    Example:
        >>> z, y = torch.randn(2, 3, 8, 8) * 3, torch.randint(0, 3, (2, 8, 8))
        >>> MatrixScaling().fit(z, y).weight_.shape
        torch.Size([3, 3])
    """

    preserves_argmax = False
    name = "ms"
    _learned = ("weight_", "bias_", "nll_", "n_iter_", "converged_")

    def __init__(self, ignore_index: int | None = 255, *, l2: float = 0.0, max_iter: int = 1000,
                 max_pixels: int | None = None, seed: int = 0, tol: float = 1e-7) -> None:
        self.ignore_index = ignore_index
        self.l2 = l2
        self.max_iter = max_iter
        self.max_pixels = max_pixels
        self.seed = seed
        self.tol = tol

    def _fit(self, source: BatchSource) -> None:
        chunks, c = chunks_and_classes(source, self.ignore_index, self.max_pixels, self.seed)
        eye = torch.eye(c, dtype=torch.float64)
        w = eye.clone().requires_grad_(True)
        b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        penalty = (lambda: self.l2 * (w - eye).square().sum()) if self.l2 > 0 else None
        info: dict = {}
        self.nll_ = fit_nll([w, b], lambda z: z @ w.T + b, chunks, max_iter=self.max_iter, penalty=penalty,
                            reduce=self._all_reduce, tol=self.tol, info=info)
        lbfgs_report(self, info)
        self.weight_, self.bias_ = w.detach().float(), b.detach().float()

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        out = torch.einsum("kc,nchw->nkhw", self.weight_.to(z.dtype), z)
        return out + self.bias_.to(z.dtype).view(1, -1, 1, 1)
