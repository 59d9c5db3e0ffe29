"""SIGKILL at random points during deploys, overrides, deletes and ``tabserve user`` edits.

Each round starts a burst of real changes (one per endpoint name, through the HTTP API,
plus one ``tabserve user`` edit of the password file) and SIGKILLs at a random moment
either the server (then restarts it) or, when only the password file is being edited, the
``tabserve user`` process (the server keeps running: no restart is needed for that point).
After every point the state is checked from outside: ``state.ini`` parses and lists exactly
what ``/endpoints`` lists, every listed endpoint loads and answers with a version it was
given, nothing half-written is left behind after a restart, the password file parses and
holds every user it should, each with a password it was given.

Cost: a kill point is a server restart (about a second of imports) or a CLI start. Two
lanes (servers with their own state directories) run side by side on the two cores.
"""

from __future__ import annotations

import base64
import configparser
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import pytest
import requests

from helpers import Server
from tabserve.store.passwords import read_password_file, verify

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# 200 kills, each followed by a restart: minutes on a loaded machine, hence its own limit.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(900)]

KILL_POINTS = 200
LANES = 2
NAMES = ("alpha", "beta", "gamma")
ADMIN = ("admin", "admin-secret-1")
KEEPERS = {"keeper1": "keeper-secret-1", "keeper2": "keeper-secret-2"}
EDITED = ("temp1", "temp2")
# Share of rounds that kill only the `tabserve user` process, leaving the server up.
CLI_ONLY = 0.3
ABSENT = None


def answer_for(tag: str):  # type: ignore[no-untyped-def]
    def answer() -> str:
        return tag

    return answer


def archive_body(name: str, tag: str) -> dict[str, object]:
    return {
        "name": name,
        "type": "model",
        "description": f"version tagged {tag}",
        "archive": base64.b64encode(cloudpickle.dumps(answer_for(tag))).decode(),
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }


def user_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tabserve", "user", *args]


def temp_leftovers(*roots: Path) -> list[str]:
    """Files or directories that only an interrupted write leaves behind."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.name.endswith((".tmp", ".incoming")):
                found.append(str(path))
    return found


@dataclass
class Lane:
    """One server and its state directory and password file, killed over and over."""

    workdir: Path
    rng: random.Random
    counts: Counter[str] = field(default_factory=Counter)
    # What each endpoint may answer now: a set of tags, ABSENT when it may not exist.
    endpoints: dict[str, set[str | None]] = field(default_factory=dict)
    # What each edited user's password may be now (ABSENT when the user may not exist).
    users: dict[str, set[str | None]] = field(default_factory=dict)
    server: Server | None = None
    serial: int = 0
    cli_seconds: float = 0.5
    _pending_user: tuple[str, str | None] = ("", None)

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def password_file(self) -> Path:
        return self.workdir / "auth" / "passwords.txt"

    def setup(self) -> None:
        self.password_file.parent.mkdir(parents=True)
        for user, password in [ADMIN, *KEEPERS.items()]:
            subprocess.run(
                user_cli("add", "-u", user, "-p", password, "-f", str(self.password_file)),
                check=True,
                capture_output=True,
            )
        self.endpoints = {name: {ABSENT} for name in NAMES}
        self.users = {name: {ABSENT} for name in EDITED}
        self.start()

    def start(self) -> None:
        self.server = Server(
            self.workdir,
            {
                "TABPY_STATE_PATH": str(self.state),
                "TABPY_PWD_FILE": str(self.password_file),
                "TABSERVE_WORKERS": "1",
                "TABPY_EVALUATE_TIMEOUT": "20",
            },
            {},
            auth=ADMIN,
        )

    def kill_server(self) -> None:
        assert self.server is not None
        os.kill(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait()
        # The workers notice their pipe closing and exit by themselves.
        self.server = None

    # -- one round --------------------------------------------------------------------------

    def endpoint_change(self, name: str) -> None:
        assert self.server is not None
        (current,) = self.endpoints[name]  # settled by the last check
        self.serial += 1
        tag = f"{name}-{self.serial}"
        if current is ABSENT:
            kind, method, path, body = "deploy", "POST", "/endpoints", archive_body(name, tag)
            after: str | None = tag
        elif self.rng.random() < 0.6:
            kind, method, path = "override", "PUT", f"/endpoints/{name}"
            body = {**archive_body(name, tag), "should_update_version": True}
            after = tag
        else:
            kind, method, path, body, after = "delete", "DELETE", f"/endpoints/{name}", {}, None
        self.endpoints[name] = {current, after}
        try:
            response = self.server.request(method, path, json=body or None, timeout=30)
        except requests.ConnectionError:
            self.counts[f"{kind} interrupted"] += 1
            return
        assert response.status_code in (200, 201, 204), (kind, response.text)
        self.endpoints[name] = {after}
        self.counts[f"{kind} completed"] += 1

    def user_edit(self) -> subprocess.Popen[bytes]:
        name = self.rng.choice(EDITED)
        (current,) = self.users[name]
        self.serial += 1
        password = f"pw-{self.serial}"
        where = ["-u", name, "-f", str(self.password_file)]
        if current is ABSENT:
            command, after = user_cli("add", *where, "-p", password), password
        elif self.rng.random() < 0.6:
            command, after = user_cli("update", *where, "-p", password), password
        else:
            command, after = user_cli("delete", *where), None
        self.users[name] = {current, after}
        self._pending_user = (name, after)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish_user_edit(self, process: subprocess.Popen[bytes], killed: bool) -> None:
        name, after = self._pending_user
        code = process.wait()
        if code == 0:
            self.users[name] = {after}
            self.counts["user edit completed"] += 1
        else:
            assert killed and code == -signal.SIGKILL, process.stderr.read()  # type: ignore[union-attr]
            self.counts["user edit interrupted"] += 1

    def round(self) -> int:
        """One burst of changes and one kill; returns the kill points that hit a change."""
        cli_only = self.rng.random() < CLI_ONLY
        edit = self.user_edit()
        points = 0
        if cli_only:
            # Python's start-up is most of the CLI's life: aim at the whole of it.
            time.sleep(self.rng.uniform(0.0, 1.2 * self.cli_seconds))
            running = edit.poll() is None
            edit.kill()
            self.finish_user_edit(edit, killed=running)
            points += running
            self.counts["kills of tabserve user"] += running
            self.check(restarted=False)
            return points
        with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
            changes = [pool.submit(self.endpoint_change, name) for name in NAMES]
            time.sleep(self.rng.uniform(0.0, 0.3))
            busy = not all(change.done() for change in changes) or edit.poll() is None
            self.kill_server()
            for change in changes:
                change.result()
        running = edit.poll() is None
        if running and self.rng.random() < 0.5:
            edit.kill()
        else:
            running = False
        self.finish_user_edit(edit, killed=running)
        points += busy
        self.counts["kills of the server"] += busy
        left = temp_leftovers(self.state, self.password_file.parent)
        self.counts["kills that left a temporary file"] += bool(left)
        self.start()
        self.check(restarted=True)
        return points

    # -- the checks -------------------------------------------------------------------------

    def check(self, restarted: bool) -> None:
        assert self.server is not None
        if restarted:
            assert temp_leftovers(self.state, self.password_file.parent) == []
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string((self.state / "state.ini").read_text(encoding="utf-8"))
        listed = set(parser.options("Query Objects Service Versions")) if parser.has_section(
            "Query Objects Service Versions"
        ) else set()  # fmt: skip
        served = set(self.server.get("/endpoints").json())
        assert listed == served
        statuses = self._settled_statuses()
        for name in NAMES:
            if name not in listed:
                assert ABSENT in self.endpoints[name], (name, self.endpoints[name])
                self.endpoints[name] = {ABSENT}
                continue
            assert statuses[name]["status"] == "LoadSuccessful", statuses[name]
            archive = self.state / "query_objects" / name / str(statuses[name]["version"])
            assert (archive / "pickle_archive").is_file()
            response = self.server.post(f"/query/{name}", json={"data": {}})
            assert response.status_code == 200, response.text
            tag = response.json()["response"]
            assert tag in self.endpoints[name], (name, tag, self.endpoints[name])
            self.endpoints[name] = {tag}
        self._check_users()

    def _settled_statuses(self) -> dict[str, dict[str, object]]:
        assert self.server is not None
        deadline = time.monotonic() + 60
        while True:
            statuses: dict[str, dict[str, object]] = self.server.get("/status").json()
            pending = [n for n, s in statuses.items() if s["status"] == "LoadInProgress"]
            if not pending or time.monotonic() > deadline:
                return statuses
            time.sleep(0.02)

    def _check_users(self) -> None:
        assert self.server is not None
        # The file parses (tabserve's own reader, which the server uses) ...
        entries = read_password_file(self.password_file).users
        assert {ADMIN[0], *KEEPERS} <= set(entries)  # no user is ever lost
        # ... the server still lets the users it always had in ...
        for user, password in KEEPERS.items():
            assert self.server.get("/endpoints", auth=(user, password)).status_code == 200
        # ... and each edited user is absent or has exactly one of the passwords it was given.
        for user in EDITED:
            if user not in entries:
                assert ABSENT in self.users[user], (user, self.users[user])
                self.users[user] = {ABSENT}
                continue
            works = [p for p in self.users[user] if p is not None and verify(entries[user], p)]
            assert len(works) == 1, (user, self.users[user])
            self.users[user] = {works[0]}

    def measure_cli(self) -> None:
        started = time.monotonic()
        subprocess.run(
            user_cli("update", "-u", "keeper1", "-p", KEEPERS["keeper1"], "-f",
                     str(self.password_file)),
            check=True, capture_output=True,
        )  # fmt: skip
        self.cli_seconds = time.monotonic() - started


def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("TABSERVE_FAULT_SEED", random.randrange(1 << 30)))
    print(f"\nseed {seed} (TABSERVE_FAULT_SEED={seed} repeats this run)")
    lanes = [Lane(tmp_path / f"lane{i}", random.Random(seed + i)) for i in range(LANES)]
    done = 0
    lock = threading.Lock()
    started = time.monotonic()

    def work(lane: Lane) -> None:
        nonlocal done
        lane.setup()
        lane.measure_cli()
        lane.check(restarted=True)
        while True:
            with lock:
                if done >= KILL_POINTS:
                    return
            points = lane.round()
            with lock:
                done += points

    try:
        with ThreadPoolExecutor(max_workers=LANES) as pool:
            for future in [pool.submit(work, lane) for lane in lanes]:
                future.result()
    finally:
        for lane in lanes:
            if lane.server is not None:
                lane.server.stop()
    total: Counter[str] = Counter()
    for lane in lanes:
        total.update(lane.counts)
    print(f"{done} kill points in {time.monotonic() - started:.0f} s:")
    for key, value in sorted(total.items()):
        print(f"  {key}: {value}")
    assert done >= KILL_POINTS


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_a_restart_removes_only_abandoned_temporaries(tmp_path: Path) -> None:
    """What a killed writer leaves goes at the next start; what a live writer holds stays."""
    lane = Lane(tmp_path, random.Random(0))
    lane.setup()
    lane.kill_server()
    abandoned = [
        lane.state / ".state.ini.k1ll3d.tmp",
        lane.password_file.parent / ".passwords.txt.k1ll3d.tmp",
    ]
    for path in abandoned:
        path.write_text("half of a write")
    incoming = lane.state / "query_objects" / "alpha" / ".2.incoming"
    incoming.mkdir(parents=True)
    (incoming / "pickle_archive").write_bytes(b"half")
    held = lane.state / ".state.ini.w0rk1n.tmp"
    writer = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"held\n"
        lane.start()
        assert temp_leftovers(lane.state, lane.password_file.parent) == [str(held)]
        assert "left by an interrupted write" in lane.server.log()  # type: ignore[union-attr]
        lane.check(restarted=False)
    finally:
        writer.kill()
        writer.wait()
        if lane.server is not None:
            lane.server.stop()
