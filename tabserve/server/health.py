"""Readiness: a list of named checks; the server is ready when every one of them passes.

Each check is a function answering ``(ok, detail)``, or an awaitable of that. Other parts of
the server add theirs with ``Readiness.add`` (``app.serve`` wires the built-in ones), so the
``/health/ready`` handler knows none of them by name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tabserve.health")

Verdict = tuple[bool, str]
ReadinessCheck = Callable[[], Verdict | Awaitable[Verdict]]


@dataclass(frozen=True)
class ReadinessOutcome:
    name: str
    ok: bool
    detail: str

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class Readiness:
    """Named checks, run in the order they were added."""

    def __init__(self) -> None:
        self._checks: dict[str, ReadinessCheck] = {}

    def add(self, name: str, check: ReadinessCheck) -> None:
        """Add ``check``, or replace the one of the same name (e.g. a placeholder)."""
        self._checks[name] = check

    async def run(self) -> tuple[bool, list[ReadinessOutcome]]:
        outcomes = []
        for name, check in self._checks.items():
            try:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                ok, detail = result
            except Exception as exc:  # a broken check means "not ready", never a 500
                log.exception("readiness check %s failed", name)
                ok, detail = False, f"the check itself failed: {type(exc).__name__}"
            outcomes.append(ReadinessOutcome(name, bool(ok), detail))
        return all(o.ok for o in outcomes), outcomes
