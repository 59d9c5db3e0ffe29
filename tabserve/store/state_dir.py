"""The state directory and its state.ini: the server's identity, CORS headers and the
deployed endpoints (whose sections ``server.registry`` reads and writes).

This module creates the directory (state.ini from the template in ``data/``) and reads the
file, TabPy's format, with interpolation switched off so that ``%`` is an ordinary
character. Every write goes through ``files.atomic_write``, so a crash never leaves a
half-written state.ini behind.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .files import atomic_write

STATE_FILE = "state.ini"
SERVICE_INFO = "Service Info"
CORS_KEYS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Methods",
)


class StateError(Exception):
    """state.ini is missing a required part or cannot be read."""


@dataclass(frozen=True)
class ServiceInfo:
    """``[Service Info]``: what /info reports, and the CORS headers to send."""

    name: str = "tabserve"
    description: str = ""
    creation_time: str = "0"
    cors: tuple[tuple[str, str], ...] = ()


def new_parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, allow_no_value=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    return parser


def ensure_state_dir(state_path: Path) -> Path:
    """Create the state directory and, when absent, state.ini from the template."""
    state_path.mkdir(parents=True, exist_ok=True)
    state_file = state_path / STATE_FILE
    if not state_file.exists():
        template = resources.files("tabserve.store").joinpath("data", STATE_FILE)
        with resources.as_file(template) as source:
            atomic_write(state_file, Path(source).read_bytes())
    return state_file


def read_state(state_file: Path) -> configparser.ConfigParser:
    parser = new_parser()
    try:
        with state_file.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise StateError(f"cannot read {state_file}: {exc.strerror}") from exc
    except configparser.Error as exc:
        raise StateError(f"{state_file} is not a valid state file: {exc}") from exc
    if not parser.has_section(SERVICE_INFO):
        raise StateError(f"Expected [{SERVICE_INFO}] section in {state_file}")
    return parser


def service_info(parser: configparser.ConfigParser) -> ServiceInfo:
    return service_info_from(dict(parser[SERVICE_INFO]))


def service_info_from(section: dict[str, str]) -> ServiceInfo:
    """``[Service Info]``'s keys and values, from state.ini or a store, as ServiceInfo."""
    cors = tuple((key, section[key]) for key in CORS_KEYS if section.get(key))
    return ServiceInfo(
        name=section.get("Name") or "tabserve",
        description=section.get("Description") or "",
        creation_time=section.get("Creation Time") or "0",
        cors=cors,
    )
