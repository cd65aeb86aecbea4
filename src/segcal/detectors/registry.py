"""Detectors by name: ``get_detector("energy")``, ``DETECTORS`` (generated from the classes; see ``_base``).

Every registered detector has ``score(logits, features=None, images=None) -> (N, H, W)`` (higher = more anomalous)
and ``fit(batches) -> self`` (a no-op for closed-form scores, ``requires_fit = False``). Importing this module imports
every detector shipped with segcal, so the registry is complete.
"""

from __future__ import annotations

import segcal.detectors.energy
import segcal.detectors.entropy
import segcal.detectors.flowenedet
import segcal.detectors.max_logit
import segcal.detectors.msp
import segcal.detectors.selective
import segcal.detectors.sml  # noqa: F401  (each import registers its classes)
from segcal.detectors._base import DETECTORS, get_detector

__all__ = ["DETECTORS", "get_detector"]
