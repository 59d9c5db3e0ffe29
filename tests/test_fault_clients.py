"""Clients that vanish, trickle, or sit idle: the server stays answering, nothing leaks.

Raw sockets, so that the test controls every byte. The timeouts are set short in the
servers here (TABSERVE_IDLE_TIMEOUT, TABSERVE_BODY_TIMEOUT); the bounds asserted are
liveness bounds with wide margins, not latency targets.
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import time
from collections.abc import Iterator

import pytest
import requests

from helpers import Server, ServerFactory

pytestmark = [pytest.mark.fault]

# Liveness: /info is answered by the event loop, never by a worker; seconds, not a target.
INFO_BOUND = 5.0


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def info_seconds(server: Server) -> float:
    started = time.monotonic()
    response = requests.get(server.url + "/info", timeout=INFO_BOUND * 2)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    return elapsed


def settled(server: Server) -> None:
    """Nothing in flight but the scrape itself, every worker idle and alive."""
    deadline = time.monotonic() + 15
    while True:
        in_flight = server.metric("tabserve_requests_in_flight")
        busy = server.metric("tabserve_workers_busy")
        alive = server.metric("tabserve_workers")
        if (in_flight, busy, alive) == (1, 0, 2) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (in_flight, busy, alive) == (1, 0, 2)
    assert server.evaluate("return [x * 3 for x in _arg1]", _arg1=[1, 2]).json() == [3, 6]


def closed_by_server(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading whatever it sends)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


@pytest.fixture(scope="module")
def strict(server_factory: ServerFactory) -> Server:
    """A server with short client timeouts."""
    return server_factory(
        TABSERVE_IDLE_TIMEOUT="2", TABSERVE_BODY_TIMEOUT="3", TABPY_EVALUATE_TIMEOUT="30"
    )


def test_clients_vanishing_mid_upload(strict: Server) -> None:
    body = json.dumps({"script": "return 1", "data": {"_arg1": list(range(400_000))}}).encode()
    head = (
        f"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for attempt in range(20):
        with connect(strict) as sock:
            sock.sendall(head + body[: len(body) * (attempt + 1) // 22])
    print(f"\n20 uploads cut off part-way; /info in {info_seconds(strict) * 1000:.0f} ms")
    assert info_seconds(strict) < INFO_BOUND
    settled(strict)


def test_clients_vanishing_mid_response(strict: Server) -> None:
    # About 8 MB of JSON: more than the socket buffers hold, so the server is mid-write.
    request = json.dumps({"script": "return list(range(1_000_000))", "data": {}}).encode()
    head = (
        f"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(request)}\r\n\r\n"
    ).encode()
    for _ in range(10):
        with connect(strict) as sock:
            sock.sendall(head + request)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    print(f"\n10 responses abandoned; /info in {info_seconds(strict) * 1000:.0f} ms")
    settled(strict)


def test_slowloris_headers_and_bodies_are_cut_off(strict: Server) -> None:
    header_socks = [connect(strict) for _ in range(50)]
    body_socks = [connect(strict) for _ in range(50)]
    for sock in header_socks:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n")
    for sock in body_socks:
        sock.sendall(
            b"POST /evaluate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
    started = time.monotonic()
    timings = []
    # Trickle one byte per connection every half second, past both timeouts (2 s, 3 s).
    while time.monotonic() - started < 4.5:
        for sock in header_socks:
            try:
                sock.sendall(b"X")
            except OSError:
                pass
        for sock in body_socks:
            try:
                sock.sendall(b" ")
            except OSError:
                pass
        timings.append(info_seconds(strict))
        time.sleep(0.5)
    cut = sum(closed_by_server(sock, 5) for sock in header_socks)
    cut_bodies = sum(closed_by_server(sock, 5) for sock in body_socks)
    for sock in header_socks + body_socks:
        sock.close()
    print(
        f"\nslowloris: {cut}/50 trickled headers and {cut_bodies}/50 trickled bodies cut off; "
        f"/info meanwhile: median {statistics.median(timings) * 1000:.0f} ms, "
        f"max {max(timings) * 1000:.0f} ms over {len(timings)} calls"
    )
    assert cut == 50
    assert cut_bodies == 50
    assert max(timings) < INFO_BOUND
    settled(strict)


@pytest.fixture
def many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_two_thousand_idle_keep_alive_connections(
    server_factory: ServerFactory, many_files: None
) -> None:
    server = server_factory(TABSERVE_IDLE_TIMEOUT="120")
    socks = []
    try:
        for _ in range(2000):
            sock = connect(server)
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        answered = 0
        for sock in socks:
            answered += sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert answered == 2000
        timings = [info_seconds(server) for _ in range(20)]
        # Still open: a second request on each of a sample of the idle connections.
        for sock in socks[::100]:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
    print(
        f"\n2000 idle keep-alive connections; /info: median "
        f"{statistics.median(timings) * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms"
    )
    assert max(timings) < INFO_BOUND
    settled(server)
