"""The store's users over HTTP (``/users``): list, add, update, delete.

Only when ``TABSERVE_USERS = store``: a password file stays the operator's to edit with
``tabserve user``, and a server without users in its store has no ``/users`` to offer. A change
goes to the store in one transaction, then reloads the users this process authenticates with
at once (other replicas follow the store's change notification, as for ``tabserve user``).

Knows nothing of HTTP: failures are ``TabserveError``s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ..errors import BadRequest, NotFound
from ..store.backends import Store, UserRecord
from ..store.passwords import (
    PERMISSION_ORDER,
    PasswordEntry,
    hash_password,
    parse_permissions,
    validate_username,
)
from .auth import Authenticator


def store_entries(store: Store) -> dict[str, PasswordEntry]:
    """The store's users as password-file entries (blocking)."""
    return {
        name: PasswordEntry(name, user.password_hash, user.permissions)
        for name, user in store.users().items()
    }


def _described(record: UserRecord) -> dict[str, Any]:
    # Never the hash: a listing is for managing accounts, not for offline guessing.
    chosen = record.permissions
    permissions = list(PERMISSION_ORDER) if chosen is None else [
        name for name in PERMISSION_ORDER if name in chosen
    ]  # fmt: skip
    return {"name": record.name, "permissions": ",".join(permissions)}


def _permissions(value: Any) -> frozenset[str] | None:
    """``"evaluate,query"``, a list of names, or ``"all"``/None for every permission."""
    if value is None or value == "all":
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise BadRequest("permissions must be a list of names or a comma-separated string")
    try:
        return parse_permissions(value)
    except ValueError as exc:
        raise BadRequest(f"permissions: {exc}") from None


def _password(body: Mapping[str, Any], required: bool) -> str | None:
    password = body.get("password")
    if password is None and not required:
        return None
    if not isinstance(password, str) or not password:
        raise BadRequest("password must be a non-empty string")
    return password


class UserService:
    """Users kept in the store, edited on behalf of ``manage`` callers."""

    def __init__(self, store: Store, auth: Authenticator) -> None:
        self.store = store
        self.auth = auth

    async def list(self) -> list[dict[str, Any]]:
        """Every user, by name, without their hashes."""
        users = await asyncio.to_thread(self.store.users)
        return [_described(users[name]) for name in sorted(users)]

    async def get(self, name: str) -> dict[str, Any]:
        users = await asyncio.to_thread(self.store.users)
        if name.lower() not in users:
            raise NotFound(f"user {name} does not exist")
        return _described(users[name.lower()])

    async def add(self, body: Mapping[str, Any]) -> dict[str, Any]:
        raw = body.get("name")
        if not isinstance(raw, str):
            raise BadRequest("name must be a string")
        try:
            name = validate_username(raw)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        password = _password(body, required=True)
        record = UserRecord(name, "", _permissions(body.get("permissions")))
        await self._put(record, password, create=True)
        return _described(record)

    async def update(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A new password, new permissions, or both; what is not sent is kept."""
        users = await asyncio.to_thread(self.store.users)
        current = users.get(name.lower())
        if current is None:
            raise NotFound(f"user {name} does not exist")
        password = _password(body, required=False)
        permissions = (
            _permissions(body["permissions"]) if "permissions" in body else current.permissions
        )
        record = UserRecord(current.name, current.password_hash, permissions)
        await self._put(record, password, create=False)
        return _described(record)

    async def delete(self, name: str) -> None:
        try:
            await asyncio.to_thread(self.store.delete_user, name.lower())
        except KeyError:
            raise NotFound(f"user {name} does not exist") from None
        await self._reload()

    async def _put(self, record: UserRecord, password: str | None, *, create: bool) -> None:
        def write() -> None:
            hashed = record.password_hash
            if password is not None:  # scrypt: CPU-bound, kept off the event loop
                hashed = hash_password(record.name, password, "scrypt")
            self.store.put_user(UserRecord(record.name, hashed, record.permissions), create=create)

        try:
            await asyncio.to_thread(write)
        except KeyError as exc:
            if create:
                raise BadRequest(f"user {record.name} already exists") from None
            raise NotFound(str(exc.args[0])) from None
        await self._reload()

    async def _reload(self) -> None:
        # This process answers with the change at once; the store's watch tells the others.
        self.auth.replace_users(await asyncio.to_thread(store_entries, self.store))
