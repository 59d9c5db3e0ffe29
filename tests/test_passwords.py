from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from helpers import USER1_HASH, write
from tabserve.store import passwords
from tabserve.store.passwords import (
    ALL_PERMISSIONS,
    PasswordEntry,
    PasswordFileError,
    add_user,
    delete_user,
    generate_password,
    hash_password,
    parse_password_text,
    read_password_file,
    update_user,
    verify,
)

# --- TabPy format ---------------------------------------------------------------------------


def test_hard_coded_hash_matches_hashlib() -> None:
    computed = hashlib.pbkdf2_hmac("sha512", b"P@ssw0rd", b"_$salt@tabpy:user1$_", 10000).hex()
    assert computed == USER1_HASH
    assert hash_password("user1", "P@ssw0rd", scheme="tabpy") == USER1_HASH
    # The salt uses the lower-cased name, so the spelling of the name does not matter.
    assert hash_password("USER1", "P@ssw0rd", scheme="tabpy") == USER1_HASH


def test_parse_tabpy_example_and_verify() -> None:
    parsed = parse_password_text(f"user1 {USER1_HASH}\n")
    entry = parsed.get("user1")
    assert entry is not None
    assert entry.scheme == "tabpy"
    assert entry.permissions is None
    assert entry.effective_permissions == ALL_PERMISSIONS
    assert verify(entry, "P@ssw0rd")
    assert not verify(entry, "p@ssw0rd")
    assert not verify(entry, "")


def test_upper_case_hex_is_accepted() -> None:
    entry = parse_password_text(f"user1 {USER1_HASH.upper()}").get("user1")
    assert entry is not None and verify(entry, "P@ssw0rd")


def test_comments_blank_lines_and_crlf() -> None:
    text = f"# users\r\n\r\n   \r\nuser1 {USER1_HASH}\r\n  # indented comment\r\n"
    parsed = parse_password_text(text)
    assert list(parsed.users) == ["user1"]
    assert len(parsed) == 1
    assert parsed.render() == f"# users\n\n   \nuser1 {USER1_HASH}\n  # indented comment\n"


def test_bom_is_ignored() -> None:
    assert "user1" in parse_password_text(f"\ufeffuser1 {USER1_HASH}\n")


def test_user_names_are_case_insensitive() -> None:
    parsed = parse_password_text(f"UseR1 {USER1_HASH}\n")
    assert list(parsed.users) == ["user1"]
    assert "USER1" in parsed
    entry = parsed.get("User1")
    assert entry is not None and verify(entry, "P@ssw0rd")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("user1\n", 1, "found 1 fields"),
        (f"# c\nuser1 {USER1_HASH} query extra\n", 2, "found 4 fields"),
        (f"\n\nuser1  {USER1_HASH}\n", 3, "empty hash"),
        (f"user1 {USER1_HASH} \n", 1, "empty permission list"),
        (f"user1\t{USER1_HASH}\n", 1, "tab"),
        ("user1 abc\n", 1, "neither 128 hex digits"),
        (f"user1 {USER1_HASH} evaluate,delete\n", 1, "unknown permission 'delete'"),
        (f"user1 {USER1_HASH} evaluate,\n", 1, "empty item"),
        (f"user1 {USER1_HASH}\n#\nUSER1 {USER1_HASH}\n", 3, "duplicate user 'user1'"),
        ("bob $scrypt$n=3,r=8,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA\n", 1, "power of two"),
        ("bob $scrypt$nope\n", 1, "$scrypt$n=N"),
        ("bob $scrypt$n=16384,r=8,p=1$!!!$AAAA\n", 1, "base64"),
    ],
)
def test_malformed_lines_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(PasswordFileError) as info:
        parse_password_text(text, source="pw.txt")
    assert info.value.line == line
    assert info.value.source == "pw.txt"
    assert words in info.value.reason
    assert str(info.value).startswith(f"pw.txt: line {line}: ")


def test_read_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(PasswordFileError, match="cannot read"):
        read_password_file(missing)
    empty = write(tmp_path / "empty.txt", "# only a comment\n\n")
    with pytest.raises(PasswordFileError, match="contains no users"):
        read_password_file(empty)
    assert len(read_password_file(empty, allow_empty=True)) == 0
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(f"user1 {USER1_HASH}\nj\xf6rg {USER1_HASH}\n".encode("latin-1"))
    with pytest.raises(PasswordFileError) as info:
        read_password_file(bad)
    assert info.value.line == 2
    assert os.fspath(bad) in str(info.value)


def test_read_file_error_message_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "pw.txt", f"# header\nuser1 {USER1_HASH}\nbroken\n")
    with pytest.raises(PasswordFileError) as info:
        read_password_file(path)
    assert str(info.value).startswith(f"{path}: line 3: ")


# --- scrypt and permissions -----------------------------------------------------------------


def test_scrypt_round_trip() -> None:
    token = hash_password("Alice", "s3cret")
    assert token.startswith("$scrypt$n=16384,r=8,p=1$")
    assert " " not in token and ":" not in token
    entry = parse_password_text(f"alice {token}\n").get("alice")
    assert entry is not None
    assert entry.scheme == "scrypt"
    assert verify(entry, "s3cret")
    assert not verify(entry, "s3cret ")
    # A random salt: the same password never hashes to the same token twice.
    assert hash_password("alice", "s3cret") != token


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown hash scheme"):
        hash_password("a", "b", scheme="md5")


def test_permissions_field() -> None:
    parsed = parse_password_text(
        f"alice {USER1_HASH} query,EVALUATE\nbob {USER1_HASH}\ncarol {USER1_HASH} manage\n"
    )
    alice, bob, carol = (parsed.users[name] for name in ("alice", "bob", "carol"))
    assert alice.effective_permissions == {"evaluate", "query"}
    assert bob.permissions is None and bob.effective_permissions == ALL_PERMISSIONS
    assert carol.effective_permissions == {"manage"}


def test_entry_render_orders_permissions() -> None:
    entry = PasswordEntry("bob", USER1_HASH, frozenset({"manage", "evaluate"}))
    assert entry.render() == f"bob {USER1_HASH} evaluate,manage"
    assert PasswordEntry("bob", USER1_HASH).render() == f"bob {USER1_HASH}"


# --- editing --------------------------------------------------------------------------------


def test_add_creates_missing_file_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "pw.txt"
    entry = add_user(path, "Alice", "pw-1", permissions=["evaluate"])
    assert entry.username == "alice"
    parsed = read_password_file(path)
    stored = parsed.get("alice")
    assert stored is not None and verify(stored, "pw-1")
    assert stored.permissions == {"evaluate"}
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["pw.txt"]  # no temp file left behind


def test_add_tabpy_scheme_is_tabpy_readable(tmp_path: Path) -> None:
    path = tmp_path / "pw.txt"
    add_user(path, "user1", "P@ssw0rd", scheme="tabpy")
    assert path.read_text() == f"user1 {USER1_HASH}\n"


def test_edits_keep_comments_untouched_lines_and_mode(tmp_path: Path) -> None:
    original = f"# team A\nUser1 {USER1_HASH.upper()}\n\n# team B\nbob {USER1_HASH} query\n"
    path = write(tmp_path / "pw.txt", original)
    path.chmod(0o640)
    add_user(path, "carol", "pw")
    update_user(path, "BOB", "new-pw")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[:4] == ["# team A", f"User1 {USER1_HASH.upper()}", "", "# team B"]
    assert lines[4].startswith("bob $scrypt$") and lines[4].endswith(" query")
    assert lines[5].startswith("carol $scrypt$") and len(lines[5].split(" ")) == 2
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    bob = read_password_file(path).get("bob")
    assert bob is not None and verify(bob, "new-pw") and not verify(bob, "P@ssw0rd")
    delete_user(path, "carol")
    assert "carol" not in read_password_file(path)


def test_update_permissions_only_keeps_hash(tmp_path: Path) -> None:
    path = write(tmp_path / "pw.txt", f"user1 {USER1_HASH} query\n")
    update_user(path, "user1", None, permissions=["evaluate", "manage"])
    assert path.read_text() == f"user1 {USER1_HASH} evaluate,manage\n"
    update_user(path, "user1", None, permissions=None)  # back to "all", TabPy-readable
    assert path.read_text() == f"user1 {USER1_HASH}\n"


def test_edit_errors_are_clear(tmp_path: Path) -> None:
    path = write(tmp_path / "pw.txt", f"user1 {USER1_HASH}\n")
    with pytest.raises(PasswordFileError, match="'user1' already exists"):
        add_user(path, "USER1", "x")
    with pytest.raises(PasswordFileError, match="'bob' does not exist"):
        update_user(path, "bob", "x")
    with pytest.raises(PasswordFileError, match="'bob' does not exist"):
        delete_user(path, "bob")
    with pytest.raises(PasswordFileError, match="cannot read"):
        update_user(tmp_path / "missing.txt", "bob", "x")
    with pytest.raises(PasswordFileError, match="':'"):
        add_user(path, "a:b", "x")
    with pytest.raises(PasswordFileError, match="comment"):
        add_user(path, "#root", "x")
    with pytest.raises(PasswordFileError, match="password is empty"):
        add_user(path, "bob", "")
    with pytest.raises(PasswordFileError, match="unknown permission"):
        add_user(path, "bob", "x", permissions=["root"])
    assert path.read_text() == f"user1 {USER1_HASH}\n"


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: add_user(p, "new", "pw"),
        lambda p: update_user(p, "user1", "pw"),
        lambda p: delete_user(p, "user1"),
    ],
)
def test_malformed_file_is_never_rewritten(tmp_path: Path, edit: object) -> None:
    original = f"user1 {USER1_HASH}\r\n# note\nbob\n".encode()
    path = tmp_path / "pw.txt"
    path.write_bytes(original)
    with pytest.raises(PasswordFileError) as info:
        edit(path)  # type: ignore[operator]
    assert info.value.line == 3
    assert path.read_bytes() == original


def test_failed_write_leaves_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path / "pw.txt", f"user1 {USER1_HASH}\n")
    before = path.read_bytes()

    def boom(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(passwords.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        add_user(path, "bob", "pw")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pw.txt"]


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_edit_through_symlink_keeps_link(tmp_path: Path) -> None:
    real = write(tmp_path / "real.txt", f"user1 {USER1_HASH}\n")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    add_user(link, "bob", "pw")
    assert link.is_symlink()
    assert "bob" in read_password_file(real)


def test_generate_password() -> None:
    seen = {generate_password() for _ in range(200)}
    assert len(seen) == 200
    for password in seen:
        assert len(password) >= 16
        assert ":" not in password
        assert password.isprintable() and " " not in password
    assert len(generate_password(40)) == 40
    with pytest.raises(ValueError):
        generate_password(8)
