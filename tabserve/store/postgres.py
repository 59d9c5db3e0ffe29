"""The PostgreSQL store: the SQL store plus change notifications for the replicas.

A listener thread holds its own connection, runs ``LISTEN tabserve_changes`` and calls
``on_change`` for every notification. Notifications are delivered at commit and never
replayed, so after every (re)connect it calls ``on_change`` once more: the replica then
compares the ``generation`` row with what it serves and reloads if it differs. While the
connection is down the listener retries with a growing pause (0.2 s to 2 s); what is loaded
keeps serving, and the readiness check reports the store as unreachable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from .database import CHANGES_CHANNEL, Database, StoreUnavailable
from .sql import SqlStore

log = logging.getLogger("tabserve.store")

# Also ask for the generation this often while idle: a connection that died without a word
# (a network partition) shows up here, and a missed notification is caught up.
_POLL_SECONDS = 5.0
_WAIT_SECONDS = 0.5
_RETRY_FIRST, _RETRY_MAX = 0.2, 2.0


class PostgresStore(SqlStore):
    """Everything in PostgreSQL; ``cache`` holds local copies of archives for the workers."""

    def __init__(self, url: str, cache: Path) -> None:
        super().__init__(Database(url), cache)
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._connected = False
        self._since = time.monotonic()  # when the listener last connected or lost it
        self._error = "not connected yet"
        self._latest: int | None = None  # the newest generation heard of

    def token(self) -> Hashable:
        """The newest generation the listener heard of (no query: cheap per request)."""
        return self._latest

    def watch(self, on_change: Callable[[], None]) -> None:
        """Start the listener thread; ``on_change`` is called from it."""
        if self._listener is not None:
            return
        self._listener = threading.Thread(
            target=self._listen, args=(on_change,), name="tabserve-store-listener", daemon=True
        )
        self._listener.start()

    def health(self) -> tuple[bool, str]:
        if self._connected:
            return True, f"{self.shown}: connected, listening for changes"
        down = time.monotonic() - self._since
        return False, f"{self.shown}: unreachable for {down:.0f} s ({self._error})"

    def _listen(self, on_change: Callable[[], None]) -> None:
        pause = _RETRY_FIRST
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = self.db.connect()
                conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                self._set_connected(True, "")
                pause = _RETRY_FIRST
                # Resync: whatever was committed while we were away was not notified.
                self._saw(_read_generation(conn), on_change)
                waited = 0.0
                while not self._stop.is_set():
                    # Each notification is acted on as it arrives. The short wait keeps
                    # close() quick; every _POLL_SECONDS the generation is read as well.
                    for note in conn.notifies(timeout=_WAIT_SECONDS):
                        with contextlib.suppress(ValueError):
                            self._saw(int(note.payload), on_change)
                    waited += _WAIT_SECONDS
                    if waited >= _POLL_SECONDS:
                        waited = 0.0
                        self._saw(_read_generation(conn), on_change)
            except StoreUnavailable as exc:
                self._set_connected(False, str(exc.info))
            except Exception as exc:  # psycopg errors: the connection is gone
                self._set_connected(False, _first_line(exc))
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._stop.wait(pause)
            pause = min(pause * 2, _RETRY_MAX)

    def _saw(self, generation: int, on_change: Callable[[], None]) -> None:
        if generation != self._latest:
            self._latest = generation
            on_change()

    def _set_connected(self, connected: bool, error: str) -> None:
        if connected != self._connected:
            self._since = time.monotonic()
            if connected:
                log.info("store %s: listening for changes", self.shown)
            else:
                log.warning("store %s: lost the connection: %s", self.shown, error)
        self._connected = connected
        self._error = error or self._error

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=_WAIT_SECONDS * 4)
            self._listener = None
        super().close()


def _read_generation(conn: Any) -> int:
    return int(conn.execute("SELECT value FROM generation WHERE id = 1").fetchone()[0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
