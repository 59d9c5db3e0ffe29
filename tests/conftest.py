"""Fixtures; what they build (and what tests import) is in helpers.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg import postgres  # noqa: F401  (a session fixture: a real PostgreSQL server)

from helpers import AppFactory, InProcessServer, Server, ServerFactory


@pytest.fixture(scope="session")
def stopping() -> Iterator[list[Server]]:
    """Servers asked to stop (SIGTERM) at the end of their module; waited for at the end of
    the session. Their drain and their workers' exits overlap the next modules' tests instead
    of holding them up; a server that does not stop by then is killed (``wait_stopped``)."""
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.wait_stopped()


@pytest.fixture(scope="module")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory, stopping: list[Server]
) -> Iterator[ServerFactory]:
    """Start servers on demand; they are asked to stop at the end of the test module.

    Per module, not per session: a module's servers serve only its tests, and a hundred
    idle servers (three processes each) kept to the end of the run would cost memory, a
    little CPU each, and a long shutdown all at once at the end.
    """
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
        server.terminate()
    stopping.extend(servers)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A shared server with TabPy's defaults, but a 5 s timeout to keep failures quick."""
    shared = Server(tmp_path_factory.mktemp("tabserve"), {"TABPY_EVALUATE_TIMEOUT": "5"}, {})
    yield shared
    shared.stop()


@pytest.fixture(scope="session")
def app_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppFactory]:
    """Start in-process servers (the real app, jobs run in this process) on demand."""
    apps: list[InProcessServer] = []

    def start(
        auth: tuple[str, str] | None = None, workdir: Path | None = None, **config: str
    ) -> InProcessServer:
        app = InProcessServer(workdir or tmp_path_factory.mktemp("app"), config, auth)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.close()


@pytest.fixture(scope="session")
def app(app_factory: AppFactory) -> InProcessServer:
    """A shared in-process server with TabPy's defaults."""
    return app_factory()


@pytest.fixture(scope="session")
def tabpy_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real TabPy's fixtures (tests/fixtures/README.md), with pickles this Python can load.

    The committed one (tests/fixtures/tabpy_state) was written under the Python minor version
    its meta file names; cloudpickled code objects do not load under another one, for TabPy
    as for tabserve. Under another Python (the CI matrix), the same generator runs the real
    TabPy installed in this environment, so the tests still read what TabPy itself wrote
    (and its recorded exchanges, whose endpoint timestamps come from that same run).
    """
    fixtures = Path(__file__).parent / "fixtures"
    recorded = json.loads((fixtures / "tabpy_fixture_meta.json").read_text())["versions"]
    if recorded["python"].rsplit(".", 1)[0] == "{}.{}".format(*sys.version_info[:2]):
        return fixtures
    out = tmp_path_factory.mktemp("tabpy_fixtures")
    subprocess.run(
        [sys.executable, str(fixtures / "make_tabpy_state.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    return out
