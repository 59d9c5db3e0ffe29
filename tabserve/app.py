"""Wiring: build the services and the Tornado application, listen, and shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TextIO

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from . import __version__
from .config import Settings
from .endpoints import EndpointService
from .executor import Executor, PoolConfig
from .handlers import (
    AssetHandler,
    EndpointHandler,
    EndpointsHandler,
    EvaluateHandler,
    InfoHandler,
    NotFoundHandler,
    OpenApiHandler,
    QueryHandler,
    RootHandler,
    Services,
    StatusHandler,
    UploadDestinationHandler,
    log_request,
)
from .registry import EndpointRegistry
from .store import ensure_state_dir, read_state, service_info

log = logging.getLogger("tabserve")

# Tornado's own cap on bodies; the real limit is TABPY_MAX_REQUEST_SIZE_MB, applied by the
# handlers so that they can answer 413 in TabPy's shape (see handlers.DRAIN_LIMIT).
_TRANSPORT_BODY_CAP = 1 << 40


def make_app(services: Services) -> Application:
    deps = {"services": services}
    static = services.settings.static_path
    page = (static / "index.html") if static else Path(__file__).parent / "static" / "index.html"
    routes = [
        (r"/", RootHandler, {**deps, "page": page}),
        (r"/assets/([^/]+)", AssetHandler, deps),
        (r"/openapi.json", OpenApiHandler, deps),
        (r"/info", InfoHandler, deps),
        (r"/evaluate", EvaluateHandler, deps),
        (r"/status", StatusHandler, deps),
        (r"/endpoints/?", EndpointsHandler, deps),
        (r"/endpoints/([^/]+)", EndpointHandler, deps),
        (r"/query/([^/]+)", QueryHandler, deps),
        (r"/configurations/endpoint_upload_destination", UploadDestinationHandler, deps),
    ]
    return Application(
        routes,  # type: ignore[arg-type]
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        compress_response=False,
    )


def pool_config(settings: Settings) -> PoolConfig:
    return PoolConfig(
        workers=settings.workers,
        request_limit=settings.max_request_bytes,
        memory_mb=settings.worker_memory_mb,
        queue_length=settings.queue_length,
        env_allow=settings.worker_env,
        gzip_enabled=settings.gzip_enabled,
        log_level=settings.log_level,
    )


def banner(settings: Settings, port: int) -> str:
    scheme = "https" if settings.tls_enabled else "http"
    host = settings.bind_address
    shown = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
    if shown in ("0.0.0.0", "::", ""):
        shown = socket.gethostname()

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    return (
        f"tabserve {__version__} listening on {scheme}://{shown}:{port}\n"
        f"  bind {host}:{port} | TLS {on(settings.tls_enabled)} | "
        f"auth {on(settings.auth_enabled)} | evaluate {on(settings.evaluate_enabled)} | "
        f"{settings.workers} workers | state {settings.state_path}"
    )


async def serve(settings: Settings, out: TextIO = sys.stdout) -> None:
    """Run the server until SIGTERM or SIGINT, then stop workers and return."""
    # Workers start first, before anything secret is loaded into this process.
    executor = Executor(pool_config(settings))
    await executor.start()
    endpoints: EndpointService | None = None
    try:
        state_file = ensure_state_dir(settings.state_path)
        endpoints = EndpointService(
            EndpointRegistry(settings.state_path), executor, settings.evaluate_timeout
        )
        await endpoints.start()
        services = Services(
            settings=settings,
            executor=executor,
            endpoints=endpoints,
            service=service_info(read_state(state_file)),
            state_path=os.path.realpath(settings.state_path),
        )
        server = HTTPServer(
            make_app(services),
            max_body_size=_TRANSPORT_BODY_CAP,
            max_buffer_size=_TRANSPORT_BODY_CAP,
            decompress_request=False,  # workers inflate gzip bodies, with the size cap
        )
        sockets = bind_sockets(settings.port, settings.bind_address or None)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        print(banner(settings, port), file=out, flush=True)
        await _wait_for_signal()
        log.info("shutting down")
        server.stop()
    finally:
        if endpoints is not None:
            await endpoints.close()
        await executor.close()


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
