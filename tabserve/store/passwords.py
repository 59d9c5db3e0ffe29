"""The password file: its format (TabPy-compatible), hashing, reading and safe editing.

File format (a superset of TabPy's ``TABPY_PWD_FILE``)::

    # comment lines and blank lines are allowed and kept on rewrite
    user1 b8a63cf588cd...c3de40b
    alice $scrypt$n=16384,r=8,p=1$<salt>$<hash> evaluate,query

* One entry per line: ``username hash [permissions]``, fields separated by exactly one space.
* User names are case-insensitive and stored lower-cased; a duplicate (in any case) is an error.
* ``hash`` is one of two schemes:

  - ``tabpy``: 128 hex digits (either case) of PBKDF2-HMAC-SHA512 with 10,000 iterations,
    salt ``_$salt@tabpy:<lower-cased username>$_`` (UTF-8). Files written by ``tabpy-user`` load
    unchanged.
  - ``scrypt``: ``$scrypt$n=<N>,r=<r>,p=<p>$<salt>$<hash>`` where salt (16 random bytes) and
    hash (32 bytes) are standard base64 without ``=`` padding. Per-entry random salt and a
    memory-hard cost; this is the default for new entries. TabPy itself cannot read it.

* ``permissions`` is optional: a comma-separated subset of ``evaluate``, ``query``, ``manage``.
  A line without it grants every permission, which is what a TabPy file means.

Every file TabPy accepts with well-formed hashes loads unchanged. Deliberate differences:
a hash that is neither 128 hex digits nor a valid ``$scrypt$`` token is an error (TabPy
loads it and that user can never log in); a UTF-8 BOM, CRLF line ends, whitespace-only lines
and indented ``#`` comments are tolerated; errors name the file and line.

Everything here is pure (no HTTP, no state between calls); what the server remembers while
it runs (the credential cache, the failure throttle, the ``User`` value) is in
``server.credentials``, and ``tabserve user`` uses the file editors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write, remove_stale_temps

__all__ = [
    "ALL_PERMISSIONS",
    "PERMISSION_ORDER",
    "SCHEMES",
    "PasswordEntry",
    "PasswordFile",
    "PasswordFileError",
    "add_user",
    "delete_user",
    "generate_password",
    "hash_password",
    "normalize_username",
    "parse_password_text",
    "parse_permissions",
    "read_password_file",
    "update_user",
    "validate_username",
    "verify",
]

PERMISSION_ORDER: tuple[str, ...] = ("evaluate", "query", "manage")
ALL_PERMISSIONS: frozenset[str] = frozenset(PERMISSION_ORDER)
SCHEMES: tuple[str, ...] = ("scrypt", "tabpy")

_TABPY_ITERATIONS = 10_000
_TABPY_HEX = re.compile(r"[0-9a-fA-F]{128}")
_SCRYPT_PREFIX = "$scrypt$"
_SCRYPT_PARAMS = re.compile(r"n=(\d+),r=(\d+),p=(\d+)")
_SCRYPT_DEFAULT = (16384, 8, 1)
_SCRYPT_SALT_BYTES = 16
_SCRYPT_HASH_BYTES = 32
# Upper bounds so a hand-edited entry cannot make each login allocate gigabytes.
_SCRYPT_MAX_N = 1 << 20
_SCRYPT_MAX_R = 32
_SCRYPT_MAX_P = 16
_SCRYPT_MAX_MEM = 1 << 30


class PasswordFileError(Exception):
    """The password file is unreadable, malformed, or an edit on it is not allowed."""

    def __init__(self, source: str, reason: str, line: int | None = None) -> None:
        self.source = source
        self.reason = reason
        self.line = line
        where = f"{source}: line {line}" if line is not None else source
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class PasswordEntry:
    """One ``username hash [permissions]`` line.

    ``permissions`` is None when the line has no third field (meaning: all permissions);
    keeping that distinction lets a rewrite leave TabPy-style lines TabPy-readable.
    ``text`` is the original line, reused on rewrite so untouched entries stay byte-identical.
    """

    username: str
    hash: str
    permissions: frozenset[str] | None = None
    line: int | None = None
    text: str | None = field(default=None, compare=False, repr=False)

    @property
    def scheme(self) -> str:
        return "scrypt" if self.hash.startswith(_SCRYPT_PREFIX) else "tabpy"

    @property
    def effective_permissions(self) -> frozenset[str]:
        return ALL_PERMISSIONS if self.permissions is None else self.permissions

    def render(self) -> str:
        if self.text is not None:
            return self.text
        fields = [self.username, self.hash]
        if self.permissions is not None:
            fields.append(format_permissions(self.permissions))
        return " ".join(fields)


@dataclass
class PasswordFile:
    """A parsed password file that remembers comments and blank lines for rewriting."""

    source: str
    # Each item is either a verbatim comment/blank line or an entry, in file order.
    lines: list[str | PasswordEntry] = field(default_factory=list)

    @property
    def entries(self) -> list[PasswordEntry]:
        return [item for item in self.lines if isinstance(item, PasswordEntry)]

    @property
    def users(self) -> dict[str, PasswordEntry]:
        return {entry.username: entry for entry in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, username: object) -> bool:
        return isinstance(username, str) and self.get(username) is not None

    def get(self, username: str) -> PasswordEntry | None:
        wanted = normalize_username(username)
        for entry in self.entries:
            if entry.username == wanted:
                return entry
        return None

    def add(self, entry: PasswordEntry) -> None:
        if entry.username in self:
            raise PasswordFileError(self.source, f"user {entry.username!r} already exists")
        self.lines.append(entry)

    def replace(self, entry: PasswordEntry) -> None:
        for index, item in enumerate(self.lines):
            if isinstance(item, PasswordEntry) and item.username == entry.username:
                self.lines[index] = entry
                return
        raise PasswordFileError(self.source, f"user {entry.username!r} does not exist")

    def remove(self, username: str) -> PasswordEntry:
        wanted = normalize_username(username)
        for index, item in enumerate(self.lines):
            if isinstance(item, PasswordEntry) and item.username == wanted:
                del self.lines[index]
                return item
        raise PasswordFileError(self.source, f"user {wanted!r} does not exist")

    def render(self) -> str:
        parts = [item.render() if isinstance(item, PasswordEntry) else item for item in self.lines]
        return "".join(part + "\n" for part in parts)


# ---------------------------------------------------------------------------------------------
# Names, permissions, hashing


def normalize_username(username: str) -> str:
    # TabPy salts with str.lower(), not casefold(); anything else would break existing hashes.
    return username.lower()


def validate_username(username: str) -> str:
    """Return the stored (lower-cased) form, or raise ValueError for a name that cannot work."""
    if not username:
        raise ValueError("user name is empty")
    if any(ch.isspace() for ch in username):
        raise ValueError("user name must not contain whitespace")
    if ":" in username:
        # Basic auth puts "user:password" in one token, so a ':' in the name can never log in.
        raise ValueError("user name must not contain ':'")
    if username.startswith("#"):
        raise ValueError("user name must not start with '#' (it would read as a comment)")
    if not username.isprintable():
        raise ValueError("user name must not contain control characters")
    return normalize_username(username)


def parse_permissions(text: str) -> frozenset[str]:
    """Parse ``evaluate,query``; raise ValueError naming the offending item."""
    items = text.split(",")
    if any(not item for item in items):
        raise ValueError(f"empty item in permission list {text!r}")
    unknown = [item for item in items if item.lower() not in ALL_PERMISSIONS]
    if unknown:
        allowed = ", ".join(PERMISSION_ORDER)
        raise ValueError(f"unknown permission {unknown[0]!r} (allowed: {allowed})")
    return frozenset(item.lower() for item in items)


def format_permissions(permissions: Iterable[str]) -> str:
    chosen = set(permissions)
    return ",".join(name for name in PERMISSION_ORDER if name in chosen)


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _tabpy_digest(username: str, password: str) -> str:
    salt = f"_$salt@tabpy:{normalize_username(username)}$_".encode()
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _TABPY_ITERATIONS)
    return digest.hex()


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # hashlib's default maxmem (32 MiB) is too small for r=16 and above; give what the
    # parameters need (128*r*n plus slack) and no more.
    maxmem = min(_SCRYPT_MAX_MEM, 128 * r * (n + p + 2) + (1 << 20))
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen)


@dataclass(frozen=True)
class _ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse_scrypt(token: str) -> _ScryptHash:
    parts = token.split("$")
    # "$scrypt$params$salt$hash" splits into ["", "scrypt", params, salt, hash].
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        raise ValueError("scrypt hash must look like $scrypt$n=N,r=R,p=P$<salt>$<hash>")
    match = _SCRYPT_PARAMS.fullmatch(parts[2])
    if not match:
        raise ValueError(f"bad scrypt parameters {parts[2]!r} (expected n=N,r=R,p=P)")
    n, r, p = (int(value) for value in match.groups())
    if n < 2 or n > _SCRYPT_MAX_N or n & (n - 1):
        raise ValueError(f"scrypt n must be a power of two between 2 and {_SCRYPT_MAX_N}")
    if not 1 <= r <= _SCRYPT_MAX_R or not 1 <= p <= _SCRYPT_MAX_P:
        raise ValueError(f"scrypt r must be 1..{_SCRYPT_MAX_R} and p 1..{_SCRYPT_MAX_P}")
    try:
        salt, digest = _b64decode(parts[3]), _b64decode(parts[4])
    except (binascii.Error, ValueError):
        raise ValueError("scrypt salt or hash is not valid base64") from None
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("scrypt salt or hash is too short")
    return _ScryptHash(n, r, p, salt, digest)


def _check_hash_syntax(token: str) -> None:
    if token.startswith("$"):
        _parse_scrypt(token)
    elif not _TABPY_HEX.fullmatch(token):
        raise ValueError("hash is neither 128 hex digits (tabpy-user format) nor a $scrypt$ token")


def hash_password(username: str, password: str, scheme: str = "scrypt") -> str:
    """Return the hash field for a new entry (``scheme`` is ``scrypt`` or ``tabpy``)."""
    if scheme == "tabpy":
        return _tabpy_digest(username, password)
    if scheme == "scrypt":
        n, r, p = _SCRYPT_DEFAULT
        salt = secrets.token_bytes(_SCRYPT_SALT_BYTES)
        digest = _scrypt(password, salt, n, r, p, _SCRYPT_HASH_BYTES)
        return f"{_SCRYPT_PREFIX}n={n},r={r},p={p}${_b64encode(salt)}${_b64encode(digest)}"
    raise ValueError(f"unknown hash scheme {scheme!r} (choose from {', '.join(SCHEMES)})")


def verify(entry: PasswordEntry, password: str) -> bool:
    """Check ``password`` against ``entry`` in constant time for the comparison step."""
    if entry.scheme == "scrypt":
        try:
            parsed = _parse_scrypt(entry.hash)
        except ValueError:
            return False
        actual = _scrypt(password, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.digest))
        return hmac.compare_digest(actual, parsed.digest)
    expected = entry.hash.lower().encode("ascii", "replace")
    return hmac.compare_digest(_tabpy_digest(entry.username, password).encode(), expected)


# Letters, digits and a few punctuation marks that need no quoting in a shell, a URL or a
# config file. No ':' because Basic auth (and TabPy) splits "user:password" on it.
_PASSWORD_ALPHABET = string.ascii_letters + string.digits + "-_.~"


def generate_password(length: int = 24) -> str:
    """A random password (about 6 bits per character) that never contains ':'."""
    if length < 16:
        raise ValueError("generated passwords are at least 16 characters")
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))


# ---------------------------------------------------------------------------------------------
# Parsing


def _parse_entry(source: str, number: int, line: str) -> PasswordEntry:
    if "\t" in line:
        raise PasswordFileError(source, "fields must be separated by a space, not a tab", number)
    fields = line.split(" ")
    if len(fields) not in (2, 3):
        raise PasswordFileError(
            source,
            f"expected 'username hash' or 'username hash permissions' separated by single "
            f"spaces, found {len(fields)} fields",
            number,
        )
    if "" in fields:
        what = ("user name", "hash", "permission list")[fields.index("")]
        raise PasswordFileError(
            source, f"empty {what} (check for doubled or trailing spaces)", number
        )
    try:
        _check_hash_syntax(fields[1])
        permissions = parse_permissions(fields[2]) if len(fields) == 3 else None
    except ValueError as exc:
        raise PasswordFileError(source, str(exc), number) from None
    return PasswordEntry(normalize_username(fields[0]), fields[1], permissions, number, line)


def parse_password_text(text: str, source: str = "<password file>") -> PasswordFile:
    """Parse file contents; raise :class:`PasswordFileError` with the line number on error.

    An empty result is allowed here (the CLI adds to such files); the server should use
    :func:`read_password_file`, which rejects a file without users.
    """
    parsed = PasswordFile(source)
    seen: dict[str, int] = {}
    # Windows editors add a BOM that would otherwise become part of the first user name.
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            parsed.lines.append(line)
            continue
        entry = _parse_entry(source, number, line)
        if entry.username in seen:
            raise PasswordFileError(
                source,
                f"duplicate user {entry.username!r} (first defined on line "
                f"{seen[entry.username]}; names are case-insensitive)",
                number,
            )
        seen[entry.username] = number
        parsed.lines.append(entry)
    return parsed


def _decode(source: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PasswordFileError(source, "not valid UTF-8 text", line) from None


def read_password_file(path: str | os.PathLike[str], *, allow_empty: bool = False) -> PasswordFile:
    """Read and validate a password file; an empty one is an error unless ``allow_empty``."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PasswordFileError(source, f"cannot read: {exc.strerror or exc}") from None
    parsed = parse_password_text(_decode(source, data), source)
    if not allow_empty and not parsed.entries:
        raise PasswordFileError(source, "contains no users")
    return parsed


# ---------------------------------------------------------------------------------------------
# Editing


def _write_atomic(path: Path, text: str) -> None:
    # A new password file is readable by its owner only: it holds (hashed) secrets.
    remove_stale_temps_for(path)  # left by an edit that was killed
    atomic_write(path, text.encode("utf-8"), new_mode=0o600)


def remove_stale_temps_for(path: Path) -> None:
    """Remove what an interrupted rewrite of the password file ``path`` left beside it."""
    target = Path(os.path.realpath(path))
    remove_stale_temps(target.parent, f".{target.name}.*.tmp")


def _load_for_edit(path: Path, *, create: bool) -> PasswordFile:
    if create and not path.exists():
        return PasswordFile(os.fspath(path))
    return read_password_file(path, allow_empty=True)


def _checked_name(source: str, username: str) -> str:
    try:
        return validate_username(username)
    except ValueError as exc:
        raise PasswordFileError(source, str(exc)) from None


def _checked_permissions(source: str, permissions: Iterable[str] | None) -> frozenset[str] | None:
    if permissions is None:
        return None
    chosen = frozenset(item.lower() for item in permissions)
    unknown = sorted(chosen - ALL_PERMISSIONS)
    if unknown:
        raise PasswordFileError(source, f"unknown permission {unknown[0]!r}")
    if not chosen:
        raise PasswordFileError(source, "permission list is empty")
    return chosen


def add_user(
    path: str | os.PathLike[str],
    username: str,
    password: str,
    *,
    permissions: Iterable[str] | None = None,
    scheme: str = "scrypt",
) -> PasswordEntry:
    """Add a user; create the file if missing. Never rewrites a malformed file."""
    target = Path(path)
    source = os.fspath(target)
    name = _checked_name(source, username)
    if not password:
        raise PasswordFileError(source, "password is empty")
    parsed = _load_for_edit(target, create=True)
    if name in parsed:
        raise PasswordFileError(source, f"user {name!r} already exists (use update)")
    entry = PasswordEntry(
        name, hash_password(name, password, scheme), _checked_permissions(source, permissions)
    )
    parsed.add(entry)
    _write_atomic(target, parsed.render())
    return entry


_KEEP = object()


def update_user(
    path: str | os.PathLike[str],
    username: str,
    password: str | None,
    *,
    permissions: Iterable[str] | None | object = _KEEP,
    scheme: str = "scrypt",
) -> PasswordEntry:
    """Change a user's password (None keeps the hash) and/or permissions.

    ``permissions`` left out keeps the current ones; None resets to "all" (no third field).
    """
    target = Path(path)
    source = os.fspath(target)
    name = normalize_username(username)
    if password is not None and not password:
        raise PasswordFileError(source, "password is empty")
    parsed = _load_for_edit(target, create=False)
    current = parsed.get(name)
    if current is None:
        raise PasswordFileError(source, f"user {name!r} does not exist (use add)")
    new_hash = current.hash if password is None else hash_password(name, password, scheme)
    if permissions is _KEEP:
        new_permissions = current.permissions
    else:
        new_permissions = _checked_permissions(source, permissions)  # type: ignore[arg-type]
    entry = PasswordEntry(name, new_hash, new_permissions)
    parsed.replace(entry)
    _write_atomic(target, parsed.render())
    return entry


def delete_user(path: str | os.PathLike[str], username: str) -> PasswordFile:
    """Remove a user and return the file as written (so callers can warn when it is empty)."""
    target = Path(path)
    parsed = _load_for_edit(target, create=False)
    parsed.remove(username)
    _write_atomic(target, parsed.render())
    return parsed
