"""``tabserve doctor``: the checklist a Tableau connection will meet, and its exit status."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from idp import IdP
from pki import DAY, NOW, Pki, issue, make_pki

from tabserve.commands.doctor import Check, diagnose
from tabserve.store.passwords import hash_password

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def config(tmp_path: Path, **settings: str) -> Path:
    path = tmp_path / "tabpy.conf"
    lines = ["[TabPy]", f"TABPY_STATE_PATH = {tmp_path / 'state'}", "TABPY_PORT = 0"]
    # CI runs as root with a Python the default worker user (nobody) cannot read (pyenv in
    # /root), which the sandbox self-check rightly fails; test_sandbox.py covers that user.
    lines.append("TABSERVE_WORKER_USER = root")
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tls(tmp_path: Path, cert_pem: bytes, key_pem: bytes) -> dict[str, str]:
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return {
        "TABPY_TRANSFER_PROTOCOL": "https",
        "TABPY_CERTIFICATE_FILE": str(cert),
        "TABPY_KEY_FILE": str(key),
    }


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tabserve", "doctor", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith(("TABPY_", "TABSERVE_"))},
    )  # fmt: skip


def failures(checks: list[Check]) -> list[str]:
    return [check.message for check in checks if check.level == "error"]


def lines(checks: list[Check], level: str, topic: str) -> str:
    return "\n".join(c.message for c in checks if c.level == level and c.topic == topic)


def test_healthy_https_setup_passes(tmp_path: Path, pki: Pki) -> None:
    passwords = tmp_path / "passwords.txt"
    passwords.write_text((FIXTURES / "tabpy_passwords.txt").read_text())
    passwords.chmod(0o600)
    path = config(
        tmp_path,
        TABSERVE_BIND_ADDRESS="0.0.0.0",
        TABPY_PWD_FILE=str(passwords),
        **tls(tmp_path, pki.leaf.pem + pki.intermediate.pem, pki.leaf.key_pem()),
    )
    result = doctor("--config", str(path), "--host", "localhost")
    assert result.returncode == 0, result.stdout
    out = result.stdout
    for expected in (
        "[ ok ] network",
        "reachable from other machines",
        "[ ok ] tls         TLS on (https).",
        "CN=localhost, issued by CN=Test Intermediate CA",
        "Names in the certificate: localhost, 127.0.0.1.",
        "days left",
        "Certificate chain in the file: CN=localhost -> CN=Test Intermediate CA",
        "The private key matches the certificate.",
        "The certificate is valid for localhost.",
        "Setting minimum TLS version to TLSv1_2",
        "Authentication on (HTTP Basic): 2 user(s)",
        "Evaluate on",
        "[info] sandbox",
        "0 failure(s)",
    ):
        assert expected in out, expected
    assert "[FAIL]" not in out


def test_expired_certificate_fails(tmp_path: Path) -> None:
    server = issue("localhost", not_before=NOW - 90 * DAY, not_after=NOW - 2 * DAY)
    path = config(tmp_path, **tls(tmp_path, server.pem, server.key_pem()))
    result = doctor("--config", str(path))
    assert result.returncode == 1
    assert "[FAIL] certificate" in result.stdout
    assert "The certificate provided expired on" in result.stdout


def test_key_that_does_not_match_fails(tmp_path: Path, pki: Pki) -> None:
    other = issue("someone-else")
    path = config(tmp_path, **tls(tmp_path, pki.leaf.pem + pki.intermediate.pem, other.key_pem()))
    checks = diagnose(str(path), {})
    assert any("does not match the certificate" in message for message in failures(checks))


def test_chain_without_its_intermediate_fails(tmp_path: Path, pki: Pki) -> None:
    path = config(tmp_path, **tls(tmp_path, pki.leaf.pem, pki.leaf.key_pem()))
    result = doctor("--config", str(path))
    assert result.returncode == 1
    assert "[FAIL] certificate Missing intermediate certificate" in result.stdout
    assert "PKIX path building failed" in result.stdout


def test_host_name_not_in_certificate_is_a_warning(tmp_path: Path, pki: Pki) -> None:
    chain = pki.leaf.pem + pki.intermediate.pem
    path = config(tmp_path, **tls(tmp_path, chain, pki.leaf.key_pem()))
    checks = diagnose(str(path), {}, host="tabpy.example.com")
    assert "not valid for tabpy.example.com" in lines(checks, "warning", "certificate")
    assert failures(checks) == []


def test_missing_tls_files_fail(tmp_path: Path) -> None:
    checks = diagnose(str(config(tmp_path, TABPY_TRANSFER_PROTOCOL="https")), {})
    assert any("must be set" in message for message in failures(checks))


def test_loopback_only_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    checks = diagnose(str(config(tmp_path)), {})
    assert "only this machine can connect" in lines(checks, "warning", "network")
    assert "TLS off" in lines(checks, "info", "tls")
    assert "Authentication off" in lines(checks, "info", "auth")
    assert failures(checks) == []


def test_exposed_without_auth_or_tls_is_loud(tmp_path: Path) -> None:
    checks = diagnose(str(config(tmp_path, TABSERVE_BIND_ADDRESS="0.0.0.0")), {})
    assert "Authentication OFF" in lines(checks, "warning", "auth")
    assert "unencrypted" in lines(checks, "warning", "tls")


def test_password_file_checks(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords.txt"
    passwords.write_text(
        f"alice {hash_password('alice', 'x')}\nbob {hash_password('bob', 'y')} query,manage\n"
    )
    passwords.chmod(0o644)
    path = config(tmp_path, TABPY_PWD_FILE=str(passwords), TABSERVE_BIND_ADDRESS="0.0.0.0")
    checks = diagnose(str(path), {})
    assert "2 user(s)" in lines(checks, "ok", "auth")
    assert "bob (manage,query)" in lines(checks, "info", "auth")
    warnings = lines(checks, "warning", "auth")
    assert "chmod 600" in warnings and "clear text" in warnings


def test_malformed_password_file_fails(tmp_path: Path) -> None:
    passwords = tmp_path / "passwords.txt"
    passwords.write_text("alice short-hash\n")
    checks = diagnose(str(config(tmp_path, TABPY_PWD_FILE=str(passwords))), {})
    assert any("line 1" in message for message in failures(checks))


def test_evaluate_off_is_reported(tmp_path: Path) -> None:
    checks = diagnose(str(config(tmp_path, TABPY_EVALUATE_ENABLE="false")), {})
    assert "Evaluate off" in lines(checks, "info", "evaluate")


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        checks = diagnose(None, {"TABPY_PORT": str(port), "TABPY_STATE_PATH": str(tmp_path)})
    assert f"Port {port} is in use" in lines(checks, "warning", "network")


def test_bad_config_fails_without_a_traceback(tmp_path: Path) -> None:
    path = config(tmp_path, TABPY_EVALUATE_TIMEOUT="soon")
    result = doctor("--config", str(path))
    assert result.returncode == 1
    assert "[FAIL] config" in result.stdout and "TABPY_EVALUATE_TIMEOUT" in result.stdout
    assert "Traceback" not in result.stderr


def test_config_option_before_the_subcommand(tmp_path: Path) -> None:
    path = config(tmp_path, TABPY_EVALUATE_ENABLE="false")
    result = subprocess.run(
        [sys.executable, "-m", "tabserve", "--config", str(path), "doctor"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0 and "Evaluate off" in result.stdout


def test_unknown_and_refused_keys_are_reported_as_at_start(tmp_path: Path) -> None:
    path = config(tmp_path, TABPY_PWD_FLIE="/etc/passwords.txt")
    checks = diagnose(str(path), {"TABSERVE_WORKRS": "2"})
    warnings = lines(checks, "warning", "config")
    assert (
        "unknown setting TABPY_PWD_FLIE in the config file is ignored; did you mean "
        "TABPY_PWD_FILE?" in warnings
    )
    assert "TABSERVE_WORKRS in the environment is ignored; did you mean TABSERVE_WORKERS?" in (
        warnings
    )
    assert failures(checks) == []

    refused = config(tmp_path, TABPY_PWD_FLIE="x", TABPY_OAUTH_CLOCK_SKEW="60")
    result = doctor("--config", str(refused))
    assert result.returncode == 1
    assert "[warn] config      unknown setting TABPY_PWD_FLIE" in result.stdout
    assert (
        "[FAIL] config      TABPY_OAUTH_CLOCK_SKEW in the config file is an OAuth setting "
        "tabserve does not implement" in result.stdout
    )
    assert result.stdout.count("TABPY_OAUTH_CLOCK_SKEW") == 1


def test_oauth_checks_fetch_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = IdP(tmp_path)
    try:
        provider.new_key("ec-1")
        settings = {
            "TABPY_OAUTH_ENABLED": "true",
            "TABPY_OAUTH_ISSUER": "https://idp.example/",
            "TABPY_OAUTH_JWKS_URI": provider.jwks_uri,
            "TABPY_OAUTH_REQUIRED_SCOPES": "tabpy",
        }
        monkeypatch.setenv("SSL_CERT_FILE", str(provider.ca_file))
        blocked = diagnose(str(config(tmp_path, **settings)), {})
        assert "non-public addresses (127.0.0.1)" in "\n".join(failures(blocked))
        allowed = {**settings, "TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS": "true"}
        checks = diagnose(str(config(tmp_path, **allowed)), {})
        assert failures(checks) == []
        ok = lines(checks, "ok", "oauth")
        assert "OAuth bearer tokens on: issuer 'https://idp.example/'" in ok
        assert "JWKS fetched: signing keys ec-1." in ok
        assert "allowed by TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS" in lines(checks, "warning", "oauth")
        assert "Authentication OFF" not in "\n".join(c.message for c in checks)
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted = diagnose(str(config(tmp_path, **allowed)), {})
        assert "every bearer token gets 401" in "\n".join(failures(untrusted))
    finally:
        provider.close()
