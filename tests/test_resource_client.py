"""tabserve.Server, the resource-style client (in the shape of Tableau Server Client), against
real tabserve processes over HTTP: endpoints, paging, users, sign-in, server info, evaluate.

Jobs, results and keys are in test_resource_client_jobs.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cloudpickle
import pytest
import requests

import tabserve
from helpers import Server, ServerFactory
from tabserve import (
    APIKeyAuth,
    BadRequest,
    BasicAuth,
    Direction,
    EndpointItem,
    Field,
    Filter,
    NotAcceptable,
    NotFound,
    Operator,
    Pager,
    PaginationItem,
    PublishMode,
    RequestOptions,
    ScriptError,
    Sort,
    Unauthorized,
    UserItem,
)
from tabserve.cli import main

# The server's workers cannot import this module: what is published from it goes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ADMIN = ("admin", "admin-pass-1")


def add(x: list[float], y: list[float]) -> list[float]:
    """Add two lists element-wise."""
    return [a + b for a, b in zip(x, y, strict=True)]


def add_more(x: list[float], y: list[float]) -> list[float]:
    return [a + b + 100 for a, b in zip(x, y, strict=True)]


@pytest.fixture(scope="module")
def open_server(server_factory: ServerFactory) -> Server:
    """Authentication off: the client needs no sign-in."""
    return server_factory(TABPY_EVALUATE_TIMEOUT="10")


@pytest.fixture(scope="module")
def users_server(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """Users in the store (TABSERVE_USERS = store), one admin to start with."""
    workdir = tmp_path_factory.mktemp("users")
    location = str(workdir / "state")
    assert main(["user", "add", "-u", ADMIN[0], "-p", ADMIN[1], "--store", location]) == 0
    return server_factory(workdir=workdir, TABSERVE_USERS="store", TABPY_STATE_PATH=location)


@pytest.fixture
def client(open_server: Server) -> Iterator[tabserve.Server]:
    with tabserve.Server(open_server.url, timeout=30) as server:
        yield server


# -- endpoints ------------------------------------------------------------------------------


def test_publish_query_update_alias_delete(client: tabserve.Server) -> None:
    item = client.endpoints.publish("rc_add", add, description="Adds lists")
    assert isinstance(item, EndpointItem)
    assert (item.name, item.type, item.version, item.docstring) == (
        "rc_add", "model", 1, "Add two lists element-wise."
    )  # fmt: skip
    assert item.created_at is not None and item.created_at.tzinfo is not None
    assert client.endpoints.query("rc_add", [1, 2], [3, 4]) == [4, 6]
    assert client.endpoints.query("rc_add", x=[1], y=[2]) == [3]

    with pytest.raises(BadRequest, match="already exists"):
        client.endpoints.publish("rc_add", add_more)
    again = client.endpoints.publish("rc_add", add_more, mode=PublishMode.Overwrite)
    assert again.version == 2
    assert client.endpoints.query("rc_add", [1], [1]) == [102]
    # Overwrite of a name not yet taken makes the first version.
    fresh = client.endpoints.publish("rc_fresh", add, mode=PublishMode.Overwrite)
    assert fresh.version == 1

    current = client.endpoints.get_by_name("rc_add")
    changed = client.endpoints.update(replace(current, description="Adds a hundred more"))
    assert (changed.description, changed.version) == ("Adds a hundred more", 2)
    assert client.endpoints.get_by_name("rc_add").description == "Adds a hundred more"

    alias = client.endpoints.alias("rc_plus", "rc_add", description="another name")
    assert (alias.type, alias.target) == ("alias", "rc_add")
    assert client.endpoints.query("rc_plus", [0], [0]) == [100]
    with pytest.raises(BadRequest):
        client.endpoints.alias("rc_plus", "rc_fresh")
    assert client.endpoints.alias("rc_plus", "rc_fresh", mode=PublishMode.Overwrite).target == (
        "rc_fresh"
    )

    for name in ("rc_plus", "rc_add", "rc_fresh"):
        client.endpoints.delete(name)
    with pytest.raises(NotFound):
        client.endpoints.get_by_name("rc_add")
    with pytest.raises(NotFound):
        client.endpoints.query("rc_add", [1], [1])


def test_evaluate_and_its_errors(client: tabserve.Server) -> None:
    assert client.evaluate("return [a + b for a, b in zip(_arg1, _arg2)]", [1, 2], [3, 4]) == [4, 6]
    assert client.evaluate("return _arg1 * 2", _arg1=21) == 42
    with pytest.raises(ScriptError) as caught:
        client.evaluate("return 1 / 0")
    assert "ZeroDivisionError" in str(caught.value)
    with pytest.raises(ValueError):
        client.evaluate("return 1", 1, _arg1=2)


def test_server_info(client: tabserve.Server) -> None:
    info = client.server_info.get()
    assert info.server_version == tabserve.__version__
    assert info.evaluate_enabled is True
    assert info.authentication_required is False
    assert "gzip_enabled" in info.features


# -- paging ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paged(server_factory: ServerFactory) -> tabserve.Server:
    """250 endpoints: 10 models and 240 aliases of them (an alias is an endpoint like any
    other for listing, and needs no worker to load), descriptions with commas."""
    served = server_factory()
    server = tabserve.Server(served.url, timeout=30)
    for i in range(10):
        server.endpoints.publish(f"model{i:03d}", add, description=f"model {i}, group {i % 3}")
    for i in range(10, 250):
        server.endpoints.alias(
            f"model{i:03d}", f"model{i % 10:03d}", description=f"alias {i}, group {i % 3}"
        )
    return server


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_pages_of_250_endpoints_cover_each_once(paged: tabserve.Server, size: int) -> None:
    seen: list[str] = []
    number = 1
    while True:
        items, pagination = paged.endpoints.get(RequestOptions(pagenumber=number, pagesize=size))
        assert pagination == PaginationItem(number, size, 250)
        if not items:
            break
        assert len(items) == min(size, 250 - len(seen))
        seen.extend(item.name for item in items)
        number += 1
    assert seen == [f"model{i:03d}" for i in range(250)]
    assert number - 1 == -(-250 // size)


def test_pager_iterates_every_endpoint(paged: tabserve.Server) -> None:
    names = [item.name for item in Pager(paged.endpoints, RequestOptions(pagesize=7))]
    assert names == [f"model{i:03d}" for i in range(250)]
    assert len(list(Pager(paged.endpoints))) == 250  # default page size: 100
    options = RequestOptions(pagesize=30)
    options.filter.add(Filter(Field.Type, Operator.Equals, "model"))
    assert [item.name for item in Pager(paged.endpoints, options)] == [
        f"model{i:03d}" for i in range(10)
    ]


def test_filters_and_sorts(paged: tabserve.Server) -> None:
    options = RequestOptions(pagesize=1000)
    # A value with a comma: sent escaped, matched whole.
    options.filter.add(Filter(Field.Description, Operator.Equals, "alias 42, group 0"))
    items, pagination = paged.endpoints.get(options)
    assert [item.name for item in items] == ["model042"] and pagination.total_available == 1

    options = RequestOptions(pagesize=5)
    options.filter.add(Filter(Field.Description, Operator.Has, ", group 2"))
    options.sort.add(Sort(Field.Name, Direction.Desc))
    items, pagination = paged.endpoints.get(options)
    assert [item.name for item in items] == [f"model{i:03d}" for i in (248, 245, 242, 239, 236)]
    assert pagination.total_available == len([i for i in range(250) if i % 3 == 2])

    options = RequestOptions(pagesize=3)
    options.filter.add(Filter(Field.Name, Operator.In, ["model001", "model200", "nope"]))
    options.sort.add(Sort(Field.LastModified, Direction.Desc))
    options.sort.add(Sort(Field.Name, Direction.Asc))
    items, _ = paged.endpoints.get(options)
    assert sorted(item.name for item in items) == ["model001", "model200"]
    # Aliases were published after the models: the newest first.
    stamps = [item.updated_at for item in items]
    assert stamps == sorted(stamps, reverse=True)  # type: ignore[type-var]


def test_keyword_filter_form(paged: tabserve.Server) -> None:
    models = paged.endpoints.filter(type="model")
    assert len(models) == 10
    assert [item.name for item in models.order_by("-name")][:2] == ["model009", "model008"]
    chosen = paged.endpoints.filter(name__in=["model003", "model150"], version__gte=1)
    assert sorted(item.name for item in chosen) == ["model003", "model150"]
    assert paged.endpoints.filter(description__has="ALIAS 249")[0].name == "model249"
    with pytest.raises(ValueError, match="unknown operator"):
        paged.endpoints.filter(name__like="x")


def test_bad_paging_is_a_clear_400(paged: tabserve.Server) -> None:
    with pytest.raises(BadRequest, match="page_size"):
        paged.endpoints.get(RequestOptions(pagesize=1001))
    options = RequestOptions()
    options.filter.add(Filter("colour", Operator.Equals, "red"))
    with pytest.raises(BadRequest) as caught:
        paged.endpoints.get(options)
    assert "name" in caught.value.info["fields"]  # type: ignore[index]


def test_endpoints_without_paging_parameters_answer_as_tabpy(paged: tabserve.Server) -> None:
    url = paged.server_address
    plain = requests.get(url + "endpoints", timeout=30)
    assert plain.status_code == 200
    listed = plain.json()
    assert isinstance(listed, dict) and len(listed) == 250 and "pagination" not in listed
    assert "name" not in listed["model000"]  # TabPy's info objects, keyed by name
    paged_answer = requests.get(url + "endpoints", params={"page_size": "2"}, timeout=30).json()
    assert paged_answer["pagination"] == {"page_number": 1, "page_size": 2, "total_available": 250}
    assert paged_answer["endpoints"][0] == {"name": "model000", **listed["model000"]}
    # Repeated filter parameters add up.
    both = requests.get(
        url + "endpoints",
        params=[("filter", "type:eq:alias"), ("filter", "name:has:model01"), ("page_size", "5")],
        timeout=30,
    ).json()
    assert [e["name"] for e in both["endpoints"]] == [f"model{i:03d}" for i in range(10, 15)]


# -- sign-in and users ----------------------------------------------------------------------


def test_sign_in_is_a_context_manager_and_signs_out(users_server: Server) -> None:
    server = tabserve.Server(users_server.url)
    with pytest.raises(Unauthorized):
        server.endpoints.get()
    with pytest.raises(Unauthorized):
        server.auth.sign_in(BasicAuth(ADMIN[0], "wrong"))
    assert not server.auth.signed_in
    with server.auth.sign_in(BasicAuth(*ADMIN)):
        assert server.auth.signed_in
        assert server.endpoints.get()[1].total_available == 0
    assert not server.auth.signed_in
    with pytest.raises(Unauthorized):
        server.server_info.get()
    assert "admin-pass-1" not in repr(BasicAuth(*ADMIN))


def test_users_get_add_update_delete(users_server: Server) -> None:
    server = tabserve.Server(users_server.url)
    with server.auth.sign_in(BasicAuth(*ADMIN)):
        users, pagination = server.users.get()
        assert [u.name for u in users] == ["admin"] and pagination.total_available == 1
        added = server.users.add(UserItem("reader", frozenset({"query"})), "reader-pass")
        assert added == UserItem("reader", frozenset({"query"}))
        server.users.add("writer", "writer-pass")
        with pytest.raises(BadRequest, match="already exists"):
            server.users.add("writer", "again")
        assert [u.name for u in server.users.filter(permissions__has="manage")] == [
            "admin", "writer"
        ]  # fmt: skip
        assert len(server.users.filter(name__in=["reader", "nobody"])) == 1

    # The new user signs in at once, with their own permissions.
    reader = tabserve.Server(users_server.url)
    with reader.auth.sign_in(BasicAuth("reader", "reader-pass")):
        with pytest.raises(tabserve.Forbidden):
            reader.users.get()

    with server.auth.sign_in(BasicAuth(*ADMIN)):
        updated = server.users.update(UserItem("reader", frozenset({"query", "evaluate"})))
        assert updated.permissions == frozenset({"query", "evaluate"})
        server.users.update(UserItem("reader", frozenset({"query"})), password="new-pass")
        assert server.users.get_by_name("reader").permissions == frozenset({"query"})
        server.users.delete("writer")
        with pytest.raises(NotFound):
            server.users.delete("writer")
        assert {u.name for u in Pager(server.users, RequestOptions(pagesize=1))} == {
            "admin", "reader"
        }  # fmt: skip
    with pytest.raises(Unauthorized):
        reader.auth.sign_in(BasicAuth("reader", "reader-pass"))
    with reader.auth.sign_in(BasicAuth("reader", "new-pass")):
        assert reader.server_info.get().authentication_required


def test_credentials_sent_to_a_server_without_authentication_are_refused(
    client: tabserve.Server,
) -> None:
    for auth in (APIKeyAuth("some-key"), BasicAuth("alice", "secret")):
        with pytest.raises(NotAcceptable):
            client.auth.sign_in(auth)
        assert not client.auth.signed_in
    assert client.server_info.get().server_version  # still usable without credentials


def test_users_are_404_when_not_in_the_store(client: tabserve.Server) -> None:
    with pytest.raises(NotFound, match="not kept in the store"):
        client.users.get()


# -- the client's own rules -----------------------------------------------------------------


def test_closed_server_refuses_requests(open_server: Server) -> None:
    with tabserve.Server(open_server.url) as server:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        server.server_info.get()


def test_download_checks_its_file_type(client: tabserve.Server, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="csv"):
        client.results.download("x", tmp_path / "x.xml", filetype="xml")
    assert not (tmp_path / "x.xml").exists()
