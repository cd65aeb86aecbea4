"""Calibration metrics of a logits store, optionally through a calibrator, sharded across ranks.

Each rank reads only its shard of the store (images r, r+W, ...); the metric states are fixed-size integer sums, so
the all-reduce in ``compute()`` reproduces the one-process result bit for bit, and the JSON is identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from segcal._progress import progress_bar
from segcal.data.store import LogitsStore
from segcal.engine.inference import dist_info
from segcal.metrics import CalibrationMetrics

SIGNIFICANT_DIGITS = 12


def to_jsonable(value: Any) -> Any:
    """Tensors / numpy values → plain Python, floats rounded to 12 significant digits (NaN → None)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def images_of(dataset: Any, names: Sequence[str]) -> Tensor:
    """RGB images ``(N, 3, H, W)`` float in [0, 1] of the named items of ``dataset`` (for methods that need images)."""
    index = {n: i for i, n in enumerate(dataset.names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"images {missing[:3]} are not in dataset {getattr(dataset, 'dataset_name', dataset)!r}")
    imgs = np.stack([dataset[index[n]]["image"] for n in names])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0


def calibration_summary(metric: CalibrationMetrics) -> dict[str, Any]:
    """compute() + reliability() of a metric as a JSON-friendly dict."""
    values = metric.compute()
    out: dict[str, Any] = {k: to_jsonable(v) for k, v in values.items()}
    rel = metric.reliability()
    out["reliability"] = {"edges": to_jsonable(rel["edges"]), "count": to_jsonable(rel["count"]),
                          "confidence": to_jsonable(rel["confidence"]), "accuracy": to_jsonable(rel["accuracy"])}
    return out


def evaluate_store(store: LogitsStore, transform: Callable[[Tensor], Tensor] | None = None, *, n_bins: int = 15,
                   boundary_width: int | None = 2, exclude_classes: list[int] | None = None,
                   names: list[str] | None = None, batch_size: int = 4, progress: bool = True,
                   rank: int | None = None, world_size: int | None = None, images: Any = None) -> dict[str, Any]:
    """Calibration metrics of (optionally transformed) stored logits.

    Args:
        store: a :class:`~segcal.data.LogitsStore` with labels.
        transform: maps logits (B,C,H,W) → calibrated logits, e.g. ``calibrator.transform``; with ``images`` it is
            called as ``transform(logits, images=...)``.
        n_bins, boundary_width, exclude_classes: passed to :class:`~segcal.metrics.CalibrationMetrics`.
        names: restrict to these entries (e.g. one test sequence).
        batch_size: images per batch.
        progress: show a progress bar (rank 0 only).
        rank, world_size: shard explicitly; default from torch.distributed (all ranks must call this).
        images: the dataset holding the store's images, for calibrators that look at the image (LTS).

    Returns:
        JSON-friendly dict of metric values (see ``CalibrationMetrics.compute``) plus ``reliability`` and
        ``n_images``.
    """
    rank, world_size = dist_info(rank, world_size)
    all_names = list(names) if names is not None else store.names
    if not all_names:
        raise ValueError(f"logits store '{store.path}' has no entries to evaluate")
    shard = all_names[rank::world_size]
    metric = CalibrationMetrics(store.num_classes, n_bins=n_bins, ignore_index=store.ignore_index,
                                boundary_width=boundary_width, exclude_classes=exclude_classes)
    with torch.inference_mode(), progress_bar(len(shard), "evaluate", progress and rank == 0) as bar:
        for batch in store.batches(batch_size=batch_size, names=shard):
            if batch["target"] is None:
                raise ValueError(f"entries {batch['names'][:3]} of store '{store.path}' have no labels; "
                                 "calibration metrics need labelled images")
            logits = batch["logits"]
            if transform is not None:
                logits = transform(logits) if images is None else \
                    transform(logits, images=images_of(images, batch["names"]))
            metric.update(logits, batch["target"])
            bar.update(len(batch["names"]))
    out = calibration_summary(metric)
    out["n_images"] = len(all_names)
    return out
