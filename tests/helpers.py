"""What tests share: tabserve on a free loopback port, talked to over HTTP.

``Server`` is a real tabserve process with real workers: for what needs processes (timeouts,
crashes, the sandbox, shutdown, logs on disk, end-to-end behaviour). ``InProcessServer`` is
the same application in this process with the worker's job handler run in-process: for HTTP
behaviour (envelopes, authentication, limits, routing, CORS), in milliseconds.

Tests import from here (``from helpers import Server``); conftest.py only holds fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families
from tornado.netutil import bind_sockets

from tabserve.config import Settings, load_settings
from tabserve.logs import TextFormatter
from tabserve.protocol import Context, JobKind, Payload
from tabserve.server.app import build_services, make_http_server
from tabserve.server.executor import JobResult, PoolConfig, PoolStats, job_header, job_result
from tabserve.server.sandbox import SandboxReport
from tabserve.worker.main import Worker

_T = TypeVar("_T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# user1 / P@ssw0rd, as in TabPy's tests/integration/resources/pwdfile.txt; computed once with
# hashlib.pbkdf2_hmac("sha512", b"P@ssw0rd", b"_$salt@tabpy:user1$_", 10000).hex()
USER1_HASH = (
    "b8a63cf588cd2399da615042de4732f5b121c4d1042acfb91598a56d2dd3e1d7"
    "b9f785213262eddbbd00c7a8c9c3e89d7cb98f31d405cc644b1aeba92c3de40b"
)


class FakeClock:
    """A monotonic clock a test moves by hand (``clock.now += 1.5``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class Server:
    """A tabserve process started with a config file; ``url`` ends without a slash.

    With ``TABPY_TRANSFER_PROTOCOL = https`` the url is https and requests check the server's
    certificate against ``verify`` (a CA file). ``auth`` is sent with ``get`` and ``post``.
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, str],
        env: dict[str, str],
        verify: str | bool = True,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        scheme = config.get("TABPY_TRANSFER_PROTOCOL", "http").lower()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify
        self.auth = auth
        self.state_path = Path(config.get("TABPY_STATE_PATH", workdir / "state"))
        settings = {
            "TABPY_PORT": str(self.port),
            "TABPY_STATE_PATH": str(self.state_path),
            "TABSERVE_WORKERS": "2",
            # CI runs as root with a Python that an unprivileged user may not be able to read
            # (pyenv in /root); test_sandbox.py covers the switch to an unprivileged user.
            "TABSERVE_WORKER_USER": "root",
            **config,
        }
        self.config_file = workdir / "tabserve.conf"
        lines = ["[TabPy]", *(f"{key} = {value}" for key, value in settings.items())]
        self.config_file.write_text("\n".join(lines) + "\n")
        self.log_file = workdir / "server.log"
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tabserve", "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            # Nobody holds this server yet to stop it at the end of the session: a server
            # that never became ready (a TLS check refused, say) would outlive the tests.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tabserve exited early:\n{self.log()}")
            try:
                requests.get(self.url + "/info", timeout=1, verify=self.verify)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"tabserve did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def request(self, method: str, path: str, **kwargs: object) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("auth", self.auth)
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.url + path, **kwargs)  # type: ignore[arg-type]

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def evaluate(self, script: str, **data: object) -> requests.Response:
        return self.post("/evaluate", json={"script": script, "data": data})

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (0 when the series does not exist yet)."""
        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                wanted = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == name and wanted:
                    return float(sample.value)
        return 0.0

    def worker_pids(self) -> set[int]:
        """The server's descendants but the zygote (which forks workers, and runs no job)."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        return {child.pid for child in children} - {self.zygote_pid()}

    def zygote_pid(self) -> int | None:
        # The server's own child: the workers it forks share its command line.
        for child in psutil.Process(self.process.pid).children():
            if _is_zygote(child):
                return child.pid
        return None

    def terminate(self) -> None:
        """Ask the server to shut down (SIGTERM); ``wait_stopped`` waits for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 15) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.process.returncode

    def stop(self) -> int:
        self.terminate()
        return self.wait_stopped()


ServerFactory = Callable[..., Server]


def _is_zygote(process: psutil.Process) -> bool:
    try:
        return any("tabserve.worker.zygote" in part for part in process.cmdline())
    except psutil.Error:
        return False


# -- in-process: the real app, no processes ----------------------------------------------------


class FakeExecutor:
    """The executor's interface, running each job with the worker's own job handler
    (``worker.main.Worker.handle``) in this process, on the event loop.

    What it cannot do is what needs a process: a timeout cannot stop a job, a crash takes
    the test process with it, and no resource limit applies (they would apply to pytest).
    Tests of those use a real server.
    """

    def __init__(self, settings: Settings) -> None:
        self.config = PoolConfig(
            workers=settings.workers,
            request_limit=settings.max_request_bytes,
            gzip_enabled=settings.gzip_enabled,
        )
        self.worker = Worker(
            {"request_limit": settings.max_request_bytes, "gzip_enabled": settings.gzip_enabled}
        )
        self.stats = PoolStats(started=settings.workers)
        self.queued = 0
        self.busy = 0
        self.jobs: list[dict[str, Any]] = []  # every job header sent, for tests to look at
        self.jobs_context: list[Context] = []  # every table sent, in order

    @property
    def alive(self) -> int:
        return self.config.workers

    @property
    def size(self) -> int:
        return self.config.workers

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    def set_context(self, context: Context) -> None:
        # The worker is in this process: it sees the table at once, as a real one would
        # before its next job.
        self.jobs_context.append(context)
        self.worker.set_context(orjson.loads(orjson.dumps(context)))

    async def run(
        self,
        kind: JobKind,
        payload: Payload,
        timeout: float,
        options: Mapping[str, Any] | None = None,
        fds: Sequence[int] = (),
    ) -> JobResult:
        header = job_header(kind, options)
        self.jobs.append(dict(header))
        joined = b"".join(payload) if isinstance(payload, list) else bytes(payload)
        if isinstance(payload, list):
            payload.clear()  # handed over, as WorkerProcess.call does
        reply, body = self.worker.handle(header, joined, fds)
        self.worker.spent = None  # as the worker's loop does once the reply is out
        returned, self.worker.outgoing_fds = self.worker.outgoing_fds, []
        return job_result(reply, body, os.getpid(), 0.0, returned)

    async def close(self) -> None:
        pass


class LogCapture(logging.Handler):
    """tabserve's log lines while an in-process server runs, as text lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(TextFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProcessServer:
    """tabserve's real application (``build_services``, ``make_app``, ``make_http_server``)
    on a free loopback port, served by an event loop in a thread of the test process, with
    ``FakeExecutor`` for a pool. Starts in milliseconds; same request API as ``Server``.

    ``config`` is settings by key, as in a config file. The sandbox report is a passed
    self-check of the configured mode (nothing is confined: nothing runs in a worker).
    """

    def __init__(self, workdir: Path, config: dict[str, str], auth: tuple[str, str] | None = None):
        values = {"TABPY_STATE_PATH": str(workdir / "state"), "TABSERVE_WORKERS": "2", **config}
        self.settings = load_settings(None, values)
        self.state_path = self.settings.state_path
        self.verify = True
        self.auth = auth
        self.logs = LogCapture()
        logger = logging.getLogger("tabserve")
        logger.addHandler(self.logs)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._call(self._start())
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    async def _start(self) -> int:
        self.executor = FakeExecutor(self.settings)
        report = SandboxReport.from_findings(self.settings.sandbox, [])
        self.services = await build_services(self.settings, self.executor, report)  # type: ignore[arg-type]
        self._http = make_http_server(self.services)
        sockets = bind_sockets(0, "127.0.0.1")
        self._http.add_sockets(sockets)
        return int(sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        self._http.stop()
        await self._http.close_all_connections()
        await self.services.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        logging.getLogger("tabserve").removeHandler(self.logs)

    def log(self) -> str:
        return "\n".join(self.logs.lines)

    request = Server.request
    get = Server.get
    post = Server.post
    evaluate = Server.evaluate
    metric = Server.metric


AppFactory = Callable[..., InProcessServer]
