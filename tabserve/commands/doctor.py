"""``tabserve doctor [--config FILE]``: what a Tableau connection will meet, as a checklist.

Reads the same settings as the server and checks, without starting it: where it listens,
TLS (certificate names, dates, chain, key match), authentication (the password file and its
users), whether ``/evaluate`` is on, and the sandbox. Each line is ``ok``, ``info``, ``warn``
or ``FAIL``; the exit status is 1 when any line is ``FAIL``, else 0. It never prompts.

A missing intermediate certificate is a failure here (it is a warning at startup): it is the
usual cause of Tableau's ``PKIX path building failed`` and ``TLSV1_ALERT_UNKNOWN_CA``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from tabserve.config import ConfigError, Settings, key_findings, load_settings
from tabserve.server import sandbox
from tabserve.server.findings import ERROR, INFO, OK, WARNING, Finding, Level
from tabserve.server.oauth import (
    JwksUnavailable,
    OAuthConfig,
    OAuthConfigError,
    check_jwks_host,
    fetch_jwks,
    parse_key_set,
)
from tabserve.server.tls import (
    CertificateReport,
    TLSConfigError,
    inspect_tls_files,
    make_server_context,
)
from tabserve.store.passwords import ALL_PERMISSIONS, PasswordFileError, read_password_file

EXIT_OK = 0
EXIT_FAILED = 1

_LABELS = {OK: "[ ok ]", INFO: "[info]", WARNING: "[warn]", ERROR: "[FAIL]"}


@dataclass(frozen=True)
class Check:
    """One checklist line: a finding (see ``server.findings``) about a topic."""

    level: Level
    topic: str
    message: str

    @classmethod
    def of(cls, topic: str, finding: Finding) -> Check:
        return cls(finding.level, topic, finding.message)


def sandbox_report(settings: Settings) -> list[Check]:
    """The sandbox mode and its self-check (``server.sandbox.self_check``)."""
    report = sandbox.self_check(settings)
    level, verdict = (OK, "passed") if report.ok else (ERROR, "FAILED")
    checks = [Check(level, "sandbox", f"Mode {report.mode}: self-check {verdict}.")]
    checks += [Check.of("sandbox", finding) for finding in report.findings]
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a --config given before the subcommand (tabserve --config F doctor).
    parser.add_argument(
        "--config", metavar="FILE", default=argparse.SUPPRESS, help="TabPy-format config file"
    )
    parser.add_argument(
        "--host",
        metavar="NAME",
        help="the host name Tableau connects to; checked against the certificate's names",
    )


def run(args: argparse.Namespace) -> int:
    """Print the checklist; return 1 when anything failed."""
    checks = diagnose(getattr(args, "config", None), os.environ, host=args.host)
    print_checks(checks, sys.stdout)
    return EXIT_FAILED if any(check.level == ERROR for check in checks) else EXIT_OK


def diagnose(
    config: str | None,
    environ: Mapping[str, str],
    *,
    host: str | None = None,
    now: dt.datetime | None = None,
) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    try:
        findings = key_findings(config, environ)
    except ConfigError as exc:
        return [Check(ERROR, "config", str(exc))]
    # The keys that are not settings, as the server names them at start: unknown ones warn,
    # refused ones stop it.
    key_checks = [
        Check(ERROR if finding.refused else WARNING, "config", finding.message)
        for finding in findings
    ]
    try:
        settings = load_settings(config, environ)
    except ConfigError as exc:
        if str(exc) in {check.message for check in key_checks}:
            return key_checks
        return [*key_checks, Check(ERROR, "config", str(exc))]
    source = f"Configuration read from {config}" if config else "No config file: defaults"
    checks = [Check(OK, "config", f"{source} and the environment."), *key_checks]
    checks += network_checks(settings)
    checks += tls_checks(settings, host=host, now=now)
    checks += auth_checks(settings)
    checks += evaluate_checks(settings)
    checks += sandbox_report(settings)
    return checks


def print_checks(checks: list[Check], out: TextIO) -> None:
    print("tabserve doctor: what a Tableau connection will meet", file=out)
    print(file=out)
    for check in checks:
        # One line per check, unwrapped, so that it can be searched for and pasted whole.
        print(f"{_LABELS[check.level]} {check.topic:<11} {check.message}", file=out)
    failures = sum(check.level == ERROR for check in checks)
    warnings = sum(check.level == WARNING for check in checks)
    print(file=out)
    print(f"{failures} failure(s), {warnings} warning(s).", file=out)


# ---------------------------------------------------------------------------------------------
# Network


def network_checks(settings: Settings) -> list[Check]:
    scheme = "https" if settings.tls_enabled else "http"
    where = f"{settings.bind_address or '*'}:{settings.port}"
    if settings.loopback_only:
        first = Check(
            WARNING,
            "network",
            f"Listens on {where} ({scheme}): only this machine can connect. Tableau Server, "
            f"Tableau Cloud and Desktop on other machines cannot reach it; set "
            f"TABSERVE_BIND_ADDRESS = 0.0.0.0 for them.",
        )
    else:
        first = Check(
            OK,
            "network",
            f"Listens on {where} ({scheme}), reachable from other machines: Tableau connects "
            f"with {scheme}://<this host's name>:{settings.port}.",
        )
    return [first, *_port_check(settings)]


def _port_check(settings: Settings) -> list[Check]:
    if settings.port == 0:
        return []
    family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the server does, so that connections in TIME_WAIT do not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.bind_address, settings.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return [
                    Check(
                        WARNING,
                        "network",
                        f"Port {settings.port} is in use: tabserve is already running, or "
                        f"another program holds the port (then the server cannot start).",
                    )
                ]
            if exc.errno == errno.EACCES:
                return [
                    Check(
                        ERROR,
                        "network",
                        f"Port {settings.port} needs privileges this user lacks; use a port "
                        f"above 1023.",
                    )
                ]
            return [
                Check(
                    ERROR,
                    "network",
                    f"Cannot listen on {settings.bind_address}:{settings.port}: "
                    f"{exc.strerror or exc}.",
                )
            ]
    return []


# ---------------------------------------------------------------------------------------------
# TLS


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def tls_checks(
    settings: Settings, *, host: str | None = None, now: dt.datetime | None = None
) -> list[Check]:
    if not settings.tls_enabled:
        if settings.loopback_only:
            return [Check(INFO, "tls", "TLS off (http): fine while only this machine connects.")]
        return [
            Check(
                WARNING,
                "tls",
                "TLS off (http): credentials and data cross the network unencrypted. Set "
                "TABPY_TRANSFER_PROTOCOL = https with TABPY_CERTIFICATE_FILE and TABPY_KEY_FILE.",
            )
        ]
    checks = [Check(OK, "tls", "TLS on (https).")]
    try:
        # The one warning the server starts with anyway, but Tableau then fails on.
        report = inspect_tls_files(
            settings.certificate_file,
            settings.key_file,
            now=now,
            hostname=host,
            missing_intermediate=ERROR,
        )
    except TLSConfigError as exc:
        return [*checks, Check(ERROR, "certificate", str(exc))]
    checks += _certificate_checks(report)
    checks += _context_checks(settings)
    return checks


def _certificate_checks(report: CertificateReport) -> list[Check]:
    return [Check.of("certificate", finding) for finding in report.findings]


def _context_checks(settings: Settings) -> list[Check]:
    """Load the files as the server will (OpenSSL may refuse what the inspection accepted)."""
    collector = _Collector()
    logger = logging.Logger("tabserve.doctor")
    logger.addHandler(collector)
    checks: list[Check] = []
    try:
        make_server_context(
            settings.certificate_file,  # type: ignore[arg-type]  # inspected just before
            settings.key_file,  # type: ignore[arg-type]
            settings.minimum_tls_version,
            logger,
        )
    except TLSConfigError as exc:
        checks.append(Check(ERROR, "tls", str(exc)))
    for record in collector.records:
        level = WARNING if record.levelno >= logging.WARNING else INFO
        checks.append(Check(level, "tls", record.getMessage() + "."))
    return checks


# ---------------------------------------------------------------------------------------------
# Authentication and evaluate


def auth_checks(settings: Settings) -> list[Check]:
    checks = _basic_checks(settings) if settings.password_file is not None else []
    if settings.users == "store":
        checks.append(Check(OK, "auth", "Authentication on (HTTP Basic): users from the store."))
    if settings.oauth_enabled:
        checks += oauth_checks(settings)
    if settings.auth_enabled:
        return checks
    if settings.loopback_only:
        return [Check(INFO, "auth", "Authentication off: anyone on this machine may call.")]
    return [
        Check(
            WARNING,
            "auth",
            "Authentication OFF on an address other machines can reach: anyone who can "
            "connect can run code on this machine. Set TABPY_PWD_FILE (create it with "
            "'tabserve user add') or turn on OAuth (TABPY_OAUTH_ENABLED).",
        )
    ]


def oauth_checks(settings: Settings) -> list[Check]:
    """OAuth's settings, the JWKS host, and the key set fetched now, as the server would."""
    config = OAuthConfig.from_settings(settings)
    boundary = [f"audience {config.audience!r}"] if config.audience else []
    if config.required_scopes:
        boundary.append(f"required scopes {', '.join(config.required_scopes)}")
    enforced = "enforced" if config.enforce_endpoint_scopes else "not enforced"
    checks = [
        Check(
            OK,
            "oauth",
            f"OAuth bearer tokens on: issuer {config.issuer!r}, {' and '.join(boundary)}; "
            f"endpoint scopes ({', '.join(config.info()['endpoint_scopes'])}) {enforced}.",
        )
    ]
    checks += [Check(WARNING, "oauth", warning) for warning in config.warnings()]
    try:
        allowed = check_jwks_host(config)
    except OAuthConfigError as exc:
        return [*checks, Check(ERROR, "oauth", f"{exc}.")]
    if allowed:
        checks.append(Check(WARNING, "oauth", f"{allowed[0].upper()}{allowed[1:]}."))
    try:
        keys, skipped = parse_key_set(
            fetch_jwks(config.jwks_uri, allow_nonpublic=config.allow_nonpublic)
        )
    except (JwksUnavailable, ValueError) as exc:
        return [
            *checks,
            Check(ERROR, "oauth", f"{exc}: every bearer token gets 401 until it can be."),
        ]
    if not keys:
        why = "; ".join(skipped) or "it is empty"
        message = f"The JWKS at {config.jwks_uri} has no usable signing key ({why})."
        return [*checks, Check(ERROR, "oauth", message)]
    checks.append(Check(OK, "oauth", f"JWKS fetched: signing keys {', '.join(sorted(keys))}."))
    if skipped:
        checks.append(Check(INFO, "oauth", f"JWKS entries not used: {'; '.join(skipped)}."))
    if not settings.tls_enabled and not settings.loopback_only:
        checks.append(
            Check(
                WARNING,
                "oauth",
                "Bearer tokens are sent in clear text: no TLS on a network address. Turn on https.",
            )
        )
    return checks


def _basic_checks(settings: Settings) -> list[Check]:
    path = settings.password_file
    assert path is not None
    try:
        parsed = read_password_file(path)
    except PasswordFileError as exc:
        return [Check(ERROR, "auth", f"Authentication on, but the password file fails: {exc}")]
    entries = parsed.entries
    checks = [
        Check(OK, "auth", f"Authentication on (HTTP Basic): {len(entries)} user(s) in {path}.")
    ]
    limited = [entry for entry in entries if entry.effective_permissions != ALL_PERMISSIONS]
    if limited:
        names = ", ".join(
            f"{entry.username} ({','.join(sorted(entry.effective_permissions))})"
            for entry in limited
        )
        checks.append(Check(INFO, "auth", f"Users with limited permissions: {names}."))
    no_evaluate = [e.username for e in entries if "evaluate" not in e.effective_permissions]
    if no_evaluate and settings.evaluate_enabled:
        checks.append(
            Check(
                INFO,
                "auth",
                f"Users without the 'evaluate' permission ({', '.join(no_evaluate)}) pass "
                f"Tableau's Test Connection, but their SCRIPT_ calculations get 403.",
            )
        )
    checks += _file_mode_checks(path)
    if not settings.tls_enabled and not settings.loopback_only:
        checks.append(
            Check(
                WARNING,
                "auth",
                "Passwords are sent in clear text: Basic authentication without TLS on a "
                "network address. Turn on https.",
            )
        )
    return checks


def _file_mode_checks(path: os.PathLike[str]) -> list[Check]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [
            Check(
                WARNING,
                "auth",
                f"The password file can be read by other users (mode "
                f"{stat.S_IMODE(mode):o}); restrict it with: chmod 600 {os.fspath(path)}",
            )
        ]
    return []


def evaluate_checks(settings: Settings) -> list[Check]:
    if settings.evaluate_enabled:
        return [Check(INFO, "evaluate", "Evaluate on: SCRIPT_ calculations run ad-hoc code.")]
    return [
        Check(
            INFO,
            "evaluate",
            "Evaluate off: SCRIPT_ calculations get 404, including those calling "
            "tabpy.query; deployed endpoints answer on /query (MODEL_EXTENSION_ calculations).",
        )
    ]
