"""The route table served in process: every verb on every route without credentials, routing,
and the route label of metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from tornado.web import RequestHandler

from helpers import AppFactory, InProcessServer
from tabserve.server.handlers import BaseHandler
from tabserve.server.routes import ROUTES, Route
from tabserve.store.passwords import hash_password

USER = ("alice", "alice-password")


@pytest.fixture(scope="module")
def locked(app_factory: AppFactory, tmp_path_factory: pytest.TempPathFactory) -> InProcessServer:
    passwords = tmp_path_factory.mktemp("routes") / "passwords.txt"
    passwords.write_text(f"{USER[0]} {hash_password(USER[0], USER[1], 'tabpy')}\n")
    return app_factory(TABPY_PWD_FILE=str(passwords), TABSERVE_AUTH_MAX_DELAY="0")


def example(route: Route) -> str:
    return route.path.replace("{name}", "status.js" if "assets" in route.path else "add")


# OPTIONS is a CORS preflight: browsers send it without credentials, so it is answered
# without them (with the configured CORS headers and {}, nothing else).
VERBS = [verb for verb in RequestHandler.SUPPORTED_METHODS if verb != "OPTIONS"]


@pytest.mark.parametrize("route", ROUTES, ids=[r.path for r in ROUTES])
def test_every_verb_on_every_route_needs_credentials(locked: InProcessServer, route: Route) -> None:
    """No verb skips authentication, whether the handler implements it or not; a body is
    sent with each, so that the refusal deferred until the body is read is exercised too."""
    for verb in VERBS:
        answer = locked.request(verb, example(route), data=b'{"data": {}}')
        if route.is_public(locked.settings):
            assert answer.status_code != 401, (verb, route.path)
        else:
            assert answer.status_code == 401, (verb, route.path, answer.status_code)
            assert answer.headers["WWW-Authenticate"] == 'Basic realm="tabserve"'
        preflight = locked.request("OPTIONS", example(route))
        assert preflight.status_code == 200 and preflight.content == b"{}", route.path


def test_every_verb_a_handler_can_serve_is_guarded() -> None:
    """The guard wraps whatever verbs Tornado supports, so a handler adding one (HEAD, say)
    gets the deferred 401 and the 413 without saying so."""

    class WithHead(BaseHandler):
        async def head(self) -> None:
            self.finish()

    assert getattr(WithHead.head, "__wrapped__", None) is not None
    for route in ROUTES:
        for verb in route.methods:
            assert getattr(getattr(route.handler, verb), "__wrapped__", None), (route.path, verb)


def test_unknown_verbs_and_paths(locked: InProcessServer) -> None:
    assert locked.request("BREW", "/info").status_code == 405
    missing = locked.get("/no/such/path")
    assert missing.status_code == 404
    assert missing.json()["message"] == "Not found"


def test_every_route_answers_with_credentials(locked: InProcessServer) -> None:
    for route in ROUTES:
        answer = locked.get(example(route), auth=USER)
        if "get" in route.methods:
            assert answer.status_code in (200, 404), (route.path, answer.text)
        else:
            assert answer.status_code == 405, route.path
            assert answer.json()["message"] == "Method not allowed"


def test_metrics_label_requests_by_route_path(app: InProcessServer) -> None:
    app.get("/endpoints/nothing-here")
    app.get("/assets/nothing-here")
    app.get("/no/such/path")
    text = app.get("/metrics").text
    assert 'route="/endpoints/{name}"' in text
    assert 'route="/assets/{name}"' in text
    assert 'route="unmatched"' in text
    assert "nothing-here" not in text


def test_a_trailing_slash_reaches_the_endpoints_list(app: InProcessServer, tmp_path: Path) -> None:
    assert app.get("/endpoints/").json() == app.get("/endpoints").json()
