"""What a person opens: the status page, its assets, and the OpenAPI document."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ...errors import (
    NotFound,
)
from .base import BaseHandler


def _policy(style: str, script: str) -> str:
    return (
        f"default-src 'self'; img-src 'self' data:; style-src {style}; script-src {script}; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


# A page of TABPY_STATIC_PATH, and the assets, may load only what this server serves: no CDN,
# no inline code.
_PAGE_POLICY = _policy("'self'", "'self'")

# The status page's own files, served at /assets/<name> (a fixed list, never a path).
ASSETS = {
    "status.js": "text/javascript; charset=UTF-8",
    "status.css": "text/css; charset=UTF-8",
}
ASSET_DIR = Path(__file__).parent.parent / "static"


@dataclass(frozen=True)
class StatusPage:
    body: bytes
    policy: str


def _inline_hash(text: str) -> str:
    """A CSP source allowing exactly this inline block (the text between its tags)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def status_page(directory: Path = ASSET_DIR) -> StatusPage:
    """index.html with status.css and status.js inline, as TabPy's landing page has them (and
    TabPy's own test_url.py checks), under a policy that allows those two blocks by their
    SHA-256 and nothing else inline. Built once at start-up from the files themselves, so the
    hashes cannot drift from the text they allow."""
    page = (directory / "index.html").read_text(encoding="utf-8")
    blocks = {"status.css": "style", "status.js": "script"}
    hashes = {}
    for name, tag in blocks.items():
        text = (directory / name).read_text(encoding="utf-8")
        marker = f"<!-- {name} -->"
        # A closing tag inside the text would end the block early; a missing or repeated
        # marker would drop the file or serve it twice.
        if f"</{tag}" in text.lower() or "<!--" in text or page.count(marker) != 1:
            raise RuntimeError(f"status page: cannot inline {name} into index.html")
        page = page.replace(marker, f"<{tag}>{text}</{tag}>")
        hashes[tag] = _inline_hash(text)
    return StatusPage(page.encode("utf-8"), _policy(hashes["style"], hashes["script"]))


class PageHandler(BaseHandler):
    """Base of the status page's files: never cached, same-origin only."""

    def send(self, body: bytes, content_type: str, policy: str = _PAGE_POLICY) -> None:
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Security-Policy", policy)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(body)

    def send_file(self, path: Path, content_type: str) -> None:
        self.send(path.read_bytes(), content_type)


class RootHandler(PageHandler):
    async def get(self) -> None:
        """The status page at /; its data comes from the (authenticated) API."""
        static = self.services.settings.static_path  # TABPY_STATIC_PATH replaces the page
        if static:
            self.send_file(static / "index.html", "text/html; charset=UTF-8")
            return
        page: StatusPage = self.settings["status_page"]  # built once by app.make_app
        self.send(page.body, "text/html; charset=UTF-8", page.policy)


class AssetHandler(PageHandler):
    async def get(self, name: str) -> None:
        """The status page's script and style sheet (the page has them inline; served
        separately too, for pages of TABPY_STATIC_PATH and for reading)."""
        if name not in ASSETS:
            raise NotFound("Not found", f"No route for {self.request.method} {self.request.path}")
        self.send_file(ASSET_DIR / name, ASSETS[name])


class OpenApiHandler(BaseHandler):
    async def get(self) -> None:
        """The OpenAPI 3.1 description of this API (built by ``app.make_app``)."""
        self.add_cors_headers()
        self.write_json(self.settings["openapi"])
