"""The sandbox: how worker processes are confined, and the self-check that proves it.

Two modes (``TABSERVE_SANDBOX``), both on top of what every worker gets (its own process,
an environment allow-list, a memory cap):

``none``
    resource limits (CPU backstop, file size, open files, processes where the kernel counts
    them per worker) and, when the server runs as root, an unprivileged user.
``bubblewrap``
    the same, inside bubblewrap namespaces: no network unless allowed, the filesystem
    read-only but for a private /tmp, and the password file, TLS key and state directory
    replaced by empty stand-ins (only the endpoint archives stay readable).

At start-up ``start_pool`` launches the workers and then sends one of them a ``self_check``
job (``worker.self_check``) that tries the denied actions for real. The ``SandboxReport``
says what held.
If the promised isolation does not hold, tabserve fails closed: ``require_evaluate`` refuses
ad-hoc code, and ``require_deployed`` refuses deployed code unless the configuration trusts
it. ``self_check`` runs the same check stand-alone, for ``tabserve doctor``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..config import ConfigError, Settings
from ..errors import SandboxUnavailable, TabserveError
from ..store.archives import ARCHIVE_DIR_NAME, archive_dir
from .executor import PACKAGE_PARENT, SINGLE_THREADED, Executor, PoolConfig

log = logging.getLogger("tabserve.sandbox")

NONE = "none"
BUBBLEWRAP = "bubblewrap"
AUTO_USER = "auto"

# Levels of a finding, mildest first. Only "error" fails the check.
OK, INFO, WARNING, ERROR = "ok", "info", "warning", "error"

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
_SELF_CHECK_TIMEOUT = 60.0
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
    notes: tuple[tuple[str, str], ...] = ()  # findings known before the self-check runs
    archive_dir: str = ""
    state_path: str = ""


@dataclass
class SandboxReport:
    """What the self-check found. ``ok`` is false when any finding is an error."""

    mode: str
    ok: bool
    findings: list[tuple[str, str]]
    trust_deployed_code: bool = False

    @classmethod
    def from_findings(
        cls, mode: str, findings: list[tuple[str, str]], trust: bool = False
    ) -> SandboxReport:
        return cls(mode, all(level != ERROR for level, _ in findings), findings, trust)

    @property
    def problems(self) -> list[str]:
        return [message for level, message in self.findings if level == ERROR]

    @property
    def deployed_allowed(self) -> bool:
        return self.ok or self.trust_deployed_code

    def require_evaluate(self) -> None:
        """Raise SandboxUnavailable unless ad-hoc scripts may run."""
        if not self.ok:
            raise SandboxUnavailable(info=self._why())

    def require_deployed(self) -> None:
        """Raise SandboxUnavailable unless deployed endpoints may run (and be deployed)."""
        if not self.deployed_allowed:
            raise SandboxUnavailable(
                info=self._why() + " Deployed code is refused as well because "
                "TABSERVE_TRUST_DEPLOYED_CODE is false."
            )

    def _why(self) -> str:
        return f"The {self.mode} sandbox self-check failed: " + "; ".join(self.problems) + "."

    def readiness(self) -> tuple[bool, str]:
        """The ``sandbox`` readiness check: not ready while nothing may run.

        /health/ready is public, so the detail names no problem (they say which secrets
        scripts could read); /info, behind authentication, and the log do.
        """
        if self.ok:
            return True, f"{self.mode}: self-check passed"
        if self.trust_deployed_code:
            return True, f"{self.mode}: self-check failed; serving deployed code only"
        return False, f"{self.mode}: self-check failed"

    def info(self) -> dict[str, Any]:
        """The ``sandbox`` member of /info (present only when the check failed)."""
        return {
            "mode": self.mode,
            "self_check": "passed" if self.ok else "failed",
            "problems": self.problems,
            "query_enabled": self.deployed_allowed,
        }


# -- planning --------------------------------------------------------------------------


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


def _hide_plan(secrets: list[str], needed: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """What to hide for each secret file, and warnings where that falls short.

    A mount over the file itself does not last: replacing the file by rename on the host
    (``tabserve user``, any editor, a certificate renewal) detaches the mount in the sandbox
    and the new file shows through. So the directory holding the file is hidden instead,
    and for a symlink also the directory of its target (where renewals put the new key),
    unless the directory holds something workers need.
    """
    hidden: list[str] = []
    notes: list[tuple[str, str]] = []
    for secret in secrets:
        for path in dict.fromkeys((secret, os.path.realpath(secret))):
            directory = os.path.dirname(path)
            shared = directory in _SHARED_DIRS or any(_within(n, [directory]) for n in needed)
            if not shared:
                hidden.append(directory)
                continue
            hidden.append(path)
            notes.append(
                (
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
        # writable (it must exist to be mounted). After a rotation they keep writing to the
        # old file until they are replaced: the mount pins it.
        log_file = str(settings.log_file)
        with open(log_file, "a", encoding="utf-8"):
            pass
        args += [*_parents(log_file, covered), "--bind", log_file, log_file]
    args += ["--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp"]
    return tuple(args)


def confinement(settings: Settings, mode: str | None = None) -> Confinement:
    """Decide how workers are launched and limited. Creates the archive directory.

    Raises ConfigError when TABSERVE_WORKER_USER names no user.
    """
    mode = mode or settings.sandbox
    root = os.geteuid() == 0
    drop_to = worker_ids(settings.worker_user, mode)
    archives = archive_dir(settings.state_path)
    # It must exist before the workers start: bubblewrap mounts it, workers keep it open.
    archives.mkdir(parents=True, exist_ok=True)
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
    )


# -- checking --------------------------------------------------------------------------


def preflight(confined: Confinement) -> str | None:
    """Why the launcher cannot start an interpreter at all, or None when it can."""
    if not confined.prefix:
        return None
    if not os.path.isabs(confined.prefix[0]):
        return "bubblewrap (bwrap) is not installed; install the bubblewrap package"
    try:
        done = subprocess.run(
            [*confined.prefix, sys.executable, "-c", "pass"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap could not be run: {exc}"
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        return "bubblewrap failed: " + (detail[-1] if detail else f"exit code {done.returncode}")
    return None


def _expected_env(settings: Settings, mode: str) -> set[str]:
    names = set(settings.worker_env) | set(SINGLE_THREADED) | {"PYTHONUNBUFFERED"}
    if mode == BUBBLEWRAP:
        names |= {"HOME", "TMPDIR", "PWD"}  # set by the launcher (PWD by bwrap itself)
    return names


def assess(
    settings: Settings, confined: Confinement, result: dict[str, Any]
) -> list[tuple[str, str]]:
    """Turn what the self-check job saw into findings; errors are broken promises of the mode."""
    strict = confined.mode == BUBBLEWRAP
    findings: list[tuple[str, str]] = []

    def add(held: bool, level: str, good: str, bad: str) -> None:
        findings.append((OK, good) if held else (level, bad))

    uid = result["uid"]
    if confined.drop_to is not None:
        add(
            uid == confined.drop_to[0] and result["euid"] == uid,
            ERROR,
            f"user code runs as uid {uid} (TABSERVE_WORKER_USER = {settings.worker_user})",
            f"user code runs as uid {uid}, not as {settings.worker_user}",
        )
    elif uid == 0:
        why = (
            "user 'nobody' cannot read the Python installation, so TABSERVE_WORKER_USER = "
            "auto kept root; install Python where 'nobody' can read it, name another user, "
            "or use TABSERVE_SANDBOX = bubblewrap"
            if settings.worker_user == AUTO_USER
            else f"TABSERVE_WORKER_USER = {settings.worker_user}"
        )
        findings.append(
            (
                ERROR if strict else WARNING,
                f"user code runs as root ({why}): it can read every root-owned file it can see",
            )
        )
    else:
        findings.append((INFO, f"user code runs as the server's own user (uid {uid})"))
    add(
        uid == 0 or result["capabilities"] == 0,
        ERROR,
        "user code holds no capabilities",
        f"user code holds capabilities (CapEff {result['capabilities']:#x})",
    )
    extra = sorted(set(result["env"]) - _expected_env(settings, confined.mode))
    add(
        not extra,
        ERROR,
        "the environment holds only allow-listed variables",
        f"the environment holds variables outside TABSERVE_WORKER_ENV: {', '.join(extra)}",
    )
    _assess_limits(settings, confined, result, findings)

    if result.get("server_environ"):
        findings.append(
            (
                ERROR if strict or confined.drop_to else WARNING,
                "scripts can read the server's environment through /proc/<pid>/environ "
                "(workers run as the server's user)",
            )
        )
    else:
        findings.append((OK, "scripts cannot read the server's environment"))
    for path, readable in sorted(result.get("secrets", {}).items()):
        add(
            not readable,
            ERROR if strict else WARNING,
            f"{path} cannot be read",
            f"scripts can read {path}",
        )
    findings += confined.notes
    if strict:
        listing = result.get("state_listing") or []
        add(
            set(listing) <= {ARCHIVE_DIR_NAME},
            ERROR,
            "the state directory is hidden (only the endpoint archives are visible)",
            f"scripts can see the state directory: {', '.join(listing)}",
        )
    add(
        not result.get("state_writable"),
        ERROR if strict else WARNING,
        "scripts cannot write into the state directory",
        "scripts can write into the state directory",
    )
    if "outside_writable" in result:
        add(
            not result["outside_writable"],
            ERROR if strict else INFO,
            "the filesystem is read-only outside the private /tmp",
            "scripts can write outside /tmp",
        )
    if strict and not settings.sandbox_network:
        add(
            not result.get("connects"),
            ERROR,
            "scripts have no network (a loopback connection was refused)",
            "scripts can open network connections although TABSERVE_SANDBOX_NETWORK is false",
        )
    else:
        findings.append((INFO, "scripts can open network connections"))
    if not strict:
        findings.append(
            (
                INFO,
                "a timeout kills the worker's process group only: a process a script starts "
                "in a new session (os.setsid, start_new_session=True) outlives it; "
                "TABSERVE_SANDBOX = bubblewrap kills it too (its own PID namespace)",
            )
        )
    add(
        bool(result.get("archives_readable")),
        WARNING,
        "workers can read the deployed endpoint archives",
        f"workers cannot read {confined.archive_dir}: deployed endpoints will fail to load",
    )
    add(
        result["tmp_writable"],
        WARNING,
        "scripts have a writable /tmp",
        "scripts cannot write to their temporary directory",
    )
    add(
        result["stdlib_readable"],
        ERROR if confined.drop_to else WARNING,
        "the worker user can read the Python installation",
        f"the worker user cannot read {result['stdlib']}: scripts would fail as soon as they "
        "need a module not loaded yet; install Python where that user can read it, set "
        "TABSERVE_WORKER_USER to a user that can, or use TABSERVE_SANDBOX = bubblewrap "
        "(which mounts the installation where the worker user can read it)",
    )
    return findings


def _assess_limits(
    settings: Settings, confined: Confinement, result: dict[str, Any], findings: list[Any]
) -> None:
    mib = 1024 * 1024
    expected = {
        "as": settings.worker_memory_mb * mib,
        "fsize": confined.limits.get("fsize", 0) * mib,
        "nofile": confined.limits.get("nofile", 0),
        "nproc": confined.limits.get("nproc", 0),
    }
    limits = result["limits"]
    for name, value in expected.items():
        if value <= 0:
            continue
        held = limits.get(name) == value
        findings.append(
            (OK, f"RLIMIT_{name.upper()} is {value}")
            if held
            else (ERROR, f"RLIMIT_{name.upper()} is {limits.get(name)}, not {value}")
        )
    if settings.worker_cpu_seconds > 0:
        held = limits.get("cpu", resource.RLIM_INFINITY) != resource.RLIM_INFINITY
        findings.append(
            (OK, f"the CPU backstop is {settings.worker_cpu_seconds} s per request")
            if held
            else (ERROR, "RLIMIT_CPU is not set")
        )
    if confined.nproc_note:
        findings.append((INFO, confined.nproc_note))


def _start_ticks() -> str | None:
    """This process's start time as the self-check job reads it (worker.self_check's
    start_ticks, not imported: the server does not import worker modules)."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


async def run_self_check(
    settings: Settings, confined: Confinement, executor: Executor
) -> SandboxReport:
    """Have a worker try the denied actions; judge the result."""
    secrets = list(confined.secrets or confined.hidden)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        params = {
            "secrets": secrets,
            "state": confined.state_path,
            "archive_dir": confined.archive_dir,
            "outside": "/var/tmp" if os.path.isdir("/var/tmp") else "",
            "port": listener.getsockname()[1],
            "server_pid": os.getpid(),
            "server_start": _start_ticks(),
        }
        try:
            result = await executor.run("self_check", b"", _SELF_CHECK_TIMEOUT, {"params": params})
        except TabserveError as exc:
            error = f"the self-check job failed: {exc}"
            return SandboxReport.from_findings(
                confined.mode, [(ERROR, error)], settings.trust_deployed_code
            )
    findings = assess(settings, confined, orjson.loads(result.body))
    return SandboxReport.from_findings(confined.mode, findings, settings.trust_deployed_code)


async def start_pool(settings: Settings, workers: int = 0) -> tuple[Executor, SandboxReport]:
    """Start the worker pool confined as configured, and check that the confinement holds.

    When bubblewrap cannot start at all, the pool starts without it (so that trusted deployed
    code keeps working) and the report fails. Raises what ``Executor.start`` raises when even
    that is impossible, and ConfigError for an unknown worker user.
    """
    confined = confinement(settings)
    failure = preflight(confined)
    if failure:
        log.error("sandbox: %s; user code will be refused", failure)
        confined = confinement(settings, NONE)
    executor = Executor(pool_config(settings, confined, workers))
    await executor.start()
    try:
        report = await run_self_check(settings, confined, executor)
    except BaseException:
        await executor.close()
        raise
    if failure:
        report = SandboxReport.from_findings(
            settings.sandbox,
            [(ERROR, failure), *((INFO, m) for level, m in report.findings if level != OK)],
            settings.trust_deployed_code,
        )
    for level, message in report.findings:
        if level == ERROR:
            log.error("sandbox: %s", message)
        elif level == WARNING:
            log.warning("sandbox: %s", message)
    return executor, report


async def _check_alone(settings: Settings) -> SandboxReport:
    try:
        executor, report = await start_pool(settings, workers=1)
    except (RuntimeError, OSError, ConfigError) as exc:
        return SandboxReport.from_findings(
            settings.sandbox, [(ERROR, f"workers cannot start: {exc}")]
        )
    await executor.close()
    return report


def self_check(settings: Settings) -> SandboxReport:
    """Start one confined worker, check it, stop it: what the server would find at start-up.

    For ``tabserve doctor``; must not be called from a running event loop.
    """
    return asyncio.run(_check_alone(settings))
