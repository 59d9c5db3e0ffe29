"""``tabserve user add|update|delete``: edit a password file (a safer ``tabpy-user``).

Differences from ``tabpy-user`` that matter to operators:

* a malformed file is refused with its line number and left untouched (``tabpy-user add``
  silently drops every existing user);
* comments, blank lines and untouched entries survive the rewrite, which is atomic;
* passwords are never logged; a generated one (``-p`` omitted) is printed once on stdout
  and never contains ``:``;
* new entries use scrypt unless ``--scheme tabpy`` asks for a file TabPy can still read.

Wiring (in the CLI)::

    sub = subparsers.add_parser("user", help="manage the password file")
    user.add_arguments(sub)
    sub.set_defaults(func=user.run)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tabserve.commands import EXIT_ERROR, EXIT_OK, EXIT_USAGE, run_against_store
from tabserve.store.passwords import (
    SCHEMES,
    add_user,
    delete_user,
    generate_password,
    hash_password,
    parse_permissions,
    update_user,
    validate_username,
)

_PERMISSIONS_HELP = (
    "comma-separated subset of evaluate,query,manage, or 'all' (the default for add; "
    "update keeps the current permissions unless given)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``add``/``update``/``delete`` actions and their options to ``parser``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-u", "--username", required=True, help="user name (case-insensitive)")
    where = common.add_mutually_exclusive_group(required=True)
    where.add_argument("-f", "--pwd-file", metavar="FILE", help="password file (TABPY_PWD_FILE)")
    where.add_argument(
        "--store",
        nargs="?",
        const="",
        metavar="STORE",
        help="edit the users of a store instead (TABSERVE_USERS = store): a postgresql:// URL "
        "or a state directory; without a value, the configured store",
    )
    common.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TabPy-format config file"
    )

    secret = argparse.ArgumentParser(add_help=False)
    given = secret.add_mutually_exclusive_group()
    given.add_argument(
        "-p",
        "--password",
        help="the password (visible in the process list and shell history; prefer "
        "--password-stdin, or omit both to have one generated and printed once)",
    )
    given.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    secret.add_argument("--permissions", metavar="LIST", help=_PERMISSIONS_HELP)
    secret.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="scrypt",
        help="hash scheme for the new password: scrypt (default, stronger) or tabpy "
        "(PBKDF2, readable by TabPy)",
    )

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser(
        "add", parents=[common, secret], help="add a user (creates the file if missing)"
    )
    update = actions.add_parser(
        "update", parents=[common, secret], help="change a user's password or permissions"
    )
    update.add_argument(
        "--keep-password",
        action="store_true",
        help="change only --permissions and keep the current password",
    )
    actions.add_parser("delete", parents=[common], help="remove a user")


class _UsageError(Exception):
    pass


def _permissions(text: str | None) -> frozenset[str] | None:
    if text is None or text.strip().lower() == "all":
        return None
    try:
        return parse_permissions(text.strip())
    except ValueError as exc:
        raise _UsageError(f"--permissions: {exc}") from None


def _password(args: argparse.Namespace) -> tuple[str | None, bool]:
    """Return (password, generated); (None, False) means keep the current one."""
    if getattr(args, "keep_password", False):
        if args.password is not None or args.password_stdin:
            raise _UsageError("--keep-password cannot be combined with a password")
        if args.permissions is None:
            raise _UsageError("--keep-password needs --permissions (nothing else would change)")
        return None, False
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise _UsageError("no password on standard input")
        return password, False
    if args.password is not None:
        return args.password, False
    return generate_password(), True


def _describe(permissions: frozenset[str] | None) -> str:
    if permissions is None:
        return "all"
    return ",".join(sorted(permissions))


def _run(args: argparse.Namespace) -> int:
    if args.store is not None:
        return _run_store(args)
    name = args.username.lower()
    path = args.pwd_file
    if args.action == "delete":
        remaining = delete_user(path, name)
        print(f"Deleted user '{name}' from {path}.")
        if not remaining.entries:
            print(
                f"warning: {path} has no users left; the server will refuse to start with it.",
                file=sys.stderr,
            )
        return EXIT_OK

    password, generated = _password(args)
    if password is not None and ":" in password:
        print(
            "warning: the password contains ':'; TabPy and some Basic-auth clients cannot "
            "use such passwords.",
            file=sys.stderr,
        )
    if args.action == "add":
        permissions = _permissions(args.permissions)
        entry = add_user(path, name, password or "", permissions=permissions, scheme=args.scheme)
        print(f"Added user '{entry.username}' to {path} (permissions: {_describe(permissions)}).")
    else:
        if args.permissions is None:
            entry = update_user(path, name, password, scheme=args.scheme)
        else:
            entry = update_user(
                path, name, password, permissions=_permissions(args.permissions), scheme=args.scheme
            )
        print(
            f"Updated user '{entry.username}' in {path} "
            f"(permissions: {_describe(entry.permissions)})."
        )
    if generated:
        # The only place a password is ever shown: once, on stdout, for the operator to copy.
        print(f"Generated password for '{entry.username}': {password}")
    return EXIT_OK


def _run_store(args: argparse.Namespace) -> int:
    """The same actions against a store's users table (the hashes are the file's)."""
    import tempfile
    from pathlib import Path

    from tabserve.commands.store import configured_store
    from tabserve.store.backends import UserRecord, is_store_url, open_store
    from tabserve.store.state_dir import ensure_state_dir

    try:
        name = validate_username(args.username)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    location = args.store or configured_store(getattr(args, "config", None))
    if not is_store_url(location):
        ensure_state_dir(Path(location))
    with tempfile.TemporaryDirectory(prefix="tabserve-user-") as cache:
        store = open_store(location, cache=Path(cache))
        try:
            store.migrate()
            return _edit_store(args, store, name, UserRecord)
        finally:
            store.close()


def _edit_store(args: argparse.Namespace, store: Any, name: str, record: Any) -> int:
    try:
        if args.action == "delete":
            store.delete_user(name)
            print(f"Deleted user '{name}' from {store.shown}.")
            return EXIT_OK
        password, generated = _password(args)
        if args.action == "add":
            permissions = _permissions(args.permissions)
            if not password:
                raise _UsageError("password is empty")
            store.put_user(
                record(name, hash_password(name, password, args.scheme), permissions), create=True
            )
        else:
            current = store.users().get(name)
            if current is None:
                raise KeyError(f"user {name} does not exist")
            permissions = (
                current.permissions if args.permissions is None else _permissions(args.permissions)
            )
            hashed = current.password_hash if password is None else hash_password(
                name, password, args.scheme
            )  # fmt: skip
            store.put_user(record(name, hashed, permissions), create=False)
    except KeyError as exc:
        print(f"tabserve user: error: {exc.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    verb = "Added" if args.action == "add" else "Updated"
    print(f"{verb} user '{name}' in {store.shown} (permissions: {_describe(permissions)}).")
    if generated:
        print(f"Generated password for '{name}': {password}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed command; return the process exit code."""

    def body() -> int:
        try:
            return _run(args)
        except _UsageError as exc:
            print(f"tabserve user: error: {exc}", file=sys.stderr)
            return EXIT_USAGE

    # The password file and the store fail in the ways every store command does (an
    # unwritable directory leaves the file itself untouched).
    return run_against_store("user", body)
