"""The notebook example in docs/client.md runs, as written, against a real tabserve: sign in
with a key, publish, submit a job, wait, download the CSV. The code is read from the page, so
the page and the test cannot drift apart."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tabserve
from helpers import ServerFactory
from tabserve.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"
MARKER = "<!-- example: notebook -->"


def notebook_example() -> str:
    text = DOC.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"docs/client.md must mark one example with {MARKER}"
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert found, "the marker must be followed by a ```python block"
    return found.group(1)


def test_the_notebook_example_in_docs_runs(
    server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("docs-example")
    location = str(workdir / "state")
    admin = ("admin", "admin-pass-1")
    assert main(["user", "add", "-u", admin[0], "-p", admin[1], "--store", location]) == 0
    served = server_factory(workdir=workdir, TABSERVE_USERS="store", TABPY_STATE_PATH=location)
    with tabserve.Server(served.url) as server, server.auth.sign_in(tabserve.BasicAuth(*admin)):
        _, key = server.keys.create(user="admin")

    # Run as a notebook would: a fresh interpreter, the block as __main__, in its own directory.
    run_in = tmp_path_factory.mktemp("notebook")
    done = subprocess.run(
        [sys.executable, "-c", notebook_example()],
        cwd=run_in,
        env={**os.environ, "TABSERVE_URL": served.url, "TABSERVE_KEY": key},
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.reader(io.StringIO((run_in / "scaled.csv").read_text(encoding="utf-8"))))
    assert rows == [["value"], ["3.0"], ["4"], ["6"]]
    assert "value" in done.stdout  # the example prints the file
