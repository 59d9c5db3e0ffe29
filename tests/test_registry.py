"""The endpoint registry on its own: versions, aliases, bad requests, on both stores (the
state directory and PostgreSQL); then the state directory's own: state.ini's format and
atomic writes."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import cloudpickle
import pytest
from pg import PostgresServer

from tabserve.errors import BadRequest, NotFound, StoreUnavailable
from tabserve.server.registry import EndpointRegistry
from tabserve.store.backends import open_store
from tabserve.store.state_dir import ensure_state_dir
from tabserve.worker.unpickling import load_archive

_databases = iter(range(10**6))


def double(x: list[int]) -> list[int]:
    return [2 * v for v in x]


def archive_of(obj: object) -> str:
    return base64.b64encode(cloudpickle.dumps(obj)).decode()


def open_registry(location: str | Path, tmp_path: Path, cache: str = "cache") -> EndpointRegistry:
    """A registry on the store at ``location``, loaded (as a server does at start)."""
    store = open_store(location, cache=tmp_path / cache)
    store.migrate()
    registry = EndpointRegistry(store, tmp_path / "staging")
    registry.refresh()
    return registry


@pytest.fixture(params=["statedir", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "statedir":
        ensure_state_dir(tmp_path / "state")
        return str(tmp_path / "state")
    pg: PostgresServer = request.getfixturevalue("postgres")
    return pg.fresh_database(f"registry{next(_databases)}")


@pytest.fixture
def registry(location: str, tmp_path: Path) -> EndpointRegistry:
    return open_registry(location, tmp_path)


@pytest.fixture
def state_registry(tmp_path: Path) -> EndpointRegistry:
    """The state directory's registry, for what only it has (state.ini)."""
    ensure_state_dir(tmp_path / "state")
    return open_registry(tmp_path / "state", tmp_path)


def reopened(registry: EndpointRegistry, tmp_path: Path) -> EndpointRegistry:
    """Another registry on the same store, as another process or replica would have."""
    location = getattr(registry.store, "path", None) or registry.store.db.url  # type: ignore[attr-defined]
    return open_registry(location, tmp_path, cache="cache-reopened")


def model(name: str = "double", **extra: object) -> dict[str, object]:
    return {"name": name, "type": "model", "archive": archive_of(double), **extra}


def test_add_writes_tabpy_format_and_the_archive(state_registry: EndpointRegistry) -> None:
    registry = state_registry
    endpoint, archive = registry.add(model(description="twice", schema={"x": "list"}))
    assert endpoint.version == 1
    assert archive == registry.store.archives / "double" / "1" / "pickle_archive"  # type: ignore[attr-defined]
    assert load_archive(archive)([1, 2]) == [2, 4]
    text = registry.store.state_file.read_text()  # type: ignore[attr-defined]
    assert "[Query Objects Service Versions]" in text and "[Query Objects Docstrings]" in text
    line = json.loads(text.split("double = ", 1)[1].splitlines()[0])
    assert list(line)[:9] == [
        "description", "type", "version", "dependencies", "target", "creation_time",
        "last_modified_time", "schema", "is_public",
    ]  # fmt: skip
    assert line["schema"] == {"x": "list"}


def test_docstring_with_percent_unicode_and_newlines_round_trips(
    registry: EndpointRegistry, tmp_path: Path
) -> None:
    docstring = 'Squares – naïve résumé 100%\n    indented line\n\n"quoted" \\n literal %(x)s'
    registry.add(model(docstring=docstring, description="50% off"))
    reloaded = reopened(registry, tmp_path)
    assert reloaded.get("double").docstring == docstring
    assert reloaded.get("double").description == "50% off"


def test_state_survives_reload(registry: EndpointRegistry, tmp_path: Path) -> None:
    registry.add(model())
    registry.add({"name": "twice", "type": "alias", "target": "double"})
    reloaded = reopened(registry, tmp_path)
    assert set(reloaded.all()) == {"double", "twice"}
    assert reloaded.resolve("twice").name == "double"


def test_new_versions_keep_only_current_and_previous(registry: EndpointRegistry) -> None:
    registry.add(model())
    for _ in range(3):
        registry.update("double", {"should_update_version": True, "archive": archive_of(double)})
    assert registry.get("double").version == 4
    kept = [v for v in (1, 2, 3, 4) if registry.store.archive("double", v) is not None]
    assert kept == [3, 4]


def test_metadata_update_keeps_fields_not_sent(registry: EndpointRegistry) -> None:
    registry.add(model(schema={"in": 1}, is_public=True, description="d"))
    _, endpoint, archive = registry.update("double", {"description": "new"})
    assert archive is None
    assert endpoint.version == 1
    assert (endpoint.description, endpoint.schema, endpoint.is_public) == ("new", {"in": 1}, True)


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"type": "model"}, "name is required"),
        ({"name": "bad/name", "type": "model"}, "endpoint name can only contain"),
        ({"name": "tab\tname", "type": "model"}, "endpoint name can only contain"),
        ({"name": "x", "type": "banana", "archive": ""}, "endpoint type must be one of"),
        ({"name": "x"}, "endpoint type must be one of"),
        ({"name": "x", "type": "model"}, "src_path is required"),
        ({"name": "x", "type": "model", "archive": "!!"}, "archive is not valid base64"),
        ({"name": "x", "type": "model", "src_path": "/etc"}, "Invalid source path"),
        ({"name": "x", "type": "alias"}, "Target is required"),
        ({"name": "x", "type": "alias", "target": "nope"}, "not a deployed endpoint"),
        (
            {"name": "x", "type": "model", "archive": "", "python_version": "2.7.18"},
            "pickled with Python 2.7.18",
        ),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    registry: EndpointRegistry, request_body: dict[str, object], message: str
) -> None:
    before = registry.store.snapshot()
    with pytest.raises(BadRequest) as caught:
        registry.add(request_body)
    assert message in str(caught.value)
    assert registry.store.snapshot() == before
    assert registry.all() == {}


def test_duplicate_and_missing_names(registry: EndpointRegistry) -> None:
    registry.add(model())
    with pytest.raises(BadRequest, match="already exists"):
        registry.add(model())
    with pytest.raises(NotFound):
        registry.update("nope", {})
    with pytest.raises(NotFound):
        registry.delete("nope")


def test_delete_refuses_while_an_alias_depends_on_it(registry: EndpointRegistry) -> None:
    registry.add(model())
    registry.add({"name": "twice", "type": "alias", "target": "double"})
    with pytest.raises(BadRequest, match="twice depends on it"):
        registry.delete("double")
    registry.delete("twice")
    registry.delete("double")
    assert registry.all() == {}
    assert registry.store.archive("double", 1) is None


def test_alias_cycles_are_refused(registry: EndpointRegistry) -> None:
    registry.add(model())
    registry.add({"name": "a", "type": "alias", "target": "double"})
    registry.add({"name": "b", "type": "alias", "target": "a"})
    with pytest.raises(BadRequest, match="cycle"):
        registry.update("a", {"target": "b"})


def test_staged_src_path_is_copied_then_cleaned(registry: EndpointRegistry) -> None:
    staged = registry.staging / "endpoints" / "double" / "1"
    staged.mkdir(parents=True)
    (staged / "pickle_archive").write_bytes(cloudpickle.dumps(double))
    _, archive = registry.add({"name": "double", "type": "model", "src_path": str(staged)})
    assert archive is not None and load_archive(archive)([3]) == [6]
    registry.update("double", {"should_update_version": True, "archive": archive_of(double)})
    assert not (registry.staging / "endpoints" / "double").exists()


def test_write_is_atomic_when_the_disk_write_fails(
    state_registry: EndpointRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry = state_registry
    state_file = registry.store.state_file  # type: ignore[attr-defined]
    registry.add(model())
    before = state_file.read_bytes()

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreUnavailable, match="disk full"):
        registry.add(model("other"))
    monkeypatch.undo()
    assert state_file.read_bytes() == before
    assert [p.name for p in state_file.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert set(reopened(registry, tmp_path).all()) == {"double"}


def test_percent_in_service_info_survives_a_rewrite(state_registry: EndpointRegistry) -> None:
    state_file = state_registry.store.state_file  # type: ignore[attr-defined]
    text = state_file.read_text().replace("Description =", "Description = 100% up")
    state_file.write_text(text)
    state_registry.add(model())
    assert "Description = 100% up" in state_file.read_text()


def test_a_hand_edited_nonsense_entry_is_skipped(
    state_registry: EndpointRegistry, tmp_path: Path
) -> None:
    registry = state_registry
    state_file = registry.store.state_file  # type: ignore[attr-defined]
    registry.add(model())
    text = state_file.read_text().replace(
        "[Query Objects Service Versions]\n",
        '[Query Objects Service Versions]\nbroken = {"version": "two", "type": "model"}\n'
        'odd = {"version": 1, "colour": "red"}\n',
    )
    state_file.write_text(text)
    reloaded = reopened(registry, tmp_path)
    assert set(reloaded.all()) == {"double", "odd"}  # unknown keys are ignored, bad values not


def test_src_path_must_be_an_upload_directory_holding_a_real_file(
    registry: EndpointRegistry, tmp_path: Path
) -> None:
    (registry.staging / "endpoints" / "x" / "1").mkdir(parents=True)
    for src in (registry.staging, registry.staging / "endpoints"):
        with pytest.raises(BadRequest, match="Invalid source path"):
            registry.add({"name": "x", "type": "model", "src_path": str(src)})
    secret = tmp_path / "secret.bin"
    secret.write_bytes(cloudpickle.dumps(double))
    (registry.staging / "endpoints" / "x" / "1" / "pickle_archive").symlink_to(secret)
    with pytest.raises(BadRequest, match="Invalid source path"):
        registry.add(
            {
                "name": "x",
                "type": "model",
                "src_path": str(registry.staging / "endpoints" / "x" / "1"),
            }
        )


def test_two_registries_deploying_one_name_get_consecutive_versions(
    registry: EndpointRegistry, tmp_path: Path
) -> None:
    """Two processes (or replicas) update one endpoint at once: no update is lost."""
    import threading

    registry.add(model())
    other = reopened(registry, tmp_path)
    got: list[int] = []

    def bump(which: EndpointRegistry) -> None:
        for _ in range(4):
            _, endpoint, _ = which.update(
                "double", {"should_update_version": True, "archive": archive_of(double)}
            )
            got.append(endpoint.version)

    threads = [threading.Thread(target=bump, args=(r,)) for r in (registry, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == list(range(2, 10))
    registry.refresh()
    other.refresh()
    assert registry.get("double").version == other.get("double").version == 9


def test_a_failed_load_is_undone_unless_a_newer_deploy_came_first(
    registry: EndpointRegistry, tmp_path: Path
) -> None:
    registry.add(model())
    previous, bad, _ = registry.update(
        "double", {"should_update_version": True, "archive": archive_of(double)}
    )
    registry.discard_version(bad, previous)
    assert registry.get("double").version == 1
    assert reopened(registry, tmp_path).get("double").version == 1
    # Another replica deployed version 2 again before this one's undo: it stays.
    previous, mine, _ = registry.update(
        "double", {"should_update_version": True, "archive": archive_of(double)}
    )
    other = reopened(registry, tmp_path)
    other.update("double", {"should_update_version": True, "archive": archive_of(double)})
    registry.discard_version(mine, previous)
    assert reopened(registry, tmp_path).get("double").version == 3
