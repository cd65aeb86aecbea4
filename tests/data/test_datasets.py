"""Datasets: sample format, void -> 255, sequences, folder matching, synthetic determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segcal.data import CAMVID_CLASSES, CamVid, SegmentationFolder, SyntheticSegmentation, colorize, sequence_of


def _check_sample(s, labelled=True):
    assert set(s) == {"image", "target", "name"}
    img = s["image"]
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    if labelled:
        t = s["target"]
        assert isinstance(t, np.ndarray) and t.dtype == np.int64 and t.shape == img.shape[:2]
    else:
        assert s["target"] is None
    assert isinstance(s["name"], str)


@pytest.fixture
def fake_camvid(tmp_path):
    """A 3-frame CamVid-layout folder whose labels use the void id 11."""
    rng = np.random.default_rng(0)
    names = {"val": ["0016E5_07959", "0016E5_07961"], "test": ["0001TP_008550", "Seq05VD_f00000"]}
    for split, stems in names.items():
        (tmp_path / split).mkdir()
        (tmp_path / f"{split}annot").mkdir()
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(tmp_path / split / f"{stem}.png")
            lab = rng.integers(0, 12, (6, 8)).astype(np.uint8)
            lab[0, 0] = 11
            Image.fromarray(lab, mode="L").save(tmp_path / f"{split}annot" / f"{stem}.png")
    return tmp_path


def test_camvid_fixture_format_and_void(fake_camvid):
    ds = CamVid(fake_camvid, split="test")
    assert ds.names == ["0001TP_008550", "Seq05VD_f00000"] and len(ds) == 2
    assert ds.num_classes == 11 and ds.ignore_index == 255 and ds.class_names == list(CAMVID_CLASSES)
    s = ds[1]
    _check_sample(s)
    raw = np.asarray(Image.open(fake_camvid / "testannot" / "Seq05VD_f00000.png")).astype(np.int64)
    assert s["target"][0, 0] == 255
    np.testing.assert_array_equal(s["target"], np.where(raw == 11, 255, raw))
    np.testing.assert_array_equal(s["image"], np.asarray(Image.open(fake_camvid / "test" / "Seq05VD_f00000.png")))
    assert ds[-1]["name"] == s["name"]
    with pytest.raises(IndexError):
        ds[2]


def test_camvid_sequences_filter(fake_camvid):
    ds = CamVid(fake_camvid, split="test", sequences=["Seq05VD"])
    assert ds.names == ["Seq05VD_f00000"]
    with pytest.raises(ValueError, match="not in split"):
        CamVid(fake_camvid, split="test", sequences=["0016E5"])


def test_sequence_of():
    assert sequence_of("0001TP_008550") == "0001TP"
    assert sequence_of("Seq05VD_f00000") == "Seq05VD"
    assert CamVid.sequence_of("0006R0_f02340") == "0006R0"
    with pytest.raises(ValueError, match="name"):
        sequence_of("nounderscore")


def test_camvid_errors(tmp_path, monkeypatch, fake_camvid):
    monkeypatch.delenv("SEGCAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the default data root ../shared/data does not exist from here
    with pytest.raises(FileNotFoundError, match="SEGCAL_DATA is not set"):
        CamVid()
    monkeypatch.setenv("SEGCAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CamVid()
    with pytest.raises(ValueError, match="split"):
        CamVid(fake_camvid, split="validation")
    with pytest.raises(FileNotFoundError, match="train"):
        CamVid(fake_camvid, split="train")


def test_colorize_void_black():
    t = np.array([[0, 3], [255, 10]])
    rgb = colorize(t)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 1].tolist() == [128, 64, 128] and rgb[1, 0].tolist() == [0, 0, 0]


@pytest.mark.realdata
def test_camvid_real_val():
    ds = CamVid(split="val")
    assert len(ds) == 101
    s = ds[0]
    _check_sample(s)
    assert s["image"].shape == (360, 480, 3)
    vals = np.unique(s["target"])
    assert 11 not in vals and set(vals.tolist()) <= set(range(11)) | {255}
    assert {ds.sequence_of(n) for n in ds.names} == {"0016E5"}
    test = CamVid(split="test")
    assert len(test) == 233 and len(CamVid(split="test", sequences=["Seq05VD"])) == 171
    assert len(CamVid(split="trainval")) == 367 + 101


def test_folder_labelled_and_unlabelled(tmp_path):
    imgs, labs = tmp_path / "img", tmp_path / "lab"
    imgs.mkdir()
    labs.mkdir()
    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(imgs / "b.jpg")
    Image.fromarray(np.full((4, 5), 9, np.uint8)).convert("RGB").save(imgs / "a.png")
    Image.fromarray(np.array([[0, 1, 2, 255, 1]] * 4, np.uint8)).save(labs / "a.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(labs / "b.png")
    ds = SegmentationFolder(imgs, labs, class_names=["x", "y", "z"])
    assert ds.names == ["a", "b"] and ds.num_classes == 3
    s = ds[0]
    _check_sample(s)
    assert s["target"][0].tolist() == [0, 1, 2, 255, 1]
    unl = SegmentationFolder(imgs)
    _check_sample(unl[1], labelled=False)
    assert unl.num_classes is None


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images"):
        SegmentationFolder(tmp_path / "missing")
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(tmp_path / "img")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "lab").mkdir()
    with pytest.raises(ValueError, match="no label"):
        SegmentationFolder(tmp_path / "img", tmp_path / "lab")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "lab" / "a.png")
    with pytest.raises(ValueError, match="single-channel"):
        SegmentationFolder(tmp_path / "img", tmp_path / "lab")[0]


def test_synthetic_format_determinism_and_learnability():
    ds = SyntheticSegmentation(5, size=(24, 32), num_classes=3, seed=1)
    s = ds[2]
    _check_sample(s)
    assert s["name"] == "synthetic_00002" and ds.num_classes == 3 and len(ds.class_names) == 3
    again = SyntheticSegmentation(5, size=(24, 32), num_classes=3, seed=1)[2]
    np.testing.assert_array_equal(s["image"], again["image"])
    np.testing.assert_array_equal(s["target"], again["target"])
    other = SyntheticSegmentation(5, size=(24, 32), num_classes=3, seed=2)[2]
    assert not np.array_equal(s["image"], other["image"])
    assert set(np.unique(s["target"]).tolist()) <= {0, 1, 2}
    # Colour carries the class: the nearest class colour recovers most labels (learnable, but noisy).
    imgs = np.stack([ds[i]["image"] for i in range(5)]).astype(float)
    tgts = np.stack([ds[i]["target"] for i in range(5)])
    d = ((imgs[..., None, :] - ds.palette[None, None, None].astype(float)) ** 2).sum(-1)
    acc = (d.argmin(-1) == tgts).mean()
    assert 0.6 < acc < 1.0


def test_synthetic_void_and_errors():
    ds = SyntheticSegmentation(4, size=(16, 16), num_classes=2, seed=0, void_fraction=0.5, blobs=6)
    assert any((ds[i]["target"] == 255).any() for i in range(4))
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSegmentation(2, num_classes=1)
    with pytest.raises(ValueError, match="size"):
        SyntheticSegmentation(2, size=(0, 4))
