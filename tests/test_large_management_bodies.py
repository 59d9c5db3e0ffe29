"""A large management body is parsed without stopping the event loop (issue 10, part 4).

docs/architecture.md promises that no body stalls /info. A deploy body is the one kind the
server itself parses; a 40 MB one, parsed on the event loop, held every other request for
the whole parse. The test sends one over a raw socket, probes /info all the while, and
compares: with the parse on the loop, a probe sent just after the body waits for most of
the deploy's processing; with the parse off it, every probe answers in a fraction of it.
"""

from __future__ import annotations

import socket
import threading
import time

import requests

from helpers import Server


def big_deploy_body() -> bytes:
    # About 40 MB of numbers: slow to parse, cheap to free. Refused after the parse (no
    # src_path and no archive), so nothing is deployed.
    rows = b"0.123456," * 4_400_000
    return b'{"name": "big_one", "type": "model", "schema": {"rows": [' + rows + b"1]}}"


def post_raw(port: int, path: str, body: bytes) -> tuple[int, bytes, float, float]:
    """POST ``body``; returns the status, the answer, when the last byte was sent and when
    the answer came (perf_counter)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        sent = time.perf_counter()
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        answered = time.perf_counter()
    raw = b"".join(chunks)
    status = int(raw.split(b" ", 2)[1])
    return status, raw.split(b"\r\n\r\n", 1)[1], sent, answered


def test_info_answers_while_a_40_mb_deploy_is_parsed(server: Server) -> None:
    body = big_deploy_body()
    assert len(body) > 39_000_000
    probes: list[tuple[float, float]] = []  # (sent, answered)
    stop = threading.Event()

    def probe() -> None:
        with requests.Session() as session:
            while not stop.is_set() and len(probes) < 5000:  # bounded in count and time
                started = time.perf_counter()
                assert session.get(server.url + "/info", timeout=60).status_code == 200
                probes.append((started, time.perf_counter()))
                time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.2)
        status, answer, sent, answered = post_raw(server.port, "/endpoints", body)
    finally:
        stop.set()
        prober.join(timeout=120)
    assert status == 400, answer[:300]
    assert b"src_path" in answer  # refused after the parse, not before
    processing = answered - sent
    during = [(a, b) for a, b in probes if sent <= a and b <= answered + 5]
    assert len(during) >= 3, (processing, len(probes))  # probes really ran meanwhile
    slowest = max(b - a for a, b in during)
    # Wide: the loop only ever waits for a GIL hand-off, the join and freeing the document,
    # a small part of the deploy's processing (which the parse dominates).
    assert slowest < 0.5 * processing, (slowest, processing)
