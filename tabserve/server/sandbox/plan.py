"""Planning how workers are confined: a ``Confinement`` derived from the settings.

Nothing here changes anything: no directory or file is created while planning (``start``
prepares what the plan mounts, just before the workers start). It only reads: users, the
interpreter's paths, what exists to be hidden.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ...config import ConfigError, Settings
from ...store.archives import archive_dir
from ..executor import PoolConfig
from ..findings import WARNING, Finding
from ..launcher import PACKAGE_PARENT

NONE = "none"
BUBBLEWRAP = "bubblewrap"
AUTO_USER = "auto"


# Mounted empty in the sandbox: /tmp is the scripts' private scratch space; /run holds the
# host's sockets (D-Bus, container runtimes), which a read-only mount does not make
# unreachable.
_PRIVATE_TOPS = ("/tmp",)
_HIDDEN_TOPS_OFFLINE = ("/run",)
# Directories never hidden whole to protect a secret in them: scripts need what else they
# hold (CA certificates, user names, the installation).
_SHARED_DIRS = frozenset(
    (
        "/", "/bin", "/boot", "/dev", "/etc", "/etc/pki", "/etc/ssl", "/home", "/lib",
        "/lib64", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv",
        "/sys", "/tmp", "/usr", "/usr/lib", "/usr/local", "/var", "/var/lib", "/var/tmp",
    )
)  # fmt: skip
_MIN_TMP_MB = 16


@dataclass(frozen=True)
class Confinement:
    """How workers are started and limited; derived from Settings by ``confinement``."""

    mode: str
    prefix: tuple[str, ...] = ()
    drop_to: tuple[int, int] | None = None
    limits: dict[str, int] = field(default_factory=dict)
    nproc_note: str = ""  # why RLIMIT_NPROC is not applied, when it is not
    hidden: tuple[str, ...] = ()  # replaced by empty stand-ins (bubblewrap)
    secrets: tuple[str, ...] = ()  # what the self-check tries to read
    notes: tuple[Finding, ...] = ()  # findings known before the self-check runs
    archive_dir: str = ""
    state_path: str = ""


def worker_ids(user: str, mode: str = NONE) -> tuple[int, int] | None:
    """(uid, gid) for TABSERVE_WORKER_USER when the server is root; None keeps the user.

    ``auto`` (the default) means ``nobody``, unless that user could not read the Python
    installation in ``none`` mode (e.g. a pyenv under /root): then workers keep the server's
    user and the self-check warns. A user named explicitly is used, or the check fails.
    """
    if os.geteuid() != 0 or user in ("", "root", "0"):
        return None
    if user == AUTO_USER:
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            return None
        ids = entry.pw_uid, entry.pw_gid
        if mode == NONE and any(closed_ancestor(p, *ids) for p in _runtime_paths()):
            return None
        return ids
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():
            return int(user), int(user)  # a uid without a passwd entry is fine
        raise ConfigError(f"TABSERVE_WORKER_USER = {user!r}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def _within(path: str, tops: Iterable[str]) -> bool:
    return any(path == top or path.startswith(top.rstrip("/") + "/") for top in tops)


def _runtime_paths() -> list[str]:
    """What the worker's interpreter needs: the prefixes, sys.path and tabserve itself."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, PACKAGE_PARENT}
    candidates.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    candidates.update(p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p))
    paths = sorted(os.path.realpath(p) for p in candidates)
    return [p for p in paths if not any(p != q and _within(p, [q]) for q in paths)]


def closed_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The outermost directory above ``path`` that ``uid`` may not enter, if any."""
    current = "/"
    for part in Path(path).parts[1:-1] if os.path.isfile(path) else Path(path).parts[1:]:
        current = os.path.join(current, part)
        try:
            info = os.stat(current)
        except OSError:
            return None
        if info.st_uid == uid:
            enter = info.st_mode & 0o100
        elif info.st_gid == gid:
            enter = info.st_mode & 0o010
        else:
            enter = info.st_mode & 0o001
        if not enter:
            return current
    return None


def _parents(path: str, covered: list[str]) -> list[str]:
    """bwrap arguments creating, world-enterable, the directories between a covering tmpfs
    and ``path`` (bwrap would make them 0700, closed to the worker user)."""
    tops = [top for top in covered if _within(path, [top]) and path != top]
    if not tops:
        return []
    top = max(tops, key=len)
    args: list[str] = []
    current = top
    for part in Path(path).relative_to(top).parts[:-1]:
        current = os.path.join(current, part)
        args += ["--perms", "0755", "--dir", current]
    return args


def _hide_plan(secrets: list[str], needed: list[str]) -> tuple[list[str], list[Finding]]:
    """What to hide for each secret file, and warnings where that falls short.

    A mount over the file itself does not last: replacing the file by rename on the host
    (``tabserve user``, any editor, a certificate renewal) detaches the mount in the sandbox
    and the new file shows through. So the directory holding the file is hidden instead,
    and for a symlink also the directory of its target (where renewals put the new key),
    unless the directory holds something workers need.
    """
    hidden: list[str] = []
    notes: list[Finding] = []
    for secret in secrets:
        for path in dict.fromkeys((secret, os.path.realpath(secret))):
            directory = os.path.dirname(path)
            shared = directory in _SHARED_DIRS or any(_within(n, [directory]) for n in needed)
            if not shared:
                hidden.append(directory)
                continue
            hidden.append(path)
            notes.append(
                Finding(
                    WARNING,
                    f"{path} is hidden by a mount over the file alone, because {directory} "
                    "holds what workers need; replacing the file (tabserve user, an editor, "
                    "a key renewal) makes the new one readable to scripts until the workers "
                    "are restarted; keep the password file and the TLS key in a directory "
                    "of their own",
                )
            )
    return list(dict.fromkeys(hidden)), notes


def bubblewrap_prefix(
    settings: Settings, root: bool, drop_to: tuple[int, int] | None, hidden: list[str]
) -> tuple[str, ...]:
    """The bwrap command line put in front of the worker's interpreter."""
    bwrap = shutil.which("bwrap") or "bwrap"
    args = [bwrap, "--die-with-parent", "--new-session"]
    if root:
        # bwrap as root needs no user namespace (and with one, any uid inside would map to
        # root outside): the worker changes to the worker user itself, hence SETUID/SETGID.
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        if not settings.sandbox_network:
            args.append("--unshare-net")
        if drop_to:
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args.append("--unshare-all")
        if settings.sandbox_network:
            args.append("--share-net")
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    covered = list(_PRIVATE_TOPS)
    if not settings.sandbox_network:
        covered += _HIDDEN_TOPS_OFFLINE
    if drop_to is not None:
        # A Python installed below a directory the worker user may not enter (pyenv in
        # /root, 0700) is unusable after the switch: that directory is replaced by an empty
        # one (0755) into which the installation is mounted again.
        for path in _runtime_paths():
            closed = closed_ancestor(path, *drop_to)
            if closed and not _within(closed, covered):
                covered.append(closed)
    for top in covered:
        if not os.path.isdir(top):
            continue
        if top in _PRIVATE_TOPS:
            # Scratch space for scripts: sticky and world-writable like a real /tmp. It is
            # memory, outside RLIMIT_AS, so it is bounded too: twice the largest file.
            args += ["--perms", "1777"]
            if settings.worker_file_size_mb:
                size = max(2 * settings.worker_file_size_mb, _MIN_TMP_MB) * 1024 * 1024
                args += ["--size", str(size)]
        args += ["--tmpfs", top]
    # An interpreter or virtualenv below a covered directory (CI puts one in /tmp) comes back.
    for path in _runtime_paths():
        if _within(path, covered):
            args += [*_parents(path, covered), "--ro-bind", path, path]
    state = str(settings.state_path)
    archives = str(archive_dir(settings.state_path))
    # The state directory becomes an empty read-only directory holding only the archives.
    args += [*_parents(state, covered), "--tmpfs", state]
    args += ["--ro-bind", archives, archives, "--remount-ro", state]
    covered.append(state)
    for path in hidden:
        if _within(path, covered) or not os.path.exists(path):
            continue
        if os.path.isdir(path):
            args += ["--tmpfs", path, "--remount-ro", path]
            covered.append(path)
        else:
            # /dev/null: reads as empty (a plain bind would refuse it: binds are nodev).
            args += ["--dev-bind", "/dev/null", path]
    if settings.log_file is not None:
        # Workers append their log lines to the server's log file: that one file stays
        # writable (it must exist to be mounted: start.prepare creates it). After a rotation
        # they keep writing to the old file until they are replaced: the mount pins it.
        log_file = str(settings.log_file)
        args += [*_parents(log_file, covered), "--bind", log_file, log_file]
    args += ["--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"]
    return tuple(args)


def confinement(settings: Settings, mode: str | None = None) -> Confinement:
    """Decide how workers are launched and limited; creates nothing (see ``start.prepare``).

    Raises ConfigError when TABSERVE_WORKER_USER names no user.
    """
    mode = mode or settings.sandbox
    root = os.geteuid() == 0
    drop_to = worker_ids(settings.worker_user, mode)
    archives = archive_dir(settings.state_path)
    limits = {"fsize": settings.worker_file_size_mb, "nofile": settings.worker_open_files}
    nproc_note = ""
    per_worker = settings.worker_processes
    if per_worker and mode == BUBBLEWRAP and not root:
        limits["nproc"] = per_worker  # its own user namespace: counted for this worker alone
    elif per_worker and drop_to is not None:
        # Counted for the worker user as a whole, so the budget is shared by all workers.
        limits["nproc"] = per_worker * settings.workers
    elif per_worker:
        nproc_note = (
            "RLIMIT_NPROC is not applied: workers run as the server's own user, whose other "
            "processes would count against it" + (" (and root is exempt)" if root else "")
        )
    secrets = [str(p) for p in (settings.password_file, settings.key_file) if p is not None]
    needed = [*_runtime_paths(), str(settings.state_path), os.getcwd()]
    if settings.log_file is not None:
        needed.append(str(settings.log_file))
    hidden, notes = _hide_plan(secrets, needed)
    hidden += [str(p) for p in settings.sandbox_hide]
    prefix: tuple[str, ...] = ()
    if mode == BUBBLEWRAP:
        prefix = bubblewrap_prefix(settings, root, drop_to, hidden)
    return Confinement(
        mode=mode,
        prefix=prefix,
        drop_to=drop_to,
        limits=limits,
        nproc_note=nproc_note,
        hidden=tuple(hidden),
        secrets=tuple(dict.fromkeys([*secrets, *hidden])),
        notes=tuple(notes) if mode == BUBBLEWRAP else (),
        archive_dir=str(archives),
        state_path=str(settings.state_path),
    )


def pool_config(settings: Settings, confined: Confinement, workers: int = 0) -> PoolConfig:
    return PoolConfig(
        workers=workers or settings.workers,
        request_limit=settings.max_request_bytes,
        memory_mb=settings.worker_memory_mb,
        queue_length=settings.queue_length,
        env_allow=settings.worker_env,
        gzip_enabled=settings.gzip_enabled,
        log_level=settings.log_level,
        log_format=settings.log_format,
        log_file=str(settings.log_file) if settings.log_file else None,
        command_prefix=confined.prefix,
        drop_to=confined.drop_to,
        limits=confined.limits,
        cpu_seconds=settings.worker_cpu_seconds,
        archive_dir=confined.archive_dir,
        launch=settings.worker_launch,
        preload=settings.worker_preload,
    )
