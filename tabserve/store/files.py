"""Atomic file replacement, shared by everything tabserve persists (state.ini, passwords)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, new_mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half.

    The temporary file lives in the same directory (``os.replace`` is only atomic within one
    file system), is fsynced before the rename, and gets the old file's mode and, where
    permitted, owner; a new file gets ``new_mode``. A symlink is written through, not replaced.
    """
    target = Path(os.path.realpath(path))
    try:
        old = target.stat()
        mode, owner = stat.S_IMODE(old.st_mode), (old.st_uid, old.st_gid)
    except FileNotFoundError:
        mode, owner = new_mode, None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        if owner is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp, *owner)
            except PermissionError:
                pass  # not root: the file keeps our ownership, as any editor would do
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk (POSIX; Windows cannot
    # open a directory this way, and needs nothing more).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
