"""Score maps for a folder of images: one float16 ``(H, W)`` ``.npy`` per image, at the image's own resolution."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal._io import atomic_write_text
from segcal._progress import progress_bar
from segcal.data.folder import SegmentationFolder

#: Sidecar in the output folder: for every map, the key (detector, model, input image) it was computed with.
INDEX = ".segcal-detect.json"


def _hash_value(h: Any, v: Any, depth: int = 0) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(v, np.ndarray):
        h.update(f"A{v.dtype}{v.shape}".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(f"K{k}".encode())
            _hash_value(h, v[k], depth + 1)
    elif isinstance(v, (list, tuple)):
        h.update(f"L{len(v)}".encode())
        for x in v:
            _hash_value(h, x, depth + 1)
    elif v is None or isinstance(v, (bool, int, float, str)):
        h.update(repr(v).encode())
    elif isinstance(v, torch.nn.Module):
        _hash_value(h, {"class": type(v).__qualname__, "state": v.state_dict()}, depth + 1)
    elif depth < 3 and hasattr(v, "__dict__"):
        _hash_value(h, {"class": type(v).__qualname__, **{k: x for k, x in vars(v).items() if not k.startswith("__")}},
                    depth + 1)
    else:
        h.update(type(v).__qualname__.encode())


def detector_key(detector: Any) -> str:
    """Fingerprint of a detector: its class, hyperparameters and learned tensors (sha256, 16 hex digits)."""
    h = hashlib.sha256(type(detector).__qualname__.encode())
    _hash_value(h, detector)
    return h.hexdigest()[:16]


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def detect_folder(model: Any, detector: Any, images: str | os.PathLike | Any, out: str | os.PathLike, *,
                  progress: bool = True) -> list[Path]:
    """Write ``out/<stem>.npy`` (float16, higher = more anomalous) for every image in ``images``.

    Images of any size are accepted: the model pads to its size constraint and crops back, and detectors that
    work at a lower resolution upsample their map, so every score map has the image's ``(H, W)``. Finished maps are
    skipped on a rerun only when they were computed with the same detector (class, hyperparameters, learned weights),
    the same model (weight fingerprint) and the same input image (size and modification time); any other map of that
    name — another detector, model or a changed image, or a map without a record — is recomputed and replaced. The
    keys are kept in ``out/.segcal-detect.json``. Each map is written to a temp file and renamed, so an interrupted
    run leaves no partial file.

    Args:
        model: a :class:`~segcal.models.Segmenter`.
        detector: anything with ``score(logits (1,C,H,W), features=None) -> (1,H,W)`` (see :mod:`segcal.detectors`).
        images: folder of RGB images, or a dataset (e.g. from :func:`segcal.data.load_dataset`; labels unused).
        out: output folder (created).
        progress: show a progress bar.

    Returns:
        Paths of all score maps (written now or before).
    """
    dataset = SegmentationFolder(images) if isinstance(images, (str, os.PathLike)) else images
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wants_features = bool(getattr(detector, "needs_features", False))
    from segcal.engine.inference import model_fingerprint

    run_key = {"detector": f"{type(detector).__qualname__}:{detector_key(detector)}",
               "model": f"{getattr(model, 'name', type(model).__name__)}:{model_fingerprint(model)}"}
    index_path = out_dir / INDEX
    index: dict[str, dict] = {}
    if index_path.is_file():
        try:
            loaded = json.loads(index_path.read_text())
            index = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            index = {}
    image_paths = getattr(dataset, "_images", {})
    written = []
    bar = progress_bar(len(dataset), "detect", progress)
    for i in range(len(dataset)):
        bar.update(1)
        name = dataset.names[i]
        path = out_dir / f"{name}.npy"
        written.append(path)
        src = image_paths.get(name)
        st = os.stat(src) if src is not None else None
        if st is not None:
            image_id = f"{st.st_size}:{st.st_mtime_ns}"
        else:  # no file behind the sample: fingerprint the pixels
            image_id = hashlib.sha256(np.ascontiguousarray(dataset[i]["image"]).tobytes()).hexdigest()[:16]
        key = {**run_key, "image": image_id}
        if path.is_file() and index.get(name) == key:
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
        index[name] = key
        atomic_write_text(index_path, json.dumps(index, sort_keys=True))
    bar.close()
    return written
