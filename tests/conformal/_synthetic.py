"""Synthetic exchangeable segmentation data: logits and labels drawn from a (miscalibrated) model."""

from __future__ import annotations

import torch
from torch import Tensor


def make_data(n: int, *, seed: int, label_temperature: float = 1.5, c: int = 4, size: int = 8,
              void_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Logits ``(n, c, size, size)`` and labels drawn from ``softmax(z / label_temperature)``.

    ``label_temperature > 1`` makes the model overconfident (labels noisier than its probabilities say), so the
    conformal threshold has real work to do. Per-image scale varies, so images differ in difficulty. A share of the
    pixels is void (255).
    """
    g = torch.Generator().manual_seed(seed)
    scale = 1.0 + 3.0 * torch.rand(n, 1, 1, 1, generator=g)
    z = torch.randn(n, c, size, size, generator=g) * scale
    p = torch.softmax(z / label_temperature, 1).permute(0, 2, 3, 1).reshape(-1, c)
    y = torch.multinomial(p, 1, generator=g).view(n, size, size)
    y[torch.rand(n, size, size, generator=g) < void_fraction] = 255
    return z, y
