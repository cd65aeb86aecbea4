"""segcal.losses: train-time calibration losses, each a function + ``nn.Module`` twin (kornia style).

All take ``(B, C, H, W)`` logits and ``(B, H, W)`` targets, skip ``ignore_index`` (255) pixels and average over
valid pixels only. :func:`get_loss` builds one by its short name (``ce, ls, focal, ecp, svls, mbls, nacl, aslp``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from segcal.losses import functional
from segcal.losses.aslp import ASLP, SCBCELoss
from segcal.losses.cross_entropy import CrossEntropyLoss
from segcal.losses.entropy_penalty import EntropyPenaltyLoss
from segcal.losses.focal import FocalLoss
from segcal.losses.label_smoothing import LabelSmoothingLoss
from segcal.losses.mbls import MbLSLoss
from segcal.losses.nacl import NACLLoss
from segcal.losses.svls import SVLSLoss

LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "ls": LabelSmoothingLoss,
    "focal": FocalLoss,
    "ecp": EntropyPenaltyLoss,
    "svls": SVLSLoss,
    "mbls": MbLSLoss,
    "nacl": NACLLoss,
    "aslp": ASLP,
}


def get_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by its short name; ``kwargs`` go to the constructor.

    A loss with ``needs_ids = True`` (ASLP) must be called as ``loss(logits, target, ids=...)`` and told the epoch
    and held-out accuracy via ``on_epoch_start(epoch, val_accuracy=...)``.

    Example:
        >>> get_loss("nacl", alpha=0.2).alpha
        0.2
    """
    key = name.lower()
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    try:
        return LOSSES[key](**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for loss {key!r}: {err}") from err


__all__ = [
    "ASLP",
    "LOSSES",
    "CrossEntropyLoss",
    "EntropyPenaltyLoss",
    "FocalLoss",
    "LabelSmoothingLoss",
    "MbLSLoss",
    "NACLLoss",
    "SCBCELoss",
    "SVLSLoss",
    "functional",
    "get_loss",
]
