"""Open-set segmentation quality: mIoU over the known classes plus an "unknown" class from a detector's score.

FlowEneDet (Gudovskiy et al., UAI 2023, arXiv:2305.09610) reports it next to OOD AUROC/AP: pixels whose anomaly
score exceeds the F1-optimal threshold are predicted as an extra class C ("unknown"); ground-truth OOD pixels belong
to that class; mIoU is then taken over the C + 1 classes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def f1_optimal_threshold(scores: Tensor, positive: Tensor) -> float:
    """The score threshold ``t`` maximising F1 of the rule ``score ≥ t`` (exact, sorts the scores).

    Args:
        scores: 1-D scores (higher = more likely positive).
        positive: 1-D bool, same length.

    Returns:
        The threshold (a score value); ``inf`` when there is no positive.

    Example:
        >>> scores, positive = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])
        >>> round(f1_optimal_threshold(scores, positive), 4)
        0.35
    """
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"`scores` and `positive` must be 1-D of equal length, got {tuple(scores.shape)} and "
                         f"{tuple(positive.shape)}")
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("inf")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], positive[order]
    tp = torch.cumsum(y, 0).double()
    k = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    last_of_tie = torch.ones(len(s), dtype=torch.bool, device=s.device)
    last_of_tie[:-1] = s[1:] != s[:-1]  # a threshold takes every pixel of a tie together
    f1 = torch.where(last_of_tie, 2 * tp / (k + n_pos), torch.zeros_like(tp))
    return float(s[int(torch.argmax(f1))])


def open_set_miou(pred: Tensor, target: Tensor, ood: Tensor, unknown: Tensor, num_classes: int,
                  ignore_index: int = 255) -> dict[str, float]:
    """mIoU over ``num_classes`` known classes + 1 unknown class, and the closed-set mIoU for comparison.

    Args:
        pred: (N,H,W) predicted known class.
        target: (N,H,W) labels; OOD pixels may hold any value (``ood`` decides), ``ignore_index`` is skipped.
        ood: (N,H,W) bool, ground-truth unknown pixels.
        unknown: (N,H,W) bool, pixels the detector flags (they are predicted as class ``num_classes``).
        num_classes: C.

    Returns:
        ``{"open_set_miou", "closed_set_miou"}``; classes with an empty union are skipped.
    """
    c = num_classes
    gt = torch.where(ood, c, target.long())
    valid = ood | (target != ignore_index)
    open_pred = torch.where(unknown, c, pred.long())
    open_conf = torch.bincount((gt * (c + 1) + open_pred)[valid], minlength=(c + 1) ** 2).view(c + 1, c + 1)
    known = valid & ~ood
    closed_conf = torch.bincount((target.long() * c + pred.long())[known], minlength=c * c).view(c, c)
    return {"open_set_miou": _miou(open_conf), "closed_set_miou": _miou(closed_conf)}


def _miou(confmat: Tensor) -> float:
    inter = confmat.diag().double()
    union = confmat.sum(0).double() + confmat.sum(1).double() - inter
    return float((inter[union > 0] / union[union > 0]).mean())
