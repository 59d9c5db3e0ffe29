"""The password file deleted, truncated or garbled under a running server.

The last good copy stays in force (nobody is locked out, nobody new gets in), the error is
logged once, and /health/ready reports it until the file is fixed; a fixed file applies at
once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import Server, ServerFactory
from tabserve.cli import main

pytestmark = [pytest.mark.fault]

ADMIN = ("admin", "admin-secret")


def add_user(path: Path, user: str, password: str) -> None:
    # `tabserve user add` in this process: the same command without a Python start-up each
    # (test_auth_api.py and test_fault_kill.py run it as a process).
    assert main(["user", "add", "-u", user, "-p", password, "-f", str(path)]) == 0


def passwords_check(server: Server) -> tuple[int, dict[str, object]]:
    response = server.get("/health/ready", auth=None)
    checks = {check["name"]: check for check in response.json()["checks"]}
    return response.status_code, checks["passwords"]


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def garble(path: Path) -> None:
    path.write_bytes(b"admin not-a-hash\n\xff\xfe junk\n")


def truncate_mid_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [delete, empty, truncate_mid_line, garble])
def test_a_damaged_password_file_keeps_the_last_good_copy(
    server_factory: ServerFactory, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    passwords = tmp_path / "passwords.txt"
    add_user(passwords, *ADMIN)
    add_user(passwords, "reader", "reader-secret")
    server = server_factory(TABPY_PWD_FILE=str(passwords), auth=ADMIN, workdir=tmp_path)
    assert passwords_check(server)[0] == 200
    good = passwords.read_bytes()
    counts: Counter[str] = Counter()

    damage(passwords)
    wait_for(lambda: passwords_check(server)[0] == 503, "readiness never noticed the damage")
    status, check = passwords_check(server)
    assert check["ok"] is False
    assert "last good copy (2 users)" in str(check["detail"])
    assert str(passwords) not in str(check["detail"])  # the route is public
    # Both users still get in with their passwords; a wrong one is still refused.
    for _ in range(5):
        for auth in (ADMIN, ("reader", "reader-secret")):
            counts[str(server.get("/endpoints", auth=auth).status_code)] += 1
        assert server.get("/endpoints", auth=("admin", "guess")).status_code == 401
    assert counts == Counter({"200": 10})
    assert server.get("/health/live", auth=None).status_code == 200
    assert server.log().count("Password file not reloaded, keeping the previous users") == 1

    # A fixed file applies at once, a user added since included.
    passwords.write_bytes(good)
    add_user(passwords, "newcomer", "new-secret")
    wait_for(lambda: passwords_check(server)[0] == 200, "readiness never recovered")
    assert server.get("/endpoints", auth=("newcomer", "new-secret")).status_code == 200
    print(f"\n{damage.__name__}: {dict(counts)} answered with the last good copy")


def test_a_password_file_damaged_before_a_restart_stops_the_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # At start there is no last good copy: refusing to start is the only safe answer.
    passwords = tmp_path / "passwords.txt"
    add_user(passwords, *ADMIN)
    garble(passwords)
    with pytest.raises(RuntimeError, match="exited early") as failure:
        server_factory(TABPY_PWD_FILE=str(passwords), workdir=tmp_path)
    assert "cannot start" in str(failure.value)
    assert os.path.exists(passwords)
