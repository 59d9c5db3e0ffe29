from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pki import DAY, NOW, Pki, issue, make_pki, write_pair

from tabserve.server.tls import (
    TLSConfigError,
    check_tls_files,
    inspect_tls_files,
    make_server_context,
    resolve_minimum_version,
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def levels(report_findings: object) -> list[str]:
    return [finding.level for finding in report_findings]  # type: ignore[attr-defined]


# --- file checks ----------------------------------------------------------------------------


def test_valid_self_signed(tmp_path: Path) -> None:
    server = issue("localhost")
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem())
    report = check_tls_files(cert_file, key_file)
    assert report.ok
    assert report.subject == "CN=localhost" == report.issuer
    assert report.sans == ("localhost", "127.0.0.1")
    assert report.certificate_count == 1
    assert report.self_signed and report.chain_complete and report.key_matches
    assert report.not_after == server.cert.not_valid_after_utc
    assert report.not_before.tzinfo is not None
    assert any("self-signed" in message for _, message in report.findings)
    assert "warning" not in levels(report.findings)


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        (None, None, "TABPY_CERTIFICATE_FILE and TABPY_KEY_FILE must be set."),
        ("", "x", "The parameter(s) TABPY_CERTIFICATE_FILE must be set."),
        ("x", None, "The parameter(s) TABPY_KEY_FILE must be set."),
        ("nope.crt", "nope.key", "TABPY_KEY_FILE must point to an existing file."),
    ],
)
def test_unset_and_missing_files(cert: str | None, key: str | None, message: str) -> None:
    with pytest.raises(TLSConfigError) as info:
        check_tls_files(cert, key)
    assert str(info.value).startswith("Error using HTTPS: The parameter(s) ")
    assert str(info.value).endswith(message)


def test_missing_key_file_only(tmp_path: Path) -> None:
    server = issue("localhost")
    cert_file, _ = write_pair(tmp_path, server.pem, b"")
    with pytest.raises(TLSConfigError) as info:
        check_tls_files(cert_file, tmp_path / "absent.key")
    assert str(info.value) == (
        "Error using HTTPS: The parameter(s) TABPY_KEY_FILE must point to an existing file."
    )


def test_expired(tmp_path: Path) -> None:
    expired_on = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    server = issue("localhost", not_before=expired_on - 30 * DAY, not_after=expired_on)
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem())
    with pytest.raises(TLSConfigError) as info:
        check_tls_files(cert_file, key_file)
    assert str(info.value) == (
        "Error using HTTPS: The certificate provided expired on 2020-01-02 03:04:05."
    )
    assert info.value.report is not None and not info.value.report.ok
    # A doctor run still gets the full report.
    assert inspect_tls_files(cert_file, key_file).key_matches


def test_not_yet_valid(tmp_path: Path) -> None:
    starts = (NOW + 10 * DAY).replace(microsecond=0)
    server = issue("localhost", not_before=starts, not_after=starts + 90 * DAY)
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem())
    with pytest.raises(TLSConfigError) as info:
        check_tls_files(cert_file, key_file)
    assert str(info.value) == (
        "Error using HTTPS: The certificate provided is not valid until "
        f"{starts.strftime('%Y-%m-%d %H:%M:%S')}."
    )
    # The check uses UTC, whatever the local time zone: one second after the start it passes.
    assert check_tls_files(cert_file, key_file, now=starts + dt.timedelta(seconds=1)).ok


def test_expiring_soon_is_a_warning(tmp_path: Path) -> None:
    server = issue("localhost", not_after=NOW + 5 * DAY)
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem())
    report = check_tls_files(cert_file, key_file)
    assert any(level == "warning" and "days left" in text for level, text in report.findings)


def test_key_mismatch(tmp_path: Path) -> None:
    server, other = issue("localhost"), issue("other")
    cert_file, key_file = write_pair(tmp_path, server.pem, other.key_pem())
    with pytest.raises(TLSConfigError, match="does not match the certificate") as info:
        check_tls_files(cert_file, key_file)
    assert info.value.report is not None and not info.value.report.key_matches
    with pytest.raises(TLSConfigError, match="does not match the certificate"):
        make_server_context(cert_file, key_file)


def test_wrong_order_in_file_is_explained(tmp_path: Path, pki: Pki) -> None:
    cert_file, key_file = write_pair(
        tmp_path, pki.intermediate.pem + pki.leaf.pem, pki.leaf.key_pem()
    )
    with pytest.raises(TLSConfigError, match="put the server certificate first"):
        check_tls_files(cert_file, key_file)


def test_full_chain_is_complete(tmp_path: Path, pki: Pki) -> None:
    chain = pki.leaf.pem + pki.intermediate.pem + pki.root.pem
    cert_file, key_file = write_pair(tmp_path, chain, pki.leaf.key_pem())
    report = check_tls_files(cert_file, key_file)
    assert report.certificate_count == 3
    assert report.chain_complete and not report.self_signed
    assert report.issuer == "CN=Test Intermediate CA"
    assert "warning" not in levels(report.findings)


def test_leaf_plus_intermediate_is_complete(tmp_path: Path, pki: Pki) -> None:
    cert_file, key_file = write_pair(
        tmp_path, pki.leaf.pem + pki.intermediate.pem, pki.leaf.key_pem()
    )
    report = check_tls_files(cert_file, key_file)
    assert report.chain_complete
    assert any("clients must trust that CA" in text for _, text in report.findings)


def test_leaf_only_flags_missing_intermediate(tmp_path: Path, pki: Pki) -> None:
    cert_file, key_file = write_pair(tmp_path, pki.leaf.pem, pki.leaf.key_pem())
    report = check_tls_files(cert_file, key_file)  # a warning, so the server still starts
    assert not report.chain_complete
    assert report.ok
    [warning] = report.warnings
    assert "Missing intermediate" in warning.message and "PKIX" in warning.message


def test_unrelated_certificate_in_file_is_flagged(tmp_path: Path, pki: Pki) -> None:
    stranger = issue("stranger")
    cert_file, key_file = write_pair(
        tmp_path, pki.leaf.pem + pki.intermediate.pem + stranger.pem, pki.leaf.key_pem()
    )
    report = check_tls_files(cert_file, key_file)
    assert report.chain_complete
    assert any("not part of" in warning.message for warning in report.warnings)


def test_combined_file_with_key_and_certificate(tmp_path: Path) -> None:
    server = issue("localhost")
    combined = tmp_path / "both.pem"
    combined.write_bytes(server.key_pem() + server.pem)
    assert check_tls_files(combined, combined).key_matches


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    server = issue("localhost")
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem(b"secret"))
    with pytest.raises(TLSConfigError, match="passphrase"):
        check_tls_files(cert_file, key_file)
    with pytest.raises(TLSConfigError, match="passphrase"):
        make_server_context(cert_file, key_file)


def test_not_pem(tmp_path: Path) -> None:
    server = issue("localhost")
    cert_file, key_file = write_pair(
        tmp_path, server.cert.public_bytes(serialization.Encoding.DER), server.key_pem()
    )
    with pytest.raises(TLSConfigError, match="DER"):
        check_tls_files(cert_file, key_file)
    cert_file.write_bytes(server.pem)
    key_file.write_bytes(b"not a key\n")
    with pytest.raises(TLSConfigError, match="no PEM private key"):
        check_tls_files(cert_file, key_file)


def test_hostname_and_missing_sans(tmp_path: Path) -> None:
    server = issue("svc", sans=("*.example.com", "10.0.0.5"))
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem())

    def matches(host: str) -> bool:
        report = inspect_tls_files(cert_file, key_file, hostname=host)
        return any(f"valid for {host}" in text and level == "ok" for level, text in report.findings)

    assert matches("tabpy.example.com")
    assert matches("TabPy.Example.com")
    assert matches("10.0.0.5")
    assert not matches("example.com")
    assert not matches("a.b.example.com")
    assert not matches("10.0.0.6")

    bare = issue("bare", sans=())
    cert_file, key_file = write_pair(tmp_path, bare.pem, bare.key_pem())
    report = check_tls_files(cert_file, key_file)
    assert any("no subjectAltName" in warning.message for warning in report.warnings)


# --- minimum version ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "unrecognized"),
    [
        (None, ssl.TLSVersion.TLSv1_2, False),
        ("TLSv1_3", ssl.TLSVersion.TLSv1_3, False),
        ("TLSv1_2", ssl.TLSVersion.TLSv1_2, False),
        ("tlsv1.3", ssl.TLSVersion.TLSv1_3, False),
        ("TLSv-1.3", ssl.TLSVersion.TLSv1_2, True),
        ("bogus", ssl.TLSVersion.TLSv1_2, True),
    ],
)
def test_minimum_version_log_lines(
    caplog: pytest.LogCaptureFixture,
    value: str | None,
    expected: ssl.TLSVersion,
    unrecognized: bool,
) -> None:
    log = logging.getLogger("test.tls")
    with caplog.at_level(logging.INFO, logger="test.tls"):
        assert resolve_minimum_version(value, log) is expected
    messages = [record.getMessage() for record in caplog.records]
    assert f"Setting minimum TLS version to {expected.name}" in messages
    warning = f"Unrecognized value for TABPY_MINIMUM_TLS_VERSION: {value}"
    assert (warning in messages) is unrecognized
    if unrecognized:
        assert messages.index(warning) < messages.index(
            f"Setting minimum TLS version to {expected.name}"
        )


def test_obsolete_minimum_version_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tabserve.certificates"):
        assert resolve_minimum_version("TLSv1") is ssl.TLSVersion.TLSv1
    assert "Setting minimum TLS version to TLSv1" in caplog.messages
    assert any("obsolete" in message for message in caplog.messages)


def test_make_server_context_sets_minimum(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = issue("localhost")
    cert_file, key_file = write_pair(tmp_path, server.pem, server.key_pem())
    log = logging.getLogger("test.ctx")
    with caplog.at_level(logging.INFO, logger="test.ctx"):
        context = make_server_context(cert_file, key_file, "TLSv1_3", log)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert "Setting minimum TLS version to TLSv1_3" in caplog.messages
    assert make_server_context(cert_file, key_file, None, log).minimum_version is (
        ssl.TLSVersion.TLSv1_2
    )
    with pytest.raises(TLSConfigError, match="must point to an existing file"):
        make_server_context(cert_file, tmp_path / "gone.key", None, log)


# --- a real handshake -----------------------------------------------------------------------


def handshake(context: ssl.SSLContext, client: ssl.SSLContext) -> tuple[bytes, str | None, list]:
    """Serve one TLS connection on 127.0.0.1 in a thread; everything bounded by timeouts."""
    errors: list[BaseException] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(64).upper())
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        reply, version = b"", None
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with client.wrap_socket(raw, server_hostname="localhost") as tls:
                    version = tls.version()
                    tls.sendall(b"ping")
                    reply = tls.recv(64)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)
        thread.join(timeout=5)
        assert not thread.is_alive()
    return reply, version, errors


def test_real_handshake_with_chain(tmp_path: Path, pki: Pki) -> None:
    cert_file, key_file = write_pair(
        tmp_path, pki.leaf.pem + pki.intermediate.pem, pki.leaf.key_pem()
    )
    context = make_server_context(cert_file, key_file, "TLSv1_2", logging.getLogger("test"))
    client = ssl.create_default_context(cadata=pki.root.pem.decode())
    reply, version, errors = handshake(context, client)
    assert errors == []
    assert reply == b"PING"
    assert version in ("TLSv1.2", "TLSv1.3")


def test_handshake_fails_without_intermediate(tmp_path: Path, pki: Pki) -> None:
    # What Tableau reports as "PKIX path building failed": the client only trusts the root.
    cert_file, key_file = write_pair(tmp_path, pki.leaf.pem, pki.leaf.key_pem())
    context = make_server_context(cert_file, key_file, None, logging.getLogger("test"))
    client = ssl.create_default_context(cadata=pki.root.pem.decode())
    _, _, errors = handshake(context, client)
    assert any(isinstance(error, ssl.SSLCertVerificationError) for error in errors)


def test_handshake_rejects_old_client_when_minimum_is_1_3(tmp_path: Path, pki: Pki) -> None:
    cert_file, key_file = write_pair(
        tmp_path, pki.leaf.pem + pki.intermediate.pem, pki.leaf.key_pem()
    )
    context = make_server_context(cert_file, key_file, "TLSv1_3", logging.getLogger("test"))
    client = ssl.create_default_context(cadata=pki.root.pem.decode())
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    reply, _, errors = handshake(context, client)
    assert reply == b""
    assert errors
