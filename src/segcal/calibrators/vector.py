"""Vector scaling."""

from __future__ import annotations

import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator, chunks_and_classes, fit_nll, lbfgs_report


class VectorScaling(Calibrator):
    r"""Vector scaling: a per-class scale and bias on the logits.

    .. math::
        z'_k = w_k z_k + b_k, \qquad (w, b) = \arg\min \mathrm{mean}_{i \in V} -\log\mathrm{softmax}(z'_i)_{y_i}

    The NLL is convex in (w, b); it is minimised by full-batch L-BFGS (strong Wolfe) in float64 whose loss and gradient
    are accumulated over streamed pixel chunks — one pass over the data per function evaluation — starting from the
    identity (w = 1, b = 0). Unlike temperature scaling, **vector scaling can change the argmax** (per-class scales
    reorder classes), contrary to a loose reading of "scaling methods preserve the argmax".

    Args:
        ignore_index: label excluded from fitting.
        max_iter: cap on L-BFGS iterations (2·max_iter evaluations); a fit stopped by it warns
            (:class:`~segcal.calibrators.ConvergenceWarning`) and sets ``converged_ = False``.
        max_pixels: if set, fit on a seeded uniform sample of this many valid pixels held in memory.
        seed: seed of the pixel sample.
        tol: convergence tolerance on the largest entry of the gradient of the mean objective.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``; ``transform`` returns ``(N, C, H, W)``.

    Attributes:
        weight_ (Tensor): ``(C,)`` scales. bias_ (Tensor): ``(C,)`` biases. nll_ (float): final mean NLL.
        n_iter_ (int): L-BFGS iterations. converged_ (bool): whether the tolerance was met.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.

    Example:
        >>> z, y = torch.randn(2, 3, 8, 8) * 3, torch.randint(0, 3, (2, 8, 8))
        >>> VectorScaling().fit(z, y).transform(z).shape
        torch.Size([2, 3, 8, 8])
    """

    preserves_argmax = False
    name = "vs"
    _learned = ("weight_", "bias_", "nll_", "n_iter_", "converged_")

    def __init__(self, ignore_index: int | None = 255, *, max_iter: int = 1000, max_pixels: int | None = None,
                 seed: int = 0, tol: float = 1e-7) -> None:
        self.ignore_index = ignore_index
        self.max_iter = max_iter
        self.max_pixels = max_pixels
        self.seed = seed
        self.tol = tol

    def _fit(self, source: BatchSource) -> None:
        chunks, c = chunks_and_classes(source, self.ignore_index, self.max_pixels, self.seed)
        w = torch.ones(c, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        info: dict = {}
        self.nll_ = fit_nll([w, b], lambda z: z * w + b, chunks, max_iter=self.max_iter, reduce=self._all_reduce,
                            tol=self.tol, info=info)
        lbfgs_report(self, info)
        self.weight_, self.bias_ = w.detach().float(), b.detach().float()

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        shape = (1, -1, 1, 1)
        return z * self.weight_.to(z.dtype).view(shape) + self.bias_.to(z.dtype).view(shape)
