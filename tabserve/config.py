"""Settings: every setting declared once, loaded from a TabPy config file and the environment.

A TabPy config file is an INI file whose ``[TabPy]`` section holds ``TABPY_*`` keys. tabserve
reads the same file unchanged, and its own settings (``TABSERVE_*``) use the same section.
Precedence is environment > file > default, also when the file has no ``[TabPy]`` section
(TabPy ignores the environment then, and lets the file win; see docs/configuration.md).

``load_settings`` is called once, at the edge (the CLI); everything below receives the
frozen ``Settings`` object.
"""

from __future__ import annotations

import configparser
import difflib
import importlib.util
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

SECTION = "TabPy"


class ConfigError(Exception):
    """A setting has a value tabserve cannot use; the message names the key and the value."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_log_details(raw: str) -> bool:
    # TabPy's meaning: anything but a case-insensitive "false" turns it on, even "0".
    return raw.strip().lower() != "false"


def _parse_port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number between 0 and 65535")
    return port


def _parse_positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


# Front-end processes: each is a whole Tornado server with its own services; beyond a few per
# core they only add memory and store connections.
MAX_PROCESSES = 64


def _parse_processes(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= MAX_PROCESSES:
        raise ValueError(f"expected a whole number from 1 to {MAX_PROCESSES}")
    return value


def _parse_non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected a whole number of at least 0")
    return value


def _parse_timeout(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("expected a number of seconds greater than 0")
    return value


def _parse_non_negative_float(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < 86400:  # also refuses nan and inf
        raise ValueError("expected a number of seconds, at least 0 and less than a day")
    return value


def _parse_path(raw: str) -> Path:
    return Path(os.path.expanduser(raw.strip())).resolve()


def _parse_optional_path(raw: str) -> Path | None:
    return _parse_path(raw) if raw.strip() else None


def _parse_protocol(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("http", "https"):
        raise ValueError("expected http or https")
    return value


def _parse_name_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


def _parse_sandbox(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("none", "bubblewrap"):
        raise ValueError("expected none or bubblewrap")
    return value


def _parse_worker_launch(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("fresh", "zygote"):
        raise ValueError("expected fresh or zygote")
    return value


def _parse_module_list(raw: str) -> tuple[str, ...]:
    names = _parse_name_list(raw)
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a module name")
    return names


def _parse_path_list(raw: str) -> tuple[Path, ...]:
    return tuple(_parse_path(item) for item in raw.split(",") if item.strip())


def _parse_store(raw: str) -> str:
    value = raw.strip()
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "expected a postgresql://user:password@host:port/dbname URL, or unset for the "
            "state directory"
        )
    return value


def _parse_users(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("file", "store"):
        raise ValueError("expected file or store")
    return value


def _parse_scope_list(raw: str) -> tuple[str, ...]:
    # TabPy's form: comma-separated; the token's own `scope` claim is space-separated.
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


@dataclass(frozen=True)
class Setting:
    """One setting as declared on a ``Settings`` field: key, parser, help, default."""

    key: str
    attr: str
    parse: Callable[[str], Any]
    help: str
    default_doc: str
    secret: bool = False  # its value may hold a password: never shown in messages


def setting(
    key: str,
    parse: Callable[[str], Any],
    help: str,
    default: Any = None,
    *,
    factory: Callable[[], Any] | None = None,
    doc: str = "",
    secret: bool = False,
) -> Any:
    """Declare a Settings field together with its config key, parser and help text."""
    meta = {"key": key, "parse": parse, "help": help, "doc": doc, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def physical_memory_bytes() -> int:
    """Memory available to this machine or container, whichever is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        # A Kubernetes pod sees the host's RAM but is killed at its cgroup limit.
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw != "max":
            total = min(total, int(raw))
    except (OSError, ValueError):
        pass
    return total


def is_loopback(address: str) -> bool:
    """Whether listening on ``address`` is reachable from this machine only."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:
        return False  # "" (every interface) or a host name: assume reachable


def default_state_path() -> Path:
    return Path(platformdirs.user_data_dir("tabserve", appauthor=False))


# What workers see of the environment by default (TABSERVE_WORKER_ENV); the pool has no other.
WORKER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


@dataclass(frozen=True)
class Settings:
    """The resolved configuration. Build it with ``load_settings``; each field is a setting."""

    port: int = setting("TABPY_PORT", _parse_port, "TCP port to listen on.", 9004)
    state_path: Path = setting(
        "TABPY_STATE_PATH",
        _parse_path,
        "Directory holding state.ini and deployed endpoints; created if missing.",
        factory=default_state_path,
        doc="a per-user data directory, e.g. `~/.local/share/tabserve`",
    )
    query_object_path: Path | None = setting(
        "TABPY_QUERY_OBJECT_PATH",
        _parse_optional_path,
        "Accepted for TabPy compatibility and not used: as in TabPy, deployed endpoint files "
        "are loaded from `<state path>/query_objects`.",
        doc="unset",
    )
    static_path: Path | None = setting(
        "TABPY_STATIC_PATH",
        _parse_optional_path,
        "Directory of static files served at `/`.",
        doc="the built-in page",
    )
    password_file: Path | None = setting(
        "TABPY_PWD_FILE",
        _parse_optional_path,
        "TabPy password file; setting it turns on HTTP Basic authentication for every API "
        "route. Re-read when it changes, or at once on SIGHUP.",
        doc="unset (no authentication)",
    )
    oauth_enabled: bool = setting(
        "TABPY_OAUTH_ENABLED",
        _parse_bool,
        "Accept OAuth 2.0 JWT bearer tokens (`Authorization: Bearer`), as TabPy 2.15+ does. "
        "Needs `TABPY_OAUTH_ISSUER`, `TABPY_OAUTH_JWKS_URI` and an audience or required "
        "scopes; see docs/security.md.",
        False,
    )
    oauth_issuer: str = setting(
        "TABPY_OAUTH_ISSUER",
        str.strip,
        "The `iss` claim every token must carry, exactly; an `https://` URL.",
        "",
        doc="unset",
    )
    oauth_jwks_uri: str = setting(
        "TABPY_OAUTH_JWKS_URI",
        str.strip,
        "The issuer's JWKS (signing keys), fetched over https, cached and refreshed when a "
        "token names an unknown key. Its host must resolve to public addresses.",
        "",
        doc="unset",
    )
    oauth_allow_nonpublic_jwks: bool = setting(
        "TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS",
        _parse_bool,
        "Let the JWKS host resolve to private, loopback or link-local addresses (an IdP "
        "inside your network). https is still required.",
        False,
    )
    oauth_audience: str = setting(
        "TABPY_OAUTH_AUDIENCE",
        str.strip,
        "The `aud` value tokens must contain. Optional when `TABPY_OAUTH_REQUIRED_SCOPES` is "
        "set; not checked when unset.",
        "",
        doc="unset",
    )
    oauth_required_scopes: tuple[str, ...] = setting(
        "TABPY_OAUTH_REQUIRED_SCOPES",
        _parse_scope_list,
        "Comma-separated scopes every token must hold in its `scope` claim, on every route "
        "(`/info` included); a token without them gets 401.",
        (),
        doc="empty",
    )
    oauth_enforce_endpoint_scopes: bool = setting(
        "TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES",
        _parse_bool,
        "Tokens need the query scope for `/query`, the evaluate scope for `/evaluate` and "
        "the deploy scope for deploys and the upload destination; else 403 with "
        '`WWW-Authenticate: Bearer error="insufficient_scope"`.',
        False,
    )
    oauth_query_scope: str = setting(
        "TABPY_OAUTH_QUERY_SCOPE",
        str.strip,
        "The scope that allows `/query` (and `tabpy.query()` inside a script).",
        "tabpy:query",
    )
    oauth_evaluate_scope: str = setting(
        "TABPY_OAUTH_EVALUATE_SCOPE",
        str.strip,
        "The scope that allows `/evaluate`.",
        "tabpy:evaluate",
    )
    oauth_deploy_scope: str = setting(
        "TABPY_OAUTH_DEPLOY_SCOPE",
        str.strip,
        "The scope that allows deploying, updating and deleting endpoints.",
        "tabpy:deploy",
    )
    oauth_log_user: bool = setting(
        "TABPY_OAUTH_LOG_USER",
        _parse_bool,
        "Name a token's caller by its `sub` claim in the access log (only with "
        "`TABPY_LOG_DETAILS`); otherwise token callers are not named.",
        False,
    )
    transfer_protocol: str = setting(
        "TABPY_TRANSFER_PROTOCOL",
        _parse_protocol,
        "`http` or `https` (case-insensitive); `https` needs the certificate and key files.",
        "http",
    )
    certificate_file: Path | None = setting(
        "TABPY_CERTIFICATE_FILE",
        _parse_optional_path,
        "PEM certificate for https: the server certificate first, then its intermediates.",
    )
    key_file: Path | None = setting(
        "TABPY_KEY_FILE", _parse_optional_path, "PEM private key for https, unencrypted."
    )
    minimum_tls_version: str = setting(
        "TABPY_MINIMUM_TLS_VERSION",
        str.strip,
        "Lowest TLS version accepted: a name of `ssl.TLSVersion` such as `TLSv1_2` or `TLSv1_3`.",
        "TLSv1_2",
    )
    log_details: bool = setting(
        "TABPY_LOG_DETAILS",
        _parse_log_details,
        "Log caller details (address, TabPy-Client and TabPy-User headers). As in TabPy, any "
        "value but `false` turns it on.",
        False,
    )
    max_request_size_mb: int = setting(
        "TABPY_MAX_REQUEST_SIZE_MB",
        _parse_positive_int,
        "Largest request body in MiB, also after gzip decompression; larger gets 413.",
        100,
    )
    evaluate_enabled: bool = setting(
        "TABPY_EVALUATE_ENABLE",
        _parse_bool,
        "Allow ad-hoc scripts on `/evaluate`; when false it answers 404.",
        True,
    )
    evaluate_timeout: float = setting(
        "TABPY_EVALUATE_TIMEOUT",
        _parse_timeout,
        "Seconds a request may take, queueing included; then the worker is killed (408).",
        30.0,
    )
    job_timeout: float = setting(
        "TABSERVE_JOB_TIMEOUT",
        _parse_timeout,
        "Seconds an asynchronous job (`Prefer: respond-async`) may run, queueing included; "
        "then its worker is killed and the job fails.",
        3600.0,
    )
    job_max_pending: int = setting(
        "TABSERVE_JOB_MAX_PENDING",
        _parse_positive_int,
        "Asynchronous jobs queued or running at once, everyone's (all replicas of a store); "
        "a submission beyond it gets 503 with `Retry-After`.",
        1000,
    )
    job_max_pending_per_user: int = setting(
        "TABSERVE_JOB_MAX_PENDING_PER_USER",
        _parse_positive_int,
        "Asynchronous jobs queued or running at once for one caller (a user, a token's "
        "subject, an endpoint key); a submission beyond it gets 503 with `Retry-After`.",
        100,
    )
    job_max_request_mb: int = setting(
        "TABSERVE_JOB_MAX_REQUEST_MB",
        _parse_positive_int,
        "Total size of the request bodies that queued and running jobs keep in the store, "
        "in MiB; a submission beyond it gets 503 with `Retry-After`.",
        1024,
    )
    result_ttl: float = setting(
        "TABSERVE_RESULT_TTL",
        _parse_timeout,
        "Seconds a job's result stays available at `/query_results/<id>`.",
        86400.0,
    )
    result_max_mb: int = setting(
        "TABSERVE_RESULT_MAX_MB",
        _parse_positive_int,
        "Total size of the stored job results, in MiB; the oldest go first beyond it.",
        1024,
    )
    cache_max_mb: int = setting(
        "TABSERVE_CACHE_MAX_MB",
        _parse_non_negative_int,
        "Memory for cached results (calls with `max_age`), in MiB; least recently used go "
        "first. 0 turns the cache off.",
        256,
    )
    evaluate_max_age: int | None = setting(
        "TABSERVE_EVALUATE_MAX_AGE",
        _parse_non_negative_int,
        "The `max_age` of `/evaluate` calls that give none (Tableau cannot): a result of the "
        "same script on the same data retrieved within this many seconds is answered from "
        "the cache. Unset: never cached, as TabPy.",
        None,
        doc="unset",
    )
    gzip_enabled: bool = setting(
        "TABPY_GZIP_ENABLE",
        _parse_bool,
        "Accept gzip-compressed request bodies (`Content-Encoding: gzip`).",
        True,
    )
    arrow_enabled: bool = setting(
        "TABPY_ARROW_ENABLE",
        _parse_bool,
        "Run an Arrow Flight server beside HTTP, which Tableau Prep uses for script steps "
        "instead of large JSON bodies (needs the `tabserve[arrow]` extra). See docs/api.md.",
        False,
    )
    arrow_flight_port: int = setting(
        "TABPY_ARROWFLIGHT_PORT",
        _parse_port,
        "TCP port of the Arrow Flight server, on `TABSERVE_BIND_ADDRESS`; `grpc+tls` with the "
        "HTTP certificate when `TABPY_TRANSFER_PROTOCOL = https`. 0 picks a free port.",
        13622,
    )
    flight_ttl: float = setting(
        "TABSERVE_FLIGHT_TTL",
        _parse_timeout,
        "Seconds a table stored on the Flight server (uploaded, or a result) is kept before it "
        "is dropped unread.",
        600.0,
    )
    flight_max_mb: int = setting(
        "TABSERVE_FLIGHT_MAX_MB",
        _parse_positive_int,
        "Total MiB of tables the Flight server holds at once (Arrow IPC size); an upload or a "
        "result that would go over it is refused.",
        1024,
    )
    flight_location: str = setting(
        "TABSERVE_FLIGHT_LOCATION",
        str.strip,
        "The location Flight clients are told to fetch results from, e.g. "
        "`grpc+tls://tabserve.example.com:13622` (behind a proxy or NAT).",
        "",
        doc="`grpc+tcp://` (or `grpc+tls://`) + the bind address, or this machine's name when "
        "bound to every interface, + the port",
    )
    bind_address: str = setting(
        "TABSERVE_BIND_ADDRESS",
        str.strip,
        "Address to listen on; `0.0.0.0` or `::` for every interface.",
        "127.0.0.1",
    )
    workers: int = setting(
        "TABSERVE_WORKERS",
        _parse_positive_int,
        "Number of worker processes running user code.",
        factory=_default_workers,
        doc="the number of CPUs",
    )
    processes: int = setting(
        "TABSERVE_PROCESSES",
        _parse_processes,
        "Front-end processes (Tornado event loops) accepting on the port, all sharing one "
        "worker pool; with 2 or more, the process started supervises them and serves no HTTP.",
        1,
    )
    worker_memory_mb: int = setting(
        "TABSERVE_WORKER_MEMORY_MB",
        _parse_non_negative_int,
        "Address-space cap per worker in MiB (0: no cap). A worker over it fails the request "
        "and is replaced.",
        0,
        doc="physical memory (or the cgroup limit) / (workers + 1)",
    )
    queue_length: int = setting(
        "TABSERVE_QUEUE_LENGTH",
        _parse_non_negative_int,
        "Requests that may wait for a free worker; beyond that, 503 with `Retry-After`.",
        128,
    )
    worker_env: tuple[str, ...] = setting(
        "TABSERVE_WORKER_ENV",
        _parse_name_list,
        "Comma-separated environment variables passed to workers; all others are removed.",
        WORKER_ENV,
        doc="`" + ",".join(WORKER_ENV) + "`",
    )
    worker_launch: str = setting(
        "TABSERVE_WORKER_LAUNCH",
        _parse_worker_launch,
        "How workers start: `zygote` (forked from one clean process that imported numpy, "
        "pandas and `TABSERVE_WORKER_PRELOAD` once: milliseconds per worker, shared memory) "
        "or `fresh` (a new interpreter each: about half a second). With "
        "`TABSERVE_SANDBOX = bubblewrap` workers always start fresh, each in its own sandbox.",
        "zygote",
    )
    worker_preload: tuple[str, ...] = setting(
        "TABSERVE_WORKER_PRELOAD",
        _parse_module_list,
        "Comma-separated modules every worker imports before its first request (once, in the "
        "zygote, with `TABSERVE_WORKER_LAUNCH = zygote`), e.g. `scipy.stats,sklearn`.",
        (),
        doc="empty",
    )
    sandbox: str = setting(
        "TABSERVE_SANDBOX",
        _parse_sandbox,
        "Isolation of worker processes: `none` (separate processes, limits, unprivileged user) "
        "or `bubblewrap` (also namespaces: no network, read-only filesystem, secrets hidden). "
        "See docs/security.md.",
        "none",
    )
    sandbox_network: bool = setting(
        "TABSERVE_SANDBOX_NETWORK",
        _parse_bool,
        "With `TABSERVE_SANDBOX = bubblewrap`: let scripts use the network.",
        False,
    )
    sandbox_hide: tuple[Path, ...] = setting(
        "TABSERVE_SANDBOX_HIDE",
        _parse_path_list,
        "Comma-separated extra files or directories workers must not see in `bubblewrap` mode "
        "(the password file, the TLS key and the state directory are always hidden).",
        (),
        doc="empty",
    )
    worker_user: str = setting(
        "TABSERVE_WORKER_USER",
        str.strip,
        "When the server runs as root: the user (name or uid) that runs user code. `auto` "
        "means `nobody`, or root with a warning when `nobody` cannot read the Python "
        "installation (sandbox `none` only); a named user must work or scripts are refused. "
        "`root` keeps root (not recommended). Ignored when the server is not root.",
        "auto",
    )
    trust_deployed_code: bool = setting(
        "TABSERVE_TRUST_DEPLOYED_CODE",
        _parse_bool,
        "Keep `/query` and deploys working when the sandbox self-check fails.",
        False,
    )
    worker_cpu_seconds: int = setting(
        "TABSERVE_WORKER_CPU_SECONDS",
        _parse_non_negative_int,
        "CPU-time backstop per request (`RLIMIT_CPU`); a worker over it is killed (0: none).",
        0,
        doc="2 × `TABPY_EVALUATE_TIMEOUT` + 10",
    )
    worker_file_size_mb: int = setting(
        "TABSERVE_WORKER_FILE_SIZE_MB",
        _parse_non_negative_int,
        "Largest file a worker may write, in MiB (`RLIMIT_FSIZE`; 0: no limit).",
        1024,
    )
    worker_open_files: int = setting(
        "TABSERVE_WORKER_OPEN_FILES",
        _parse_non_negative_int,
        "Open file descriptors per worker (`RLIMIT_NOFILE`; 0: no limit).",
        1024,
    )
    worker_processes: int = setting(
        "TABSERVE_WORKER_PROCESSES",
        _parse_non_negative_int,
        "Processes and threads per worker (`RLIMIT_NPROC`; 0: no limit). Not applied when "
        "workers run as the server's own user; see docs/security.md.",
        64,
    )
    auth_max_delay: float = setting(
        "TABSERVE_AUTH_MAX_DELAY",
        _parse_non_negative_float,
        "Longest delay in seconds before a 401 to an address that keeps failing to log in "
        "(from the 5th failure in a minute: 0.5 s, doubling); 0 turns the slow-down off.",
        10.0,
    )
    log_level: str = setting(
        "TABSERVE_LOG_LEVEL",
        _parse_log_level,
        "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`.",
        "INFO",
    )
    log_format: str = setting(
        "TABSERVE_LOG_FORMAT",
        _parse_log_format,
        "Log line format: `text` or `json` (one JSON object per line).",
        "text",
    )
    log_file: Path | None = setting(
        "TABSERVE_LOG_FILE",
        _parse_optional_path,
        "File the server and its workers append log lines to; reopened if rotated away.",
        doc="unset (stderr)",
    )
    metrics_auth: bool = setting(
        "TABSERVE_METRICS_AUTH",
        _parse_bool,
        "Whether `/metrics` needs credentials when authentication is on.",
        True,
    )
    store: str = setting(
        "TABSERVE_STORE",
        _parse_store,
        "Where endpoints, users, jobs, results and API keys are kept. Unset: the state directory "
        "(`state.ini` and `query_objects/` as TabPy writes them, plus `tabserve.db`). "
        "`postgresql://user:password@host:port/dbname`: everything in PostgreSQL, shared by "
        "replicas; `TABPY_STATE_PATH` then only caches archives. See docs/scaling.md.",
        "",
        doc="unset (the state directory)",
        secret=True,
    )
    store_migrate: bool = setting(
        "TABSERVE_STORE_MIGRATE",
        _parse_bool,
        "Apply the store's missing schema migrations at start; when false, a store that "
        "needs them stops the start (run `tabserve store migrate`).",
        True,
    )
    users: str = setting(
        "TABSERVE_USERS",
        _parse_users,
        "Where users come from: `file` (the password file `TABPY_PWD_FILE`; no file, no "
        "authentication) or `store` (authentication on, users managed with `tabserve user "
        "--store`).",
        "file",
    )
    upload_path: Path | None = setting(
        "TABSERVE_UPLOAD_PATH",
        _parse_optional_path,
        "Directory TabPy's client writes endpoint files to before deploying (the upload "
        "destination). Replicas behind one load balancer must all name the same shared "
        "directory for TabPy-client deploys; tabserve's client needs none.",
        doc="`<state path>/staging`",
    )
    shutdown_grace: float = setting(
        "TABSERVE_SHUTDOWN_GRACE",
        _parse_non_negative_float,
        "On SIGTERM or SIGINT, seconds in-flight requests may take to finish before the "
        "workers are stopped.",
        20.0,
    )
    idle_timeout: float = setting(
        "TABSERVE_IDLE_TIMEOUT",
        _parse_timeout,
        "Seconds a connection may stay open between requests, and the longest the headers "
        "of one request may take to arrive; slower clients are disconnected.",
        75.0,
    )
    body_timeout: float = setting(
        "TABSERVE_BODY_TIMEOUT",
        _parse_timeout,
        "Seconds the body of one request may take to arrive in full; a slower upload is cut off.",
        300.0,
    )

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_size_mb * 1024 * 1024

    @property
    def tls_enabled(self) -> bool:
        return self.transfer_protocol == "https"

    @property
    def auth_enabled(self) -> bool:
        return self.password_file is not None or self.users == "store" or self.oauth_enabled

    @property
    def auth_methods(self) -> tuple[str, ...]:
        """TabPy's names of the methods on, in TabPy's order: ``basic-auth`` (the password
        file, or users from the store), ``oauth-jwt``."""
        basic = self.password_file is not None or self.users == "store"
        return (("basic-auth",) if basic else ()) + (("oauth-jwt",) if self.oauth_enabled else ())

    @property
    def staging_path(self) -> Path:
        """Where TabPy's client writes endpoint files (``TABSERVE_UPLOAD_PATH``)."""
        return self.upload_path or self.state_path / "staging"

    @property
    def loopback_only(self) -> bool:
        """True when only this machine can connect (the bind address is a loopback one)."""
        return is_loopback(self.bind_address)


def declared_settings() -> tuple[Setting, ...]:
    """Every setting, in declaration order, with the text for docs and --help."""
    result = []
    for f in fields(Settings):
        meta = f.metadata
        if f.default is not MISSING:
            default_doc = meta["doc"] or f"`{_show(f.default)}`"
        else:
            default_doc = meta["doc"]
        result.append(
            Setting(meta["key"], f.name, meta["parse"], meta["help"], default_doc, meta["secret"])
        )
    return tuple(result)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


# Every key TabPy 2.16 reads (its ConfigParameters), for the audit below and the docs test.
TABPY_216_KEYS: tuple[str, ...] = (
    "TABPY_PORT", "TABPY_QUERY_OBJECT_PATH", "TABPY_STATE_PATH", "TABPY_STATIC_PATH",
    "TABPY_PWD_FILE", "TABPY_TRANSFER_PROTOCOL", "TABPY_CERTIFICATE_FILE", "TABPY_KEY_FILE",
    "TABPY_MINIMUM_TLS_VERSION", "TABPY_LOG_DETAILS", "TABPY_MAX_REQUEST_SIZE_MB",
    "TABPY_EVALUATE_ENABLE", "TABPY_EVALUATE_TIMEOUT", "TABPY_GZIP_ENABLE",
    "TABPY_ARROW_ENABLE", "TABPY_ARROWFLIGHT_PORT",
    "TABPY_OAUTH_ENABLED", "TABPY_OAUTH_ISSUER", "TABPY_OAUTH_JWKS_URI",
    "TABPY_OAUTH_ALLOW_NONPUBLIC_JWKS", "TABPY_OAUTH_AUDIENCE", "TABPY_OAUTH_REQUIRED_SCOPES",
    "TABPY_OAUTH_ENFORCE_ENDPOINT_SCOPES", "TABPY_OAUTH_QUERY_SCOPE",
    "TABPY_OAUTH_EVALUATE_SCOPE", "TABPY_OAUTH_DEPLOY_SCOPE", "TABPY_OAUTH_LOG_USER",
)  # fmt: skip

# Keys tabserve knows and accepts without declaring them as settings, with the reason
# (docs/configuration.md lists them too). Everything else is a declared setting, or unknown.
# None at present: TABPY_ARROWFLIGHT_PORT was one until Arrow Flight was implemented.
IGNORED_KEYS: dict[str, str] = {}

# An unknown key in these namespaces stops the start instead of a warning: it is a security
# setting tabserve does not implement (from a newer TabPy, or misspelt), and ignoring it could
# leave the server less protected than its operator believes. TABPY_OAUTH_ENABLD = true with
# no password file would otherwise start with authentication off.
REFUSED_PREFIXES: dict[str, str] = {
    "TABPY_OAUTH_": "an OAuth setting tabserve does not implement",
}

# Environment variables in these namespaces are checked; a config file's [TabPy] section is
# checked whole.
KEY_PREFIXES = ("TABPY_", "TABSERVE_")


@dataclass(frozen=True)
class KeyFinding:
    """A key that is not a setting: ``refused`` stops the start, otherwise it is a warning."""

    key: str
    source: str  # "config file" or "environment"
    refused: bool
    message: str


def known_keys() -> frozenset[str]:
    """Every key tabserve reads or knowingly ignores."""
    return frozenset(s.key for s in declared_settings()) | frozenset(IGNORED_KEYS)


def _bare(key: str) -> str:
    for prefix in ("TABPY_OAUTH_", "TABPY_", "TABSERVE_"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _nearest(key: str, known: frozenset[str]) -> str | None:
    """The known key most like ``key``, if any is close. Compared without the namespace, which
    every key shares and which would make unrelated keys look alike; so TABPY_WORKERS finds
    TABSERVE_WORKERS too."""
    bare = _bare(key)
    scored = [(difflib.SequenceMatcher(None, bare, _bare(k)).ratio(), k) for k in sorted(known)]
    score, best = max(scored, default=(0.0, ""))
    return best if score >= 0.6 else None


def check_keys(
    from_file: Mapping[str, str], environ: Mapping[str, str], *, sections: tuple[str, ...] = ()
) -> list[KeyFinding]:
    """Findings for every key that is not a declared setting, file keys first.

    ``sections`` are the config file's section names, to catch a ``[tabpy]`` whose keys
    TabPy (and tabserve) would never read.
    """
    known = known_keys()
    findings: list[KeyFinding] = []
    if SECTION not in sections:
        for name in sections:
            if name.lower() == SECTION.lower():
                findings.append(
                    KeyFinding(
                        f"[{name}]",
                        "config file",
                        False,
                        f"config file section [{name}] is ignored: settings are read from "
                        f"[{SECTION}] (the name is case-sensitive)",
                    )
                )
    candidates = [(key, "config file") for key in from_file]
    candidates += [(key, "environment") for key in environ if key.startswith(KEY_PREFIXES)]
    for key, source in candidates:
        if key in known:
            continue
        nearest = _nearest(key, known)
        refusal = next((why for p, why in REFUSED_PREFIXES.items() if key.startswith(p)), None)
        if refusal is not None:
            hint = f" (did you mean {nearest}?)" if nearest else ""
            message = (
                f"{key} in the {source} is {refusal}{hint}; refusing to start rather than "
                f"ignore a security setting"
            )
        else:
            hint = f"; did you mean {nearest}?" if nearest else ""
            message = f"unknown setting {key} in the {source} is ignored{hint}"
        findings.append(KeyFinding(key, source, refusal is not None, message))
    return findings


def _parse_file(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except configparser.Error as exc:
        raise ConfigError(f"config file {path} is not a valid INI file: {exc}") from exc
    return parser


def _file_keys(parser: configparser.ConfigParser) -> dict[str, str]:
    if not parser.has_section(SECTION):
        return {}
    return {key.upper(): value for key, value in parser.items(SECTION)}


def _read_file(path: Path) -> Mapping[str, str]:
    return _file_keys(_parse_file(path))


def key_findings(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> list[KeyFinding]:
    """``check_keys`` for a config file (or none) and an environment; raises ConfigError."""
    if path is None:
        return check_keys({}, environ)
    parser = _parse_file(Path(path))
    return check_keys(_file_keys(parser), environ, sections=tuple(parser.sections()))


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Settings:
    """Resolve every setting: environment, then the file's [TabPy] section, then the default.

    Raises ConfigError with a one-line message naming the key and the bad value, or a key
    tabserve refuses (see ``check_keys``; its warnings are the caller's to log).
    """
    if path is not None:
        parser = _parse_file(Path(path))
        from_file = _file_keys(parser)
        sections = tuple(parser.sections())
    else:
        from_file, sections = {}, ()
    for finding in check_keys(from_file, environ, sections=sections):
        if finding.refused:
            raise ConfigError(finding.message)
    values: dict[str, Any] = {}
    for setting in declared_settings():
        raw = environ.get(setting.key)
        source = "environment"
        if raw is None:
            raw = from_file.get(setting.key)
            source = "config file"
        if raw is None:
            continue
        try:
            value = setting.parse(raw)
        except ValueError as exc:
            detail = str(exc) if not str(exc).startswith("invalid literal") else "wrong type"
            shown = "<hidden>" if setting.secret else repr(raw)
            raise ConfigError(
                f"invalid value for {setting.key} in the {source}: {shown} ({detail})"
            ) from None
        values[setting.attr] = value
    settings = Settings(**values)
    return _finish(settings, values)


def pyarrow_installed() -> bool:
    """Whether pyarrow can be imported, found without importing it (it would load numpy)."""
    try:
        return importlib.util.find_spec("pyarrow") is not None
    except (ImportError, ValueError):
        return False


# RFC 6749's scope-token: printable ASCII except space, '"' and '\\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]+")


def _check_oauth(settings: Settings) -> None:
    """TabPy 2.16's start-up rules for OAuth, each a one-line ConfigError (never auth off)."""
    missing = [
        key
        for key, value in (
            ("TABPY_OAUTH_ISSUER", settings.oauth_issuer),
            ("TABPY_OAUTH_JWKS_URI", settings.oauth_jwks_uri),
        )
        if not value
    ]
    if missing:
        raise ConfigError(
            f"TABPY_OAUTH_ENABLED is true but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set"
        )
    if not settings.oauth_audience and not settings.oauth_required_scopes:
        raise ConfigError(
            "TABPY_OAUTH_ENABLED is true but neither TABPY_OAUTH_AUDIENCE nor "
            "TABPY_OAUTH_REQUIRED_SCOPES is set: one of them must say which tokens are for "
            "this server (endpoint scopes only add per-route checks)"
        )
    for key, value in (
        ("TABPY_OAUTH_QUERY_SCOPE", settings.oauth_query_scope),
        ("TABPY_OAUTH_EVALUATE_SCOPE", settings.oauth_evaluate_scope),
        ("TABPY_OAUTH_DEPLOY_SCOPE", settings.oauth_deploy_scope),
        *(("TABPY_OAUTH_REQUIRED_SCOPES", scope) for scope in settings.oauth_required_scopes),
    ):
        if not _SCOPE_TOKEN.fullmatch(value):
            raise ConfigError(
                f"invalid value for {key}: {value!r} (an OAuth scope is one word of printable "
                f"characters, without spaces, quotes or backslashes)"
            )
    for key, url in (
        ("TABPY_OAUTH_ISSUER", settings.oauth_issuer),
        ("TABPY_OAUTH_JWKS_URI", settings.oauth_jwks_uri),
    ):
        if not url.lower().startswith("https://"):
            raise ConfigError(
                f"invalid value for {key}: {url!r} (must be an https:// URL: the issuer's "
                f"keys are what every token is checked against)"
            )
    try:
        host = urlsplit(settings.oauth_jwks_uri).hostname
    except ValueError:
        host = None
    if not host:
        raise ConfigError(
            f"invalid value for TABPY_OAUTH_JWKS_URI: {settings.oauth_jwks_uri!r} (no host)"
        )


def _finish(settings: Settings, given: dict[str, Any]) -> Settings:
    """Check combinations of settings and fill defaults that depend on other settings."""
    if settings.processes > 1 and settings.arrow_enabled:
        # The Flight server is one gRPC port per process, with its tables in that process's
        # memory: front ends cannot share it (yet), and a half-shared one would be wrong.
        raise ConfigError(
            "TABSERVE_PROCESSES > 1 cannot serve Arrow Flight (TABPY_ARROW_ENABLE = true): "
            "set TABSERVE_PROCESSES = 1 or TABPY_ARROW_ENABLE = false"
        )
    if settings.arrow_enabled:
        if not pyarrow_installed():
            raise ConfigError(
                "TABPY_ARROW_ENABLE = true needs pyarrow: install the arrow extra "
                "(pip install 'tabserve[arrow]') or set TABPY_ARROW_ENABLE = false"
            )
        wanted = settings.minimum_tls_version.lower().replace(".", "_")
        if settings.tls_enabled and wanted in ("tlsv1_3", "maximum_supported"):
            # gRPC offers TLS 1.2 and 1.3 and no way to refuse 1.2.
            raise ConfigError(
                f"TABPY_MINIMUM_TLS_VERSION = {settings.minimum_tls_version} cannot be enforced "
                "on the Arrow Flight port (gRPC always accepts TLS 1.2); use TLSv1_2 or set "
                "TABPY_ARROW_ENABLE = false"
            )
    if settings.users == "store" and settings.password_file is not None:
        raise ConfigError(
            "TABSERVE_USERS = store and TABPY_PWD_FILE are both set: users come from one "
            "place; unset one of them"
        )
    if settings.oauth_enabled:
        _check_oauth(settings)
    if "worker_cpu_seconds" not in given:
        settings = replace(settings, worker_cpu_seconds=int(2 * settings.evaluate_timeout) + 10)
    if "worker_memory_mb" not in given:
        per_worker = physical_memory_bytes() // (settings.workers + 1) // (1024 * 1024)
        settings = replace(settings, worker_memory_mb=per_worker)
    return settings
