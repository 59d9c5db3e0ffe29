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

import asyncio
import contextvars
import datetime
import json
import logging
import logging.handlers
import re
import sys
import time
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


# Characters that could split or forge a ``key=value`` text line (with ``isprintable``).
_UNSAFE = re.compile(r'[\s"=\\]')


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    # Header values come from callers: quote anything that could split or forge a line.
    # (str.isprintable and a compiled regex: a per-character Python loop showed up in
    # profiles of the server, which writes one such line per request.)
    if not text or not text.isprintable() or _UNSAFE.search(text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message``, plus ``call=<id>`` on lines written during a request."""

    def __init__(self, tag: str = "") -> None:
        fmt = _TEXT_FORMAT if not tag else _TEXT_FORMAT.replace("%(name)s", f"{tag} %(name)s")
        super().__init__(fmt)
        self._stamp = (-1, "")  # (second, its strftime): one tuple, so threads never mix them

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # The stdlib's format (``2026-01-02 03:04:05,678``), with strftime once a second rather
        # than once a line: the server writes an access line per request.
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created)))
            self._stamp = stamp
        return f"{stamp[1]},{int(record.msecs):03d}"

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


class _Coalescing(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one event-loop iteration with one write, at the end of it.

    In the server every request ends with an access line; a write and a flush per line was a
    system call per request on the event loop. Inside a running asyncio loop, lines below
    WARNING are kept until the loop's next turn (``call_soon``), so a burst of answers costs
    one write. Anywhere else (a worker, a thread, startup), and for WARNING and above, the line
    is written at once, after anything still kept, so the order of lines never changes.
    """

    terminator = "\n"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._kept.append(line)
        if record.levelno < logging.WARNING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                if len(self._kept) == 1:
                    loop.call_soon(self.flush)
                return
        self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            kept, self._kept = self._kept, []
            try:
                if kept:
                    self._write("".join(kept))
                super().flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "log write failed"}))

    def _write(self, text: str) -> None:
        self.stream.write(text)


class _CoalescingStream(_Coalescing):
    """stderr, written as ``_Coalescing`` says."""


class _CoalescingFile(_Coalescing, logging.handlers.WatchedFileHandler):
    """``TABSERVE_LOG_FILE``, written as ``_Coalescing`` says; reopened when logrotate has
    moved it away (checked per write, not per line)."""

    def _write(self, text: str) -> None:
        self.reopenIfNeeded()
        if self.stream is None:
            self.stream = self._open()
        self.stream.write(text)


def configure(level: str, fmt: str = "text", file: Path | str | None = None, tag: str = "") -> None:
    """Send every log record at ``level`` or above to ``file`` (or stderr) in ``fmt``.

    ``tag`` (e.g. ``worker[1234]``) is shown in text lines; JSON lines always carry the pid.
    """
    if file:
        # Reopens the file when logrotate has moved it away; appends are line-sized writes,
        # so the server's and the workers' lines do not interleave mid-line.
        handler: logging.Handler = _CoalescingFile(file, encoding="utf-8")
    else:
        handler = _CoalescingStream(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(tag))
    handler.addFilter(_CallIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
