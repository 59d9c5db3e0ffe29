"""Judging the sandbox self-check: what a worker saw, turned into findings and a report.

The worker's side is ``worker.self_check``: it tries what the sandbox must deny and says
what happened; ``assess`` decides what each outcome means for the configured mode, and
``SandboxReport`` is the verdict handlers and readiness ask.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from ...config import Settings
from ...errors import SandboxUnavailable
from ...store.archives import ARCHIVE_DIR_NAME
from ..executor import SINGLE_THREADED
from ..findings import ERROR, INFO, OK, WARNING, Finding
from .plan import AUTO_USER, BUBBLEWRAP, Confinement


@dataclass
class SandboxReport:
    """What the self-check found. ``ok`` is false when any finding is an error."""

    mode: str
    ok: bool
    findings: list[Finding]
    trust_deployed_code: bool = False

    @classmethod
    def from_findings(
        cls, mode: str, findings: list[Finding], trust: bool = False
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


def _expected_env(settings: Settings, mode: str) -> set[str]:
    names = set(settings.worker_env) | set(SINGLE_THREADED) | {"PYTHONUNBUFFERED"}
    if mode == BUBBLEWRAP:
        names |= {"HOME", "TMPDIR", "PWD"}  # set by the launcher (PWD by bwrap itself)
    return names


def assess(settings: Settings, confined: Confinement, result: dict[str, Any]) -> list[Finding]:
    """Turn what the self-check job saw into findings; errors are broken promises of the mode."""
    strict = confined.mode == BUBBLEWRAP
    findings: list[Finding] = []

    def add(held: bool, level: str, good: str, bad: str) -> None:
        findings.append(Finding(OK, good) if held else Finding(level, bad))

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
            Finding(
                ERROR if strict else WARNING,
                f"user code runs as root ({why}): it can read every root-owned file it can see",
            )
        )
    else:
        findings.append(Finding(INFO, f"user code runs as the server's own user (uid {uid})"))
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
            Finding(
                ERROR if strict or confined.drop_to else WARNING,
                "scripts can read the server's environment through /proc/<pid>/environ "
                "(workers run as the server's user)",
            )
        )
    else:
        findings.append(Finding(OK, "scripts cannot read the server's environment"))
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
        findings.append(Finding(INFO, "scripts can open network connections"))
    if not strict and settings.worker_launch != "zygote":
        # The zygote kills a worker's whole process tree, setsid children included.
        findings.append(
            Finding(
                INFO,
                "a timeout kills the worker's process group only: a process a script starts "
                "in a new session (os.setsid, start_new_session=True) outlives it; "
                "TABSERVE_WORKER_LAUNCH = zygote or TABSERVE_SANDBOX = bubblewrap kill it too",
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
    settings: Settings, confined: Confinement, result: dict[str, Any], findings: list[Finding]
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
            Finding(OK, f"RLIMIT_{name.upper()} is {value}")
            if held
            else Finding(ERROR, f"RLIMIT_{name.upper()} is {limits.get(name)}, not {value}")
        )
    if settings.worker_cpu_seconds > 0:
        held = limits.get("cpu", resource.RLIM_INFINITY) != resource.RLIM_INFINITY
        findings.append(
            Finding(OK, f"the CPU backstop is {settings.worker_cpu_seconds} s per request")
            if held
            else Finding(ERROR, "RLIMIT_CPU is not set")
        )
    if confined.nproc_note:
        findings.append(Finding(INFO, confined.nproc_note))
