"""The endpoint registry: what is deployed, at which version, and where its files are.

It keeps the endpoint table in memory and changes it through the store
(:mod:`tabserve.store.backends`): the state directory (``state.ini`` in TabPy's format, so a state
directory written by TabPy loads as it is) or PostgreSQL. Every change runs inside the store's
exclusive change, on the table as the store holds it then, so that deploys through several
processes or replicas never overwrite each other: two deploys of one name give two
consecutive versions. Only the current and the previous version of each endpoint are kept.

Methods are synchronous and do file or database I/O: call them off the event loop, except
:meth:`stale`, which reads nothing. Errors are ``TabserveError``s (``StoreUnavailable``,
503, while the store cannot be reached); the registry knows nothing of HTTP or of workers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import logging
import re
import shutil
import threading
import time
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import BadRequest, InsufficientStorage, NotFound, StoreUnavailable
from ..store.archives import ARCHIVE_FILE, python_mismatch
from ..store.backends import Store
from ..store.records import FINGERPRINT as _FINGERPRINT
from ..store.records import OPTIONS as _OPTIONS
from ..store.records import EndpointRecord
from .cache import check_max_age

log = logging.getLogger("tabserve.registry")

ENDPOINT_TYPES = ("model", "alias")
_NAME = re.compile(r"[A-Za-z0-9_\- ]+")
_UPDATABLE = ("description", "docstring", "schema", "is_public", *_FINGERPRINT, *_OPTIONS)

__all__ = ["EndpointRecord", "EndpointRegistry"]


class EndpointRegistry:
    """Deployed endpoints: a table in memory, kept in step with the store."""

    def __init__(self, store: Store, staging: Path) -> None:
        self.store = store
        self.staging = staging  # where TabPy's client writes files before deploying
        self._lock = threading.Lock()  # one refresh or change at a time in this process
        self._endpoints: dict[str, EndpointRecord] = {}
        self._token: Hashable = object()  # matches no store token: stale until loaded
        self.service: dict[str, str] = {}

    # -- keeping in step -------------------------------------------------------------------

    def stale(self) -> bool:
        """Whether the store may have changed since the table was loaded (reads nothing)."""
        return self.store.token() != self._token

    def refresh(self) -> list[EndpointRecord]:
        """Reload the table from the store; returns the endpoints that are new or changed.

        Archives the local cache lacks are written first (PostgreSQL), so that the table
        published to the workers only names files that exist.
        """
        with self._lock:
            token = self.store.token()  # before the read: a change after it shows as stale
            snapshot = self.store.snapshot()
            missing = self.store.materialize(snapshot.endpoints)
            for name in missing:
                log.error("endpoint %s: the store has no archive for its version", name)
            changed = [e for n, e in snapshot.endpoints.items() if self._endpoints.get(n) != e]
            self._endpoints = snapshot.endpoints
            self.service = snapshot.service
            self._token = token
            self.store.prune_cache(snapshot.endpoints)
            return changed

    # -- reading ---------------------------------------------------------------------------

    def all(self) -> dict[str, EndpointRecord]:
        return dict(self._endpoints)

    def get(self, name: str) -> EndpointRecord:
        try:
            return self._endpoints[name]
        except KeyError:
            raise NotFound("Unknown endpoint", f"Endpoint {name} is not found") from None

    def archive_path(self, endpoint: EndpointRecord) -> Path:
        return self.store.archive_path(endpoint)

    def resolve(self, name: str) -> EndpointRecord:
        """Follow aliases to the model that answers for ``name``."""
        chain = alias_chain(self._endpoints, name)
        if not chain or chain[-1].type != "model":
            raise NotFound("UnknownURI", f"Endpoint '{name}' does not exist")
        return chain[-1]

    # -- changing --------------------------------------------------------------------------

    def add(self, request: Mapping[str, Any]) -> tuple[EndpointRecord, Path | None]:
        """Record a new endpoint at version 1; returns it and the new archive's path, if any."""
        name = _check_name(request.get("name"))
        now = int(time.time())
        endpoint = _endpoint_from_request(name, request, version=1, now=now)
        archive = None if endpoint.type == "alias" else self._archive_bytes(endpoint, request)
        with self._lock, self._writing(f"deploy {name}"), self.store.change() as change:
            if name in change.endpoints:
                raise BadRequest(f"endpoint {name} already exists.")
            if endpoint.type == "alias":
                target = _check_target(change.endpoints, name, request.get("target"))
                endpoint = replace(endpoint, target=target, dependencies=[target])
            change.put(endpoint, archive)
        return endpoint, self._committed(change.endpoints, endpoint, archive)

    def update(
        self, name: str, request: Mapping[str, Any]
    ) -> tuple[EndpointRecord, EndpointRecord, Path | None]:
        """Update metadata, and with ``should_update_version`` also the code (a new version).

        Returns the endpoint as it was, as it is now, and the new archive's path, if any.
        """
        new_version = bool(request.get("should_update_version"))
        with self._lock, self._writing(f"update {name}"), self.store.change() as change:
            old = change.endpoints.get(name)
            if old is None:
                raise NotFound(f"endpoint {name} does not exist.")
            version = old.version + 1 if new_version else old.version
            changes: dict[str, Any] = {k: request[k] for k in _UPDATABLE if k in request}
            if "type" in request and request["type"] != old.type:
                raise BadRequest(f"endpoint {name} is a {old.type}; its type cannot change")
            if old.type == "alias" and request.get("target"):
                changes["target"] = _check_target(change.endpoints, name, request["target"])
                changes["dependencies"] = [changes["target"]]
            endpoint = replace(
                old, **_clean(changes), version=version, last_modified_time=int(time.time())
            )
            archive = None
            if new_version and endpoint.type == "model":
                # Read inside the change: the version number is only known here.
                archive = self._archive_bytes(endpoint, request)
            change.put(endpoint, archive)
        return old, endpoint, self._committed(change.endpoints, endpoint, archive)

    def delete(self, name: str) -> EndpointRecord:
        with self._lock, self._writing(f"delete {name}"), self.store.change() as change:
            endpoint = change.endpoints.get(name)
            if endpoint is None:
                raise NotFound(f"endpoint {name} does not exist.")
            users = sorted(n for n, e in change.endpoints.items() if name in e.dependencies)
            if users:
                raise BadRequest(
                    f"endpoint {name} cannot be removed: {', '.join(users)} depends on it; "
                    "remove those first"
                )
            change.delete(name)
        self._endpoints = dict(change.endpoints)
        shutil.rmtree(self.staging / "endpoints" / name, ignore_errors=True)
        return endpoint

    def discard_version(self, endpoint: EndpointRecord, previous: EndpointRecord | None) -> None:
        """Undo a deploy whose archive failed to load: restore ``previous`` or remove it.

        Only while ``endpoint`` is still current: a newer deploy (through another process or
        replica) in between stays.
        """
        with self._lock, self.store.change() as change:
            current = change.endpoints.get(endpoint.name)
            if current is None or current.version != endpoint.version:
                return
            if previous is None:
                change.delete(endpoint.name)
            else:
                change.put(previous)
        self._endpoints = dict(change.endpoints)

    @contextlib.contextmanager
    def _writing(self, change: str) -> Iterator[None]:
        """A write the file system refuses is a clear error, never a 500: 507 when it is
        full, 503 otherwise. The store has written nothing that state.ini names."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("cannot %s: writing %s failed: %s", change, self.store.shown, reason)
            info = f"{change}: the {self.store.shown} said: {reason}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage(info=info) from None
            raise StoreUnavailable(info=info) from None

    def _committed(
        self, endpoints: dict[str, EndpointRecord], endpoint: EndpointRecord, archive: bytes | None
    ) -> Path | None:
        """After a change: the new table is current, the new archive ready for workers."""
        self._endpoints = dict(endpoints)
        if archive is None:
            return None
        self.store.materialize({endpoint.name: endpoint})
        # The staged copy has been taken in; TabPy leaves it, and it piles up.
        shutil.rmtree(self.staging / "endpoints" / endpoint.name, ignore_errors=True)
        return self.store.archive_path(endpoint)

    def _archive_bytes(self, endpoint: EndpointRecord, request: Mapping[str, Any]) -> bytes:
        """The version's archive: from an inline upload or from the staging directory."""
        mismatch = python_mismatch(endpoint.python_version)
        if mismatch:
            raise BadRequest(f"cannot deploy {endpoint.name}: {mismatch}")
        if "archive" in request:
            return _decode_archive(request["archive"])
        return (
            self._staged_source(endpoint.name, request.get("src_path")) / ARCHIVE_FILE
        ).read_bytes()

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


def _check_target(endpoints: Mapping[str, EndpointRecord], name: str, target: Any) -> str:
    if not isinstance(target, str) or not target:
        raise BadRequest("Target is required for alias endpoint.")
    if target == name:
        raise BadRequest(f"alias {name} cannot point at itself")
    if target not in endpoints:
        raise BadRequest(f"alias target {target} is not a deployed endpoint")
    chain = alias_chain(endpoints, target)
    names = {endpoint.name for endpoint in chain}
    looped = chain[-1].type == "alias" and chain[-1].target in names  # a hand-made loop
    if name in names or looped:
        raise BadRequest(f"alias {name} -> {target} would create a cycle")
    return target


def alias_chain(endpoints: Mapping[str, EndpointRecord], name: str) -> list[EndpointRecord]:
    """``name``'s record, then each alias target in turn: the one alias walker.

    Ends at a model, at a target that does not exist, or before a record repeats.
    """
    chain: list[EndpointRecord] = []
    endpoint = endpoints.get(name)
    while endpoint is not None and endpoint not in chain:
        chain.append(endpoint)
        if endpoint.type != "alias":
            break
        endpoint = endpoints.get(endpoint.target or "")
    return chain


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
    if changes.get("max_age") is not None:
        check_max_age(changes["max_age"], "the endpoint's max_age")
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
