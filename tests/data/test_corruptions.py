"""Tests for segcal.data.corruptions: determinism, shapes, severity monotonicity, validation."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcal.data.corruptions import CORRUPTION_PARAMS, CORRUPTIONS, CorruptedDataset, corrupt

STOCHASTIC = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog", "darkness"}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    # Natural-image-like: smooth colour regions plus fine texture, mid-range values (no clipping at 0/255 hiding a
    # corruption). A strongly periodic pattern would alias under pixelate and break monotonicity for that reason.
    rng = np.random.default_rng(0)
    coarse = rng.integers(40, 216, (6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((72, 54), Image.Resampling.BICUBIC)).astype(int)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def test_names_and_params_consistent():
    assert set(CORRUPTIONS) == set(CORRUPTION_PARAMS)
    assert {"gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "fog", "brightness",
            "contrast", "jpeg_compression", "pixelate"} <= set(CORRUPTIONS)
    assert all(len(v) == 5 for v in CORRUPTION_PARAMS.values())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_input_untouched(image, name):
    before = image.copy()
    out = corrupt(image, name, 3, seed=0)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before)
    assert not np.array_equal(out, image)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_given_seed(image, name):
    a = corrupt(image, name, 4, seed=7)
    assert np.array_equal(a, corrupt(image, name, 4, seed=7))
    if name in STOCHASTIC:
        assert not np.array_equal(a, corrupt(image, name, 4, seed=8))
    else:
        assert np.array_equal(a, corrupt(image, name, 4, seed=8))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_monotone(image, name):
    errs = [_mse(corrupt(image, name, s, seed=0), image) for s in range(1, 6)]
    assert all(b > a for a, b in itertools.pairwise(errs)), errs
    assert errs[0] > 0


def test_odd_sizes_and_tiny_image():
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 3), (3, 17, 3), (33, 5, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        for name in CORRUPTIONS:
            assert corrupt(img, name, 5, seed=0).shape == shape


def test_known_values():
    grey = np.full((16, 16, 3), 100, np.uint8)
    # contrast of a constant image is the identity; brightness adds to HSV value exactly.
    assert np.array_equal(corrupt(grey, "contrast", 5), grey)
    assert np.all(corrupt(grey, "brightness", 1) == round(255 * (100 / 255 + 0.1)))
    assert np.array_equal(corrupt(grey, "defocus_blur", 5), grey)  # blur of a constant is a constant
    assert np.array_equal(corrupt(grey, "gaussian_blur", 5), grey)
    # impulse noise hits about the requested fraction of values, only with 0 or 255
    out = corrupt(np.full((64, 64, 3), 100, np.uint8), "impulse_noise", 5, seed=0)
    changed = out != 100
    assert abs(changed.mean() - 0.27) < 0.02
    assert set(np.unique(out[changed]).tolist()) <= {0, 255}
    # gaussian noise std matches the parameter (before clipping, mid-grey rarely clips at severity 1)
    out = corrupt(np.full((64, 64, 3), 128, np.uint8), "gaussian_noise", 1, seed=0).astype(float) / 255
    assert abs(out.std() - 0.08) < 0.005


def test_blur_spreads_an_impulse():
    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 20] = 255
    for name in ("defocus_blur", "gaussian_blur", "motion_blur"):
        out = corrupt(img, name, 2, seed=0)
        assert (out[..., 0] > 0).sum() > 9, name
        assert out[20, 20, 0] < 255, name


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((np.zeros((8, 8, 3), np.float32), "fog", 1), TypeError, "uint8"),
        (([[0]], "fog", 1), TypeError, "ndarray"),
        ((np.zeros((8, 8), np.uint8), "fog", 1), ValueError, r"\(H, W, 3\)"),
        ((np.zeros((8, 8, 4), np.uint8), "fog", 1), ValueError, r"\(H, W, 3\)"),
        ((np.zeros((8, 8, 3), np.uint8), "snowstorm", 1), ValueError, "name"),
        ((np.zeros((8, 8, 3), np.uint8), "fog", 0), ValueError, "severity"),
        ((np.zeros((8, 8, 3), np.uint8), "fog", 6), ValueError, "severity"),
        ((np.zeros((8, 8, 3), np.uint8), "fog", 2.0), TypeError, "severity"),
        ((np.zeros((8, 8, 3), np.uint8), "fog", True), TypeError, "severity"),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        corrupt(*args)


def test_bad_seed():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="seed"):
        corrupt(img, "fog", 1, seed="a")
    with pytest.raises(ValueError, match="seed"):
        corrupt(img, "fog", 1, seed=-1)


def _toy_dataset(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
             "target": rng.integers(0, 11, (20, 24)).astype(np.int64), "name": f"f{i}", "extra": i}
            for i in range(n)]


def test_corrupted_dataset():
    ds = _toy_dataset()
    cds = CorruptedDataset(ds, "gaussian_noise", 2, seed=3)
    assert len(cds) == 3
    s = cds[1]
    assert s["name"] == "f1@gaussian_noise-2" and s["extra"] == 1
    assert s["target"] is ds[1]["target"]  # labels unchanged
    assert s["image"].dtype == np.uint8 and s["image"].shape == ds[1]["image"].shape
    assert not np.array_equal(s["image"], ds[1]["image"])
    assert np.array_equal(s["image"], cds[1]["image"])
    assert np.array_equal(cds[-1]["image"], cds[2]["image"])
    # different frames get different noise fields, and the wrapped dataset is left unmodified
    d0 = cds[0]["image"].astype(int) - ds[0]["image"]
    d1 = cds[1]["image"].astype(int) - ds[1]["image"]
    assert not np.array_equal(d0, d1)
    assert ds[1]["name"] == "f1"
    with pytest.raises(IndexError):
        cds[3]


def test_corrupted_dataset_bad_args():
    with pytest.raises(ValueError, match="name"):
        CorruptedDataset(_toy_dataset(), "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        CorruptedDataset(_toy_dataset(), "fog", 9)
    with pytest.raises(ValueError, match="seed"):
        CorruptedDataset(_toy_dataset(), "fog", 1, seed=-2)
    with pytest.raises(TypeError, match="dataset"):
        CorruptedDataset(object(), "fog", 1)


def _camvid_frame() -> tuple[np.ndarray, np.ndarray] | None:
    root = Path(os.environ.get("SEGCAL_DATA", "")) / "camvid"
    files = sorted((root / "test").glob("*.png")) if os.environ.get("SEGCAL_DATA") else []
    if not files:
        return None
    img = np.asarray(Image.open(files[0]).convert("RGB"))
    lab = np.asarray(Image.open(root / "testannot" / files[0].name)).astype(np.int64)
    return img, lab


@pytest.mark.realdata
def test_camvid_frame_all_corruptions():
    frame = _camvid_frame()
    if frame is None:
        pytest.skip("CamVid not found under $SEGCAL_DATA")
    img, lab = frame
    for name in CORRUPTIONS:
        errs = [_mse(corrupt(img, name, s, seed=0), img) for s in (1, 3, 5)]
        assert errs[0] < errs[1] < errs[2], (name, errs)
    s = CorruptedDataset([{"image": img, "target": lab, "name": "x"}], "fog", 3)[0]
    assert s["image"].shape == img.shape and np.array_equal(s["target"], lab)
