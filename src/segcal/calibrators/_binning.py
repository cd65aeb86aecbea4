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


def top2(z: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Largest value, its (first) index and the second-largest value along ``dim`` (keepdim).

    A loop over the (few) classes on contiguous slices: on CPU this is ~10× faster than ``argmax``/``topk`` over the
    strided class dimension of an (N, C, H, W) tensor.
    """
    zt = z.movedim(dim, 0)
    best, second = zt[0].clone(), torch.full_like(zt[0], -math.inf)
    idx = torch.zeros(zt.shape[1:], dtype=torch.long, device=z.device)
    for k in range(1, zt.shape[0]):
        zk = zt[k]
        gt = zk > best
        second = torch.where(gt, best, torch.maximum(second, zk))
        best = torch.where(gt, zk, best)
        idx.masked_fill_(gt, k)
    return best.unsqueeze(dim), idx.unsqueeze(dim), second.unsqueeze(dim)


def prob_logit(z: Tensor, dim: int, top: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``log p_k − log(1 − p_k)`` for every class, from logits, without cancellation.

    With ``e = exp(z − max)``: ``u_k = (z_k − max) − log(Σ_{j≠k} e_j)``; for non-top classes ``Σ e − e_k ≥ 1`` has no
    cancellation; for the top class the sum over the others is a masked logsumexp (no cancellation, no underflow).
    """
    m, top_idx = top if top is not None else top2(z, dim)[:2]
    s = z - m
    e = s.exp()
    total = e.sum(dim, keepdim=True)
    is_top = torch.zeros_like(s, dtype=torch.bool).scatter_(dim, top_idx, True)
    # log-domain for the top class: its "others" sum can underflow to 0 when the margin exceeds ~100.
    log_others_of_top = torch.logsumexp(s.masked_fill(is_top, -math.inf), dim, keepdim=True)
    return s - torch.where(is_top, log_others_of_top, (total - e).log())


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
            counts = torch.zeros(k * FINE_BINS, dtype=torch.float64, device=z.device)
            pos = torch.zeros(k * FINE_BINS, dtype=torch.float64, device=z.device)
        u = prob_logit(z, 0)
        if mode == "top-label":
            top = top2(z, 0)[1]
            idx = fine_index(u.gather(0, top).squeeze(0))
            hit = (top.squeeze(0) == y).double()
        else:
            idx = (fine_index(u) + torch.arange(c, device=z.device)[:, None] * FINE_BINS).reshape(-1)
            hit = (torch.arange(c, device=z.device)[:, None] == y[None]).double().reshape(-1)
        counts.index_add_(0, idx, torch.ones_like(hit))
        pos.index_add_(0, idx, hit)  # type: ignore[union-attr]
    if counts is None:
        raise ValueError("the fit data has no valid pixels (every label is ignore_index)")
    stats = cal._all_reduce(torch.stack([counts, pos]))  # type: ignore[list-item]
    return stats[0].view(-1, FINE_BINS).cpu().numpy(), stats[1].view(-1, FINE_BINS).cpu().numpy()


def apply_table(z: Tensor, table: Tensor, mode: str) -> Tensor:
    """Calibrated logits from a per-fine-bin probability table (1, B) or (C, B)."""
    table = table.to(z.dtype).clamp(_EPS, 1 - _EPS)
    m, top, second = top2(z, 1)
    u = prob_logit(z, 1, (m, top))
    logp = torch.log_softmax(z, 1)
    if mode == "top-label":
        log_p2 = second - m + logp.gather(1, top)
        u_top = u.gather(1, top)
        c_new = table[0][fine_index(u_top)]
        log1m_c = torch.nn.functional.logsigmoid(-u_top)
        # Floor ĉ where the rescaled runner-up p2·(1−ĉ)/(1−c) would tie with it, so the prediction never changes.
        floor = (log_p2 - torch.logaddexp(log1m_c, log_p2)).exp() * (1 + 1e-4)
        c_new = torch.maximum(c_new, floor).clamp(_EPS, 1 - _EPS)
        # Rescale the non-top classes to share 1 − ĉ in their original proportions.
        out = logp + torch.log1p(-c_new) - log1m_c
        return out.scatter(1, top, c_new.log())
    c = z.shape[1]
    idx = fine_index(u)
    p = torch.stack([table[k][idx[:, k]] for k in range(c)], 1)
    return p.log() - p.sum(1, keepdim=True).log()
