"""Giving the memory of large requests back to the system once they are answered.

glibc serves a large allocation with its own mapping and unmaps it when freed, but each
such free raises its threshold for the next ones (up to 32 MB), so the 1 MiB chunks of a
40 MB body, its answer and Tornado's buffers soon come from the heap instead, and freed heap
memory is kept: a front end that served one 1M-row call stayed about 115 MB larger for good
(measured: 26 MB of its own before, 142 MB after; 63 MB after a trim). ``malloc_trim``
returns the free pages. It runs in a thread (ctypes lets go of the GIL around the call; the
loop's own allocations may still wait on the allocator's lock while it works), one at a
time, ``TRIM_DELAY`` after a request that moved more than ``TRIM_AFTER`` bytes: not at once,
as its answer may still be on its way out and its handler not yet freed, and once for a
burst of large calls rather than once each (at most one trim per ``TRIM_DELAY``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_AFTER = 8 * 1024 * 1024
TRIM_DELAY = 0.5  # seconds


def _load_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None elsewhere (musl, macOS), where there is nothing to do."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class HeapTrimmer:
    def __init__(self, trim: Callable[[int], int] | None, delay: float = TRIM_DELAY) -> None:
        self._trim = trim
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[int] | None = None
        self._again = False
        self.trims = 0

    def after(self, size: int) -> None:
        """A request that moved ``size`` bytes has finished (called on the event loop)."""
        if self._trim is None or size < TRIM_AFTER or self._timer is not None:
            return  # nothing to give back, or a trim is already due: it covers this one too
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._start)

    def _start(self) -> None:
        assert self._trim is not None
        self._timer = None
        loop = asyncio.get_running_loop()
        if self._running is not None and self._running.get_loop() is loop:
            self._again = True  # what was freed since may be behind the trim running now
            return
        self._again = False
        try:
            self._running = loop.run_in_executor(None, self._trim, 0)
        except RuntimeError:  # the loop is shutting its executor down: nothing more to do
            self._running = None
            return
        self._running.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[int]) -> None:
        self._running = None
        self.trims += 1
        if future.cancelled():
            return
        if future.exception() is not None:
            log.debug("malloc_trim failed", exc_info=future.exception())
            return
        if self._again:
            self._start()


heap = HeapTrimmer(_load_trim())
