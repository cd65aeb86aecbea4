"""``SyntheticSegmentation``: a clearly *synthetic* dataset for tests and the no-data demo."""

from __future__ import annotations

import numpy as np

__all__ = ["SyntheticSegmentation"]


class SyntheticSegmentation:
    """SYNTHETIC data: piecewise-constant random blobs, each class with its own colour, plus Gaussian noise.

    Each image is a Voronoi partition of ``blobs`` random centres (so regions are convex, piecewise constant); every
    region gets a random class, the pixels the class colour (a fixed random RGB per class, shared by all images of the
    dataset) plus per-pixel noise of std ``noise``. A small conv net learns it in a few steps; the noise makes it
    imperfect, so calibration is non-trivial. Sample ``i`` depends only on ``(seed, i)``: deterministic and
    random-access. No real-world meaning — use it only for tests, smoke runs and the demo without data.

    Args:
        n: number of samples.
        size: ``(H, W)``.
        num_classes: C (>= 2).
        seed: base seed.
        blobs: regions per image.
        noise: per-pixel colour noise std (0–255 scale).
        void_fraction: probability that a region is labelled void (``ignore_index``) instead of its class.
        ignore_index: void label.

    Returns:
        Items are dicts ``{"image": uint8 (H, W, 3), "target": int64 (H, W), "name": "synthetic_00000"}``.

    Example:
        >>> ds = SyntheticSegmentation(4, size=(16, 24), num_classes=3, seed=0)
        >>> s = ds[1]; s["image"].shape, s["target"].shape, s["name"]
        ((16, 24, 3), (16, 24), 'synthetic_00001')
    """

    synthetic = True

    def __init__(self, n: int = 16, size: tuple[int, int] = (64, 96), num_classes: int = 4, seed: int = 0, *,
                 blobs: int = 8, noise: float = 40.0, void_fraction: float = 0.0, ignore_index: int = 255) -> None:
        if int(n) < 1:
            raise ValueError(f"`n` must be >= 1, got {n}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"`size` must be (H, W) with positive sides, got {size}")
        if int(num_classes) < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
        if int(blobs) < 1:
            raise ValueError(f"`blobs` must be >= 1, got {blobs}")
        if not 0.0 <= void_fraction < 1.0:
            raise ValueError(f"`void_fraction` must be in [0, 1), got {void_fraction}")
        self.n = int(n)
        self.size = (int(size[0]), int(size[1]))
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.blobs = int(blobs)
        self.noise = float(noise)
        self.void_fraction = float(void_fraction)
        self.ignore_index = int(ignore_index)
        self.class_names = [f"synthetic_{k}" for k in range(self.num_classes)]
        self.names = [f"synthetic_{i:05d}" for i in range(self.n)]
        self.palette = np.random.default_rng([self.seed, 2**31 - 1]).integers(
            30, 226, size=(self.num_classes, 3)).astype(np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        index %= self.n
        rng = np.random.default_rng([self.seed, index])
        h, w = self.size
        centres = rng.uniform((0, 0), (h, w), size=(self.blobs, 2))
        region_class = rng.integers(0, self.num_classes, size=self.blobs)
        yy, xx = np.mgrid[0:h, 0:w]
        d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
        region = d2.argmin(0)
        target = region_class[region].astype(np.int64)
        image = self.palette[target].astype(np.float64) + rng.normal(0.0, self.noise, size=(h, w, 3))
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if self.void_fraction > 0:
            void_region = rng.random(self.blobs) < self.void_fraction
            target[void_region[region]] = self.ignore_index
        return {"image": image, "target": target, "name": self.names[index]}

    def __repr__(self) -> str:
        return (f"SyntheticSegmentation(n={self.n}, size={self.size}, num_classes={self.num_classes}, "
                f"seed={self.seed})  # synthetic data")
