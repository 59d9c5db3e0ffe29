"""Atomic file replacement, shared by everything tabserve persists (state.ini, passwords).

A writer killed between creating its temporary file and renaming it leaves the temporary
behind (``.<name>.<random>.tmp`` beside the target). Each writer holds an exclusive
``flock`` on its temporary for as long as it writes it, so ``remove_stale_temps`` can tell
an abandoned one (lock free: the writer is gone) from one still being written (locked), even
by another process; the kernel drops the lock when the writer dies, SIGKILL included.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("tabserve.files")


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
        # Held until the file is closed: renamed into place, or removed below.
        fcntl.flock(fd, fcntl.LOCK_EX)
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


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """Create ``path`` and hold an exclusive lock on it while the block fills it: what
    ``remove_stale_temps`` needs to leave a temporary directory in progress alone."""
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, pattern: str) -> list[Path]:
    """Remove the temporaries matching ``pattern`` in ``directory`` that no writer holds.

    Returns what was removed (logged as a warning: it is the trace of an interrupted write,
    which never touched the file it was to replace). Errors are logged, never raised: a
    directory the server may read but not write keeps its leftovers.
    """
    removed = []
    try:
        candidates = sorted(directory.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, or a link: not ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer still holds it
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted write: %s", path, exc)
        finally:
            os.close(fd)
    if removed:
        log.warning(
            "removed %d temporary file(s) left by an interrupted write: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed


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
