"""One SQL database, SQLite or PostgreSQL, behind the same small interface.

Every method blocks: call them from a thread (``asyncio.to_thread``), never on the event
loop. A ``Database`` is safe to share between threads: it holds one connection and uses it
under a lock, which suits a store whose writes are rare (deploys, user edits) and whose reads
are whole-table reloads after a change.

Queries are written once, with ``?`` placeholders; the PostgreSQL connection rewrites them to
``%s``. Both dialects accept the rest of the SQL used here (``ON CONFLICT``, ``RETURNING``).

* ``write()`` is an exclusive transaction: SQLite's ``BEGIN IMMEDIATE`` (other processes wait
  on the database lock, up to the busy timeout) or, in PostgreSQL, a transaction that first
  takes a transaction-scoped advisory lock, so that every writer of every replica queues on
  it. Read-modify-write inside it cannot lose an update.
* A connection that fails raises :class:`StoreUnavailable` and is reopened on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import StoreUnavailable
from .schema import HISTORY, LATEST, Dialect, pending

log = logging.getLogger("tabserve.store")

# pg_advisory_xact_lock key every writer takes ("tabs" in ASCII): one writer at a time.
_WRITE_LOCK_KEY = 0x74616273
CHANGES_CHANNEL = "tabserve_changes"


_DISK_HINT = " (is its disk full or read-only?)"


class StoreError(Exception):
    """The store is unusable as configured (wrong schema version, bad URL): stop the start."""


class Tx(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class _Cursor:
    """A transaction's view: ``execute`` returns all rows (an empty list for statements)."""

    def __init__(self, conn: Any, postgres: bool) -> None:
        self._conn = conn
        self._postgres = postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._postgres:
            sql = sql.replace("?", "%s")
        cursor = self._conn.execute(sql, tuple(params))
        if cursor.description is None:
            return []
        return [tuple(row) for row in cursor.fetchall()]


class Database:
    """A connection to ``url``: ``sqlite:///path`` or ``postgresql://...``."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.dialect: Dialect = "postgresql" if _is_postgres(url) else "sqlite"
        self._connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: Any = None

    @property
    def shown(self) -> str:
        """The URL without its password, for logs and /health/ready."""
        return redact(self.url)

    # -- connections -----------------------------------------------------------------------

    def connect(self) -> Any:
        """A new connection (the listener of notifications has its own)."""
        if self.dialect == "postgresql":
            import psycopg

            try:
                return psycopg.connect(
                    self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))
                )
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(info=f"{self.shown}: {_first_line(exc)}") from exc
        path = _sqlite_path(self.url)
        try:
            conn = sqlite3.connect(
                path, timeout=self._connect_timeout, isolation_level=None, check_same_thread=False
            )
            # WAL: readers never wait for the writer, and a killed writer leaves the last
            # committed state. NORMAL sync is durable against a process kill (the WAL is in the
            # OS cache); only a power loss may drop the last transactions, never corrupt it.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.OperationalError as exc:
            # WAL needs room for its -shm and -wal files even to read: on a full (or
            # read-only) disk this is where it fails. One line, not a traceback.
            raise StoreUnavailable(info=f"{self.shown}: {exc}{_DISK_HINT}") from exc
        return conn

    def _connection(self) -> Any:
        if self._conn is None or _is_broken(self._conn):
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._conn = None
            self._conn = self.connect()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[Tx]:
        """An exclusive read-write transaction; committed when the block ends without error."""
        with self._transaction(exclusive=True) as tx:
            yield tx

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction: one consistent snapshot of every table."""
        with self._transaction(exclusive=False) as tx:
            yield tx

    @contextlib.contextmanager
    def _transaction(self, exclusive: bool) -> Iterator[Tx]:
        with self._lock, self._errors():
            tx = self._begin(exclusive)
            try:
                yield tx
            except BaseException:
                with contextlib.suppress(Exception):
                    tx.execute("ROLLBACK")
                raise
            tx.execute("COMMIT")

    def _begin(self, exclusive: bool) -> _Cursor:
        """Start a transaction. A connection that died while idle (the server restarted) is
        only found out by using it: then, and only before any work, reconnect once."""
        postgres = self.dialect == "postgresql"
        for attempt in (1, 2):
            tx = _Cursor(self._connection(), postgres)
            try:
                if not postgres:
                    tx.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
                elif exclusive:
                    tx.execute("BEGIN")
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_KEY,))
                else:
                    tx.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return tx
            except Exception as exc:
                if attempt == 2 or not (postgres and _is_connection_error(exc)):
                    raise
                self.close_quietly()
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Connection failures become StoreUnavailable (503); the connection is reopened."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            # "database is locked" after the busy timeout: another process holds it too long.
            # Anything else (a missing table, bad SQL) is a bug and stays what it is.
            if any(word in str(exc) for word in ("disk", "readonly")):
                raise StoreUnavailable(info=f"{self.shown}: {exc}{_DISK_HINT}") from exc
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            raise StoreUnavailable(info=f"{self.shown}: {exc}") from exc
        except Exception as exc:
            if self.dialect == "postgresql" and _is_connection_error(exc):
                self.close_quietly()
                raise StoreUnavailable(info=f"{self.shown}: {_first_line(exc)}") from exc
            raise

    def close_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- schema ----------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The number of the last migration applied (0 for an empty database)."""
        with self.read() as tx:
            if not self._has_history(tx):
                return 0
            rows = tx.execute(f"SELECT MAX(number) FROM {HISTORY.name}")
            return int(rows[0][0] or 0)

    def _has_history(self, tx: Tx) -> bool:
        if self.dialect == "postgresql":
            rows = tx.execute("SELECT to_regclass(?)", (HISTORY.name,))
            return rows[0][0] is not None
        rows = tx.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (HISTORY.name,)
        )
        return bool(rows)

    def migrate(self) -> list[int]:
        """Apply the migrations this database lacks, in one transaction; returns their numbers.

        Several replicas starting at once queue on the write lock; the first migrates and the
        others find nothing left to do. A database newer than this code stops the start.
        """
        with self.write() as tx:
            if not self._has_history(tx):
                for statement in HISTORY.ddl(self.dialect):
                    tx.execute(statement)
            rows = tx.execute(f"SELECT MAX(number) FROM {HISTORY.name}")
            applied = int(rows[0][0] or 0)
            if applied > LATEST:
                raise StoreError(
                    f"the store {self.shown} has schema version {applied}, newer than this "
                    f"tabserve knows ({LATEST}): upgrade tabserve"
                )
            done = []
            for migration in pending(applied):
                for statement in migration.statements(self.dialect):
                    tx.execute(statement)
                tx.execute(
                    f"INSERT INTO {HISTORY.name} (number, description, applied) VALUES (?, ?, ?)",
                    (migration.number, migration.description, time.time()),
                )
                done.append(migration.number)
        for number in done:
            log.info("store %s: applied migration %d", self.shown, number)
        return done

    def require_current(self) -> None:
        """Stop the start unless the schema is exactly the one this code expects."""
        version = self.schema_version()
        if version < LATEST:
            raise StoreError(
                f"the store {self.shown} has schema version {version}, this tabserve needs "
                f"{LATEST}: run `tabserve store migrate` (or set TABSERVE_STORE_MIGRATE = true)"
            )
        if version > LATEST:
            raise StoreError(
                f"the store {self.shown} has schema version {version}, newer than this "
                f"tabserve knows ({LATEST}): upgrade tabserve"
            )


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _sqlite_path(url: str) -> str:
    if not url.startswith("sqlite:///"):
        raise StoreError(f"not an SQLite URL: {url!r} (expected sqlite:///path)")
    return url[len("sqlite://") :]


def sqlite_url(path: Path) -> str:
    return f"sqlite://{path.resolve()}"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_broken(conn: Any) -> bool:
    return bool(getattr(conn, "closed", False) or getattr(conn, "broken", False))


def _is_connection_error(exc: Exception) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - only called with a PostgreSQL URL
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
