"""Start and stop TabPy and tabserve on free loopback ports with equivalent settings."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-Passw0rd"

DEFAULT_CACHE = Path(
    os.environ.get("TABSERVE_BENCH_CACHE", Path.home() / ".cache" / "tabserve-bench")
)

# TabPy without a [loggers] section falls back to DEBUG logging on stderr, which would
# penalise it unfairly; give it INFO (its shipped console level) into a file instead.
_TABPY_LOGGING = """
[loggers]
keys=root

[handlers]
keys=file

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=file

[handler_file]
class=FileHandler
level=INFO
formatter=plain
args=('{log}', 'a')

[formatter_plain]
format=%(asctime)s [%(levelname)s] %(name)s: %(message)s
"""


def free_port() -> int:
    """A port that is free on loopback right now (TabPy binds all interfaces on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tabpy_password_hash(user: str, password: str) -> str:
    """TabPy's password-file hash: PBKDF2-HMAC-SHA512, 10000 rounds, per-user salt, hex."""
    salt = f"_$salt@tabpy:{user.lower()}$_".encode()
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 10000).hex()


def basic_auth_header(user: str = BENCH_USER, password: str = BENCH_PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def ensure_tabpy_venv(cache: Path = DEFAULT_CACHE, version: str | None = None) -> Path:
    """Install unmodified TabPy into a throwaway venv outside the repo; reuse it if present."""
    venv = cache / "tabpy-venv"
    tabpy = venv / "bin" / "tabpy"
    if tabpy.exists():
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    print(f"[bench] installing tabpy into {venv} (one-off, a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = f"tabpy=={version}" if version else "tabpy"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-U", "pip"], check=True)
    subprocess.run([*pip, spec], check=True)
    return venv


def tabpy_version(venv: Path) -> str:
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('tabpy'))",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


@dataclass
class ServerOptions:
    """Settings both servers get; ``workers`` is tabserve-only (TabPy has cpu_count threads)."""

    timeout_s: float = 30.0
    auth: bool = False
    workers: int | None = None
    max_request_mb: int = 200
    arrow: bool = False  # TABPY_ARROW_ENABLE, on a free TABPY_ARROWFLIGHT_PORT
    settings: dict[str, str] = field(default_factory=dict)  # more tabserve settings


@dataclass
class Server:
    """A running server process (plus, for tabserve, its worker children)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    options: ServerOptions
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)
    python: str = ""  # the interpreter it runs on: pickles deployed to it must match

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def flight_port(self) -> int:
        """The Arrow Flight port (only with ``ServerOptions.arrow``)."""
        return int(self.extra["flight_port"])

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": basic_auth_header()} if self.options.auth else {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Poll GET /info until it answers 200 (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        req = urllib.request.Request(self.url + "info", headers=self.auth_headers())
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the server's own process group, then SIGKILL it if it lingers."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive the parent; the group id is still the one we created.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def _arrow_lines(opts: ServerOptions, extra: dict[str, str]) -> list[str]:
    """Flight on a free port (both servers bind it; TabPy on every interface)."""
    if not opts.arrow:
        return []
    extra["flight_port"] = str(free_port())
    return ["TABPY_ARROW_ENABLE = true", f"TABPY_ARROWFLIGHT_PORT = {extra['flight_port']}"]


def _write_config(
    workdir: Path, port: int, opts: ServerOptions, extra_lines: list[str], tail: str = ""
) -> Path:
    state = workdir / "state"
    (state / "query_objects").mkdir(parents=True, exist_ok=True)
    lines = [
        "[TabPy]",
        f"TABPY_PORT = {port}",
        f"TABPY_STATE_PATH = {state}",
        f"TABPY_QUERY_OBJECT_PATH = {state / 'query_objects'}",
        f"TABPY_EVALUATE_TIMEOUT = {opts.timeout_s}",
        f"TABPY_MAX_REQUEST_SIZE_MB = {opts.max_request_mb}",
    ]
    if opts.auth:
        pwd = workdir / "passwords.txt"
        pwd.write_text(f"{BENCH_USER} {tabpy_password_hash(BENCH_USER, BENCH_PASSWORD)}\n")
        lines.append(f"TABPY_PWD_FILE = {pwd}")
    lines += extra_lines
    conf = workdir / "server.conf"
    conf.write_text("\n".join(lines) + "\n" + tail)
    return conf


def _spawn(
    name: str,
    cmd: list[str],
    workdir: Path,
    port: int,
    opts: ServerOptions,
    extra: dict[str, str] | None = None,
) -> Server:
    log_path = workdir / "server.log"
    log = open(log_path, "ab")  # the child keeps its own copy of the fd
    # A new session gives the server its own process group, so stop() reaches its workers.
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    server = Server(name, port, proc, workdir, opts, log_path, extra or {})
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


def start_tabpy(venv: Path, opts: ServerOptions, root: Path) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix="tabpy-", dir=root))
    port = free_port()
    tail = _TABPY_LOGGING.format(log=workdir / "tabpy.log")
    extra: dict[str, str] = {}
    conf = _write_config(workdir, port, opts, _arrow_lines(opts, extra), tail)
    cmd = [str(venv / "bin" / "tabpy"), f"--config={conf}", "--disable-auth-warning"]
    server = _spawn("tabpy", cmd, workdir, port, opts, extra)
    server.python = str(venv / "bin" / "python")
    return server


def start_tabserve(python: str, opts: ServerOptions, root: Path) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix="tabserve-", dir=root))
    port = free_port()
    lines = [f"TABSERVE_WORKERS = {opts.workers}"] if opts.workers else []
    lines += [f"{key} = {value}" for key, value in opts.settings.items()]
    extra: dict[str, str] = {}
    conf = _write_config(workdir, port, opts, lines + _arrow_lines(opts, extra))
    cmd = [python, "-m", "tabserve", "--config", str(conf)]
    server = _spawn("tabserve", cmd, workdir, port, opts, extra)
    server.python = python
    return server


def _tree_sum(pid: int, measure: Callable[[Any], int]) -> int:
    """``measure`` summed over a process and all its descendants (psutil); a process that
    exits meanwhile counts 0, any other error (AccessDenied) is raised: no silent undercount."""
    import psutil  # bench-only dependency, imported lazily so --help works without it

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += measure(proc)
        except psutil.NoSuchProcess:
            continue
    return total


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    return _tree_sum(pid, lambda proc: proc.memory_info().rss)


def tree_pss_bytes(pid: int) -> int:
    """Proportional memory of a process and its descendants: a page shared by n processes
    counts 1/n in each, so pages the zygote shares with its workers count once (RSS counts
    them in every process)."""
    return _tree_sum(pid, lambda proc: proc.memory_full_info().pss)


def start_ceiling(python: str, opts: ServerOptions, root: Path) -> Server:
    """The bare Tornado reference server (``bench.ceiling``): the one-process ceiling."""
    workdir = Path(tempfile.mkdtemp(prefix="ceiling-", dir=root))
    port = free_port()
    repo = str(Path(__file__).resolve().parent.parent)
    cmd = [python, "-c", f"import sys; sys.path.insert(0, {repo!r}); "
           "from bench.ceiling import main; import asyncio; asyncio.run(main(int(sys.argv[1])))",
           str(port)]  # fmt: skip
    server = _spawn("ceiling", cmd, workdir, port, opts)
    server.python = python
    return server
