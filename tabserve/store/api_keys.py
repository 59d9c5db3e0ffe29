"""API keys: their format, and the one hash the store keeps of them.

A key reads ``tsk_<id>_<secret>``: ``id`` is 16 hex digits, the public part shown in lists
and logs and used to find the row; ``secret`` is 32 random bytes (``secrets.token_urlsafe``,
43 characters). The store keeps SHA-256 of the whole key, never the key.

Why a fast hash, when passwords get scrypt: a slow hash makes guessing a *low-entropy*
secret (a password someone chose) expensive. A 256-bit random secret cannot be guessed at
any speed, so stretching it buys nothing, and a fast hash lets every request be checked on
the spot instead of in a thread pool. A leaked ``api_keys`` table therefore gives away no
usable key.
"""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "tsk_"
SECRET_BYTES = 32
_KEY = re.compile(r"tsk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class MalformedKey(ValueError):
    """Not something :func:`new_key` could have made; the text is loggable (no secret)."""


def new_key() -> tuple[str, str]:
    """A fresh ``(id, key)``; the key is shown once and then only its hash is kept."""
    key_id = secrets.token_hex(8)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def key_id(key: str) -> str:
    """The id inside ``key``; raises :class:`MalformedKey`."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise MalformedKey(
            "an API key reads tsk_<16 hex digits>_<43 base64url characters>"
            if key.startswith(PREFIX)
            else "not an API key (they start with tsk_)"
        )
    return match.group(1)


def key_hash(key: str) -> str:
    """What the store keeps of ``key`` (see the module's note on why SHA-256 is right)."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def is_key_id(text: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{16}", text) is not None
