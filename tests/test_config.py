"""Settings: TabPy keys with TabPy meanings, environment over file, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tabserve.config import (
    IGNORED_KEYS,
    TABPY_216_KEYS,
    ConfigError,
    Settings,
    declared_settings,
    key_findings,
    known_keys,
    load_settings,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tabpy.conf"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(None, {})
    assert settings.port == 9004
    assert settings.bind_address == "127.0.0.1"
    assert settings.evaluate_timeout == 30.0
    assert settings.evaluate_enabled and settings.gzip_enabled and not settings.arrow_enabled
    assert settings.max_request_bytes == 100 * 1024 * 1024
    assert settings.workers >= 1
    assert settings.worker_memory_mb > 0
    assert "site-packages" not in str(settings.state_path)


def test_tabpy_config_file_is_read_unchanged(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[TabPy]\nTABPY_PORT = 9010\nTABPY_STATE_PATH = ./state\n"
        "TABPY_QUERY_OBJECT_PATH = /tmp/qo\nTABPY_EVALUATE_TIMEOUT = 1996\n"
        "TABPY_EVALUATE_ENABLE = false\nTABPY_GZIP_ENABLE = FALSE\nTABPY_LOG_DETAILS = 0\n"
        "TABPY_MAX_REQUEST_SIZE_MB = 5\nTABPY_TRANSFER_PROTOCOL = http\n\n"
        "[loggers]\nkeys=root\n",
    )
    settings = load_settings(path, {})
    assert settings.port == 9010
    assert settings.state_path == Path("./state").resolve()
    assert settings.query_object_path == Path("/tmp/qo")  # accepted, and like TabPy unused:
    assert settings.evaluate_timeout == 1996.0
    assert settings.evaluate_enabled is False
    assert settings.gzip_enabled is False
    assert settings.log_details is True  # TabPy: anything but "false" turns it on
    assert settings.max_request_size_mb == 5


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[TabPy]\nTABPY_PORT = 9010\nTABPY_EVALUATE_TIMEOUT = 3\n")
    settings = load_settings(path, {"TABPY_PORT": "19999"})
    assert settings.port == 19999
    assert settings.evaluate_timeout == 3.0


def test_environment_applies_without_a_tabpy_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[Other]\nx = 1\n")
    settings = load_settings(path, {"TABPY_EVALUATE_TIMEOUT": "7", "TABSERVE_WORKERS": "3"})
    assert settings.evaluate_timeout == 7.0
    assert settings.workers == 3


def test_percent_is_not_interpolated(tmp_path: Path) -> None:
    path = write(tmp_path, "[TabPy]\nTABPY_STATE_PATH = /tmp/100%done\n")
    assert str(load_settings(path, {}).state_path) == "/tmp/100%done"


def test_memory_cap_default_divides_memory_between_workers() -> None:
    one = load_settings(None, {"TABSERVE_WORKERS": "1"}).worker_memory_mb
    three = load_settings(None, {"TABSERVE_WORKERS": "3"}).worker_memory_mb
    assert one == pytest.approx(three * 2, rel=0.01)
    assert load_settings(None, {"TABSERVE_WORKER_MEMORY_MB": "0"}).worker_memory_mb == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TABPY_PORT", "abc"),
        ("TABPY_PORT", "70000"),
        ("TABPY_EVALUATE_TIMEOUT", "soon"),
        ("TABPY_EVALUATE_TIMEOUT", "0"),
        ("TABPY_EVALUATE_ENABLE", "maybe"),
        ("TABPY_MAX_REQUEST_SIZE_MB", "0.5"),
        ("TABPY_TRANSFER_PROTOCOL", "ftp"),
        ("TABSERVE_WORKERS", "0"),
        ("TABSERVE_PROCESSES", "0"),
        ("TABSERVE_PROCESSES", "65"),
        ("TABSERVE_LOG_LEVEL", "LOUD"),
        ("TABSERVE_AUTH_MAX_DELAY", "-1"),
        ("TABSERVE_AUTH_MAX_DELAY", "nan"),
        ("TABSERVE_AUTH_MAX_DELAY", "inf"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path, f"[TabPy]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    message = str(caught.value)
    assert key in message and repr(value) in message
    assert "\n" not in message


def test_arrow_settings_are_honoured() -> None:
    settings = load_settings(
        None, {"TABPY_ARROW_ENABLE": "true", "TABPY_ARROWFLIGHT_PORT": "13700"}
    )
    assert settings.arrow_enabled and settings.arrow_flight_port == 13700
    assert load_settings(None, {}).arrow_flight_port == 13622  # TabPy's default
    # A minimum TLS version gRPC cannot enforce on the Flight port stops the start.
    strict_tls = {
        "TABPY_ARROW_ENABLE": "true",
        "TABPY_TRANSFER_PROTOCOL": "https",
        "TABPY_MINIMUM_TLS_VERSION": "TLSv1_3",
    }
    with pytest.raises(ConfigError, match="TABPY_MINIMUM_TLS_VERSION"):
        load_settings(None, strict_tls)
    # Flight is one port with its tables in one process: not with several front ends.
    with pytest.raises(ConfigError, match="TABSERVE_PROCESSES > 1 cannot serve Arrow Flight"):
        load_settings(None, {"TABPY_ARROW_ENABLE": "true", "TABSERVE_PROCESSES": "2"})


def test_processes_default_to_one() -> None:
    assert load_settings(None, {}).processes == 1
    assert load_settings(None, {"TABSERVE_PROCESSES": "4"}).processes == 4


def test_tabpy_auth_and_tls_keys_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[TabPy]\nTABPY_PWD_FILE = ./pwd.txt\nTABPY_TRANSFER_PROTOCOL = HTTPS\n"
        "TABPY_CERTIFICATE_FILE = /etc/ssl/server.crt\nTABPY_KEY_FILE = /etc/ssl/server.key\n"
        "TABPY_MINIMUM_TLS_VERSION = TLSv1_3\n",
    )
    settings = load_settings(path, {})
    assert settings.password_file == Path("pwd.txt").resolve()  # relative to the CWD, as TabPy
    assert settings.auth_enabled and settings.tls_enabled
    assert settings.certificate_file == Path("/etc/ssl/server.crt")
    assert settings.key_file == Path("/etc/ssl/server.key")
    assert settings.minimum_tls_version == "TLSv1_3"
    assert settings.auth_max_delay == 10.0
    assert not load_settings(None, {}).auth_enabled


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("myhost", False)],
)  # fmt: skip
def test_loopback_only(address: str, loopback: bool) -> None:
    assert load_settings(None, {"TABSERVE_BIND_ADDRESS": address}).loopback_only is loopback


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.conf", {})


def test_every_setting_is_declared_once_and_documented() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    keys = [s.key for s in declared_settings()]
    assert len(keys) == len(set(keys))
    assert {s.attr for s in declared_settings()} <= set(Settings.__dataclass_fields__)
    missing = [key for key in keys if f"`{key}`" not in docs]
    assert missing == []


def test_operations_settings() -> None:
    settings = load_settings(
        None,
        {
            "TABSERVE_SHUTDOWN_GRACE": "0",
            "TABSERVE_LOG_FILE": "~/t.log",
            "TABSERVE_LOG_FORMAT": "JSON",
        },
    )
    assert settings.shutdown_grace == 0
    assert settings.log_file == Path("~/t.log").expanduser().resolve()
    assert settings.log_format == "json"
    defaults = load_settings(None, {})
    assert (defaults.shutdown_grace, defaults.log_file, defaults.metrics_auth) == (20.0, None, True)
    with pytest.raises(ConfigError, match="TABSERVE_SHUTDOWN_GRACE"):
        load_settings(None, {"TABSERVE_SHUTDOWN_GRACE": "-1"})
    with pytest.raises(ConfigError, match="TABSERVE_METRICS_AUTH"):
        load_settings(None, {"TABSERVE_METRICS_AUTH": "maybe"})


# --- no silent settings -----------------------------------------------------------------------


def test_every_tabpy_216_key_is_known_and_documented() -> None:
    declared = {s.key for s in declared_settings()}
    assert len(TABPY_216_KEYS) == 27 == len(set(TABPY_216_KEYS))
    assert set(TABPY_216_KEYS) <= known_keys()
    assert not declared & set(IGNORED_KEYS)  # a key is read or ignored, never both
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    section = docs[docs.index("## TabPy 2.16's keys") :]
    assert [key for key in TABPY_216_KEYS if f"`{key}`" not in section] == []
    assert [key for key in IGNORED_KEYS if f"`{key}`" not in section] == []


def test_unknown_keys_are_named_with_the_nearest_known_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[TabPy]\nTABPY_PWD_FLIE = /etc/pwd\nPORT = 9010\nTABPY_PORT = 1\n")
    environ = {"TABSERVE_WORKRS": "2", "TABPY_WORKERS": "2", "TABSERVE_ZZZ": "1", "HOME": "/"}
    findings = {f.key: f for f in key_findings(path, environ)}
    assert set(findings) == {"TABPY_PWD_FLIE", "PORT", "TABSERVE_WORKRS", "TABPY_WORKERS",
                             "TABSERVE_ZZZ"}  # fmt: skip
    assert not any(f.refused for f in findings.values())
    assert findings["TABPY_PWD_FLIE"].message == (
        "unknown setting TABPY_PWD_FLIE in the config file is ignored; did you mean TABPY_PWD_FILE?"
    )
    assert findings["PORT"].message.endswith("did you mean TABPY_PORT?")
    assert findings["TABSERVE_WORKRS"].message == (
        "unknown setting TABSERVE_WORKRS in the environment is ignored; "
        "did you mean TABSERVE_WORKERS?"
    )
    assert findings["TABPY_WORKERS"].message.endswith("did you mean TABSERVE_WORKERS?")
    assert findings["TABSERVE_ZZZ"].message.endswith("is ignored")  # nothing close
    # Warnings do not stop anything: the settings load, without the misspelt one.
    settings = load_settings(path, environ)
    assert settings.port == 1 and settings.password_file is None
    assert key_findings(None, {"TABPY_PORT": "1", "TABPY_ARROWFLIGHT_PORT": "1"}) == []


def test_an_unknown_oauth_key_stops_the_start(tmp_path: Path) -> None:
    path = write(tmp_path, "[TabPy]\nTABPY_OAUTH_ENABLD = true\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == (
        "TABPY_OAUTH_ENABLD in the config file is an OAuth setting tabserve does not "
        "implement (did you mean TABPY_OAUTH_ENABLED?); refusing to start rather than ignore "
        "a security setting"
    )
    with pytest.raises(ConfigError, match="TABPY_OAUTH_CLOCK_SKEW in the environment"):
        load_settings(None, {"TABPY_OAUTH_CLOCK_SKEW": "60"})


def test_a_section_tabpy_would_not_read_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[tabpy]\nTABPY_PORT = 9010\n")
    (finding,) = key_findings(path, {})
    assert "[tabpy] is ignored" in finding.message and not finding.refused


OAUTH = {
    "TABPY_OAUTH_ENABLED": "true",
    "TABPY_OAUTH_ISSUER": "https://idp.example/",
    "TABPY_OAUTH_JWKS_URI": "https://idp.example/.well-known/jwks.json",
    "TABPY_OAUTH_AUDIENCE": "tabpy",
}


def test_oauth_settings_as_tabpy_reads_them() -> None:
    settings = load_settings(
        None, {**OAUTH, "TABPY_OAUTH_REQUIRED_SCOPES": " a, b ,", "TABPY_OAUTH_LOG_USER": "1"}
    )
    assert settings.auth_enabled and settings.auth_methods == ("oauth-jwt",)
    assert settings.oauth_required_scopes == ("a", "b")
    assert settings.oauth_log_user and not settings.oauth_enforce_endpoint_scopes
    scopes = (settings.oauth_query_scope, settings.oauth_evaluate_scope,
              settings.oauth_deploy_scope)  # fmt: skip
    assert scopes == ("tabpy:query", "tabpy:evaluate", "tabpy:deploy")
    # Scopes alone are a boundary too (TabPy 2.16: the audience became optional).
    load_settings(None, {**OAUTH, "TABPY_OAUTH_AUDIENCE": "", "TABPY_OAUTH_REQUIRED_SCOPES": "a"})
    # Off, the other OAuth keys are not checked (as in TabPy).
    assert not load_settings(None, {**OAUTH, "TABPY_OAUTH_ENABLED": "false",
                                    "TABPY_OAUTH_ISSUER": "http://x"}).auth_enabled  # fmt: skip
    # Users from the store are Basic users: both methods, as with a password file.
    with_store_users = load_settings(None, {**OAUTH, "TABSERVE_USERS": "store"})
    assert with_store_users.auth_methods == ("basic-auth", "oauth-jwt")
    assert load_settings(None, {"TABSERVE_USERS": "store"}).auth_methods == ("basic-auth",)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"TABPY_OAUTH_ISSUER": ""}, "is true but TABPY_OAUTH_ISSUER is not set"),
        ({"TABPY_OAUTH_ISSUER": "", "TABPY_OAUTH_JWKS_URI": ""}, "_JWKS_URI are not set"),
        ({"TABPY_OAUTH_JWKS_URI": "http://idp/j"}, "'http://idp/j' (must be an https:// URL"),
        ({"TABPY_OAUTH_ISSUER": "idp.example"}, "invalid value for TABPY_OAUTH_ISSUER"),
        ({"TABPY_OAUTH_JWKS_URI": "https:///jwks"}, "(no host)"),
        ({"TABPY_OAUTH_AUDIENCE": ""}, "neither TABPY_OAUTH_AUDIENCE nor TABPY_OAUTH_REQUIRED"),
        ({"TABPY_OAUTH_DEPLOY_SCOPE": ""}, "invalid value for TABPY_OAUTH_DEPLOY_SCOPE: ''"),
        ({"TABPY_OAUTH_REQUIRED_SCOPES": 'a,"b"'}, "TABPY_OAUTH_REQUIRED_SCOPES: '\"b\"'"),
        ({"TABPY_OAUTH_ENABLED": "yes please"}, "TABPY_OAUTH_ENABLED"),
    ],
)  # fmt: skip
def test_oauth_on_without_what_it_needs_stops_the_start(
    change: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {**OAUTH, **change})
    assert expected in str(caught.value) and "\n" not in str(caught.value)
