"""A POST that sends its body only after ``100 Continue``, as curl does with large bodies.

``http.client`` sends the body straight after the headers, so it cannot show how a server
treats ``Expect: 100-continue``: whether it refuses an oversized body before the upload
(TabPy's 413) or only after. This module speaks HTTP/1.1 through h11, which parses the
answer exactly (interim ``100`` responses, ``Content-Length`` and chunked bodies) while this
code decides when to send. It imports nothing from tabserve; the conformance kit
(``commands/check.py``) uses it.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11

# How long to wait for 100 Continue before sending the body anyway (curl waits 1 s; a
# server that ignores Expect never answers it).
CONTINUE_WAIT = 3.0
_CHUNK = 1 << 20


class BadAnswer(ValueError):
    """The server's answer is not valid HTTP/1.1."""


@dataclass
class Answer:
    status: int
    body: bytes
    uploaded: int  # body bytes sent before the server answered (0: refused up front)


def post_expecting_continue(
    connect: Callable[[], socket.socket],
    host: str,
    path: str,
    size: int,
    headers: list[tuple[str, str]],
    timeout: float,
) -> Answer:
    """POST ``size`` bytes of spaces to ``path`` on a fresh connection from ``connect``.

    The body goes only once the server says ``100 Continue`` (or says nothing for
    ``CONTINUE_WAIT`` seconds), and stops as soon as the server answers.
    """
    connection = h11.Connection(h11.CLIENT)
    sock = connect()
    deadline = time.monotonic() + timeout
    try:
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("Host", host),
                ("Content-Length", str(size)),
                ("Expect", "100-continue"),
                ("Connection", "close"),
                *headers,
            ],
        )
        sock.sendall(connection.send(request))
        uploaded = 0
        event = _next_event(connection, sock, time.monotonic() + CONTINUE_WAIT)
        if event is None or isinstance(event, h11.InformationalResponse):
            uploaded, event = _upload(connection, sock, size)
        while not isinstance(event, h11.Response):
            if isinstance(event, h11.ConnectionClosed):
                raise BadAnswer("the server closed the connection without an answer")
            event = _next_event(connection, sock, deadline, required=True)
        status = event.status_code
        body = b""
        while True:
            event = _next_event(connection, sock, deadline, required=True)
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return Answer(status, body, uploaded)
    except h11.RemoteProtocolError as exc:
        raise BadAnswer(f"the answer is not valid HTTP/1.1: {exc}") from None
    finally:
        sock.close()


def _upload(
    connection: h11.Connection, sock: socket.socket, size: int
) -> tuple[int, h11.Event | None]:
    """Send the body, stopping at the first event the server sends meanwhile."""
    chunk = b" " * _CHUNK
    sent = 0
    while sent < size:
        piece = chunk[: min(_CHUNK, size - sent)]
        try:
            sock.sendall(connection.send(h11.Data(data=piece)))
        except OSError:
            break  # the server answered and closed: read what it said
        sent += len(piece)
        event = _next_event(connection, sock, time.monotonic())  # an early answer?
        if event is not None and not isinstance(event, h11.InformationalResponse):
            return sent, event
    else:
        sock.sendall(connection.send(h11.EndOfMessage()))
    return sent, None


def _next_event(
    connection: h11.Connection, sock: socket.socket, until: float, *, required: bool = False
) -> h11.Event | None:
    """The server's next event, reading until ``until``; None if nothing came in time
    (TimeoutError instead when ``required``)."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        ready, _, _ = select.select([sock], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            if required:
                raise TimeoutError("the server did not answer in time")
            return None
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        connection.receive_data(data)
