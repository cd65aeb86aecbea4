"""Shared binning and fixed-point helpers for the streaming metrics.

Every sum state is stored as an ``int64`` fixed-point number (``FIXED_SCALE`` units per 1.0). Each batch's float64
partial sums are rounded once to this grid, after which all accumulation is integer addition: associative, so any
split into batches or processes that feeds the same batches gives bit-identical states (the DDP guarantee), and the
rounding error is at most ``0.5 / FIXED_SCALE`` (3e-8) per bin and batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FIXED_SCALE = 2.0**24
"""Fixed-point units per 1.0 for pixel sum states (capacity ~5e11 pixels of confidence per bin)."""

IMAGE_SCALE = 2.0**40
"""Fixed-point units for sums of per-image values in [0, 1] (capacity ~8e6 images, resolution 1e-12)."""

# The adaptive-ECE fine histogram lives on t = -log2(1 - c) in [0, ACE_T_MAX]: float32 cannot represent a
# confidence in (1 - 2**-24, 1), so 24 octaves cover every float32 confidence below 1, and c == 1 gets its own bin.
ACE_T_MAX = 24.0


def to_fixed(x: Tensor, scale: float = FIXED_SCALE) -> Tensor:
    """Round a float tensor to the int64 fixed-point grid."""
    return torch.round(x.to(torch.float64) * scale).to(torch.int64)


def from_fixed(x: Tensor, scale: float = FIXED_SCALE) -> Tensor:
    """Fixed-point int64 state -> float64."""
    return x.to(torch.float64) / scale


def to_fixed2(x: Tensor) -> Tensor:
    """Two-word fixed point, shape ``x.shape + (2,)``: ``x ~ (hi + lo / 2**24) / 2**24``.

    The high word keeps the capacity of ``FIXED_SCALE``; the low word carries the next 24 bits, so a batch's
    contribution is rounded to 2**-48 instead of 2**-24.
    """
    v = x.to(torch.float64) * FIXED_SCALE
    hi = torch.floor(v)
    lo = torch.round((v - hi) * FIXED_SCALE)
    return torch.stack([hi, lo], -1).to(torch.int64)


def from_fixed2(x: Tensor) -> Tensor:
    """Two-word fixed-point state (``..., 2``) -> float64."""
    return (x[..., 0].to(torch.float64) + x[..., 1].to(torch.float64) / FIXED_SCALE) / FIXED_SCALE


def slot_index(c: Tensor, n_bins: int) -> Tensor:
    """Equal-width slot ``ceil(c * n)`` in ``[0, n]``: slot s >= 1 is bin ``s - 1`` = ``((s-1)/n, s/n]``.

    Slot 0 holds exactly ``c == 0`` and is merged into bin 0 at compute time (so 0 lands in the first bin and 1.0
    in the last, as the design requires).
    """
    return (c * n_bins).ceil_().to(torch.int32).clamp_(0, n_bins)


def merge_slots(x: Tensor) -> Tensor:
    """(..., n + 1) slot histogram -> (..., n) bin histogram (slot 0 folded into bin 0)."""
    out = x[..., 1:].clone()
    out[..., 0] += x[..., 0]
    return out


def ace_fine_index(c: Tensor, resolution: int) -> Tensor:
    """Fine-histogram bin of confidence ``c`` on the scale ``t = -log2(1 - c)``; ``c == 1`` -> last bin."""
    # log2(1 - c) * (-s) equals -log2(1 - c) * s exactly (a sign flip), so the in-place form bins identically.
    t = torch.sub(1.0, c.to(torch.float32)).clamp_min_(2.0**-30).log2_().mul_(-(resolution - 1) / ACE_T_MAX)
    return t.to(torch.int32).clamp_(0, resolution - 2).masked_fill_(c >= 1.0, resolution - 1)


def ace_fine_edges(resolution: int) -> Tensor:
    """(resolution + 1,) confidence edges of the fine histogram (float64); the last bin is the point c = 1."""
    j = torch.arange(resolution, dtype=torch.float64)
    lo = 1.0 - torch.pow(2.0, -j * ACE_T_MAX / (resolution - 1))
    lo[-1] = 1.0
    return torch.cat([lo, torch.ones(1, dtype=torch.float64)])


def check_n_bins(n_bins: object, name: str = "n_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"`{name}` must be a positive int, got {n_bins!r}")
    return n_bins


def nan() -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64)
