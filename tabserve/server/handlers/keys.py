"""``/keys``: API keys, for ``manage`` users. The key itself is in the creation's answer only."""

from __future__ import annotations

from typing import Any

from ...errors import BadRequest, NotFound
from .. import paging
from ..api_keys import ApiKeys
from .base import BaseHandler

# What ``GET /keys`` may filter and sort on (``server.paging``); times are epoch seconds.
KEY_FIELDS: dict[str, type] = {
    "id": str,
    "kind": str,
    "user": str,
    "endpoint": str,
    "created": float,
    "expires": float,
    "revoked": float,
    "last_used": float,
}


class _KeysBase(BaseHandler):
    def keys(self) -> ApiKeys:
        keys = self.services.auth.keys
        if keys is None:  # authentication is off: keys could not be used, so none are shown
            raise NotFound("Not found", "API keys need authentication to be on")
        return keys


class KeysHandler(_KeysBase):
    async def get(self) -> None:
        """Every key (revoked ones too), without secrets; with paging parameters, one page
        of them and the pagination."""
        records = await self.keys().records()
        keys = [record.public() for record in records]
        query = self.list_query()
        if not paging.asked(query):
            self.write_json({"keys": keys})
            return
        page, pagination = paging.paginate(keys, query, KEY_FIELDS)
        self.write_json({"keys": page, "pagination": pagination.as_json()})

    async def post(self) -> None:
        """Create a key: ``{"user": NAME}`` or ``{"endpoint": NAME}``."""
        keys = self.keys()
        body = await self.json_body()
        unknown = sorted(set(body) - {"user", "endpoint"})
        if unknown:
            raise BadRequest("Unknown fields", f"Not understood: {', '.join(unknown)}")
        record, key = await keys.create(
            self.user, user=_name(body, "user"), endpoint=_name(body, "endpoint")
        )
        self.set_header("Location", f"/keys/{record.id}")
        self.write_json({"key": {**record.public(), "secret": key}}, status=201)


class KeyHandler(_KeysBase):
    async def get(self, key_id: str) -> None:
        record = await self.keys().get(key_id)
        self.write_json({"key": record.public()})

    async def delete(self, key_id: str) -> None:
        """Revoke: refused on every replica within a second; kept in the list as revoked."""
        record = await self.keys().revoke(self.user, key_id)
        self.write_json({"key": record.public()})


def _name(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{field}' must be a non-empty string")
    return value
