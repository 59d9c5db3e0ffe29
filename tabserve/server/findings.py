"""What a check found, and how much it matters: one type for the sandbox self-check, the
TLS file checks and ``tabserve doctor``'s checklist."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Level(str, Enum):
    """How much a finding matters, mildest first. Only ``error`` fails a check."""

    OK = "ok"  # something promised holds
    INFO = "info"  # worth knowing; nothing to fix
    WARNING = "warning"  # works, but should be fixed
    ERROR = "error"  # broken: the check fails

    def __str__(self) -> str:
        return self.value


OK, INFO, WARNING, ERROR = Level.OK, Level.INFO, Level.WARNING, Level.ERROR


class Finding(NamedTuple):
    """One thing a check found, in a sentence for the operator."""

    level: Level
    message: str
