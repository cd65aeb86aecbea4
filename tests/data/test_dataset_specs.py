"""Dataset specs: a user's folder (void 99, classes.txt, subsets.json) into a store; CamVid/synthetic specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segcal.data import (
    CorruptedDataset,
    SegmentationFolder,
    Subset,
    data_root,
    dataset_splits,
    load_dataset,
)
from segcal.engine.inference import predict, store_manifest
from segcal.models import wrap

CLASSES = ["road", "car", "tree", "sky", "person"]


def _write_split(root: Path, split: str, stems: list[str], *, labels: bool = True, void: int = 99,
                 size: tuple[int, int] = (6, 8), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    if labels:
        (root / split / "labels").mkdir(parents=True)
    out = {}
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / "images" / f"{stem}.png")
        lab = rng.integers(0, len(CLASSES), size).astype(np.uint8)
        lab[0, :2] = void
        if labels:
            Image.fromarray(lab, mode="L").save(root / split / "labels" / f"{stem}.png")
        out[stem] = lab.astype(np.int64)
    return out


@pytest.fixture
def user_data(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    _write_split(root, "val", ["a", "b", "c"], seed=1)
    _write_split(root, "test", ["d", "e", "f", "g"], seed=2)
    _write_split(root, "unlabelled", ["u1", "u2"], labels=False, seed=3)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    (root / "subsets.json").write_text(json.dumps({"test": {"night": ["d", "e"], "rain": ["g"]}}))
    return root


def test_folder_spec_reads_labels_as_is(user_data: Path) -> None:
    ds = load_dataset(str(user_data), "val", ignore_index=99)
    assert isinstance(ds, SegmentationFolder)
    assert ds.names == ["a", "b", "c"] and ds.split == "val" and ds.dataset_name == "mydata"
    assert ds.class_names == CLASSES and ds.num_classes == 5 and ds.ignore_index == 99
    s = ds[0]
    assert s["image"].dtype == np.uint8 and s["image"].shape == (6, 8, 3)
    assert s["target"].dtype == np.int64 and s["target"][0, 0] == 99  # no remapping of the user's void value
    assert ds.subsets() == {}
    test = load_dataset(user_data, "test", ignore_index=99)
    assert test.subsets() == {"night": ["d", "e"], "rain": ["g"]}
    assert dataset_splits(user_data) == ["val", "test", "unlabelled"]


def test_void_value_not_declared_is_refused_when_read(user_data: Path) -> None:
    ds = load_dataset(user_data, "val", ignore_index=None)  # every value must then be a class
    assert ds.ignore_index is None
    with pytest.raises(ValueError, match=r"values \[99\].*neither a class id.*ignore_index=None"):
        ds[0]
    with pytest.raises(ValueError, match=r"ignore_index=255"):
        load_dataset(user_data, "val")[0]


def test_ignore_index_none_when_every_value_is_a_class(tmp_path: Path) -> None:
    root = tmp_path / "novoid"
    labels = _write_split(root, "val", ["x"], void=4)
    (root / "classes.txt").write_text("\n".join(CLASSES))
    ds = load_dataset(root, "val", ignore_index=None)
    np.testing.assert_array_equal(ds[0]["target"], labels["x"])


def test_unlabelled_split(user_data: Path) -> None:
    ds = load_dataset(user_data, "unlabelled", ignore_index=99)
    assert [s["target"] for s in (ds[0], ds[1])] == [None, None] and ds.names == ["u1", "u2"]


def test_folder_errors(user_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither 'camvid', 'synthetic' nor an existing folder"):
        load_dataset(tmp_path / "nowhere", "val")
    with pytest.raises(FileNotFoundError, match=r"split 'train' not found.*splits found: \['val', 'test', 'unl"):
        load_dataset(user_data, "train")
    (user_data / "val" / "labels" / "b.png").unlink()
    (user_data / "val" / "labels" / "c.png").unlink()
    with pytest.raises(ValueError, match=r"2 image\(s\).*no label.*\['b', 'c'\]"):
        load_dataset(user_data, "val", ignore_index=99)
    Image.fromarray(np.zeros((5, 8), np.uint8), mode="L").save(user_data / "test" / "labels" / "d.png")
    with pytest.raises(ValueError, match=r"size 8x5 \(WxH\) but its image .* is 8x6"):
        load_dataset(user_data, "test", ignore_index=99)[0]
    (user_data / "subsets.json").write_text(json.dumps({"test": {"night": ["d", "zzz"]}}))
    with pytest.raises(ValueError, match=r"subset 'night' names 1 image\(s\) not in .*\['zzz'\]"):
        load_dataset(user_data, "test", ignore_index=99)
    (user_data / "subsets.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset(user_data, "test", ignore_index=99)
    (user_data / "subsets.json").unlink()
    (user_data / "classes.txt").write_text("road\n\ncar\n")
    with pytest.raises(ValueError, match=r"empty class name on line\(s\) \[2\]"):
        load_dataset(user_data, "test")
    (user_data / "classes.txt").write_text("road\nroad\n")
    with pytest.raises(ValueError, match="duplicate class names"):
        load_dataset(user_data, "test")
    with pytest.raises(TypeError, match="ignore_index"):
        load_dataset(user_data, "test", ignore_index="99")  # type: ignore[arg-type]


def _five_class_model() -> nn.Module:
    torch.manual_seed(0)
    return wrap(nn.Conv2d(3, 5, 1), preprocess="none", name="user5")


def test_folder_round_trip_into_store(user_data: Path, tmp_path: Path) -> None:
    model = _five_class_model()
    ds = load_dataset(user_data, "test", ignore_index=99)
    store = predict(model, ds, tmp_path / "store", progress=False)
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert m["ignore_index"] == 99 and m["class_names"] == CLASSES and m["num_classes"] == 5
    assert m["split"] == "test" and m["subsets"] == {"night": ["d", "e"], "rain": ["g"]}
    assert "mydata" in m["dataset"]
    assert store.ignore_index == 99 and store.class_names == CLASSES and store.num_classes == 5
    assert store.subsets == {"night": ["d", "e"], "rain": ["g"]}
    e = store.get("d")
    assert int(e.target[0, 0]) == 99 and torch.equal(e.target, torch.from_numpy(ds[0]["target"]))
    torch.testing.assert_close(e.logits.float(), model.predict_logits(ds[0]["image"]), atol=0.05, rtol=1e-3)


def test_store_records_none_and_zero_faithfully(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _write_split(root, "val", ["x"], void=4)
    model = _five_class_model()
    none = predict(model, load_dataset(root, "val", ignore_index=None), tmp_path / "none", progress=False)
    assert none.ignore_index is None
    assert json.loads((tmp_path / "none" / "manifest.json").read_text())["ignore_index"] is None
    zero = predict(model, load_dataset(root, "val", ignore_index=0), tmp_path / "zero", progress=False)
    assert zero.ignore_index == 0  # never `or 255`
    assert zero.class_names == [f"class_{i}" for i in range(5)]  # no classes.txt: the model's names


def test_class_names_priority_and_mismatch(user_data: Path) -> None:
    model = _five_class_model()
    model.class_names = list("ABCDE")
    ds = load_dataset(user_data, "val", ignore_index=99)
    assert store_manifest(model, ds)["class_names"] == CLASSES  # the dataset's names win
    (user_data / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match=r"num_classes=3 \(a, b, c\) but model 'user5' predicts C=5"):
        store_manifest(model, load_dataset(user_data, "val", ignore_index=99))
    # wrappers pass everything through
    corrupted = CorruptedDataset(ds, "gaussian_noise", 1)
    m = store_manifest(model, corrupted)
    assert m["class_names"] == CLASSES and m["ignore_index"] == 99 and m["split"] == "val"
    (user_data / "classes.txt").write_text("\n".join(CLASSES))
    sub = Subset(load_dataset(user_data, "test", ignore_index=99), [0, 3])
    assert store_manifest(model, sub)["subsets"] == {"night": ["d"], "rain": ["g"]}


def test_synthetic_spec() -> None:
    val = load_dataset("synthetic", "val", num_classes=5)
    train = load_dataset("synthetic", "train", num_classes=5)
    assert (len(train), len(val)) == (48, 24) and val.split == "val" and val.dataset_name == "synthetic"
    assert set(val.names).isdisjoint(train.names)
    assert val.class_names == [f"synthetic_{k}" for k in range(5)] and val.ignore_index == 255
    t = np.concatenate([val[i]["target"].ravel() for i in range(4)])
    assert set(np.unique(t)) <= {0, 1, 2, 3, 4, 255}
    no_void = load_dataset("synthetic", "test", num_classes=3, ignore_index=None)
    assert no_void.ignore_index is None and no_void[0]["target"].max() < 3
    assert dataset_splits("synthetic") == ["train", "val", "test"]
    with pytest.raises(ValueError, match="splits"):
        load_dataset("synthetic", "extra")


def test_camvid_spec_declares_classes_and_sequences(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "camvid"
    rng = np.random.default_rng(0)
    for split, stems in {"test": ["0001TP_008550", "Seq05VD_f00000", "Seq05VD_f00030"], "val": ["0016E5_07959"]
                         }.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(root / split / f"{stem}.png")
            lab = np.full((6, 8), 11, np.uint8)
            lab[0, 0] = 3
            Image.fromarray(lab, mode="L").save(root / f"{split}annot" / f"{stem}.png")
    monkeypatch.setenv("SEGCAL_DATA", str(tmp_path))
    test = load_dataset("camvid", "test", ignore_index=77)
    assert test.subsets() == {"0001TP (dusk)": ["0001TP_008550"],
                              "Seq05VD (unseen sequence)": ["Seq05VD_f00000", "Seq05VD_f00030"]}
    assert test[0]["target"][0, 1] == 77 and test[0]["target"][0, 0] == 3 and test.ignore_index == 77
    assert len(test.class_names) == 11 and test.split == "test"
    assert load_dataset("camvid", "val").subsets() == {}  # one sequence: no subset besides the split
    with pytest.raises(ValueError, match="not None"):
        load_dataset("camvid", "test", ignore_index=None)
    with pytest.raises(ValueError, match="is a CamVid class id"):
        load_dataset("camvid", "test", ignore_index=3)


def test_data_root_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGCAL_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("SEGCAL_DATA")
    monkeypatch.chdir(tmp_path)
    assert data_root() == (tmp_path / ".." / "shared" / "data").resolve()
    with pytest.raises(FileNotFoundError, match=r"camvid.*SEGCAL_DATA is not set"):
        load_dataset("camvid", "test")


def test_user_model_file_and_void99_folder_ece_matches_independent_numpy(user_data: Path, tmp_path: Path) -> None:
    """The issue-13 path from the Python side: usermodel.py:build (5 classes) + a void-99 folder -> store -> ECE."""
    from segcal.metrics import CalibrationMetrics
    from segcal.models import load

    f = tmp_path / "usermodel.py"
    f.write_text("import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(3)\n"
                 "    net = nn.Conv2d(3, 5, 1)\n    net.weight.data *= 0.02\n    return net\n")
    model = load(f"{f}:build", preprocess="none", device="cpu")
    ds = load_dataset(user_data, "test", ignore_index=99)
    store = predict(model, ds, tmp_path / "store", progress=False)
    metric = CalibrationMetrics(store.num_classes, n_bins=15, ignore_index=store.ignore_index)
    for b in store.batches(batch_size=2):
        metric.update(b["logits"], b["target"])
    got = float(metric.compute()["ece"])
    # independent: float64 numpy from the model's own logits on the images (store rounding to float16 aside)
    conf, correct = [], []
    for i in range(len(ds)):
        s = ds[i]
        logits = model.predict_logits(s["image"]).double().numpy()
        p = np.exp(logits - logits.max(0))
        p /= p.sum(0)
        valid = s["target"] != 99
        conf.append(p.max(0)[valid])
        correct.append((p.argmax(0) == s["target"])[valid])
    c, a = np.concatenate(conf), np.concatenate(correct)
    bins = np.clip(np.ceil(c * 15).astype(int) - 1, 0, 14)
    ref = sum(abs(a[bins == b].mean() - c[bins == b].mean()) * (bins == b).sum() for b in range(15)
              if (bins == b).any()) / len(c)
    assert ref > 0.05  # a non-trivial value
    assert got == pytest.approx(ref, abs=2e-3)
    assert len(c) == 4 * (6 * 8 - 2)  # void 99 pixels excluded, nothing else
