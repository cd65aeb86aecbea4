"""File I/O shared by the library: safe ``torch.load``, atomic writes, path confinement, orphan cleanup.

Every file segcal writes (checkpoints, calibrators, stores, results) goes through :func:`atomic_write_bytes` (or its
text / ``torch.save`` twins): the data is written to a temp file in the destination folder, flushed and fsynced, then
``os.replace``d over the destination. A failure (full disk, kill) therefore leaves either the old file or the new one,
never a partial or 0-byte file; the temp file is removed on any exception. A process killed with SIGKILL can still
leave its temp file behind: :func:`clean_orphans` removes those (temp files of dead processes on this host, or older
than ``max_age_s``). Created files get the usual ``0666 & ~umask`` permissions (``mkstemp`` alone gives 0600, which
makes a shared store unreadable by other users).

Every path read from a file segcal did not just write itself (a manifest, a journal, results.json) is passed through
:func:`confine` before it is opened or deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_text", "clean_orphans",
           "confine", "file_mode", "find_meta_tensors", "safe_torch_load", "temp_file"]

_TMP_SUFFIX = ".tmp"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
# .<dest name>.<host>-<pid>-<random>.tmp
_TMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a newly created regular file: ``0o666 & ~umask`` (0644 under the usual umask 022)."""
    return 0o666 & ~_umask()


def _one_line(err: BaseException, limit: int = 240) -> str:
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def temp_file(path: str | os.PathLike) -> tuple[int, str]:
    """``mkstemp`` next to ``path`` with the name :func:`clean_orphans` recognises: ``(fd, temp path)``.

    For writers that publish the file themselves (e.g. with ``os.link``); the caller removes it on failure.
    """
    path = Path(path)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=_TMP_SUFFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    Args:
        path: destination (its parent folder must exist).
        write: writes the content to the binary file object it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` or the filesystem raises; the destination is then untouched and the temp file removed.
    """
    path = Path(path)
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically: a failure never leaves a partial or 0-byte file (see :func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> p = atomic_torch_save({"w": torch.ones(2)}, Path(tempfile.mkdtemp()) / "w.pt")
        >>> safe_torch_load(p, "weights")["w"].tolist()
        [1.0, 1.0]
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def find_meta_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Keys (dotted) of tensors on the ``meta`` device inside nested dicts / lists / tuples (they hold no data)."""
    found: list[str] = []
    if isinstance(obj, torch.Tensor):
        if obj.is_meta:
            found.append(prefix or "<tensor>")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found.extend(find_meta_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.extend(find_meta_tensors(v, f"{prefix}[{i}]"))
    return found


def safe_torch_load(path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors; never unpickles code.

    Args:
        path: the file.
        what: what the file should be, for messages (``"checkpoint"``, ``"calibrator"``, ``"model file"``).
        map_location: passed to ``torch.load``.

    Returns:
        The loaded object (tensors, dicts, lists, numbers, strings).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``cannot read {what} {path}: <reason>`` for a truncated, corrupt, non-torch or malicious file
            (one that needs code to be unpickled), a folder, or a file holding meta tensors (no data).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"cannot read {what} {path}: not a file")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol ..." on foreign files: the error says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError, EOFError, RuntimeError (zip), ... -> one line
        hint = ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            hint = " (the file needs code to be unpickled; segcal only reads tensors and plain containers)"
        raise ValueError(f"cannot read {what} {path}: {_one_line(err, 160)}{hint}") from err
    meta = find_meta_tensors(obj)
    if meta:
        raise ValueError(f"cannot read {what} {path}: it holds meta tensors without data ({', '.join(meta[:3])}"
                         f"{', ...' if len(meta) > 3 else ''}); save the model after materialising its weights")
    return obj


def confine(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``root / path`` resolved, provided it stays inside ``root``; for paths read from files (manifests, journals).

    Args:
        path: a relative path such as ``"entries/a.npz"`` read from an index file.
        root: the folder it must stay in.

    Returns:
        The resolved absolute path.

    Raises:
        ValueError: ``path`` is not a non-empty relative path, contains ``..`` or a NUL byte, names ``root`` itself,
            or resolves (through symlinks) outside ``root``.

    Example:
        >>> confine("entries/a.npz", "/tmp/store").name
        'a.npz'
        >>> confine("../etc/passwd", "/tmp/store")
        Traceback (most recent call last):
        ...
        ValueError: path '../etc/passwd' read from an index file leaves its folder /tmp/store ('..' is not allowed)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path read from an index file must be a string, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise ValueError(f"path {text!r} read from an index file is empty or not a valid path")
    p = Path(text)
    root_p = Path(root)
    if p.is_absolute() or p.drive or text.startswith(("/", "\\")):
        raise ValueError(f"path {text!r} read from an index file is absolute; only paths inside {root_p} are allowed")
    if ".." in p.parts or ".." in Path(text.replace("\\", "/")).parts:
        raise ValueError(f"path {text!r} read from an index file leaves its folder {root_p} ('..' is not allowed)")
    root_r = root_p.resolve()
    full = (root_r / p).resolve()
    if full == root_r or not full.is_relative_to(root_r):
        raise ValueError(f"path {text!r} read from an index file resolves to {full}, outside its folder {root_r} "
                         "(a symlink leaving the folder?)")
    return full


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_orphans(folder: str | os.PathLike, max_age_s: float = 3600.0) -> list[Path]:
    """Remove temp files that :func:`atomic_write` left in ``folder`` when its process was killed.

    A temp file is an orphan when it was written on this host by a process that no longer exists, or when it is older
    than ``max_age_s`` (a writer on another host sharing the folder). Temp files of live writers are kept.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX)) or p.is_symlink() or not p.is_file():
            continue
        m = _TMP_RE.match(p.name)  # None: an older segcal's temp name, removed by age only
        dead = m is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        try:
            old = now - p.stat().st_mtime > max_age_s
        except FileNotFoundError:
            continue
        if dead or old:
            with contextlib.suppress(OSError):  # gone meanwhile, or a read-only shared folder
                p.unlink()
                removed.append(p)
    return removed
