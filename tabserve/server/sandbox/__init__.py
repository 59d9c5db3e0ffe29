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
job (``worker/self_check.py``) that tries the denied actions for real. The
``SandboxReport`` says what held. If the promised isolation does not hold, tabserve fails
closed: ``require_evaluate`` refuses ad-hoc code, and ``require_deployed`` refuses deployed
code unless the configuration trusts it. ``self_check`` runs the same check stand-alone,
for ``tabserve doctor``.

The package is in three parts: ``plan`` decides the confinement from the settings and
changes nothing; ``start`` prepares it, starts the pool and runs the self-check; ``assess``
judges what the self-check saw.
"""

from .assess import SandboxReport, assess
from .plan import (
    AUTO_USER,
    BUBBLEWRAP,
    NONE,
    Confinement,
    bubblewrap_prefix,
    closed_ancestor,
    confinement,
    pool_config,
    worker_ids,
)
from .start import preflight, prepare, run_self_check, self_check, start_pool

__all__ = [
    "AUTO_USER",
    "BUBBLEWRAP",
    "NONE",
    "Confinement",
    "SandboxReport",
    "assess",
    "bubblewrap_prefix",
    "closed_ancestor",
    "confinement",
    "pool_config",
    "preflight",
    "prepare",
    "run_self_check",
    "self_check",
    "start_pool",
    "worker_ids",
]
