"""Tiny stand-ins for a Segmenter and a dataset (the engine only relies on the agreed interfaces)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ToySegmenter(nn.Module):
    """Segmenter-like: preprocess / forward / forward_with_features / predict_batch, C classes, 4-channel features."""

    def __init__(self, num_classes: int = 3, seed: int = 0, name: str = "toy") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.name, self.num_classes = name, num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]
        self.feature_channels = 4
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.1),
                                  nn.Conv2d(8, 4, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(4, num_classes, 1)
        self.calls = 0

    def preprocess(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images))
        if x.ndim == 3:
            x = x[None]
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def forward_with_features(self, x):
        f = self.body(x)
        return self.cls(f), f[..., ::2, ::2]

    def forward(self, x):
        return self.forward_with_features(x)[0]

    def predict_batch(self, images, features: bool = False):
        self.calls += 1
        was = self.training
        self.eval()
        with torch.no_grad():
            logits, feats = self.forward_with_features(self.preprocess(images))
        self.train(was)
        return (logits, feats) if features else logits


class ToyDataset:
    """Synthetic scenes: the label is a colour-coded region map, so the task is learnable."""

    dataset_name = "toyset"

    def __init__(self, n: int = 6, sizes=((12, 16),), num_classes: int = 3, seed: int = 0, split: str = "val",
                 labelled: bool = True) -> None:
        self.n, self.sizes, self.num_classes, self.seed, self.split = n, sizes, num_classes, seed, split
        self.labelled = labelled
        self.ignore_index = 255
        self.class_names = [f"c{i}" for i in range(num_classes)]
        self.names = [f"s{i:03d}" for i in range(n)]
        self.loads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.loads += 1
        rng = np.random.default_rng(self.seed * 1000 + i)
        h, w = self.sizes[i % len(self.sizes)]
        target = np.zeros((h, w), np.int64)
        for k in range(1, self.num_classes):
            y, x = rng.integers(0, h), rng.integers(0, w)
            target[max(0, y - 3): y + 3, max(0, x - 4): x + 4] = k
        palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])[: self.num_classes]
        image = np.clip(palette[target] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        target[0, 0] = 255
        return {"image": image, "target": target if self.labelled else None, "name": self.names[i]}
