"""Crash-safe file writing shared by the data and training packages.

Every file cm3_pyg produces (processed caches, checkpoints, ``metrics.json``, ``epochs.csv``)
is written to a temporary file in the target's folder, flushed and fsynced, then moved over
the target with :func:`os.replace`. A reader therefore sees either the old complete file or
the new complete file, never a half-written one, even if the process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from cm3_pyg.errors import FolderBusyError

__all__ = [
    "FolderLock",
    "atomic_folder",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "content_digest",
]


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (best effort: not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Create or replace ``path`` atomically with what ``write(binary_file)`` writes.

    The temporary file lives beside ``path`` (a rename is only atomic within one file
    system) and is removed if ``write`` fails or the process is interrupted by an exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the result the mode a plain open() would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: never a half-written file."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


#: below this much free space a failed write is reported as a full disk
_LOW_SPACE_BYTES = 64 << 20


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` atomically: never a truncated ``.pt`` file.

    Raises:
        OSError: the write failed; torch's own message for a full disk ("unexpected pos")
            becomes ``ENOSPC`` naming the file and the free space left.
    """
    try:
        # torch.save is looked up at call time so tests can monkeypatch it.
        atomic_write(path, lambda fh: torch.save(obj, fh))
    except RuntimeError as exc:
        folder = Path(path).parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = -1
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        if 0 <= free < _LOW_SPACE_BYTES:
            message = f"No space left on device ({free >> 20} MiB free in {folder})"
            raise OSError(errno.ENOSPC, message, str(path)) from None
        raise OSError(errno.EIO, f"write failed ({reason})", str(path)) from None


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a new folder ``path`` atomically: yields a temporary sibling to fill, which is
    renamed to ``path`` when the block succeeds and removed when it fails, so ``path`` is
    complete or absent. ``path`` must not exist or be an empty folder (checked by callers,
    which name the option that chose it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would not
        yield staging
        if path.exists():
            path.rmdir()  # an empty folder (a non-empty one makes this fail: nothing lost)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def content_digest(obj: Any) -> str:
    """sha256 of a nested structure of tensors, arrays, containers and plain values: every
    tensor by dtype, shape and bytes, dict keys in sorted order, each value tagged with its
    type (so ``1``, ``1.0``, ``"1"`` and ``True`` differ)."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(obj.shape)}:".encode())
        # a view of the bytes, not a copy: the table may be a mapped file larger than RAM
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(obj, np.ndarray):
        digest.update(f"A{obj.dtype}{obj.shape}:".encode())
        digest.update(memoryview(np.ascontiguousarray(obj).reshape(-1).view(np.uint8)))
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, (bytes, bytearray)):
        digest.update(f"B{len(obj)}:".encode() + bytes(obj))
    elif obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        text = repr(obj.item() if isinstance(obj, np.generic) else obj)
        digest.update(f"{type(obj).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"content_digest: cannot hash a {type(obj).__name__}")


class FolderLock:
    """An exclusive lock on a folder, held by one process at a time (``<folder>/.lock``).

    ``fcntl.flock`` on the lock file: the operating system releases it when the holder
    exits, even by SIGKILL, so a stale file never blocks a later run. The file records the
    holder (pid, host, start time) for the message another process gets. Where ``fcntl``
    does not exist (Windows) the lock is a no-op.

    Raises:
        FolderBusyError: from :meth:`acquire` when another live process holds the lock.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise FolderBusyError(
                f"{self.folder}: in use by {holder}; wait for it or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays (unlinking it while another process opens it could let two
        # processes lock two different files); it is emptied, and closing drops the flock.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
