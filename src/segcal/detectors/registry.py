"""Detectors by name: ``get_detector("energy")``, ``DETECTORS``.

Every object returned has ``score(logits, features=None) -> (N, H, W)`` (higher = more anomalous); the ones that
learn something (``sml``, ``flowenedet-*``, ``selective``) also have ``fit(batches)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segcal.detectors.energy import Energy
from segcal.detectors.entropy import Entropy
from segcal.detectors.max_logit import MaxLogit
from segcal.detectors.msp import MSP
from segcal.detectors.selective import SelectiveDetector
from segcal.detectors.sml import StandardizedMaxLogit


def _flowenedet(variant: str) -> Callable[..., Any]:
    def make(pretrained: str | None = None, **kw: Any) -> Any:
        from segcal.detectors.flowenedet import FlowEneDet, load_pretrained

        if pretrained is not None:
            if kw:
                raise ValueError(f"`pretrained` cannot be combined with other options, got {sorted(kw)}")
            return load_pretrained(pretrained, variant=variant)
        return FlowEneDet(variant=variant, **kw)

    return make


DETECTORS: dict[str, Callable[..., Any]] = {
    "msp": MSP,
    "max_logit": MaxLogit,
    "entropy": Entropy,
    "energy": Energy,
    "sml": StandardizedMaxLogit,
    "flowenedet-u": _flowenedet("u"),
    "flowenedet-c": _flowenedet("c"),
    "selective": SelectiveDetector,
}


def get_detector(name: str, **kwargs: Any) -> Any:
    """Build the detector registered as ``name`` (one of ``DETECTORS``) with ``kwargs``.

    ``flowenedet-u`` / ``flowenedet-c`` accept ``pretrained="espnet-camvid"`` to load a shipped fit.

    Example:
        >>> import torch
        >>> get_detector("energy", temperature=2.0).score(torch.zeros(1, 3, 2, 2)).shape
        torch.Size([1, 2, 2])
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string, got {type(name).__name__}")
    low = name.lower()
    key = next((k for k in (low, low.replace("-", "_"), low.replace("_", "-")) if k in DETECTORS), None)
    if key is None:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[key](**kwargs)
