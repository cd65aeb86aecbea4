"""Shared plumbing of the losses: input validation, dtype promotion, valid-pixel reduction, neighbourhood targets."""

from __future__ import annotations

import math
from typing import Any

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
    if padding not in ("replicate", "zeros"):
        raise ValueError(f"`padding` must be 'replicate' or 'zeros', got {padding!r}")
    b, h, w = safe_target.shape
    k = kernel.shape[-1]
    r = k // 2
    dump = num_classes  # ignore and out-of-image neighbours deposit their weight here, then it is dropped
    idx = torch.where(valid, safe_target, torch.full_like(safe_target, dump))
    if padding == "replicate":
        rows = torch.arange(-r, h + r, device=idx.device).clamp(0, h - 1)
        cols = torch.arange(-r, w + r, device=idx.device).clamp(0, w - 1)
        padded = idx[:, rows][:, :, cols]
    else:
        padded = F.pad(idx, (r, r, r, r), value=dump)
    # one scatter of B·H·W weights per kernel tap touches 1/C of what a depthwise conv over C one-hot planes reads
    acc = torch.zeros(b, num_classes + 1, h, w, dtype=kernel.dtype, device=idx.device)
    weights = kernel.tolist()
    for di in range(k):
        for dj in range(k):
            neighbour = padded[:, di:di + h, dj:dj + w].unsqueeze(1)
            acc.scatter_add_(1, neighbour, torch.full((), weights[di][dj], dtype=acc.dtype,
                                                      device=acc.device).expand(b, 1, h, w))
    den = float(kernel.sum()) - acc[:, num_classes:]
    return acc[:, :num_classes].div_(den.clamp_min_(torch.finfo(den.dtype).tiny))


# Fused penalties: autograd of the composite expressions keeps several (B, C, H, W) temporaries alive; these
# Functions keep one, which is what brings NACL / SVLS / MbLS near plain CE at 480×360 (benchmarks/losses_speed.py).

class SoftTargetCrossEntropy(torch.autograd.Function):
    """Per-pixel ``−Σ_k t_k log softmax(z)_k = logsumexp(z) − Σ_k t_k z_k`` for targets ``t`` summing to 1."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, soft: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(logits, soft, lse)
        return lse - torch.linalg.vecdot(soft, logits, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logits, soft, lse = ctx.saved_tensors
        out = torch.exp(logits - lse.unsqueeze(1))
        return out.sub_(soft).mul_(grad.unsqueeze(1)), None


class NeighbourPenalty(torch.autograd.Function):
    """Per-pixel ``mean_k |x_k − τ_k|`` (``l2=False``) or ``mean_k (x_k − τ_k)²``; no gradient to ``τ``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tau: Tensor, l2: bool) -> Tensor:
        diff = x - tau
        ctx.save_for_backward(diff)
        ctx.l2 = l2
        c = x.shape[1]
        if l2:
            return torch.linalg.vector_norm(diff, ord=2, dim=1).square_().div_(c)
        return torch.linalg.vector_norm(diff, ord=1, dim=1).div_(c)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (diff,) = ctx.saved_tensors
        scale = grad.unsqueeze(1) / diff.shape[1]
        if ctx.l2:
            return diff * (2 * scale), None, None
        return diff.sign().mul_(scale), None, None


class MarginPenalty(torch.autograd.Function):
    """Per-pixel ``mean_k max(0, max_j z_j − z_k − m)``."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, margin: float) -> Tensor:
        top, arg = logits.max(dim=1, keepdim=True)
        hinge = (top - margin) - logits
        hinge.clamp_(min=0)
        ctx.save_for_backward(hinge > 0, arg)
        ctx.dtype = logits.dtype
        return hinge.sum(dim=1).div_(logits.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        active, arg = ctx.saved_tensors
        scale = grad.unsqueeze(1) / active.shape[1]
        out = active.to(ctx.dtype).mul_(-scale)
        # every active class pulls the arg-max logit up by the same amount it pushes its own down
        return out.scatter_add_(1, arg, active.sum(dim=1, keepdim=True).to(ctx.dtype) * scale), None
