"""Dataset specs: one string names a dataset (``camvid``, ``synthetic``, or a folder root), and one data-root rule.

The data root (where CamVid, the published ESPNet weights and benchmark outputs live) is decided in exactly one
place, :func:`data_root`: ``$SEGCAL_DATA`` when set, else ``../shared/data`` relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_root", "data_root_hint"]


def data_root() -> Path:
    """The data root: ``$SEGCAL_DATA`` when set (and non-empty), else ``../shared/data`` from the current directory.

    Used by everything that looks for data by default: :class:`~segcal.data.CamVid` (``<root>/camvid``), the
    published ESPNet weights (``<root>/espnet_pretrained/decoder``), the engine and the CLI.

    Example:
        >>> import os
        >>> os.environ["SEGCAL_DATA"] = "/data/seg"
        >>> str(data_root())
        '/data/seg'
        >>> del os.environ["SEGCAL_DATA"]
        >>> data_root() == (Path.cwd() / ".." / "shared" / "data").resolve()
        True
    """
    env = os.environ.get("SEGCAL_DATA")
    if env:
        return Path(env).expanduser()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


def data_root_hint() -> str:
    """One phrase saying where the data root came from, for error messages."""
    env = os.environ.get("SEGCAL_DATA")
    if env:
        return f"data root {data_root()} from SEGCAL_DATA"
    return f"data root {data_root()}: SEGCAL_DATA is not set, so ../shared/data from the current directory is used"
