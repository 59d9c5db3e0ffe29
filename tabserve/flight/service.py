"""The Flight calls: TabPy's protocol over the per-user ``TableStore``."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc

from .. import fdpass
from .auth import AuthFactory, AuthRelay, Caller, NoHandshake, Sessions
from .store import StoredTable, StoreFull, TableStore, read_table

log = logging.getLogger("tabserve.flight")

_NOT_FOUND = "Flight not found."


class TabserveFlightServer(flight.FlightServerBase):
    """TabPy's Flight protocol over a per-user ``TableStore``."""

    def __init__(
        self,
        location: str,
        advertised: str,
        store: TableStore,
        relay: AuthRelay,
        tls_certificates: list[flight.CertKeyPair] | None = None,
    ) -> None:
        self.store = store
        self.relay = relay
        self.advertised = advertised
        self.on_shutdown: Any = None  # set by main: tell the front end, then stop
        super().__init__(
            location,
            auth_handler=NoHandshake(),
            tls_certificates=tls_certificates or [],
            middleware={"auth": AuthFactory(relay, Sessions())},
        )

    # -- helpers

    def _caller(self, context: flight.ServerCallContext) -> Caller:
        middleware = context.get_middleware("auth")
        if middleware is None:  # cannot happen: every call passes the factory
            raise flight.FlightUnauthenticatedError("No credentials supplied")
        caller: Caller = middleware.caller
        return caller

    def _require(self, context: flight.ServerCallContext, permission: str) -> Caller:
        """The caller, once the front end has confirmed it holds ``permission``."""
        caller = self._caller(context)
        return self.relay.authenticate(caller.header, permission)

    @staticmethod
    def _path(descriptor: flight.FlightDescriptor) -> tuple[str, ...]:
        if descriptor.descriptor_type != flight.DescriptorType.PATH or not descriptor.path:
            raise flight.FlightServerError("only path descriptors are supported")
        return tuple(
            part.decode("utf-8", "replace") if isinstance(part, bytes) else str(part)
            for part in descriptor.path
        )

    @staticmethod
    def _ticket(path: tuple[str, ...]) -> bytes:
        return json.dumps(list(path)).encode()

    @staticmethod
    def _untick(ticket: flight.Ticket) -> tuple[str, ...]:
        try:
            parts = json.loads(ticket.ticket)
        except ValueError:
            parts = None
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise pa.ArrowKeyError(_NOT_FOUND)
        return tuple(parts)

    def _info(self, entry: StoredTable) -> flight.FlightInfo:
        descriptor = flight.FlightDescriptor.for_path(*entry.path)
        endpoint = flight.FlightEndpoint(self._ticket(entry.path), [self.advertised])
        return flight.FlightInfo(entry.schema, descriptor, [endpoint], entry.rows, entry.size)

    # -- the Flight calls

    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        caller = self._caller(context)
        for entry in self.store.owned_by(caller.name):
            yield self._info(entry)

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        caller = self._caller(context)
        entry = self.store.get(caller.name, self._path(descriptor))
        if entry is None:
            raise pa.ArrowKeyError(_NOT_FOUND)
        return self._info(entry)

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        caller = self._require(context, "evaluate")
        path = self._path(descriptor)
        room = self.store.room(caller.name, path)
        fd = fdpass.new_table_file("tabserve-flight")
        rows = 0
        try:
            with os.fdopen(os.dup(fd), "wb") as handle:
                sink = pa.PythonFile(handle, mode="w")
                with pyarrow.ipc.new_file(sink, reader.schema) as out:
                    for chunk in reader:
                        if chunk.data is None:
                            continue
                        out.write_batch(chunk.data)
                        rows += chunk.data.num_rows
                        if handle.tell() > room:  # stop reading a table that cannot fit
                            raise StoreFull(
                                f"the table exceeds the room left in the Flight store "
                                f"({room} bytes; TABSERVE_FLIGHT_MAX_MB)"
                            )
            fdpass.seal(fd)
            self.store.put(caller.name, path, fd, rows, reader.schema)
        except StoreFull as exc:
            os.close(fd)
            raise flight.FlightServerError(str(exc)) from None
        except BaseException:
            os.close(fd)
            raise
        log.info("stored %d rows at %s for %r", rows, "/".join(path), caller.name)

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        caller = self._caller(context)
        entry = self.store.pop(caller.name, self._untick(ticket))
        if entry is None:
            raise pa.ArrowKeyError(_NOT_FOUND)
        try:
            table = read_table(entry.fd)  # the mapping outlives the descriptor
        finally:
            os.close(entry.fd)
        return flight.RecordBatchStream(table)

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [
            ("getUniquePath", "Get a unique FlightDescriptor path to put data to."),
            ("clear", "Clear every stored table (needs the 'manage' permission)."),
            ("shutdown", "Clear, then stop this Flight server (needs 'manage')."),
            ("healthcheck", "Answer if the server is up."),
        ]

    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[bytes]:
        kind = action.type
        if kind == "getUniquePath":
            yield str(uuid.uuid4()).encode()
        elif kind == "healthcheck":
            return
        elif kind == "clear":
            caller = self._require(context, "manage")
            log.info("clear by %r: %d tables dropped", caller.name, self.store.clear())
        elif kind == "shutdown":
            caller = self._require(context, "manage")
            dropped = self.store.clear()
            log.warning("shutdown by %r: %d tables dropped, stopping", caller.name, dropped)
            yield b"Shutdown!"
            if self.on_shutdown is not None:
                self.on_shutdown(caller.name)
        else:
            raise pa.ArrowKeyError(f"Unknown action {kind!r}")
