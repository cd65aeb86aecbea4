"""LogitsStore under hostile or damaged input: confined paths, bad manifests, orphans, permissions, old manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from segcal import _io
from segcal.data import LogitsStore
from segcal.data.store import CorruptEntryError, StoreMismatchError
from segcal.engine.inference import predict

HEADER = {"model": "toy", "model_fingerprint": "abc", "dataset": "d", "split": "val", "num_classes": 3,
          "class_names": ["a", "b", "c"]}


def _store(path: Path, n: int = 2, finalize: bool = True) -> LogitsStore:
    s = LogitsStore.create(path, HEADER)
    for i in range(n):
        s.write(f"im{i}", torch.randn(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))
    if finalize:
        s.finalize()
    return s


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("where", ["manifest", "journal"])
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "subdir_escape"])
def test_entry_paths_outside_the_store_are_refused_and_never_deleted(tmp_path: Path, where: str, kind: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store_dir = tmp_path / "store"
    bad = {"absolute": str(victim), "dotdot": "../../victim.txt", "subdir_escape": "x/../../../victim.txt"}[kind]
    if where == "manifest":
        _store(store_dir)
        _edit_manifest(store_dir, lambda m: m["entries"]["im0"].update(file=bad))
    else:
        _store(store_dir, finalize=False)
        journal = next((store_dir / "shards").glob("*.jsonl"))
        recs = [json.loads(ln) for ln in journal.read_text().splitlines()]
        recs[0]["file"] = bad
        journal.write_text("".join(json.dumps(r) + "\n" for r in recs))
    store = LogitsStore(store_dir)
    with pytest.raises(CorruptEntryError, match="refused"):
        store.get("im0")
    assert store.verify_entries() == ["im0"]
    with pytest.warns(RuntimeWarning, match="no file is deleted"):
        store.discard("im0")
    assert victim.read_text() == "precious"


def test_resuming_predict_on_a_tampered_store_deletes_nothing(tmp_path: Path) -> None:
    import numpy as np

    class Toy(torch.nn.Module):
        name, num_classes, class_names = "toy", 3, ["a", "b", "c"]

        def predict_batch(self, images, features=False):
            x = torch.as_tensor(images).float().mean(-1)
            return torch.stack([x, -x, x * 0], 1)

    class Data(list):
        names = ("im0", "im1", "im2")

    data = Data({"image": np.full((4, 5, 3), i, np.uint8), "target": None, "name": f"im{i}"} for i in range(3))
    predict(Toy(), data, tmp_path / "s", progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    _edit_manifest(tmp_path / "s", lambda m: m["entries"]["im1"].update(file=str(victim)))
    with pytest.warns(RuntimeWarning):
        store = predict(Toy(), data, tmp_path / "s", progress=False)
    assert victim.read_text() == "precious"
    assert store.verify_entries() == [] and store.names == ["im0", "im1", "im2"]


def test_symlinked_entries_folder_is_refused(tmp_path: Path) -> None:
    _store(tmp_path / "s")
    outside = tmp_path / "outside"
    (tmp_path / "s" / "entries").rename(outside)
    (tmp_path / "s" / "entries").symlink_to(outside)
    with pytest.raises(CorruptEntryError, match="outside the store"):
        LogitsStore(tmp_path / "s").get("im0")


@pytest.mark.parametrize("content", ["[1, 2]", '"x"', "null", "{\"format\": \"segcal-logits-store\", \"num_classes\""
                                     ": \"3\"}", "\xff\xfe"])
def test_manifest_that_is_not_an_object_is_one_line_error(tmp_path: Path, content: str) -> None:
    _store(tmp_path)
    (tmp_path / "manifest.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CorruptEntryError) as info:
        LogitsStore(tmp_path)
    assert "\n" not in str(info.value)


def test_malformed_records_are_ignored(tmp_path: Path) -> None:
    _store(tmp_path, n=3)
    _edit_manifest(tmp_path, lambda m: m["entries"]["im1"].pop("sha256"))
    with pytest.warns(RuntimeWarning, match="malformed manifest entries"):
        s = LogitsStore(tmp_path)
    assert s.names == ["im0", "im2"]


def test_orphan_temp_files_of_killed_writers_are_cleaned_on_open(tmp_path: Path) -> None:
    _store(tmp_path)
    dead = f"{_io._HOST}-{2**22 + 4321}"
    orphans = [tmp_path / f".manifest.json.{dead}-a1.tmp", tmp_path / "entries" / f".im9.npz.{dead}-b2.tmp"]
    live = tmp_path / "entries" / f".im8.npz.{_io._HOST}-{os.getpid()}-c3.tmp"
    for f in [*orphans, live]:
        f.write_bytes(b"partial")
    s = LogitsStore(tmp_path)
    assert not any(f.exists() for f in orphans) and live.exists()
    assert s.names == ["im0", "im1"]


def test_store_files_are_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _store(tmp_path / "s", finalize=False)  # first header (os.link path), entries, journal
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "im0.npz", "im1.npz"}
    for p in files:
        assert p.stat().st_mode & 0o044 == 0o044, (p, oct(p.stat().st_mode))
    old = os.umask(0o022)
    try:
        LogitsStore(tmp_path / "s").finalize()
    finally:
        os.umask(old)
    assert (tmp_path / "s" / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_old_manifest_without_new_keys(tmp_path: Path) -> None:
    _store(tmp_path)
    _edit_manifest(tmp_path, lambda m: [m.pop(k) for k in ("ignore_index", "subsets")])
    s = LogitsStore(tmp_path)
    assert s.ignore_index == 255 and s.subsets == {}
    # resuming with the default 255 is the same store; the new descriptive keys are added at finalize
    s = LogitsStore.create(tmp_path, {**HEADER, "ignore_index": 255, "subsets": {"half": ["im0"]}})
    s.finalize()
    again = LogitsStore(tmp_path)
    assert again.subsets == {"half": ["im0"]} and again.ignore_index == 255
    with pytest.raises(StoreMismatchError, match="ignore_index"):
        LogitsStore.create(tmp_path, {**HEADER, "ignore_index": 0})


def test_ignore_index_none_and_bad_values(tmp_path: Path) -> None:
    s = LogitsStore.create(tmp_path / "n", {**HEADER, "ignore_index": None})
    with pytest.raises(ValueError, match="outside"):
        s.write("x", torch.zeros(3, 2, 2), torch.full((2, 2), 255))  # 255 is not void when ignore_index=None
    s.write("y", torch.zeros(3, 2, 2), torch.full((2, 2), 2))
    assert LogitsStore(tmp_path / "n").ignore_index is None
    with pytest.raises(ValueError, match="ignore_index"):
        LogitsStore.create(tmp_path / "b", {**HEADER, "ignore_index": "255"})
    with pytest.raises(ValueError, match="class_names"):
        LogitsStore.create(tmp_path / "c", {**HEADER, "class_names": ["a"]})
