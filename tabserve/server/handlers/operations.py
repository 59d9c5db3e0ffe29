"""Operations routes: health probes and Prometheus metrics."""

from __future__ import annotations

from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .base import BaseHandler


class OperationsHandler(BaseHandler):
    """Base of the routes for machines (probes, scrapers): never cached."""

    def compute_etag(self) -> None:
        return None  # a live answer every time, never a 304


class LiveHandler(OperationsHandler):
    async def get(self) -> None:
        """Liveness: the process is up and its event loop answers."""
        self.write_json({"status": "alive"})


class ReadyHandler(OperationsHandler):
    async def get(self) -> None:
        """Readiness: 200 when every check passes, else 503; the body says which failed."""
        ready, outcomes = await self.services.readiness.run()
        self.write_json(
            {
                "status": "ready" if ready else "not ready",
                "checks": [outcome.document() for outcome in outcomes],
            },
            status=200 if ready else 503,
        )


class MetricsHandler(OperationsHandler):
    async def get(self) -> None:
        """Prometheus text format, for the whole server: every worker's jobs are counted here."""
        self.set_header("Content-Type", METRICS_CONTENT_TYPE)
        self.finish(self.services.metrics.exposition())
