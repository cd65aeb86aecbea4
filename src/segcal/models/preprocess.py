"""Image normalisation from uint8 RGB to the float tensor a network expects."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Normalize", "as_image_batch"]


def as_image_batch(images: object, name: str = "images") -> Tensor:
    """Validate uint8 RGB images and return them as a uint8 tensor ``(N, H, W, 3)``.

    Args:
        images: ``np.ndarray`` or ``torch.Tensor`` of dtype uint8, shape ``(H, W, 3)`` or ``(N, H, W, 3)``.
        name: argument name used in error messages.

    Raises:
        TypeError: not an array/tensor, or dtype is not uint8.
        ValueError: wrong number of dimensions or channels, or an empty image.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"`{name}` must be uint8 RGB (0..255), got numpy dtype {images.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"`{name}` must be uint8 RGB (0..255), got tensor dtype {images.dtype}")
        t = images
    else:
        raise TypeError(f"`{name}` must be a numpy array or torch.Tensor of uint8, got {type(images).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"`{name}` must have shape (H, W, 3) or (N, H, W, 3) with 3 RGB channels last, got "
                         f"{tuple(images.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"`{name}` is empty: shape {tuple(images.shape)}")
    return t


class Normalize(nn.Module):
    r"""``x = ((image[..., order] − mean) / std) · scale`` with ``image`` on the 0–255 scale, then NHWC → NCHW.

    ``mean`` and ``std`` are given on the 0–255 scale **in the network's channel order** (BGR when ``bgr=True``).
    ESPNet's published pipeline divides by 255 *after* standardising (``scale=1/255``); an ImageNet-style
    torchvision pipeline is ``Normalize.imagenet()``.

    Args:
        mean: per-channel mean (3 values, 0–255 scale).
        std: per-channel standard deviation (3 values, 0–255 scale).
        bgr: feed channels in BGR order (the input is always RGB).
        scale: factor applied after standardisation.

    Shape:
        - Input: uint8 ``(N, H, W, 3)`` or ``(H, W, 3)`` RGB, numpy or torch.
        - Output: float32 ``(N, 3, H, W)``.

    Example:
        >>> norm = Normalize([0, 0, 0], [1, 1, 1], bgr=True)
        >>> norm(np.zeros((4, 6, 3), dtype=np.uint8)).shape
        torch.Size([1, 3, 4, 6])
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, bgr: bool = False, scale: float = 1.0):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"`mean` and `std` must have 3 values, got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"`std` must be positive, got {list(std)}")
        self.bgr = bool(bgr)
        self.scale = float(scale)
        # Non-persistent: preprocessing is configuration, not learned state, and must not break strict loading.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def imagenet(cls) -> Normalize:
        """torchvision / timm / HF default: RGB, ``(x/255 − [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]``."""
        return cls([0.485 * 255, 0.456 * 255, 0.406 * 255], [0.229 * 255, 0.224 * 255, 0.225 * 255])

    def config(self) -> dict:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "bgr": self.bgr,
                "scale": self.scale}

    def forward(self, images: object) -> Tensor:
        x = as_image_batch(images).to(self.mean.device)
        x = x.permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        return (x - self.mean) / self.std * self.scale
