"""Shared binning and fixed-point helpers for the streaming metrics.

Every real-valued sum state is stored as ``int64`` fixed point. Each batch's float64 partial sums are rounded once
to this grid, after which all accumulation is integer addition: associative, so any split into batches or processes
that feeds the same batches gives bit-identical states (the DDP guarantee).

Overflow is never silent: a word whose magnitude reaches ``FIXED_LIMIT`` (2**62) marks an overflow (a batch value
too large for the grid is clamped to it, NaN/inf too), and :func:`check_fixed` raises ``OverflowError`` naming the
state; the metrics call it on the new states before committing an update and again in ``compute``. Summing two
valid words (< 2**62 each, e.g. two DDP ranks) cannot wrap int64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FIXED_SCALE = 2.0**24
"""Fixed-point units per 1.0 for pixel sum states (capacity ~5e11 pixels of confidence per bin)."""

IMAGE_SCALE = 2.0**40
"""Fixed-point units for sums of per-image values in [0, 1] (capacity 2**22 ~ 4.2e6 images, resolution 1e-12)."""

FIXED_LIMIT = 2**62
"""A fixed-point word at or beyond +-FIXED_LIMIT means overflow (see :func:`check_fixed`)."""

HI_SCALE = 2.0**8
"""Units per 1.0 of the high word of the two-word format: capacity ``2**62 / 2**8 = 2**54`` (1.8e16)."""

LO_SCALE = 2.0**32
"""The low word carries the next 32 bits (batch resolution 2**-40); it can absorb 2**30 batches."""

# The adaptive-ECE fine histogram lives on t = -log2(1 - c) in [0, ACE_T_MAX]: float32 cannot represent a
# confidence in (1 - 2**-24, 1), so 24 octaves cover every float32 confidence below 1, and c == 1 gets its own bin.
ACE_T_MAX = 24

PIXEL_UNIT = 2.0**32
"""Per-pixel real values summed into states (confidences, probabilities, Brier terms) of float32 (and lower)
inputs are rounded once, half to even, to multiples of ``1 / PIXEL_UNIT`` and summed as integers: exact, so the
sums do not depend on the order of the pixels, on threads, batches or processes. A float32 value ``>= 2**-9`` is a
multiple of 2**-32 already (every top-label confidence when C <= 512); smaller values move by at most 2**-33.
Float64 inputs keep float64 per-pixel values and float64 sums (rounded to the state grid once per batch), so
that their results stay accurate to ~1e-12."""

MAX_BATCH_PIXELS = 2**30
"""Pixels per update step: a pixel adds at most ``2 * PIXEL_UNIT = 2**33`` to a sum, so 2**30 pixels fit int64."""

_ONE_BITS = 0x3F800000  # IEEE float32 bit pattern of 1.0
_OCTAVE = 2**23  # float32 bit patterns per octave


def _clamp_limit(v: Tensor) -> Tensor:
    """NaN/inf and values beyond the capacity -> the overflow marker +-FIXED_LIMIT (the int64 cast is defined)."""
    lim = float(FIXED_LIMIT)
    return torch.nan_to_num(v, nan=lim, posinf=lim, neginf=-lim).clamp_(-lim, lim)


def to_fixed(x: Tensor, scale: float = FIXED_SCALE) -> Tensor:
    """Round a float tensor to the int64 fixed-point grid (``+-FIXED_LIMIT`` marks a value that does not fit)."""
    return _clamp_limit(torch.round(x.to(torch.float64) * scale)).to(torch.int64)


def from_fixed(x: Tensor, scale: float = FIXED_SCALE) -> Tensor:
    """Fixed-point int64 state -> float64."""
    return x.to(torch.float64) / scale


def to_fixed2(x: Tensor) -> Tensor:
    """Two-word fixed point, shape ``x.shape + (2,)``: ``x ~ (hi + lo / 2**32) / 2**8``.

    The high word holds ``floor(x * 2**8)`` (capacity 2**54 ~ 1.8e16, enough for the NLL of 1e11 pixels at
    -log p = 1e5); the low word the next 32 bits, so a batch's contribution is rounded to 2**-40 (9e-13). A value
    beyond the capacity (or NaN/inf) becomes the overflow marker and makes :func:`check_fixed` raise.
    """
    v = _clamp_limit(x.to(torch.float64) * HI_SCALE)
    hi = torch.floor(v)
    lo = torch.round((v - hi) * LO_SCALE)
    return torch.stack([hi, lo], -1).to(torch.int64)


def from_fixed2(x: Tensor) -> Tensor:
    """Two-word fixed-point state (``..., 2``) -> float64."""
    return (x[..., 0].to(torch.float64) + x[..., 1].to(torch.float64) / LO_SCALE) / HI_SCALE


def check_fixed(states: dict[str, Tensor], names: tuple[str, ...]) -> None:
    """Raise ``OverflowError`` naming the first state among ``names`` that holds an overflow marker.

    One device reduction and one host synchronisation for all states; the search for the name only runs on failure.
    """
    lim = FIXED_LIMIT
    flags = torch.stack([((states[k] >= lim) | (states[k] <= -lim)).any() for k in names])
    if bool(flags.any()):
        name = names[int(flags.to(torch.int8).argmax())]
        raise OverflowError(
            f"metric state `{name}` overflowed its int64 fixed-point capacity (a single sum of 2**54 ~ 1.8e16, or "
            f"2**22 images for per-image sums): the value cannot be represented exactly, so no number is reported "
            f"(for `nll_sum`: predictions so confident and wrong that the summed -log p_y exceeds the capacity). "
            f"Evaluate fewer pixels per metric object and combine the results yourself.")


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


def to_units(x: Tensor) -> Tensor:
    """Per-pixel values -> summable values: int64 multiples of ``1 / PIXEL_UNIT`` (round half to even; exact for
    float32 >= 2**-9), or float64 values themselves for float64 input (see :data:`PIXEL_UNIT`)."""
    if x.dtype == torch.float64:
        return x
    return torch.round(x.to(torch.float64) * PIXEL_UNIT).to(torch.int64)


def unit_of(sums: Tensor) -> float:
    """What 1.0 is in sums made by :func:`to_units`."""
    return 1.0 if sums.is_floating_point() else PIXEL_UNIT


def units_to_fixed2(s: Tensor) -> Tensor:
    """Sums of :func:`to_units` values -> the two-word fixed point of :func:`to_fixed2`. Exact int64 sums in
    ``1 / PIXEL_UNIT`` are split without rounding (canonical words, ``lo < 2**32``); float64 sums are rounded."""
    if s.is_floating_point():
        return to_fixed2(s)
    return torch.stack([s >> 24, (s & (2**24 - 1)) << 8], -1)


def ace_fine_index(c: Tensor, resolution: int) -> Tensor:
    """Fine-histogram bin of confidence ``c``: ``floor(t (resolution - 1) / 24)`` on the piecewise-linear log scale
    ``t = (bits(1.0) - bits(1 - c)) / 2**23`` (float32 bit patterns), ``c == 1`` -> last bin.

    ``t`` equals ``-log2(1 - c)`` at every power of two and is linear in between (Mitchell's logarithm), so the bins
    are as fine near c = 1 as a logarithmic grid, and the index is pure integer arithmetic on the bits: exact and
    identical on every device and in the fused kernel.
    """
    d = torch.sub(1.0, c.to(torch.float32))  # exact for c >= 1/2
    dist = _ONE_BITS - d.view(torch.int32).to(torch.int64)  # = 2**23 t
    idx = torch.div(dist.mul_(resolution - 1), ACE_T_MAX * _OCTAVE, rounding_mode="floor")
    return idx.to(torch.int32).clamp_(0, resolution - 2).masked_fill_(c >= 1.0, resolution - 1)


def ace_fine_edges(resolution: int, device: torch.device | str | None = None) -> Tensor:
    """(resolution + 1,) confidence edges of the fine histogram (float64, exact); the last bin is the point c = 1."""
    j = torch.arange(resolution + 1, dtype=torch.int64)
    first = torch.div(j * (ACE_T_MAX * _OCTAVE) + resolution - 2, resolution - 1, rounding_mode="floor")
    bits = (_ONE_BITS - first.clamp_max(ACE_T_MAX * _OCTAVE)).to(torch.int32)
    edges = 1.0 - bits.view(torch.float32).to(torch.float64)
    edges[-2:] = 1.0
    return edges.to(device)


def refuse_meta(x: object, name: str) -> None:
    """Metrics need values: a tensor on the ``meta`` device (shape only) is refused with a one-line error."""
    if isinstance(x, Tensor) and x.is_meta:
        raise ValueError(f"`{name}` is on the meta device (a shape without values); metrics need real tensors")


#: more bins than any calibration estimate can use; beyond it the (C, bins) states alone would take gigabytes
MAX_BINS = 100_000


def check_n_bins(n_bins: object, name: str = "n_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"`{name}` must be a positive int, got {n_bins!r}")
    if n_bins > MAX_BINS:
        raise ValueError(f"`{name}` must be at most {MAX_BINS} (equal-width bins finer than 1e-5 hold no pixels and "
                         f"the states would not fit in memory), got {n_bins}")
    return n_bins


def nan(device: torch.device | str | None = None) -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=device)
