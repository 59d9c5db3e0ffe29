"""The command line: startup banner, bad config, TabPy flags, never a prompt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from helpers import ServerFactory, free_port


def tabserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tabserve", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_bad_config_value_stops_startup_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.conf"
    config.write_text("[TabPy]\nTABPY_EVALUATE_TIMEOUT = soon\n")
    result = tabserve("--config", str(config))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "TABPY_EVALUATE_TIMEOUT" in lines[0] and "'soon'" in lines[0]


def test_missing_password_file_stops_startup(tmp_path: Path) -> None:
    result = tabserve(
        "serve",
        env={"TABPY_PWD_FILE": str(tmp_path / "p.txt"), "TABPY_STATE_PATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "p.txt: cannot read" in result.stderr


def test_serve_prints_banner_accepts_tabpy_flags_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "fresh" / "state"
    config = tmp_path / "tabpy.conf"
    config.write_text(f"[TabPy]\nTABPY_PORT = {port}\nTABPY_STATE_PATH = {state}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "tabserve", "serve", "--config", str(config),
         "--disable-auth-warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "TABSERVE_WORKERS": "1"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        second = process.stdout.readline()
        assert first.startswith("tabserve ") and f"http://localhost:{port}" in first
        for part in (f"bind 127.0.0.1:{port}", "TLS off", "auth off", "evaluate on",
                     "1 workers", f"state {state}"):  # fmt: skip
            assert part in second
        info = requests.get(f"http://127.0.0.1:{port}/info", timeout=10).json()
        assert info["state_path"] == str(state)
        assert (state / "state.ini").read_text().startswith("# tabserve state file")
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)  # also closes the pipes
    assert process.returncode == 0


def test_default_bind_is_loopback_only(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tabserve"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "TABPY_PORT": str(port), "TABSERVE_WORKERS": "1",
             "TABPY_STATE_PATH": str(tmp_path)},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        process.stdout.readline()
        import psutil

        listening = [
            c.laddr for c in psutil.Process(process.pid).net_connections() if c.status == "LISTEN"
        ]
        assert [addr.ip for addr in listening] == ["127.0.0.1"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)


def test_help_lists_settings() -> None:
    result = tabserve("--help")
    assert result.returncode == 0
    assert "TABSERVE_WORKERS" in result.stdout and "TABPY_EVALUATE_TIMEOUT" in result.stdout


def test_no_prompt_even_without_a_terminal() -> None:
    started = time.monotonic()
    result = tabserve("--config", "/nonexistent/tabpy.conf")
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert "cannot read config file" in result.stderr


def test_unwritable_log_file_stops_startup_with_one_line(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "tabserve.log"
    result = tabserve("serve", env={"TABSERVE_LOG_FILE": str(target)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot open the log file" in lines[0] and str(target) in lines[0]


def test_broken_state_ini_stops_startup_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "state.ini").write_text("[Query Objects Service Versions]\nadd = {}\n")
    result = tabserve(env={"TABPY_STATE_PATH": str(tmp_path), "TABSERVE_WORKERS": "1",
                           "TABPY_PORT": str(free_port())})  # fmt: skip
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "[Service Info]" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_keys_warn_at_start_naming_the_nearest_key(server_factory: ServerFactory) -> None:
    server = server_factory(env={"TABSERVE_WORKRS": "2"}, TABPY_PWD_FLIE="/etc/passwords.txt")
    log = server.log()
    assert (
        "WARNING tabserve.config unknown setting TABPY_PWD_FLIE in the config file is ignored; "
        "did you mean TABPY_PWD_FILE?" in log
    )
    assert (
        "unknown setting TABSERVE_WORKRS in the environment is ignored; did you mean "
        "TABSERVE_WORKERS?" in log
    )
    assert "auth off" in log  # the misspelt key really is not used
