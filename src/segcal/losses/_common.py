"""Shared plumbing of the losses: input validation, dtype promotion, valid-pixel reduction, neighbourhood targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from segcal._checks import check_logits_target

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be an odd positive integer, got {kernel_size!r}")
    return kernel_size


def compute_dtype(x: Tensor) -> torch.dtype:
    # half-precision softmax/log loses too much: compute in float32, keep float64 when given
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prepare(logits: object, target: object, ignore_index: int | None, reduction: str
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate and return ``(logits in compute dtype, target, valid mask, target with ignore replaced by 0)``."""
    check_reduction(reduction)
    logits, target = check_logits_target(logits, target, ignore_index)
    logits = logits.to(compute_dtype(logits))
    target = target.long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    safe = torch.where(valid, target, torch.zeros_like(target))
    return logits, target, valid, safe


def reduce_loss(per_pixel: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Zero the ignore pixels, then ``mean`` over valid pixels only, ``sum``, or the ``(B, H, W)`` map."""
    per_pixel = torch.where(valid, per_pixel, torch.zeros((), dtype=per_pixel.dtype, device=per_pixel.device))
    if reduction == "none":
        return per_pixel
    total = per_pixel.sum()
    if reduction == "sum":
        return total
    # an all-ignore batch gives 0 (still attached to the graph) instead of 0/0
    return total / valid.sum().clamp_min(1)


def nll_map(logits: Tensor, target: Tensor, ignore_index: int | None) -> Tensor:
    """Per-pixel ``-log softmax(z)_y`` (0 at ignore pixels), via the fused PyTorch kernel."""
    return F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index,
                           reduction="none")


def svls_kernel(kernel_size: int = 3, sigma: float = 1.0, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Tensor:
    """The SVLS kernel: a normalised Gaussian whose centre is replaced by the sum of the other weights, renormalised.

    For ``kernel_size=3, sigma=1`` the centre is 0.5, edge neighbours ≈ 0.0778 and corners ≈ 0.0472. The official
    code replaces ``g[1, 1]`` (the centre only when ``kernel_size == 3``); we always replace the true centre.
    """
    check_kernel_size(kernel_size)
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"`sigma` must be a finite number > 0, got {sigma!r}")
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    g = g / g.sum()
    c = kernel_size // 2
    g[c, c] = 0.0
    g[c, c] = g.sum()
    if g[c, c] == 0:  # kernel_size 1: no neighbours, SVLS degenerates to CE
        g[c, c] = 1.0
    return (g / g.sum()).to(dtype=dtype, device=device)


def mean_kernel(kernel_size: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Tensor:
    check_kernel_size(kernel_size)
    return torch.full((kernel_size, kernel_size), 1.0 / kernel_size**2, dtype=dtype, device=device)


def soft_labels(safe_target: Tensor, valid: Tensor, num_classes: int, kernel: Tensor, padding: str) -> Tensor:
    """Kernel-weighted class proportions over the window's valid pixels: ``(B, C, H, W)``, sums to 1 where defined.

    ``padding="replicate"`` repeats the border pixels (SVLS); ``"zeros"`` keeps only in-image pixels (NACL).
    Ignore neighbours get no weight and the remaining weights are renormalised; a pixel whose window holds no valid
    pixel gets all zeros.
    """
    b, h, w = safe_target.shape
    k = kernel.shape[-1]
    # channel C carries the valid indicator so one depthwise conv gives numerator and denominator together
    idx = torch.where(valid, safe_target, torch.full_like(safe_target, num_classes))
    x = torch.zeros(b, num_classes + 1, h, w, dtype=kernel.dtype, device=safe_target.device)
    x.scatter_(1, idx.unsqueeze(1), 1.0)
    x[:, num_classes] = valid.to(kernel.dtype)
    pad = k // 2
    weight = kernel.reshape(1, 1, k, k).expand(num_classes + 1, 1, k, k)
    if padding == "replicate":
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        y = F.conv2d(x, weight, groups=num_classes + 1)
    elif padding == "zeros":
        y = F.conv2d(x, weight, padding=pad, groups=num_classes + 1)
    else:
        raise ValueError(f"`padding` must be 'replicate' or 'zeros', got {padding!r}")
    num, den = y[:, :num_classes], y[:, num_classes:]
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
