"""Input validation shared by every public entry point.

Every check raises ``ValueError`` / ``TypeError`` with a message naming the argument and what was expected, so a
wrong input never turns into a silently wrong number.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dense_scores(logits: object, name: str = "logits", *, check_values: bool = True) -> Tensor:
    """(N, C, H, W) floating tensor with finite values and C >= 2 (``check_values=False``: the caller checks the
    values itself, e.g. the fused metric kernel)."""
    logits = check_tensor(logits, name)
    if logits.ndim != 4:
        raise ValueError(f"`{name}` must have shape (N, C, H, W), got {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be a floating tensor, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"`{name}` must have at least 2 classes on dim 1, got C={logits.shape[1]}")
    if logits.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(logits.shape)}): give at least one image of at least one "
                         "pixel")
    if check_values:
        check_finite(logits, name)
    return logits


def check_finite(x: Tensor, name: str) -> None:
    # A finite float32 sum proves every element finite in one fast reduction; only a non-finite sum (NaN/inf, or a
    # rare overflow) pays for the element-wise check.
    if x.is_floating_point() and not torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64
                                                          else torch.float32)) \
            and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist() if x.ndim > 1 else []
        where = f" (batch items {bad[:10]})" if bad else ""
        raise ValueError(f"`{name}` contains NaN or inf values{where}")


def check_target(target: object, num_classes: int, ignore_index: int | None, *, name: str = "target",
                 shape: tuple[int, ...] | None = None, check_values: bool = True) -> Tensor:
    """(N, H, W) integer labels in [0, C) or equal to ``ignore_index`` (``check_values=False``: dtype and shape
    only; the caller checks the range itself, e.g. the fused metric kernel)."""
    target = check_tensor(target, name)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor of class indices, got {target.dtype}")
    if target.ndim != 3:
        raise ValueError(f"`{name}` must have shape (N, H, W), got {tuple(target.shape)}")
    if shape is not None and tuple(target.shape) != tuple(shape):
        raise ValueError(f"`{name}` shape {tuple(target.shape)} does not match the predictions' (N, H, W) = "
                         f"{tuple(shape)}")
    # where() instead of target[valid]: boolean indexing compacts a copy and is several times slower. Filling the
    # ignored pixels with 0 cannot hide a bad label, so one min-max pass decides; the message pass runs on failure.
    if not check_values:
        return target
    labels = target if ignore_index is None else torch.where(target != ignore_index, target, 0)
    if target.numel() and not _in_range(*torch.aminmax(labels), num_classes):
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        lo = int(torch.where(valid, target, num_classes - 1).min())
        hi = int(torch.where(valid, target, 0).max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"`{name}` has labels outside [0, {num_classes}) that are not ignore_index="
                             f"{ignore_index}: min {lo}, max {hi}")
    return target


def _in_range(lo: Tensor, hi: Tensor, num_classes: int) -> bool:
    return int(lo) >= 0 and int(hi) < num_classes


def check_logits_target(logits: object, target: object, ignore_index: int | None,
                        num_classes: int | None = None, *, check_values: bool = True) -> tuple[Tensor, Tensor]:
    """Validate a (N, C, H, W) / (N, H, W) pair; ``num_classes`` checks C when given."""
    logits = check_dense_scores(logits, check_values=check_values)
    c = logits.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"`logits` has C={c} classes but {num_classes} were expected")
    n, _, h, w = logits.shape
    target = check_target(target, c, ignore_index, shape=(n, h, w), check_values=check_values)
    return logits, target


def check_images(images: object, logits_shape: tuple[int, ...] | torch.Size, name: str = "images") -> Tensor:
    """(N, K, H, W) images (uint8 or float) matching the (N, ·, H, W) of the logits; returned as finite float32.

    uint8 images are scaled to [0, 1].
    """
    images = check_tensor(images, name)
    if images.ndim != 4:
        raise ValueError(f"`{name}` must have shape (N, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = logits_shape
    if images.shape[0] != n or tuple(images.shape[2:]) != (h, w):
        raise ValueError(f"`{name}` shape {tuple(images.shape)} does not match the logits' (N, ·, H, W) = "
                         f"({n}, ·, {h}, {w})")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"`{name}` must be uint8 or floating, got {images.dtype}")
    check_finite(images, name)
    return images.float()
