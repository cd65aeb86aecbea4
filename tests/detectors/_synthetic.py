"""Synthetic store-like data for the detector tests."""

from __future__ import annotations

import torch


def synthetic(n: int, seed: int, hw: int = 24, void_logit: float | None = None):
    """Errors are informative only after per-class standardisation: class scales differ, errors sit 2σ low."""
    g = torch.Generator().manual_seed(seed)
    c = 3
    mu, sd = torch.tensor([10.0, 5.0, 2.0]), torch.tensor([2.0, 1.0, 0.3])
    pred = torch.randint(0, c, (n, hw, hw), generator=g)
    err = torch.rand(n, hw, hw, generator=g) < 0.25
    top = mu[pred] + sd[pred] * (torch.randn(n, hw, hw, generator=g) - 2.0 * err)
    z = torch.minimum(0.1 * torch.randn(n, c, hw, hw, generator=g), top.unsqueeze(1) - 0.05)
    z.scatter_(1, pred.unsqueeze(1), top.unsqueeze(1))
    y = torch.where(err, (pred + 1 + torch.randint(0, c - 1, pred.shape, generator=g)) % c, pred)
    void = torch.rand(n, hw, hw, generator=g) < 0.05
    y[void] = 255
    if void_logit is not None:  # void pixels look like a distinct, very confident input
        z[:, 0][void] = void_logit
        z[:, 1:][void.unsqueeze(1).expand(-1, c - 1, -1, -1)] = -void_logit
    feats = torch.randn(n, 8, hw // 2, hw // 2, generator=g)
    return z, y, feats


def as_batches(z, y, f, bs: int = 4):
    return [{"logits": z[i : i + bs], "target": y[i : i + bs], "features": f[i : i + bs]} for i in range(0, len(z), bs)]
