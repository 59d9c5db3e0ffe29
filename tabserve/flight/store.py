"""The Flight process's tables: sealed Arrow IPC memfds by (owner, path), with expiry and a cap."""

from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc

from .. import fdpass


class StoreFull(Exception):
    """Storing a table would take the store over its size cap."""


@dataclass
class StoredTable:
    owner: str
    path: tuple[str, ...]
    fd: int  # a sealed memfd holding an Arrow IPC file
    size: int
    rows: int
    schema: pa.Schema
    expires: float  # time.monotonic()


class TableStore:
    """Tables by (owner, path), with an expiry and a total size cap. Thread-safe.

    gRPC calls run on a pool of threads and control requests on others: every read and
    write of the dict happens under ``_lock`` (TabPy shares its dict without one).
    """

    def __init__(self, ttl: float, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._tables: dict[tuple[str, tuple[str, ...]], StoredTable] = {}
        self._bytes = 0

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def room(self, owner: str, path: tuple[str, ...]) -> int:
        """Bytes a table stored at (owner, path) may take now (a replaced table's count)."""
        with self._lock:
            old = self._tables.get((owner, path))
            return self.max_bytes - self._bytes + (old.size if old else 0)

    def put(
        self, owner: str, path: tuple[str, ...], fd: int, rows: int, schema: pa.Schema
    ) -> StoredTable:
        """Store (or replace) a table; takes ownership of ``fd`` only when it succeeds."""
        size = fdpass.file_size(fd)
        entry = StoredTable(owner, path, fd, size, rows, schema, time.monotonic() + self.ttl)
        with self._lock:
            old = self._tables.get((owner, path))
            held = self._bytes - (old.size if old else 0)
            if held + size > self.max_bytes:
                raise StoreFull(
                    f"storing {size} bytes would exceed the Flight store's cap of "
                    f"{self.max_bytes} bytes (TABSERVE_FLIGHT_MAX_MB); {held} are in use"
                )
            self._tables[(owner, path)] = entry
            self._bytes = held + size
        if old is not None:
            os.close(old.fd)
        return entry

    def get(self, owner: str, path: tuple[str, ...]) -> StoredTable | None:
        """The live table at (owner, path), left in place."""
        with self._lock:
            entry = self._tables.get((owner, path))
            if entry is None or entry.expires > time.monotonic():
                return entry
            self._drop(entry)
        return None

    def pop(self, owner: str, path: tuple[str, ...]) -> StoredTable | None:
        """Remove and return the live table at (owner, path); the caller closes its fd."""
        with self._lock:
            entry = self._tables.pop((owner, path), None)
            if entry is None:
                return None
            self._bytes -= entry.size
        if entry.expires <= time.monotonic():
            os.close(entry.fd)
            return None
        return entry

    def owned_by(self, owner: str) -> list[StoredTable]:
        now = time.monotonic()
        with self._lock:
            return [t for t in self._tables.values() if t.owner == owner and t.expires > now]

    def clear(self) -> int:
        with self._lock:
            entries = list(self._tables.values())
            self._tables.clear()
            self._bytes = 0
        fdpass.close_all([entry.fd for entry in entries])
        return len(entries)

    def sweep(self) -> int:
        """Drop expired tables; how many went."""
        now = time.monotonic()
        with self._lock:
            expired = [t for t in self._tables.values() if t.expires <= now]
            for entry in expired:
                self._drop(entry)
        return len(expired)

    def _drop(self, entry: StoredTable) -> None:  # with _lock held
        del self._tables[(entry.owner, entry.path)]
        self._bytes -= entry.size
        os.close(entry.fd)


def read_table(fd: int) -> pa.Table:
    """The Arrow IPC file in ``fd``, zero-copy over a read-only mapping."""
    size = fdpass.file_size(fd)
    if size == 0:
        raise ValueError("empty file")
    mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    return pyarrow.ipc.open_file(pa.py_buffer(mapped)).read_all()


def describe_file(fd: int) -> tuple[int, pa.Schema]:
    """Rows and schema of the Arrow IPC file in ``fd``, each batch checked; ValueError if bad.

    Results come from workers, which run user code: the file is validated before the store
    accepts it, so a malformed one fails here, not in a later DoGet.
    """
    try:
        table = read_table(fd)
        table.validate()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"not a valid Arrow IPC file: {exc}") from None
    return table.num_rows, table.schema
