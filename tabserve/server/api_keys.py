"""API keys, front-end side: checking a key a request sends, and managing keys.

Keys live in the store (``store.api_keys`` is their format and hash). Checking one costs no
database read most of the time: a key that checked out is remembered for
:data:`RECHECK_SECONDS`, then read again. That bound is what makes a revocation reach every
replica in time (within a second, whichever replica or ``tabserve key revoke`` wrote it),
without a notification: a replica re-reads at most one row per active key that often.

``last_used`` is written when a key is read and the stored time is older than
:data:`TOUCH_SECONDS` (or unset), so busy keys cost one small write a minute, not one a
request; in the background, since a write may wait for the store's write lock.

Every store call blocks and runs in a thread; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import BadRequest, Forbidden, NotFound, StoreUnavailable
from ..store.api_keys import is_key_id, key_hash, key_id, new_key
from ..store.backends import ApiKeyRecord, Store
from .credentials import User

log = logging.getLogger("tabserve.auth")

# How old a key's row may be when a request is let through. Half the promised second: the
# other half is the margin for the re-read itself on a busy replica.
RECHECK_SECONDS = 0.5
TOUCH_SECONDS = 60.0
_MAX_REMEMBERED = 10_000


@dataclass(frozen=True)
class _Remembered:
    record: ApiKeyRecord
    until: float  # monotonic


class ApiKeys:
    """Checks keys against the store (with the short memory above) and manages them.

    ``user_for`` answers who a user key's user is now (their permissions included), or None
    when there is no such user any more; ``endpoint_exists`` whether an endpoint is deployed.
    """

    def __init__(
        self,
        store: Store,
        user_for: Callable[[str], User | None],
        endpoint_exists: Callable[[str], Awaitable[bool]],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.user_for = user_for
        self.endpoint_exists = endpoint_exists
        self._clock = clock
        self._wall = wall
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()
        # Concurrent first uses of one key share one read.
        self._reading: dict[str, asyncio.Future[ApiKeyRecord | None]] = {}
        self._touching: set[str] = set()  # keys whose last use is being written
        self._tasks: set[asyncio.Future[None]] = set()  # held: the loop keeps only weak refs

    # -- checking ----------------------------------------------------------------------------

    async def check(self, key: str) -> tuple[User | None, str]:
        """The principal ``key`` authenticates, or None and a loggable reason (no secret).

        Raises ``MalformedKey`` for text that is not a key, ``StoreUnavailable`` when the
        store cannot be read and the key is not remembered (never let through unchecked).
        """
        ident = key_id(key)
        digest = key_hash(key)
        now = self._clock()
        remembered = self._remembered.get(digest)
        if remembered is not None and now < remembered.until:
            record: ApiKeyRecord | None = remembered.record
        else:
            record = await self._read(ident)
            if record is not None and hmac.compare_digest(record.secret_hash, digest):
                self._remember(digest, record, now)
        if record is None or not hmac.compare_digest(record.secret_hash, digest):
            return None, f"unknown API key {ident}"
        if not record.usable(self._wall()):
            return None, f"API key {ident} is {'revoked' if record.revoked else 'expired'}"
        if record.endpoint is not None:
            # Acts as no user: its name (with a ':', which no user name can hold) marks it
            # in logs and as the owner of what it creates.
            principal = User(
                f"key:{record.id}", frozenset({"query"}), key_id=record.id,
                endpoint=record.endpoint,
            )  # fmt: skip
            return principal, "ok"
        user = self.user_for(record.user_name)
        if user is None:
            return None, f"API key {ident}: its user {record.user_name!r} no longer exists"
        return User(user.name, user.permissions, key_id=record.id), "ok"

    async def _read(self, ident: str) -> ApiKeyRecord | None:
        pending = self._reading.get(ident)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.ensure_future(asyncio.to_thread(self.store.api_key, ident))
        self._reading[ident] = future
        future.add_done_callback(lambda _: self._reading.pop(ident, None))
        record = await asyncio.shield(future)
        now = self._wall()
        if (
            record is not None
            and record.usable(now)
            and (record.last_used is None or now - record.last_used >= TOUCH_SECONDS)
            and ident not in self._touching
        ):
            # In the background: a write may wait for the store's write lock (a deploy, a
            # CLI), and the request must not.
            self._touching.add(ident)
            task = asyncio.ensure_future(asyncio.to_thread(self._touch, ident, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: self._touching.discard(ident))
        return record

    def _touch(self, ident: str, now: float) -> None:
        try:
            self.store.touch_api_key(ident, now)
        except StoreUnavailable as exc:  # only a record lost: the key is still good
            log.warning("API key %s: last use not recorded: %s", ident, exc.info)

    def _remember(self, digest: str, record: ApiKeyRecord, now: float) -> None:
        self._remembered[digest] = _Remembered(record, now + RECHECK_SECONDS)
        self._remembered.move_to_end(digest)
        while len(self._remembered) > _MAX_REMEMBERED:
            self._remembered.popitem(last=False)

    def forget(self, ident: str) -> None:
        """Drop what is remembered of a key (this replica revoked it: refuse it at once)."""
        for digest, remembered in list(self._remembered.items()):
            if remembered.record.id == ident:
                del self._remembered[digest]

    # -- managing ----------------------------------------------------------------------------

    async def create(
        self, caller: User, *, user: str | None, endpoint: str | None
    ) -> tuple[ApiKeyRecord, str]:
        """A new key and the key itself (shown once). Exactly one of ``user``, ``endpoint``.

        A user key for someone else needs every permission that user holds: a key is never
        a way to more rights than the caller's.
        """
        if (user is None) == (endpoint is None):
            raise BadRequest("Give exactly one of 'user' or 'endpoint'")
        if user is not None:
            owner = self.user_for(user)
            if owner is None:
                raise NotFound("Unknown user", f"No user is called '{user}'")
            missing = sorted(owner.permissions - caller.permissions)
            if owner.name != caller.name and missing:
                raise Forbidden(
                    "Not allowed to create this key",
                    f"A key for '{owner.name}' would grant {', '.join(missing)}, which the "
                    "caller lacks.",
                )
            name, target = owner.name, None
        else:
            assert endpoint is not None
            if not await self.endpoint_exists(endpoint):
                raise NotFound("UnknownURI", f"Endpoint '{endpoint}' does not exist")
            name, target = "", endpoint
        ident, key = new_key()
        record = ApiKeyRecord(ident, key_hash(key), name, target, self._wall())
        await asyncio.to_thread(self.store.add_api_key, record)
        log.info(
            "API key %s created by %r: %s", ident, caller.name,
            f"user key for {name!r}" if target is None else f"endpoint key for {target!r}",
        )  # fmt: skip
        return record, key

    async def records(self) -> list[ApiKeyRecord]:
        return await asyncio.to_thread(self.store.api_keys)

    async def get(self, ident: str) -> ApiKeyRecord:
        record = await asyncio.to_thread(self.store.api_key, ident) if is_key_id(ident) else None
        if record is None:
            raise _unknown(ident)
        return record

    async def revoke(self, caller: User, ident: str) -> ApiKeyRecord:
        if not is_key_id(ident):
            raise _unknown(ident)
        try:
            record = await asyncio.to_thread(self.store.revoke_api_key, ident, self._wall())
        except KeyError:
            raise _unknown(ident) from None
        self.forget(ident)
        log.info("API key %s revoked by %r", ident, caller.name)
        return record


def _unknown(ident: str) -> NotFound:
    shown = ident if len(ident) <= 32 else ident[:32] + "..."
    return NotFound("Unknown API key", f"No API key has the id {shown!r}")
