"""``tabserve store migrate|import|export``: set up a store, move into it, back it up.

* ``migrate``: apply the schema migrations the store lacks (replicas also do this at start
  unless ``TABSERVE_STORE_MIGRATE = false``).
* ``import --from SOURCE [--to STORE] [--passwords FILE]``: copy a TabPy or tabserve state
  directory (or another store) into a store; the source is never written.
* ``export [--from STORE] --to DIRECTORY``: copy a store into a state directory in TabPy's
  layout, for backups or to go back.

A store is a ``postgresql://`` URL or a state directory; where one is left out, the
configured store (``TABSERVE_STORE``, or the state directory ``TABPY_STATE_PATH``) is used.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tabserve.commands import EXIT_OK, run_against_store
from tabserve.config import load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TabPy-format config file"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    migrate = actions.add_parser("migrate", help="bring the store's schema up to date")
    migrate.add_argument("--store", metavar="STORE", help="store URL or state directory")
    imports = actions.add_parser(
        "import", help="copy a state directory (TabPy's or tabserve's) or a store into a store"
    )
    imports.add_argument("--from", dest="source", metavar="SOURCE", required=True)
    imports.add_argument("--to", dest="destination", metavar="STORE")
    imports.add_argument(
        "--passwords", metavar="FILE", type=Path, help="also import the users of this password file"
    )
    exports = actions.add_parser("export", help="copy a store into a state directory")
    exports.add_argument("--from", dest="source", metavar="STORE")
    exports.add_argument("--to", dest="destination", metavar="DIRECTORY", required=True)


def configured_store(config: str | None) -> str:
    """The store the server would use with this configuration."""
    settings = load_settings(config, os.environ)
    return settings.store or str(settings.state_path)


def _run(args: argparse.Namespace) -> int:
    from tabserve.store.backends import is_store_url, open_store
    from tabserve.store.state_dir import ensure_state_dir
    from tabserve.store.transfer import copy_store

    config = getattr(args, "config", None)
    with tempfile.TemporaryDirectory(prefix="tabserve-store-") as scratch:
        cache = Path(scratch)
        if args.action == "migrate":
            location = args.store or configured_store(config)
            if not is_store_url(location):
                ensure_state_dir(Path(location))
            store = open_store(location, cache=cache)
            try:
                applied = store.migrate()
            finally:
                store.close()
            done = ", ".join(map(str, applied)) if applied else "none needed"
            print(f"{store.shown}: migrations applied: {done}")
            return EXIT_OK
        source = args.source or configured_store(config)
        destination = args.destination or configured_store(config)
        passwords = getattr(args, "passwords", None)
        contents = copy_store(source, destination, cache, passwords)
        print(f"Copied {contents.summary()} from {source} to {_shown(destination)}.")
    return EXIT_OK


def _shown(location: str) -> str:
    from tabserve.store.backends import redact

    return redact(location)


def run(args: argparse.Namespace) -> int:
    return run_against_store("store", lambda: _run(args))
