"""Copied into TabPy's `tests/integration/` as `conftest.py` by tests/test_tabpy_suite.py.

TabPy's `IntegTestBase` starts the server and sleeps 5 s, trusting it to be listening by
then; after killing it, it sleeps 5 s more, trusting the port to be free. On a busy 2-core
machine 5 s is sometimes too short (tabserve's first run here, at load 11: connection
refused, an empty log), and on an idle one it is mostly waiting (26 tests × 10 s). This
replaces those two sleeps, and nothing else, with waits for what they stand for: the server
listening on the port of its config file, or exited; then, after the kill, that it has exited
and the port is free. No test and no assertion changes.

It checks what it replaces: `integ_test_base` must use `time.sleep(5)` exactly once in
`setUp` and once in `tearDown`, or the run stops with the reason.
"""

from __future__ import annotations

import configparser
import inspect
import socket
import time
from types import ModuleType
from typing import Any

from . import integ_test_base

BOUND = 60.0  # a liveness bound with a wide margin, not a timing target
_sleep = time.sleep
_Base: Any = integ_test_base.IntegTestBase

for _method in (_Base.setUp, _Base.tearDown):
    _found = inspect.getsource(_method).count("time.sleep(5)")
    if _found != 1 or integ_test_base.time is not time:
        raise RuntimeError(
            f"TabPy's IntegTestBase.{_method.__name__} changed: time.sleep(5) found {_found} "
            "times (expected once); update tests/tabpy_suite_conftest.py"
        )


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _port(test: Any) -> int:
    # The port the server reads: some tests write their own config and do not change
    # _get_port() (test_minimum_tls_version.py listens on 9005, _get_port() says 9004).
    config = configparser.ConfigParser(interpolation=None)
    config.read(test.config_file_name)
    return int(config.get("TabPy", "TABPY_PORT", fallback="9004"))


class _Waits(ModuleType):
    """`time` as integ_test_base sees it: every attribute of the real module, but `sleep`."""

    def __init__(self) -> None:
        super().__init__("time")
        self.test: Any = None
        self.stopping = False

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        test, self.test = self.test, None
        if test is None or test.process is None or seconds != 5:
            _sleep(seconds)
            return
        port, deadline = _port(test), time.monotonic() + BOUND
        if self.stopping:
            test.process.wait(timeout=BOUND)
            while _listening(port) and time.monotonic() < deadline:
                _sleep(0.05)
        else:
            while (
                test.process.poll() is None and not _listening(port) and time.monotonic() < deadline
            ):
                _sleep(0.05)


_waits = _Waits()
_set_up, _tear_down = _Base.setUp, _Base.tearDown


def _wrapped_set_up(self: Any) -> None:
    _waits.test, _waits.stopping = self, False
    _set_up(self)


def _wrapped_tear_down(self: Any) -> None:
    _waits.test, _waits.stopping = self, True
    _tear_down(self)


integ_test_base.time = _waits  # type: ignore[assignment]
_Base.setUp, _Base.tearDown = _wrapped_set_up, _wrapped_tear_down
