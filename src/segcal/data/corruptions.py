"""ImageNet-C-style image corruptions for dense-prediction robustness (domain-shift protocol).

Every corruption maps a ``uint8`` ``(H, W, 3)`` RGB image to a ``uint8`` image of the same shape, at a severity in
1..5, deterministically given ``seed``. Labels are never touched: a corrupted frame keeps its ground truth, which is
what makes calibration and error detection under shift measurable.

Parameters follow Hendrycks & Dietterich (2019) and the ``imagecorruptions`` package (Michaelis et al., 2019), which
applies them in pixel units to images of any size (as Cityscapes-C does); ``darkness`` is our addition, a dusk /
low-light model. All implementations use numpy and Pillow only. See ``docs/shift.md`` for the per-severity table.

References:
    D. Hendrycks, T. Dietterich. "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations."
    ICLR 2019. arXiv:1903.12261.
    C. Michaelis et al. "Benchmarking Robustness in Object Detection: Autonomous Driving when Winter is Coming."
    arXiv:1907.07484.
    C. Kamann, C. Rother. "Benchmarking the Robustness of Semantic Segmentation Models." CVPR 2020.
    arXiv:1908.05005.

Example:
    >>> import numpy as np
    >>> from segcal.data.corruptions import corrupt
    >>> img = np.full((32, 48, 3), 128, dtype=np.uint8)
    >>> out = corrupt(img, "gaussian_noise", severity=3, seed=0)
    >>> out.shape, out.dtype
    ((32, 48, 3), dtype('uint8'))
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from segcal.data.subset import normalize_index

__all__ = ["CORRUPTIONS", "CORRUPTION_PARAMS", "CorruptedDataset", "corrupt"]

# Per-severity parameters (index = severity - 1). Values from Hendrycks & Dietterich (2019) / imagecorruptions 1.1.2
# unless marked otherwise.
CORRUPTION_PARAMS: dict[str, tuple[Any, ...]] = {
    # std of additive N(0, s^2) noise on [0, 1] intensities
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    # photons per unit intensity: x' = Poisson(x * c) / c
    "shot_noise": (60, 25, 12, 5, 3),
    # fraction of values set to salt or pepper
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    # (disk radius px, sigma of anti-aliasing Gaussian px)
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    # (radius px, sigma px) of a one-sided Gaussian-weighted line kernel, angle ~ U(-45, 45) deg
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    # sigma px
    "gaussian_blur": (1, 2, 3, 4, 6),
    # (fog strength, plasma-fractal wibble decay)
    "fog": ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    # additive shift of the HSV value channel
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    # factor on the deviation from the per-channel mean
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # JPEG quality
    "jpeg_compression": (25, 18, 15, 10, 7),
    # downscale factor (box filter down, nearest up)
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    # segcal: (exposure factor in linear light, std of additive sensor noise on [0, 1] sRGB)
    "darkness": ((0.5, 0.01), (0.3, 0.015), (0.18, 0.02), (0.1, 0.025), (0.05, 0.03)),
}


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-channel 2-D convolution of ``x`` (H, W, 3) with ``kernel`` via FFT, edges replicated."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode="edge")
    shape = padded.shape[:2]
    fk = np.fft.rfft2(kernel, s=shape)
    out = np.fft.irfft2(np.fft.rfft2(padded, s=shape, axes=(0, 1)) * fk[..., None], s=shape, axes=(0, 1))
    h, w = x.shape[:2]
    return out[kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


def _gaussian_kernel1d(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(4 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    k = _gaussian_kernel1d(sigma)
    return _convolve(x, np.outer(k, k))


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    # As imagecorruptions: an aliased disk on a grid of at least 17x17, softened by a small Gaussian.
    half = max(8, int(radius))
    t = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(t, t)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    k = _gaussian_kernel1d(alias_blur) if alias_blur > 0 else np.ones(1)
    r = len(k) // 2
    disk = np.pad(disk, r)
    # separable smoothing, kept inside the kernel support
    disk = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, disk)
    disk = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, disk)
    return disk / disk.sum()


def _motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    # One-sided trail of length 2*radius+1 with Gaussian weights, as imagecorruptions' shift-and-add.
    width = int(2 * radius + 1)
    weights = np.exp(-0.5 * (np.arange(width) / sigma) ** 2)
    weights /= weights.sum()
    theta = np.deg2rad(angle_deg)
    dy, dx = np.sin(theta), np.cos(theta)
    size = 2 * width + 1
    kernel = np.zeros((size, size))
    for i, wgt in enumerate(weights):
        kernel[width + round(i * dy), width + round(i * dx)] += wgt
    return kernel


def _plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] of shape (mapsize, mapsize); ``mapsize`` a power of two."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)

        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)

        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(size=x.shape) * c


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / float(c)


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # Same uniforms at every severity, so a higher severity corrupts a superset of the values.
    u = rng.random(x.shape)
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    hit = u < c
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    return _convolve(x, _disk_kernel(*c))


def _motion_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(-45.0, 45.0)
    return _convolve(x, _motion_kernel(c[0], c[1], angle))


def _gaussian_blur_c(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _gaussian_blur(x, c)


def _fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    mapsize = 1 << max(1, (max(h, w) - 1).bit_length())
    max_val = x.max()
    fog = c[0] * _plasma_fractal(mapsize, c[1], rng)[:h, :w, None]
    return (x + fog) * max_val / (max_val + c[0])


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # Adding c to HSV value keeps hue and saturation, i.e. scales RGB by V'/V (black becomes grey V').
    v = x.max(axis=2, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    scale = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.where(v > 0, x * scale, v_new)


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _darkness(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    # Less light: scale linear radiance (sRGB ~ gamma 2.2), then add read noise in the encoded domain.
    linear = x**2.2 * c[0]
    return linear ** (1 / 2.2) + rng.normal(size=x.shape) * c[1]


def _pil_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).copy()


def _pil_pixelate(image: np.ndarray, c: float) -> np.ndarray:
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST)).copy()


_FLOAT_OPS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "gaussian_blur": _gaussian_blur_c,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "darkness": _darkness,
}
_UINT8_OPS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "jpeg_compression": _pil_jpeg,
    "pixelate": _pil_pixelate,
}

CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTION_PARAMS)
"""Names accepted by :func:`corrupt`, in the order of :data:`CORRUPTION_PARAMS`."""


def _check_image(image: object, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`{name}` must be a numpy.ndarray, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"`{name}` must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`{name}` must have shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"`{name}` must be non-empty, got shape {image.shape}")
    return image


def _check_name_severity(name: object, severity: object) -> None:
    if not isinstance(name, str) or name not in CORRUPTION_PARAMS:
        raise ValueError(f"`name` must be one of {CORRUPTIONS}, got {name!r}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        raise TypeError(f"`severity` must be an int in 1..5, got {type(severity).__name__}")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"`severity` must be in 1..5, got {severity}")


def _make_rng(seed: object) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, np.random.SeedSequence)):
        raise TypeError(f"`seed` must be an int, numpy SeedSequence or Generator, got {type(seed).__name__}")
    if not isinstance(seed, np.random.SeedSequence) and seed < 0:
        raise ValueError(f"`seed` must be non-negative, got {seed}")
    return np.random.default_rng(seed)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Apply one corruption at one severity to an RGB image.

    The image is mapped to ``x ∈ [0, 1]``, corrupted (e.g. ``x + N(0, σ_s²)`` for ``gaussian_noise``), clipped and
    rounded back to ``uint8``. Severity parameters are in :data:`CORRUPTION_PARAMS` and ``docs/shift.md``. The same
    seed draws the same random field at every severity, so severities of one frame are nested.

    Args:
        image: ``uint8`` RGB image of shape ``(H, W, 3)``; not modified.
        name: One of :data:`CORRUPTIONS`.
        severity: Integer in 1..5 (1 mild, 5 severe).
        seed: Integer seed (or a ``numpy.random.Generator``) for the stochastic corruptions (noise, motion-blur
            angle, fog pattern). Deterministic corruptions ignore it.

    Returns:
        A new ``uint8`` array of shape ``(H, W, 3)``.

    Raises:
        TypeError: ``image`` is not a uint8 ndarray, or ``severity`` / ``seed`` has the wrong type.
        ValueError: wrong image shape, unknown ``name``, or ``severity`` outside 1..5.

    References:
        Hendrycks & Dietterich, ICLR 2019, arXiv:1903.12261.

    Example:
        >>> import numpy as np
        >>> img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        >>> a = corrupt(img, "fog", 2, seed=1)
        >>> bool((a == corrupt(img, "fog", 2, seed=1)).all())
        True
    """
    image = _check_image(image)
    _check_name_severity(name, severity)
    rng = _make_rng(seed)
    c = CORRUPTION_PARAMS[name][int(severity) - 1]
    if name in _UINT8_OPS:
        return _UINT8_OPS[name](np.ascontiguousarray(image), c)
    return _to_uint8(_FLOAT_OPS[name](_as_float(image), c, rng))


class CorruptedDataset(Sequence):
    """Wrap a dataset of sample dicts so every image is corrupted on access; labels are unchanged.

    Sample ``i`` is corrupted with a seed derived from ``(seed, i)``, so frames get different noise but every access
    (and every run) returns the same pixels, and severities of one frame share their random field.

    Args:
        dataset: Indexable sized collection of dicts with ``"image"`` (uint8 ``(H, W, 3)``), ``"target"`` and
            ``"name"`` (other keys are passed through).
        name: Corruption name, one of :data:`CORRUPTIONS`.
        severity: Integer in 1..5.
        seed: Non-negative base seed.

    Returns:
        Samples as dicts whose ``"name"`` is suffixed ``"{name}@{corruption}-{severity}"``.

    References:
        Kamann & Rother, CVPR 2020, arXiv:1908.05005 (corrupted segmentation benchmarks).

    Example:
        >>> import numpy as np
        >>> ds = [{"image": np.zeros((8, 8, 3), np.uint8), "target": np.zeros((8, 8), np.int64), "name": "a"}]
        >>> CorruptedDataset(ds, "contrast", 5)[0]["name"]
        'a@contrast-5'
    """

    def __init__(self, dataset: Sequence[Mapping[str, Any]], name: str, severity: int, seed: int = 0) -> None:
        _check_name_severity(name, severity)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"`dataset` must support len() and indexing, got {type(dataset).__name__}")
        self.dataset = dataset
        self.name = name
        self.severity = int(severity)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = normalize_index(index, len(self), type(self).__name__)
        sample = dict(self.dataset[index])
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
        sample["image"] = corrupt(sample["image"], self.name, self.severity, seed=rng)
        sample["name"] = f"{sample.get('name', index)}@{self.name}-{self.severity}"
        return sample

    def __repr__(self) -> str:
        return (f"CorruptedDataset(n={len(self)}, name={self.name!r}, severity={self.severity}, "
                f"seed={self.seed})")
