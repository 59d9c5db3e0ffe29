"""The endpoint service: deploys, removals and queries, tying the registry to the workers.

A deploy writes the new version's files, has one worker load them, and only then publishes
the new endpoint table to the workers. Each job carries the table current when it was
dispatched, so a request sees the old version or the new one, never a half-deployed one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, NotFound, TabserveError
from ..protocol import Context, EndpointEntry, JobKind
from .executor import Executor, JobResult
from .registry import EndpointRecord, EndpointRegistry

log = logging.getLogger("tabserve.endpoints")

LOAD_SUCCESSFUL = "LoadSuccessful"
LOAD_FAILED = "LoadFailed"
LOAD_IN_PROGRESS = "LoadInProgress"


@dataclass(frozen=True)
class LoadState:
    status: str
    last_error: str | None = None


class EndpointService:
    """What the /endpoints, /status and /query handlers call."""

    def __init__(
        self,
        registry: EndpointRegistry,
        executor: Executor,
        timeout: float,
        guard: Callable[[], None] = lambda: None,
    ) -> None:
        self.registry = registry
        # Raises when deployed code must not run (a failed sandbox self-check, untrusted).
        self.guard = guard
        self.executor = executor
        self.timeout = timeout
        self._states: dict[str, LoadState] = {}
        self._lock = asyncio.Lock()  # one change at a time; queries never wait on it
        self._checks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Publish what state.ini holds and check every model loads, in the background."""
        self._publish()
        for endpoint in self.registry.all().values():
            if endpoint.type == "model":
                self._states[endpoint.name] = LoadState(LOAD_IN_PROGRESS)
                task = asyncio.create_task(self._check_on_start(endpoint))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _check_on_start(self, endpoint: EndpointRecord) -> None:
        try:
            self.guard()
        except TabserveError as exc:
            self._states[endpoint.name] = LoadState(LOAD_FAILED, f"Load failed: {exc.info}")
            return
        error = await self._load_error(endpoint)
        self._states[endpoint.name] = LoadState(
            LOAD_FAILED if error else LOAD_SUCCESSFUL, f"Load failed: {error}" if error else None
        )
        if error:
            log.error("endpoint %s version %d does not load: %s", endpoint.name, endpoint.version,
                      error)  # fmt: skip

    def _entry(self, model: EndpointRecord) -> EndpointEntry:
        return {
            "model": model.name,
            "version": model.version,
            "path": str(self.registry.archive_path(model)),
            "python_version": model.python_version,
        }

    def _publish(self) -> None:
        """Send the workers every name that answers, aliases already resolved to their model
        (so the worker looks names up and walks no alias chain)."""
        table: dict[str, EndpointEntry] = {}
        for name in self.registry.all():
            try:
                table[name] = self._entry(self.registry.resolve(name))
            except NotFound:
                continue  # an alias whose target is gone (a hand-edited state.ini) answers 404
        self.executor.set_context(Context(endpoints=table))

    async def _load_error(self, endpoint: EndpointRecord) -> str | None:
        """Why ``endpoint`` does not load in a worker, or None when it does."""
        try:
            options = {"name": endpoint.name, "entry": self._entry(endpoint)}
            await self.executor.run(JobKind.LOAD, b"", self.timeout, options)
        except BadRequest as exc:
            return str(exc.info)
        except TabserveError as exc:
            return f"{exc.message}: {exc.info}" if exc.info else exc.message
        return None

    # -- reading ---------------------------------------------------------------------------

    def infos(self) -> dict[str, dict[str, Any]]:
        return {name: e.info() for name, e in self.registry.all().items()}

    def info(self, name: str) -> dict[str, Any]:
        return self.registry.get(name).info()

    def statuses(self) -> dict[str, dict[str, Any]]:
        result = {}
        for name, endpoint in self.registry.all().items():
            state = self._states.get(name, LoadState(LOAD_SUCCESSFUL))
            result[name] = {
                "version": endpoint.version,
                "type": endpoint.type,
                "status": state.status,
                "last_error": state.last_error,
            }
        return result

    # -- changing --------------------------------------------------------------------------

    async def add(self, request: Mapping[str, Any]) -> EndpointRecord:
        self.guard()  # a deploy unpickles the archive in a worker: that runs its code
        async with self._lock:
            endpoint, _ = await asyncio.to_thread(self.registry.add, request)
            await self._accept(endpoint, previous=None)
            return endpoint

    async def update(self, name: str, request: Mapping[str, Any]) -> EndpointRecord:
        self.guard()
        async with self._lock:
            previous = self.registry.get(name)
            endpoint, archive = await asyncio.to_thread(self.registry.update, name, request)
            if archive is not None:
                await self._accept(endpoint, previous)
            else:
                self._publish()
            return endpoint

    async def _accept(self, endpoint: EndpointRecord, previous: EndpointRecord | None) -> None:
        """Publish ``endpoint`` if its archive loads in a worker; otherwise undo the deploy."""
        if endpoint.type == "model":
            before = self._states.get(endpoint.name)
            # Recorded in state.ini already, but not answering yet: /status says so.
            self._states[endpoint.name] = LoadState(LOAD_IN_PROGRESS)
            error = await self._load_error(endpoint)
            if error:
                await asyncio.to_thread(self.registry.discard_version, endpoint, previous)
                if before is None:
                    self._states.pop(endpoint.name, None)
                else:
                    self._states[endpoint.name] = before
                raise BadRequest(f"could not load endpoint '{endpoint.name}'", error)
        self._states[endpoint.name] = LoadState(LOAD_SUCCESSFUL)
        self._publish()

    async def remove(self, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self.registry.delete, name)
            self._states.pop(name, None)
            self._publish()  # from the next job on, no worker answers for it

    # -- querying --------------------------------------------------------------------------

    def resolve(self, name: str) -> EndpointRecord:
        """The model answering for ``name`` (following aliases); NotFound if there is none.

        The /query handler calls this first, so that an unknown name is a 404 without
        using a worker (and a known one labels the request's metrics)."""
        return self.registry.resolve(name)

    async def query(self, name: str, body: bytes, encoding: str) -> JobResult:
        """Call ``name`` (already found by ``resolve``) in a worker."""
        self.guard()
        return await self.executor.run(
            JobKind.QUERY, body, self.timeout, {"name": name, "encoding": encoding}
        )

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
