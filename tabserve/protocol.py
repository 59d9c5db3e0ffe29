"""Frames exchanged between the server and a worker over a pair of pipes.

A frame is a fixed prefix (two big-endian uint32: header length, payload length), a small
JSON header and a raw payload. Request and response bodies travel as the payload bytes
untouched, so the server never parses or re-encodes them.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import orjson

PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 20


class ProtocolError(Exception):
    """The other side sent something that is not a frame, or went away mid-frame."""


def encode_prefix(header: dict[str, Any], payload_length: int) -> bytes:
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

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        parts = [memoryview(encode_prefix(header, len(payload))), memoryview(payload)]
        while parts:
            written = os.writev(self._write_fd, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts[0])
                parts.pop(0)
            if parts:
                parts[0] = parts[0][written:]
