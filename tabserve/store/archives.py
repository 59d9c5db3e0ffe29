"""Endpoint archives in the state directory: where they live, and whether one can load here.

A version of an endpoint lives in ``<state>/query_objects/<name>/<version>/pickle_archive``,
TabPy's layout; ``query_objects`` is *the archive directory*. The server places archives
there (``server.registry``) and workers load them (``worker.unpickling``); both need this
module, which therefore imports nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

ARCHIVE_DIR_NAME = "query_objects"  # below the state directory, as TabPy lays it out
ARCHIVE_FILE = "pickle_archive"


def archive_dir(state_path: Path) -> Path:
    """The archive directory of the state directory ``state_path``."""
    return state_path / ARCHIVE_DIR_NAME


def python_mismatch(recorded: str | None) -> str | None:
    """Why an archive pickled on Python ``recorded`` cannot load here, or None if it can."""
    if not recorded:
        return None
    parts = recorded.split(".")
    here = sys.version_info
    if len(parts) < 2 or parts[:2] == [str(here.major), str(here.minor)]:
        return None
    running = f"{here.major}.{here.minor}.{here.micro}"
    return (
        f"the function was pickled with Python {recorded}, but this server runs Python "
        f"{running}; deploy it from Python {here.major}.{here.minor}"
    )
