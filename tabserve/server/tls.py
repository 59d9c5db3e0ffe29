"""TLS for the server: the ``ssl`` context, and checks that explain a bad certificate setup.

Two entry points for the server and one for ``tabserve doctor``:

* :func:`check_tls_files` runs at startup and raises :class:`TLSConfigError` with TabPy's
  messages for unset or missing files, an expired or not-yet-valid certificate, and with
  clearer ones for a key that does not match, an encrypted key, or a file without a certificate.
* :func:`make_server_context` builds the server-side context (TabPy semantics, including the
  ``TABPY_MINIMUM_TLS_VERSION`` log lines).
* :func:`inspect_tls_files` returns a :class:`CertificateReport` whose ``findings`` list the
  checklist for ``doctor``: validity dates (UTC), key match, chain completeness (a leaf whose
  issuer is missing from the file is the usual cause of Tableau's ``PKIX path building failed``
  and ``TLSV1_ALERT_UNKNOWN_CA``), subjectAltNames and an optional host-name match.

Certificates are read with the ``cryptography`` package; nothing here opens a socket.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .findings import ERROR, INFO, OK, WARNING, Finding, Level

__all__ = [
    "CERTIFICATE_PARAMETER",
    "DEFAULT_MINIMUM_VERSION",
    "KEY_PARAMETER",
    "CertificateReport",
    "TLSConfigError",
    "check_tls_files",
    "inspect_tls_files",
    "make_server_context",
    "resolve_minimum_version",
]

_log = logging.getLogger("tabserve.certificates")  # the name it always had

CERTIFICATE_PARAMETER = "TABPY_CERTIFICATE_FILE"
KEY_PARAMETER = "TABPY_KEY_FILE"
DEFAULT_MINIMUM_VERSION = "TLSv1_2"
_PREFIX = "Error using HTTPS:"
EXPIRY_WARNING = dt.timedelta(days=30)
_OBSOLETE_VERSIONS = {"SSLv3", "TLSv1", "TLSv1_1", "MINIMUM_SUPPORTED"}

if TYPE_CHECKING:
    from typing import TypeAlias

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, rsa

    Logger: TypeAlias = logging.Logger | logging.LoggerAdapter[Any]


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message is meant for the operator."""

    def __init__(self, message: str, report: CertificateReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class CertificateReport:
    """What the certificate and key files contain, and what is wrong with them."""

    cert_file: str
    key_file: str
    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_before: dt.datetime  # timezone-aware, UTC
    not_after: dt.datetime
    certificate_count: int
    self_signed: bool
    chain_complete: bool
    key_matches: bool
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.level == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors


# ---------------------------------------------------------------------------------------------
# File checks


def _load_cryptography() -> None:
    """Import ``cryptography`` into this module's names on first use.

    With PyJWT it costs the front end about 9 MB (measured), and only a server with TLS (or
    doctor) reads a certificate: a plain-HTTP server never loads it."""
    global x509, InvalidSignature, UnsupportedAlgorithm, hashes, serialization, dsa, rsa
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, rsa


def _format_time(moment: dt.datetime) -> str:
    # TabPy prints a naive "YYYY-MM-DD HH:MM:SS"; keep the text identical, the value is UTC.
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _check_parameters(cert_file: str | os.PathLike[str] | None, key_file: object) -> None:
    pairs = ((CERTIFICATE_PARAMETER, cert_file), (KEY_PARAMETER, key_file))
    unset = [name for name, value in pairs if not value]
    if unset:
        raise TLSConfigError(f"{_PREFIX} The parameter(s) {' and '.join(unset)} must be set.")
    missing = [name for name, value in pairs if not Path(value).is_file()]  # type: ignore[arg-type]
    if missing:
        raise TLSConfigError(
            f"{_PREFIX} The parameter(s) {' and '.join(missing)} must point to an existing file."
        )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{_PREFIX} cannot read the {what} {path}: {exc.strerror}") from None


def _load_certificates(path: str) -> list[x509.Certificate]:
    data = _read(path, "certificate file")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        hint = ""
        try:
            x509.load_der_x509_certificate(data)
            hint = " It is in DER (binary) form; convert it with: openssl x509 -inform der -in FILE"
        except ValueError:
            pass
        raise TLSConfigError(f"{_PREFIX} {path} contains no PEM certificate.{hint}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TLSConfigError(f"{_PREFIX} {path} has a damaged PEM certificate: {exc}") from None


def _load_key(path: str) -> Any:
    data = _read(path, "key file")
    if b"PRIVATE KEY-----" not in data:
        raise TLSConfigError(f"{_PREFIX} {path} contains no PEM private key.")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{_PREFIX} the private key in {path} is protected by a passphrase; tabserve needs an "
            f"unencrypted key (remove it with: openssl pkey -in {path} -out NEWFILE)."
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(f"{_PREFIX} cannot load the private key in {path}: {exc}") from None


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty name)"


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = list(extension.value.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in extension.value.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def _hostname_matches(hostname: str, sans: Sequence[str]) -> bool:
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    if address is not None:
        return any(san == str(address) for san in sans)
    host = hostname.lower().rstrip(".")
    for san in (name.lower().rstrip(".") for name in sans):
        if san == host:
            return True
        # A wildcard stands for exactly one whole left-most label.
        if san.startswith("*.") and "." in host and host.split(".", 1)[1] == san[2:]:
            return True
    return False


def _walk_chain(
    certs: list[x509.Certificate],
) -> tuple[list[x509.Certificate], bool]:
    """Follow issuers from the leaf through the file; return (path, ends at a self-signed root)."""
    path = [certs[0]]
    while True:
        current = path[-1]
        if _issued_by(current, current):
            return path, True
        parent = next(
            (cert for cert in certs if cert not in path and _issued_by(current, cert)), None
        )
        if parent is None:
            return path, False
        path.append(parent)


def _chain_findings(
    certs: list[x509.Certificate], findings: list[Finding], missing_intermediate: Level
) -> tuple[bool, bool]:
    """Append chain findings; return (leaf self-signed, chain complete)."""
    leaf = certs[0]
    path, reaches_root = _walk_chain(certs)
    self_signed = reaches_root and len(path) == 1
    if self_signed:
        findings.append(
            Finding(
                INFO,
                "The certificate is self-signed: Tableau must be told to trust it (add it to "
                "Tableau Server's trust store, or the OS store for Desktop).",
            )
        )
        complete = True
    elif len(path) == 1:
        complete = False
        findings.append(
            Finding(
                missing_intermediate,
                f"Missing intermediate certificate: the server certificate is issued by "
                f"{_name(leaf.issuer)}, which is not in {CERTIFICATE_PARAMETER}. Append the "
                f"intermediate certificate(s) after the server certificate; a missing "
                f"intermediate is the usual cause of Tableau's 'PKIX path building failed' "
                f"and TLSV1_ALERT_UNKNOWN_CA.",
            )
        )
    else:
        complete = True
        names = " -> ".join(_name(cert.subject) for cert in path)
        findings.append(Finding(OK, f"Certificate chain in the file: {names}."))
        if not reaches_root:
            findings.append(
                Finding(
                    INFO,
                    f"The chain ends at a certificate issued by {_name(path[-1].issuer)}; "
                    f"clients must trust that CA (public CAs usually are; a company CA must be "
                    f"in Tableau's trust store).",
                )
            )
    unused = [cert for cert in certs if cert not in path]
    if unused:
        names = ", ".join(_name(cert.subject) for cert in unused)
        findings.append(
            Finding(
                WARNING,
                f"{len(unused)} certificate(s) in the file are not part of the server "
                f"certificate's chain and will confuse clients: {names}.",
            )
        )
    return self_signed, complete


def _date_findings(
    certs: list[x509.Certificate], now: dt.datetime, findings: list[Finding]
) -> None:
    leaf = certs[0]
    if leaf.not_valid_after_utc < now:
        findings.append(
            Finding(
                ERROR,
                f"{_PREFIX} The certificate provided expired on "
                f"{_format_time(leaf.not_valid_after_utc)}.",
            )
        )
    elif leaf.not_valid_before_utc > now:
        findings.append(
            Finding(
                ERROR,
                f"{_PREFIX} The certificate provided is not valid until "
                f"{_format_time(leaf.not_valid_before_utc)}.",
            )
        )
    else:
        left = leaf.not_valid_after_utc - now
        level = WARNING if left < EXPIRY_WARNING else OK
        findings.append(
            Finding(
                level,
                f"Certificate valid from {_format_time(leaf.not_valid_before_utc)} to "
                f"{_format_time(leaf.not_valid_after_utc)} UTC ({left.days} days left).",
            )
        )
    for cert in certs[1:]:
        if cert.not_valid_after_utc < now:
            findings.append(
                Finding(
                    ERROR,
                    f"The chain certificate {_name(cert.subject)} expired on "
                    f"{_format_time(cert.not_valid_after_utc)} UTC.",
                )
            )


def _key_findings(
    certs: list[x509.Certificate], key: Any, cert_file: str, key_file: str, findings: list[Finding]
) -> bool:
    public = _public_der(key.public_key())
    if _public_der(certs[0].public_key()) == public:
        findings.append(Finding(OK, "The private key matches the certificate."))
        return True
    message = (
        f"{_PREFIX} The private key in {key_file} does not match the certificate in {cert_file}."
    )
    if any(_public_der(cert.public_key()) == public for cert in certs[1:]):
        message += " It matches another certificate in the file: put the server certificate first."
    findings.append(Finding(ERROR, message))
    return False


def _strength_findings(leaf: x509.Certificate, findings: list[Finding]) -> None:
    public = leaf.public_key()
    if isinstance(public, rsa.RSAPublicKey | dsa.DSAPublicKey) and public.key_size < 2048:
        findings.append(
            Finding(WARNING, f"The key has only {public.key_size} bits; use 2048 or more.")
        )
    algorithm = leaf.signature_hash_algorithm
    if isinstance(algorithm, hashes.SHA1 | hashes.MD5):
        findings.append(
            Finding(WARNING, f"The certificate is signed with {algorithm.name}; clients reject it.")
        )


def inspect_tls_files(
    cert_file: str | os.PathLike[str] | None,
    key_file: str | os.PathLike[str] | None,
    *,
    now: dt.datetime | None = None,
    hostname: str | None = None,
    missing_intermediate: Level = WARNING,
) -> CertificateReport:
    """Read both files and report every problem found as a finding.

    A missing intermediate certificate is a ``missing_intermediate`` finding: the server
    starts with it (a warning), ``tabserve doctor`` fails on it (it is what Tableau fails on).

    Raises :class:`TLSConfigError` only when no report can be made: a file is unset, missing
    or unreadable, holds no certificate or key, or the key needs a passphrase.
    """
    _check_parameters(cert_file, key_file)
    _load_cryptography()
    cert_path, key_path = os.fspath(cert_file), os.fspath(key_file)  # type: ignore[arg-type]
    certs = _load_certificates(cert_path)
    key = _load_key(key_path)
    moment = now or dt.datetime.now(dt.timezone.utc)
    leaf = certs[0]
    sans = _sans(leaf)
    findings = [
        Finding(
            INFO,
            f"{cert_path} holds {len(certs)} certificate(s); the server certificate "
            f"is {_name(leaf.subject)}, issued by {_name(leaf.issuer)}.",
        )
    ]
    _date_findings(certs, moment, findings)
    key_matches = _key_findings(certs, key, cert_path, key_path, findings)
    self_signed, complete = _chain_findings(certs, findings, missing_intermediate)
    if not sans:
        findings.append(
            Finding(
                WARNING,
                "The certificate has no subjectAltName; most clients ignore the Common Name and "
                "will reject the host name.",
            )
        )
    else:
        findings.append(Finding(INFO, f"Names in the certificate: {', '.join(sans)}."))
    if hostname:
        if _hostname_matches(hostname, sans):
            findings.append(Finding(OK, f"The certificate is valid for {hostname}."))
        else:
            findings.append(
                Finding(
                    WARNING,
                    f"The certificate is not valid for {hostname}; Tableau must connect with "
                    f"one of: {', '.join(sans) or '(no names)'}.",
                )
            )
    _strength_findings(leaf, findings)
    return CertificateReport(
        cert_file=cert_path,
        key_file=key_path,
        subject=_name(leaf.subject),
        issuer=_name(leaf.issuer),
        sans=sans,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        certificate_count=len(certs),
        self_signed=self_signed,
        chain_complete=complete,
        key_matches=key_matches,
        findings=tuple(findings),
    )


def check_tls_files(
    cert_file: str | os.PathLike[str] | None,
    key_file: str | os.PathLike[str] | None,
    *,
    now: dt.datetime | None = None,
) -> CertificateReport:
    """Startup check: raise :class:`TLSConfigError` on the first error, else return the report.

    Warnings (such as a missing intermediate) do not stop the server; log them.
    """
    report = inspect_tls_files(cert_file, key_file, now=now)
    if report.errors:
        raise TLSConfigError(report.errors[0].message, report)
    return report


# ---------------------------------------------------------------------------------------------
# SSL context


def resolve_minimum_version(value: str | None, log: Logger | None = None) -> ssl.TLSVersion:
    """Map a ``TABPY_MINIMUM_TLS_VERSION`` value to a version, logging as TabPy does.

    TabPy takes the exact name of an ``ssl.TLSVersion`` member; tabserve also accepts
    ``tlsv1.3``-style spellings. Anything else logs a warning and falls back to TLSv1_2.
    """
    logger = log or _log
    name = DEFAULT_MINIMUM_VERSION
    if value is not None and value.strip():
        wanted = value.strip()
        by_alias = {
            member.lower().replace(".", "_"): member for member in ssl.TLSVersion.__members__
        }
        match = by_alias.get(wanted.lower().replace(".", "_"))
        if match is None:
            logger.warning("Unrecognized value for TABPY_MINIMUM_TLS_VERSION: %s", value)
        else:
            name = match
    logger.info("Setting minimum TLS version to %s", name)
    if name in _OBSOLETE_VERSIONS:
        logger.warning("Minimum TLS version %s allows obsolete, insecure protocols", name)
    return ssl.TLSVersion[name]


def _refuse_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang a service.
    raise TLSConfigError(
        f"{_PREFIX} the private key is protected by a passphrase; tabserve needs an "
        "unencrypted key."
    )


def make_server_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    minimum_version: str | None = None,
    log: Logger | None = None,
) -> ssl.SSLContext:
    """Server-side context with the certificate chain loaded; no client certificates asked."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    version = resolve_minimum_version(minimum_version, log)
    try:
        context.minimum_version = version
    except ValueError:
        (log or _log).warning(
            "TLS version %s is not supported here; using %s", version.name, DEFAULT_MINIMUM_VERSION
        )
        context.minimum_version = ssl.TLSVersion[DEFAULT_MINIMUM_VERSION]
    _check_parameters(cert_file, key_file)
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"{_PREFIX} The private key in {os.fspath(key_file)} does not match the "
                f"certificate in {os.fspath(cert_file)}."
            ) from None
        raise TLSConfigError(
            f"{_PREFIX} cannot load {os.fspath(cert_file)} / {os.fspath(key_file)}: {exc}"
        ) from None
    return context
