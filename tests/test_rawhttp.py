"""The conformance kit's raw POST: 100 Continue, early answers and chunked bodies, against
small scripted servers on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tabserve.commands.rawhttp import BadAnswer, post_expecting_continue

Script = Callable[[socket.socket], None]


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(4096)
        if not piece:
            break
        data += piece
    return data


@pytest.fixture
def serve() -> Iterator[Callable[[Script], int]]:
    """Run ``script`` on the first connection to a fresh loopback port; returns the port."""
    listeners: list[socket.socket] = []

    def start(script: Script) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                script(conn)

        threading.Thread(target=run, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


def post(port: int, size: int = 3 << 20) -> object:
    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    return post_expecting_continue(connect, f"127.0.0.1:{port}", "/evaluate", size, [], 10)


def test_the_body_follows_100_continue_and_a_chunked_answer_is_read_whole(
    serve: Callable[[Script], int],
) -> None:
    def script(conn: socket.socket) -> None:
        head = read_head(conn)
        assert b"expect: 100-continue" in head.lower()
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        received = len(head.split(b"\r\n\r\n", 1)[1])
        while received < 10:
            received += len(conn.recv(65536))
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
        )

    answer = post(serve(script), size=10)
    assert (answer.status, answer.body, answer.uploaded) == (200, b"hello, world", 10)  # type: ignore[attr-defined]


def test_a_refusal_before_100_continue_sends_no_body(serve: Callable[[Script], int]) -> None:
    def script(conn: socket.socket) -> None:
        read_head(conn)
        body = b'{"message": "too large"}'
        conn.sendall(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    answer = post(serve(script))
    assert (answer.status, answer.body, answer.uploaded) == (413, b'{"message": "too large"}', 0)  # type: ignore[attr-defined]


def test_an_answer_during_the_upload_stops_it(serve: Callable[[Script], int]) -> None:
    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(1 << 20):  # drain, as a server does before closing
            pass

    answer = post(serve(script), size=64 << 20)
    assert answer.status == 413 and answer.body == b"{}"  # type: ignore[attr-defined]
    assert 0 < answer.uploaded < 64 << 20  # type: ignore[attr-defined]


def test_garbage_is_a_bad_answer(serve: Callable[[Script], int]) -> None:
    def script(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    with pytest.raises(BadAnswer):
        post(serve(script))
