"""``tabserve key create|list|revoke``: API keys in the store.

* ``create --user NAME``: a key that acts as that user (a user of the store, or of the
  configured password file), with that user's permissions as they are when it is used.
* ``create --endpoint NAME``: a key that may only call ``/query/NAME``.
* ``list``: every key, revoked ones too; never a secret.
* ``revoke ID``: refused by every running server within a second.

The key is printed once, alone on standard output (``KEY=$(tabserve key create ...)``), and
what it is on standard error; the store keeps only its hash. Keys need authentication on in
the server: without it they are refused with 406, like Basic credentials.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tabserve.config import ConfigError, load_settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="STORE",
        help="a postgresql:// URL or a state directory; by default the configured store",
    )
    common.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TabPy-format config file"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create", parents=[common], help="create a key and print it (shown this once)"
    )
    whose = create.add_mutually_exclusive_group(required=True)
    whose.add_argument("--user", metavar="NAME", help="a key acting as this user")
    whose.add_argument("--endpoint", metavar="NAME", help="a key for /query/NAME only")
    actions.add_parser("list", parents=[common], help="list the keys (never their secrets)")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("id", metavar="ID", help="the key's id (as `key list` shows it)")


class _Refused(Exception):
    pass


def _run(args: argparse.Namespace) -> int:
    from tabserve.store.backends import is_store_url, open_store
    from tabserve.store.state_dir import ensure_state_dir

    config = getattr(args, "config", None)
    settings = load_settings(config, os.environ)
    location = args.store or settings.store or str(settings.state_path)
    if not is_store_url(location):
        ensure_state_dir(Path(location))
    with tempfile.TemporaryDirectory(prefix="tabserve-key-") as cache:
        store = open_store(location, cache=Path(cache))
        try:
            store.migrate()
            if args.action == "create":
                return _create(args, store, settings.password_file)
            if args.action == "list":
                return _list(store)
            return _revoke(args, store)
        finally:
            store.close()


def _create(args: argparse.Namespace, store: Any, password_file: Path | None) -> int:
    from tabserve.store.api_keys import key_hash, new_key
    from tabserve.store.backends import ApiKeyRecord
    from tabserve.store.passwords import normalize_username, read_password_file

    if args.user is not None:
        name = normalize_username(args.user)
        known = set(store.users())
        if password_file is not None and password_file.is_file():
            known |= set(read_password_file(password_file).users)
        if name not in known:
            raise _Refused(
                f"no user {name!r} in {store.shown}"
                + (f" or {password_file}" if password_file is not None else "")
            )
        user, endpoint, what = name, None, f"user key for {name!r}"
    else:
        if args.endpoint not in store.snapshot().endpoints:
            raise _Refused(f"no endpoint {args.endpoint!r} is deployed in {store.shown}")
        user, endpoint, what = "", args.endpoint, f"endpoint key for {args.endpoint!r}"
    ident, key = new_key()
    store.add_api_key(ApiKeyRecord(ident, key_hash(key), user, endpoint, time.time()))
    print(f"Created API key {ident}: {what}. It is shown this once:", file=sys.stderr)
    print(key)
    return EXIT_OK


def _list(store: Any) -> int:
    rows = [("ID", "KIND", "FOR", "CREATED", "LAST USED", "STATE")]
    now = time.time()
    for key in store.api_keys():
        state = "revoked" if key.revoked else ("active" if key.usable(now) else "expired")
        rows.append(
            (
                key.id,
                key.kind,
                key.user_name if key.endpoint is None else key.endpoint,
                _when(key.created),
                _when(key.last_used),
                state,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return EXIT_OK


def _revoke(args: argparse.Namespace, store: Any) -> int:
    from tabserve.store.api_keys import is_key_id

    if not is_key_id(args.id):
        raise _Refused(f"no API key has the id {args.id!r} (ids are 16 hex digits)")
    try:
        key = store.revoke_api_key(args.id, time.time())
    except KeyError:
        raise _Refused(f"no API key has the id {args.id!r}") from None
    print(f"Revoked API key {key.id} (at {_when(key.revoked)}).")
    return EXIT_OK


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def run(args: argparse.Namespace) -> int:
    from tabserve.store.backends import StoreError, StoreUnavailable
    from tabserve.store.passwords import PasswordFileError

    try:
        return _run(args)
    except ConfigError as exc:
        print(f"tabserve key: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _Refused as exc:
        print(f"tabserve key: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except StoreUnavailable as exc:
        print(f"tabserve key: error: {exc.message}: {exc.info}", file=sys.stderr)
        return EXIT_ERROR
    except (StoreError, PasswordFileError) as exc:
        print(f"tabserve key: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"tabserve key: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
