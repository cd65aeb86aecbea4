"""Run a segmenter over a dataset and write a resumable :class:`~segcal.data.store.LogitsStore`."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from segcal.data.store import DEFAULT_IGNORE_INDEX, LogitsStore

__all__ = ["dataset_id", "dataset_subsets", "dist_info", "model_fingerprint", "predict", "store_manifest"]


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Resolve ``(rank, world_size)``: explicit values, else torch.distributed when initialised, else ``(0, 1)``."""
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"give both `rank` and `world_size` or neither, got rank={rank}, world_size={world_size}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need integers 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the model's state_dict: a fine-tuned model never resumes a stale store."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(str(v.dtype).encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _dataset_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "names", None)
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) != len(dataset):
        return None
    return names


def dataset_id(dataset: Any) -> str:
    """Identity of a dataset for the store manifest: class name, wrapped datasets and their settings, folder."""
    base = str(getattr(dataset, "dataset_name", None) or type(dataset).__name__)
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(inner, "__getitem__"):  # a wrapper such as CorruptedDataset
        extras = [f"{a}={getattr(dataset, a)}" for a in ("name", "severity", "seed") if hasattr(dataset, a)]
        return f"{dataset_id(inner)}+{base}({','.join(extras)})"
    folder = getattr(dataset, "image_dir", None)
    return f"{base}({folder})" if folder is not None else base


_MISSING = object()


def _dataset_attr(dataset: Any, attr: str, default: Any = None) -> Any:
    """``dataset.<attr>``, looking through wrappers (``CorruptedDataset``, ``Subset``: ``.dataset``) when absent.

    An attribute that is present wins even when it is None (``ignore_index=None`` means "no void label").
    """
    value = getattr(dataset, attr, _MISSING)
    if value is not _MISSING and (value is not None or attr == "ignore_index"):
        return value
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(inner, "__getitem__"):
        return _dataset_attr(inner, attr, default)
    return default if value is _MISSING else value


def _split(dataset: Any) -> Any:
    return _dataset_attr(dataset, "split")


def dataset_subsets(dataset: Any) -> dict[str, list[str]]:
    """The dataset's named subsets (``dataset.subsets()``, through wrappers), ``{}`` when it declares none."""
    fn = _dataset_attr(dataset, "subsets")
    if not callable(fn):
        return {}
    subsets = fn()
    if not isinstance(subsets, dict):
        raise TypeError(f"dataset.subsets() must return a dict {{name: [image names]}}, got {type(subsets).__name__}")
    return {str(k): [str(n) for n in v] for k, v in subsets.items()}


def store_manifest(segmenter: Any, dataset: Any, features: bool = False) -> dict:
    """The manifest header :func:`predict` writes.

    Keys: ``model``, ``model_fingerprint``, ``dataset``, ``split``, ``num_classes`` (the model's C),
    ``class_names`` (the dataset's when it declares them, else the model's, else ``class_0 …``), ``ignore_index``
    (the dataset's, ``None`` allowed = no void label; ``DEFAULT_IGNORE_INDEX`` when the dataset does not say),
    ``subsets`` (the dataset's named subsets of this split, ``{}`` if none), ``features``, ``feature_channels``,
    ``order``, ``num_images``.

    Raises:
        ValueError: the dataset declares a class count (``class_names`` / ``num_classes``) that differs from the
            model's output count.
    """
    num_classes = int(segmenter.num_classes)
    model_name = str(getattr(segmenter, "name", type(segmenter).__name__))
    ds_names = _dataset_attr(dataset, "class_names")
    ds_count = _dataset_attr(dataset, "num_classes")
    if ds_names is not None and len(ds_names) != num_classes:
        raise ValueError(f"the dataset has num_classes={len(ds_names)} ({', '.join(map(str, list(ds_names)[:5]))}"
                         f"{', ...' if len(ds_names) > 5 else ''}) but model {model_name!r} predicts C={num_classes} "
                         "classes; use the model trained for this label set (or fix classes.txt)")
    if ds_names is None and ds_count is not None and int(ds_count) != num_classes:
        raise ValueError(f"model {model_name!r} predicts C={num_classes} classes but the dataset has "
                         f"num_classes={ds_count}")
    class_names = ds_names or getattr(segmenter, "class_names", None) or [f"class_{i}" for i in range(num_classes)]
    ignore_index = _dataset_attr(dataset, "ignore_index", DEFAULT_IGNORE_INDEX)
    if ignore_index is not None:
        ignore_index = int(ignore_index)
    return {
        "model": model_name,
        "model_fingerprint": model_fingerprint(segmenter) if isinstance(segmenter, nn.Module) else None,
        "dataset": dataset_id(dataset),
        "split": _split(dataset),
        "num_classes": num_classes,
        "class_names": [str(c) for c in class_names],
        "ignore_index": ignore_index,
        "subsets": dataset_subsets(dataset),
        "features": bool(features),
        "feature_channels": getattr(segmenter, "feature_channels", None) if features else None,
        "order": _dataset_names(dataset),
        "num_images": len(dataset),
    }


def _sample_batches(dataset: Any, indices: Sequence[int], batch_size: int) -> Iterator[list[dict]]:
    """Consecutive samples of equal image size, at most ``batch_size`` each (order kept)."""
    group: list[dict] = []
    for i in indices:
        s = dataset[i]
        img = s["image"]
        if group and (len(group) == batch_size or group[0]["image"].shape != img.shape):
            yield group
            group = []
        group.append(s)
    if group:
        yield group


def _check_sample(s: Any, index: int) -> None:
    if not isinstance(s, dict) or "image" not in s or "name" not in s:
        raise TypeError(f"dataset item {index} must be a dict with 'image', 'target' and 'name', got "
                        f"{type(s).__name__}")
    img = s["image"]
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(f"image '{s['name']}' must be a uint8 (H, W, 3) array, got "
                         f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image '{s['name']}' is empty: shape {img.shape}")


def predict(segmenter: Any, dataset: Any, store_path: str | os.PathLike, batch_size: int = 4,
            features: bool = False, progress: bool = True, rank: int | None = None,
            world_size: int | None = None, logits_dtype: str = "float16") -> LogitsStore:
    """Run ``segmenter`` over ``dataset`` and write (or resume) a logits store.

    Finished entries of an earlier, interrupted run are verified (checksum) and skipped; corrupt ones are redone.
    With several ranks (torch.distributed initialised, or explicit ``rank``/``world_size``), rank r handles images
    r, r+W, ... and writes only its own journal; under torch.distributed rank 0 consolidates the manifest after a
    barrier. With explicit ranks and no process group, no consolidation happens (readers merge journals anyway).

    Args:
        segmenter: a :class:`segcal.models.Segmenter` (``predict_batch``, ``num_classes``, ``class_names``, ``name``).
        dataset: indexable of ``{"image": uint8 (H,W,3), "target": int64 (H,W) | None, "name": str}``.
        store_path: output directory.
        batch_size: images per forward pass (only equal-size images are batched together).
        features: also store the model's decoder features (float16).
        progress: show a tqdm bar.
        rank, world_size: shard explicitly; default from torch.distributed, else a single process.
        logits_dtype: ``"float16"`` (half the disk) or ``"float32"`` (metrics equal a direct float32 computation).

    Returns:
        The store, re-opened read-only (on every rank, after all ranks finished when distributed).

    Raises:
        ValueError: NaN/inf logits (naming the image), bad images/labels, class-count mismatch, store of another
            model/dataset/split. OSError: write failure such as a full disk (finished entries are kept).

    Example:
        >>> import tempfile, numpy as np, torch
        >>> class Toy(torch.nn.Module):
        ...     name, num_classes, class_names = "toy", 2, ["a", "b"]
        ...     def predict_batch(self, images, features=False):
        ...         x = torch.as_tensor(images).float().mean(-1)
        ...         return torch.stack([x, -x], 1)
        >>> data = [{"image": np.zeros((4, 6, 3), np.uint8), "target": None, "name": f"im{i}"} for i in range(3)]
        >>> store = predict(Toy(), data, tempfile.mkdtemp(), progress=False)
        >>> len(store), store.num_classes
        (3, 2)
    """
    if not hasattr(segmenter, "predict_batch"):
        raise TypeError(f"`segmenter` must be a segcal Segmenter (with predict_batch), got "
                        f"{type(segmenter).__name__}; wrap a plain nn.Module with segcal.models")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty: nothing to predict")
    if features and getattr(segmenter, "feature_channels", 1) is None and not hasattr(
            segmenter, "forward_with_features"):
        raise ValueError(f"model {getattr(segmenter, 'name', '?')!r} exposes no decoder features")
    rank, world_size = dist_info(rank, world_size)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and world_size > 1

    if logits_dtype not in ("float16", "float32"):
        raise ValueError(f"`logits_dtype` must be 'float16' or 'float32', got {logits_dtype!r}")
    manifest = store_manifest(segmenter, dataset, features)
    if logits_dtype == "float32":  # float16 stores keep the old manifest, so they still resume
        manifest["logits_dtype"] = logits_dtype
    store = LogitsStore.create(store_path, manifest, rank=rank)
    names = manifest["order"]
    mine = list(range(rank, len(dataset), world_size))
    if names is not None:
        done = [names[i] for i in mine if names[i] in store]
        bad = store.verify_entries(done)
        if bad:
            warnings.warn(f"{len(bad)} corrupt or truncated entries in '{store_path}' are recomputed: {bad[:5]}",
                          RuntimeWarning, stacklevel=2)
            for n in bad:
                store.discard(n)
        todo = [i for i in mine if names[i] not in store]
    else:  # names unknown until loaded: load each sample, skip the finished ones
        todo = mine

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo) if names is not None else 0,
                   desc=f"predict{f' [rank {rank}/{world_size}]' if world_size > 1 else ''}", unit="img",
                   disable=None)
    try:
        for group in _sample_batches(dataset, todo, batch_size):
            for k, s in enumerate(group):
                _check_sample(s, k)
            if names is None:
                group = [s for s in group if str(s["name"]) not in store]
                if not group:
                    continue
            images = np.stack([s["image"] for s in group])
            with torch.inference_mode():
                out = segmenter.predict_batch(images, features=features)
            logits, feats = out if features else (out, None)
            if logits.shape[0] != len(group) or logits.shape[1] != store.num_classes or \
                    tuple(logits.shape[2:]) != images.shape[1:3]:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for a batch of "
                                 f"{images.shape}; expected (N, {store.num_classes}, H, W)")
            for j, s in enumerate(group):
                target = s.get("target")
                store.write(str(s["name"]), logits[j], torch.as_tensor(target) if target is not None else None,
                            feats[j] if feats is not None else None)
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()

    if distributed:
        torch.distributed.barrier()
        if rank == 0:
            store.finalize()
        torch.distributed.barrier()
    elif world_size == 1:
        store.finalize()
    return LogitsStore(store_path)
