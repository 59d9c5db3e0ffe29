"""The zygote: a clean, preloaded process that forks workers on the server's request.

Started by ``server.launcher.ZygoteLauncher`` as a fresh interpreter with the workers'
environment (the allow-list), before the server reads any secret, so neither its memory, its
environment nor its descriptors hold one. It imports numpy, pandas, the worker's code and
``TABSERVE_WORKER_PRELOAD``, freezes its heap (``gc.freeze``: the collector then never writes
to those objects, so their pages stay shared with every worker), and then only forks.

It takes orders over one socket pair it inherited from the server, and checks with
``SO_PEERCRED`` that the other end was made by its parent; it listens on nothing else. Orders
(fdpass messages):

- ``{"op": "fork", "id": N}`` with the worker's two sockets: fork a worker, answer
  ``{"forked": N, "pid": P}`` (or ``{"failed": N, "error": ...}``);
- ``{"op": "kill", "pid": P}``: SIGKILL worker P and everything its script started.

It reports each worker's end as ``{"exited": P, "status": S}`` (S as a returncode: negative
for a signal). It is a child subreaper: a process a script started and whose parent died is
adopted by the zygote rather than by init, so it is found and killed when a worker ends.
When the server closes the socket, it kills what is left and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import orjson

from .. import fdpass, logs

log = logging.getLogger("tabserve.zygote")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_KILL_ROUNDS = 50


def die_with_parent(parent: int) -> None:
    """Be killed when ``parent`` dies; exit now if it already has. A change of user or group
    clears this (prctl(2)), so a worker that gives up root asks again afterwards."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # it died before the line above took effect


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _peer_is_parent(control: socket.socket) -> bool:
    """Whether the socket pair was made by our parent (the server), as the kernel says."""
    creds = control.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid == os.getppid() and uid in (os.getuid(), 0)


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, state) of every process we can see."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        yield int(entry), int(fields[1]), fields[0].decode()


def _children(pid: int) -> list[int] | None:
    """The children of ``pid`` (of any of its threads); None when the kernel cannot say."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []  # gone
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                found.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread ended meanwhile
            return None  # no CONFIG_PROC_CHILDREN: scan everything instead
        except OSError:
            return None
    return found


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "X"


def _live_descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree that has not exited yet.

    Walked down from ``root`` through the kernel's children lists (a few files), rather than
    by reading every process's stat: the replacement worker's fork waits for this.
    """
    found: list[int] = []
    stack = [root]
    while stack:
        children = _children(stack.pop())
        if children is None:
            return _scan_descendants(root)
        for pid in children:
            if _state(pid) not in ("Z", "X"):
                found.append(pid)
            stack.append(pid)
    return found


def _scan_descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    state: dict[int, str] = {}
    for pid, ppid, status in _processes():
        children.setdefault(ppid, []).append(pid)
        state[pid] = status
    found: list[int] = []
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        if state.get(pid) not in ("Z", "X"):
            found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def kill_tree(root: int, include_root: bool = True) -> None:
    """SIGKILL ``root`` and every process below it, setsid children included.

    Descendants first, until no new one turns up: a killed process cannot fork again (the
    kernel abandons a fork when a fatal signal is pending), and what it forked before is
    found in the next round (or, orphaned, is adopted by the zygote, which sweeps its
    adopted children whenever a worker ends).
    """
    killed: set[int] = set()
    for _ in range(_KILL_ROUNDS):
        # Each once: a killed process may take a while to die on a busy machine, and
        # scanning until it has would delay the replacement worker's fork.
        tree = [pid for pid in _live_descendants(root) if pid not in killed]
        if not tree:
            break
        for pid in tree:
            _kill(pid)
        killed.update(tree)
    if include_root:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, signal.SIGKILL)
        _kill(root)


class Zygote:
    def __init__(self, config: dict[str, Any], control: socket.socket) -> None:
        self.config = config
        self.control = control
        self.workers: set[int] = set()
        self.pid = os.getpid()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            fdpass.send_message(self.control, message)

    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select()
        try:
            while True:
                readable, _, _ = select.select([self.control, self._wake_read], [], [])
                # Orders first: a replacement's fork should not wait for a reap and sweep.
                if self.control in readable and not self.order():
                    return 0
                if self._wake_read in readable:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_read, 512):
                            pass
                    self.reap()
        finally:
            for pid in list(self.workers):
                kill_tree(pid)
            self.sweep()

    def order(self) -> bool:
        """Carry out one order; False when the server has gone."""
        try:
            received = fdpass.receive_message(self.control)
        except fdpass.FdProtocolError as exc:
            log.error("ignoring a malformed order: %s", exc)
            return True
        except OSError:
            return False
        if received is None:
            return False
        message, fds = received
        op = message.get("op")
        if op == "fork" and len(fds) == 2:
            self.fork(message.get("id"), fds)
        elif op == "kill" and message.get("pid") in self.workers:
            kill_tree(message["pid"])  # reaped (and reported) when its SIGCHLD comes
        else:
            fdpass.close_all(fds)
        return True

    def fork(self, ident: Any, fds: list[int]) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            fdpass.close_all(fds)
            self.send({"failed": ident, "error": str(exc)})
            return
        if pid == 0:
            self._become_worker(fds)  # never returns
        fdpass.close_all(fds)
        self.workers.add(pid)
        self.send({"forked": ident, "pid": pid})

    def _become_worker(self, fds: list[int]) -> None:
        code = 70
        try:
            os.setsid()  # its own session and process group, as a fresh worker has
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Nothing of the zygote's business stays open in the worker.
            self.control.close()
            os.close(self._wake_read)
            os.close(self._wake_write)
            die_with_parent(self.pid)  # no worker outlives its zygote
            _reseed()
            from .main import serve

            channels = {"channel": fds[0], "fd_channel": fds[1]}
            code = serve({**self.config, **channels, "die_with": self.pid})
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    def reap(self) -> None:
        """Collect every child that has ended; report the workers among them."""
        ended = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.workers:
                self.workers.discard(pid)
                self.send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})
                ended = True
        if ended:
            self.sweep()

    def sweep(self) -> None:
        """Kill what scripts left behind: adopted children of ours that are not workers."""
        children = _children(self.pid)
        if children is None:
            children = [pid for pid, ppid, _ in _processes() if ppid == self.pid]
        for pid in children:
            if pid not in self.workers and _state(pid) not in ("Z", "X"):
                kill_tree(pid)


def _reseed() -> None:
    """A forked worker must not repeat its siblings' random numbers: numpy's global
    generator is not reseeded at fork (Python's ``random`` is)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _require_one_thread() -> None:
    """A fork copies only the thread that calls it: a lock another Python thread held at that
    moment (a logging handler's, an import's) stays held forever in every worker. A preloaded
    module that starts threads therefore stops the start instead of risking hung workers.
    (Native pools that register fork handlers, such as OpenBLAS's, are not Python threads.)"""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        raise RuntimeError(
            f"after preloading, the zygote runs {len(others)} other thread(s) "
            f"({', '.join(sorted(others))}), which a fork would leave behind holding their "
            "locks; preload modules that start no threads, or set TABSERVE_WORKER_LAUNCH = fresh"
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config: dict[str, Any] = orjson.loads(args[0])
    logs.configure(
        config.get("log_level", "INFO"),
        config.get("log_format", "text"),
        config.get("log_file"),
        tag=f"zygote[{os.getpid()}]",
    )
    control = socket.socket(fileno=config.pop("control"))
    control.setblocking(True)
    os.set_inheritable(control.fileno(), False)
    if not _peer_is_parent(control):
        log.error("the control socket was not made by this process's parent; exiting")
        return 2
    try:
        from . import main as worker_main  # numpy, pandas and the worker's code

        worker_main.preload(config.get("preload", ()))
        _require_one_thread()
    except Exception as exc:
        fdpass.send_message(control, {"error": f"TABSERVE_WORKER_PRELOAD: {exc}"})
        return 1
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if config.get("gc_freeze", True):
        gc.collect()
        gc.freeze()  # imported objects stay out of the collector: their pages stay shared
    zygote = Zygote(config, control)
    fdpass.send_message(control, {"ready": True, "pid": os.getpid()})
    return zygote.run()
