"""``SegmentationFolder``: images (and optional label maps) from plain folders, matched by file stem."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "SegmentationFolder", "read_image", "read_label"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)`` (grey / palette / RGBA images are converted)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError) as err:  # PIL raises these for truncated / non-image files
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A single-channel label PNG (mode L / P / I) as int64 ``(H, W)`` class ids, as stored."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"label image {path} has mode {im.mode!r}; expected a single-channel map of class ids "
                             "(mode L, P or I), not a colour image")
        return np.asarray(im, dtype=np.int64).copy()


def _index(folder: Path) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in files:
                raise ValueError(f"two files with stem {p.stem!r} in {folder}: {files[p.stem].name}, {p.name}")
            files[p.stem] = p
    return files


class SegmentationFolder:
    """Images in one folder, optional label maps (same file stem) in another.

    Label maps are single-channel images of class ids; pixels equal to ``ignore_index`` are void. Images without
    labels give ``target=None`` (an unlabelled folder, e.g. for ``segcal predict --images DIR``).

    Args:
        images: folder of RGB images (png, jpg, …).
        labels: folder of label maps named like the images (any supported extension); ``None`` for unlabelled.
        class_names: class names (defines ``num_classes``); optional.
        ignore_index: void label value.

    Returns:
        Items are dicts ``{"image": uint8 (H, W, 3) RGB, "target": int64 (H, W) or None, "name": stem}``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(d / "a.png")
        >>> ds = SegmentationFolder(d)
        >>> ds[0]["image"].shape, ds[0]["target"], ds.names
        ((4, 5, 3), None, ['a'])
    """

    def __init__(self, images: str | os.PathLike, labels: str | os.PathLike | None = None,
                 class_names: Sequence[str] | None = None, ignore_index: int = 255) -> None:
        self.image_dir = Path(images)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"`images` folder not found: {self.image_dir}")
        self._images = _index(self.image_dir)
        if not self._images:
            raise ValueError(f"`images` folder {self.image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.label_dir = Path(labels) if labels is not None else None
        self._labels: dict[str, Path] | None = None
        if self.label_dir is not None:
            if not self.label_dir.is_dir():
                raise FileNotFoundError(f"`labels` folder not found: {self.label_dir}")
            self._labels = _index(self.label_dir)
            missing = [s for s in self._images if s not in self._labels]
            if missing:
                raise ValueError(f"{len(missing)} image(s) in {self.image_dir} have no label in {self.label_dir}: "
                                 f"{missing[:5]}")
        self.names = list(self._images)
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.ignore_index = int(ignore_index)

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, name: str) -> np.ndarray:
        return read_image(self._images[name])

    def load_target(self, name: str) -> np.ndarray | None:
        if self._labels is None:
            return None
        return read_label(self._labels[name])

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name = self.names[index]
        return {"image": self.load_image(name), "target": self.load_target(name), "name": name}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={str(self.image_dir)!r}, labels="
                f"{str(self.label_dir) if self.label_dir else None!r}, n={len(self)})")
