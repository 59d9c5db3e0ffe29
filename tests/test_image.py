"""The container image, built from the Dockerfile and run with podman, as an operator would.

``.ci/podman-setup`` installs podman and builds a local Debian base (no registry is reachable
here); the Dockerfile builds FROM it through ``--build-arg BASE``. Everything is driven
through the podman command line and plain HTTP from the host, as nothing inside the image is
special-cased for tests.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import tabserve
from helpers import free_port

# Building the image and running it several times takes minutes: its own, wider time limit.
pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/tabserve:ci"
UID = 10001  # the Dockerfile's tabserve user


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    setup = subprocess.run(
        [str(ROOT / ".ci" / "podman-setup")], capture_output=True, text=True, timeout=900
    )
    assert setup.returncode == 0, setup.stderr
    base = setup.stdout.strip().splitlines()[-1]
    started = time.monotonic()
    build = subprocess.run(
        [
            "podman", "build", "--format", "docker", "--build-arg", f"BASE={base}",
            "--build-arg", f"VERSION={tabserve.__version__}", "-t", IMAGE, str(ROOT),
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout)
    print(f"image {IMAGE} from {base}: built in {time.monotonic() - started:.0f} s, "
          f"{size / 1e6:.0f} MB")  # fmt: skip
    return IMAGE


class Container:
    """One ``podman run -d`` of the image, published on a free loopback port."""

    def __init__(self, image: str, *options: str, command: tuple[str, ...] = ()) -> None:
        self.name = f"tabserve-test-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        podman(
            "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:9004",
            *options, image, *command,
        )  # fmt: skip

    def wait_ready(self, path: str = "/info", timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + path, timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.2)
            if self.state()["Status"] not in ("running", "created", "configured"):
                break
        raise AssertionError(f"container did not answer:\n{self.logs()}")

    def state(self) -> dict[str, object]:
        out = podman("inspect", self.name, "--format", "{{json .State}}").stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def evaluate(self, script: str, **data: object) -> requests.Response:
        return requests.post(
            self.url + "/evaluate", json={"script": script, "data": data}, timeout=30
        )

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command)

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


Run = Callable[..., Container]


@pytest.fixture
def run(image: str) -> Iterator[Run]:
    started: list[Container] = []

    def start(*options: str, command: tuple[str, ...] = (), ready: bool = True) -> Container:
        container = Container(image, *options, command=command)
        started.append(container)
        if ready:
            container.wait_ready()
        return container

    yield start
    for container in started:
        container.remove()


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"tabserve-test-{uuid.uuid4().hex[:10]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


def test_labels_name_the_version(image: str) -> None:
    labels = json.loads(podman("image", "inspect", image, "--format", "{{json .Labels}}").stdout)
    assert labels["org.opencontainers.image.version"] == tabserve.__version__
    assert labels["org.opencontainers.image.title"] == "tabserve"
    user = podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
    assert user == "tabserve"
    check = podman("image", "inspect", image, "--format", "{{json .Config.Healthcheck}}").stdout
    assert "/health/live" in " ".join(json.loads(check)["Test"])  # kept by --format docker


def test_final_stage_has_no_compiler(run: Run) -> None:
    container = run(command=("sleep", "60"), ready=False)
    found = podman(
        "exec", container.name, "sh", "-c",
        "for c in gcc cc g++ make; do command -v $c; done; "
        "ls /opt/tabserve/bin/pip /wheels 2>/dev/null; true",
    ).stdout  # fmt: skip
    assert found.strip() == ""


def test_runs_with_only_p_and_answers(run: Run) -> None:
    container = run()
    info = requests.get(container.url + "/info", timeout=10).json()
    assert info["server_version"] == tabserve.__version__
    assert info["state_path"] == "/var/lib/tabserve"
    response = container.evaluate("return [a * 2 for a in _arg1]", _arg1=[1, 2, 3])
    assert response.status_code == 200, response.text
    assert response.json() == [2, 4, 6]
    ready = requests.get(container.url + "/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text


def test_server_and_workers_run_as_the_unprivileged_user(run: Run) -> None:
    container = run()
    response = container.evaluate("import os\nreturn [os.getuid(), os.geteuid(), os.getgid()]")
    assert response.status_code == 200, response.text
    assert response.json()[:2] == [UID, UID]
    rows = podman("top", container.name, "user", "huser", "args").stdout.splitlines()[1:]
    processes = [row.split(None, 2) for row in rows if row.strip()]
    assert len(processes) >= 3, rows  # the server and its two workers
    for user, host_user, _ in processes:
        assert user == "tabserve"
        assert host_user == str(UID)  # not root on the host either


def test_healthcheck_passes(run: Run) -> None:
    container = run()
    result = podman("healthcheck", "run", container.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


DEPLOY = """
from tabserve import Client

def double(values):
    '''Double every value.'''
    return [2 * v for v in values]

Client('http://127.0.0.1:9004/').deploy('double', double, 'doubles')
"""


def test_volume_keeps_endpoints_across_a_restart(run: Run, volume: str) -> None:
    # Deployed from inside the container, so the pickle is made by the image's Python.
    first = run("-v", f"{volume}:/var/lib/tabserve")
    first.exec("python", "-c", DEPLOY)
    assert _query(first.url, "double", [1, 2]) == [2, 4]
    podman("stop", "-t", "30", first.name)
    second = run("-v", f"{volume}:/var/lib/tabserve")
    assert _query(second.url, "double", [5]) == [10]
    listed = requests.get(second.url + "/endpoints", timeout=10).json()
    assert listed["double"]["description"] == "doubles"


def _query(url: str, name: str, *args: object) -> object:
    deadline = time.monotonic() + 30
    while True:
        response = requests.post(f"{url}/query/{name}", json={"data": list(args)}, timeout=30)
        status = requests.get(url + "/status", timeout=10).json().get(name, {}).get("status")
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        assert status in ("LoadInProgress", None), response.text
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    return response.json()["response"]


def test_podman_stop_drains_and_exits_zero(run: Run) -> None:
    container = run()
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(container.evaluate, "import time\ntime.sleep(3)\nreturn [1]")
        time.sleep(1)  # the request is running in a worker
        stop = podman("stop", "-t", "30", container.name, timeout=60)
        response = slow.result(timeout=30)
    assert stop.returncode == 0
    assert response.status_code == 200, response.text
    assert response.json() == [1]
    state = container.state()
    assert state["ExitCode"] == 0, container.logs()
    assert "requests in flight" in container.logs()


def test_read_only_root_with_a_tmpfs_state(run: Run) -> None:
    container = run("--read-only", "--tmpfs", "/var/lib/tabserve:rw,size=64m,U")
    response = container.evaluate("return [sum(_arg1)]", _arg1=[1, 2, 3])
    assert response.status_code == 200, response.text
    assert response.json() == [6]
    container.exec("python", "-c", DEPLOY)
    assert _query(container.url, "double", [3]) == [6]
    ready = requests.get(container.url + "/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    written = container.exec("sh", "-c", "touch /opt/x 2>&1 || echo refused").stdout
    assert "refused" in written  # the root file system really is read-only


def _sandbox_check(url: str) -> dict[str, object]:
    checks = requests.get(url + "/health/ready", timeout=10).json()["checks"]
    return next(check for check in checks if check["name"] == "sandbox")


def test_bubblewrap_without_flags_is_reported_unavailable(run: Run) -> None:
    # The container masks parts of /proc; bwrap then cannot mount a /proc of its own. The
    # self-check finds that and tabserve fails closed: not ready, ad-hoc scripts refused.
    container = run("-e", "TABSERVE_SANDBOX=bubblewrap")
    check = _sandbox_check(container.url)
    assert check["ok"] is False
    response = container.evaluate("return 1")
    assert response.status_code == 503, response.text
    sandbox = requests.get(container.url + "/info", timeout=10).json()["sandbox"]
    assert sandbox["self_check"] == "failed"
    assert "Can't mount proc" in " ".join(sandbox["problems"])


def test_bubblewrap_works_with_unmasked_proc(run: Run) -> None:
    # What docs/operations.md tells operators: unmask /proc; no capability, default seccomp.
    container = run("--security-opt", "systempaths=unconfined", "-e", "TABSERVE_SANDBOX=bubblewrap")
    check = _sandbox_check(container.url)
    assert check["ok"] is True, container.logs()
    response = container.evaluate(
        "import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 9004))\n"
        "    return 'connected'\nexcept OSError:\n    return 'no network'"
    )
    assert response.status_code == 200, response.text
    assert response.json() == "no network"
