"""Subcommands of the ``tabserve`` command line, one module each."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def run_against_store(
    command: str, body: Callable[[], int], refused: tuple[type[Exception], ...] = ()
) -> int:
    """Run a subcommand that works on the store, turning its expected failures into one
    line on stderr and an exit code: the store commands all fail in the same ways."""
    from tabserve.config import ConfigError
    from tabserve.store.backends import StoreError, StoreUnavailable
    from tabserve.store.passwords import PasswordFileError

    try:
        return body()
    except ConfigError as exc:
        print(f"tabserve {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:
        print(f"tabserve {command}: error: {exc.message}: {exc.info}", file=sys.stderr)
        return EXIT_ERROR
    except (StoreError, PasswordFileError, *refused) as exc:
        print(f"tabserve {command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"tabserve {command}: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
