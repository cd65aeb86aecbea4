"""SVLS: spatially varying label smoothing — cross-entropy against Gaussian-blurred one-hot labels."""

from __future__ import annotations

import math

from torch import Tensor, nn

from segcal.losses._common import (
    SoftTargetCrossEntropy,
    check_kernel_size,
    check_reduction,
    prepare,
    reduce_loss,
    soft_labels,
    svls_kernel,
)


def svls(logits: Tensor, target: Tensor, sigma: float = 1.0, kernel_size: int = 3, ignore_index: int | None = 255,
         reduction: str = "mean") -> Tensor:
    r"""Spatially varying label smoothing, averaged over valid pixels.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} \sum_k -\tilde y_k(i) \log p_k(i), \qquad
              \tilde y_k(i) = \frac{\sum_{j \in W_i} K_{ij}\, [j \text{ valid}]\, [y_j = k]}
                                   {\sum_{j \in W_i} K_{ij}\, [j \text{ valid}]}

    ``K`` is the SVLS kernel (:func:`segcal.losses._common.svls_kernel`: Gaussian whose centre is replaced by the sum
    of the other weights; centre 0.5 for 3×3, σ=1). Out-of-image positions replicate the border (as the official
    code); ignore neighbours get no weight and the rest are renormalised. With no ignore pixels this equals the
    official implementation.

    Args:
        logits: raw scores.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        sigma: Gaussian standard deviation (> 0).
        kernel_size: odd window size.
        ignore_index: label excluded from the loss, the mean and the neighbourhoods.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Islam & Glocker, "Spatially Varying Label Smoothing: Capturing Uncertainty from Expert Annotations",
        IPMI 2021, arXiv 2104.05788.

    Example:
        >>> import torch
        >>> svls(torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5)), sigma=1.0).shape
        torch.Size([])
    """
    svls_kernel(kernel_size, sigma)  # validate hyperparameters before the (costlier) input checks
    logits, _, valid, safe = prepare(logits, target, ignore_index, reduction)
    kernel = svls_kernel(kernel_size, sigma, dtype=logits.dtype, device=logits.device)
    smooth = soft_labels(safe, valid, logits.shape[1], kernel, padding="replicate")
    per_pixel = SoftTargetCrossEntropy.apply(logits, smooth)
    return reduce_loss(per_pixel, valid, reduction)


class SVLSLoss(nn.Module):
    """Module twin of :func:`svls`.

    Example:
        >>> import torch
        >>> SVLSLoss(sigma=1.0)(torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))).shape
        torch.Size([])
    """

    def __init__(self, sigma: float = 1.0, kernel_size: int = 3, ignore_index: int | None = 255,
                 reduction: str = "mean") -> None:
        super().__init__()
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"`sigma` must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.kernel_size = check_kernel_size(kernel_size)
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return svls(logits, target, self.sigma, self.kernel_size, self.ignore_index, self.reduction)
