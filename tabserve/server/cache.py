"""The result cache: answers of calls that say how old a result they accept (``max_age``).

A call without ``max_age`` (and no default for its endpoint, or for /evaluate) never comes
here: TabPy's behaviour, byte for byte. A call with one is keyed by what its answer depends
on: the endpoint's name and **version** (a redeploy is a new key, never a stale hit) or the
exact script, a canonical hash of the input (the body's JSON with sorted keys, ``max_age``
left out), and the caller's scope (permissions, and for scripts whether ``tabpy.query()`` is
allowed), so a cached answer is never a way around authorization.

Lookups are in memory, on the event loop: a hit costs a dictionary lookup and a hash of the
body (about what /info costs) and touches neither the store nor a worker. The cache is an
LRU bounded by bytes; identical calls running at the same time are merged into one
execution, whose answer they all get.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import BadRequest
from ..store.records import JobRecord
from .executor import JobResult

# Bodies larger than this are parsed in a thread, off the event loop; larger than
# HASH_INLINE, even their raw hash is computed there.
INLINE_BODY = 64 * 1024
HASH_INLINE = 1024 * 1024
FACTS_KEPT = 4096  # raw body hashes remembered with what inspecting them found
SCAN_WINDOW = 64 * 1024  # where a body's own max_age is looked for, at each end
_MARKER = b'"max_age"'


def check_max_age(value: Any, where: str) -> int:
    """``value`` as a ``max_age``: a non-negative whole number of seconds, or 400."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(
            "max_age must be a non-negative integer",
            f"{where} gave {value!r}; it is the age in seconds of a cached result the call "
            "accepts (0: always run)",
        )
    return value


@dataclass(frozen=True)
class BodyFacts:
    """What the cache needs from a request body: its ``max_age`` (None: it gives none) and
    the hash of its input, canonical when the body is plain JSON."""

    max_age: int | None
    digest: str


def mentions_max_age(parts: Sequence[bytes]) -> bool:
    """A cheap first look (no parse): only a body that contains ``"max_age"`` can give one.

    ``parts`` are the body's chunks, as received. Only the first and last ``SCAN_WINDOW``
    bytes are looked at: a top-level key sits before or after ``data``, the one large value,
    and scanning a 40 MB body would hold the event loop for tens of milliseconds (the search
    holds the GIL, so a thread would not help)."""
    if sum(map(len, parts)) <= 2 * SCAN_WINDOW:
        return _MARKER in b"".join(parts)  # one part (a small call): no copy
    return _MARKER in _end(parts, SCAN_WINDOW) or _MARKER in _end(parts[::-1], -SCAN_WINDOW)


def _end(parts: Sequence[bytes], size: int) -> bytes:
    """The first ``size`` bytes of the joined parts, or the last ``-size`` when ``parts``
    are given last first."""
    taken: list[bytes] = []
    count = 0
    for part in parts:
        taken.append(part)
        count += len(part)
        if count >= abs(size):
            break
    if size < 0:
        return b"".join(reversed(taken))[size:]
    return b"".join(taken)[:size]


def inspect_body(body: bytes, encoding: str) -> BodyFacts:
    """Parse ``body`` for its ``max_age`` and canonical hash (blocking for large bodies:
    call it in a thread). A body that is not a JSON object is hashed as it is; the worker
    will answer its error."""
    if encoding:  # compressed: hashed as sent (Tableau sends the same bytes each time)
        return BodyFacts(None, hashlib.sha256(body).hexdigest())
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return BodyFacts(None, hashlib.sha256(body).hexdigest())
    if not isinstance(document, dict):
        return BodyFacts(None, hashlib.sha256(body).hexdigest())
    max_age = None
    if "max_age" in document:
        max_age = check_max_age(document.pop("max_age"), "the body's max_age")
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    return BodyFacts(max_age, hashlib.sha256(canonical).hexdigest())


def _sha256(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def cache_key(scope: str, target: str, digest: str) -> str:
    return hashlib.sha256(f"{scope}\0{target}\0{digest}".encode()).hexdigest()


class Call:
    """One /evaluate or /query call, as the cache decides it: what it runs and who asks.

    Built once per request on the hot path: a plain class with slots, since a frozen
    dataclass's ``__init__`` assigns each field through ``object.__setattr__``. Treat it as
    read-only all the same.
    """

    __slots__ = (
        "scope",
        "target",
        "parts",
        "encoding",
        "header_max_age",
        "default_max_age",
        "asynchronous",
        "run",
        "submit",
    )

    def __init__(
        self,
        scope: str,
        target: str,
        parts: Sequence[bytes],
        encoding: str,
        header_max_age: int | None,
        default_max_age: int | None,
        asynchronous: bool,
        run: Callable[[], Awaitable[JobResult]],
        submit: Callable[[], Awaitable[JobRecord]],
    ) -> None:
        self.scope = scope  # who may share its cached answer (permissions, endpoint restriction)
        self.target = target  # what it runs: the script kind, or the endpoint's name and version
        self.parts = parts  # the body, as the chunks it arrived in (joined only if parsed)
        self.encoding = encoding  # Content-Encoding
        self.header_max_age = header_max_age  # Cache-Control: max-age
        self.default_max_age = default_max_age  # the endpoint's, or TABSERVE_EVALUATE_MAX_AGE
        self.asynchronous = asynchronous  # Prefer: respond-async
        self.run = run
        self.submit = submit

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


@dataclass(frozen=True)
class Answer:
    """The outcome of a call: a result (with its age in seconds when it came from the
    cache), or the asynchronous job it became."""

    result: JobResult | None = None
    age: float | None = None
    job: JobRecord | None = None


@dataclass
class CachedResult:
    result: JobResult
    retrieved_at: float  # wall-clock time the answer was computed
    size: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    merges: int = 0
    evictions: int = 0


class ResultCache:
    """An LRU of successful answers, bounded by ``max_bytes`` (0: nothing is kept)."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.stats = CacheStats()
        self.size = 0
        self._entries: OrderedDict[str, CachedResult] = OrderedDict()
        self._running: dict[str, asyncio.Future[JobResult]] = {}
        # Bodies already inspected, by a hash of their raw bytes: a repeated call (Tableau
        # re-rendering a dashboard) costs one sha256 of its body, not a parse.
        self._facts: OrderedDict[tuple[bytes, str], BodyFacts] = OrderedDict()

    async def inspect(self, body: bytes, encoding: str) -> BodyFacts:
        """``inspect_body``, remembered by the body's raw hash; large bodies in a thread."""
        large = len(body) > HASH_INLINE
        raw = (await asyncio.to_thread(_sha256, body)) if large else _sha256(body)
        memo = (raw, encoding)
        facts = self._facts.get(memo)
        if facts is not None:
            self._facts.move_to_end(memo)
            return facts
        if len(body) > INLINE_BODY:
            facts = await asyncio.to_thread(inspect_body, body, encoding)
        else:
            facts = inspect_body(body, encoding)
        self._facts[memo] = facts
        if len(self._facts) > FACTS_KEPT:
            self._facts.popitem(last=False)
        return facts

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, max_age: int) -> CachedResult | None:
        """A result retrieved within ``max_age`` seconds (counted as a hit), or None."""
        entry = self._entries.get(key)
        if entry is None or max_age <= 0 or self.clock() - entry.retrieved_at > max_age:
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def store(self, key: str, result: JobResult) -> None:
        size = len(result.body) + len(key)
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= old.size
        if size > self.max_bytes:
            return
        self._entries[key] = CachedResult(result, self.clock(), size)
        self.size += size
        while self.size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.size -= evicted.size
            self.stats.evictions += 1

    async def run(
        self, key: str, max_age: int, call: Callable[[], Awaitable[JobResult]]
    ) -> tuple[JobResult, float | None]:
        """The answer for ``key``: cached (with its age in seconds), the one of an identical
        call already running (merged), or ``call()``'s, which is then cached if it
        succeeded. ``max_age`` 0 always runs (and refreshes the cache)."""
        entry = self.lookup(key, max_age)
        if entry is not None:
            return entry.result, max(0.0, self.clock() - entry.retrieved_at)
        self.stats.misses += 1
        running = self._running.get(key)
        if running is not None and max_age > 0:
            self.stats.merges += 1
            return await asyncio.shield(running), None
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await call()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when none waited
            raise
        finally:
            if self._running.get(key) is future:
                del self._running[key]
        future.set_result(result)
        self.store(key, result)
        return result, None

    async def answer(self, call: Call) -> Answer:
        """Run ``call`` at once, from the cache, or as an asynchronous job.

        Without any ``max_age`` (the body's, the header's, or a default) the call runs
        exactly as in TabPy, and its body is not even parsed. An asynchronous call is answered
        from the cache when it may be (no job then), and otherwise becomes a job; a job's
        result does not fill the cache.
        """
        max_age, facts = await self._max_age(call)
        if max_age is None or facts is None or self.max_bytes <= 0:
            if call.asynchronous:
                return Answer(job=await call.submit())
            return Answer(result=await call.run())
        key = cache_key(call.scope, call.target, facts.digest)
        if call.asynchronous:
            entry = self.lookup(key, max_age)
            if entry is None:
                self.stats.misses += 1
                return Answer(job=await call.submit())
            return Answer(result=entry.result, age=self.clock() - entry.retrieved_at)
        result, age = await self.run(key, max_age, call.run)
        return Answer(result=result, age=age)

    async def _max_age(self, call: Call) -> tuple[int | None, BodyFacts | None]:
        """The call's ``max_age`` (the body's first, then the header's, then the default)
        and its body's facts; (None, None) without a parse when nothing can give one."""
        header, default = call.header_max_age, call.default_max_age
        if header is None and default is None and not mentions_max_age(call.parts):
            return None, None
        facts = await self.inspect(call.body, call.encoding)
        for value in (facts.max_age, header, default):
            if value is not None:
                return value, facts
        return None, facts
