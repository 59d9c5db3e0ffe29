"""Logging: where lines go, their format, and the call id that ties a request's lines together.

The server and its workers both call ``configure`` with the same settings, so every line of a
deployment lands in one place (stderr by default, or ``TABSERVE_LOG_FILE``) in one format:
``text`` (``time LEVEL logger message``) or ``json`` (one object per line).

The call id of the request being handled lives in a context variable. The server sets it per
request (asyncio gives every request its own context), the executor sends it to the worker
with each job, and the worker sets it per job; each log line then names its request.

This module imports nothing from tabserve, so the worker can use it.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import logging.handlers
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

call_id: contextvars.ContextVar[str] = contextvars.ContextVar("tabserve_call_id", default="")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class AccessRecord:
    """The message of an access-log line: a summary plus named fields, rendered only if emitted.

    Building one costs a dict; turning it into text (or JSON) happens in the formatter, so a
    disabled log level costs nothing more.
    """

    __slots__ = ("fields", "summary")
    # Already in the summary (``METHOD path status Nms``), so not repeated in text lines.
    _SUMMARISED = frozenset({"method", "path", "status", "duration_ms"})

    def __init__(self, summary: str, fields: Mapping[str, Any]) -> None:
        self.summary = summary
        self.fields = fields

    def __str__(self) -> str:
        parts = [self.summary]
        for key, value in self.fields.items():
            if value is not None and value != "" and key not in self._SUMMARISED:
                parts.append(f"{key}={_quote(value)}")
        return " ".join(parts)


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    # Header values come from callers: quote anything that could split or forge a line.
    if not text or any(c.isspace() or c in '"=\\' or not c.isprintable() for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message``, plus ``call=<id>`` on lines written during a request."""

    def __init__(self, tag: str = "") -> None:
        fmt = _TEXT_FORMAT if not tag else _TEXT_FORMAT.replace("%(name)s", f"{tag} %(name)s")
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        current = getattr(record, "call_id", "")
        if current and not isinstance(record.msg, AccessRecord):
            head, newline, rest = line.partition("\n")  # keep a traceback below the line
            line = f"{head} call={current}{newline}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, call_id, fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
        }
        current = getattr(record, "call_id", "")
        if current:
            document["call_id"] = current
        if isinstance(record.msg, AccessRecord):
            document["message"] = record.msg.summary
            document.update(record.msg.fields)
        else:
            document["message"] = record.getMessage()
        if record.exc_info:
            document["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


class _CallIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "call_id"):
            record.call_id = call_id.get()
        return True


def configure(level: str, fmt: str = "text", file: Path | str | None = None, tag: str = "") -> None:
    """Send every log record at ``level`` or above to ``file`` (or stderr) in ``fmt``.

    ``tag`` (e.g. ``worker[1234]``) is shown in text lines; JSON lines always carry the pid.
    """
    if file:
        # Reopens the file when logrotate has moved it away; appends are line-sized writes,
        # so the server's and the workers' lines do not interleave mid-line.
        handler: logging.Handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(tag))
    handler.addFilter(_CallIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
