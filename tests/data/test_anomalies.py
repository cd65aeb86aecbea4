"""Tests for segcal.data.anomalies: cut-outs, pasting, label consistency, determinism, validation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")

from segcal.data.anomalies import (
    ANOMALY_SOURCES,
    OOD_LABEL,
    PastedAnomalyDataset,
    anomaly_object,
    anomaly_objects,
    paste_anomalies,
)


def _frame(h: int = 90, w: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    target = np.zeros((h, w), np.int64)  # sky
    target[h // 2 :] = 3  # road in the lower half
    target[h // 2 :, : w // 4] = 4  # pavement on the left
    target[-3:, -10:] = 255  # some void
    return image, target


@pytest.mark.parametrize("name", anomaly_objects())
def test_cutouts_nontrivial(name):
    rgb, mask = anomaly_object(name)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert mask.dtype == bool and mask.shape == rgb.shape[:2]
    assert min(mask.shape) >= 20
    # cropped to the bounding box: every border row/column touches the object
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    assert 0.3 < mask.mean() < 0.95
    assert name in ANOMALY_SOURCES and ANOMALY_SOURCES[name]["license"]


def test_cutouts_are_not_background():
    # Object pixels differ in colour from the discarded background of their source photo.
    rgb, mask = anomaly_object("rocket")  # white rocket vs blue sky
    inside, outside = rgb[mask].astype(float), rgb[~mask].astype(float)
    assert (inside[:, 0] - inside[:, 2]).mean() > (outside[:, 0] - outside[:, 2]).mean() + 10
    rgb, mask = anomaly_object("coffee")  # red saucer vs brown wood: saucer is redder relative to green
    inside, outside = rgb[mask].astype(float), rgb[~mask].astype(float)
    ratio_in = (inside[:, 0] / (inside[:, 1] + 1)).mean()
    assert ratio_in > (outside[:, 0] / (outside[:, 1] + 1)).mean()


def test_object_is_read_only_and_cached():
    rgb, mask = anomaly_object("cat")
    assert not rgb.flags.writeable and not mask.flags.writeable
    assert anomaly_object("cat")[0] is rgb


@pytest.mark.parametrize("seed", range(6))
def test_paste_consistency(seed):
    image, target = _frame()
    before_img, before_tgt = image.copy(), target.copy()
    out, tgt, ood = paste_anomalies(image, target, seed=seed, n_objects=2)
    assert np.array_equal(image, before_img) and np.array_equal(target, before_tgt)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert tgt.shape == target.shape and tgt.dtype == np.int64
    assert ood.shape == target.shape and ood.dtype == bool
    assert ood.any()
    assert np.array_equal(tgt == OOD_LABEL, ood)
    assert np.array_equal(tgt[~ood], target[~ood])
    assert np.array_equal(out[~ood], image[~ood])
    # objects stand below the horizon: their lowest row is in the lower part of the frame
    rows = np.nonzero(ood.any(1))[0]
    assert rows[-1] >= int(0.45 * image.shape[0])


def test_objects_on_ground_labels():
    image, target = _frame(180, 240)
    hits = 0
    for seed in range(20):
        _, _, ood = paste_anomalies(image, target, seed=seed, objects=["coffee"])
        rows, cols = np.nonzero(ood)
        # the bottom row of the object sits on road/pavement (or the frame bottom it was clamped to)
        bottom = rows.max()
        foot_labels = target[bottom, cols[rows == bottom]]
        hits += np.isin(foot_labels, (3, 4)).all()
    assert hits >= 18


def test_perspective_scale():
    # Same object lower in the frame (closer) is taller on average.
    image = np.zeros((200, 300, 3), np.uint8)
    near, far = np.full((200, 300), 255, np.int64), np.full((200, 300), 255, np.int64)
    near[185:, :] = 3
    far[100:110, :] = 3
    def height(t, seed):
        return np.nonzero(paste_anomalies(image, t, seed, objects=["horse"], scale_jitter=0.0)[2].any(1))[0].size
    assert np.mean([height(near, s) for s in range(5)]) > 3 * np.mean([height(far, s) for s in range(5)])


def test_determinism_and_seed_effect():
    image, target = _frame()
    a = paste_anomalies(image, target, seed=5, n_objects=3)
    b = paste_anomalies(image, target, seed=5, n_objects=3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    differs = [not np.array_equal(a[2], paste_anomalies(image, target, seed=s, n_objects=3)[2]) for s in range(6, 9)]
    assert all(differs)


def test_no_target_and_small_frames():
    for h, w in [(8, 8), (20, 300), (300, 20)]:
        image = np.full((h, w, 3), 50, np.uint8)
        out, tgt, ood = paste_anomalies(image, None, seed=0, n_objects=2)
        assert tgt is None and ood.any() and out.shape == image.shape
        assert np.array_equal(out[~ood], image[~ood])


def test_custom_ood_label_and_ground_none():
    image, target = _frame()
    _, tgt, ood = paste_anomalies(image, target, seed=1, ood_label=200, ground_labels=None)
    assert np.array_equal(tgt == 200, ood)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"image": np.zeros((20, 20, 3), np.float32)}, TypeError, "uint8"),
        ({"image": np.zeros((20, 20), np.uint8)}, ValueError, "image"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "target": None}, ValueError, "8x8"),
        ({"target": np.zeros((21, 20), np.int64)}, ValueError, "target"),
        ({"target": np.zeros((20, 20), np.float32)}, TypeError, "target"),
        ({"seed": -1}, ValueError, "seed"),
        ({"n_objects": 0}, ValueError, "n_objects"),
        ({"objects": ["unicorn"]}, ValueError, "objects"),
        ({"objects": []}, ValueError, "objects"),
        ({"horizon": 1.0}, ValueError, "horizon"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"image": np.zeros((20, 20, 3), np.uint8), "target": np.zeros((20, 20), np.int64), "seed": 0}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        paste_anomalies(**args)


def test_unknown_object_name():
    with pytest.raises(ValueError, match="name"):
        anomaly_object("unicorn")


def test_dataset_wrapper():
    image, target = _frame()
    ds = [{"image": image, "target": target, "name": f"f{i}"} for i in range(3)]
    pds = PastedAnomalyDataset(ds, seed=1, n_objects=2)
    assert len(pds) == 3
    s = pds[0]
    assert s["name"] == "f0@anomaly"
    assert np.array_equal(s["target"] == OOD_LABEL, s["ood_mask"])
    assert np.array_equal(s["ood_mask"], pds[0]["ood_mask"])
    # same frame content at different indices gets different placements
    assert not np.array_equal(pds[0]["ood_mask"], pds[1]["ood_mask"])
    assert "ood_mask" not in ds[0]
    with pytest.raises(IndexError):
        pds[3]
    with pytest.raises(ValueError, match="n_objects"):
        PastedAnomalyDataset(ds, n_objects=0)


@pytest.mark.realdata
def test_camvid_frame():
    if not os.environ.get("SEGCAL_DATA"):
        pytest.skip("SEGCAL_DATA not set")
    root = Path(os.environ["SEGCAL_DATA"]) / "camvid"
    files = sorted((root / "test").glob("*.png"))
    if not files:
        pytest.skip("CamVid not found under $SEGCAL_DATA")
    from PIL import Image

    image = np.asarray(Image.open(files[0]).convert("RGB"))
    target = np.asarray(Image.open(root / "testannot" / files[0].name)).astype(np.int64)
    target[target == 11] = 255
    _out, tgt, ood = paste_anomalies(image, target, seed=0, n_objects=2)
    frac = ood.mean()
    assert 0.002 < frac < 0.3
    rows, _cols = np.nonzero(ood)
    assert rows.max() > image.shape[0] * 0.5
    assert np.array_equal(tgt[~ood], target[~ood])
