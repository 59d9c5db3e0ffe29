"""Starting the worker pool confined as planned, and running the self-check on it.

``start_pool`` prepares what the plan mounts (the archive directory, the log file), checks
that the launcher runs at all (``preflight``), starts the pool and sends one worker a
``self_check`` job, whose result ``assess`` judges. ``self_check`` does the same stand-alone
with one worker, for ``tabserve doctor``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys

import orjson

from ...config import ConfigError, Settings
from ...errors import TabserveError
from ...protocol import JobKind
from ..executor import Executor
from ..findings import ERROR, INFO, OK, WARNING, Finding
from .assess import SandboxReport, assess
from .plan import NONE, Confinement, confinement, pool_config

log = logging.getLogger("tabserve.sandbox")

_SELF_CHECK_TIMEOUT = 60.0


def prepare(settings: Settings, confined: Confinement) -> None:
    """Create what the plan needs to exist before workers start: the archive directory
    (bubblewrap mounts it, workers keep it open) and the log file (mounted writable)."""
    os.makedirs(confined.archive_dir, exist_ok=True)
    if settings.log_file is not None:
        with open(settings.log_file, "a", encoding="utf-8"):
            pass


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
            result = await executor.run(
                JobKind.SELF_CHECK, b"", _SELF_CHECK_TIMEOUT, {"params": params}
            )
        except TabserveError as exc:
            error = f"the self-check job failed: {exc}"
            return SandboxReport.from_findings(
                confined.mode, [Finding(ERROR, error)], settings.trust_deployed_code
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
    prepare(settings, confined)
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
            [
                Finding(ERROR, failure),
                *(Finding(INFO, m) for level, m in report.findings if level != OK),
            ],
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
            settings.sandbox, [Finding(ERROR, f"workers cannot start: {exc}")]
        )
    await executor.close()
    return report


def self_check(settings: Settings) -> SandboxReport:
    """Start one confined worker, check it, stop it: what the server would find at start-up.

    For ``tabserve doctor``; must not be called from a running event loop.
    """
    return asyncio.run(_check_alone(settings))
