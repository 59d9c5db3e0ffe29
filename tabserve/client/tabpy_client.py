"""The tabserve client: TabPy's ``Client`` API, deploying over HTTP.

Notebooks written for ``tabpy.tabpy_tools.client.Client`` switch by changing the import::

    from tabserve import Client

    client = Client("http://tabserve.example.com:9004")

    def add(x, y):
        '''Add two lists element-wise.'''
        return [a + b for a, b in zip(x, y)]

    client.deploy("add", add, "Adds two columns")
    client.query("add", [1, 2], [3, 4])["response"]        # [4, 6]

Unlike TabPy's client, a deploy sends the cloudpickled function in the request body, so
client and server need not share a filesystem (another host, a container). The server
loads the pickle in a worker before it answers, so a deploy either succeeds or raises with
the reason; there is no status polling.

This module imports nothing from tabserve but ``errors``: installing the server's
dependencies is not needed to read it, and importing it never imports tornado, numpy or
pandas. See ``docs/client.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

from ..errors import BadRequest, TabserveError
from .items import JobStatus
from .transport import (
    Transport,
    TransportOwner,
    archive_fields,
    as_bool,
    as_datetime,
    as_time,
    check_name,
    decode,
    quote_name,
    script_data,
)

if TYPE_CHECKING:
    import requests

__all__ = [
    "Client",
    "Endpoint",
    "EndpointExists",
    "EndpointStatus",
    "QueryObject",
    "QueryResponse",
]


class EndpointExists(BadRequest, RuntimeError):
    """``deploy`` or ``alias`` found the name taken and ``override`` was false.

    It is also a ``RuntimeError`` because TabPy's client raises that here, and notebooks
    catch it.
    """

    def __init__(self, name: str) -> None:
        super().__init__(
            f"An endpoint with that name ({name}) already exists. "
            'Use "override = True" to force update an existing endpoint.'
        )
        self.name = name


class QueryObject(Protocol):
    """Anything with a ``query`` method, as TabPy's ``QueryObject`` subclasses have."""

    @property
    def query(self) -> Callable[..., Any]: ...  # a property, so that any method matches


class QueryResponse(TypedDict):
    """What ``Client.query`` returns: TabPy's response dict, unchanged."""

    response: Any
    version: int
    model: str
    uuid: str


class EndpointStatus(TypedDict):
    """One entry of ``Client.get_status()``."""

    version: int
    type: str
    status: str  # "LoadSuccessful", "LoadFailed" or "LoadInProgress"
    last_error: str | None


@dataclass(frozen=True)
class Endpoint:
    """A deployed endpoint's description, as ``GET /endpoints`` reports it.

    ``python_version``, ``cloudpickle_version`` and ``signature`` are recorded by this
    client at deploy time; they are None for endpoints deployed by TabPy's client and for
    aliases. Fields the server adds later are kept in ``extra`` rather than dropped.
    """

    name: str
    type: str
    version: int
    description: str = ""
    docstring: str = ""
    target: str | None = None
    dependencies: list[str] = field(default_factory=list)
    schema: Any = None
    is_public: bool = False
    creation_time: datetime | None = None
    last_modified_time: datetime | None = None
    python_version: str | None = None
    cloudpickle_version: str | None = None
    signature: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, name: str, info: Mapping[str, Any]) -> Endpoint:
        """Build from the server's info object (epoch seconds become UTC datetimes)."""
        known = {
            "type", "version", "description", "docstring", "target", "dependencies",
            "schema", "is_public", "creation_time", "last_modified_time",
            "python_version", "cloudpickle_version", "signature",
        }  # fmt: skip
        return cls(
            name=name,
            type=str(info.get("type", "model")),
            version=int(info.get("version", 1)),
            description=info.get("description") or "",
            docstring=info.get("docstring") or "",
            target=info.get("target"),
            dependencies=list(info.get("dependencies") or []),
            schema=info.get("schema"),
            is_public=as_bool(info.get("is_public", False)),
            creation_time=as_datetime(info.get("creation_time")),
            last_modified_time=as_datetime(info.get("last_modified_time")),
            python_version=info.get("python_version"),
            cloudpickle_version=info.get("cloudpickle_version"),
            signature=info.get("signature"),
            extra={k: v for k, v in info.items() if k not in known},
        )


@dataclass
class Job:
    """An asynchronous call (``Client.submit``); ``Client.wait`` gives its result.

    ``error`` is the ``{"message", "info"}`` a synchronous call would have raised. A job
    answered at once from the cache has no id and carries its ``data``.
    """

    id: str
    status: JobStatus
    error: dict[str, Any] | None = None
    query_result_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    done: bool = False
    data: Any = None

    @classmethod
    def from_answer(cls, job: Mapping[str, Any]) -> Job:
        status = JobStatus(int(job["status"]))
        return cls(
            id=str(job["id"]),
            status=status,
            error=job.get("error"),
            query_result_id=job.get("query_result_id"),
            created_at=as_time(job.get("created_at")),
            updated_at=as_time(job.get("updated_at")),
            done=status >= JobStatus.SUCCESS,
        )


class Client(TransportOwner):
    """Talks to one tabserve (or TabPy) server. Use it as a context manager to close it.

    ``query_timeout`` is in seconds and bounds every request (TabPy's docstring says
    milliseconds, but TabPy hands the value to ``requests`` as seconds too). A deploy
    includes loading the function in a server worker, so it is bounded by the same value.

    ``remote_server`` and ``localhost_endpoint`` are accepted for TabPy compatibility and
    ignored: every deploy here goes over HTTP, which is what ``remote_server`` was for.

    ``verify`` is passed to ``requests``: True checks TLS certificates (TabPy's client never
    does), a path names a CA bundle, False turns checking off for self-signed test servers.
    """

    def __init__(
        self,
        endpoint: str,
        query_timeout: float = 1000,
        remote_server: bool = False,
        localhost_endpoint: str | None = None,
        *,
        verify: bool | str = True,
    ) -> None:
        # The same transport as tabserve.Server's: one session, one error mapping.
        self._transport = Transport(
            endpoint,
            timeout=query_timeout,
            verify=verify,
            owner="Client",
            timeout_name="query_timeout",
        )

    # -- TabPy's API -----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The server's base URL, always ending with ``/``."""
        return self._transport.base_url

    @property
    def query_timeout(self) -> float:
        """Seconds each request may take before ``requests.Timeout`` is raised."""
        return self._transport.timeout

    @query_timeout.setter
    def query_timeout(self, value: float) -> None:
        # TabPy's setter silently ignores bad values; failing loudly is kinder.
        self._transport.timeout = value

    def get_status(self) -> dict[str, EndpointStatus]:
        """Every endpoint's version, type and load status (``GET /status``)."""
        return cast("dict[str, EndpointStatus]", self._request("GET", "status"))

    def query(
        self, name: str, /, *args: Any, max_age: int | None = None, **kwargs: Any
    ) -> QueryResponse:
        """Call a deployed endpoint with positional or keyword arguments (not both).

        Returns TabPy's dict: ``{"response", "version", "model", "uuid"}``. ``name`` is
        positional-only so that a function with a parameter called ``name`` can be called
        by keyword (with TabPy's client that is a TypeError). ``max_age`` (seconds, tabserve
        only) accepts a cached result of the same call at most that old; 0 always runs. (A
        function parameter called ``max_age`` must therefore be passed positionally.)
        """
        body = _query_body(args, kwargs, max_age)
        return cast("QueryResponse", self._request("POST", f"query/{quote_name(name)}", body))

    def get_endpoints(self, type: str | None = None) -> dict[str, Endpoint]:
        """Deployed endpoints by name; ``type`` ("model" or "alias") keeps only that kind.

        TabPy sent ``type`` to a server that ignored it; here the filter works.
        """
        infos = self._request("GET", "endpoints") or {}
        endpoints = {name: Endpoint.from_info(name, info) for name, info in infos.items()}
        if type is None:
            return endpoints
        return {name: e for name, e in endpoints.items() if e.type == type}

    def deploy(
        self,
        name: str,
        obj: Callable[..., Any] | QueryObject,
        description: str = "",
        schema: Any = None,
        override: bool = False,
        is_public: bool = False,
        *,
        max_age: int | None = None,
    ) -> Endpoint:
        """Deploy ``obj`` as endpoint ``name``; ``override=True`` replaces it as a new version.

        ``max_age`` (tabserve only): calls that give none accept a cached result this many
        seconds old.

        ``obj`` is pickled by cloudpickle and sent in the request. Functions defined in a
        notebook or in ``__main__`` travel by value; functions imported from a module travel
        by reference and need that module on the server, unless the module is registered
        with ``cloudpickle.register_pickle_by_value``. ``schema`` is any JSON value.
        Raises ``EndpointExists`` when the name is taken and ``override`` is false, and a
        ``TabserveError`` with the server's reason when the server cannot load ``obj``.
        """
        check_name(name)
        if not (callable(obj) or callable(getattr(obj, "query", None))):
            raise TypeError(f"cannot deploy a {type(obj).__name__}: it is not callable")
        exists = name in self._endpoint_infos()
        if exists and not override:
            raise EndpointExists(name)
        body = {
            "name": name,
            "type": "model",
            "description": description,
            "docstring": getattr(obj, "__doc__", None) or "",
            "schema": schema,
            "is_public": is_public,
            "dependencies": [],
            "methods": [{"method": "query"}],
            **archive_fields(obj),
        }
        if max_age is not None:
            body["max_age"] = _check_max_age(max_age)
        return self._save(name, body, exists)

    def remove(self, name: str) -> None:
        """Delete an endpoint (``DELETE /endpoints/<name>``); it stops answering at once."""
        self._request("DELETE", f"endpoints/{quote_name(name)}")

    def update_endpoint_info(
        self,
        name: str,
        description: str | None = None,
        schema: Any = None,
        is_public: bool | None = None,
    ) -> Endpoint:
        """Change an endpoint's metadata, keeping its code, version and unsent fields.

        None means "leave as is", so a schema cannot be cleared this way (as with TabPy).
        """
        if description is not None and not isinstance(description, str):
            raise TypeError("description must be a string")
        if is_public is not None and not isinstance(is_public, bool):
            raise TypeError("is_public must be a bool")
        changes = {"description": description, "schema": schema, "is_public": is_public}
        body = {k: v for k, v in changes.items() if v is not None}
        if not body:
            return self.get_endpoint(name)  # nothing to change; still checks it exists
        answer = self._request(
            "PUT", f"endpoints/{quote_name(name)}", {**body, "should_update_version": False}
        )
        return _single_endpoint(answer, name)

    def set_credentials(self, username: str, password: str) -> None:
        """Send HTTP basic-auth credentials with every later request."""
        self._transport.session.auth = (username, password)

    # -- tabserve extras -------------------------------------------------------------------

    def get_info(self) -> dict[str, Any]:
        """The server's description (``GET /info``): versions, features, timeouts."""
        return cast("dict[str, Any]", self._request("GET", "info"))

    def get_endpoint(self, name: str) -> Endpoint:
        """One endpoint's description; ``NotFound`` if there is none by that name."""
        return Endpoint.from_info(name, self._request("GET", f"endpoints/{quote_name(name)}"))

    def evaluate(
        self, script: str, /, *args: Any, max_age: int | None = None, **kwargs: Any
    ) -> Any:
        """Run an ad-hoc script as Tableau's SCRIPT_* calls do; returns the decoded result.

        Positional arguments become ``_arg1`` … ``_argN``; keyword arguments are sent under
        their own names (so ``_arg1=...`` works too). ``max_age``: as for ``query``.
        """
        data = script_data(args, kwargs)
        body: dict[str, Any] = {"script": script, "data": data}
        if max_age is not None:
            body["max_age"] = _check_max_age(max_age)
        return self._request("POST", "evaluate", body)

    def submit(self, name: str, /, *args: Any, max_age: int | None = None, **kwargs: Any) -> Job:
        """Call a deployed endpoint as an asynchronous job (``Prefer: respond-async``); the
        job comes back at once, ``wait`` waits for its result. With ``max_age`` a fresh
        enough cached result is a job already done."""
        body = _query_body(args, kwargs, max_age)
        response = self._send(
            "POST", f"query/{quote_name(name)}", body, {"Prefer": "respond-async"}
        )
        answer = self._decode(response, "POST")
        if response.status_code == 202:
            return Job.from_answer(answer["job"])
        # Answered at once from the cache: a job that is already done, with its data.
        data = answer.get("response") if isinstance(answer, dict) else answer
        return Job(id="", status=JobStatus.SUCCESS, data=data, done=True)

    def job(self, job: Job | str) -> Job:
        """The job as it is now (``GET /jobs/<id>``)."""
        if isinstance(job, Job) and not job.id:
            return job
        job_id = job.id if isinstance(job, Job) else job
        return Job.from_answer(self._request("GET", f"jobs/{quote_name(job_id)}")["job"])

    def cancel(self, job: Job | str) -> Job:
        """Cancel a job: a pending one never starts, a running one's worker is killed."""
        job_id = job.id if isinstance(job, Job) else job
        return Job.from_answer(self._request("DELETE", f"jobs/{quote_name(job_id)}")["job"])

    def wait(self, job: Job | str, timeout: float | None = None, interval: float = 0.5) -> Any:
        """Wait for ``job`` to finish and return its result's data (what the function
        returned). A failed job raises the error a synchronous call would have raised; a
        cancelled one raises ``TabserveError``; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.job(job)
            if current.done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {current.id} is not done after {timeout} s")
            time.sleep(interval)
        if current.status == JobStatus.SUCCESS:
            if not current.id:
                return current.data
            result = self._request("GET", f"query_results/{quote_name(current.query_result_id)}")
            return result["query_result"]["data"]
        if current.status == JobStatus.FAILURE:
            error = current.error or {}
            raise TabserveError(error.get("message"), error.get("info"))
        raise TabserveError("Job cancelled", f"job {current.id} was cancelled")

    def alias(
        self, name: str, target: str, description: str = "", override: bool = False
    ) -> Endpoint:
        """Make ``name`` another name for endpoint ``target`` (``override`` re-points it)."""
        check_name(name)
        exists = name in self._endpoint_infos()
        if exists and not override:
            raise EndpointExists(name)
        body = {"name": name, "type": "alias", "target": target, "description": description}
        return self._save(name, body, exists)

    # -- HTTP ------------------------------------------------------------------------------

    def _endpoint_infos(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self._request("GET", "endpoints") or {})

    def _save(self, name: str, body: dict[str, Any], exists: bool) -> Endpoint:
        """POST a new endpoint or PUT a new version of an existing one."""
        if exists:
            body["should_update_version"] = True
            answer = self._request("PUT", f"endpoints/{quote_name(name)}", body)
        else:
            answer = self._request("POST", "endpoints", body)
        if answer is None:  # a server that answers with no body: ask for the result
            return self.get_endpoint(name)
        return _single_endpoint(answer, name)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON (None for an empty body) or raise."""
        return self._transport.call(method, path, body)

    def _send(
        self, method: str, path: str, body: Any = None, extra: Mapping[str, str] | None = None
    ) -> requests.Response:
        return self._transport.send(method, path, body, headers=extra)

    def _decode(self, response: requests.Response, method: str) -> Any:
        return decode(response)


# -- helpers -------------------------------------------------------------------------------


def _query_body(
    args: tuple[Any, ...], kwargs: dict[str, Any], max_age: int | None
) -> dict[str, Any]:
    if args and kwargs:
        raise ValueError(
            "Mixing of keyword arguments and positional arguments when querying an "
            "endpoint is not supported."
        )
    data: list[Any] | dict[str, Any] = dict(kwargs) if kwargs else list(args)
    body: dict[str, Any] = {"data": data}
    if max_age is not None:
        body["max_age"] = _check_max_age(max_age)
    return body


def _check_max_age(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_age must be a non-negative whole number of seconds, not {value!r}")
    return value


def _single_endpoint(answer: Any, name: str) -> Endpoint:
    """POST and PUT answer ``{name: info}``; older servers may answer a bare info object."""
    if isinstance(answer, dict) and isinstance(answer.get(name), dict):
        return Endpoint.from_info(name, answer[name])
    if isinstance(answer, dict):
        return Endpoint.from_info(name, answer)
    raise TabserveError(f"unexpected answer for endpoint {name}: {answer!r}")
