"""Pasted-anomaly OOD protocol (Fishyscapes-Static style) with cut-outs from scikit-image's sample photos.

Objects that never occur in road scenes (a cat's head, an espresso cup, a rocket, a toy space shuttle, a horse) are
cut from photographs that ship inside the scikit-image wheel, and pasted with binary masks into road frames. Their
pixels get the label :data:`OOD_LABEL`; every other pixel keeps its original label. Positions follow a flat-ground
perspective model: an object's foot stands on a ground pixel (road / pavement when a label map is given) below the
horizon, and its height in pixels grows linearly with the distance of that foot from the horizon.

Cut-outs are derived at run time from the files physically present in ``skimage/data`` (no network, nothing
shipped here), with hand-set polygons / ellipses in the source images' pixel coordinates, intersected with a colour
threshold where the object is separable by colour. Sources and licences are in :data:`ANOMALY_SOURCES` and
``docs/shift.md``. scikit-image (a test/dev dependency of segcal) is needed only for this module.

References:
    H. Blum et al. "The Fishyscapes Benchmark: Measuring Blind Spots in Semantic Segmentation." IJCV 2021.
    arXiv:1904.03215.

Example:
    >>> import numpy as np
    >>> from segcal.data.anomalies import paste_anomalies, OOD_LABEL
    >>> img = np.full((90, 120, 3), 100, np.uint8)
    >>> tgt = np.full((90, 120), 3, np.int64)
    >>> out, t, m = paste_anomalies(img, tgt, seed=0)
    >>> bool((t[m] == OOD_LABEL).all()) and bool((t[~m] == 3).all())
    True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segcal.data.subset import normalize_index

__all__ = [
    "ANOMALY_SOURCES",
    "OOD_LABEL",
    "PastedAnomalyDataset",
    "anomaly_object",
    "anomaly_objects",
    "paste_anomalies",
]

OOD_LABEL = 254
"""Label of pasted anomaly pixels (255 stays the ignore label)."""

# Per object: source file in skimage/data, licence as stated in skimage's docstrings, and the object's assumed
# height in metres when standing on the road (drives the perspective scale).
ANOMALY_SOURCES: dict[str, dict[str, Any]] = {
    "cat": {"file": "chelsea.png", "height_m": 0.45,
            "source": "skimage.data.chelsea: Chelsea the cat, photo by Stefan van der Walt",
            "license": "CC0 (no copyright restrictions)"},
    "coffee": {"file": "coffee.png", "height_m": 0.5,
               "source": "skimage.data.coffee: coffee cup, courtesy of Pikolo Espresso Bar, photo by Rachel Michetti",
               "license": "CC0 (no copyright restrictions)"},
    "rocket": {"file": "rocket.jpg", "height_m": 2.0,
               "source": "skimage.data.rocket: DSCOVR on Falcon 9 launch photo by SpaceX",
               "license": "public domain (released by SpaceX)"},
    "shuttle": {"file": "astronaut.png", "height_m": 1.0,
                "source": "skimage.data.astronaut: NASA portrait of Eileen Collins (the model space shuttle "
                          "in the background)",
                "license": "public domain (NASA, no known copyright restrictions)"},
    "horse": {"file": "horse.png", "height_m": 1.6,
              "source": "skimage.data.horse: horse silhouette by Andreas Preuss (marauder), openclipart; textured "
                        "with skimage.data.grass (public domain)",
              "license": "CC0 (silhouette)"},
}


def _read(file: str) -> np.ndarray:
    try:
        path = resources.files("skimage") / "data" / file
        with resources.as_file(path) as p, Image.open(p) as im:
            return np.asarray(im).copy()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            f"the pasted-anomaly protocol needs scikit-image's bundled sample image {file!r} "
            "(pip install scikit-image)") from e


def _polygon(shape: tuple[int, int], points: Sequence[tuple[float, float]]) -> np.ndarray:
    im = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(im).polygon([tuple(map(float, p)) for p in points], fill=1)
    return np.asarray(im, dtype=bool)


def _ellipse(shape: tuple[int, int], cx: float, cy: float, a: float, b: float, deg: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    t = np.deg2rad(deg)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _fill_rows(mask: np.ndarray, min_count: int = 3) -> np.ndarray:
    """Fill each row between its first and last set pixel (the object is convex along rows); drop sparse rows."""
    out = np.zeros_like(mask)
    for r in np.nonzero(mask.sum(1) >= min_count)[0]:
        cols = np.nonzero(mask[r])[0]
        out[r, cols[0] : cols[-1] + 1] = True
    return out


def _cat() -> tuple[np.ndarray, np.ndarray]:
    img = _read("chelsea.png")[..., :3]
    pts = [(20, 45), (40, 2), (85, 2), (150, 6), (250, 2), (330, 2), (395, 0), (388, 30), (362, 72), (368, 120),
           (362, 170), (342, 215), (308, 255), (272, 280), (220, 292), (160, 287), (100, 268), (50, 238),
           (15, 192), (4, 130), (8, 80)]
    return img, _polygon(img.shape[:2], pts)


def _coffee() -> tuple[np.ndarray, np.ndarray]:
    img = _read("coffee.png")[..., :3]
    hw = img.shape[:2]
    mask = _ellipse(hw, 278, 228, 201, 156, -4) | _ellipse(hw, 290, 112, 118, 95)  # saucer | cup rim
    mask[112:235, 176:404] = True  # cup walls between rim and saucer
    return img, mask


def _rocket() -> tuple[np.ndarray, np.ndarray]:
    img = _read("rocket.jpg")[..., :3]
    f = img.astype(np.int32)
    # The white rocket against the blue dusk sky: bright and not blue-dominated, inside its column.
    bright = (f[..., 0] > 70) & (f[..., 0] >= 0.75 * f[..., 2])
    roi = np.zeros(img.shape[:2], bool)
    roi[110:402, 309:338] = True
    return img, _fill_rows(bright & roi)


def _shuttle() -> tuple[np.ndarray, np.ndarray]:
    img = _read("astronaut.png")[..., :3]
    pts = [(381, 58), (384, 46), (389, 40), (395, 48), (399, 22), (405, 7), (419, 1), (432, 6), (438, 22),
           (439, 46), (443, 40), (448, 46), (451, 60), (451, 178), (456, 206), (456, 224), (352, 224), (356, 214),
           (381, 180)]
    return img, _polygon(img.shape[:2], pts)


def _horse() -> tuple[np.ndarray, np.ndarray]:
    rgba = _read("horse.png")
    lum = rgba[..., :3].astype(np.float64).mean(-1)
    alpha = rgba[..., 3] if rgba.shape[-1] == 4 else np.full(lum.shape, 255)
    mask = (alpha > 127) & (lum < 128)
    h, w = mask.shape
    grass = _read("grass.png").astype(np.float64)[:h, :w] / 255.0
    shade = 0.75 + 0.5 * (grass - grass.mean())  # subtle real texture so the horse is not a flat colour
    brown = np.array([110.0, 72.0, 40.0])
    img = np.clip(shade[..., None] * brown, 0, 255).astype(np.uint8)
    return img, mask


_BUILDERS = {"cat": _cat, "coffee": _coffee, "rocket": _rocket, "shuttle": _shuttle, "horse": _horse}


def anomaly_objects() -> tuple[str, ...]:
    """Names of the available anomaly cut-outs.

    Returns:
        Tuple of names accepted by :func:`anomaly_object` and ``paste_anomalies(objects=...)``.

    Example:
        >>> "cat" in anomaly_objects()
        True
    """
    return tuple(_BUILDERS)


@functools.cache
def _cutout(name: str) -> tuple[np.ndarray, np.ndarray]:
    img, mask = _BUILDERS[name]()
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    rgb, m = np.ascontiguousarray(img[sl]), np.ascontiguousarray(mask[sl])
    rgb.setflags(write=False)
    m.setflags(write=False)
    return rgb, m


def anomaly_object(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One cut-out, cropped to its mask's bounding box.

    Args:
        name: One of :func:`anomaly_objects`.

    Returns:
        ``(rgb, mask)``: read-only ``uint8`` ``(h, w, 3)`` and ``bool`` ``(h, w)`` arrays.

    Raises:
        ValueError: unknown ``name``.
        RuntimeError: scikit-image (which holds the source photos) is not installed.

    Example:
        >>> rgb, mask = anomaly_object("coffee")
        >>> rgb.shape[:2] == mask.shape
        True
    """
    if name not in _BUILDERS:
        raise ValueError(f"`name` must be one of {anomaly_objects()}, got {name!r}")
    return _cutout(name)


def _resize(rgb: np.ndarray, mask: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    new_w = max(1, round(w * height / h))
    rgb_r = np.asarray(Image.fromarray(rgb).resize((new_w, height), Image.Resampling.LANCZOS))
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((new_w, height), Image.Resampling.BILINEAR)
    return rgb_r, np.asarray(m) >= 128


def paste_anomalies(
    image: np.ndarray,
    target: np.ndarray | None,
    seed: int,
    n_objects: int = 1,
    *,
    objects: Sequence[str] | None = None,
    ground_labels: Sequence[int] | None = (3, 4),
    horizon: float = 0.45,
    camera_height_m: float = 1.5,
    scale_jitter: float = 0.3,
    min_height: int = 12,
    ood_label: int = OOD_LABEL,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Paste ``n_objects`` anomaly cut-outs into a road frame.

    For each object a foot point ``(x, y)`` is drawn among ground pixels below the horizon row ``y_h = horizon·H``
    (pixels of ``ground_labels`` in ``target`` when any exist; otherwise any pixel below the horizon). Under a flat
    ground seen by a camera at height ``h_c``, an object of height ``h_o`` standing there spans
    ``h_o / h_c · (y − y_h)`` pixels; that height is jittered by ``U(1 − j, 1 + j)``, clamped to
    ``[min_height, 0.9·H]``, and the object is shifted to lie fully inside the image. Later objects occlude earlier
    ones. Pixels are replaced (binary mask, no blending).

    Args:
        image: ``uint8`` RGB ``(H, W, 3)``; not modified.
        target: Integer label map ``(H, W)`` or ``None``.
        seed: Non-negative int; the same seed gives the same result.
        n_objects: Number of objects to paste (≥ 1).
        objects: Names to draw from (default: all of :func:`anomaly_objects`).
        ground_labels: Labels of drivable ground (CamVid: 3 road, 4 pavement); ``None`` to ignore labels.
        horizon: Horizon row as a fraction of ``H``.
        camera_height_m: Assumed camera height above the road.
        scale_jitter: Relative jitter ``j`` of the object height.
        min_height: Smallest object height in pixels.
        ood_label: Label written at pasted pixels.

    Returns:
        ``(image, target_with_ood, ood_mask)``: new uint8 image, new int64 label map with ``ood_label`` at pasted
        pixels (``None`` when ``target`` is ``None``), and a bool ``(H, W)`` mask of pasted pixels.

    Raises:
        TypeError: wrong dtype of ``image`` / ``target``.
        ValueError: wrong shapes, bad ``n_objects`` / ``seed`` / ``horizon``, unknown object names.

    References:
        Blum et al., "The Fishyscapes Benchmark", IJCV 2021, arXiv:1904.03215 (Fishyscapes Static).

    Example:
        >>> import numpy as np
        >>> img = np.zeros((60, 80, 3), np.uint8)
        >>> _, _, m = paste_anomalies(img, None, seed=1, n_objects=2)
        >>> m.dtype, m.shape
        (dtype('bool'), (60, 80))
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`image` must be a numpy.ndarray, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"`image` must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`image` must have shape (H, W, 3) RGB, got {image.shape}")
    H, W = image.shape[:2]
    if H < 8 or W < 8:
        raise ValueError(f"`image` must be at least 8x8, got {H}x{W}")
    if target is not None:
        if not isinstance(target, np.ndarray):
            raise TypeError(f"`target` must be a numpy.ndarray or None, got {type(target).__name__}")
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"`target` must be an integer label map, got dtype {target.dtype}")
        if target.shape != (H, W):
            raise ValueError(f"`target` shape {target.shape} does not match the image's (H, W) = {(H, W)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
    if isinstance(n_objects, bool) or not isinstance(n_objects, (int, np.integer)) or n_objects < 1:
        raise ValueError(f"`n_objects` must be an int >= 1, got {n_objects!r}")
    if not 0.0 <= horizon < 0.95:
        raise ValueError(f"`horizon` must be in [0, 0.95), got {horizon}")
    names = tuple(anomaly_objects() if objects is None else objects)
    if not names:
        raise ValueError("`objects` must name at least one object")
    for n in names:
        if n not in _BUILDERS:
            raise ValueError(f"`objects` must be names from {anomaly_objects()}, got {n!r}")

    rng = np.random.default_rng(seed)
    out = image.copy()
    mask = np.zeros((H, W), dtype=bool)
    y_h = int(horizon * H)
    # Foot points at least a few rows below the horizon, so objects are not vanishingly small.
    y_min = min(H - 1, y_h + max(1, (H - y_h) // 6))
    ground = np.zeros((H, W), dtype=bool)
    ground[y_min:] = True
    if target is not None and ground_labels is not None:
        on_road = ground & np.isin(target, np.asarray(ground_labels))
        if on_road.any():
            ground = on_road
    foot_ys, foot_xs = np.nonzero(ground)

    for _ in range(int(n_objects)):
        name = names[int(rng.integers(len(names)))]
        rgb, m = _cutout(name)
        k = int(rng.integers(len(foot_ys)))
        fy, fx = int(foot_ys[k]), int(foot_xs[k])
        height_m = ANOMALY_SOURCES[name]["height_m"]
        px = height_m / camera_height_m * (fy - y_h) * rng.uniform(1 - scale_jitter, 1 + scale_jitter)
        height = int(np.clip(round(px), min(min_height, H - 1), max(1, int(0.9 * H))))
        if rng.random() < 0.5:
            rgb, m = rgb[:, ::-1], m[:, ::-1]
        rgb_r, m_r = _resize(np.ascontiguousarray(rgb), np.ascontiguousarray(m), height)
        h, w = m_r.shape
        if w > W:  # very wide object in a narrow frame: crop to the frame width, centred
            off = (w - W) // 2
            rgb_r, m_r, w = rgb_r[:, off : off + W], m_r[:, off : off + W], W
        top = int(np.clip(fy - h + 1, 0, H - h))
        left = int(np.clip(fx - w // 2, 0, W - w))
        region = out[top : top + h, left : left + w]
        region[m_r] = rgb_r[m_r]
        mask[top : top + h, left : left + w] |= m_r

    new_target = None
    if target is not None:
        new_target = target.astype(np.int64, copy=True)
        new_target[mask] = ood_label
    return out, new_target, mask


class PastedAnomalyDataset(Sequence):
    """Wrap a dataset of sample dicts so every frame gets pasted anomalies (Fishyscapes-Static style).

    Sample ``i`` uses the seed derived from ``(seed, i)``, so the protocol is fixed by ``seed`` alone.

    Args:
        dataset: Indexable sized collection of dicts with ``"image"``, ``"target"`` (or ``None``) and ``"name"``.
        seed: Non-negative base seed.
        n_objects: Objects pasted per frame.
        **paste_kwargs: Passed to :func:`paste_anomalies` (``objects``, ``ground_labels``, ``horizon``, ...).

    Returns:
        Samples whose ``"image"`` and ``"target"`` are replaced, with a new bool ``"ood_mask"`` ``(H, W)`` and
        ``"name"`` suffixed ``"@anomaly"``.

    References:
        Blum et al., "The Fishyscapes Benchmark", IJCV 2021, arXiv:1904.03215.

    Example:
        >>> import numpy as np
        >>> ds = [{"image": np.zeros((48, 64, 3), np.uint8), "target": np.full((48, 64), 3), "name": "a"}]
        >>> s = PastedAnomalyDataset(ds, seed=0)[0]
        >>> s["name"], bool(s["ood_mask"].any())
        ('a@anomaly', True)
    """

    def __init__(self, dataset: Sequence[Mapping[str, Any]], seed: int = 0, n_objects: int = 1,
                 **paste_kwargs: Any) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        if isinstance(n_objects, bool) or not isinstance(n_objects, (int, np.integer)) or n_objects < 1:
            raise ValueError(f"`n_objects` must be an int >= 1, got {n_objects!r}")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"`dataset` must support len() and indexing, got {type(dataset).__name__}")
        self.dataset = dataset
        self.seed = int(seed)
        self.n_objects = int(n_objects)
        self.paste_kwargs = paste_kwargs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = normalize_index(index, len(self), type(self).__name__)
        sample = dict(self.dataset[index])
        frame_seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        image, target, ood = paste_anomalies(sample["image"], sample.get("target"), frame_seed, self.n_objects,
                                             **self.paste_kwargs)
        sample.update(image=image, target=target, ood_mask=ood, name=f"{sample.get('name', index)}@anomaly")
        return sample

    def __repr__(self) -> str:
        return f"PastedAnomalyDataset(n={len(self)}, seed={self.seed}, n_objects={self.n_objects})"
