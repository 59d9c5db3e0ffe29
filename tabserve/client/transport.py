"""What both clients send over: one HTTP session, its credentials, and the one place an
answer that is not 2xx becomes a ``TabserveError``.

``Client`` (TabPy's flat API, ``tabpy_client``) and ``Server`` (the resource-style API,
``server``) are layers over a ``Transport``; neither touches ``requests`` on its own, so
timeouts, TLS checking, JSON encoding (NaN becomes null, numpy arrays go as lists) and error
mapping are the same whichever a notebook uses. Imports nothing from tabserve but ``errors``.
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import cloudpickle
import requests

from ..errors import TabserveError

# Longest non-JSON error body kept in an exception message: a proxy's HTML error page can be
# large, and the start of it is what says what went wrong.
MAX_ERROR_TEXT = 2000


class Transport:
    """One server's base URL, a pooled session, a timeout, TLS checking and credentials.

    ``authorization`` is the ``Authorization`` header sent with every request (None: none,
    unless ``session.auth`` is set, as TabPy's ``set_credentials`` does).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        verify: bool | str = True,
        owner: str = "client",
        timeout_name: str = "timeout",
    ) -> None:
        self.base_url = base_url(url)
        self._timeout_name = timeout_name
        self._timeout = check_timeout(timeout, timeout_name)
        self.session = requests.Session()
        self.session.verify = verify
        # Also given with each request: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE in
        # the environment override a session's verify, but not a request's.
        self.verify = verify
        self.authorization: str | None = None
        self.closed = False
        self._owner = owner

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = check_timeout(value, self._timeout_name)

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """One request; the response when 2xx, else the ``TabserveError`` it carries."""
        if self.closed:
            raise RuntimeError(f"this tabserve {self._owner} has been closed")
        sent = {"Accept": "application/json", **(headers or {})}
        if self.authorization is not None:
            sent["Authorization"] = self.authorization
        data = None
        if body is not None:
            data = encode_json(body)
            sent["Content-Type"] = "application/json"
        response = self.session.request(
            method,
            self.base_url + path,
            params=params,
            data=data,
            headers=sent,
            timeout=self._timeout,
            verify=self.verify,
            stream=stream,
        )
        if not 200 <= response.status_code < 300:
            raise error_from(response)
        return response

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """``send``, then the decoded JSON answer (None for an empty body)."""
        return decode(self.send(method, path, body, params=params, headers=headers))

    def close(self) -> None:
        self.closed = True
        self.session.close()


_Owner = TypeVar("_Owner", bound="TransportOwner")


class TransportOwner:
    """What ``tabserve.Server`` and ``tabserve.Client`` share as owners of one transport:
    closing it, as a context manager too, and their repr."""

    _transport: Transport

    def close(self) -> None:
        """Close the connection pool; later calls raise ``RuntimeError``."""
        self._transport.close()

    def __enter__(self: _Owner) -> _Owner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._transport.base_url!r})"


def decode(response: requests.Response) -> Any:
    """A 2xx answer's JSON (None for an empty body); a body that is not JSON is an error."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise TabserveError(
            f"{response.request.method} {response.url} answered {response.status_code} with "
            f"a body that is not JSON: {excerpt(response.text)}"
        ) from None


def error_from(response: requests.Response) -> TabserveError:
    """The TabserveError for a non-2xx answer; any body, JSON or not, still gives one."""
    message: str | None = None
    info: Any = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message, info = body["message"], body.get("info")
    else:
        message = excerpt(response.text) or response.reason or f"HTTP {response.status_code}"
    return TabserveError.from_wire(
        {"status": response.status_code, "message": message, "info": info}
    )


def excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + " …"


def base_url(endpoint: str) -> str:
    """Normalise the server address to ``scheme://host[:port][/prefix]/``.

    TabPy's client turned ``http://h:9004`` (no trailing slash) into ``http://h:9004info``;
    here a trailing slash is optional, and a path prefix (behind a proxy) is kept.
    """
    if not isinstance(endpoint, str):
        raise TypeError(f"endpoint must be a str, not {type(endpoint).__name__}")
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must look like http://host:9004/, got {endpoint!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"endpoint must not have a query or fragment: {endpoint!r}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError as exc:
        raise ValueError(f"endpoint has an invalid port: {endpoint!r}") from exc
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"


def check_timeout(value: Any, name: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_name(name: Any) -> None:
    # The server checks the characters; a non-string would only fail later and obscurely.
    if not isinstance(name, str) or not name:
        raise TypeError("endpoint name must be a non-empty str")


def quote_name(name: str) -> str:
    # Endpoint names may hold spaces ("Sentiment Analysis"); '/' must not split the path.
    return quote(name, safe="")


def archive_fields(obj: Any) -> dict[str, Any]:
    """The pickle and the fingerprint the server checks before loading it."""
    # What the server calls: the object itself, or the query method of a TabPy-style object.
    called = obj if callable(obj) else obj.query
    try:
        signature: str | None = str(inspect.signature(called))
    except (TypeError, ValueError):  # builtins and some C callables have none
        signature = None
    return {
        "archive": base64.b64encode(cloudpickle.dumps(obj)).decode("ascii"),
        "archive_format": "cloudpickle",
        # Pickled bytecode loads only on the same minor version; the server says so early.
        "python_version": platform.python_version(),
        "cloudpickle_version": cloudpickle.__version__,
        "signature": signature,
    }


def encode_json(body: Any) -> bytes:
    """JSON for the server, which (like Tableau) has no NaN: NaN and ±Inf become null.

    numpy arrays and pandas Series are sent as lists through their ``tolist`` method, so
    the client never has to import either library.
    """
    try:
        return json.dumps(body, allow_nan=False, default=_tolist).encode("utf-8")
    except ValueError:  # a NaN or an infinity somewhere: take the slower, cleaning path
        return json.dumps(_finite(body), allow_nan=False, default=_tolist).encode("utf-8")


def _tolist(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if callable(getattr(value, "tolist", None)):
        return _finite(value.tolist())
    return value


def as_bool(value: Any) -> bool:
    # state.ini files written by TabPy may hold "True"/"False" strings.
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def as_datetime(value: Any) -> datetime | None:
    """Epoch seconds as an aware UTC datetime; None otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    return None


def as_time(value: Any) -> datetime | None:
    """Epoch seconds or an ISO 8601 string as an aware UTC datetime; None otherwise."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return as_datetime(value)


def script_data(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """An ad-hoc script's ``data``: positional arguments as ``_arg1`` … ``_argN``, keyword
    arguments under their own names; a name given both ways is the caller's mistake."""
    data = {f"_arg{i}": value for i, value in enumerate(args, start=1)}
    clash = sorted(data.keys() & kwargs.keys())
    if clash:
        raise ValueError(f"{', '.join(clash)} given both positionally and by keyword")
    data.update(kwargs)
    return data
