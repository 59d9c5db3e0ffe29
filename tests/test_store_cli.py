"""``tabserve store migrate|import|export`` and ``tabserve user --store``, against the state
directory and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from pg import PostgresServer

from tabserve.cli import main
from tabserve.store.backends import open_store
from tabserve.store.passwords import PasswordEntry, verify

FIXTURE_STATE = Path(__file__).parent / "fixtures" / "tabpy_state"


@pytest.fixture(params=["statedir", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "statedir":
        return str(tmp_path / "state")
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.fresh_database(f"cli_{tmp_path.name[-16:].lower()}")


def _users(location: str, tmp_path: Path) -> dict[str, object]:
    store = open_store(location, cache=tmp_path / "cache")
    try:
        return dict(store.users())
    finally:
        store.close()


def test_users_in_a_store(
    location: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["user", "add", "-u", "Alice", "-p", "pw-1", "--permissions", "query",
                 "--store", location]) == 0  # fmt: skip
    assert "Added user 'alice'" in capsys.readouterr().out
    assert main(["user", "add", "-u", "alice", "-p", "x", "--store", location]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["user", "update", "-u", "alice", "-p", "pw-2", "--store", location]) == 0
    record = _users(location, tmp_path)["alice"]
    assert record.permissions == frozenset({"query"})  # type: ignore[attr-defined]
    entry = PasswordEntry("alice", record.password_hash)  # type: ignore[attr-defined]
    assert verify(entry, "pw-2") and not verify(entry, "pw-1")
    assert main(["user", "delete", "-u", "alice", "--store", location]) == 0
    assert _users(location, tmp_path) == {}
    assert main(["user", "delete", "-u", "alice", "--store", location]) == 1


def test_a_generated_password_is_printed_once(
    location: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["user", "add", "-u", "gen", "--store", location]) == 0
    out = capsys.readouterr().out
    password = out.rsplit(": ", 1)[1].strip()
    record = _users(location, tmp_path)["gen"]
    assert verify(PasswordEntry("gen", record.password_hash), password)  # type: ignore[attr-defined]


def test_migrate_import_export(
    location: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["store", "migrate", "--store", location]) == 0
    assert "migrations applied: 1, 2" in capsys.readouterr().out
    assert main(["store", "migrate", "--store", location]) == 0
    assert "none needed" in capsys.readouterr().out
    assert main(["store", "import", "--from", str(FIXTURE_STATE), "--to", location]) == 0
    assert "Copied 2 endpoints, 3 archive versions" in capsys.readouterr().out
    assert main(["store", "export", "--from", location, "--to", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "query_objects" / "scale" / "2" / "pickle_archive").is_file()
    assert main(["store", "import", "--from", str(FIXTURE_STATE), "--to", location]) == 1
    assert "already has endpoints add, scale" in capsys.readouterr().err


def test_a_bad_store_url_is_refused_without_showing_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TABSERVE_STORE", "mysql://u:hunter2@h/db")
    assert main(["store", "migrate"]) == 2
    err = capsys.readouterr().err
    assert "TABSERVE_STORE" in err and "hunter2" not in err


def test_an_unreachable_store_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from helpers import free_port

    url = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db"
    assert main(["store", "migrate", "--store", url]) == 1
    err = capsys.readouterr().err
    assert "unavailable" in err and "hunter2" not in err and len(err.splitlines()) == 1


def test_a_server_whose_store_is_unreachable_does_not_start(tmp_path: Path) -> None:
    """One line naming the store (without its password), exit 1: nothing to serve."""
    import os
    import subprocess
    import sys

    from helpers import free_port

    url = f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db"
    result = subprocess.run(
        [sys.executable, "-m", "tabserve"],
        env={**os.environ, "TABSERVE_STORE": url, "TABPY_PORT": "0",
             "TABPY_STATE_PATH": str(tmp_path / "cache"), "TABSERVE_WORKERS": "1",
             "TABSERVE_WORKER_USER": "root"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tabserve: cannot start: The store is unavailable")
    assert "127.0.0.1" in last and "hunter2" not in result.stderr
