"""On-disk store of per-image logits (float16), labels and optional decoder features.

Layout of a store directory::

    STORE/
      manifest.json            header (model, dataset, split, classes, ...) + consolidated entries, written atomically
      entries/<name>.npz       one uncompressed npz per image: logits (C,H,W) float16, target (H,W) uint8/int16,
                               features (F,h,w) float16 -- each written to a temp file, then ``os.replace``d
      shards/rank-<r>.jsonl    append-only journal of entries finished by writer rank r since the last consolidation

Crash safety: an entry file only appears (atomically) once complete, and its journal line -- carrying the file's
size and sha256 -- is appended only after that. A process killed at any moment therefore leaves either a finished,
checksummed entry or nothing; a torn last journal line is ignored and that entry is simply redone on resume.

Several writers (ranks) share one store without locks: rank ``r`` writes only its own images and only its own
journal ``shards/rank-<r>.jsonl``. Readers merge the header and every journal on open, so a store is readable
while ranks are still writing. :meth:`LogitsStore.finalize` (rank 0, after a barrier) folds the journals into
``manifest.json`` and removes them; readers read journals *before* the manifest, so an entry is never missed while
that happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from segcal._io import atomic_write_bytes, clean_orphans, confine, file_mode, temp_file

__all__ = ["DEFAULT_IGNORE_INDEX", "IDENTITY_KEYS", "CorruptEntryError", "Entry", "LogitsStore", "StoreMismatchError"]

FORMAT = "segcal-logits-store"
VERSION = 1
MANIFEST = "manifest.json"
#: Manifest keys that must match for :meth:`LogitsStore.create` to resume an existing store.
IDENTITY_KEYS = ("model", "model_fingerprint", "dataset", "split", "num_classes", "class_names", "ignore_index",
                 "features", "logits_dtype")
_FLOAT16_MAX = 65504.0
#: the void label assumed when neither the data nor a store says otherwise (segcal's default ``ignore_index``)
DEFAULT_IGNORE_INDEX = 255


class CorruptEntryError(ValueError):
    """A store entry is missing, truncated or fails its checksum."""


class StoreMismatchError(ValueError):
    """An existing store was written by a different model / dataset / split."""


class Entry(NamedTuple):
    """One stored image: ``logits`` (C,H,W) float16, ``target`` (H,W) int64 or None, ``features`` or None."""

    name: str
    logits: Tensor
    target: Tensor | None
    features: Tensor | None


def _safe_filename(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100]
    if safe != name or safe.startswith("."):
        # distinct names must never share a file, e.g. "a/b" and "a_b"
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return safe + ".npz"


_atomic_write_bytes = atomic_write_bytes  # module-level name: tests simulate a full disk by replacing it


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _read_journal(path: Path) -> list[dict]:
    records = []
    try:
        text = path.read_text()
    except FileNotFoundError:  # consolidated and removed by rank 0 meanwhile
        return records
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # torn line of a killed writer: that entry is redone
            continue
        if _valid_record(rec):
            records.append(rec)
    return records


def _valid_record(rec: object) -> bool:
    """An index record has the fields every reader relies on, of the right types (anything else is ignored)."""
    return (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("file"), str)
            and isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)
            and isinstance(rec.get("shape"), list) and len(rec["shape"]) == 3
            and all(isinstance(v, int) and v >= 0 for v in rec["shape"]))


def _to_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


class LogitsStore:
    """A directory of per-image logits with labels, a manifest and per-entry checksums.

    Open an existing store with ``LogitsStore(path)``; create (or resume) one with :meth:`create`.
    Iterating yields ``(name, logits, target)`` with ``logits`` a float16 tensor (C,H,W) and ``target`` an int64
    tensor (H,W) or None; :meth:`batches` streams same-size batches for fitting calibrators. Every read verifies the
    entry's sha256, so a truncated or corrupt file raises :class:`CorruptEntryError` naming the entry.

    Args:
        path: store directory (must contain ``manifest.json``).
        verify: check each entry's size and checksum when it is read (cheap next to decoding; keep it on).

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> s = LogitsStore.create(d, {"model": "m", "dataset": "toy", "split": "val", "num_classes": 3})
        >>> s.write("img0", torch.randn(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))
        >>> s.finalize()
        >>> store = LogitsStore(d)
        >>> [(n, tuple(lg.shape), lg.dtype) for n, lg, t in store]
        [('img0', (3, 4, 5), torch.float16)]
        >>> next(iter(store.batches(batch_size=8)))["logits"].shape
        torch.Size([1, 3, 4, 5])
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self._rank: int | None = None
        self._journal_path: Path | None = None
        self._additions: dict[str, Any] = {}
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"no logits store at '{self.path}' ({MANIFEST} is missing); create one with `segcal predict` "
                "or LogitsStore.create()")
        for folder in (self.path, self.path / "entries", self.path / "shards"):
            clean_orphans(folder)  # temp files of killed writers
        self._load()

    # ------------------------------------------------------------------ creation / writing
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict, *, rank: int = 0, verify: bool = True
               ) -> LogitsStore:
        """Create a store, or resume an existing one written by the same model / dataset / split.

        Args:
            path: store directory (created if missing).
            manifest: header; needs ``num_classes`` and should name ``model``, ``dataset``, ``split``; may hold
                ``class_names``, ``features`` (bool), ``ignore_index``, ``order`` (image names in dataset order)
                and any JSON-serialisable extras.
            rank: writer rank; each rank appends to its own journal, so ranks never write the same file.
            verify: passed to the store (checksum on read).

        Returns:
            A store open for :meth:`write`; already-finished entries are listed in ``names``.

        Raises:
            StoreMismatchError: the existing store's :data:`IDENTITY_KEYS` differ from ``manifest``'s.

        Example:
            >>> import tempfile
            >>> d = tempfile.mkdtemp()
            >>> s = LogitsStore.create(d, {"model": "m", "dataset": "toy", "split": "val", "num_classes": 3})
            >>> len(s)
            0
        """
        if not isinstance(manifest, dict):
            raise TypeError(f"`manifest` must be a dict, got {type(manifest).__name__}")
        nc = manifest.get("num_classes")
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 2:
            raise ValueError(f"`manifest['num_classes']` must be an int >= 2, got {nc!r}")
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"`rank` must be a non-negative int, got {rank!r}")
        ign = manifest.get("ignore_index", DEFAULT_IGNORE_INDEX)
        if ign is not None and (isinstance(ign, bool) or not isinstance(ign, int)):
            raise ValueError(f"`manifest['ignore_index']` must be an int or None, got {ign!r}")
        names = manifest.get("class_names")
        if names is not None and len(names) != nc:
            raise ValueError(f"`manifest['class_names']` has {len(names)} names but num_classes={nc}")
        root = Path(path)
        (root / "entries").mkdir(parents=True, exist_ok=True)
        (root / "shards").mkdir(exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, "features": False, "ignore_index": DEFAULT_IGNORE_INDEX,
                  "class_names": None, "subsets": {}, **manifest, "entries": {}}
        header["features"] = bool(header["features"])
        if header["class_names"] is not None:
            header["class_names"] = [str(c) for c in header["class_names"]]
        mpath = root / MANIFEST
        if not mpath.exists():
            fd, tmp = temp_file(mpath)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_json_bytes(header))
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, file_mode())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            try:
                # link() never overwrites: when ranks race, exactly one header wins and it appears complete
                os.link(tmp, mpath)
            except FileExistsError:
                pass
            except OSError:  # filesystem without hard links
                if not mpath.exists():
                    os.replace(tmp, mpath)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        store = cls(root, verify=verify)
        # stores written before ignore_index / logits_dtype were recorded
        existing = {"ignore_index": DEFAULT_IGNORE_INDEX, "logits_dtype": "float16", **store._header}
        diffs = [k for k in IDENTITY_KEYS if k in header and existing.get(k) != header.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: store has {existing.get(k)!r}, requested {header.get(k)!r}" for k in diffs)
            raise StoreMismatchError(
                f"logits store '{root}' was written by a different model/dataset/split ({detail}). "
                "Use another output path or delete the store to start over.")
        # descriptive keys added since the store was written (e.g. subsets): recorded at the next finalize
        store._additions = {k: v for k, v in header.items() if k not in store._header and k != "entries"}
        store._header.update(store._additions)
        store._rank = rank
        store._journal_path = root / "shards" / f"rank-{rank:05d}.jsonl"
        return store

    def write(self, name: str, logits: Tensor | np.ndarray, target: Tensor | np.ndarray | None = None,
              features: Tensor | np.ndarray | None = None) -> None:
        """Write one image's entry atomically and record it in this rank's journal.

        Args:
            name: image name (unique within the store).
            logits: (C, H, W) float scores; stored as float16, or float32 when the manifest says
                ``"logits_dtype": "float32"``.
            target: (H, W) integer labels or None.
            features: (F, h, w) decoder features or None; required iff the store was created with features.

        Raises:
            ValueError: NaN/inf logits or logits beyond float16 range (naming the image), bad shapes or labels.
            OSError: the write failed (e.g. disk full); no partial entry is left behind.
        """
        if self._journal_path is None:
            raise RuntimeError("store was opened read-only; use LogitsStore.create(path, manifest) to write")
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty str, got {name!r}")
        logits = _to_tensor(logits, "logits").detach().cpu()
        c = self.num_classes
        if logits.ndim != 3 or logits.shape[0] != c:
            raise ValueError(f"`logits` for image '{name}' must have shape (C={c}, H, W), got {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise TypeError(f"`logits` for image '{name}' must be floating, got {logits.dtype}")
        if not torch.isfinite(logits).all():
            raise ValueError(f"model output for image '{name}' contains NaN or inf logits")
        exact = self.logits_dtype == "float32"
        if not exact and logits.abs().max() > _FLOAT16_MAX:
            raise ValueError(f"logits for image '{name}' exceed the float16 range (|x| > {_FLOAT16_MAX})")
        arrays = {"logits": logits.to(torch.float32 if exact else torch.float16).numpy()}
        if target is not None:
            target = _to_tensor(target, "target").detach().cpu()
            if target.is_floating_point() or target.dtype == torch.bool:
                raise TypeError(f"`target` for image '{name}' must be integer, got {target.dtype}")
            if tuple(target.shape) != tuple(logits.shape[1:]):
                raise ValueError(f"`target` for image '{name}' has shape {tuple(target.shape)}, logits have "
                                 f"(H, W) = {tuple(logits.shape[1:])}")
            ign = self.ignore_index
            valid = target[target != ign] if ign is not None else target.flatten()
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= c):
                raise ValueError(f"`target` for image '{name}' has labels outside [0, {c}) that are not "
                                 f"ignore_index={ign}")
            tdt = np.uint8 if c <= 255 and (ign is None or 0 <= ign <= 255) else np.int16
            arrays["target"] = target.numpy().astype(tdt)
        if self.has_features != (features is not None):
            raise ValueError(f"store was created with features={self.has_features} but features "
                             f"{'were' if features is not None else 'were not'} given for image '{name}'")
        if features is not None:
            features = _to_tensor(features, "features").detach().cpu()
            if features.ndim != 3:
                raise ValueError(f"`features` for image '{name}' must be (F, h, w), got {tuple(features.shape)}")
            if not torch.isfinite(features).all():
                raise ValueError(f"decoder features for image '{name}' contain NaN or inf")
            arrays["features"] = features.to(torch.float16).numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        fname = _safe_filename(name)
        rec = {"name": name, "file": fname, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
               "shape": list(arrays["logits"].shape), "target": target is not None,
               "features_shape": list(arrays["features"].shape) if features is not None else None}
        try:
            _atomic_write_bytes(self.path / "entries" / fname, data)
            self._append_journal(rec)
        except OSError as e:
            raise OSError(e.errno, f"could not write logits store entry '{name}' to '{self.path}' "
                                   f"({e.strerror or e}); is the disk full? Finished entries are kept; "
                                   "re-run to resume") from e
        self._add(rec)

    def _append_journal(self, rec: dict) -> None:
        assert self._journal_path is not None
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        with open(self._journal_path, "ab") as f:
            if f.tell() > 0:
                # a killed writer may have left a torn line without newline: never glue a record onto it
                with open(self._journal_path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        line = b"\n" + line
            f.write(line)
            f.flush()

    def finalize(self) -> None:
        """Fold every rank's journal into ``manifest.json`` (atomic) and remove the journals.

        Call it from one process only, after all writers have finished (rank 0 after a barrier). Readers never
        need it -- they merge journals on open -- but it keeps the store a single file of metadata.
        """
        journals = sorted((self.path / "shards").glob("rank-*.jsonl"))
        self._load()
        header = dict(self._header)
        header["entries"] = {n: self._entries[n] for n in self._order_names()}
        atomic_write_bytes(self.path / MANIFEST, _json_bytes(header))
        for j in journals:
            with contextlib.suppress(FileNotFoundError):
                j.unlink()

    def discard(self, name: str) -> None:
        """Forget an entry (e.g. a corrupt one, before rewriting it); its file is removed."""
        rec = self._entries.pop(name, None)
        if rec is None:
            return
        try:
            fpath = self._entry_path(rec)
        except CorruptEntryError as err:  # a path leaving the store is never deleted
            warnings.warn(f"{err}; the record is dropped, no file is deleted", RuntimeWarning, stacklevel=2)
            return
        with contextlib.suppress(FileNotFoundError):
            fpath.unlink()

    def _entry_path(self, rec: dict) -> Path:
        """The entry file of an index record, confined to ``STORE/entries`` (records come from files on disk)."""
        fname = rec.get("file")
        if not isinstance(fname, str) or "/" in fname or "\\" in fname:
            raise CorruptEntryError(f"logits store '{self.path}': entry {rec.get('name')!r} names file {fname!r}, "
                                    "which is not a plain file name in entries/ (tampered index?); refused")
        try:
            return confine(f"entries/{fname}", self.path)
        except ValueError as err:
            raise CorruptEntryError(f"logits store '{self.path}': entry {rec.get('name')!r} names file {fname!r} "
                                    f"outside the store (tampered index?); refused: {err}") from None

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        # journals first, then the manifest: an entry consolidated (and its journal deleted) in between is
        # then still found in the manifest
        journals = sorted((self.path / "shards").glob("rank-*.jsonl")) if (self.path / "shards").is_dir() else []
        records = [r for j in journals for r in _read_journal(j)]
        try:
            header = json.loads((self.path / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptEntryError(f"manifest of logits store '{self.path}' is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise CorruptEntryError(f"manifest of logits store '{self.path}' is a JSON {type(header).__name__}, not "
                                    "an object; the store is damaged: delete it and re-run predict")
        if header.get("format") != FORMAT:
            raise ValueError(f"'{self.path / MANIFEST}' is not a segcal logits store (format="
                             f"{header.get('format')!r})")
        version = header.get("version", 0)
        if not isinstance(version, int) or version > VERSION:
            raise ValueError(f"logits store '{self.path}' has format version {header['version']}, this segcal "
                             f"reads up to {VERSION}; upgrade segcal")
        nc = header.get("num_classes")
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise CorruptEntryError(f"manifest of logits store '{self.path}' has num_classes={nc!r}, not a "
                                    "positive int")
        entries = header.pop("entries", {}) or {}
        if not isinstance(entries, dict):
            raise CorruptEntryError(f"manifest of logits store '{self.path}': 'entries' is a "
                                    f"{type(entries).__name__}, not an object")
        bad = [n for n, r in entries.items() if not (_valid_record(r) and r["name"] == n)]
        if bad:
            warnings.warn(f"logits store '{self.path}': {len(bad)} malformed manifest entries ignored (they are "
                          f"redone on resume): {bad[:5]}", RuntimeWarning, stacklevel=3)
        self._header = {**self._additions, **header}
        self._entries: dict[str, dict] = {n: r for n, r in entries.items() if n not in bad}
        for r in records:
            self._add(r)

    def _add(self, rec: dict) -> None:
        self._entries.pop(rec["name"], None)  # re-insert: the newest record of a redone entry wins
        self._entries[rec["name"]] = rec

    def _order_names(self) -> list[str]:
        order = self._header.get("order") or []
        seen = set()
        names = []
        for n in order:
            if n in self._entries and n not in seen:
                names.append(n)
                seen.add(n)
        names.extend(n for n in self._entries if n not in seen)
        return names

    def refresh(self) -> None:
        """Re-read the manifest and journals (e.g. to see entries other ranks wrote meanwhile)."""
        self._load()

    @property
    def names(self) -> list[str]:
        """Stored image names, in dataset order when the manifest has one."""
        return self._order_names()

    @property
    def manifest(self) -> dict:
        """Header plus per-entry ``shapes``, ``checksums`` and full ``entries`` records (a copy)."""
        m = json.loads(json.dumps(self._header))
        names = self.names
        m["entries"] = {n: dict(self._entries[n]) for n in names}
        m["shapes"] = {n: list(self._entries[n]["shape"]) for n in names}
        m["checksums"] = {n: self._entries[n]["sha256"] for n in names}
        return m

    @property
    def num_classes(self) -> int:
        return int(self._header["num_classes"])

    @property
    def class_names(self) -> list[str] | None:
        """The C class names recorded by the writer, or None."""
        return self._header.get("class_names")

    @property
    def logits_dtype(self) -> str:
        """How logits are kept: ``"float16"`` (default, half the disk) or ``"float32"`` (exact metrics)."""
        return str(self._header.get("logits_dtype", "float16"))

    @property
    def ignore_index(self) -> int | None:
        """The void label recorded by the writer (``None``: no void label); 255 for stores that predate the key."""
        return self._header.get("ignore_index", DEFAULT_IGNORE_INDEX)

    @property
    def subsets(self) -> dict[str, list[str]]:
        """Named subsets of the stored split (``{name: [image names]}``), as declared by the dataset; ``{}`` if none.

        Names not (yet) in the store are kept: use :meth:`batches` with ``names=`` on the intersection."""
        subsets = self._header.get("subsets") or {}
        return {str(k): [str(n) for n in v] for k, v in subsets.items()} if isinstance(subsets, dict) else {}

    @property
    def has_features(self) -> bool:
        return bool(self._header.get("features", False))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        h = self._header
        return (f"LogitsStore('{self.path}', model={h.get('model')!r}, dataset={h.get('dataset')!r}, "
                f"split={h.get('split')!r}, n={len(self)}, C={self.num_classes})")

    def _read_bytes(self, name: str) -> bytes:
        rec = self._entries[name]
        fpath = self._entry_path(rec)
        try:
            data = fpath.read_bytes()
        except FileNotFoundError:
            raise CorruptEntryError(f"logits store entry '{name}' is missing its file '{fpath}'; delete the "
                                    "store or re-run predict to regenerate it") from None
        if self.verify:
            if len(data) != rec["bytes"]:
                raise CorruptEntryError(f"logits store entry '{name}' ('{fpath}') is truncated: {len(data)} "
                                        f"bytes, expected {rec['bytes']}; re-run predict to regenerate it")
            digest = hashlib.sha256(data).hexdigest()
            if digest != rec["sha256"]:
                raise CorruptEntryError(f"logits store entry '{name}' ('{fpath}') is corrupt: sha256 {digest[:12]}"
                                        f"... != manifest {rec['sha256'][:12]}...; re-run predict to regenerate it")
        return data

    def get(self, name: str) -> Entry:
        """Load one entry.

        Args:
            name: image name.

        Returns:
            :class:`Entry` ``(name, logits float16 (C,H,W), target int64 (H,W) | None, features float16 | None)``.

        Raises:
            KeyError: unknown name. CorruptEntryError: missing, truncated or corrupt entry.
        """
        if name not in self._entries:
            raise KeyError(f"no entry '{name}' in logits store '{self.path}'")
        data = self._read_bytes(name)
        try:
            with np.load(io.BytesIO(data)) as z:
                logits = torch.from_numpy(z["logits"])
                target = torch.from_numpy(z["target"].astype(np.int64)) if "target" in z.files else None
                feats = torch.from_numpy(z["features"]) if "features" in z.files else None
        except (ValueError, OSError, KeyError) as e:
            raise CorruptEntryError(f"logits store entry '{name}' cannot be decoded: {e}") from e
        return Entry(name, logits, target, feats)

    def verify_entries(self, names: Sequence[str] | None = None) -> list[str]:
        """Return the names (of ``names`` or all) whose file is missing, truncated or fails its checksum."""
        bad = []
        for n in self.names if names is None else names:
            if n not in self._entries:
                continue
            try:
                verify, self.verify = self.verify, True
                self._read_bytes(n)
            except CorruptEntryError:
                bad.append(n)
            finally:
                self.verify = verify
        return bad

    def __iter__(self) -> Iterator[tuple[str, Tensor, Tensor | None]]:
        for n in self.names:
            e = self.get(n)
            yield e.name, e.logits, e.target

    def shard_names(self, rank: int, world_size: int) -> list[str]:
        """Names for ``rank`` of ``world_size`` (images rank, rank+W, ...), for distributed evaluation."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return self.names[rank::world_size]

    def batches(self, batch_size: int = 8, dtype: torch.dtype = torch.float32, features: bool = False,
                names: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """Stream batches of same-size images; only one batch is in memory at a time.

        Images are grouped by (H, W) using the manifest's shapes (no file is read to plan), so images of different
        sizes are never batched together; within a size, stored order is kept.

        Args:
            batch_size: maximum images per batch.
            dtype: dtype of the returned logits (and features).
            features: also return decoder features (the store must have them).
            names: restrict to these names (in this order), e.g. :meth:`shard_names` for one rank.

        Returns:
            Iterator of dicts ``{"logits": (B,C,H,W), "target": (B,H,W) int64 | None, "names": [str],
            "features": (B,F,h,w)}`` (``features`` only when requested). ``target`` is None when the batch's
            images have no labels.

        Example:
            >>> import tempfile, torch
            >>> d = tempfile.mkdtemp()
            >>> s = LogitsStore.create(d, {"model": "m", "dataset": "toy", "split": "val", "num_classes": 2})
            >>> for i, hw in enumerate([(4, 4), (2, 3), (4, 4)]):
            ...     s.write(f"im{i}", torch.zeros(2, *hw))
            >>> [b["names"] for b in s.batches(batch_size=8)]
            [['im0', 'im2'], ['im1']]
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if features and not self.has_features:
            raise ValueError(f"logits store '{self.path}' has no decoder features (written without features=True)")
        if names is None:
            names = self.names
        else:
            missing = [n for n in names if n not in self._entries]
            if missing:
                raise KeyError(f"names not in logits store '{self.path}': {missing[:5]}")
        buckets: dict[tuple, list[str]] = {}
        for n in names:
            rec = self._entries[n]
            key = (tuple(rec["shape"]), bool(rec["target"]),
                   tuple(rec["features_shape"]) if features and rec.get("features_shape") else None)
            group = buckets.setdefault(key, [])
            group.append(n)
            if len(group) == batch_size:
                yield self._collate(buckets.pop(key), dtype, features)
        for group in buckets.values():
            yield self._collate(group, dtype, features)

    def _collate(self, names: list[str], dtype: torch.dtype, features: bool) -> dict[str, Any]:
        entries = [self.get(n) for n in names]
        out: dict[str, Any] = {
            "logits": torch.stack([e.logits for e in entries]).to(dtype),
            "target": torch.stack([e.target for e in entries]) if entries[0].target is not None else None,
            "names": list(names),
        }
        if features:
            out["features"] = torch.stack([e.features for e in entries]).to(dtype)
        return out

