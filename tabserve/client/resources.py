"""``tabserve.Server``: the resource-style client, in the shape of Tableau Server Client::

    import tabserve

    server = tabserve.Server("https://tabserve.example.com:9004")
    with server.auth.sign_in(tabserve.APIKeyAuth(key)):
        server.endpoints.publish("add", add, description="Adds two columns")
        job = server.endpoints.submit("add", [1, 2], [3, 4])
        job = server.jobs.wait_for_job(job)
        server.results.download(job.query_result_id, "add.csv")

Every resource is an attribute of ``server`` and returns typed items (``items``); lists come
as ``(items, PaginationItem)`` narrowed by ``RequestOptions`` (``options``). Everything goes
through the same ``Transport`` as TabPy's ``Client``, so errors are the same
``TabserveError`` classes, raised in one place (``transport.error_from``).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from ..errors import JobCancelled, JobFailed, NotFound, TabserveError
from .items import (
    EndpointItem,
    JobItem,
    JobStatus,
    KeyItem,
    PaginationItem,
    PublishMode,
    ResultItem,
    ServerInfoItem,
    UserItem,
)
from .options import QuerySet, RequestOptions
from .transport import (
    Transport,
    TransportOwner,
    archive_fields,
    check_name,
    quote_name,
    script_data,
)

# wait_for_job's polling: quick at first (most jobs are short), then no more than once every
# few seconds, so that a long job costs the server little.
_FIRST_POLL = 0.05
_POLL_GROWTH = 1.5
_MAX_POLL = 3.0


# -- authentication ------------------------------------------------------------------------


@dataclass(frozen=True)
class BasicAuth:
    """A user name and password (HTTP Basic), as Tableau sends them."""

    username: str
    password: str = field(repr=False)

    def header(self) -> str:
        token = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")


@dataclass(frozen=True)
class APIKeyAuth:
    """An API key (``tabserve key create`` or ``server.keys.create``): ``Authorization:
    Key <key>``. TSC's ``PersonalAccessTokenAuth`` plays this part there."""

    key: str = field(repr=False)

    def header(self) -> str:
        return f"Key {self.key}"


class Auth:
    """``server.auth``: ``with server.auth.sign_in(BasicAuth(...)):`` signs in for the block.

    Basic and key credentials are sent with each request, so there is no session on the
    server to end: signing out forgets the credentials here (a key stays valid until it is
    revoked). ``sign_in`` checks the credentials at once with ``GET /info``: wrong ones raise
    ``Unauthorized``. A key that may not read ``/info`` (an endpoint key) is still signed in.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def signed_in(self) -> bool:
        return self._transport.authorization is not None

    def sign_in(self, auth: BasicAuth | APIKeyAuth) -> Auth:
        self._transport.authorization = auth.header()
        try:
            self._transport.call("GET", "info")
        except TabserveError as exc:
            if exc.status != 403:  # 403: who they are is known, /info is just not theirs
                self._transport.authorization = None
                raise
        return self

    def sign_out(self) -> None:
        self._transport.authorization = None

    def __enter__(self) -> Auth:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sign_out()


# -- resources -----------------------------------------------------------------------------


class _Resource:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _page(
        self, path: str, key: str, options: RequestOptions | None
    ) -> tuple[list[Any], PaginationItem]:
        """One page of a list route: its ``key`` list and its pagination."""
        answer = self._transport.call(
            "GET", path, params=(options or RequestOptions()).parameters()
        )
        if isinstance(answer, Mapping) and isinstance(answer.get("pagination"), Mapping):
            return list(answer.get(key) or []), PaginationItem.from_json(answer["pagination"])
        # A server without paging (TabPy, an older tabserve): everything, on one page.
        if isinstance(answer, Mapping) and isinstance(answer.get(key), list):
            items = list(answer[key])
        elif isinstance(answer, Mapping):
            items = [{"name": name, **info} for name, info in answer.items()]
        else:
            items = list(answer or [])
        return items, PaginationItem(1, len(items), len(items))


_Item = TypeVar("_Item")


class _ListResource(_Resource, Generic[_Item]):
    """A resource over a paged list route: ``get`` one page, ``filter`` lazily over all."""

    _route: str  # the list route, which is also the key of its list in the answer

    def _item(self, value: dict[str, Any]) -> _Item:
        raise NotImplementedError

    def get(self, req_options: RequestOptions | None = None) -> tuple[list[_Item], PaginationItem]:
        values, pagination = self._page(self._route, self._route, req_options)
        return [self._item(value) for value in values], pagination

    def filter(self, **conditions: Any) -> QuerySet[_Item]:
        """Conditions as in Tableau Server Client (``name__has="add"``): iterate the matches."""
        return QuerySet(self).filter(**conditions)


def _call_data(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any] | dict[str, Any]:
    if args and kwargs:
        raise ValueError("pass the function's arguments by position or by keyword, not both")
    return dict(kwargs) if kwargs else list(args)


class Endpoints(_ListResource[EndpointItem]):
    """``server.endpoints``: deployed functions and aliases.
    Filter like ``server.endpoints.filter(type="model", name__has="add")``."""

    _route = "endpoints"

    def _item(self, value: dict[str, Any]) -> EndpointItem:
        return EndpointItem.from_json(value["name"], value)

    def get_by_name(self, name: str) -> EndpointItem:
        check_name(name)
        return EndpointItem.from_json(name, self._transport.call("GET", _path(name)))

    def publish(
        self,
        name: str,
        func: Callable[..., Any],
        *,
        description: str = "",
        mode: PublishMode = PublishMode.CreateNew,
        max_age: int | None = None,
        schema: Any = None,
        is_public: bool = False,
    ) -> EndpointItem:
        """Deploy ``func`` (cloudpickled, loaded in a server worker before the answer).

        ``PublishMode.CreateNew`` fails (``BadRequest``) when the name is taken;
        ``Overwrite`` makes a new version, or the first one. ``max_age``: seconds a cached
        result of this endpoint may be served to calls that do not say.
        """
        check_name(name)
        if not callable(func) and not callable(getattr(func, "query", None)):
            raise TypeError(f"cannot publish a {type(func).__name__}: it is not callable")
        body: dict[str, Any] = {
            "name": name,
            "type": "model",
            "description": description,
            "docstring": getattr(func, "__doc__", None) or "",
            "schema": schema,
            "is_public": is_public,
            "dependencies": [],
            "methods": [{"method": "query"}],
            **archive_fields(func),
        }
        if max_age is not None:
            body["max_age"] = _check_max_age(max_age)
        return self._save(name, body, PublishMode(mode))

    def update(self, item: EndpointItem) -> EndpointItem:
        """Save ``item``'s description, schema and is_public (its code stays as it is)."""
        body = {
            "description": item.description,
            "schema": item.schema,
            "is_public": item.is_public,
            "should_update_version": False,
        }
        if item.max_age is not None:
            body["max_age"] = _check_max_age(item.max_age)
        return _single(self._transport.call("PUT", _path(item.name), body), item.name)

    def delete(self, name: str) -> None:
        check_name(name)
        self._transport.call("DELETE", _path(name))

    def alias(
        self,
        name: str,
        target: str,
        *,
        description: str = "",
        mode: PublishMode = PublishMode.CreateNew,
    ) -> EndpointItem:
        """Make ``name`` another name for ``target`` (``Overwrite`` re-points it)."""
        check_name(name)
        body = {"name": name, "type": "alias", "target": target, "description": description}
        return self._save(name, body, PublishMode(mode))

    def query(self, name: str, /, *args: Any, max_age: int | None = None, **kwargs: Any) -> Any:
        """Call endpoint ``name`` and return what the function returned. ``max_age``
        accepts a cached result up to that many seconds old."""
        body: dict[str, Any] = {"data": _call_data(args, kwargs)}
        if max_age is not None:
            body["max_age"] = _check_max_age(max_age)
        return self._transport.call("POST", f"query/{quote_name(name)}", body)["response"]

    def submit(self, name: str, /, *args: Any, **kwargs: Any) -> JobItem:
        """Call endpoint ``name`` as a job (``Prefer: respond-async``); follow it with
        ``server.jobs``. A job always runs: ``max_age`` 0 keeps the server from answering
        with a cached result instead of a job (``query(..., max_age=N)`` takes those)."""
        body: dict[str, Any] = {"data": _call_data(args, kwargs), "max_age": 0}
        answer = self._transport.call(
            "POST", f"query/{quote_name(name)}", body, headers={"Prefer": "respond-async"}
        )
        if not isinstance(answer, Mapping) or not isinstance(answer.get("job"), Mapping):
            raise TabserveError(
                "the server answered a job submission without a job: it has no jobs "
                "(a TabPy server, or a tabserve before 0.3)"
            )
        return JobItem.from_json(answer)

    def _save(self, name: str, body: dict[str, Any], mode: PublishMode) -> EndpointItem:
        if mode is PublishMode.Overwrite:
            try:
                answer = self._transport.call(
                    "PUT", _path(name), {**body, "should_update_version": True}
                )
                return _single(answer, name)
            except NotFound:
                pass  # nothing to overwrite: the first version
        return _single(self._transport.call("POST", "endpoints", body), name)


class Users(_ListResource[UserItem]):
    """``server.users``: the users kept in the store (``TABSERVE_USERS = store``).
    Filter like ``server.users.filter(permissions__has="manage")``."""

    _route = "users"

    def _item(self, value: dict[str, Any]) -> UserItem:
        return UserItem.from_json(value)

    def get_by_name(self, name: str) -> UserItem:
        return UserItem.from_json(self._transport.call("GET", _user(name))["user"])

    def add(self, user: UserItem | str, password: str) -> UserItem:
        """Add ``user`` (a name means every permission) with ``password``."""
        item = UserItem(user) if isinstance(user, str) else user
        body = {"name": item.name, "password": password, "permissions": _perms(item)}
        return UserItem.from_json(self._transport.call("POST", "users", body)["user"])

    def update(self, user: UserItem, password: str | None = None) -> UserItem:
        """Save ``user``'s permissions, and a new password when given."""
        body: dict[str, Any] = {"permissions": _perms(user)}
        if password is not None:
            body["password"] = password
        return UserItem.from_json(self._transport.call("PUT", _user(user.name), body)["user"])

    def delete(self, name: str) -> None:
        self._transport.call("DELETE", _user(name))


class ServerInfo(_Resource):
    """``server.server_info``: ``get()`` is ``GET /info``."""

    def get(self) -> ServerInfoItem:
        return ServerInfoItem.from_json(self._transport.call("GET", "info"))


class Jobs(_ListResource[JobItem]):
    """``server.jobs``: calls submitted with ``endpoints.submit``.
    Filter like ``server.jobs.filter(status=JobStatus.FAILURE, endpoint="add")``."""

    _route = "jobs"

    def _item(self, value: dict[str, Any]) -> JobItem:
        return JobItem.from_json(value)

    def get_by_id(self, job_id: str) -> JobItem:
        return JobItem.from_json(self._transport.call("GET", f"jobs/{quote_name(str(job_id))}"))

    def cancel(self, job: str | JobItem) -> None:
        """Cancel: a pending job never starts, a running one's worker is stopped."""
        self._transport.call("DELETE", f"jobs/{quote_name(_job_id(job))}")

    def wait_for_job(self, job: str | JobItem, *, timeout: float | None = None) -> JobItem:
        """Poll until the job ends; return it on SUCCESS.

        Raises ``JobFailed`` (with the server's message: what a synchronous call would
        have raised) or ``JobCancelled``; ``TimeoutError`` when ``timeout`` seconds pass
        first (the job goes on: cancel it if it is not wanted).
        """
        job_id = _job_id(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _FIRST_POLL
        while True:
            item = self.get_by_id(job_id)
            if item.status is JobStatus.SUCCESS:
                return item
            if item.status is JobStatus.FAILURE:
                raise JobFailed(item.error, item.error_info, job=item)
            if item.status is JobStatus.CANCELLED:
                raise JobCancelled(item.error, item.error_info, job=item)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"job {job_id} is still {item.status.name} after {timeout} s"
                    )
                delay = min(delay, left)
            time.sleep(delay)
            delay = min(delay * _POLL_GROWTH, _MAX_POLL)


class Results(_Resource):
    """``server.results``: what succeeded jobs (and cached calls) produced."""

    def get_by_id(self, result_id: str) -> ResultItem:
        return ResultItem.from_json(
            self._transport.call("GET", f"query_results/{quote_name(str(result_id))}")
        )

    def download(
        self, result_id: str, filepath: str | os.PathLike[str], *, filetype: str = "csv"
    ) -> Path:
        """Save the result as a ``csv`` or ``json`` file at ``filepath`` (written whole, or
        not at all); returns the path."""
        if filetype not in ("csv", "json"):
            raise ValueError(f'filetype must be "csv" or "json", not {filetype!r}')
        path = Path(filepath)
        response = self._transport.send(
            "GET",
            f"query_results/{quote_name(str(result_id))}.{filetype}",
            headers={"Accept": "text/csv" if filetype == "csv" else "application/json"},
            stream=True,
        )
        partial = path.with_name(f".{path.name}.part")
        try:
            with response, partial.open("wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return path


class Keys(_ListResource[KeyItem]):
    """``server.keys``: API keys (``manage`` users only).
    Filter like ``server.keys.filter(kind="endpoint", endpoint="add")``."""

    _route = "keys"

    def _item(self, value: dict[str, Any]) -> KeyItem:
        return KeyItem.from_json(value)

    def create(
        self, *, user: str | None = None, endpoint: str | None = None
    ) -> tuple[KeyItem, str]:
        """A key acting as ``user``, or reaching only ``endpoint``'s queries, jobs and
        results. Returns the key's record and its secret, which is shown only this once."""
        if (user is None) == (endpoint is None):
            raise ValueError("give exactly one of user= or endpoint=")
        body = {"user": user} if user is not None else {"endpoint": endpoint}
        answer = self._transport.call("POST", "keys", body)
        return KeyItem.from_json(answer), str(_secret(answer))

    def revoke(self, key: str | KeyItem) -> None:
        key_id = key.id if isinstance(key, KeyItem) else str(key)
        self._transport.call("DELETE", f"keys/{quote_name(key_id)}")


# -- the server ----------------------------------------------------------------------------


class Server(TransportOwner):
    """One tabserve server and its resources.

    ``verify``: True checks TLS certificates, a path names a CA bundle, False turns checking
    off (self-signed test servers). ``timeout`` bounds each request in seconds (a deploy
    includes loading the function in a worker; use jobs for long calls).
    """

    def __init__(self, url: str, *, verify: bool | str = True, timeout: float = 60.0) -> None:
        self._transport = Transport(url, timeout=timeout, verify=verify, owner="Server")
        self.auth = Auth(self._transport)
        self.endpoints = Endpoints(self._transport)
        self.jobs = Jobs(self._transport)
        self.results = Results(self._transport)
        self.keys = Keys(self._transport)
        self.users = Users(self._transport)
        self.server_info = ServerInfo(self._transport)

    @property
    def server_address(self) -> str:
        """The base URL, ending with ``/``."""
        return self._transport.base_url

    @property
    def timeout(self) -> float:
        return self._transport.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._transport.timeout = value

    def evaluate(self, script: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run an ad-hoc script as Tableau's SCRIPT_* calls do; returns the decoded result.
        Positional arguments become ``_arg1`` … ``_argN``; keyword arguments keep their
        names."""
        data = script_data(args, kwargs)
        return self._transport.call("POST", "evaluate", {"script": script, "data": data})


# -- helpers -------------------------------------------------------------------------------


def _path(name: str) -> str:
    return f"endpoints/{quote_name(name)}"


def _user(name: str) -> str:
    return f"users/{quote_name(name)}"


def _perms(user: UserItem) -> list[str] | str:
    return "all" if user.permissions is None else sorted(user.permissions)


def _job_id(job: str | JobItem) -> str:
    return job.id if isinstance(job, JobItem) else str(job)


def _check_max_age(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_age must be a whole number of seconds, 0 or more; got {value!r}")
    return value


def _single(answer: Any, name: str) -> EndpointItem:
    """POST and PUT answer ``{name: info}``."""
    if isinstance(answer, Mapping) and isinstance(answer.get(name), Mapping):
        return EndpointItem.from_json(name, answer[name])
    raise TabserveError(f"unexpected answer for endpoint {name}: {answer!r}")


def _secret(answer: Any) -> str:
    for holder in (answer, answer.get("key") if isinstance(answer, Mapping) else None):
        if isinstance(holder, Mapping):
            for name in ("secret", "api_key", "token"):
                if isinstance(holder.get(name), str):
                    return str(holder[name])
    raise TabserveError(f"the server answered a key creation without the key: {answer!r}")
