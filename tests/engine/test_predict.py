"""engine.predict: store contents, resume, sizes, errors, two-rank gloo run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from engine_toys import ToyDataset, ToySegmenter

from segcal.data import LogitsStore
from segcal.data.store import StoreMismatchError
from segcal.engine import predict


def test_store_matches_model_output_with_mixed_sizes(tmp_path):
    seg, data = ToySegmenter(), ToyDataset(n=5, sizes=((12, 16), (8, 8)))
    store = predict(seg, data, tmp_path, batch_size=4, features=True, progress=False)
    assert store.names == data.names
    assert store.manifest["model"] == "toy" and store.manifest["dataset"] == "toyset"
    assert store.manifest["split"] == "val" and store.class_names == seg.class_names
    for i, (name, logits, target) in enumerate(store):
        s = data[i]
        ref, feats = seg.predict_batch(s["image"][None], features=True)
        assert name == s["name"] and logits.shape == (3, *s["image"].shape[:2])
        assert torch.equal(logits, ref[0].half())
        assert torch.equal(target, torch.as_tensor(s["target"]))
        assert torch.equal(store.get(name).features, feats[0].half())
    # a batch never mixes sizes
    assert {b["logits"].shape[2:] for b in store.batches(8)} == {(12, 16), (8, 8)}


def test_unlabelled_dataset(tmp_path):
    store = predict(ToySegmenter(), ToyDataset(n=2, labelled=False), tmp_path, progress=False)
    assert [t for _, _, t in store] == [None, None]
    assert next(iter(store.batches(4)))["target"] is None


class Killed(RuntimeError):
    pass


def test_resume_after_kill_skips_finished_entries(tmp_path):
    data = ToyDataset(n=6)
    seg = ToySegmenter()
    orig = seg.predict_batch

    def dying(images, features=False):
        if seg.calls == 2:
            raise Killed("simulated kill")
        return orig(images, features)

    seg.predict_batch = dying
    with pytest.raises(Killed):
        predict(seg, data, tmp_path, batch_size=2, progress=False)
    partial = LogitsStore(tmp_path)
    assert partial.names == data.names[:4]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "entries").iterdir()}

    seg2, data2 = ToySegmenter(), ToyDataset(n=6)
    store = predict(seg2, data2, tmp_path, batch_size=2, progress=False)
    assert seg2.calls == 1 and data2.loads == 2  # only the unfinished pair was loaded and run
    assert store.names == data.names
    for name, t in mtimes.items():
        assert (tmp_path / "entries" / name).stat().st_mtime_ns == t
    full = predict(ToySegmenter(), ToyDataset(n=6), tmp_path / "ref", batch_size=3, progress=False)
    assert store.manifest["checksums"] == full.manifest["checksums"]


def test_corrupt_entry_is_recomputed_on_resume(tmp_path):
    predict(ToySegmenter(), ToyDataset(n=3), tmp_path, progress=False)
    f = tmp_path / "entries" / "s001.npz"
    f.write_bytes(f.read_bytes()[:100])
    seg = ToySegmenter()
    with pytest.warns(RuntimeWarning, match="s001"):
        store = predict(seg, ToyDataset(n=3), tmp_path, progress=False)
    assert seg.calls == 1 and store.verify_entries() == []


def test_other_model_refused(tmp_path):
    predict(ToySegmenter(), ToyDataset(n=2), tmp_path, progress=False)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        predict(ToySegmenter(seed=1), ToyDataset(n=2), tmp_path, progress=False)
    with pytest.raises(StoreMismatchError, match="split"):
        predict(ToySegmenter(), ToyDataset(n=2, split="test"), tmp_path, progress=False)


def test_nan_output_names_the_image(tmp_path):
    seg = ToySegmenter()
    orig = seg.predict_batch

    def nan_on_second(images, features=False):
        out = orig(images, features)
        out[1, 0, 2, 2] = float("inf")
        return out

    seg.predict_batch = nan_on_second
    with pytest.raises(ValueError, match=r"'s001'.*NaN or inf"):
        predict(seg, ToyDataset(n=2), tmp_path, batch_size=2, progress=False)


def test_disk_full_message_and_resume(tmp_path, monkeypatch):
    import segcal.data.store as store_mod

    real = store_mod._atomic_write_bytes
    count = {"n": 0}

    def flaky(path, data):
        count["n"] += 1
        if count["n"] == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_mod, "_atomic_write_bytes", flaky)
    with pytest.raises(OSError, match=r"'s002'.*disk full"):
        predict(ToySegmenter(), ToyDataset(n=4), tmp_path, batch_size=4, progress=False)
    monkeypatch.undo()
    assert LogitsStore(tmp_path).names == ["s000", "s001"]
    assert predict(ToySegmenter(), ToyDataset(n=4), tmp_path, progress=False).verify_entries() == []


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="predict_batch"):
        predict(torch.nn.Conv2d(3, 3, 1), ToyDataset(), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        predict(ToySegmenter(), [], tmp_path)
    with pytest.raises(ValueError, match="num_classes=4"):
        predict(ToySegmenter(), ToyDataset(num_classes=4), tmp_path)
    with pytest.raises(ValueError, match="rank"):
        predict(ToySegmenter(), ToyDataset(), tmp_path, rank=2, world_size=2)
    bad = [{"image": np.zeros((4, 4), np.uint8), "target": None, "name": "gray"}]
    with pytest.raises(ValueError, match=r"'gray'.*uint8"):
        predict(ToySegmenter(), bad, tmp_path / "g", progress=False)


def _rank_main(rank, world, path, pg_file):
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        store = predict(ToySegmenter(), ToyDataset(n=7, sizes=((12, 16), (8, 8))), path, batch_size=2,
                        features=True, progress=False)
        assert len(store) == 7
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_store_equals_single_process(tmp_path):
    tmp_mp.spawn(_rank_main, args=(2, str(tmp_path / "dist"), str(tmp_path / "pg")), nprocs=2, join=True)
    two = LogitsStore(tmp_path / "dist")
    one = predict(ToySegmenter(), ToyDataset(n=7, sizes=((12, 16), (8, 8))), tmp_path / "one", features=True,
                  progress=False)
    assert two.names == one.names
    assert two.manifest["checksums"] == one.manifest["checksums"]
    assert not os.listdir(tmp_path / "dist" / "shards")  # rank 0 consolidated after the barrier
    for (n1, l1, t1), (n2, l2, t2) in zip(one, two):
        assert n1 == n2 and torch.equal(l1, l2) and torch.equal(t1, t2)
