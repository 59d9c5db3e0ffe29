"""Moving in and backing up: the TabPy fixture state directory into PostgreSQL and back out
to a state directory, with nothing changed in the source."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from pg import PostgresServer

from tabserve.store.backends import StoreError, open_store
from tabserve.store.transfer import copy_store, read_contents

FIXTURES = Path(__file__).parent / "fixtures"


def _fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_tabpy_state_round_trips_through_postgresql(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    source = tmp_path / "tabpy_state"
    shutil.copytree(FIXTURES / "tabpy_state", source)
    before = _fingerprint(source)
    url = postgres.fresh_database("transfer")

    copied = copy_store(str(source), url, tmp_path / "c1", FIXTURES / "tabpy_passwords.txt")
    assert set(copied.endpoints) == {"add", "scale"}
    assert _fingerprint(source) == before  # nothing written to the source, not even a db

    in_pg = read_contents(url, tmp_path / "c2")
    assert in_pg.endpoints == copied.endpoints
    assert in_pg.archives == copied.archives
    assert ("scale", 1) in in_pg.archives and ("scale", 2) in in_pg.archives
    assert set(in_pg.users) == {"user1", "user2"}
    assert in_pg.service["Name"] == "TabPy Server"

    exported = tmp_path / "backup"
    copy_store(url, str(exported), tmp_path / "c3")
    back = read_contents(str(exported), tmp_path / "c4")
    assert back.endpoints == copied.endpoints
    assert back.archives == copied.archives
    assert back.users == in_pg.users
    # The export is a state directory TabPy's layout: the same archive files as the source.
    for name in ("add/1", "scale/1", "scale/2"):
        path = f"query_objects/{name}/pickle_archive"
        assert _fingerprint(exported)[path] == before[path]

    # A second import into the same store refuses, and changes nothing.
    with pytest.raises(StoreError, match="already has endpoints add, scale"):
        copy_store(str(source), url, tmp_path / "c5")
    assert read_contents(url, tmp_path / "c6").endpoints == copied.endpoints


def test_a_state_directory_without_an_archive_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "broken"
    shutil.copytree(FIXTURES / "tabpy_state", source)
    shutil.rmtree(source / "query_objects" / "scale" / "2")
    with pytest.raises(StoreError, match="scale version 2 has no archive"):
        copy_store(str(source), str(tmp_path / "dest"), tmp_path / "c")
    assert not (tmp_path / "dest").exists()


def test_export_of_a_state_directory_store_keeps_its_users(tmp_path: Path) -> None:
    from tabserve.store.backends import UserRecord

    source = tmp_path / "src"
    copy_store(str(FIXTURES / "tabpy_state"), str(source), tmp_path / "c1")
    store = open_store(source)
    store.put_user(UserRecord("carol", "scrypt$x", frozenset({"query"})), create=True)
    store.close()
    copy_store(str(source), str(tmp_path / "dest"), tmp_path / "c2")
    assert read_contents(str(tmp_path / "dest"), tmp_path / "c3").users == {
        "carol": UserRecord("carol", "scrypt$x", frozenset({"query"}))
    }


def test_api_keys_move_with_a_copy_as_their_hashes(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """A state directory's keys into PostgreSQL and back out: the same rows, revoked ones
    revoked, so a key created before a move still works after it."""
    from tabserve.store.api_keys import key_hash, new_key
    from tabserve.store.backends import ApiKeyRecord

    source = tmp_path / "src"
    copy_store(str(FIXTURES / "tabpy_state"), str(source), tmp_path / "c1")
    store = open_store(source)
    ident, key = new_key()
    kept = [
        ApiKeyRecord(ident, key_hash(key), "carol", None, 1000.0, last_used=1001.0),
        ApiKeyRecord("00000000000000ff", "0" * 64, "", "scale", 1002.0, revoked=1003.0),
    ]
    for record in kept:
        store.add_api_key(record)
    store.close()
    url = postgres.fresh_database("keys_transfer")
    assert copy_store(str(source), url, tmp_path / "c2").keys == kept
    database = open_store(url, cache=tmp_path / "c3")
    try:
        assert database.api_keys() == kept
        assert database.api_key(ident) == kept[0]
    finally:
        database.close()
    copy_store(url, str(tmp_path / "back"), tmp_path / "c4")
    assert read_contents(str(tmp_path / "back"), tmp_path / "c5").keys == kept
    # Copying them in again would make two rows of one key: refused, nothing written.
    with pytest.raises(StoreError, match="API keys"):
        copy_store(str(source), str(tmp_path / "back"), tmp_path / "c6")
