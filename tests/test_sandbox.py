"""The sandbox, attacked from scripts over real HTTP.

Every ``test_deny_*`` runs twice: against a server in bubblewrap mode, where the attack must
be refused, and against a server with every protection switched off (no sandbox, workers
keep root, no memory or process limit), where the same attack must succeed. The second run
proves that the script really attempts what the first run claims is prevented.

The servers' directories live in /var/tmp, not /tmp: bubblewrap gives scripts an empty
private /tmp, which would hide anything below it whether or not the sandbox hid it on
purpose.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cloudpickle
import psutil
import pytest

from helpers import Server, ServerFactory
from tabserve.config import load_settings
from tabserve.errors import SandboxUnavailable
from tabserve.server import sandbox
from tabserve.server.executor import describe_exit
from tabserve.store.passwords import hash_password
from tabserve.worker import self_check

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CANARY = f"canary-{uuid.uuid4().hex}"
USER = ("alice", f"pw-{uuid.uuid4().hex}")
PASSWORD_HASH = hash_password(*USER)
FORKS = 100


def _double(x: list[float]) -> list[float]:
    return [2 * v for v in x]


@dataclass
class Case:
    """A server and what a hostile script should get from it."""

    server: Server
    denied: bool  # True: the sandbox is on and every attack must fail
    secret: Path  # the password file


@pytest.fixture(scope="module")
def outside_tmp() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="tabserve-sandbox-", dir="/var/tmp"))
    # Open like /var/tmp itself, so that what stops a script is the sandbox, not this mode.
    directory.chmod(0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _password_file(directory: Path) -> Path:
    # A real password file, in its own directory, readable by the server's user only.
    directory.mkdir()
    path = directory / "passwd.txt"
    path.write_text(f"{USER[0]} {PASSWORD_HASH}\n")
    path.chmod(0o600)
    return path


def _case(server_factory: ServerFactory, workdir: Path, isolated: bool, **config: str) -> Case:
    """A server with a real password file in a directory of its own, and a canary secret."""
    workdir.mkdir(mode=0o755)
    secret = _password_file(workdir / "secrets")
    server = server_factory(
        env={"TABSERVE_TEST_CANARY": CANARY},
        workdir=workdir,
        auth=USER,
        TABPY_PWD_FILE=str(secret),
        **config,
    )
    return Case(server, isolated, secret)


def _isolated(server_factory: ServerFactory, workdir: Path, timeout: str) -> Case:
    return _case(
        server_factory,
        workdir,
        True,
        TABSERVE_SANDBOX="bubblewrap",
        TABSERVE_WORKER_USER="nobody",
        TABSERVE_LOG_FILE=str(workdir / "tabserve.log"),
        TABSERVE_WORKER_MEMORY_MB="512",
        TABSERVE_WORKER_PROCESSES="16",
        TABSERVE_WORKER_CPU_SECONDS="1",
        TABSERVE_WORKER_FILE_SIZE_MB="1",
        TABSERVE_WORKER_OPEN_FILES="64",
        TABPY_EVALUATE_TIMEOUT=timeout,
    )


@pytest.fixture(scope="module")
def isolated(server_factory: ServerFactory, outside_tmp: Path) -> Case:
    # Far above the CPU backstop: a busy worker on a loaded machine gets little CPU.
    return _isolated(server_factory, outside_tmp / "isolated", timeout="12")


@pytest.fixture(scope="module")
def isolated_short(server_factory: ServerFactory, outside_tmp: Path) -> Case:
    """As ``isolated``, with a 4 s timeout, for the tests that wait for one to fire: their
    scripts sleep (they need no CPU to reach the timeout), and each waited out 12 s."""
    return _isolated(server_factory, outside_tmp / "isolated-short", timeout="4")


@pytest.fixture(scope="module")
def unprotected(server_factory: ServerFactory, outside_tmp: Path) -> Case:
    return _case(
        server_factory,
        outside_tmp / "unprotected",
        False,
        TABSERVE_SANDBOX="none",
        TABSERVE_WORKER_USER="root",
        TABSERVE_WORKER_MEMORY_MB="0",
        TABSERVE_WORKER_PROCESSES="0",
        TABPY_EVALUATE_TIMEOUT="20",
    )


@pytest.fixture(scope="module")
def unprotected_zygote(server_factory: ServerFactory, outside_tmp: Path) -> Case:
    """As ``unprotected``, with workers forked from the zygote: forking changes nothing of
    what a script can reach (the zygote holds no more than a fresh worker would)."""
    return _case(
        server_factory,
        outside_tmp / "unprotected-zygote",
        False,
        TABSERVE_SANDBOX="none",
        TABSERVE_WORKER_LAUNCH="zygote",
        TABSERVE_WORKER_USER="root",
        TABSERVE_WORKER_MEMORY_MB="0",
        TABSERVE_WORKER_PROCESSES="0",
        TABPY_EVALUATE_TIMEOUT="20",
    )


_CASES = {"bubblewrap": "isolated", "off": "unprotected", "off-zygote": "unprotected_zygote"}


@pytest.fixture(params=list(_CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return request.getfixturevalue(_CASES[request.param])


def attempt(server: Server, script: str, **data: object) -> str:
    """Run ``script`` (which returns one string) and give back that string or the error."""
    response = server.evaluate(script, **data)
    if response.status_code == 200:
        return str(response.json()[0])
    return f"HTTP {response.status_code}: {response.text}"


def test_both_servers_passed_their_self_check(case: Case) -> None:
    info = case.server.get("/info").json()
    assert "sandbox" not in info, info["sandbox"]  # TabPy's exact shape while all is well
    assert info["versions"]["v1"]["features"]["evaluate_enabled"] is True


# A script that returns a file's text, or the error that stopped it.
READ_FILE = """
try:
    with open(_arg1[0]) as handle:
        return [handle.read()]
except OSError as exc:
    return [repr(exc)]
"""


def test_deny_read_password_file(case: Case) -> None:
    seen = attempt(case.server, READ_FILE, _arg1=[str(case.secret)])
    assert (PASSWORD_HASH not in seen) is case.denied, seen
    if case.denied:
        assert "FileNotFoundError" in seen, "bubblewrap hides the file's whole directory"


def test_deny_write_state_dir(case: Case) -> None:
    target = case.server.state_path / "intruder.txt"
    script = """
try:
    with open(_arg1[0], "w") as handle:
        handle.write("owned")
    return ["written"]
except OSError as exc:
    return [repr(exc)]
"""
    seen = attempt(case.server, script, _arg1=[str(target)])
    try:
        assert (not target.exists()) is case.denied, seen
        assert (seen != "written") is case.denied
        if case.denied:
            assert "Read-only file system" in seen
    finally:
        target.unlink(missing_ok=True)


def test_deny_connect_to_own_port(case: Case) -> None:
    script = """
import socket
with socket.socket() as sock:
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", _arg1[0]))
    except OSError as exc:
        return [repr(exc)]
return ["connected"]
"""
    seen = attempt(case.server, script, _arg1=[case.server.port])
    assert (seen != "connected") is case.denied, seen


def test_deny_fork_many(case: Case) -> None:
    # Children sleep so they all exist at once; the script kills and reaps them itself.
    script = f"""
import os, signal
children = []
error = ""
for _ in range({FORKS}):
    try:
        pid = os.fork()
    except OSError as exc:
        error = repr(exc)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
return [f"{{len(children)}} {{error}}"]
"""
    seen = attempt(case.server, script)
    started = int(seen.split()[0]) if seen[:1].isdigit() else -1
    assert (0 <= started < FORKS) is case.denied, seen
    if case.denied:
        assert "Resource temporarily unavailable" in seen


def test_deny_allocate_past_cap(case: Case) -> None:
    response = case.server.evaluate("return [len(bytearray(1024 * 1024 * 1024))]")
    if case.denied:
        assert response.status_code == 500
        assert "MemoryError" in response.json()["info"]
    else:
        assert response.status_code == 200 and response.json() == [1024**3]


def test_deny_read_server_environment(case: Case) -> None:
    script = """
import os
seen = repr(dict(os.environ))
try:
    with open(f"/proc/{_arg1[0]}/environ", "rb") as handle:
        seen += handle.read().decode(errors="replace")
except OSError as exc:
    seen += repr(exc)
return [seen]
"""
    seen = attempt(case.server, script, _arg1=[case.server.process.pid])
    assert (CANARY not in seen) is case.denied, seen


def test_deny_write_outside_tmp(case: Case, outside_tmp: Path) -> None:
    target = outside_tmp / f"outside-{uuid.uuid4().hex}"
    script = """
import os
with open("/tmp/scratch", "w") as handle:
    handle.write("scratch space works")
try:
    with open(_arg1[0], "w") as handle:
        handle.write("owned")
    return ["written"]
except OSError as exc:
    return [repr(exc)]
"""
    seen = attempt(case.server, script, _arg1=[str(target)])
    try:
        assert (seen != "written" and not target.exists()) is case.denied, seen
        if case.denied:
            assert "Read-only file system" in seen
    finally:
        target.unlink(missing_ok=True)


def test_deny_read_password_file_after_it_was_replaced(case: Case) -> None:
    # What `tabserve user add` and every editor do: write a new file, rename it over the old.
    # Same content, so that the server's own authentication keeps working; readable by
    # everyone, so that only the sandbox (not the worker user's rights) can stop the script.
    fresh = case.secret.with_name("passwd.new")
    fresh.write_text(case.secret.read_text())
    fresh.chmod(0o644)
    os.replace(fresh, case.secret)
    seen = attempt(case.server, READ_FILE, _arg1=[str(case.secret)])
    assert (PASSWORD_HASH not in seen) is case.denied, seen


def test_a_secret_beside_what_workers_need_is_hidden_alone_with_a_warning(
    outside_tmp: Path,
) -> None:
    base = outside_tmp / "shared"
    base.mkdir()
    (base / "passwd").write_text("pw")
    target = outside_tmp / "renewed"
    target.mkdir()
    (target / "key1.pem").write_text("key")
    link = outside_tmp / "live"
    link.mkdir()
    (link / "key.pem").symlink_to(target / "key1.pem")
    settings = load_settings(
        None, {"TABPY_STATE_PATH": str(base / "state"), "TABSERVE_SANDBOX": "bubblewrap"}
    )
    settings = replace(settings, password_file=base / "passwd", key_file=link / "key.pem")
    confined = sandbox.confinement(settings)
    prefix = " ".join(confined.prefix)
    assert f"--dev-bind /dev/null {base / 'passwd'}" in prefix
    assert f"--tmpfs {base} " not in prefix
    # A key given through a symlink: both the link's directory and the target's are hidden.
    assert f"--tmpfs {link} --remount-ro {link}" in prefix
    assert f"--tmpfs {target} --remount-ro {target}" in prefix
    assert [level for level, _ in confined.notes] == ["warning"]
    assert str(base) in confined.notes[0][1] and "directory of their own" in confined.notes[0][1]
    findings = sandbox.assess(settings, confined, _self_check_result())
    assert confined.notes[0] in findings


def test_a_segfault_leaves_the_sandboxed_server_answering(isolated: Case) -> None:
    """bwrap reports its child's death by a signal as an exit code: the 500 still names it."""
    response = isolated.server.evaluate("import ctypes\nctypes.string_at(0)")
    assert response.status_code == 500
    assert "SIGSEGV" in response.json()["info"], response.text
    for _ in range(3):
        assert isolated.server.evaluate("return [_arg1 + 1]", _arg1=1).json() == [2]


def test_sandboxed_workers_write_the_log_file(isolated: Case) -> None:
    marker = f"logged-{uuid.uuid4().hex}"
    response = isolated.server.evaluate(f"logging.getLogger('script').warning('{marker}')")
    assert response.status_code == 200
    assert marker in (isolated.server.workdir / "tabserve.log").read_text()


@pytest.mark.root
def test_user_code_is_not_root_when_the_server_is(isolated: Case) -> None:
    seen = attempt(isolated.server, "import os\nreturn [f'{os.getuid()} {os.geteuid()}']")
    uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.getuid()
    assert seen == f"{uid} {uid}"
    assert uid != 0


def test_deployed_endpoint_answers_inside_the_sandbox(isolated: Case) -> None:
    body = {
        "name": "double",
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(_double)).decode(),
    }
    assert isolated.server.post("/endpoints", json=body).status_code == 201
    answer = isolated.server.post("/query/double", json={"data": {"x": [1, 2]}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"] == [2, 4]


def _orphans(marker: str) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []):
            found.append(process.info["pid"])
    return found


def _gone(marker: str) -> bool:
    deadline = time.monotonic() + 10
    while _orphans(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _orphans(marker)


_SPAWN = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{marker}"])
"""


def test_cpu_backstop_kills_a_runaway_script_and_its_children(isolated: Case) -> None:
    # TABSERVE_WORKER_CPU_SECONDS = 1, well inside the 12 s request timeout.
    marker = f"orphan-{uuid.uuid4().hex}"
    response = isolated.server.evaluate(_SPAWN.format(marker=marker) + "while True:\n    pass")
    assert response.status_code == 500
    assert "SIGXCPU" in response.json()["info"]
    assert _gone(marker)


@pytest.mark.slow
def test_timeout_kills_everything_the_script_started_in_the_sandbox(isolated_short: Case) -> None:
    marker = f"orphan-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            isolated_short.server.evaluate, _SPAWN.format(marker=marker) + "time.sleep(60)"
        )
        deadline = time.monotonic() + 10
        while not _orphans(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _orphans(marker), "the script's child should be running (and visible) by now"
        assert future.result().status_code == 408
    assert _gone(marker)


@pytest.mark.slow
def test_timeout_kills_a_child_in_a_new_session_in_the_sandbox(isolated_short: Case) -> None:
    # setsid takes the child out of the worker's process group, which is all a timeout kills
    # in none mode; bubblewrap's PID namespace dies with the worker, taking it along.
    marker = f"orphan-{uuid.uuid4().hex}"
    spawn = _SPAWN.replace('"{marker}"])', '"{marker}"], start_new_session=True)').format(
        marker=marker
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(isolated_short.server.evaluate, spawn + "time.sleep(60)")
        deadline = time.monotonic() + 10
        while not _orphans(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _orphans(marker), "the script's child should be running (and visible) by now"
        assert future.result().status_code == 408
    assert _gone(marker)


def test_none_mode_says_a_timeout_reaches_only_the_process_group() -> None:
    findings = _judge("none")
    assert any(level == "info" and "process group only" in message for level, message in findings)
    assert not any("process group only" in message for _, message in _judge("bubblewrap"))
    # Forks of the zygote are killed with their whole process tree: nothing to say.
    assert not any("process group only" in message for _, message in _judge("none", "zygote"))


def test_file_size_and_open_file_limits(isolated: Case) -> None:
    script = """
import os
try:
    with open("/tmp/big", "wb") as handle:
        handle.write(b"x" * (2 * 1024 * 1024))
    big = "written"
except OSError as exc:
    big = repr(exc)
handles = []
try:
    for _ in range(200):
        handles.append(open("/dev/null"))
    many = "opened"
except OSError as exc:
    many = repr(exc)
for handle in handles:
    handle.close()
return [big + " | " + many]
"""
    seen = attempt(isolated.server, script)
    big, many = seen.split(" | ")
    assert "File too large" in big
    assert "Too many open files" in many


# -- failing closed ----------------------------------------------------------------------


def _deploy(server: Server) -> int:
    body = {
        "name": "double",
        "type": "model",
        "archive": base64.b64encode(cloudpickle.dumps(_double)).decode(),
    }
    return server.post("/endpoints", json=body).status_code


def test_fails_closed_when_bubblewrap_is_missing(
    server_factory: ServerFactory, outside_tmp: Path
) -> None:
    workdir = outside_tmp / "closed"
    workdir.mkdir()
    broken = {"PATH": "/nonexistent"}  # no bwrap to be found
    trusted = server_factory(
        env=broken,
        workdir=workdir,
        TABSERVE_SANDBOX="bubblewrap",
        TABSERVE_TRUST_DEPLOYED_CODE="true",
    )
    info = trusted.get("/info").json()
    assert info["versions"]["v1"]["features"]["evaluate_enabled"] is False
    assert trusted.get("/health/ready").status_code == 200  # it still serves deployed code
    assert info["sandbox"]["self_check"] == "failed"
    assert any("bubblewrap" in problem for problem in info["sandbox"]["problems"])
    refused = trusted.evaluate("return [1]")
    assert refused.status_code == 503
    assert "sandbox" in refused.json()["message"]
    assert "bubblewrap" in refused.json()["info"]
    # Deployed code is trusted: deploys and queries keep working.
    assert _deploy(trusted) == 201
    assert trusted.post("/query/double", json={"data": {"x": [3]}}).json()["response"] == [6]
    assert trusted.stop() == 0

    untrusted = server_factory(env=broken, workdir=workdir, TABSERVE_SANDBOX="bubblewrap")
    assert untrusted.get("/info").json()["sandbox"]["query_enabled"] is False
    ready = untrusted.get("/health/ready")
    assert ready.status_code == 503
    sandbox_check = next(c for c in ready.json()["checks"] if c["name"] == "sandbox")
    # Public: the verdict only; what failed is for /info (authenticated) and the log.
    assert not sandbox_check["ok"]
    assert sandbox_check["detail"] == "bubblewrap: self-check failed"
    query = untrusted.post("/query/double", json={"data": {"x": [3]}})
    assert query.status_code == 503
    assert "TABSERVE_TRUST_DEPLOYED_CODE" in query.json()["info"]
    assert _deploy(untrusted) == 503
    status = untrusted.get("/status").json()["double"]
    assert status["status"] == "LoadFailed" and "sandbox" in status["last_error"]


# -- the function tabserve doctor calls ----------------------------------------------------


def test_self_check_reports_bubblewrap_isolation(outside_tmp: Path) -> None:
    settings = load_settings(
        None,
        {
            "TABPY_STATE_PATH": str(outside_tmp / "doctor"),
            "TABSERVE_SANDBOX": "bubblewrap",
            "TABSERVE_WORKERS": "1",
        },
    )
    report = sandbox.self_check(settings)
    assert report.mode == "bubblewrap"
    assert report.ok, report.findings
    messages = [message for level, message in report.findings if level == "ok"]
    assert any("no network" in message for message in messages)
    assert any("state directory is hidden" in message for message in messages)


def test_self_check_fails_without_bubblewrap(
    outside_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    settings = load_settings(
        None,
        {
            "TABPY_STATE_PATH": str(outside_tmp / "doctor-missing"),
            "TABSERVE_SANDBOX": "bubblewrap",
            "TABSERVE_WORKERS": "1",
            "TABSERVE_WORKER_USER": "root",
        },
    )
    report = sandbox.self_check(settings)
    assert not report.ok
    assert report.findings[0][0] == "error"
    assert "bubblewrap" in report.findings[0][1]


def test_bubblewrap_command_hides_secrets_and_state(outside_tmp: Path) -> None:
    secrets = outside_tmp / "keys"
    secrets.mkdir()
    (secrets / "key.pem").write_text("key")
    (secrets / "passwd").write_text("pw")
    settings = load_settings(
        None,
        {"TABPY_STATE_PATH": str(outside_tmp / "plan"), "TABSERVE_SANDBOX": "bubblewrap"},
    )
    extra = outside_tmp / "private"
    extra.mkdir()
    settings = replace(
        settings,
        password_file=secrets / "passwd",
        key_file=secrets / "key.pem",
        sandbox_hide=(extra,),
    )
    prefix = " ".join(sandbox.confinement(settings).prefix)
    state = outside_tmp / "plan"
    # The secrets' own directory is hidden whole: a mount over the file alone would not
    # survive the file being replaced by rename.
    assert f"--tmpfs {secrets} --remount-ro {secrets}" in prefix
    assert "/dev/null" not in prefix.replace("--dev-bind /dev/null /dev/null", "")
    assert f"--tmpfs {state} --ro-bind {state}/query_objects {state}/query_objects" in prefix
    assert f"--remount-ro {state}" in prefix
    assert f"--tmpfs {extra} --remount-ro {extra}" in prefix
    assert "--unshare-net" in prefix or "--unshare-all" in prefix
    allowed = replace(settings, sandbox_network=True)
    networked = sandbox.confinement(allowed).prefix
    assert "--unshare-net" not in networked
    assert ("--share-net" in networked) == ("--unshare-all" in networked)


# -- judging a self-check -----------------------------------------------------------------------


def _self_check_result(**overrides: object) -> dict[str, object]:
    """What a well-confined worker reports (uid nobody, limits, nothing reachable)."""
    result: dict[str, object] = {
        "uid": 65534,
        "euid": 65534,
        "gid": 65534,
        "groups": [],
        "capabilities": 0,
        "limits": {"as": -1, "cpu": 100, "fsize": 1024 * 1024 * 1024, "nofile": 1024, "nproc": 64},
        "env": ["PATH", "HOME", "TMPDIR"],
        "secrets": {},
        "stdlib": "/usr/lib/python3",
        "stdlib_readable": True,
        "tmp_writable": True,
        "state_listing": ["query_objects"],
        "state_writable": False,
        "archives_readable": True,
        "outside_writable": False,
        "connects": False,
        "server_environ": False,
    }
    result.update(overrides)
    return result


def _judge(mode: str, launch: str = "fresh", **overrides: object) -> list[tuple[str, str]]:
    settings = replace(
        load_settings(None, {"TABSERVE_WORKER_MEMORY_MB": "0", "TABSERVE_WORKERS": "1"}),
        sandbox=mode,
        worker_launch=launch,
    )
    confined = sandbox.Confinement(
        mode=mode,
        drop_to=(65534, 65534),
        limits={"fsize": 1024, "nofile": 1024, "nproc": 64},
        archive_dir="/state/query_objects",
        state_path="/state",
    )
    return sandbox.assess(settings, confined, _self_check_result(**overrides))


def _errors(findings: list[tuple[str, str]]) -> list[str]:
    return [message for level, message in findings if level == "error"]


def test_a_well_confined_worker_passes() -> None:
    assert _errors(_judge("bubblewrap")) == []
    assert _errors(_judge("none")) == []


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"connects": True}, "network"),
        ({"state_writable": True}, "write into the state directory"),
        ({"state_listing": ["query_objects", "state.ini"]}, "state.ini"),
        ({"secrets": {"/etc/tabserve/passwd": True}}, "/etc/tabserve/passwd"),
        ({"server_environ": True}, "environment"),
        ({"outside_writable": True}, "outside /tmp"),
        ({"uid": 0, "euid": 0}, "uid 0"),
        ({"env": ["PATH", "AWS_SECRET_ACCESS_KEY"]}, "AWS_SECRET_ACCESS_KEY"),
        ({"limits": {"as": -1, "cpu": 100, "fsize": -1, "nofile": 1024, "nproc": 64}}, "FSIZE"),
    ],
)
def test_each_broken_promise_fails_bubblewrap(overrides: dict[str, object], problem: str) -> None:
    errors = _errors(_judge("bubblewrap", **overrides))
    assert any(problem in message for message in errors), errors


def test_none_mode_reports_what_it_does_not_promise_without_failing() -> None:
    findings = _judge("none", connects=True, secrets={"/etc/tabserve/passwd": True})
    assert _errors(findings) == []
    levels = {message: level for level, message in findings}
    assert levels["scripts can read /etc/tabserve/passwd"] == "warning"
    assert levels["scripts can open network connections"] == "info"


def test_an_unreadable_python_fails_once_the_user_is_switched() -> None:
    errors = _errors(_judge("none", stdlib_readable=False))
    assert any("cannot read /usr/lib/python3" in message for message in errors)


def test_report_gates_evaluate_and_deployed_code() -> None:
    failed = sandbox.SandboxReport.from_findings("bubblewrap", [("error", "no bwrap")])
    with pytest.raises(SandboxUnavailable, match="refused"):
        failed.require_evaluate()
    with pytest.raises(SandboxUnavailable):
        failed.require_deployed()
    trusted = sandbox.SandboxReport.from_findings("bubblewrap", [("error", "no bwrap")], True)
    trusted.require_deployed()  # trusted deployed code keeps running
    assert trusted.readiness()[0] and not failed.readiness()[0]
    assert "no bwrap" not in failed.readiness()[1] + trusted.readiness()[1]
    passed = sandbox.SandboxReport.from_findings("none", [("warning", "runs as root")])
    passed.require_evaluate()
    assert passed.ok


def test_launcher_exit_codes_name_the_signal() -> None:
    assert describe_exit(128 + 24, launcher=True) == "was killed by SIGXCPU"
    assert describe_exit(3, launcher=True) == "exited with code 3"
    assert describe_exit(128 + 24) == "exited with code 152"


@pytest.mark.root
def test_default_worker_user_keeps_a_root_install_working(server_factory: ServerFactory) -> None:
    """The README's quick start as root: with TABSERVE_WORKER_USER = auto, scripts run.

    As 'nobody' when that user can read the Python installation; otherwise (a pyenv under
    /root, as on CI's machine) as root, with the self-check warning instead of refusing.
    """
    server = server_factory(TABSERVE_WORKERS="1", TABSERVE_WORKER_USER="auto")
    response = server.evaluate("return _arg1 + _arg2", _arg1=1, _arg2=2)
    assert response.status_code == 200 and response.json() == 3
    uid = server.evaluate("import os\nreturn os.getuid()").json()
    assert server.get("/health/ready").status_code == 200
    if os.geteuid() == 0 and uid == 0:
        assert "'nobody' cannot read the Python installation" in server.log()
    elif os.geteuid() == 0:
        assert uid == pwd.getpwnam("nobody").pw_uid


def test_self_check_reads_a_directory_by_listing_it(tmp_path: Path) -> None:
    visible = tmp_path / "visible"
    visible.mkdir()
    (visible / "secret.txt").write_text("s")
    empty = tmp_path / "empty"
    empty.mkdir()
    seen = self_check.run({"secrets": [str(visible), str(empty), str(tmp_path / "missing")]})
    assert seen["secrets"] == {
        str(visible): True,
        str(empty): False,
        str(tmp_path / "missing"): False,
    }


def test_planning_creates_nothing_and_start_prepares_what_the_plan_mounts(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "TABPY_STATE_PATH": str(tmp_path / "state"),
            "TABSERVE_SANDBOX": "bubblewrap",
            "TABSERVE_LOG_FILE": str(tmp_path / "tabserve.log"),
        },
    )
    confined = sandbox.confinement(settings)
    assert list(tmp_path.iterdir()) == []  # no archive directory, no log file
    assert f"--ro-bind {confined.archive_dir} {confined.archive_dir}" in " ".join(confined.prefix)
    sandbox.prepare(settings, confined)
    assert Path(confined.archive_dir).is_dir() and (tmp_path / "tabserve.log").is_file()
