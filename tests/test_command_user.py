from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from tabserve.commands import user
from tabserve.store.passwords import read_password_file, verify

USER1_HASH = (
    "b8a63cf588cd2399da615042de4732f5b121c4d1042acfb91598a56d2dd3e1d7"
    "b9f785213262eddbbd00c7a8c9c3e89d7cb98f31d405cc644b1aeba92c3de40b"
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tabserve user")
    user.add_arguments(parser)
    return parser


def run(*argv: str) -> int:
    return user.run(make_parser().parse_args(list(argv)))


def check(path: Path, name: str, password: str) -> bool:
    entry = read_password_file(path).get(name)
    return entry is not None and verify(entry, password)


def test_add_with_password_never_prints_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    assert run("add", "-u", "Alice", "-p", "Secret-42", "-f", str(path)) == 0
    out, err = capsys.readouterr()
    assert "Secret-42" not in out + err
    assert "Added user 'alice'" in out
    assert err == ""
    assert check(path, "alice", "Secret-42")
    assert read_password_file(path).get("alice").scheme == "scrypt"  # type: ignore[union-attr]


def test_add_generates_and_prints_password_once(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    assert run("add", "-u", "bob", "-f", str(path), "--permissions", "query") == 0
    out, _ = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("Generated password")]
    assert len(lines) == 1
    password = lines[0].rsplit(": ", 1)[1]
    assert len(password) >= 16 and ":" not in password
    assert out.count(password) == 1
    assert check(path, "bob", password)
    assert read_password_file(path).get("bob").permissions == {"query"}  # type: ignore[union-attr]


def test_add_tabpy_scheme(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    assert run("add", "-u", "user1", "-p", "P@ssw0rd", "--scheme", "tabpy", "-f", str(path)) == 0
    assert path.read_text() == f"user1 {USER1_HASH}\n"


def test_password_from_stdin(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "pw.txt"
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\r\nignored\n"))
    assert run("add", "-u", "carol", "--password-stdin", "-f", str(path)) == 0
    out, err = capsys.readouterr()
    assert "from-stdin" not in out + err
    assert check(path, "carol", "from-stdin")


def test_update_password_and_permissions(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    path.write_text(f"# keep me\nuser1 {USER1_HASH} query\n")
    assert run("update", "-u", "USER1", "-p", "new-one", "-f", str(path)) == 0
    assert check(path, "user1", "new-one")
    assert read_password_file(path).get("user1").permissions == {"query"}  # type: ignore[union-attr]
    assert path.read_text().startswith("# keep me\n")
    assert run("update", "-u", "user1", "--keep-password", "-f", str(path)) == 2
    assert "needs --permissions" in capsys.readouterr().err
    assert (
        run("update", "-u", "user1", "--keep-password", "--permissions", "all", "-f", str(path))
        == 0
    )
    assert read_password_file(path).get("user1").permissions is None  # type: ignore[union-attr]
    assert check(path, "user1", "new-one")


def test_update_without_password_generates_one(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    path.write_text(f"user1 {USER1_HASH}\n")
    assert run("update", "-u", "user1", "-f", str(path)) == 0
    out, _ = capsys.readouterr()
    password = out.strip().splitlines()[-1].rsplit(": ", 1)[1]
    assert check(path, "user1", password)


def test_delete(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    path.write_text(f"user1 {USER1_HASH}\nbob {USER1_HASH}\n")
    assert run("delete", "-u", "Bob", "-f", str(path)) == 0
    assert path.read_text() == f"user1 {USER1_HASH}\n"
    assert run("delete", "-u", "user1", "-f", str(path)) == 0
    _, err = capsys.readouterr()
    assert "no users left" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["add", "-u", "user1", "-p", "x"], "'user1' already exists"),
        (["update", "-u", "nobody", "-p", "x"], "'nobody' does not exist"),
        (["delete", "-u", "nobody"], "'nobody' does not exist"),
        (["add", "-u", "a:b", "-p", "x"], "must not contain ':'"),
    ],
)
def test_errors_are_one_line_exit_1(tmp_path: Path, capsys, argv: list[str], words: str) -> None:
    path = tmp_path / "pw.txt"
    path.write_text(f"user1 {USER1_HASH}\n")
    assert run(*argv, "-f", str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and words in err
    assert path.read_text() == f"user1 {USER1_HASH}\n"


def test_malformed_file_refused_with_line_number(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    original = f"user1 {USER1_HASH}\n\nbroken line here too\n".encode()
    path.write_bytes(original)
    for argv in (
        ["add", "-u", "new", "-p", "pw"],
        ["update", "-u", "user1"],
        ["delete", "-u", "user1"],
    ):
        assert run(*argv, "-f", str(path)) == 1
        out, err = capsys.readouterr()
        assert "line 3" in err and err.count("\n") == 1
        assert "Generated" not in out
    assert path.read_bytes() == original


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    path = str(tmp_path / "pw.txt")
    assert run("add", "-u", "a", "-p", "x", "--permissions", "evaluate,root", "-f", path) == 2
    assert "unknown permission 'root'" in capsys.readouterr().err
    assert not Path(path).exists()
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["add", "-u", "a"])  # no -f
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        make_parser().parse_args(["add", "-u", "a", "-f", path, "-p", "x", "--password-stdin"])
    with pytest.raises(SystemExit):
        make_parser().parse_args(["delete", "-u", "a", "-f", path, "-p", "x"])
    with pytest.raises(SystemExit):
        make_parser().parse_args(["add", "-u", "a", "-f", path, "--scheme", "md5"])


def test_colon_password_warns_without_echo(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pw.txt"
    assert run("add", "-u", "a", "-p", "pa:ss", "-f", str(path)) == 0
    out, err = capsys.readouterr()
    assert "contains ':'" in err
    assert "pa:ss" not in out + err


def test_unwritable_directory_is_one_line(tmp_path: Path, capsys) -> None:
    target = tmp_path / "missing-dir" / "pw.txt"
    assert run("add", "-u", "a", "-p", "x", "-f", str(target)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tabserve user: error:")
