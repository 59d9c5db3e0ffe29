"""Arrow Flight (TABPY_ARROW_ENABLE): TabPy's protocol as Tableau Prep uses it, minus its defects.

Real tabserve processes with the Flight server on a free port, driven by pyarrow.flight over
loopback and by HTTP for /evaluate.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.flight as fl
import pytest
import requests
from pki import make_pki

from helpers import Server, ServerFactory, free_port
from tabserve.server.flight import data_path
from tabserve.store.passwords import hash_password

ALICE = ("alice", "alice-pass")  # every permission
BOB = ("bob", "bob-pass")  # evaluate only
QUENTIN = ("quentin", "q-pass")  # query only
ROWS = 100_000


def basic(user: tuple[str, str]) -> tuple[bytes, bytes]:
    token = base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    return b"authorization", f"Basic {token}".encode()


def options(user: tuple[str, str] | None) -> fl.FlightCallOptions:
    return fl.FlightCallOptions(headers=[basic(user)] if user else [])


class Flight:
    """A pyarrow.flight client of one server, as one user (None: no credentials)."""

    def __init__(self, server: Server, user: tuple[str, str] | None, root: bytes | None = None):
        self.server = server
        self.user = user
        scheme = "grpc+tls" if root else "grpc+tcp"
        kwargs = {"tls_root_certs": root} if root else {}
        self.client = fl.connect(f"{scheme}://localhost:{server.flight_port}", **kwargs)
        self.options = options(user)

    def unique_path(self) -> str:
        results = list(self.client.do_action(fl.Action("getUniquePath", b""), self.options))
        return results[0].body.to_pybytes().decode()

    def put(self, path: str, table: pa.Table) -> None:
        descriptor = fl.FlightDescriptor.for_path(path)
        writer, _ = self.client.do_put(descriptor, table.schema, self.options)
        writer.write_table(table, max_chunksize=16_384)
        writer.close()

    def info(self, path: str) -> fl.FlightInfo:
        return self.client.get_flight_info(fl.FlightDescriptor.for_path(path), self.options)

    def get(self, ticket: fl.Ticket) -> pa.Table:
        return self.client.do_get(ticket, self.options).read_all()

    def listed(self) -> list[str]:
        return [
            info.descriptor.path[0].decode() for info in self.client.list_flights(b"", self.options)
        ]

    def action(self, kind: str) -> list[bytes]:
        results = self.client.do_action(fl.Action(kind, b""), self.options)
        return [r.body.to_pybytes() for r in results]

    def evaluate(self, script: str, path: object) -> requests.Response:
        return self.server.post(
            "/evaluate", json={"script": script, "dataPath": path}, auth=self.user
        )

    def close(self) -> None:
        self.client.close()


def sample(rows: int = ROWS) -> pa.Table:
    start = dt.datetime(2024, 1, 1)
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "value": pa.array([i / 4 for i in range(rows)], pa.float64()),
            "label": pa.array([f"row {i}" for i in range(rows)], pa.string()),
            "when": pa.array([start + dt.timedelta(minutes=i) for i in range(rows)]),
        }
    )


def start_flight_server(server_factory: ServerFactory, **config: str) -> Server:
    port = free_port()
    server = server_factory(TABPY_ARROW_ENABLE="true", TABPY_ARROWFLIGHT_PORT=str(port), **config)
    server.flight_port = port  # type: ignore[attr-defined]
    return server


def password_file(directory: Path) -> Path:
    path = directory / "passwords.txt"
    path.write_text(
        f"{ALICE[0]} {hash_password(*ALICE)}\n"
        f"{BOB[0]} {hash_password(*BOB)} evaluate\n"
        f"{QUENTIN[0]} {hash_password(*QUENTIN)} query\n"
    )
    return path


@pytest.fixture(scope="module")
def secured(server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """Authentication on, default TTL and cap."""
    passwords = password_file(tmp_path_factory.mktemp("flight-auth"))
    return start_flight_server(
        server_factory,
        auth=ALICE,
        TABPY_PWD_FILE=str(passwords),
        TABSERVE_AUTH_MAX_DELAY="0",
        TABPY_EVALUATE_TIMEOUT="20",
    )


@pytest.fixture(scope="module")
def small(server_factory: ServerFactory) -> Server:
    """No authentication; tables live 3 s, the store holds 1 MiB, scripts get 6 s."""
    return start_flight_server(
        server_factory,
        TABSERVE_FLIGHT_TTL="3",
        TABSERVE_FLIGHT_MAX_MB="1",
        TABPY_EVALUATE_TIMEOUT="6",
        TABSERVE_WORKERS="1",
    )


@pytest.fixture
def alice(secured: Server) -> Iterator[Flight]:
    client = Flight(secured, ALICE)
    yield client
    client.close()


@pytest.fixture
def bob(secured: Server) -> Iterator[Flight]:
    client = Flight(secured, BOB)
    yield client
    client.close()


@pytest.fixture
def anonymous(small: Server) -> Iterator[Flight]:
    client = Flight(small, None)
    yield client
    client.close()


# -- the round trip ----------------------------------------------------------------------


def test_round_trip_as_prep_does_it(secured: Server) -> None:
    """Handshake for a token, get a path, put 100,000 rows, evaluate, get the info, get."""
    client = fl.connect(f"grpc+tcp://localhost:{secured.flight_port}")  # type: ignore[attr-defined]
    token = client.authenticate_basic_token(*ALICE)
    assert token[1].startswith(b"Bearer ")
    flight = Flight(secured, ALICE)
    flight.client, flight.options = client, fl.FlightCallOptions(headers=[token])

    path = flight.unique_path()
    table = sample()
    flight.put(path, table)
    script = (
        "assert isinstance(_arg1, pd.DataFrame), type(_arg1)\n"
        "assert str(_arg1['when'].dtype).startswith('datetime64'), _arg1.dtypes\n"
        "_arg1['double'] = _arg1['value'] * 2\n"
        "return _arg1"
    )
    response = flight.evaluate(script, path)
    assert response.status_code == 200, response.text
    output = response.json()["outputDataPath"]
    assert output != path

    info = flight.info(output)
    assert info.total_records == ROWS and info.total_bytes > 0
    assert info.schema.names == ["id", "value", "label", "when", "double"]
    (endpoint,) = info.endpoints
    assert [loc.uri.decode() for loc in endpoint.locations] == [
        f"grpc+tcp://127.0.0.1:{secured.flight_port}"  # type: ignore[attr-defined]
    ]
    result = flight.get(endpoint.ticket)
    assert result.num_rows == ROWS
    assert result.column("double").to_pylist()[:3] == [0.0, 0.5, 1.0]
    assert result.column("when").to_pylist()[-1] == table.column("when").to_pylist()[-1]
    assert result.column("label")[ROWS - 1].as_py() == f"row {ROWS - 1}"

    # A result is fetched once; the input was consumed by /evaluate, as in TabPy.
    with pytest.raises(pa.ArrowKeyError, match="Flight not found"):
        flight.get(endpoint.ticket)
    with pytest.raises(pa.ArrowKeyError, match="Flight not found"):
        flight.info(path)


def test_basic_credentials_on_every_call_work_too(alice: Flight) -> None:
    path = alice.unique_path()
    alice.put(path, sample(10))
    assert path in alice.listed()
    assert alice.info(path).total_records == 10
    alice.action("clear")


def test_actions_are_tabpys(alice: Flight) -> None:
    kinds = {action.type for action in alice.client.list_actions(alice.options)}
    assert {"getUniquePath", "clear", "shutdown", "healthcheck"} <= kinds
    assert alice.action("healthcheck") == []
    with pytest.raises(pa.ArrowKeyError, match="Unknown action"):
        alice.action("format-disk")


def test_evaluate_answers_as_tabpy(alice: Flight) -> None:
    path = alice.unique_path()
    alice.put(path, sample(5))
    none = alice.evaluate("return None", path)
    assert (none.status_code, none.text) == (200, "null")

    alice.put(path, sample(5))
    as_dict = alice.evaluate("return {'n': [len(_arg1)]}", path)
    assert as_dict.status_code == 200, as_dict.text
    ticket = alice.info(as_dict.json()["outputDataPath"]).endpoints[0].ticket
    assert alice.get(ticket).to_pydict() == {"n": [5]}

    alice.put(path, sample(5))
    not_a_table = alice.evaluate("return [1, 2, 3]", path)
    assert not_a_table.status_code == 500
    assert not_a_table.json()["message"] == "Error processing script"
    assert not_a_table.json()["info"].startswith("ValueError : ")

    unknown = alice.evaluate("return _arg1", "no-such-path")
    assert unknown.status_code == 500
    assert unknown.json() == {
        "message": "Error processing script",
        "info": "KeyError : 'Flight not found.'",
    }
    assert alice.evaluate("return _arg1", 42).status_code == 400
    alice.put(path, sample(5))
    no_script = alice.server.post("/evaluate", json={"dataPath": path}, auth=ALICE)
    assert (no_script.status_code, no_script.json()["message"]) == (400, "Script is empty.")
    assert alice.info(path).total_records == 5  # a refused request leaves the table alone
    alice.action("clear")


def test_failed_script_reports_its_error(alice: Flight) -> None:
    path = alice.unique_path()
    alice.put(path, sample(3))
    response = alice.evaluate("return 1 / 0", path)
    assert response.status_code == 500
    assert response.json()["info"].startswith("ZeroDivisionError : division by zero")


def test_plain_evaluate_still_works_with_arrow_on(secured: Server) -> None:
    response = secured.evaluate("return [x * 2 for x in _arg1]", _arg1=[1, 2])
    assert response.json() == [2, 4]


# -- who may do what --------------------------------------------------------------------


def test_second_user_cannot_list_or_fetch_the_first_users_table(alice: Flight, bob: Flight) -> None:
    path = alice.unique_path()
    alice.put(path, sample(20))
    ticket = alice.info(path).endpoints[0].ticket

    assert path not in bob.listed()
    with pytest.raises(pa.ArrowKeyError, match="Flight not found"):
        bob.info(path)
    with pytest.raises(pa.ArrowKeyError, match="Flight not found"):
        bob.get(ticket)
    refused = bob.evaluate("return _arg1", path)
    assert refused.status_code == 500 and "Flight not found" in refused.json()["info"]

    # The same path is a different table for each user: bob's put does not touch alice's.
    bob.put(path, sample(3))
    assert bob.info(path).total_records == 3
    assert alice.info(path).total_records == 20
    assert path in alice.listed() and path in bob.listed()
    assert alice.get(ticket).num_rows == 20
    assert bob.get(bob.info(path).endpoints[0].ticket).num_rows == 3


def test_calls_without_valid_credentials_are_refused(secured: Server) -> None:
    for user in (None, ("alice", "wrong"), ("mallory", "x")):
        stranger = Flight(secured, user)
        with pytest.raises(fl.FlightUnauthenticatedError):
            stranger.unique_path()
        with pytest.raises(fl.FlightUnauthenticatedError):
            stranger.listed()
        stranger.close()
    forged = fl.connect(f"grpc+tcp://localhost:{secured.flight_port}")  # type: ignore[attr-defined]
    bearer = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer not-a-token")])
    with pytest.raises(fl.FlightUnauthenticatedError):
        list(forged.list_flights(b"", bearer))


def test_api_keys_over_flight_user_keys_act_as_their_user_endpoint_keys_are_refused(
    secured: Server,
) -> None:
    import cloudpickle

    def ident(x: list[int]) -> list[int]:
        return x

    archive = base64.b64encode(cloudpickle.dumps(ident)).decode()
    deployed = secured.post(
        "/endpoints", json={"name": "ident", "type": "model", "archive": archive}
    )
    assert deployed.status_code == 201, deployed.text
    keys = {}
    for whose in ({"user": "bob"}, {"endpoint": "ident"}):
        created = secured.post("/keys", json=whose)
        assert created.status_code == 201, created.text
        keys[next(iter(whose))] = created.json()["key"]["secret"]
    client = fl.connect(f"grpc+tcp://localhost:{secured.flight_port}")  # type: ignore[attr-defined]
    try:
        as_bob = fl.FlightCallOptions(headers=[(b"authorization", f"Key {keys['user']}".encode())])
        path = list(client.do_action(fl.Action("getUniquePath", b""), as_bob))[0].body
        writer, _ = client.do_put(
            fl.FlightDescriptor.for_path(path.to_pybytes().decode()), sample(3).schema, as_bob
        )
        writer.write_table(sample(3))
        writer.close()
        endpoint = fl.FlightCallOptions(
            headers=[(b"authorization", f"Key {keys['endpoint']}".encode())]
        )
        with pytest.raises(fl.FlightUnauthorizedError, match="An endpoint key reaches"):
            list(client.do_action(fl.Action("getUniquePath", b""), endpoint))
    finally:
        client.close()


def test_uploading_needs_the_evaluate_permission(secured: Server) -> None:
    quentin = Flight(secured, QUENTIN)
    with pytest.raises(fl.FlightUnauthorizedError, match="evaluate"):
        quentin.put(quentin.unique_path(), sample(3))
    quentin.close()


def test_clear_and_shutdown_need_manage(alice: Flight, bob: Flight) -> None:
    path = bob.unique_path()
    bob.put(path, sample(4))
    for kind in ("clear", "shutdown"):
        with pytest.raises(fl.FlightUnauthorizedError, match="manage"):
            bob.action(kind)
    assert bob.info(path).total_records == 4  # nothing was cleared, the server still runs

    alice.action("clear")  # an administrator's clear empties every user's tables
    with pytest.raises(pa.ArrowKeyError):
        bob.info(path)


def test_shutdown_by_a_manager_stops_flight_but_not_http(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = start_flight_server(
        server_factory, auth=ALICE, TABPY_PWD_FILE=str(password_file(tmp_path))
    )
    alice = Flight(server, ALICE)
    alice.put(alice.unique_path(), sample(3))
    assert alice.action("shutdown") == [b"Shutdown!"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and flight_process(server) is not None:
        time.sleep(0.1)
    assert flight_process(server) is None
    assert server.evaluate("return 1").json() == 1
    refused = alice.evaluate("return _arg1", "anything")
    assert refused.status_code == 503
    ready = server.get("/health/ready").json()
    assert "alice" in str(ready)
    assert "shutdown action" in server.log()
    alice.close()
    server.stop()


# -- lifetime, size, isolation of processes ---------------------------------------------


def test_an_expired_table_is_gone(anonymous: Flight) -> None:
    path = anonymous.unique_path()
    anonymous.put(path, sample(10))
    assert anonymous.info(path).total_records == 10
    time.sleep(3.5)
    with pytest.raises(pa.ArrowKeyError, match="Flight not found"):
        anonymous.info(path)
    assert path not in anonymous.listed()
    gone = anonymous.evaluate("return _arg1", path)
    assert gone.status_code == 500 and "Flight not found" in gone.json()["info"]


def test_the_store_is_capped(anonymous: Flight) -> None:
    with pytest.raises(fl.FlightServerError, match="TABSERVE_FLIGHT_MAX_MB"):
        anonymous.put(anonymous.unique_path(), sample(60_000))  # a few MB
    path = anonymous.unique_path()
    anonymous.put(path, sample(100))  # the refused table left nothing behind
    assert anonymous.info(path).total_records == 100
    # A result that would not fit is refused too, and says why.
    grow = "return pd.DataFrame({'x': range(400_000)})"
    too_big = anonymous.evaluate(grow, path)
    assert too_big.status_code == 500
    assert "TABSERVE_FLIGHT_MAX_MB" in too_big.json()["info"]


def test_a_runaway_script_is_killed_like_any_other(small: Server, anonymous: Flight) -> None:
    before = worker_pids(small)
    path = anonymous.unique_path()
    anonymous.put(path, sample(10))
    started = time.monotonic()
    response = anonymous.evaluate("import time\ntime.sleep(60)", path)
    assert response.status_code == 408
    assert time.monotonic() - started < 30
    assert response.json()["message"].startswith("User defined script timed out")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and worker_pids(small) & before == before:
        time.sleep(0.1)
    assert not before <= worker_pids(small)  # the worker was replaced
    anonymous.put(path, sample(10))
    again = anonymous.evaluate("return _arg1.head(2)", path)
    assert again.status_code == 200, again.text


def test_front_end_never_loads_numpy_pandas_or_pyarrow(small: Server) -> None:
    front = psutil.Process(small.process.pid)
    loaded = {m.path for m in front.memory_maps()}
    for library in ("numpy", "pandas", "pyarrow"):
        assert not any(f"/{library}/" in path for path in loaded), library
    flight = flight_process(small)
    assert flight is not None
    flight_maps = {m.path for m in flight.memory_maps()}
    assert any("/pyarrow/" in path for path in flight_maps)
    assert not any("/numpy/" in p or "/pandas/" in p for p in flight_maps)


def test_flight_binds_the_bind_address(small: Server) -> None:
    flight = flight_process(small)
    assert flight is not None
    listening = [c for c in flight.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    # gRPC listens on an IPv6 socket bound to the v4-mapped loopback address.
    addresses = [(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for c in listening]
    assert addresses == [("127.0.0.1", small.flight_port)]  # type: ignore[attr-defined]


def test_a_crashed_flight_server_is_restarted(small: Server, anonymous: Flight) -> None:
    crashed = flight_process(small)
    assert crashed is not None
    crashed.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = flight_process(small)
        if current is not None and current.pid != crashed.pid:
            try:
                path = anonymous.unique_path()
                break
            except fl.FlightUnavailableError:
                pass
        time.sleep(0.2)
    else:
        pytest.fail("the Flight server was not restarted")
    anonymous.put(path, sample(10))
    assert anonymous.evaluate("return _arg1", path).status_code == 200


# -- TLS and the sandbox ----------------------------------------------------------------


def test_tls_round_trip(server_factory: ServerFactory, tmp_path: Path) -> None:
    pki = make_pki()
    chain, key, root = tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "root.crt"
    chain.write_bytes(pki.leaf.pem + pki.intermediate.pem)
    key.write_bytes(pki.leaf.key_pem())
    root.write_bytes(pki.root.pem)
    server = start_flight_server(
        server_factory,
        verify=str(root),
        auth=ALICE,
        TABPY_TRANSFER_PROTOCOL="https",
        TABPY_CERTIFICATE_FILE=str(chain),
        TABPY_KEY_FILE=str(key),
        TABPY_PWD_FILE=str(password_file(tmp_path)),
    )
    flight = Flight(server, ALICE, root=pki.root.pem)
    path = flight.unique_path()
    flight.put(path, sample(50))
    response = flight.evaluate("return _arg1[_arg1['id'] < 10]", path)
    assert response.status_code == 200, response.text
    info = flight.info(response.json()["outputDataPath"])
    assert info.endpoints[0].locations[0].uri.decode().startswith("grpc+tls://")
    assert flight.get(info.endpoints[0].ticket).num_rows == 10
    plain = fl.connect(f"grpc+tcp://localhost:{server.flight_port}")  # type: ignore[attr-defined]
    with pytest.raises(fl.FlightUnavailableError):
        list(plain.do_action(fl.Action("healthcheck", b""), options(ALICE)))
    flight.close()
    server.stop()


def test_tables_reach_sandboxed_workers(server_factory: ServerFactory) -> None:
    server = start_flight_server(
        server_factory,
        TABSERVE_SANDBOX="bubblewrap",
        TABSERVE_WORKER_USER="nobody",
        TABSERVE_WORKERS="1",
    )
    assert server.get("/info").json().get("sandbox") is None, "the sandbox self-check failed"
    flight = Flight(server, None)
    path = flight.unique_path()
    flight.put(path, sample(1000))
    response = flight.evaluate("_arg1['n'] = len(_arg1)\nreturn _arg1", path)
    assert response.status_code == 200, response.text
    info = flight.info(response.json()["outputDataPath"])
    assert flight.get(info.endpoints[0].ticket).column("n")[0].as_py() == 1000
    flight.close()
    server.stop()


# -- configuration ----------------------------------------------------------------------


def test_arrow_without_pyarrow_is_refused_naming_the_extra(tmp_path: Path) -> None:
    config = tmp_path / "tabpy.conf"
    config.write_text(f"[TabPy]\nTABPY_ARROW_ENABLE = true\nTABPY_STATE_PATH = {tmp_path}\n")
    hide = "import sys; sys.modules['pyarrow'] = None; from tabserve.cli import main; "
    done = subprocess.run(
        [sys.executable, "-c", hide + f"sys.exit(main(['--config', {str(config)!r}]))"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "TABPY_ARROW_ENABLE" in lines[0] and "tabserve[arrow]" in lines[0]


def test_a_flight_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "tabpy.conf"
        config.write_text(
            "[TabPy]\nTABPY_ARROW_ENABLE = true\n"
            f"TABPY_ARROWFLIGHT_PORT = {taken.getsockname()[1]}\nTABPY_PORT = {free_port()}\n"
            f"TABPY_STATE_PATH = {tmp_path}\nTABSERVE_WORKERS = 1\nTABSERVE_WORKER_USER = root\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "tabserve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tabserve: cannot start: the Arrow Flight server"), done.stderr


def test_data_path_is_found_only_in_small_bodies_that_name_it() -> None:
    assert data_path(b'{"script": "return _arg1", "dataPath": "p"}', "") == "p"
    assert data_path(b'{"script": "return 1", "data": {}}', "") is None
    assert data_path(b"not json dataPath", "") is None
    padding = b" " * (2 * 1024 * 1024)
    assert data_path(b'{"script": "x", "dataPath": "p"}' + padding, "") is None


def worker_pids(server: Server) -> set[int]:
    flight = flight_process(server)
    return server.worker_pids() - ({flight.pid} if flight else set())


def flight_process(server: Server) -> psutil.Process | None:
    """The Flight server: the server's child running tabserve.flight.main."""
    for child in psutil.Process(server.process.pid).children():
        try:
            if any("tabserve.flight.main" in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None
