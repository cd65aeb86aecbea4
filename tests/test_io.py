"""segcal._io: atomic writes leave no partial file, permissions follow the umask, confine, safe_torch_load."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from segcal._io import (
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    clean_orphans,
    confine,
    safe_torch_load,
)


def test_atomic_write_roundtrip_and_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.json", "{}\n")
        q = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    finally:
        os.umask(old)
    assert p.read_text() == "{}\n"
    assert (p.stat().st_mode & 0o777) == 0o644  # mkstemp alone would give 0600
    assert (q.stat().st_mode & 0o777) == 0o644
    assert safe_torch_load(q, "weights")["w"].tolist() == [0, 1, 2]
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_atomic_write_respects_stricter_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        p = atomic_write_bytes(tmp_path / "x", b"1")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o600


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def boom(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "out.pt", boom)
    assert list(tmp_path.iterdir()) == []  # no 0-byte destination, no temp file


def test_failed_write_keeps_old_file(tmp_path: Path) -> None:
    dest = atomic_write_text(tmp_path / "r.json", "old")

    class Unsaveable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Unsaveable()}, dest)
    assert dest.read_text() == "old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "entries/../../x", "", "a\x00b", ".", "entries/.."])
def test_confine_refuses(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        confine(bad, tmp_path)


def test_confine_refuses_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "entries").mkdir(parents=True)
    (tmp_path / "secret").write_text("s")
    (root / "entries" / "link.npz").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="outside"):
        confine("entries/link.npz", root)
    assert confine("entries/a.npz", root) == (root / "entries" / "a.npz").resolve()
    with pytest.raises(ValueError):
        confine(123, root)  # type: ignore[arg-type]


def test_safe_torch_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        safe_torch_load(tmp_path / "nope.pt", "checkpoint")
    good = atomic_torch_save({"w": torch.ones(4, 4)}, tmp_path / "good.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:50])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    evil = tmp_path / "evil.pt"
    torch.save({"x": subprocess.Popen}, evil)  # weights_only refuses globals: no code runs
    plain_pickle = tmp_path / "p.pt"
    plain_pickle.write_bytes(pickle.dumps({"a": Path("x")}))
    meta = tmp_path / "meta.pt"
    torch.save({"w": torch.empty(3, device="meta")}, meta)
    for f in (trunc, garbage, evil, plain_pickle, meta, tmp_path):
        with pytest.raises(ValueError, match=r"^cannot read checkpoint ") as info:
            safe_torch_load(f, "checkpoint")
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="meta tensors"):
        safe_torch_load(meta, "checkpoint")


def test_clean_orphans(tmp_path: Path) -> None:
    # a temp file of a dead process on this host, one of a live process (ours), an old foreign one, a user file
    from segcal import _io

    dead_pid = 2**22 + 12345
    dead = tmp_path / f".m.json.{_io._HOST}-{dead_pid}-abc.tmp"
    live = tmp_path / f".m.json.{_io._HOST}-{os.getpid()}-abc.tmp"
    foreign = tmp_path / ".m.json.otherhost-1-abc.tmp"
    user = tmp_path / "keep.tmp"
    for f in (dead, live, foreign, user):
        f.write_text("x")
    os.utime(foreign, (1, 1))
    removed = clean_orphans(tmp_path, max_age_s=3600)
    assert sorted(p.name for p in removed) == sorted([dead.name, foreign.name])
    assert live.exists() and user.exists()
