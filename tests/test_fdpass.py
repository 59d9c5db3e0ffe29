"""fdpass.receive_ready: the one non-blocking receive loop behind every descriptor channel."""

from __future__ import annotations

import array
import os
import socket

import pytest

from tabserve import fdpass


def test_every_waiting_message_is_delivered_with_its_descriptors() -> None:
    ours, theirs = fdpass.socket_pair()
    ours.setblocking(False)
    read, write = os.pipe()
    try:
        fdpass.send_message(theirs, {"n": 1}, (read, write))
        fdpass.send_message(theirs, {"n": 2})
        received = list(fdpass.receive_ready(ours))
        assert [message for message, _ in received] == [{"n": 1}, {"n": 2}]
        (_, fds), (_, none) = received
        assert len(fds) == 2 and none == []
        # Duplicates of ours: a byte written through one comes out of the other.
        os.write(fds[1], b"x")
        assert os.read(read, 1) == b"x"
        fdpass.close_all(fds)
    finally:
        fdpass.close_all((read, write))
        ours.close()
        theirs.close()


def test_nothing_waiting_ends_the_loop_without_an_error() -> None:
    ours, theirs = fdpass.socket_pair()
    ours.setblocking(False)
    try:
        assert list(fdpass.receive_ready(ours)) == []
        fdpass.send_message(theirs, {"later": True})
        assert [m for m, _ in fdpass.receive_ready(ours)] == [{"later": True}]
    finally:
        ours.close()
        theirs.close()


def test_a_peer_that_closed_its_end_is_reported_after_what_it_sent() -> None:
    ours, theirs = fdpass.socket_pair()
    ours.setblocking(False)
    fdpass.send_message(theirs, {"last": True})
    theirs.close()
    delivered = []
    with pytest.raises(fdpass.ChannelClosed) as closed:
        for message, _ in fdpass.receive_ready(ours):
            delivered.append(message)
    assert delivered == [{"last": True}]
    assert closed.value.error is None  # an orderly end, nothing unreadable
    ours.close()


def test_a_malformed_message_closes_the_channel_and_its_descriptors() -> None:
    ours, theirs = fdpass.socket_pair()
    ours.setblocking(False)
    read, write = os.pipe()
    try:
        theirs.sendmsg(
            [b"not json"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read]).tobytes())],
        )
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(fdpass.ChannelClosed) as closed:
            list(fdpass.receive_ready(ours))
        assert isinstance(closed.value.error, fdpass.FdProtocolError)
        assert set(os.listdir("/proc/self/fd")) <= before  # the duplicate did not leak
    finally:
        fdpass.close_all((read, write))
        ours.close()
        theirs.close()


def test_a_handler_that_closes_the_socket_ends_the_loop_quietly() -> None:
    ours, theirs = fdpass.socket_pair()
    ours.setblocking(False)
    try:
        fdpass.send_message(theirs, {"n": 1})
        fdpass.send_message(theirs, {"n": 2})
        seen = []
        for message, _ in fdpass.receive_ready(ours):
            seen.append(message)
            ours.close()  # as a handler that gives up on the channel does
        assert seen == [{"n": 1}]  # no read of the closed socket, no ChannelClosed
    finally:
        ours.close()
        theirs.close()
