"""A results folder shaped like the engine's (results.json + example PNGs), small and deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASS_NAMES = ["Sky", "Building", "Road", "Car"]


def reliability(n_bins: int = 10, shrink: float = 0.9) -> dict:
    edges = np.linspace(0, 1, n_bins + 1)
    count = np.arange(n_bins, dtype=float) ** 2
    conf = (edges[:-1] + edges[1:]) / 2
    acc = conf * shrink
    conf[0] = acc[0] = float("nan")  # empty bin
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}


def _row(ece: float, **kw: float) -> dict:
    row = {"ece": ece, "mce": 3 * ece, "ace": ece * 1.1, "cw_ece": ece / 3, "nll": 0.3 + ece, "brier": 0.1 + ece,
           "oe": ece / 2, "accuracy": 0.9, "miou": 0.6, "ece_correct": 0.05, "ece_wrong": 0.6,
           "reliability": reliability(shrink=1 - ece), "per_class_ece": [ece / 2, ece, ece / 3, ece / 4]}
    row.update(kw)
    return row


def results(**overrides: object) -> dict:
    out = {
        "meta": {"model": "tiny-net", "dataset": "blocks", "fit split": "val (8 images)",
                 "eval splits": "test (8 images)", "num_classes": 4, "ignore_index": 255, "n_bins": 10, "seed": 0,
                 "segcal_version": "0.0.test"},
        "class_names": CLASS_NAMES,
        "config": {"calibrators": ["ts", "vs"], "seed": 0},
        "calibration": {
            "test (all)": {"uncalibrated": _row(0.062), "ts": _row(0.031), "vs": _row(0.029, oe=0.0),
                           "lts": _row(0.045)},
            "test seqA": {"uncalibrated": _row(0.07), "ts": _row(0.03)},
        },
        "bootstrap": {"test (all)": {
            "ts vs uncalibrated": {"metric": "ece", "diff": -0.031, "low": -0.038, "high": -0.024, "level": 0.95,
                                   "n_resamples": 1000, "seed": 0, "significant": True},
            "vs vs uncalibrated": {"metric": "ece", "diff": -0.002, "low": -0.006, "high": 0.003, "level": 0.95,
                                   "n_resamples": 1000, "seed": 0, "significant": False},
        }},
        "detection": {"IDM: test (positive = mispredicted pixel)": {
            "msp": {"auroc": 0.9, "ap": 0.5, "fpr95": 0.3, "roc": [[0, 0.5, 1], [0, 0.9, 1]],
                    "pr": [[0, 0.5, 1], [1, 0.7, 0.2]]},
            "entropy": {"auroc": 0.88, "ap": 0.55, "fpr95": 0.25, "roc": [[0, 0.4, 1], [0, 0.8, 1]],
                        "pr": [[0, 0.5, 1], [1, 0.6, 0.2]]}}},
        "shift": {"gaussian_noise": {"0": {"ECE uncalibrated": 0.05, "ECE ts": 0.03},
                                     "3": {"ECE uncalibrated": 0.1, "ECE ts": 0.05}}},
        "examples": [{"name": "img0", "panels": {"image": "examples/img0_image.png",
                                                 "ground truth": "examples/img0_gt.png",
                                                 "prediction": "examples/img0_pred.png",
                                                 "confidence (max softmax)": "examples/img0_conf.png",
                                                 "score: msp": "examples/img0_msp.png"}}],
        "skipped": [{"stage": "flowenedet-c", "reason": "the model gives no features"}],
    }
    out.update(overrides)
    return out


def write(folder: Path, data: dict | None = None) -> Path:
    from PIL import Image

    data = results() if data is None else data
    (folder / "examples").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 4, (3, 4)), 20, 0), 20, 1)
    palette = np.array([[70, 130, 180], [160, 60, 60], [128, 64, 128], [230, 200, 40]], dtype=np.uint8)
    data.setdefault("meta", {})["palette"] = palette.tolist()
    conf = rng.random(labels.shape)
    pictures = {"image": rng.integers(0, 255, (*labels.shape, 3), dtype=np.uint8), "gt": palette[labels],
                "pred": palette[np.where(conf > 0.8, (labels + 1) % 4, labels)],
                "conf": (np.stack([conf] * 3, -1) * 255).astype(np.uint8),
                "msp": (np.stack([1 - conf] * 3, -1) * 255).astype(np.uint8)}
    for key, img in pictures.items():
        Image.fromarray(img).save(folder / "examples" / f"img0_{key}.png")
    (folder / "results.json").write_text(json.dumps(data))
    return folder
