"""The release artefacts: an sdist and a wheel that `twine check` accepts, a wheel that
installs into a fresh virtual environment and serves, and a changelog for this version."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

import tabserve

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy, so that no build/ or *.egg-info appears in the working tree.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "tabserve"):
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return out


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    version = tabserve.__version__
    wheel = dist / f"tabserve-{version}-py3-none-any.whl"
    sdist = dist / f"tabserve-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    names = zipfile.ZipFile(wheel).namelist()
    # The data files the server needs at run time travel in the wheel.
    assert "tabserve/server/static/index.html" in names
    assert "tabserve/store/data/state.ini" in names
    assert not [n for n in names if n.startswith("tests/")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_wheel_installs_into_a_fresh_venv_and_serves(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    wheel = dist / f"tabserve-{tabserve.__version__}-py3-none-any.whl"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    version = subprocess.run(
        [str(venv / "bin" / "tabserve"), "--version"],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path,
    )  # fmt: skip
    assert version.stdout.strip() == f"tabserve {tabserve.__version__}"

    port = free_port()
    env = {
        **os.environ,
        "TABPY_PORT": str(port),
        "TABPY_STATE_PATH": str(tmp_path / "state"),
        "TABSERVE_WORKERS": "1",
        "TABSERVE_WORKER_USER": "root",  # as conftest: pyenv's Python lives in /root
    }
    # Run from tmp_path with the repository nowhere on sys.path: the installed copy answers.
    server = subprocess.Popen(
        [str(venv / "bin" / "tabserve")], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/info", timeout=2) as answer:
                    info = json.load(answer)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert info["server_version"] == tabserve.__version__
        request = urllib.request.Request(
            url + "/evaluate",
            data=json.dumps(
                {"script": "return _arg1 + _arg2", "data": {"_arg1": 1, "_arg2": 2}}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer) == 3
        where = subprocess.run(
            [str(python), "-c", "import tabserve; print(tabserve.__file__)"],
            capture_output=True, text=True, cwd=tmp_path, check=True,
        ).stdout  # fmt: skip
        assert str(venv) in where
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0


def test_the_changelog_has_this_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", text, flags=re.MULTILINE)
    assert versions[0] == tabserve.__version__  # newest first
    assert "0.1.0" in versions
