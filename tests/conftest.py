"""Fixtures: a real tabserve process on a free loopback port, talked to over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests
from pg import postgres  # noqa: F401  (a session fixture: a real PostgreSQL server)
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        self._wait_ready()

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
        return {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


ServerFactory = Callable[..., Server]


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Start servers on demand; all of them are stopped at the end of the session."""
    servers: list[Server] = []

    def start(
        env: dict[str, str] | None = None,
        verify: str | bool = True,
        auth: tuple[str, str] | None = None,
        workdir: Path | None = None,
        **config: str,
    ) -> Server:
        server = Server(
            workdir or tmp_path_factory.mktemp("tabserve"), config, env or {}, verify, auth
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory: ServerFactory) -> Server:
    """A shared server with TabPy's defaults, but a 5 s timeout to keep failures quick."""
    return server_factory(TABPY_EVALUATE_TIMEOUT="5")
