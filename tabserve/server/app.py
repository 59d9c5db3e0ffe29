"""Wiring: build the services and the Tornado application, listen, and shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.netutil import bind_sockets
from tornado.web import Application

from .. import __version__
from ..config import Settings
from ..errors import TabserveError
from ..store.backends import Store, open_store
from ..store.jobs import JobLimits
from ..store.passwords import remove_stale_temps_for
from ..store.state_dir import ServiceInfo, ensure_state_dir, service_info_from
from . import openapi
from .api_keys import ApiKeys
from .auth import Authenticator
from .cache import ResultCache
from .credentials import User
from .endpoints import EndpointService
from .executor import Executor
from .flight import FlightService
from .handlers import log_request
from .handlers.pages import status_page
from .health import Readiness, Verdict
from .jobs import JobConfig, JobService
from .metrics import Metrics
from .oauth import BearerVerifier, check_jwks_host
from .registry import EndpointRegistry
from .routes import ROUTES, UNMATCHED
from .sandbox import SandboxReport, start_pool
from .tls import check_tls_files, make_server_context
from .users import UserService, store_entries

log = logging.getLogger("tabserve")


class RequestTracker:
    """Requests being handled, so that shutdown can wait for them to finish."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False  # set at shutdown: readiness fails, connections are not kept
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if ``timeout`` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


@dataclass
class Services:
    """What handlers may use; built once in ``app.serve``."""

    settings: Settings
    executor: Executor
    endpoints: EndpointService
    service: ServiceInfo
    state_path: str
    auth: Authenticator
    requests: RequestTracker
    metrics: Metrics
    readiness: Readiness
    sandbox: SandboxReport
    jobs: JobService
    cache: ResultCache
    flight: FlightService | None = None  # when TABPY_ARROW_ENABLE is true
    users: UserService | None = None  # when TABSERVE_USERS is store: /users edits them

    async def close(self) -> None:
        """Stop what the services run beside the pool (the pool is closed by its owner)."""
        if self.flight is not None:
            await self.flight.close()  # after the drain: requests in flight may still need it
        await self.jobs.close()  # running jobs stay STARTED: the next start fails them
        self.auth.close()
        await self.endpoints.close()  # closes the store too


# Tornado's own cap on bodies; the real limit is TABPY_MAX_REQUEST_SIZE_MB, applied by the
# handlers so that they can answer 413 in TabPy's shape (see handlers.base.DRAIN_LIMIT).
_TRANSPORT_BODY_CAP = 1 << 40
# Bodies arrive in chunks of this size: 1 MiB instead of Tornado's 64 KiB makes a 40 MB Table
# Extension 40 handler callbacks instead of 640.
_BODY_CHUNK = 1 << 20


def make_app(services: Services) -> Application:
    """The Tornado application serving the route table (``routes.ROUTES``) for ``services``."""
    rules = [
        (route.pattern, route.handler, {"services": services, "route": route}) for route in ROUTES
    ]
    return Application(
        rules,  # type: ignore[arg-type]
        default_handler_class=UNMATCHED.handler,
        default_handler_args={"services": services, "route": UNMATCHED},
        log_function=log_request,
        compress_response=False,
        openapi=openapi.document(ROUTES),  # served by OpenApiHandler; built once
        status_page=status_page(),  # RootHandler's page and its CSP hashes, built once
    )


def banner(
    settings: Settings,
    port: int,
    sandbox: SandboxReport | None = None,
    flight: FlightService | None = None,
) -> str:
    scheme = "https" if settings.tls_enabled else "http"
    host = settings.bind_address
    shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
    if shown in ("0.0.0.0", "::", ""):
        shown = socket.gethostname()

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    text = (
        f"tabserve {__version__} listening on {scheme}://{shown}:{port}\n"
        f"  bind {host}:{port} | TLS {on(settings.tls_enabled)} | "
        f"auth {on(settings.auth_enabled)}{_methods(settings)} | "
        f"evaluate {on(settings.evaluate_enabled)} | "
        f"{settings.workers} workers | {store_shown(settings)}"
    )
    if sandbox is not None:
        text += f"\n  sandbox {sandbox.mode} | self-check {sandbox.info()['self_check']}"
        for problem in sandbox.problems:
            text += f"\n  sandbox problem: {problem}"
    if flight is not None:
        text += f"\n  arrow flight on port {flight.port} | advertised as {flight.location}"
    return text


def store_shown(settings: Settings) -> str:
    """The store as the banner and logs show it (never with its password)."""
    if settings.store:
        from ..store.database import redact

        return f"store {redact(settings.store)}"
    return f"state {settings.state_path}"


def open_configured_store(settings: Settings) -> Store:
    """Open the store, and migrate it or check its schema (blocking: run in a thread).

    Raises ``StoreError`` (wrong schema version) or ``StoreUnavailable`` (cannot connect):
    a replica with nothing to serve does not start.
    """
    if settings.store:
        settings.state_path.mkdir(parents=True, exist_ok=True)  # the archive cache only
    else:
        ensure_state_dir(settings.state_path)
    location = settings.store or settings.state_path
    store = open_store(location, cache=settings.state_path / "query_objects")
    try:
        if settings.store_migrate:
            store.migrate()
        else:
            database = getattr(store, "db", None) or store.sql.db  # type: ignore[attr-defined]
            database.require_current()
        if settings.store:
            # A new database gets the service info a new state.ini would have.
            store.put_service(
                {"Name": "tabserve", "Description": "", "Creation Time": str(int(time.time()))},
                only_missing=True,
            )
    except BaseException:
        store.close()
        raise
    log.info("store: %s", store.shown)
    return store


def _methods(settings: Settings) -> str:
    names = {"basic-auth": "basic", "oauth-jwt": "oauth"}
    methods = [names[method] for method in settings.auth_methods]
    return f" ({', '.join(methods)})" if methods else ""


def load_bearer(settings: Settings) -> BearerVerifier | None:
    """OAuth's token checker, when on; raises ``OAuthConfigError`` for a JWKS host that is
    not public (unless allowed) or does not resolve. Nothing is fetched yet."""
    if not settings.oauth_enabled:
        return None
    bearer = BearerVerifier.from_settings(settings)
    for warning in [check_jwks_host(bearer.config), *bearer.config.warnings()]:
        if warning:
            log.warning("OAuth: %s", warning)
    log.info(
        "OAuth bearer tokens on: issuer %s, keys from %s", settings.oauth_issuer,
        settings.oauth_jwks_uri,
    )  # fmt: skip
    return bearer


def load_authenticator(
    settings: Settings, realm: str, store: Store, bearer: BearerVerifier | None = None
) -> Authenticator:
    """Users from the store, or the password file (raises ``PasswordFileError``), and
    ``bearer`` for tokens; auth is off with none of them."""
    if settings.users == "store":
        auth = Authenticator.from_entries(
            store_entries(store), realm=realm, max_delay=settings.auth_max_delay
        )
        log.info(
            "Authentication on: %d user(s) in the store (followed as it changes)",
            auth.user_count,
        )
        auth.bearer = bearer
        return auth
    if settings.password_file:
        remove_stale_temps_for(settings.password_file)
    auth = Authenticator.from_file(
        settings.password_file, realm=realm, max_delay=settings.auth_max_delay
    )
    if auth.cache is not None:
        log.info(
            "Authentication on: %d user(s) in %s (re-read when it changes, or on SIGHUP)",
            auth.user_count,
            settings.password_file,
        )
    auth.bearer = bearer
    return auth


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None for http; raises ``TLSConfigError`` on a bad setup."""
    if not settings.tls_enabled:
        return None
    report = check_tls_files(settings.certificate_file, settings.key_file)
    for finding in report.warnings:
        log.warning("%s", finding.message)
    return make_server_context(
        settings.certificate_file,  # type: ignore[arg-type]  # checked just above
        settings.key_file,  # type: ignore[arg-type]
        settings.minimum_tls_version,
        log,
    )


def exposure_warning(settings: Settings) -> str | None:
    """The warning for a server other machines can reach without credentials, if it is one."""
    if settings.loopback_only or settings.auth_enabled:
        return None
    where = settings.bind_address or "every interface"
    return (
        f"SECURITY WARNING: listening on {where}, reachable from other machines, WITHOUT "
        f"authentication: anyone who can reach port {settings.port} can run code here "
        f"(/evaluate, or by deploying an endpoint). Set TABPY_PWD_FILE (see "
        f"docs/security.md) or TABSERVE_BIND_ADDRESS = 127.0.0.1."
    )


def readiness_checks(
    readiness: Readiness,
    executor: Executor,
    requests: RequestTracker,
    store: Store,
    sandbox: SandboxReport,
    shared: bool,
    auth: Authenticator | None = None,
) -> None:
    """The built-in checks; other services may add theirs. ``shared``: the store is a
    database shared by replicas (not the state directory)."""

    def store_check() -> Verdict:
        ok, detail = store.health()
        if ok or not shared:
            # The state directory: gone from underneath (a lost volume) means not ready.
            return ok, detail
        # PostgreSQL unreachable: every replica loses it at once, and each can still answer
        # what it has loaded; failing readiness would turn that into a full outage.
        return True, f"{detail}: serving what is loaded, changes refused"

    def workers() -> Verdict:
        alive, wanted = executor.alive, executor.config.workers
        return alive > 0, f"{alive} of {wanted} workers alive"

    def accepting() -> Verdict:
        if requests.draining:
            return False, "shutting down"
        return True, "accepting requests"

    readiness.add("store", store_check)
    readiness.add("workers", workers)
    readiness.add("sandbox", sandbox.readiness)  # the start-up self-check's verdict
    if auth is not None and auth.uses_password_file:
        readiness.add("passwords", auth.readiness)
    readiness.add("accepting", accepting)


async def build_services(
    settings: Settings,
    executor: Executor,
    sandbox: SandboxReport,
    bearer: BearerVerifier | None = None,
    job_slots: int | None = None,
) -> Services:
    """Everything the handlers use, around a started pool and its sandbox report.

    Opens the configured store (raising ``StoreUnavailable`` or ``StateError``), starts
    checking the deployed endpoints in the background, loads the users (raising
    ``PasswordFileError``; ``bearer`` checks tokens) and, with ``TABPY_ARROW_ENABLE``,
    starts the Arrow Flight service.
    ``Services.close`` stops all of it, the store included. ``job_slots``: how many
    asynchronous jobs this process may run at once (default: workers − 1, at least 1).
    """
    store = await asyncio.to_thread(open_configured_store, settings)
    try:
        endpoints = EndpointService(
            EndpointRegistry(store, settings.staging_path),
            executor,
            settings.evaluate_timeout,
            guard=sandbox.require_deployed,
        )
    except BaseException:
        store.close()
        raise
    auth: Authenticator | None = None
    flight: FlightService | None = None
    try:
        await endpoints.start()
        service = service_info_from(endpoints.registry.service)
        auth = await asyncio.to_thread(load_authenticator, settings, service.name, store, bearer)
        if settings.users == "store":
            endpoints.on_refresh.append(_follow_users(auth, store))
        if auth.enabled:
            auth.keys = _api_keys(auth, store, endpoints)
        requests = RequestTracker()
        readiness = Readiness()
        readiness_checks(readiness, executor, requests, store, sandbox, bool(settings.store), auth)
        if settings.arrow_enabled:
            flight = FlightService(settings, auth, executor)
            await flight.start()
            readiness.add("flight", flight.readiness)
        jobs = JobService(
            store,
            executor,
            endpoints,
            JobConfig(
                timeout=settings.job_timeout,
                cpu_seconds=settings.worker_cpu_seconds,
                result_ttl=settings.result_ttl,
                result_max_bytes=settings.result_max_mb * 1024 * 1024,
                limits=JobLimits(
                    pending=settings.job_max_pending,
                    pending_per_owner=settings.job_max_pending_per_user,
                    request_bytes=settings.job_max_request_mb * 1024 * 1024,
                ),
            ),
            evaluate_guard=sandbox.require_evaluate,
            query_refusal=_query_refusal(auth),
        )
        if job_slots is not None:
            jobs.slots = job_slots
        await jobs.start()
    except BaseException:
        if auth is not None:
            auth.close()
        await endpoints.close()  # closes the store too
        raise
    cache = ResultCache(settings.cache_max_mb * 1024 * 1024)
    return Services(
        settings=settings,
        executor=executor,
        endpoints=endpoints,
        service=service,
        state_path=os.path.realpath(settings.state_path),
        sandbox=sandbox,
        auth=auth,
        requests=requests,
        metrics=Metrics(executor, lambda: requests.count, cache, shared=settings.processes > 1),
        readiness=readiness,
        jobs=jobs,
        cache=cache,
        flight=flight,
        users=UserService(store, auth) if settings.users == "store" else None,
    )


def _query_refusal(auth: Authenticator) -> Callable[[], str]:
    """What ``tabpy.query()`` raises in a job whose caller's token lacked the query scope."""

    def refusal() -> str:
        scope = auth.bearer.config.scopes["query"] if auth.bearer is not None else "query"
        return f"tabpy.query() needs the '{scope}' scope, which the caller's token lacks"

    return refusal


def _nodelay_for_good(value: bool) -> None:
    """Stands in for ``IOStream.set_nodelay`` on our connections (see ``_HTTPServer``)."""


class _HTTPServer(HTTPServer):
    """Tornado's server, with Nagle's algorithm off once per connection.

    Tornado turns it off to send the end of each response and back on after it: two
    ``setsockopt`` calls per request. Our answers are written whole (one write for headers and
    body), so there is nothing for Nagle to merge; it stays off and those calls are skipped.
    """

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        stream.set_nodelay(True)
        stream.set_nodelay = _nodelay_for_good  # type: ignore[method-assign]
        super().handle_stream(stream, address)


def make_http_server(services: Services, ssl_options: ssl.SSLContext | None = None) -> HTTPServer:
    """The HTTP server for ``make_app(services)``, with the body handling handlers rely on."""
    settings = services.settings
    return _HTTPServer(
        make_app(services),
        # Tornado's defaults: an hour idle or for the headers, and no limit on the body.
        idle_connection_timeout=settings.idle_timeout,
        body_timeout=settings.body_timeout,
        max_body_size=_TRANSPORT_BODY_CAP,
        max_buffer_size=_TRANSPORT_BODY_CAP,
        decompress_request=False,  # workers inflate gzip bodies, with the size cap
        chunk_size=_BODY_CHUNK,
        ssl_options=ssl_options,
    )


async def serve(settings: Settings, out: TextIO = sys.stdout) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully and return.

    Shutdown: stop accepting connections, let in-flight requests finish for up to
    ``TABSERVE_SHUTDOWN_GRACE`` seconds (a second signal cuts that short), then stop the
    workers, killing any still running.
    """
    if settings.processes > 1:
        from .frontends import serve_master  # several front ends: this process supervises

        await serve_master(settings, out)
        return
    signals = _SignalWatch()
    # A JWKS host that must not be used stops the start before anything else starts.
    bearer = load_bearer(settings)
    _raise_open_files_limit()
    # Workers start first, before anything secret (passwords, the TLS key) is loaded into
    # this process; the sandbox self-check runs before any deployed code is loaded.
    executor, sandbox = await start_pool(settings)
    services: Services | None = None
    warm_keys: asyncio.Task[None] | None = None
    try:
        services = await build_services(settings, executor, sandbox, bearer)
        # SIGHUP re-reads the password file (and no longer kills the server, its default).
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, services.auth.reload)
        server = make_http_server(services, tls_context(settings))
        if services.auth.bearer is not None:
            # Fetched now, in the background, so the first token need not wait for it; a
            # failure is logged and retried when a token comes.
            warm_keys = asyncio.create_task(services.auth.bearer.keys.refresh())
        # What the start logged is written before the port opens: whoever connects (an
        # operator's script, TabPy's own tests) can read it in the log at once.
        for handler in logging.getLogger().handlers:
            handler.flush()
        sockets = bind_sockets(settings.port, settings.bind_address or None)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        warning = exposure_warning(settings)
        if warning:
            log.warning("%s", warning)
        print(banner(settings, port, sandbox, services.flight), file=out, flush=True)
        await signals.wait()
        server.stop()  # closes the listening sockets: new connections are refused
        services.requests.draining = True
        await _drain(services.requests, settings.shutdown_grace, signals)
        # Idle keep-alive connections would otherwise outlive the loop.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), 1.0)
    finally:
        if warm_keys is not None:
            warm_keys.cancel()
        if services is not None:
            await services.close()
        await executor.close()
        log.info("stopped")


def _api_keys(auth: Authenticator, store: Store, endpoints: EndpointService) -> ApiKeys:
    """API keys over ``store``: a user key's user is looked up in ``auth``'s users (the
    password file's or the store's) each time, so their current permissions apply."""
    cache = auth.cache

    def user_for(name: str) -> User | None:
        return None if cache is None else cache.user(name)

    async def endpoint_exists(name: str) -> bool:
        await endpoints.ensure_fresh()
        return name in endpoints.registry.all()

    return ApiKeys(store, user_for, endpoint_exists)


def _follow_users(auth: Authenticator, store: Store) -> Callable[[], None]:
    """After each reload from the store, reload its users too (in a thread)."""
    running: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            entries = await asyncio.to_thread(store_entries, store)
        except TabserveError as exc:  # unreachable: the users in memory stay in force
            log.warning("users not reloaded from the store: %s", exc)
            return
        auth.replace_users(entries)

    def schedule() -> None:
        task = asyncio.create_task(reload())
        running.add(task)
        task.add_done_callback(running.discard)

    return schedule


def _raise_open_files_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, where the soft one is
    lower (often 1024), so thousands of idle keep-alive connections do not refuse the next.
    Workers get their own limit (TABSERVE_WORKER_OPEN_FILES)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit from %d: %s", soft, exc)


async def _drain(requests: RequestTracker, grace: float, signals: _SignalWatch) -> None:
    if requests.count:
        log.info(
            "shutting down: waiting up to %g s for %d requests in flight", grace, requests.count
        )
    else:
        log.info("shutting down")
    idle = asyncio.create_task(requests.wait_idle(grace))
    again = asyncio.create_task(signals.wait())
    try:
        await asyncio.wait({idle, again}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        again.cancel()
    if not idle.done():
        idle.cancel()
        log.warning("second signal: not waiting for %d requests in flight", requests.count)
    elif not idle.result():
        log.warning("%d requests still in flight after %g s: stopping", requests.count, grace)


class _SignalWatch:
    """SIGTERM and SIGINT, as an awaitable; installed before workers start, so a signal
    during start-up is not lost."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._event.set)

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()
