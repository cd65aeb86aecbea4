"""Float64 pixel-loop references written directly from methods.md §2, §5 (no code shared with segcal.losses)."""

from __future__ import annotations

import math

import numpy as np


def gaussian_svls_kernel(ks: int, sigma: float) -> np.ndarray:
    c = ks // 2
    g = np.array([[math.exp(-((a - c) ** 2 + (b - c) ** 2) / (2 * sigma**2)) for b in range(ks)] for a in range(ks)])
    g /= g.sum()
    g[c, c] = g.sum() - g[c, c]
    if g[c, c] == 0:
        g[c, c] = 1.0
    return g / g.sum()


def _logp(z: np.ndarray) -> np.ndarray:
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def _neighbour_proportions(y: np.ndarray, b: int, i: int, j: int, c: int, kernel: np.ndarray, border: str,
                           ignore: int) -> np.ndarray:
    _, h, w = y.shape
    r = kernel.shape[0] // 2
    num = np.zeros(c)
    den = 0.0
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            a, bb = i + di, j + dj
            if border == "replicate":
                a, bb = min(max(a, 0), h - 1), min(max(bb, 0), w - 1)
            elif not (0 <= a < h and 0 <= bb < w):
                continue
            lab = y[b, a, bb]
            if lab == ignore:
                continue
            wgt = kernel[di + r, dj + r]
            num[lab] += wgt
            den += wgt
    return num / den


def per_pixel(name: str, z: np.ndarray, y: np.ndarray, ignore: int = 255, **kw: float | str) -> np.ndarray:
    """Per-pixel loss map ``(B, H, W)``, 0 at ignore pixels."""
    bsz, c, h, w = z.shape
    out = np.zeros((bsz, h, w))
    for b in range(bsz):
        for i in range(h):
            for j in range(w):
                lab = y[b, i, j]
                if lab == ignore:
                    continue
                zz = z[b, :, i, j]
                lp = _logp(zz)
                p = np.exp(lp)
                ce = -lp[lab]
                if name == "ce":
                    v = ce
                elif name == "ls":
                    v = (1 - kw["epsilon"]) * ce + kw["epsilon"] * np.mean(-lp)
                elif name == "focal":
                    v = -((1 - p[lab]) ** kw["gamma"]) * lp[lab]
                elif name == "ecp":
                    v = ce - kw["beta"] * (-(p * lp).sum())
                elif name == "mbls":
                    v = ce + kw["alpha"] * np.mean(np.maximum(zz.max() - zz - kw["margin"], 0))
                elif name == "svls":
                    k = gaussian_svls_kernel(int(kw["kernel_size"]), float(kw["sigma"]))
                    t = _neighbour_proportions(y, b, i, j, c, k, "replicate", ignore)
                    v = -(t * lp).sum()
                elif name == "nacl":
                    ks = int(kw["kernel_size"])
                    k = np.ones((ks, ks)) if kw["kernel"] == "mean" else gaussian_svls_kernel(ks, float(kw["sigma"]))
                    tau = _neighbour_proportions(y, b, i, j, c, k, "inside", ignore)
                    x = zz if kw["on"] == "logits" else p
                    d = np.abs(x - tau) if kw["distance"] == "l1" else (x - tau) ** 2
                    v = ce + kw["alpha"] * d.mean()
                else:
                    raise KeyError(name)
                out[b, i, j] = v
    return out
