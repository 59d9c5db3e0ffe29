"""Prometheus metrics, kept in the server's front-end process(es) only.

Workers never count anything themselves: each job's answer carries what the worker measured
(pid, queue and execution time, rows), and the server records it here. The numbers are
therefore correct however many workers there are, and survive a worker being replaced.

Each ``Metrics`` has its own ``CollectorRegistry`` (not prometheus_client's global one), so
several apps in one process, as in tests, never share counters. Pool counters and gauges are
read from the executor when scraped, so the executor needs no metrics code of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .cache import ResultCache
    from .executor import Executor

# Up to the longest timeouts people configure: a histogram that stops at 10 s would put every
# slow model into +Inf.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# The classic text format, which every Prometheus version (and most other scrapers) reads;
# all tabserve names are plain ASCII, so nothing needs the newer format's escaping.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class _PoolCollector(Collector):
    """Reads the worker pool's state and counters at scrape time."""

    def __init__(
        self,
        executor: Executor,
        in_flight: Callable[[], int] | None,
        cache: ResultCache | None = None,
    ) -> None:
        self.executor = executor
        self.in_flight = in_flight  # None: counted elsewhere (several front ends)
        self.cache = cache  # likewise

    def collect(self) -> Iterator[Metric]:
        pool = self.executor
        stats = pool.stats
        if self.in_flight is not None:
            yield GaugeMetricFamily(
                "tabserve_requests_in_flight", "HTTP requests being handled.", self.in_flight()
            )
        gauges = (
            ("tabserve_queue_depth", "Jobs waiting for a free worker.", pool.queued),
            ("tabserve_workers", "Worker processes alive.", pool.alive),
            ("tabserve_workers_busy", "Worker processes running a job.", pool.busy),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        counters = (
            ("tabserve_worker_restarts", "Replacement workers started.", stats.restarts),
            ("tabserve_timeouts", "Jobs that ran out of time (408).", stats.timeouts),
            (
                "tabserve_worker_kills",
                "Workers killed by the server: timeouts and crashed workers replaced.",
                stats.kills,
            ),
            ("tabserve_worker_crashes", "Workers that died on their own.", stats.crashes),
            ("tabserve_rejected", "Jobs refused because the queue was full (503).", stats.rejected),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
        if self.cache is not None:
            cache = self.cache.stats
            for name, text, value in (
                ("tabserve_cache_hits", "Calls answered from the result cache.", cache.hits),
                (
                    "tabserve_cache_misses",
                    "Calls with a max_age that the cache could not answer.",
                    cache.misses,
                ),  # fmt: skip
                (
                    "tabserve_cache_merges",
                    "Calls merged into an identical one running.",
                    cache.merges,
                ),  # fmt: skip
                (
                    "tabserve_cache_evictions",
                    "Results evicted to keep the cache in its bound.",
                    cache.evictions,
                ),  # fmt: skip
            ):
                yield CounterMetricFamily(name, text, value=value)
            yield GaugeMetricFamily(
                "tabserve_cache_bytes", "Bytes of results in the cache.", value=self.cache.size
            )


_CACHE_COUNTERS = (
    ("hits", "tabserve_cache_hits", "Calls answered from the result cache."),
    ("misses", "tabserve_cache_misses", "Calls with a max_age that the cache could not answer."),
    ("merges", "tabserve_cache_merges", "Calls merged into an identical one running."),
    ("evictions", "tabserve_cache_evictions", "Results evicted to keep the cache in its bound."),
)


class Metrics:
    """Every tabserve metric; ``observe`` once per finished request, ``exposition`` to scrape.

    ``shared``: one of several front-end processes (``TABSERVE_PROCESSES``). prometheus_client
    then runs in multiprocess mode (the master sets ``PROMETHEUS_MULTIPROC_DIR`` before a
    front end imports it): each process writes its counters and histograms to files, and a
    scrape of any process adds up every process's. In-flight requests, the cache's counters
    and size are copied into such metrics by ``sync`` (at each scrape, and every half second
    by the front end), so they add up too; the pool's numbers are the master's.
    """

    def __init__(
        self,
        executor: Executor,
        in_flight: Callable[[], int],
        cache: ResultCache | None = None,
        shared: bool = False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Shared: what this process counts goes to its files; the scrape reads everyone's.
        registry = CollectorRegistry() if shared else self.registry
        self.shared = shared
        self._in_flight = in_flight
        self._cache = cache
        self.requests = Counter(
            "tabserve_requests_total",
            "HTTP requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "tabserve_request_duration_seconds",
            "Time from request headers to the response, by route pattern.",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.endpoint_duration = Histogram(
            "tabserve_endpoint_duration_seconds",
            "Time to answer a /query call, by deployed endpoint name.",
            ["endpoint"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.rows_in = Counter(
            "tabserve_rows_in_total", "Data rows received by scripts and endpoints.",
            registry=registry,
        )  # fmt: skip
        self.rows_out = Counter(
            "tabserve_rows_out_total", "Result rows sent back by scripts and endpoints.",
            registry=registry,
        )  # fmt: skip
        self.bytes_in = Counter(
            "tabserve_request_bytes_total", "Request body bytes received (as sent, compressed "
            "or not).", registry=registry,
        )  # fmt: skip
        self.bytes_out = Counter(
            "tabserve_response_bytes_total", "Response body bytes sent.", registry=registry
        )
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[str, Any] = {}
        self._per_endpoint: dict[str, Any] = {}
        if shared:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            self.registry.register(_PoolCollector(executor, None, None))
            self._in_flight_gauge = Gauge(
                "tabserve_requests_in_flight", "HTTP requests being handled.",
                registry=registry, multiprocess_mode="livesum",
            )  # fmt: skip
            self._copied: dict[str, tuple[Any, int]] = {}
            if cache is not None:
                for field, name, text in _CACHE_COUNTERS:
                    self._copied[field] = (Counter(name, text, registry=registry), 0)
                self._cache_bytes = Gauge(
                    "tabserve_cache_bytes", "Bytes of results in the cache.",
                    registry=registry, multiprocess_mode="livesum",
                )  # fmt: skip
        else:
            registry.register(_PoolCollector(executor, in_flight, cache))
        # This process's start (dashboards and the status page compute uptime from
        # process_start_time_seconds), CPU, memory and open files; from /proc, so Linux only.
        ProcessCollector(registry=self.registry)

    def observe(
        self,
        route: str,
        method: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        meta: Mapping[str, Any],
        endpoint: str | None = None,
    ) -> None:
        if method not in _KNOWN_METHODS:
            method = "other"  # answered 405 before authentication: any client can make these up
        # The labelled children, looked up once per label set: ``labels()`` takes a lock and
        # validates the labels on every call, once per request on the event loop. Every label
        # is bounded (routes, known methods, statuses, deployed names), so are these dicts.
        counted = self._counted.get((route, method, status))
        if counted is None:
            counted = self.requests.labels(route, method, str(status))
            self._counted[(route, method, status)] = counted
        counted.inc()
        timed = self._timed.get(route)
        if timed is None:
            timed = self._timed[route] = self.request_duration.labels(route)
        timed.observe(seconds)
        if endpoint is not None:
            per_endpoint = self._per_endpoint.get(endpoint)
            if per_endpoint is None:
                per_endpoint = self.endpoint_duration.labels(endpoint)
                self._per_endpoint[endpoint] = per_endpoint
            per_endpoint.observe(seconds)
        rows_in = meta.get("rows_in")
        if rows_in:
            self.rows_in.inc(rows_in)
        rows_out = meta.get("rows_out")
        if rows_out:
            self.rows_out.inc(rows_out)
        if bytes_in:
            self.bytes_in.inc(bytes_in)
        if bytes_out:
            self.bytes_out.inc(bytes_out)

    def sync(self) -> None:
        """Shared: copy this process's in-flight count and cache numbers into the files."""
        if not self.shared:
            return
        self._in_flight_gauge.set(self._in_flight())
        if self._cache is not None:
            stats = self._cache.stats
            for field, (counter, copied) in self._copied.items():
                now = getattr(stats, field)
                if now > copied:
                    counter.inc(now - copied)
                    self._copied[field] = (counter, now)
            self._cache_bytes.set(self._cache.size)

    def exposition(self) -> bytes:
        """The Prometheus text format, served with ``CONTENT_TYPE``."""
        self.sync()
        return generate_latest(self.registry)


def process_gone(pid: int, directory: str) -> None:
    """A front end ``pid`` exited: its live gauges stop counting (its counters still do)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)
