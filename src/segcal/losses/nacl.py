"""NACL: neighbor-aware calibration — cross-entropy plus a penalty pulling logits to neighbourhood label proportions."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from segcal.losses._common import (
    NeighbourPenalty,
    check_kernel_size,
    check_nonnegative,
    check_reduction,
    mean_kernel,
    nll_map,
    prepare,
    reduce_loss,
    soft_labels,
    svls_kernel,
)

KERNELS = ("mean", "gaussian")
DISTANCES = ("l1", "l2")
ON = ("logits", "probs")


def _check_options(kernel: str, distance: str, on: str, sigma: float) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
    if distance not in DISTANCES:
        raise ValueError(f"`distance` must be one of {DISTANCES}, got {distance!r}")
    if on not in ON:
        raise ValueError(f"`on` must be one of {ON}, got {on!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"`sigma` must be a finite number > 0, got {sigma!r}")


def nacl(logits: Tensor, target: Tensor, alpha: float = 0.1, kernel_size: int = 3, kernel: str = "mean",
         sigma: float = 1.0, distance: str = "l1", on: str = "logits", ignore_index: int | None = 255,
         reduction: str = "mean") -> Tensor:
    r"""Neighbor-aware calibration loss, averaged over valid pixels.

    .. math:: L = \frac{1}{|V|} \sum_{i \in V} \Big[ -\log p_{y_i}(i)
              + \frac{\lambda}{C} \sum_k d\big(\tau_k(i),\ x_k(i)\big) \Big], \qquad
              \tau_k(i) = \frac{\sum_{j \in W_i} K_{ij}\, [y_j = k]}{\sum_{j \in W_i} K_{ij}}

    ``x = z`` (``on="logits"``) or ``x = softmax(z)`` (``on="probs"``); ``d = |·|`` (``"l1"``) or ``(·)²``
    (``"l2"``); ``K`` is uniform (``"mean"``) or the SVLS kernel (``"gaussian"``); ``W_i`` is the ``ks × ks``
    window's pixels that are **inside the image and valid**, so the proportions always sum to 1. The official code
    zero-pads and counts padded positions as class 0; on an image without ignore pixels our interior values equal
    the official code's.

    Args:
        logits: raw scores ``z``.
        target: class indices with ``ignore_index`` for unlabelled pixels.
        alpha: penalty weight ``λ >= 0``; ``0`` is plain cross-entropy.
        kernel_size: odd window size ``ks``.
        kernel: ``"mean"`` or ``"gaussian"``.
        sigma: Gaussian standard deviation for ``kernel="gaussian"``.
        distance: ``"l1"`` or ``"l2"``.
        on: ``"logits"`` or ``"probs"``.
        ignore_index: label excluded from the loss, the mean and the neighbourhoods.
        reduction: ``"mean"`` (valid pixels), ``"sum"`` or ``"none"``.

    Shape:
        - logits: :math:`(B, C, H, W)`; target: :math:`(B, H, W)`; output: scalar or :math:`(B, H, W)`.

    Returns:
        The loss tensor.

    References:
        Murugesan et al., "Trust your neighbours: Penalty-based constraints for model calibration", MICCAI 2023,
        arXiv 2303.06268; journal version arXiv 2401.14487.

    Example:
        >>> import torch
        >>> nacl(torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5)), alpha=0.1).shape
        torch.Size([])
    """
    alpha = check_nonnegative(alpha, "alpha")
    check_kernel_size(kernel_size)
    _check_options(kernel, distance, on, sigma)
    logits, target, valid, safe = prepare(logits, target, ignore_index, reduction)
    nll = nll_map(logits, target, ignore_index)
    if alpha == 0:
        return reduce_loss(nll, valid, reduction)
    if kernel == "mean":
        weights = mean_kernel(kernel_size, dtype=logits.dtype, device=logits.device)
    else:
        weights = svls_kernel(kernel_size, sigma, dtype=logits.dtype, device=logits.device)
    tau = soft_labels(safe, valid, logits.shape[1], weights, padding="zeros")
    x = F.softmax(logits, dim=1) if on == "probs" else logits
    penalty = NeighbourPenalty.apply(x, tau, distance == "l2")
    return reduce_loss(nll + alpha * penalty, valid, reduction)


class NACLLoss(nn.Module):
    """Module twin of :func:`nacl`.

    Example:
        >>> import torch
        >>> NACLLoss(alpha=0.1, kernel="gaussian")(torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))).shape
        torch.Size([])
    """

    def __init__(self, alpha: float = 0.1, kernel_size: int = 3, kernel: str = "mean", sigma: float = 1.0,
                 distance: str = "l1", on: str = "logits", ignore_index: int | None = 255,
                 reduction: str = "mean") -> None:
        super().__init__()
        _check_options(kernel, distance, on, sigma)
        self.alpha = check_nonnegative(alpha, "alpha")
        self.kernel_size = check_kernel_size(kernel_size)
        self.kernel = kernel
        self.sigma = float(sigma)
        self.distance = distance
        self.on = on
        self.ignore_index = ignore_index
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return nacl(logits, target, self.alpha, self.kernel_size, self.kernel, self.sigma, self.distance, self.on,
                    self.ignore_index, self.reduction)
