"""Sanity checks on the TabPy ground-truth fixtures, so a bad regeneration is caught."""

from __future__ import annotations

import configparser
import hashlib
import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"

REQUIRED_EXCHANGES = {
    "info": 200,
    "status": 200,
    "endpoints": 200,
    "endpoint_add": 200,
    "endpoint_unknown": 404,
    "query_add_kwargs": 200,
    "query_add_args": 200,
    "query_unknown": 404,
    "query_add_raises": 500,
    "evaluate_sum": 200,
    "evaluate_zip_sum": 200,
    "evaluate_no_script": 400,
    "evaluate_bad_arg_names": 400,
    "evaluate_syntax_error": 500,
    "evaluate_nan": 200,
    "evaluate_return_none": 200,
    "evaluate_timeout": 408,
    "evaluate_too_large_json": 413,
    "evaluate_too_large_form": 413,
    "evaluate_tabpy_query_add": 200,
    "evaluate_tabpy_query_unknown": 404,
    "unknown_path": 404,
    "info_post_not_allowed": 405,
}


def _exchanges() -> dict[str, dict]:
    records = json.loads((FIXTURES / "tabpy_responses.json").read_text())
    assert isinstance(records, list)
    return {r["name"]: r for r in records}


def test_recorded_exchanges_cover_the_brief() -> None:
    by_name = _exchanges()
    for name, status in REQUIRED_EXCHANGES.items():
        assert by_name[name]["status"] == status, name
    assert by_name["evaluate_sum"]["response_body"] == "3"
    assert by_name["evaluate_nan"]["response_body"] == "[1.0, null, 2.0, null]"
    assert json.loads(by_name["query_add_args"]["response_body"])["response"] == [4, 6]


def test_state_ini_lists_both_endpoints_with_versions() -> None:
    state = configparser.ConfigParser(interpolation=None)
    state.optionxform = str  # type: ignore[assignment,method-assign]
    state.read(FIXTURES / "tabpy_state" / "state.ini")
    versions = state["Query Objects Service Versions"]
    assert json.loads(versions["add"])["version"] == 1
    assert json.loads(versions["scale"])["version"] == 2
    for name, version in (("add", 1), ("scale", 1), ("scale", 2)):
        for tree in ("query_objects", "staging/endpoints"):
            path = FIXTURES / "tabpy_state" / tree / name / str(version) / "pickle_archive"
            assert path.stat().st_size > 0, path


def test_password_file_hashes_follow_the_documented_scheme() -> None:
    # tabpy-behaviour.md 6.2: PBKDF2-HMAC-SHA512, 10000 rounds, salt from the user name.
    passwords = {"user1": "P@ssw0rd", "user2": "S3cret!pass"}
    entries = {}
    for line in (FIXTURES / "tabpy_passwords.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        user, digest = line.split(" ")
        entries[user] = digest
    assert set(entries) == set(passwords)
    for user, password in passwords.items():
        salt = f"_$salt@tabpy:{user}$_".encode()
        expected = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 10000).hex()
        assert entries[user] == expected
