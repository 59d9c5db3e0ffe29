"""The Flight process's end of the control socket to the front end (see server/flight.py)."""

from __future__ import annotations

import concurrent.futures
import itertools
import socket
import threading
from typing import Any

from .. import fdpass

# How long a gRPC thread waits for the front end's answer before failing the call.
CONTROL_TIMEOUT = 60.0


class ControlChannel:
    """The Flight process's end of the control socket to the front end.

    Requests in both directions carry an ``id``; answers carry ``re``. Requests from the
    front end are handled on a small thread pool, so a slow one never holds up the
    authentication answers gRPC threads are waiting for.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._pending_lock = threading.Lock()
        self._closed = False

    def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        with self._send_lock:
            fdpass.send_message(self.sock, message, fds)

    def request(self, message: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        """Ask the front end and wait for its answer; OSError when it cannot be had."""
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._pending_lock:
            if self._closed:
                raise OSError("the front end is gone")
            ident = next(self._ids)
            self._pending[ident] = future
        try:
            self.send({**message, "id": ident})
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise OSError("the front end did not answer in time") from None
        finally:
            with self._pending_lock:
                self._pending.pop(ident, None)

    def resolve(self, message: dict[str, Any]) -> None:
        with self._pending_lock:
            future = self._pending.get(message.get("re", -1))
        if future is not None and not future.done():
            future.set_result(message)

    def fail_all(self) -> None:
        with self._pending_lock:
            self._closed = True
            pending = list(self._pending.values())
        for future in pending:
            if not future.done():
                future.set_exception(OSError("the front end is gone"))
