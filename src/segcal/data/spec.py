"""Dataset specs: one string names a dataset (``camvid``, ``synthetic``, or a folder root), and one data-root rule.

The data root (where CamVid, the published ESPNet weights and benchmark outputs live) is decided in exactly one
place, :func:`data_root`: ``$SEGCAL_DATA`` when set, else ``../shared/data`` relative to the current directory.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

from .subset import Subset

__all__ = ["SYNTHETIC_SPLITS", "data_root", "data_root_hint", "dataset_splits", "load_dataset"]

#: index ranges of the synthetic dataset's splits (one dataset, so every split shares the class colours).
SYNTHETIC_SPLITS = {"train": (0, 48), "val": (48, 72), "test": (72, 96)}
_SYNTHETIC_SIZE = (96, 128)
_NAMED = ("camvid", "synthetic")


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


class SyntheticSplit(Subset):
    """One split of the SYNTHETIC dataset (see :class:`~segcal.data.SyntheticSegmentation`), as a dataset."""

    dataset_name = "synthetic"
    synthetic = True
    #: an ESPNet trained from scratch on the synthetic train split (cached), see segcal.engine.protocol
    default_model = "segcal.engine.protocol:synthetic_espnet"

    def __init__(self, dataset: Any, indices: range, split: str, ignore_index: int | None) -> None:
        super().__init__(dataset, indices)
        self.split = split
        self.ignore_index = ignore_index

    def subsets(self) -> dict[str, list[str]]:
        """No named subsets."""
        return {}


def _synthetic(split: str, num_classes: int | None, ignore_index: int | None) -> SyntheticSplit:
    from .synthetic import SyntheticSegmentation

    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"synthetic data has splits {list(SYNTHETIC_SPLITS)}, got split {split!r}")
    full = SyntheticSegmentation(SYNTHETIC_SPLITS["test"][1], size=_SYNTHETIC_SIZE,
                                 num_classes=4 if num_classes is None else int(num_classes), seed=0,
                                 void_fraction=0.05 if ignore_index is not None else 0.0,
                                 ignore_index=255 if ignore_index is None else int(ignore_index))
    return SyntheticSplit(full, range(*SYNTHETIC_SPLITS[split]), split, ignore_index)


def _check_spec(spec: object) -> str:
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"`spec` must be 'camvid', 'synthetic' or a dataset folder, got {type(spec).__name__}")
    return os.fspath(spec)


def dataset_splits(spec: str | os.PathLike) -> list[str]:
    """The splits a dataset spec offers: ``camvid`` → train/val/test, ``synthetic`` → train/val/test, a folder →
    its sub-folders holding ``images/``.

    Example:
        >>> dataset_splits("synthetic")
        ['train', 'val', 'test']
    """
    text = _check_spec(spec)
    if text == "camvid":
        from .camvid import CAMVID_SPLITS

        return list(CAMVID_SPLITS)
    if text == "synthetic":
        return list(SYNTHETIC_SPLITS)
    from .folder import folder_splits

    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {text!r} is neither 'camvid', 'synthetic' nor an existing folder")
    return folder_splits(path)


def load_dataset(spec: str | os.PathLike, split: str, *, ignore_index: int | None = 255,
                 num_classes: int | None = None) -> Any:
    """One split of a dataset named by a spec.

    Args:
        spec: ``"camvid"`` (from ``<data root>/camvid``; its void label 11 becomes ``ignore_index``),
            ``"synthetic"`` (the SYNTHETIC blobs; clearly not real data), or a dataset folder laid out as
            ``ROOT/<split>/images/*`` + ``ROOT/<split>/labels/*`` (labels optional → ``target=None``) with optional
            ``ROOT/classes.txt`` (one class name per line) and ``ROOT/subsets.json``
            (``{split: {subset name: [image stems]}}``). A folder called ``camvid`` is given as ``./camvid``.
        split: ``train``, ``val``, ``test`` (CamVid, synthetic) or a sub-folder of the dataset folder.
        ignore_index: the void label. In a folder the label files are read as-is, so this is the value the files use
            for void (e.g. 99), and ``None`` means every label value is a class. CamVid maps its void to it (an int).
        num_classes: class count of the synthetic data (default 4); ignored otherwise.

    Returns:
        An indexable dataset: items ``{"image": uint8 (H, W, 3), "target": int64 (H, W) or None, "name": str}``,
        attributes ``names``, ``split``, ``ignore_index`` (int or None), ``class_names`` (list or None),
        ``dataset_name``, and ``subsets() -> {name: [image names]}`` (named subsets of the split; ``{}`` if none).

    Raises:
        FileNotFoundError: missing folder or split (the message lists the splits found).
        ValueError: images without labels (the first few listed), a bad ``classes.txt`` / ``subsets.json``;
            when an item is read: a label whose size differs from its image's, or label values that are neither
            a class id nor ``ignore_index``.

    Example:
        >>> ds = load_dataset("synthetic", "val", num_classes=3)
        >>> len(ds), ds.split, ds.class_names, ds.subsets()
        (24, 'val', ['synthetic_0', 'synthetic_1', 'synthetic_2'], {})
    """
    text = _check_spec(spec)
    if not isinstance(split, str) or not split:
        raise TypeError(f"`split` must be a non-empty string, got {split!r}")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}")
        ignore_index = int(ignore_index)
    if text == "camvid":
        from .camvid import CamVid

        if ignore_index is None:
            raise ValueError("CamVid has void pixels (label 11): `ignore_index` must be an int (e.g. 255), not None")
        return CamVid(split=split, ignore_index=ignore_index)
    if text == "synthetic":
        return _synthetic(split, num_classes, ignore_index)
    from .folder import SegmentationFolder

    path = Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {text!r} is neither 'camvid', 'synthetic' nor an existing folder "
                                "(ROOT/<split>/images/ + ROOT/<split>/labels/)")
    return SegmentationFolder.from_root(path, split, ignore_index=ignore_index)
