"""A throw-away PostgreSQL server (Debian's package) on a free loopback port, for tests.

``.ci/run`` installs the ``postgresql`` package; this starts a private cluster in a temporary
directory (never the system's), as the ``postgres`` user when the tests run as root, since
PostgreSQL refuses to run as root. ``fsync`` is off: the tests kill processes, not machines.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

USER = "tabserve"
PASSWORD = "s3cret-for-tests"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: .ci/run installs Debian's postgresql package "
            "(apt-get install postgresql)"
        )
    return Path(found[-1]).parent


class PostgresServer:
    """``base`` must be reachable by the postgres user: pytest's tmp_path (0700) is not."""

    def __init__(self, base: Path) -> None:
        self.bin = _bin_dir()
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        base.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir()
        pwfile = base / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_root:
            for path in (base, self.sockets, pwfile):
                shutil.chown(path, "postgres", "postgres")
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
            "-A", "scram-sha-256", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE tabserve")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def url(self, database: str = "tabserve") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=100"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options,
            "-l", str(self.base / "postgres.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def fresh_database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.base / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; tests take a fresh database each."""
    base = Path(tempfile.mkdtemp(prefix="tabserve-pg-"))
    base.chmod(0o755)  # the postgres user must reach its directory below
    server = PostgresServer(base / "pg")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
