"""Shared fine histogram for the binning calibrators (histogram binning, isotonic regression).

Scores are binned on the *logit of the probability*, ``u = log p − log(1 − p)`` computed stably from the logits, in
``FINE_BINS`` equal-width bins on ``[U_MIN, U_MAX]``: segmentation confidences pile up within 1e-4 of 1, where
equal-width bins on p have no resolution. One streaming pass; the histogram is the sufficient statistic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator, dense_columns

FINE_BINS = 4000
U_MIN, U_MAX = -15.0, 25.0
_EPS = 1e-6


def prob_logit(z: Tensor, dim: int) -> Tensor:
    """``log p_k − log(1 − p_k)`` for every class, from logits, without forming p."""
    c = z.shape[dim]
    if c == 2:
        return z - z.flip(dim)
    eye = torch.eye(c, dtype=torch.bool, device=z.device)
    shape = [1] * z.ndim
    shape[dim] = c
    # logsumexp over the other classes: mask class k with −inf, one k at a time keeps memory at one copy of z.
    others = torch.stack([torch.logsumexp(z.masked_fill(eye[k].view(shape), -math.inf), dim) for k in range(c)], dim)
    return z - others


def fine_index(u: Tensor) -> Tensor:
    idx = ((u - U_MIN) / (U_MAX - U_MIN) * FINE_BINS).floor().long()
    return idx.clamp_(0, FINE_BINS - 1)


def fine_centres() -> np.ndarray:
    edges = np.linspace(U_MIN, U_MAX, FINE_BINS + 1)
    return 0.5 * (edges[1:] + edges[:-1])


def accumulate(cal: Calibrator, source: BatchSource, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Counts and positives per fine bin: shape (1, B) for ``"top-label"``, (C, B) for ``"one-vs-rest"``."""
    if mode not in ("top-label", "one-vs-rest"):
        raise ValueError(f"`mode` must be 'top-label' or 'one-vs-rest', got {mode!r}")
    counts: Tensor | None = None
    pos: Tensor | None = None
    for z, y, valid in dense_columns(source, cal.ignore_index):
        z, y = z[:, valid], y[valid]
        if y.numel() == 0:
            continue
        c = z.shape[0]
        k = 1 if mode == "top-label" else c
        if counts is None:
            counts = torch.zeros(k * FINE_BINS, dtype=torch.float64)
            pos = torch.zeros(k * FINE_BINS, dtype=torch.float64)
        u = prob_logit(z, 0)
        if mode == "top-label":
            top = z.argmax(0)
            idx = fine_index(u.gather(0, top[None]).squeeze(0))
            hit = (top == y).double()
        else:
            idx = (fine_index(u) + torch.arange(c)[:, None] * FINE_BINS).reshape(-1)
            hit = (torch.arange(c)[:, None] == y[None]).double().reshape(-1)
        counts.index_add_(0, idx, torch.ones_like(hit))
        pos.index_add_(0, idx, hit)  # type: ignore[union-attr]
    if counts is None:
        raise ValueError("the fit data has no valid pixels (every label is ignore_index)")
    stats = cal._all_reduce(torch.stack([counts, pos]))  # type: ignore[list-item]
    return stats[0].view(-1, FINE_BINS).numpy(), stats[1].view(-1, FINE_BINS).numpy()


def apply_table(z: Tensor, table: Tensor, mode: str) -> Tensor:
    """Calibrated logits from a per-fine-bin probability table (1, B) or (C, B)."""
    table = table.to(z.dtype).clamp(_EPS, 1 - _EPS)
    u = prob_logit(z, 1)
    logp = torch.log_softmax(z, 1)
    if mode == "top-label":
        top2 = logp.topk(2, dim=1)
        top = top2.indices[:, :1]
        u_top = u.gather(1, top)
        c_new = table[0][fine_index(u_top)]
        log1m_c = torch.nn.functional.logsigmoid(-u_top)
        # Floor ĉ where the rescaled runner-up p2·(1−ĉ)/(1−c) would tie with it, so the prediction never changes.
        log_p2 = top2.values[:, 1:]
        floor = (log_p2 - torch.logaddexp(log1m_c, log_p2)).exp() * (1 + 1e-4)
        c_new = torch.maximum(c_new, floor).clamp(_EPS, 1 - _EPS)
        # Rescale the non-top classes to share 1 − ĉ in their original proportions.
        out = logp + torch.log1p(-c_new) - log1m_c
        return out.scatter(1, top, c_new.log())
    c = z.shape[1]
    idx = fine_index(u)
    p = torch.stack([table[k][idx[:, k]] for k in range(c)], 1)
    return p.log() - p.sum(1, keepdim=True).log()
