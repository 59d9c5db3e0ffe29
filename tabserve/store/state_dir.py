"""The state directory: state.ini (the server's identity, CORS headers and the deployed
endpoints), the endpoint archives, and :class:`StateDirStore`, the default store.

This module creates the directory (state.ini from the template in ``data/``) and reads the
file, TabPy's format, with interpolation switched off so that ``%`` is an ordinary
character. Every write goes through ``files.atomic_write``, so a crash never leaves a
half-written state.ini behind.

As a store, ``state.ini`` and ``query_objects/<name>/<version>/pickle_archive`` stay exactly
as TabPy writes them, so a TabPy state directory loads as it is and can go back to TabPy.
What TabPy's format has no place for (users managed by ``tabserve user --store``, and later
jobs, results and API keys) goes into ``tabserve.db``, an SQLite database in WAL mode beside
them.

Several processes may serve one state directory (issue 10's front-end processes):

* every change holds ``state.lock`` (``flock``) from reading state.ini to renaming the new
  one into place, so two deploys of one name get two consecutive versions;
* :meth:`StateDirStore.token` is a ``stat`` of state.ini (the file is replaced by rename on
  every change, so its inode changes): cheap enough to call on every request, it tells a
  process that another one changed the table.

A change writes the new archive first, then state.ini (one atomic rename), then removes what
is no longer referenced: a process killed at any point leaves a state.ini whose every model
has its archive; at worst an unreferenced version directory, overwritten by the next deploy.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .archives import ARCHIVE_FILE, archive_dir
from .database import Database, sqlite_url
from .files import atomic_write, locked_directory, remove_stale_temps
from .jobs import JobTables
from .records import (
    ApiKeyRecord,
    EndpointChange,
    EndpointRecord,
    Snapshot,
    UserRecord,
    endpoint_document,
    endpoint_from_document,
)
from .sql import SqlStore

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
    """Create the state directory and, when absent, state.ini from the template.

    Temporaries of a write that was killed (state.ini itself is intact) are removed."""
    state_path.mkdir(parents=True, exist_ok=True)
    state_file = state_path / STATE_FILE
    remove_stale_temps(state_path, f".{STATE_FILE}.*.tmp")
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


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per state directory
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("tabserve.store")

LOCK_FILE = "state.lock"
DATABASE_FILE = "tabserve.db"
_STAT_SECONDS = 0.2
_DB_EVERY = 5  # ticks: read tabserve.db's generation once a second
VERSIONS = "Query Objects Service Versions"
DOCSTRINGS = "Query Objects Docstrings"
META = "Meta"


class StateDirStore(JobTables):
    """state.ini + query_objects/ + tabserve.db in one directory (jobs and results in
    tabserve.db)."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path
        self.state_file = state_path / STATE_FILE
        self.archives = archive_dir(state_path)
        # Version directories being built when a process was killed never made it into
        # state.ini; one another process is building holds its lock and is left alone.
        if self.archives.is_dir():
            for directory in self.archives.iterdir():
                if directory.is_dir() and not directory.is_symlink():
                    remove_stale_temps(directory, ".*.incoming")
        self.sql = SqlStore(Database(sqlite_url(state_path / DATABASE_FILE)), self.archives)
        self._thread_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._db_generation: int | None = None  # tabserve.db's, as last polled
        self._db_error = ""

    @property
    def shown(self) -> str:
        return f"state directory {self.path}"

    def _database(self) -> Database:
        return self.sql.db

    def migrate(self) -> list[int]:
        applied = self.sql.db.migrate()
        self._poll_database()  # the token is stable from here on: no reload for nothing
        return applied

    # -- reading ---------------------------------------------------------------------------

    def token(self) -> Hashable:
        """Changes whenever state.ini is replaced (one ``stat``, no read), or tabserve.db
        changed as last polled."""
        try:
            st = os.stat(self.state_file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size, self._db_generation)

    def watch(self, on_change: Callable[[], None]) -> None:
        """Poll for changes by other processes in a thread; ``on_change`` is called from it.

        state.ini is stat'ed every 0.2 s, tabserve.db's generation read every second.
        """
        if self._watcher is not None:
            return
        self._poll_database()
        self._watcher = threading.Thread(
            target=self._watch, args=(on_change,), name="tabserve-store-watcher", daemon=True
        )
        self._watcher.start()

    def _watch(self, on_change: Callable[[], None]) -> None:
        last = self.token()
        tick = 0
        while not self._stop.wait(_STAT_SECONDS):
            tick += 1
            if tick % _DB_EVERY == 0:
                self._poll_database()
            token = self.token()
            if token != last:
                last = token
                on_change()

    def _poll_database(self) -> None:
        try:
            self._db_generation = self.sql.generation()
            self._db_error = ""
        except Exception as exc:  # reported by health(); the loop must go on
            self._db_error = f"{type(exc).__name__}: {exc}"

    def health(self) -> tuple[bool, str]:
        if not self.state_file.is_file():
            return False, f"{self.state_file} is missing"
        if self._db_error:
            return False, f"{self.path / DATABASE_FILE}: {self._db_error}"
        return True, f"state directory {self.path}"

    def snapshot(self) -> Snapshot:
        token = self.token()
        parser = read_state(self.state_file)
        service = dict(parser.items(SERVICE_INFO)) if parser.has_section(SERVICE_INFO) else {}
        return Snapshot(hash(token), read_endpoints(parser), service)

    def archive_path(self, endpoint: EndpointRecord) -> Path:
        return self.archives / endpoint.name / str(endpoint.version) / ARCHIVE_FILE

    def archive(self, name: str, version: int) -> bytes | None:
        path = self.archives / name / str(version) / ARCHIVE_FILE
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def materialize(self, endpoints: dict[str, EndpointRecord]) -> list[str]:
        """The names of models whose archive is missing (the files are the store here)."""
        return [
            e.name
            for e in endpoints.values()
            if e.type == "model" and not self.archive_path(e).is_file()
        ]

    def prune_cache(self, endpoints: dict[str, EndpointRecord]) -> None:
        """Nothing to do: the archives here are the store itself, pruned on change."""

    # -- changing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive against every thread and process writing this state directory."""
        with self._thread_lock, open(self.path / LOCK_FILE, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def change(self) -> Iterator[EndpointChange]:
        """Read state.ini under the lock, let the caller change it, write it back."""
        with self.locked():
            parser = read_state(self.state_file)
            change = EndpointChange(read_endpoints(parser))
            yield change
            installed = []
            try:
                for (name, version), data in change.archives.items():
                    destination = self.archives / name / str(version)
                    _install(destination, data)
                    installed.append(destination)
                write_endpoints(parser, change.endpoints)
                atomic_write(self.state_file, _render(parser))
            except BaseException:
                # A full disk, say: state.ini is as it was, and never names these.
                for destination in installed:
                    shutil.rmtree(destination, ignore_errors=True)
                raise
            for name in change.deleted:
                shutil.rmtree(self.archives / name, ignore_errors=True)
            for name in change.changed:
                _prune(self.archives / name, change.endpoints[name].version)

    def put_service(self, values: dict[str, str], *, only_missing: bool = False) -> None:
        """Set [Service Info] keys in state.ini; with ``only_missing``, keep those present."""
        with self.locked():
            parser = read_state(self.state_file)
            for key, value in values.items():
                if not (only_missing and parser.has_option(SERVICE_INFO, key)):
                    parser.set(SERVICE_INFO, key, value)
            atomic_write(self.state_file, _render(parser))

    # -- users and the rest: tabserve.db ---------------------------------------------------

    def users(self) -> dict[str, UserRecord]:
        return self.sql.users()

    def put_user(self, user: UserRecord, *, create: bool | None = None) -> None:
        self.sql.put_user(user, create=create)

    def delete_user(self, name: str) -> None:
        self.sql.delete_user(name)

    def api_keys(self) -> list[ApiKeyRecord]:
        return self.sql.api_keys()

    def api_key(self, key_id: str) -> ApiKeyRecord | None:
        return self.sql.api_key(key_id)

    def add_api_key(self, key: ApiKeyRecord) -> None:
        self.sql.add_api_key(key)

    def revoke_api_key(self, key_id: str, when: float) -> ApiKeyRecord:
        return self.sql.revoke_api_key(key_id, when)

    def touch_api_key(self, key_id: str, when: float) -> None:
        self.sql.touch_api_key(key_id, when)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
            self._watcher = None
        self.sql.close()


def read_endpoints(parser: configparser.ConfigParser) -> dict[str, EndpointRecord]:
    """Endpoints from a state.ini written by TabPy or by tabserve."""
    endpoints: dict[str, EndpointRecord] = {}
    if not parser.has_section(VERSIONS):
        return endpoints
    for name, line in parser.items(VERSIONS):
        try:
            docstring = _read_docstring(parser.get(DOCSTRINGS, name, fallback=""))
            endpoints[name] = endpoint_from_document(name, json.loads(line or "{}"), docstring)
        except (ValueError, TypeError) as exc:
            # An entry edited by hand into nonsense is skipped, not fatal: the rest still serve.
            log.error("state.ini: endpoint %r is unreadable and skipped: %s", name, exc)
    return endpoints


def write_endpoints(
    parser: configparser.ConfigParser, endpoints: dict[str, EndpointRecord]
) -> None:
    """Replace the endpoint sections of ``parser``, and count the revision up (as TabPy)."""
    for section in (VERSIONS, DOCSTRINGS):
        if parser.has_section(section):
            parser.remove_section(section)
        parser.add_section(section)
    for name, endpoint in endpoints.items():
        line = endpoint_document(endpoint)
        parser.set(VERSIONS, name, json.dumps(line, ensure_ascii=False))
        # A JSON string keeps newlines, indentation, '%' and non-ASCII text exactly.
        parser.set(DOCSTRINGS, name, json.dumps(endpoint.docstring, ensure_ascii=False))
    if not parser.has_section(META):
        parser.add_section(META)
    revision = parser.get(META, "Revision Number", fallback="0") or "0"
    parser.set(META, "Revision Number", str(int(revision) + 1 if revision.isdigit() else 1))


def _read_docstring(raw: str | None) -> str:
    if not raw:
        return ""
    if raw.startswith('"'):
        try:
            value = json.loads(raw)
            if isinstance(value, str):
                return value
        except json.JSONDecodeError:
            pass
    return raw  # TabPy's plain format


def _render(parser: configparser.ConfigParser) -> bytes:
    out = io.StringIO()
    parser.write(out)
    return out.getvalue().encode("utf-8")


def _install(destination: Path, data: bytes) -> None:
    """Build the version directory beside its final place, then rename it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.parent / f".{destination.name}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with locked_directory(tmp):  # until renamed: see files.remove_stale_temps
            atomic_write(tmp / ARCHIVE_FILE, data)  # fsynced before state.ini names it
            shutil.rmtree(destination, ignore_errors=True)
            tmp.rename(destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(directory: Path, version: int) -> None:
    """Keep the current and the previous version of one endpoint; remove older ones."""
    keep = {str(version), str(version - 1)}
    if directory.is_dir():
        for child in directory.iterdir():
            if child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)
