"""The endpoint registry: what is deployed, at which version, and where its files are.

It is backed by ``state.ini`` in TabPy's format, so a state directory written by TabPy loads
as it is. Every change re-reads the file (keeping edits made to other sections), replaces
the endpoint sections, and writes it atomically. Version directories are immutable once
written; only the current and the previous version of each endpoint are kept.

Methods are synchronous and do file I/O: call them off the event loop. Errors are
``TabserveError``s; the registry knows nothing of HTTP or of workers.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import io
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import BadRequest, NotFound
from ..store.archives import ARCHIVE_FILE, archive_dir, python_mismatch
from ..store.files import atomic_write
from ..store.state_dir import read_state

log = logging.getLogger("tabserve.registry")

VERSIONS = "Query Objects Service Versions"
DOCSTRINGS = "Query Objects Docstrings"
META = "Meta"
ENDPOINT_TYPES = ("model", "alias")
_NAME = re.compile(r"[A-Za-z0-9_\- ]+")
# Fields stored in the JSON line of [Query Objects Service Versions], in TabPy's order.
_STORED = (
    "description",
    "type",
    "version",
    "dependencies",
    "target",
    "creation_time",
    "last_modified_time",
    "schema",
    "is_public",
)
# Recorded by tabserve's client at deploy time (absent for TabPy deploys).
_FINGERPRINT = ("python_version", "cloudpickle_version", "signature")
_UPDATABLE = ("description", "docstring", "schema", "is_public", *_FINGERPRINT)


@dataclass(frozen=True)
class EndpointRecord:
    """One deployed endpoint's metadata (not its code)."""

    name: str
    type: str
    version: int = 1
    description: str = ""
    docstring: str = ""
    dependencies: list[str] = field(default_factory=list)
    target: str | None = None
    creation_time: int = 0
    last_modified_time: int = 0
    schema: Any = None
    is_public: Any = False
    python_version: str | None = None
    cloudpickle_version: str | None = None
    signature: str | None = None

    def info(self) -> dict[str, Any]:
        """TabPy's endpoint description: stored fields in order, then docstring, then extras."""
        data = {key: getattr(self, key) for key in _STORED}
        data["docstring"] = self.docstring
        data.update({k: getattr(self, k) for k in _FINGERPRINT if getattr(self, k) is not None})
        return data


class EndpointRegistry:
    """Deployed endpoints, persisted in ``state.ini`` and the archive directory."""

    def __init__(self, state_path: Path) -> None:
        self.state_file = state_path / "state.ini"
        self.archive_dir = archive_dir(state_path)
        self.staging = state_path / "staging"
        self._lock = threading.Lock()
        self._endpoints: dict[str, EndpointRecord] = _read_endpoints(read_state(self.state_file))

    # -- reading ---------------------------------------------------------------------------

    def all(self) -> dict[str, EndpointRecord]:
        return dict(self._endpoints)

    def get(self, name: str) -> EndpointRecord:
        try:
            return self._endpoints[name]
        except KeyError:
            raise NotFound("Unknown endpoint", f"Endpoint {name} is not found") from None

    def archive_path(self, endpoint: EndpointRecord) -> Path:
        return self.archive_dir / endpoint.name / str(endpoint.version) / ARCHIVE_FILE

    def chain(self, name: str) -> list[EndpointRecord]:
        """``name``'s record, then each alias target in turn: the one alias walker.

        Ends at a model, at a target that does not exist, or before a record repeats.
        """
        chain: list[EndpointRecord] = []
        endpoint = self._endpoints.get(name)
        while endpoint is not None and endpoint not in chain:
            chain.append(endpoint)
            if endpoint.type != "alias":
                break
            endpoint = self._endpoints.get(endpoint.target or "")
        return chain

    def resolve(self, name: str) -> EndpointRecord:
        """Follow aliases to the model that answers for ``name``."""
        chain = self.chain(name)
        if not chain or chain[-1].type != "model":
            raise NotFound("UnknownURI", f"Endpoint '{name}' does not exist")
        return chain[-1]

    # -- changing --------------------------------------------------------------------------

    def add(self, request: Mapping[str, Any]) -> tuple[EndpointRecord, Path | None]:
        """Record a new endpoint at version 1; returns it and the new archive's path, if any."""
        name = _check_name(request.get("name"))
        with self._lock:
            if name in self._endpoints:
                raise BadRequest(f"endpoint {name} already exists.")
            now = int(time.time())
            endpoint = _endpoint_from_request(name, request, version=1, now=now)
            archive = None
            if endpoint.type == "alias":
                target = self._check_target(name, request.get("target"))
                endpoint = replace(endpoint, target=target, dependencies=[target])
            else:
                archive = self._place_archive(endpoint, request)
            self._commit({**self._endpoints, name: endpoint})
            return endpoint, archive

    def update(self, name: str, request: Mapping[str, Any]) -> tuple[EndpointRecord, Path | None]:
        """Update metadata, and with ``should_update_version`` also the code (a new version)."""
        with self._lock:
            old = self._endpoints.get(name)
            if old is None:
                raise NotFound(f"endpoint {name} does not exist.")
            new_version = bool(request.get("should_update_version"))
            version = old.version + 1 if new_version else old.version
            changes: dict[str, Any] = {k: request[k] for k in _UPDATABLE if k in request}
            if "type" in request and request["type"] != old.type:
                raise BadRequest(f"endpoint {name} is a {old.type}; its type cannot change")
            if old.type == "alias" and request.get("target"):
                changes["target"] = self._check_target(name, request["target"])
                changes["dependencies"] = [changes["target"]]
            endpoint = replace(
                old, **_clean(changes), version=version, last_modified_time=int(time.time())
            )
            archive = None
            if new_version and endpoint.type == "model":
                archive = self._place_archive(endpoint, request)
            self._commit({**self._endpoints, name: endpoint})
            self._prune(endpoint)
            return endpoint, archive

    def delete(self, name: str) -> EndpointRecord:
        with self._lock:
            endpoint = self._endpoints.get(name)
            if endpoint is None:
                raise NotFound(f"endpoint {name} does not exist.")
            users = sorted(n for n, e in self._endpoints.items() if name in e.dependencies)
            if users:
                raise BadRequest(
                    f"endpoint {name} cannot be removed: {', '.join(users)} depends on it; "
                    "remove those first"
                )
            self._commit({n: e for n, e in self._endpoints.items() if n != name})
            shutil.rmtree(self.archive_dir / name, ignore_errors=True)
            shutil.rmtree(self.staging / "endpoints" / name, ignore_errors=True)
            return endpoint

    def discard_version(self, endpoint: EndpointRecord, previous: EndpointRecord | None) -> None:
        """Undo a deploy whose archive failed to load: restore ``previous`` or remove it."""
        with self._lock:
            remaining = dict(self._endpoints)
            if previous is None:
                remaining.pop(endpoint.name, None)
            else:
                remaining[endpoint.name] = previous
            self._commit(remaining)
            if previous is None:
                shutil.rmtree(self.archive_dir / endpoint.name, ignore_errors=True)
            elif previous.version != endpoint.version:
                stale = self.archive_dir / endpoint.name / str(endpoint.version)
                shutil.rmtree(stale, ignore_errors=True)

    def _check_target(self, name: str, target: Any) -> str:
        if not isinstance(target, str) or not target:
            raise BadRequest("Target is required for alias endpoint.")
        if target == name:
            raise BadRequest(f"alias {name} cannot point at itself")
        if target not in self._endpoints:
            raise BadRequest(f"alias target {target} is not a deployed endpoint")
        chain = self.chain(target)
        names = {endpoint.name for endpoint in chain}
        looped = chain[-1].type == "alias" and chain[-1].target in names  # a hand-made loop
        if name in names or looped:
            raise BadRequest(f"alias {name} -> {target} would create a cycle")
        return target

    def _place_archive(self, endpoint: EndpointRecord, request: Mapping[str, Any]) -> Path | None:
        """Put the version's archive in place: from an inline upload or from staging."""
        mismatch = python_mismatch(endpoint.python_version)
        if mismatch:
            raise BadRequest(f"cannot deploy {endpoint.name}: {mismatch}")
        destination = self.archive_dir / endpoint.name / str(endpoint.version)
        if "archive" in request:
            data = _decode_archive(request["archive"])
            return self._install(destination, lambda tmp: (tmp / ARCHIVE_FILE).write_bytes(data))
        source = self._staged_source(endpoint.name, request.get("src_path"))
        return self._install(
            # Links are copied as links: a link in the upload area must not pull in a file
            # the server happens to be able to read.
            destination,
            lambda tmp: shutil.copytree(source, tmp, symlinks=True, dirs_exist_ok=True),
        )

    def _staged_source(self, name: str, src_path: Any) -> Path:
        if src_path is None:
            raise BadRequest("src_path is required to add/update an endpoint.")
        if not isinstance(src_path, str):
            raise BadRequest("src_path must be a string.")
        try:
            source = Path(src_path).resolve()
        except ValueError:  # a NUL, or a lone surrogate the filesystem cannot encode
            raise BadRequest("src_path is not a valid path.") from None
        uploads = (self.staging / "endpoints").resolve()
        if not source.is_relative_to(uploads) or source == uploads:
            # TabPy copied any directory the server could read; only the directories its
            # client writes (<upload destination>/endpoints/<name>/<version>) are allowed.
            raise BadRequest(
                f"Invalid source path for endpoint {name}",
                f"src_path must be a directory inside {uploads}",
            )
        archive = source / ARCHIVE_FILE
        if archive.is_symlink() or not archive.is_file():
            raise BadRequest(
                f"Invalid source path for endpoint {name}",
                f"{source} holds no {ARCHIVE_FILE}: the files must be written before deploying",
            )
        return source

    def _install(self, destination: Path, fill: Callable[[Path], object]) -> Path:
        """Build the version directory beside its final place, then rename it into place."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.parent / f".{destination.name}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            fill(tmp)
            shutil.rmtree(destination, ignore_errors=True)
            tmp.rename(destination)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return destination / ARCHIVE_FILE

    def _prune(self, endpoint: EndpointRecord) -> None:
        """Keep the current and the previous version; remove older ones and staging copies."""
        keep = {str(endpoint.version), str(endpoint.version - 1)}
        directory = self.archive_dir / endpoint.name
        if directory.is_dir():
            for child in directory.iterdir():
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)
        shutil.rmtree(self.staging / "endpoints" / endpoint.name, ignore_errors=True)

    def _commit(self, endpoints: dict[str, EndpointRecord]) -> None:
        """Write ``endpoints`` to state.ini atomically, then make them current."""
        parser = read_state(self.state_file)
        for section in (VERSIONS, DOCSTRINGS):
            if parser.has_section(section):
                parser.remove_section(section)
            parser.add_section(section)
        for name, endpoint in endpoints.items():
            stored = asdict(endpoint)
            line = {key: stored[key] for key in _STORED}
            line.update({k: stored[k] for k in _FINGERPRINT if stored[k] is not None})
            parser.set(VERSIONS, name, json.dumps(line, ensure_ascii=False))
            # A JSON string keeps newlines, indentation, '%' and non-ASCII text exactly.
            parser.set(DOCSTRINGS, name, json.dumps(endpoint.docstring, ensure_ascii=False))
        if not parser.has_section(META):
            parser.add_section(META)
        revision = parser.get(META, "Revision Number", fallback="0") or "0"
        parser.set(META, "Revision Number", str(int(revision) + 1 if revision.isdigit() else 1))
        atomic_write(self.state_file, _render(parser))
        self._endpoints = endpoints


def _render(parser: configparser.ConfigParser) -> bytes:
    out = io.StringIO()
    parser.write(out)
    return out.getvalue().encode("utf-8")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise BadRequest("name is required to add an endpoint.")
    if not _NAME.fullmatch(name) or name != name.strip():
        raise BadRequest(
            "endpoint name can only contain: a-z, A-Z, 0-9, underscore, hyphens and spaces."
        )
    return name


def _decode_archive(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("archive must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("archive is not valid base64") from None


def _clean(changes: dict[str, Any]) -> dict[str, Any]:
    for key in ("description", "docstring"):
        if key in changes and changes[key] is None:
            changes[key] = ""
        if key in changes and not isinstance(changes[key], str):
            raise BadRequest(f"{key} must be a string")
    for key in _FINGERPRINT:
        if changes.get(key) is not None and not isinstance(changes[key], str):
            raise BadRequest(f"{key} must be a string", f"got {changes[key]!r}")
    return changes


def _endpoint_from_request(
    name: str, request: Mapping[str, Any], version: int, now: int
) -> EndpointRecord:
    kind = request.get("type")
    if kind not in ENDPOINT_TYPES:
        raise BadRequest(
            f"endpoint type must be one of {', '.join(ENDPOINT_TYPES)}", f"got {kind!r}"
        )
    values = _clean({k: request[k] for k in _UPDATABLE if k in request})
    return EndpointRecord(
        name=name, type=kind, version=version, creation_time=now, last_modified_time=now, **values
    )


def _read_endpoints(parser: configparser.ConfigParser) -> dict[str, EndpointRecord]:
    """Endpoints from a state.ini written by TabPy or by tabserve."""
    endpoints: dict[str, EndpointRecord] = {}
    if not parser.has_section(VERSIONS):
        return endpoints
    for name, line in parser.items(VERSIONS):
        try:
            data = json.loads(line or "{}")
            known = {k: data[k] for k in (*_STORED, *_FINGERPRINT) if k in data}
            known["docstring"] = _read_docstring(parser.get(DOCSTRINGS, name, fallback=""))
            known.setdefault("type", "model")
            known["dependencies"] = list(known.get("dependencies") or [])
            known["version"] = int(known.get("version") or 1)
            endpoints[name] = EndpointRecord(name=name, **known)
        except (ValueError, TypeError) as exc:
            # An entry edited by hand into nonsense is skipped, not fatal: the rest still serve.
            log.error("state.ini: endpoint %r is unreadable and skipped: %s", name, exc)
    return endpoints


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
