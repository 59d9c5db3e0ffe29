"""Tables as file descriptors: sealed memfds, and passing them over Unix sockets.

Arrow tables move between tabserve's processes (the Flight server, the front end, the
workers) as Arrow IPC files held in anonymous memory (``memfd_create``), never as bytes
copied through a pipe or parsed as JSON. Whoever writes a table seals it before handing it
on (no writing, growing or shrinking, and no removing the seals), so a receiver maps a
file that cannot change under it: a worker running user code cannot rewrite a result after
the server has accepted it.

Descriptors travel with ``SCM_RIGHTS`` over ``SOCK_SEQPACKET`` socket pairs: one message is
a small JSON document plus its descriptors, and message boundaries are kept. Standard
library only: the front end uses this module and must not import pyarrow, numpy or pandas.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

# Seals that make a memfd immutable: no write, no resize, and the seal set is final.
_IMMUTABLE = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# A control message is a small JSON document; anything larger is a protocol fault.
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class FdProtocolError(Exception):
    """The peer sent something that is not a well-formed message."""


def new_table_file(name: str) -> int:
    """An empty, sealable anonymous file, closed on exec."""
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def seal(fd: int) -> None:
    """Make the file behind ``fd`` immutable (fails while a writable mapping exists)."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _IMMUTABLE)


def is_sealed(fd: int) -> bool:
    """Whether ``fd`` is a memfd that can no longer change (what receivers insist on)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # not a memfd (a pipe, a regular file, a socket)
    return seals & _IMMUTABLE == _IMMUTABLE


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair keeping message boundaries; both ends close on exec."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message with ``fds`` attached (duplicated into the receiver; ours stay open).

    On a non-blocking socket this raises BlockingIOError when the peer's queue is full.
    """
    data = orjson.dumps(message)
    if len(data) > MAX_MESSAGE:
        raise FdProtocolError(f"message of {len(data)} bytes is too large")
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    sock.sendmsg([data], ancillary)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the descriptors that came with it; None at end of stream.

    The caller owns the returned descriptors. A malformed message has its descriptors closed
    before FdProtocolError is raised, so a misbehaving peer cannot leak them into us.
    """
    fd_bytes = array.array("i").itemsize * MAX_FDS
    # MSG_CMSG_CLOEXEC: a received descriptor must not leak into a process started later.
    data, ancillary, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(fd_bytes), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise FdProtocolError("message or its descriptors were truncated")
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        close_all(fds)
        raise FdProtocolError("message is not JSON") from None
    if not isinstance(message, dict):
        close_all(fds)
        raise FdProtocolError("message is not a JSON object")
    return message, fds


class ChannelClosed(Exception):
    """The peer is gone: it closed its end (``error`` is None), or the channel failed or
    carried something unreadable (``error`` says what), after which it cannot be trusted."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__(str(error) if error is not None else "the peer closed its end")
        self.error = error


def receive_ready(sock: socket.socket) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """Each message waiting on the non-blocking ``sock`` (with its descriptors, which the
    caller owns), until none is left: what a ``loop.add_reader`` callback runs.

    Raises ChannelClosed when the peer has gone (end of stream), or the socket failed or
    sent a malformed message. Stops quietly once ``sock`` is closed, so a message whose
    handling closed the channel ends the loop without a read of a closed socket.
    """
    while sock.fileno() != -1:
        try:
            received = receive_message(sock)
        except (BlockingIOError, InterruptedError):
            return  # nothing more for now: the loop calls again when there is
        except (OSError, FdProtocolError) as exc:
            raise ChannelClosed(exc) from exc
        if received is None:
            raise ChannelClosed()
        yield received


class BlockingFdChannel:
    """A worker's end of its descriptor channel (blocking): tables in, results out."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)

    def receive(self, seq: int, count: int) -> list[int]:
        """The ``count`` descriptors the server sent for job ``seq``; strays are closed."""
        while True:
            received = receive_message(self.sock)
            if received is None:
                raise FdProtocolError("the server closed the descriptor channel")
            message, fds = received
            if message.get("seq") == seq and len(fds) == count:
                return fds
            close_all(fds)

    def send(self, seq: int, fds: Sequence[int]) -> None:
        send_message(self.sock, {"seq": seq}, fds)
