"""LogitsStore: round trip, manifest, corruption, identity checks, journals, batching."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from segcal.data import LogitsStore
from segcal.data.store import CorruptEntryError, StoreMismatchError

HEADER = {"model": "toy", "model_fingerprint": "abc", "dataset": "synthetic", "split": "val", "num_classes": 5,
          "class_names": list("abcde")}


def _fill(path, n=4, shapes=((6, 8),), features=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = LogitsStore.create(path, {**HEADER, "features": features})
    data = {}
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        logits = torch.randn(5, h, w, generator=g) * 7
        target = torch.randint(0, 5, (h, w), generator=g)
        target[0, :3] = 255
        feats = torch.randn(3, h // 2, w // 2, generator=g) if features else None
        store.write(f"img{i}", logits, target, feats)
        data[f"img{i}"] = (logits, target, feats)
    return store, data


def test_round_trip_float16_labels_exact_and_manifest(tmp_path):
    store, data = _fill(tmp_path / "s", n=3, features=True)
    store.finalize()
    s = LogitsStore(tmp_path / "s")
    assert len(s) == 3 and s.names == ["img0", "img1", "img2"] and s.num_classes == 5 and s.has_features
    for name, logits, target in s:
        ref_l, ref_t, _ = data[name]
        assert logits.dtype == torch.float16 and target.dtype == torch.int64
        assert torch.equal(logits, ref_l.half())
        assert torch.allclose(logits.float(), ref_l, rtol=1e-3, atol=1e-3)
        assert torch.equal(target, ref_t)
    e = s.get("img1")
    assert e.features.dtype == torch.float16 and torch.equal(e.features, data["img1"][2].half())
    m = s.manifest
    assert m["model"] == "toy" and m["dataset"] == "synthetic" and m["split"] == "val"
    assert m["class_names"] == list("abcde") and m["shapes"]["img0"] == [5, 6, 8]
    assert len(m["checksums"]) == 3 and all(len(c) == 64 for c in m["checksums"].values())
    # consolidated: journals folded into the manifest file itself
    assert not list((tmp_path / "s" / "shards").glob("*.jsonl"))
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert set(on_disk["entries"]) == {"img0", "img1", "img2"}


def test_readable_before_finalize_and_unlabelled(tmp_path):
    store = LogitsStore.create(tmp_path, HEADER)
    store.write("a/b c", torch.zeros(5, 2, 2))  # name needing a safe file name
    s = LogitsStore(tmp_path)
    (name, logits, target), = list(s)
    assert name == "a/b c" and target is None and logits.shape == (5, 2, 2)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_entry_names_the_entry(tmp_path, damage):
    _fill(tmp_path, n=2)
    f = tmp_path / "entries" / "img1.npz"
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        f.write_bytes(raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:]))
    else:
        f.unlink()
    s = LogitsStore(tmp_path)
    s.get("img0")
    with pytest.raises(CorruptEntryError, match="img1"):
        list(s)
    assert s.verify_entries() == ["img1"]


def test_different_model_or_split_refused(tmp_path):
    _fill(tmp_path, n=1)
    with pytest.raises(StoreMismatchError, match=r"model.*'other'"):
        LogitsStore.create(tmp_path, {**HEADER, "model": "other"})
    with pytest.raises(StoreMismatchError, match="split"):
        LogitsStore.create(tmp_path, {**HEADER, "split": "test"})
    with pytest.raises(StoreMismatchError, match="features"):
        LogitsStore.create(tmp_path, {**HEADER, "features": True})
    # same identity resumes and sees the finished entry
    assert "img0" in LogitsStore.create(tmp_path, HEADER)


def test_bad_writes_raise_clear_errors(tmp_path):
    store = LogitsStore.create(tmp_path, HEADER)
    bad = torch.zeros(5, 3, 3)
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'street_07'.*NaN"):
        store.write("street_07", bad)
    with pytest.raises(ValueError, match="float16"):
        store.write("huge", torch.full((5, 2, 2), 1e6))
    with pytest.raises(ValueError, match="C=5"):
        store.write("x", torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        store.write("x", torch.zeros(5, 2, 2), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        store.write("x", torch.zeros(5, 2, 2), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="read-only"):
        LogitsStore(tmp_path).write("x", torch.zeros(5, 2, 2))
    with pytest.raises(FileNotFoundError, match="no logits store"):
        LogitsStore(tmp_path / "nope")
    assert len(LogitsStore(tmp_path)) == 0 and not list((tmp_path / "entries").iterdir())


def test_disk_full_leaves_no_partial_entry(tmp_path, monkeypatch):
    store, _ = _fill(tmp_path, n=2)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 3])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr("segcal.data.store.os.fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=r"entry 'img9'.*disk full"):
        store.write("img9", torch.zeros(5, 6, 8))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "entries").iterdir()) == ["img0.npz", "img1.npz"]
    s = LogitsStore(tmp_path)
    assert s.names == ["img0", "img1"] and s.verify_entries() == []


def test_torn_journal_line_is_ignored_and_not_glued(tmp_path):
    _fill(tmp_path, n=2)
    journal = next((tmp_path / "shards").glob("*.jsonl"))
    with open(journal, "ab") as f:
        f.write(b'{"name": "img2", "fi')  # writer killed mid-line
    s = LogitsStore.create(tmp_path, HEADER)
    assert s.names == ["img0", "img1"]
    s.write("img3", torch.zeros(5, 6, 8))
    assert LogitsStore(tmp_path).names == ["img0", "img1", "img3"]


def test_batches_group_by_size_and_stream(tmp_path, monkeypatch):
    _, data = _fill(tmp_path, n=7, shapes=((6, 8), (4, 4)), features=True)
    loads = []
    real_get = LogitsStore.get
    monkeypatch.setattr(LogitsStore, "get", lambda self, n: loads.append(n) or real_get(self, n))
    s = LogitsStore(tmp_path)
    it = s.batches(batch_size=3, features=True)
    first = next(it)
    assert len(loads) == 3  # lazily: only the first batch has been read
    batches = [first, *it]
    assert [b["names"] for b in batches] == [["img0", "img2", "img4"], ["img1", "img3", "img5"], ["img6"]]
    for b in batches:
        assert b["logits"].dtype == torch.float32 and b["target"].dtype == torch.int64
        assert b["logits"].shape[0] == b["target"].shape[0] == b["features"].shape[0] == len(b["names"])
        for k, n in enumerate(b["names"]):
            assert torch.equal(b["target"][k], data[n][1])
    sub = list(s.batches(batch_size=8, dtype=torch.float64, names=["img3", "img1"]))
    assert [b["names"] for b in sub] == [["img3", "img1"]] and sub[0]["logits"].dtype == torch.float64
    assert "features" not in sub[0]
    with pytest.raises(KeyError, match="zzz"):
        list(s.batches(names=["zzz"]))


def test_batches_without_features_errors(tmp_path):
    _fill(tmp_path, n=1)
    with pytest.raises(ValueError, match="no decoder features"):
        list(LogitsStore(tmp_path).batches(features=True))


def _writer(path, rank, world, n):
    store = LogitsStore.create(path, HEADER, rank=rank)
    for i in range(rank, n, world):
        store.write(f"img{i}", torch.full((5, 2, 3), float(i)), torch.full((2, 3), i % 5))


def test_concurrent_ranks_without_process_group(tmp_path):
    """Two OS processes create + write one store at the same time; journals merge on open, then finalize."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), r, 2, 9)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    s = LogitsStore(tmp_path)
    assert sorted(s.names) == sorted(f"img{i}" for i in range(9))
    s.finalize()
    s = LogitsStore(tmp_path)
    assert len(s) == 9 and all(float(lg[0, 0, 0]) == int(n[3:]) for n, lg, _ in s)
    assert np.all([t is not None for _, _, t in s])
