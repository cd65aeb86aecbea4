"""segcal: trustworthy confidence for semantic segmentation networks.

Subpackages: ``metrics`` (streaming calibration / detection metrics), ``calibrators`` (post-hoc),
``losses`` (train-time calibration), ``detectors`` (error / OOD scores, FlowEneDet), ``data``, ``models``,
``engine`` and ``report``.
"""

__version__ = "0.1.0"
