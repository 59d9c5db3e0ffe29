"""The server<->worker pipe contract: frames, and what their headers carry.

A frame is a fixed prefix (two big-endian uint32: header length, payload length), a small
JSON header and a raw payload. Request and response bodies travel as the payload bytes
untouched, so the server never parses or re-encodes them.

The server sends a worker one job at a time (``JobHeader``), each answered by one reply
(``ReplyHeader``), after the worker's greeting (``Greeting``). When the endpoint table has
changed since the worker's last job, a ``context`` frame carrying the table as its payload
goes first; it has no answer. A reply header keeps what the server acts on (``status``, an
error's ``message`` and ``info``, ``recycle``) apart from what it only records
(``telemetry``).

Headers are small by construction (control fields and telemetry; anything that grows with
the number of endpoints or with a request travels as a payload), so ``MAX_HEADER`` is far
beyond any real header: a prefix announcing more means the stream is corrupt.
"""

from __future__ import annotations

import os
import struct
from enum import Enum
from typing import Any, TypedDict

import orjson

PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 20

# A job's payload: one buffer, or (a list) the chunks a request body arrived in, written to
# the worker one after another so that a 40 MB body is never joined into one copy first.
Payload = bytes | bytearray | memoryview | list[bytes]


def payload_length(payload: Payload) -> int:
    return sum(map(len, payload)) if isinstance(payload, list) else len(payload)


class JobKind(str, Enum):
    """What a frame from the server asks of a worker."""

    EVALUATE = "evaluate"  # run a script: payload is the /evaluate body
    EVALUATE_ARROW = "evaluate_arrow"  # run a script on Arrow tables passed as descriptors
    QUERY = "query"  # call a deployed endpoint: payload is the /query body
    LOAD = "load"  # check that an endpoint's archive loads (a deploy)
    PING = "ping"  # answer at once (tests, liveness)
    SELF_CHECK = "self_check"  # try what the sandbox must deny (server.sandbox)
    CONTEXT = "context"  # not a job: the endpoint table, as payload, for later jobs; no reply


class EndpointEntry(TypedDict):
    """What answers for one endpoint name, in the table a worker looks names up in. For an
    alias it is its model's entry: the server resolves aliases before publishing."""

    model: str  # the model's name
    version: int
    path: str  # its archive
    python_version: str | None  # what it was pickled with, when known


class Context(TypedDict):
    """The payload of a ``context`` frame."""

    endpoints: dict[str, EndpointEntry]


class _JobHeaderBase(TypedDict):
    kind: JobKind


class JobHeader(_JobHeaderBase, total=False):
    """The header of a frame from the server."""

    call_id: str  # the request's, so that the worker's log lines name it
    encoding: str  # evaluate, query: the payload's Content-Encoding ("" or "gzip")
    query_refusal: str  # evaluate: what tabpy.query() raises (the user may not query)
    cpu_seconds: int  # evaluate, query: this job's CPU backstop, when not the worker's (jobs)
    name: str  # query, load: the endpoint
    entry: EndpointEntry  # load: what to load
    params: dict[str, Any]  # self_check: what to try
    fd_seq: int  # the job's number, which tags descriptors passed with it (fdpass)
    fds: int  # how many descriptors came with the job over the descriptor channel


class Telemetry(TypedDict, total=False):
    """What is recorded about a job (metrics, the access log), never acted on."""

    exec_ms: float  # in the worker, from the job's arrival to its answer
    rows_in: int
    rows_out: int
    script_hash: str
    model: str  # query: the endpoint that answered, and its version
    version: int
    worker_pid: int  # added by the server
    queue_ms: float  # added by the server: waiting for a free worker


class _ReplyHeaderBase(TypedDict):
    status: int  # 200, or the status of the TabserveError that failed the job


class ReplyHeader(_ReplyHeaderBase, total=False):
    """The header of a worker's answer to one job."""

    message: str  # the error, when status is not 200 (TabserveError.to_wire)
    info: Any
    recycle: bool  # the worker exits after this answer; the server replaces it
    fds: int  # how many descriptors the worker sent back before this reply
    fd_seq: int  # the job's number they are tagged with
    telemetry: Telemetry


class Greeting(TypedDict):
    """A worker's first frame: it is confined and ready for jobs."""

    ready: bool
    pid: int


class ProtocolError(Exception):
    """The other side sent something that is not a frame, or went away mid-frame."""


def encode_prefix(header: Any, payload_length: int) -> bytes:
    """Prefix and header; the payload is written after it without being copied into it."""
    head = orjson.dumps(header)
    return PREFIX.pack(len(head), payload_length) + head


def decode_prefix(prefix: bytes) -> tuple[int, int]:
    header_length, payload_length = PREFIX.unpack(prefix)
    if header_length > MAX_HEADER:
        raise ProtocolError(f"frame header of {header_length} bytes is too large")
    return header_length, payload_length


def decode_header(raw: bytes) -> dict[str, Any]:
    header = orjson.loads(raw)
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not an object")
    return header


class BlockingChannel:
    """The worker's end: blocking reads and writes on raw file descriptors."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd

    def _read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            count = os.readv(self._read_fd, [view[filled:]])
            if count == 0:
                raise ProtocolError("the server closed the pipe")
            filled += count
        return buffer

    def receive(self) -> tuple[dict[str, Any], bytearray]:
        header_length, payload_length = decode_prefix(self._read_exactly(PREFIX.size))
        header = decode_header(self._read_exactly(header_length))
        return header, self._read_exactly(payload_length)

    def send(self, header: Any, payload: bytes = b"") -> None:
        parts = [memoryview(encode_prefix(header, len(payload))), memoryview(payload)]
        while parts:
            written = os.writev(self._write_fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][written:]
