"""``SegmentationFolder``: images (and optional label maps) from plain folders, matched by file stem.

A dataset folder (``segcal.data.load_dataset(ROOT, split)``, CLI ``--data ROOT``) is laid out as::

    ROOT/
      classes.txt              optional: one class name per line (defines the class count)
      subsets.json             optional: {"<split>": {"<subset name>": ["<image stem>", ...]}}
      <split>/images/*         RGB images (png, jpg, ...)
      <split>/labels/*         optional: single-channel label maps, same file stem as the image
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "SegmentationFolder", "folder_splits", "read_class_names", "read_image", "read_label"]

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
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(f"label image {path} has mode {im.mode!r}; expected a single-channel map of class "
                                 "ids (mode L, P or I), not a colour image")
            return np.asarray(im, dtype=np.int64).copy()
    except (OSError, SyntaxError) as err:  # truncated / not an image
        raise ValueError(f"cannot read label image {path}: {err}") from err


def _index(folder: Path) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in files:
                raise ValueError(f"two files with stem {p.stem!r} in {folder}: {files[p.stem].name}, {p.name}")
            files[p.stem] = p
    return files


def read_class_names(path: str | os.PathLike) -> list[str]:
    """``classes.txt``: one class name per line (surrounding blanks and empty trailing lines dropped)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [ln.strip() for ln in lines]
    if not names:
        raise ValueError(f"{path} lists no class names (expected one name per line)")
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{path}: empty class name on line(s) {empty[:5]} (one name per line, no blank lines)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: duplicate class names {dup[:5]}")
    return names


def _check_ignore_index(ignore_index: object) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}")
    return int(ignore_index)


class SegmentationFolder:
    """Images in one folder, optional label maps (same file stem) in another.

    Label maps are single-channel images of class ids, read as stored (no remapping): pixels equal to
    ``ignore_index`` are void, and with ``ignore_index=None`` every value is a class. Images without labels give
    ``target=None`` (an unlabelled folder, e.g. for ``segcal predict --images DIR``). Each labelled item is checked:
    the label map must have the image's size, and when the class names are known every value must be a class id
    (``< num_classes``) or ``ignore_index``.

    :meth:`from_root` reads the dataset layout ``ROOT/<split>/images/*`` + ``ROOT/<split>/labels/*`` with optional
    ``ROOT/classes.txt`` and ``ROOT/subsets.json`` (see ``docs/engine.md``).

    Args:
        images: folder of RGB images (png, jpg, …).
        labels: folder of label maps named like the images (any supported extension); ``None`` for unlabelled.
        class_names: class names (defines ``num_classes``); optional.
        ignore_index: void label value, or ``None`` when every label value is a class.
        split: name of the split (recorded in logits stores); ``None`` when not part of a split.
        subsets: named subsets of these images, ``{name: [stems]}`` (every stem must be an image here).
        dataset_name: dataset name for stores and reports (``None``: the class name and the images folder).

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
                 class_names: Sequence[str] | None = None, ignore_index: int | None = 255, *,
                 split: str | None = None, subsets: Mapping[str, Sequence[str]] | None = None,
                 dataset_name: str | None = None) -> None:
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
                raise ValueError(f"{len(missing)} image(s) in {self.image_dir} have no label in {self.label_dir} "
                                 f"(labels are matched by file stem): {missing[:5]}")
        self.names = list(self._images)
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.ignore_index = _check_ignore_index(ignore_index)
        self.split = split
        self.dataset_name = dataset_name
        self._subsets: dict[str, list[str]] = {}
        for key, stems in (subsets or {}).items():
            if isinstance(stems, str) or not isinstance(stems, Sequence):
                raise ValueError(f"subset {key!r} must be a list of image stems, got {type(stems).__name__}")
            unknown = [str(n) for n in stems if str(n) not in self._images]
            if unknown:
                raise ValueError(f"subset {key!r} names {len(unknown)} image(s) not in {self.image_dir}: "
                                 f"{unknown[:5]}")
            self._subsets[str(key)] = [str(n) for n in stems]

    @classmethod
    def from_root(cls, root: str | os.PathLike, split: str, *, ignore_index: int | None = 255
                  ) -> SegmentationFolder:
        """The ``split`` of a dataset folder laid out as ``ROOT/<split>/images/*`` (+ ``ROOT/<split>/labels/*``).

        Args:
            root: dataset folder.
            split: sub-folder name (``train``, ``val``, ``test``, …).
            ignore_index: the value of void pixels in the label files (read as-is), or ``None`` (no void).

        ``ROOT/classes.txt`` (optional) gives the class names, one per line; ``ROOT/subsets.json`` (optional) gives
        named subsets, ``{"<split>": {"<subset name>": ["<image stem>", ...]}}``.
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        images = root / split / "images"
        if not images.is_dir():
            have = folder_splits(root)
            raise FileNotFoundError(f"split {split!r} not found in dataset folder {root}: expected {images} "
                                    f"(layout ROOT/<split>/images/ + ROOT/<split>/labels/); splits found: {have}")
        labels = root / split / "labels"
        classes = root / "classes.txt"
        class_names = read_class_names(classes) if classes.is_file() else None
        subsets: dict[str, list[str]] = {}
        sub_file = root / "subsets.json"
        if sub_file.is_file():
            try:
                spec = json.loads(sub_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{sub_file} is not valid JSON: {err}") from err
            if not isinstance(spec, dict) or not all(isinstance(v, dict) for v in spec.values()):
                raise ValueError(f"{sub_file} must map each split to {{subset name: [image stems]}}")
            subsets = spec.get(split, {})
        return cls(images, labels if labels.is_dir() else None, class_names=class_names,
                   ignore_index=ignore_index, split=split, subsets=subsets, dataset_name=root.resolve().name)

    def subsets(self) -> dict[str, list[str]]:
        """Named subsets of this split (from ``subsets.json``), ``{}`` when none."""
        return {k: list(v) for k, v in self._subsets.items()}

    def __len__(self) -> int:
        return len(self.names)

    def load_image(self, name: str) -> np.ndarray:
        return read_image(self._images[name])

    def load_target(self, name: str) -> np.ndarray | None:
        if self._labels is None:
            return None
        return read_label(self._labels[name])

    def _check_target(self, name: str, image: np.ndarray, target: np.ndarray) -> None:
        assert self._labels is not None
        if target.shape != image.shape[:2]:
            raise ValueError(f"label {self._labels[name]} has size {target.shape[1]}x{target.shape[0]} (WxH) but "
                             f"its image {self._images[name]} is {image.shape[1]}x{image.shape[0]}")
        if self.num_classes is None:
            return
        values = np.unique(target)
        bad = values[(values < 0) | (values >= self.num_classes)]
        if self.ignore_index is not None:
            bad = bad[bad != self.ignore_index]
        if bad.size:
            raise ValueError(f"label {self._labels[name]} has values {bad[:5].tolist()} that are neither a class id "
                             f"(0..{self.num_classes - 1}, {self.num_classes} classes) nor ignore_index="
                             f"{self.ignore_index}; check classes.txt and --ignore-index")

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name = self.names[index]
        image = self.load_image(name)
        target = self.load_target(name)
        if target is not None:
            self._check_target(name, image, target)
        return {"image": image, "target": target, "name": name}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={str(self.image_dir)!r}, labels="
                f"{str(self.label_dir) if self.label_dir else None!r}, n={len(self)})")


def folder_splits(root: str | os.PathLike) -> list[str]:
    """Splits of a dataset folder: sub-folders holding ``images/`` (train, val, test first, then by name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found = [p.name for p in root.iterdir() if (p / "images").is_dir()]
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(found, key=lambda n: (order.get(n, 3), n))
