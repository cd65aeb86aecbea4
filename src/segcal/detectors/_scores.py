"""Private helpers shared by the score functions."""

from __future__ import annotations

import torch
from torch import Tensor

from segcal._checks import check_dense_scores


def as_compute(logits: object, name: str = "logits") -> Tensor:
    """Validated logits in float32 (float64 kept) -- half precision loses the tail of a softmax."""
    logits = check_dense_scores(logits, name)
    return logits if logits.dtype == torch.float64 else logits.float()
