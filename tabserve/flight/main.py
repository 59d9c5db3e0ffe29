"""Entry point of the Flight process: ``python -c <bootstrap> PACKAGE_PARENT CONFIG_JSON``.

Started by ``server.flight.FlightService`` with numpy and pandas made unimportable. The main
thread reads the control socket: answers to its own questions go to the waiting gRPC
threads, and the front end's requests (take a table for a worker, store a result, stop) are
handled on a small pool.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.flight as flight

from .. import fdpass, logs
from .auth import AuthRelay
from .control import ControlChannel
from .service import TabserveFlightServer
from .store import StoreFull, TableStore, describe_file

log = logging.getLogger("tabserve.flight")


class FrontEndRequests:
    """What the front end asks of the store: take a table for a worker, store a result."""

    def __init__(self, store: TableStore, control: ControlChannel) -> None:
        self.store = store
        self.control = control

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        ident = message.get("id")
        try:
            answer, out = self._answer(message, fds)
        except Exception as exc:  # answered, not fatal: the front end turns it into a 500
            log.error("control request %s failed", message.get("op"), exc_info=exc)
            answer, out = {"error": "failed", "message": f"{type(exc).__name__}: {exc}"}, []
        finally:
            fdpass.close_all(fds)
        try:
            self.control.send({**answer, "re": ident}, out)
        finally:
            fdpass.close_all(out)

    def _answer(self, message: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        op = message.get("op")
        if op == "take":
            entry = self.store.pop(str(message["owner"]), (str(message["path"]),))
            if entry is None:
                return {"error": "not_found"}, []
            return {"rows": entry.rows, "size": entry.size}, [entry.fd]
        if op == "store":
            if len(fds) != 1 or not fdpass.is_sealed(fds[0]):
                return {"error": "invalid", "message": "the result is not a sealed table"}, []
            rows, schema = describe_file(fds[0])
            path = str(uuid.uuid4())
            kept = os.dup(fds[0])
            try:
                self.store.put(str(message["owner"]), (path,), kept, rows, schema)
            except StoreFull as exc:
                os.close(kept)
                return {"error": "full", "message": str(exc)}, []
            return {"path": path, "rows": rows}, []
        return {"error": "invalid", "message": f"unknown request {op!r}"}, []


def _sweeper(store: TableStore, stop: threading.Event) -> None:
    interval = max(0.2, min(store.ttl / 2, 30.0))
    while not stop.wait(interval):
        dropped = store.sweep()
        if dropped:
            log.info("%d expired tables dropped (TABSERVE_FLIGHT_TTL = %g s)", dropped, store.ttl)


def _tls(config: Mapping[str, Any]) -> list[flight.CertKeyPair] | None:
    if not config.get("tls"):
        return None
    with open(config["tls"]["cert"], "rb") as cert, open(config["tls"]["key"], "rb") as key:
        return [flight.CertKeyPair(cert.read(), key.read())]


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``CONFIG_JSON`` names the control socket's descriptor and the settings."""
    config: dict[str, Any] = orjson.loads((sys.argv[1:] if argv is None else argv)[0])
    logs.configure(
        config.get("log_level", "INFO"),
        config.get("log_format", "text"),
        config.get("log_file"),
        tag=f"flight[{os.getpid()}]",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when we stop
    sock = socket.socket(fileno=config["control_fd"])
    sock.setblocking(True)
    control = ControlChannel(sock)
    store = TableStore(float(config["ttl"]), int(config["max_bytes"]))
    scheme = "grpc+tls" if config.get("tls") else "grpc+tcp"
    try:
        server = TabserveFlightServer(
            f"{scheme}://{config['listen_host']}:{config['port']}",
            "",
            store,
            AuthRelay(control),
            _tls(config),
        )
    except (OSError, pa.ArrowException) as exc:
        control.send({"op": "failed", "message": str(exc).splitlines()[0]})
        return 1
    advertised = config.get("advertise") or f"{scheme}://{config['advertise_host']}:{server.port}"
    server.advertised = advertised
    stopping = threading.Event()
    requests = FrontEndRequests(store, control)
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="flight-control")

    def shut_down(by: str) -> None:
        # Called on the gRPC thread of the shutdown action: the main thread stops the server
        # (which waits for running calls, that one included) once the loop below ends.
        stopping.set()
        try:
            control.send({"op": "stopped", "by": by})
            sock.shutdown(socket.SHUT_RD)  # ends the receive loop
        except OSError:
            pass

    server.on_shutdown = shut_down
    threading.Thread(target=_sweeper, args=(store, stopping), daemon=True).start()
    control.send({"op": "ready", "port": server.port, "location": advertised})
    log.info("Arrow Flight listening on %s (advertised as %s)", server.port, advertised)
    try:
        while not stopping.is_set():
            try:
                received = fdpass.receive_message(sock)
            except fdpass.FdProtocolError as exc:
                log.error("control channel: %s", exc)
                continue
            except OSError:
                break
            if received is None:
                break  # the front end is gone
            message, fds = received
            if "re" in message:
                fdpass.close_all(fds)
                control.resolve(message)
            elif message.get("op") == "stop":
                fdpass.close_all(fds)
                break
            else:
                pool.submit(requests.handle, message, fds)
    finally:
        stopping.set()
        control.fail_all()
        server.shutdown()
        pool.shutdown(wait=False, cancel_futures=True)
        store.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
