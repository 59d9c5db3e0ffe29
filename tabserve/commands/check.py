"""``tabserve check --target URL``: a conformance kit for any Analytics Extensions server.

It replays the requests Tableau really sends (Test Connection, SCRIPT_* calls, Table
Extensions, MODEL_EXTENSION calls, gzip and form-urlencoded bodies) and the rules around them
(auth 401/406, the result-length rule, 413, disabled evaluate), then prints a pass/fail table.
It talks plain HTTP (the standard library, and h11 through ``rawhttp`` for the one upload
that must wait for ``100 Continue``) and imports nothing from the server, so it can be
pointed at TabPy, tabserve or any other implementation.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import http.client
import json
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from .rawhttp import post_expecting_continue

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2
EXIT_USAGE = 2

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

DISABLED_MESSAGE = (
    "Ad-hoc scripts have been disabled on this analytics extension, please contact your "
    "administrator."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, metavar="URL", help="e.g. http://host:9004")
    parser.add_argument("--user", help="username, when the server requires authentication")
    parser.add_argument("--password", default="", help="password for --user")
    parser.add_argument(
        "--endpoint", metavar="NAME", help="a deployed endpoint to call as MODEL_EXTENSION does"
    )
    parser.add_argument(
        "--endpoint-data",
        metavar="JSON",
        default='{"x": [1, 2, 3], "y": [10, 20, 30]}',
        help="the named arguments sent to --endpoint (default: two numeric columns x and y)",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=100.0,
        metavar="MB",
        help="the server's TABPY_MAX_REQUEST_SIZE_MB, to test 413 just over it (default 100)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the server's TLS certificate"
    )


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def describe(self) -> str:
        text = self.body[:200].decode("utf-8", "replace")
        return f"{self.status} {text}"


class CheckFailed(Exception):
    """A check's expectation was not met; the message says what was seen."""


@dataclass
class Target:
    url: str
    user: str | None
    password: str
    timeout: float
    insecure: bool
    endpoint: str | None = None
    endpoint_data: dict[str, Any] = field(default_factory=dict)
    max_request_mb: float = 100.0
    features: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--target must be an http(s) URL, got {self.url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")

    def connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            context = ssl.create_default_context()
            if self.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def credentials(self, user: str | None = None, password: str | None = None) -> str:
        pair = f"{user if user is not None else self.user}:{password or self.password}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> Response:
        """One request on a fresh connection; ``auth`` adds --user's credentials if given."""
        sent = {"Accept-Encoding": "identity", **(headers or {})}
        if auth and self.user is not None:
            sent.setdefault("Authorization", self.credentials())
        connection = self.connect()
        try:
            connection.request(method, self.prefix + path, body=body, headers=sent)
            answer = connection.getresponse()
            return Response(
                answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
            )
        finally:
            connection.close()

    def post_json(self, path: str, value: Any, **headers: str) -> Response:
        return self.request(
            "POST",
            path,
            json.dumps(value).encode(),
            {"Content-Type": "application/json", **headers},
        )

    def evaluate(self, script: str, **data: Any) -> Response:
        return self.post_json("/evaluate", {"script": script, "data": data})


# ---- expectations -------------------------------------------------------------------------


def expect_status(response: Response, *statuses: int) -> None:
    if response.status not in statuses:
        wanted = " or ".join(str(s) for s in statuses)
        raise CheckFailed(f"expected {wanted}, got {response.describe()}")


def expect_json(response: Response, expected: Any) -> None:
    expect_status(response, 200)
    try:
        value = response.json()
    except ValueError:
        raise CheckFailed(f"answer is not JSON: {response.describe()}") from None
    if not _same(value, expected):
        raise CheckFailed(f"expected {json.dumps(expected)}, got {json.dumps(value)[:200]}")


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, float) and isinstance(value, int | float):
        return abs(value - expected) < 1e-9
    if isinstance(expected, list) and isinstance(value, list):
        return len(value) == len(expected) and all(map(_same, value, expected))
    if isinstance(expected, dict) and isinstance(value, dict):
        return value.keys() == expected.keys() and all(_same(value[k], expected[k]) for k in value)
    return type(value) is type(expected) and value == expected


def expect_envelope(response: Response, status: int, message: str | None = None) -> None:
    expect_status(response, status)
    try:
        body = response.json()
    except ValueError:
        raise CheckFailed(f"{status} without a JSON envelope: {response.describe()}") from None
    if not isinstance(body, dict) or "message" not in body:
        raise CheckFailed(f"{status} without a 'message': {response.describe()}")
    if message is not None and body["message"] != message:
        raise CheckFailed(f"expected message {message!r}, got {body['message']!r}")


# ---- the checks ---------------------------------------------------------------------------

ConformanceCheck = Callable[[Target], str]
CHECKS: list[tuple[str, ConformanceCheck]] = []


class Skip(Exception):
    """The check does not apply to this server or these options."""


def check(name: str) -> Callable[[ConformanceCheck], ConformanceCheck]:
    def register(func: ConformanceCheck) -> ConformanceCheck:
        CHECKS.append((name, func))
        return func

    return register


def _needs_evaluate(target: Target) -> None:
    if target.features.get("evaluate_enabled") is False:
        raise Skip("evaluate is disabled on this server")


@check("Test Connection: GET /info")
def info(target: Target) -> str:
    response = target.request("GET", "/info")
    if response.status == 401 and target.user is None:
        raise CheckFailed("401: the server requires authentication: pass --user and --password")
    expect_status(response, 200)
    body = response.json()
    for key in ("description", "creation_time", "state_path", "server_version", "name"):
        if key not in body:
            raise CheckFailed(f"/info has no {key!r}")
    features = body.get("versions", {}).get("v1", {}).get("features")
    if not isinstance(features, dict):
        raise CheckFailed("/info has no versions.v1.features")
    if not isinstance(features.get("evaluate_enabled"), bool):
        raise CheckFailed("features.evaluate_enabled is not a boolean")
    target.features = features
    return f"{body['name']} {body['server_version']}"


@check("auth: probe and 401/406 rules")
def auth_rules(target: Target) -> str:
    if not target.features:
        raise CheckFailed("no /info answer to read the authentication feature from")
    required = "authentication" in target.features
    if required:
        if target.user is None:
            raise CheckFailed("the server requires authentication: pass --user and --password")
        missing = target.request("GET", "/info", auth=False)
        expect_envelope(missing, 401)
        if not missing.header("WWW-Authenticate").lower().startswith("basic"):
            raise CheckFailed("401 without 'WWW-Authenticate: Basic'")
        wrong = target.request(
            "GET", "/info", headers={"Authorization": target.credentials(password="wrong-")}
        )
        if target.password != "wrong-":
            expect_envelope(wrong, 401)
        expect_status(target.request("GET", "/info"), 200)
        evaluate = target.evaluate("return 1")
        if target.features.get("evaluate_enabled"):
            expect_status(evaluate, 200)
        unauthenticated = target.request(
            "POST", "/evaluate", b'{"script": "return 1", "data": {}}', auth=False
        )
        expect_envelope(unauthenticated, 401)
        return "401 without or with wrong credentials, 200 with them"
    if target.user is not None:
        raise CheckFailed("--user given, but /info does not advertise authentication")
    refused = target.request(
        "GET", "/info", headers={"Authorization": target.credentials("tableau", "secret")}
    )
    expect_envelope(refused, 406)
    return "no auth: credentials are refused with 406"


@check("SCRIPT_REAL: list with nulls")
def script_real(target: Target) -> str:
    _needs_evaluate(target)
    script = "return [None if x is None else x * 2.5 for x in _arg1]"
    expect_json(target.evaluate(script, _arg1=[1.0, 2, None]), [2.5, 5.0, None])
    return "[1.0, 2, null] -> [2.5, 5.0, null]"


@check("SCRIPT_INT: two columns")
def script_int(target: Target) -> str:
    _needs_evaluate(target)
    script = "return [a + b for a, b in zip(_arg1, _arg2)]"
    expect_json(target.evaluate(script, _arg1=[1, 2, 3], _arg2=[10, 20, 30]), [11, 22, 33])
    return "element-wise sum"


@check("SCRIPT_STR: unicode text")
def script_str(target: Target) -> str:
    _needs_evaluate(target)
    script = "return [s.upper() + '!' for s in _arg1]"
    expect_json(target.evaluate(script, _arg1=["café", "日本"]), ["CAFÉ!", "日本!"])
    return "non-ASCII text round-trips"


@check("SCRIPT_BOOL: comparison")
def script_bool(target: Target) -> str:
    _needs_evaluate(target)
    script = "return [x > 1 for x in _arg1]"
    expect_json(target.evaluate(script, _arg1=[0, 1, 2]), [False, False, True])
    return "booleans"


@check("scalars and a single result for many rows")
def scalars(target: Target) -> str:
    _needs_evaluate(target)
    expect_json(target.evaluate("return _arg1 * sum(_arg2)", _arg1=3, _arg2=[1, 2]), 9)
    expect_json(target.evaluate("return sum(_arg1)", _arg1=[1, 2, 3]), 6)
    expect_json(target.evaluate("return 42"), 42)
    return "scalar argument, one value for three rows, no arguments"


@check("mixed types in one column")
def mixed_types(target: Target) -> str:
    _needs_evaluate(target)
    script = "return [type(v).__name__ for v in _arg1]"
    expected = ["int", "float", "str", "bool", "NoneType"]
    expect_json(target.evaluate(script, _arg1=[1, 2.5, "a", True, None]), expected)
    return "int, float, str, bool and null arrive as Python types"


@check("result-length rule")
def result_length(target: Target) -> str:
    _needs_evaluate(target)
    response = target.evaluate("return [1, 2]", _arg1=[1, 2, 3])
    if response.status == 200:
        raise CheckFailed(
            "2 values for 3 rows answered 200: Tableau rejects it with an obscure error"
        )
    expect_envelope(response, 500)
    return "2 values for 3 rows is an error naming the lengths"


@check("script error: 500 envelope")
def script_error(target: Target) -> str:
    _needs_evaluate(target)
    response = target.evaluate("return 1 / 0")
    expect_envelope(response, 500, "Error processing script")
    return "ZeroDivisionError -> 500 'Error processing script'"


@check("Table Extension")
def table_extension(target: Target) -> str:
    _needs_evaluate(target)
    table = {"Name": ["Bob", "Alice"], "Score": [1, 2]}
    script = "return {'Name': _arg1['Name'], 'Double': [s * 2 for s in _arg1['Score']]}"
    expect_json(target.evaluate(script, _arg1=table), {"Name": ["Bob", "Alice"], "Double": [2, 4]})
    return "a table of columns in and out"


@check("MODEL_EXTENSION: POST /query/NAME")
def model_extension(target: Target) -> str:
    name = target.endpoint
    if not name:
        raise Skip("no --endpoint given")
    data = target.endpoint_data
    response = target.post_json(f"/query/{name}", {"data": data})
    expect_status(response, 200)
    body = response.json()
    for key in ("response", "version", "model", "uuid"):
        if key not in body:
            raise CheckFailed(f"/query answer has no {key!r}: {response.describe()}")
    rows = max((len(v) for v in data.values() if isinstance(v, list)), default=1)
    result = body["response"]
    if isinstance(result, list) and len(result) not in (1, rows):
        raise CheckFailed(f"{len(result)} values for {rows} rows")
    missing = target.post_json("/query/no-such-endpoint-tabserve-check", {"data": data})
    expect_envelope(missing, 404)
    return f"{name} v{body['version']} answered; unknown endpoint is 404"


@check("gzip request body")
def gzip_body(target: Target) -> str:
    _needs_evaluate(target)
    if not target.features.get("gzip_enabled"):
        raise Skip("gzip_enabled is false in /info")
    body = json.dumps({"script": "return sum(_arg1)", "data": {"_arg1": list(range(1000))}})
    response = target.request(
        "POST",
        "/evaluate",
        gzip.compress(body.encode()),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    expect_json(response, sum(range(1000)))
    return "Content-Encoding: gzip is inflated"


@check("JSON body sent as form-urlencoded")
def form_urlencoded(target: Target) -> str:
    _needs_evaluate(target)
    # Tableau 2020.1 labels its JSON this way; '&' in the data must not split it into fields.
    column = [f"a&b={i}" for i in range(1500)]
    body = json.dumps({"script": "return len(_arg1)", "data": {"_arg1": column}}).encode()
    response = target.request(
        "POST", "/evaluate", body, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    expect_json(response, 1500)
    return "1500 values containing '&' parsed as JSON"


@check("413 just over the request size limit")
def too_large(target: Target) -> str:
    limit = int(target.max_request_mb * 1024 * 1024)
    status, body = _send_oversized(target, "/evaluate", limit + 1)
    if status != 413:
        raise CheckFailed(f"expected 413 for {limit + 1} bytes, got {status} {body[:200]!r}")
    try:
        message = json.loads(body).get("message", "")
    except ValueError:
        raise CheckFailed(f"413 without a JSON envelope: {body[:200]!r}") from None
    if "exceeded limit" not in message:
        raise CheckFailed(f"unexpected 413 message {message!r}")
    return f"{limit + 1} bytes refused"


@check("evaluate_enabled: false")
def evaluate_disabled(target: Target) -> str:
    if target.features.get("evaluate_enabled") is not False:
        raise Skip("evaluate is enabled; run against a server with TABPY_EVALUATE_ENABLE = false")
    response = target.evaluate("return 1")
    expect_envelope(response, 404, DISABLED_MESSAGE)
    return "/evaluate answers 404 with TabPy's message"


def _send_oversized(target: Target, path: str, size: int) -> tuple[int, bytes]:
    """POST ``size`` bytes as curl would: Expect 100-continue, body only if asked for."""

    def connect() -> socket.socket:
        raw = socket.create_connection((target.host, target.port), timeout=target.timeout)
        if target.scheme != "https":
            return raw
        context = ssl.create_default_context()
        if target.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context.wrap_socket(raw, server_hostname=target.host)

    headers = [("Content-Type", "application/json")]
    if target.user is not None:
        headers.append(("Authorization", target.credentials()))
    answer = post_expecting_continue(
        connect, f"{target.host}:{target.port}", target.prefix + path, size, headers, target.timeout
    )
    return answer.status, answer.body


# ---- running and reporting ----------------------------------------------------------------


@dataclass
class ConformanceOutcome:
    name: str
    result: str
    detail: str


def run_checks(target: Target) -> Iterator[ConformanceOutcome]:
    for name, func in CHECKS:
        try:
            detail = func(target)
            yield ConformanceOutcome(name, PASS, detail)
        except Skip as skip:
            yield ConformanceOutcome(name, SKIP, str(skip))
        except CheckFailed as failure:
            yield ConformanceOutcome(name, FAIL, str(failure))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            yield ConformanceOutcome(name, FAIL, f"{type(exc).__name__}: {exc}")


def print_table(outcomes: list[ConformanceOutcome], out: TextIO) -> None:
    width = max(len(o.name) for o in outcomes)
    print(f"{'check'.ljust(width)}  result  detail", file=out)
    print(f"{'-' * width}  ------  ------", file=out)
    for outcome in outcomes:
        detail = " ".join(outcome.detail.split())
        print(f"{outcome.name.ljust(width)}  {outcome.result:<6}  {detail}", file=out)
    counts = {r: sum(o.result == r for o in outcomes) for r in (PASS, FAIL, SKIP)}
    print(f"\n{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped", file=out)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        data = json.loads(args.endpoint_data)
        if not isinstance(data, dict):
            raise ValueError("--endpoint-data must be a JSON object of named arguments")
        target = Target(
            args.target,
            args.user,
            args.password,
            args.timeout,
            args.insecure,
            endpoint=args.endpoint,
            endpoint_data=data,
            max_request_mb=args.max_request_mb,
        )
    except ValueError as exc:
        print(f"tabserve check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        target.request("GET", "/info")
    except (OSError, http.client.HTTPException) as exc:
        print(f"tabserve check: cannot reach {args.target}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    outcomes = list(run_checks(target))
    print_table(outcomes, out)
    return EXIT_FAILED if any(o.result == FAIL for o in outcomes) else EXIT_OK
