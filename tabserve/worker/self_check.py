"""The sandbox self-check, in a worker: try what a hostile script would try.

The server's self-check (``server.sandbox``) sends a worker a ``self_check`` job naming
secrets, the state directory, a listening port and its own pid. ``run`` attempts each denied
action for real (read, write, connect) and reports what happened; it judges nothing, the
server does. Everything it creates it removes again.
"""

from __future__ import annotations

import os
import resource
import socket
import sysconfig
import uuid
from typing import Any

LIMITS = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
}


def readable(path: str) -> bool:
    """Whether at least one byte of ``path`` can be read (an empty stand-in does not count).

    A directory is readable when it can be listed and is not empty: open() would fail on
    any directory, hidden or not.
    """
    if os.path.isdir(path):
        return bool(listing(path))
    try:
        with open(path, "rb") as handle:
            return bool(handle.read(1))
    except OSError:
        return False


def listing(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def writable(directory: str) -> bool:
    """Whether a new file can be created in ``directory``; it is removed at once."""
    name = os.path.join(directory, f".tabserve-self-check-{uuid.uuid4().hex}")
    try:
        handle = open(name, "xb")  # closed just below, whatever happens
    except OSError:
        return False
    try:
        with handle:
            handle.write(b"x")
    except OSError:
        pass  # created is what counts: a full disk does not make the directory safe
    finally:
        try:
            os.unlink(name)  # on a full disk too: the probe leaves nothing behind
        except OSError:
            pass
    return True


def connects(port: int) -> bool:
    # A numeric address and no getaddrinfo: nothing here may fail for another reason than
    # the connection itself (anything else propagates, and fails the check).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/<pid>/stat), or None if not visible.

    A pid alone does not name the server inside a PID namespace: in a container the server
    is often pid 1, and so is bubblewrap's own init in the sandbox.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19].decode() if len(fields) > 19 else None


def effective_capabilities() -> int:
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return -1


def run(params: dict[str, Any]) -> dict[str, Any]:
    """Try every action in ``params``; return what succeeded.

    Only the refusals expected of a sandbox (OSError) count as "denied"; any other exception
    propagates, so that a check that could not look counts as failed.
    """
    stdlib = sysconfig.get_path("stdlib")
    result: dict[str, Any] = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "capabilities": effective_capabilities(),
        "limits": {name: resource.getrlimit(limit)[1] for name, limit in LIMITS.items()},
        "env": sorted(os.environ),
        "secrets": {path: readable(path) for path in params.get("secrets", [])},
        "stdlib": stdlib,
        "stdlib_readable": listing(stdlib) is not None,
        "tmp_writable": writable(params.get("tmp", "/tmp")),
    }
    state = params.get("state")
    if state:
        result["state_listing"] = listing(state)
        result["state_writable"] = writable(state)
    archive_dir = params.get("archive_dir")
    if archive_dir:
        result["archives_readable"] = listing(archive_dir) is not None
    outside = params.get("outside")
    if outside:
        result["outside_writable"] = writable(outside)
    port = params.get("port")
    if port:
        result["connects"] = connects(int(port))
    pid = params.get("server_pid")
    if pid:
        # Only the server's own process counts: the same pid may be another process here.
        same = start_ticks(int(pid)) == params.get("server_start")
        result["server_environ"] = same and readable(f"/proc/{int(pid)}/environ")
    return result
