"""Score maps for a folder of images: one float16 ``(H, W)`` ``.npy`` per image, at the image's own resolution."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from segcal.data.folder import SegmentationFolder


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def detect_folder(model: Any, detector: Any, images: str | os.PathLike, out: str | os.PathLike, *,
                  progress: bool = True) -> list[Path]:
    """Write ``out/<stem>.npy`` (float16, higher = more anomalous) for every image in ``images``.

    Images of any size are accepted: the model pads to its size constraint and crops back, and detectors that
    work at a lower resolution upsample their map, so every score map has the image's ``(H, W)``. Finished maps are
    skipped on a rerun (each is written to a temp file and renamed, so an interrupted run leaves no partial file).

    Args:
        model: a :class:`~segcal.models.Segmenter`.
        detector: anything with ``score(logits (1,C,H,W), features=None) -> (1,H,W)`` (see :mod:`segcal.detectors`).
        images: folder of RGB images.
        out: output folder (created).
        progress: show a progress bar.

    Returns:
        Paths of all score maps (written now or before).
    """
    dataset = SegmentationFolder(images)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wants_features = bool(getattr(detector, "needs_features", False) or getattr(detector, "variant", "") == "c")
    written = []
    for i in tqdm(range(len(dataset)), desc="detect", unit="img", disable=not progress):
        name = dataset.names[i]
        path = out_dir / f"{name}.npy"
        written.append(path)
        if path.is_file():
            continue
        image = dataset[i]["image"]
        with torch.inference_mode():
            if wants_features:
                logits, feats = model.predict_batch(image[None], features=True)
            else:
                logits, feats = model.predict_batch(image[None]), None
            score = detector.score(logits.float(), features=None if feats is None else feats.float())[0]
        if tuple(score.shape) != image.shape[:2]:
            raise ValueError(f"detector returned a {tuple(score.shape)} map for image {name!r} of size "
                             f"{image.shape[:2]}")
        _atomic_save_npy(path, score.numpy().astype(np.float16))
    return written
