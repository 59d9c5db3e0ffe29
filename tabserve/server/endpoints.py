"""The endpoint service: deploys, removals and queries, tying the registry to the workers.

A deploy writes the new version's files, has one worker load them, and only then publishes
the new endpoint table to the workers. Each job carries the table current when it was
dispatched, so a request sees the old version or the new one, never a half-deployed one.

Changes made by other processes or replicas arrive two ways: the store calls back when it
notices one (PostgreSQL ``NOTIFY``, or the state directory's watcher), and every request
that reads the table first asks the store, for free, whether it is stale (a ``stat`` of
state.ini, or the listener's latest generation). Either way the table is reloaded in a
thread and republished; the store being unreachable leaves the loaded table serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequest, StoreUnavailable, TabserveError
from ..protocol import Context, EndpointEntry, JobKind, Payload
from .executor import Executor, JobResult
from .registry import EndpointRecord, EndpointRegistry, alias_chain

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
        self._refreshing: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        # Deploys of this process between commit and load check: name -> what to publish
        # meanwhile (the previous version, or None for nothing).
        self._pending: dict[str, EndpointRecord | None] = {}
        self._follower: asyncio.Task[None] | None = None
        # Called with nothing after each reload from the store (the users follow it too).
        self.on_refresh: list[Callable[[], Any]] = []

    async def start(self) -> None:
        """Load what the store holds, publish it, check every model loads (in the
        background), and follow the store's changes from now on."""
        await asyncio.to_thread(self.registry.refresh)
        self._publish()
        self._check_models(self.registry.all().values())
        loop = asyncio.get_running_loop()
        self.registry.store.watch(lambda: loop.call_soon_threadsafe(self._changed.set))
        self._follower = asyncio.create_task(self._follow())

    def _check_models(self, endpoints: Any) -> None:
        for endpoint in endpoints:
            if endpoint.type == "model":
                self._states[endpoint.name] = LoadState(LOAD_IN_PROGRESS)
                task = asyncio.create_task(self._check_on_start(endpoint))
                self._checks.add(task)
                task.add_done_callback(self._checks.discard)

    async def _follow(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self.refresh()

    async def ensure_fresh(self) -> None:
        """Reload first if the store changed since the table was loaded (a cheap check)."""
        if self.registry.stale():
            await self.refresh()

    async def refresh(self) -> None:
        """Reload the table from the store and republish it; concurrent callers share one."""
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.create_task(self._reload())
        await asyncio.shield(task)

    async def _reload(self) -> None:
        try:
            changed = await asyncio.to_thread(self.registry.refresh)
        except StoreUnavailable as exc:
            log.warning("store unreachable, serving the loaded endpoints: %s", exc.info)
            return
        except Exception:  # a reload must never stop the follower; the old table serves on
            log.exception("reloading the endpoints from the store failed")
            return
        known = self.registry.all()
        for name in [n for n in self._states if n not in known]:
            del self._states[name]
        self._publish()
        self._check_models(e for e in changed if e.name not in self._pending)
        for callback in self.on_refresh:
            callback()

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
        (so the worker looks names up and walks no alias chain). A deploy still being checked
        is published as its previous version, or not at all."""
        endpoints = self.registry.all()
        for name, previous in self._pending.items():
            if previous is None:
                endpoints.pop(name, None)
            else:
                endpoints[name] = previous
        table: dict[str, EndpointEntry] = {}
        for name in endpoints:
            chain = alias_chain(endpoints, name)
            if chain and chain[-1].type == "model":  # else an alias whose target is gone: 404
                table[name] = self._entry(chain[-1])
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
            previous, endpoint, archive = await asyncio.to_thread(
                self.registry.update, name, request
            )
            if archive is not None:
                await self._accept(endpoint, previous)
            else:
                self._publish()
            return endpoint

    async def _accept(self, endpoint: EndpointRecord, previous: EndpointRecord | None) -> None:
        """Publish ``endpoint`` if its archive loads in a worker; otherwise undo the deploy."""
        if endpoint.type == "model":
            before = self._states.get(endpoint.name)
            # Recorded in the store already, but not answering here yet: /status says so.
            self._states[endpoint.name] = LoadState(LOAD_IN_PROGRESS)
            self._pending[endpoint.name] = previous
            try:
                error = await self._load_error(endpoint)
            finally:
                self._pending.pop(endpoint.name, None)
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

    async def resolve(self, name: str) -> EndpointRecord:
        """The model answering for ``name`` (following aliases), after catching up with the
        store; NotFound if there is none.

        The /query handler calls this first, so that an unknown name is a 404 without
        using a worker (and a known one labels the request's metrics)."""
        await self.ensure_fresh()
        return self.registry.resolve(name)

    async def query(self, name: str, body: Payload, encoding: str) -> JobResult:
        """Call ``name`` (already found by ``resolve``) in a worker."""
        self.guard()
        return await self.executor.run(
            JobKind.QUERY, body, self.timeout, {"name": name, "encoding": encoding}
        )

    async def close(self) -> None:
        for task in [*self._checks, self._follower, self._refreshing]:
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self.registry.store.close)
