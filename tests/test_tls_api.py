"""HTTPS over real sockets: a TabPy config with https and a password file works unchanged."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import requests
from pki import DAY, NOW, Pki, issue, make_pki
from tabpy.tabpy_tools.client import Client

from helpers import Server, ServerFactory

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FIXTURES = Path(__file__).parent / "fixtures"


def multiply(x: list[float], y: list[float]) -> list[float]:
    return [a * b for a, b in zip(x, y, strict=True)]


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    files = {
        "chain": folder / "server.crt",
        "key": folder / "server.key",
        "ca": folder / "root.crt",
        "ca_and_intermediate": folder / "root-and-intermediate.crt",
        "leaf_only": folder / "leaf.crt",
    }
    files["chain"].write_bytes(pki.leaf.pem + pki.intermediate.pem)
    files["leaf_only"].write_bytes(pki.leaf.pem)
    files["key"].write_bytes(pki.leaf.key_pem())
    files["ca"].write_bytes(pki.root.pem)
    files["ca_and_intermediate"].write_bytes(pki.root.pem + pki.intermediate.pem)
    return files


@pytest.fixture(scope="module")
def tls_server(
    server_factory: ServerFactory,
    tls_files: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Server:
    """TabPy's own keys and password file, nothing tabserve-specific."""
    passwords = tmp_path_factory.mktemp("pwd") / "passwords.txt"
    shutil.copy(FIXTURES / "tabpy_passwords.txt", passwords)
    return server_factory(
        verify=str(tls_files["ca"]),
        TABPY_TRANSFER_PROTOCOL="HTTPS",
        TABPY_CERTIFICATE_FILE=str(tls_files["chain"]),
        TABPY_KEY_FILE=str(tls_files["key"]),
        TABPY_PWD_FILE=str(passwords),
        TABPY_EVALUATE_TIMEOUT="20",
    )


def test_banner_and_log_say_tls(tls_server: Server) -> None:
    log = tls_server.log()
    assert f"listening on https://localhost:{tls_server.port}" in log
    assert "TLS on" in log and "auth on" in log
    assert "Setting minimum TLS version to TLSv1_2" in log


def test_https_with_auth_serves_and_refuses(tls_server: Server) -> None:
    assert tls_server.get("/info").status_code == 401
    info = tls_server.get("/info", auth=("user1", "P@ssw0rd"))
    assert info.status_code == 200
    assert "authentication" in info.json()["versions"]["v1"]["features"]
    body = {"script": "return [x * 2 for x in _arg1]", "data": {"_arg1": [1, 2]}}
    answer = tls_server.post("/evaluate", json=body, auth=("user2", "S3cret!pass"))
    assert answer.json() == [2, 4]


def test_plain_http_is_not_served(tls_server: Server) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{tls_server.port}/info", timeout=10)


def test_tabpy_client_over_https_with_credentials(
    tls_server: Server, tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files["ca"]))
    client = Client(tls_server.url + "/")
    client.set_credentials("user1", "P@ssw0rd")
    client.deploy("multiply", multiply, "Multiplies lists", override=True)
    assert client.query("multiply", [2, 3], [4, 5])["response"] == [8, 15]
    client.remove("multiply")


# --- startup refuses a bad setup, fast and clearly ---------------------------------------------


def start(tmp_path: Path, **config: str) -> subprocess.CompletedProcess[str]:
    lines = ["[TabPy]", f"TABPY_STATE_PATH = {tmp_path / 'state'}", "TABPY_PORT = 0"]
    lines += [f"{key} = {value}" for key, value in config.items()]
    path = tmp_path / "tabpy.conf"
    path.write_text("\n".join(lines) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "tabserve", "--config", str(path)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "TABSERVE_WORKERS": "1"},
    )  # fmt: skip


def https(cert: Path, key: Path) -> dict[str, str]:
    return {
        "TABPY_TRANSFER_PROTOCOL": "https",
        "TABPY_CERTIFICATE_FILE": str(cert),
        "TABPY_KEY_FILE": str(key),
    }


def test_missing_certificate_file(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    result = start(tmp_path, **https(tmp_path / "absent.crt", tls_files["key"]))
    assert result.returncode == 1
    assert (
        "Error using HTTPS: The parameter(s) TABPY_CERTIFICATE_FILE must point to an existing "
        "file." in result.stderr
    )


def test_https_without_files(tmp_path: Path) -> None:
    result = start(tmp_path, TABPY_TRANSFER_PROTOCOL="https")
    assert result.returncode == 1
    assert "TABPY_CERTIFICATE_FILE and TABPY_KEY_FILE must be set" in result.stderr


def test_key_that_does_not_match(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(issue("other").key_pem())
    result = start(tmp_path, **https(tls_files["chain"], other))
    assert result.returncode == 1
    assert "does not match the certificate" in result.stderr


@pytest.mark.parametrize(
    ("not_before", "not_after", "message"),
    [
        (NOW - 60 * DAY, NOW - DAY, "The certificate provided expired on"),
        (NOW + DAY, NOW + 60 * DAY, "The certificate provided is not valid until"),
    ],
)
def test_certificate_out_of_its_dates(
    tmp_path: Path, not_before: dt.datetime, not_after: dt.datetime, message: str
) -> None:
    server = issue("localhost", not_before=not_before, not_after=not_after)
    cert, key = tmp_path / "s.crt", tmp_path / "s.key"
    cert.write_bytes(server.pem)
    key.write_bytes(server.key_pem())
    result = start(tmp_path, **https(cert, key))
    assert result.returncode == 1
    assert f"Error using HTTPS: {message}" in result.stderr


def test_unrecognized_minimum_version_falls_back_as_tabpy(
    server_factory: ServerFactory, tls_files: dict[str, Path]
) -> None:
    server = server_factory(
        # The file lacks the intermediate on purpose; only a client that has it can connect.
        verify=str(tls_files["ca_and_intermediate"]),
        TABPY_TRANSFER_PROTOCOL="https",
        TABPY_CERTIFICATE_FILE=str(tls_files["leaf_only"]),
        TABPY_KEY_FILE=str(tls_files["key"]),
        TABPY_MINIMUM_TLS_VERSION="TLSv9",
    )
    log = server.log()
    assert "Unrecognized value for TABPY_MINIMUM_TLS_VERSION: TLSv9" in log
    assert "Setting minimum TLS version to TLSv1_2" in log
    # The server starts with a leaf-only file, but says what clients will miss.
    assert "Missing intermediate certificate" in log
    # A client holding the root (but not the intermediate) cannot verify it.
    with pytest.raises(requests.exceptions.SSLError):
        server.get("/info", verify=str(tls_files["ca"]))


def test_tabserve_client_over_https_with_credentials(
    tls_server: Server, tls_files: dict[str, Path]
) -> None:
    from tabserve.client import Client as TabserveClient
    from tabserve.errors import Unauthorized

    with TabserveClient(tls_server.url, verify=str(tls_files["ca"])) as client:
        with pytest.raises(Unauthorized):
            client.get_info()
        client.set_credentials("user2", "S3cret!pass")
        client.deploy("multiply_ts", multiply, "Multiplies lists", override=True)
        assert client.query("multiply_ts", [2], [21])["response"] == [42]
        assert client.evaluate("return tabpy.query('multiply_ts', _arg1, _arg2)['response']",
                               [3], [3]) == [9]  # fmt: skip
        client.remove("multiply_ts")
