"""What a person opens: the status page, its assets, and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from ...errors import (
    NotFound,
)
from .base import BaseHandler

# The status page may load only what this server serves: no CDN, no inline script.
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

# The status page's own files, served at /assets/<name> (a fixed list, never a path).
ASSETS = {
    "status.js": "text/javascript; charset=UTF-8",
    "status.css": "text/css; charset=UTF-8",
}
ASSET_DIR = Path(__file__).parent.parent / "static"


class PageHandler(BaseHandler):
    """Base of the status page's files: never cached, same-origin only."""

    def send_file(self, path: Path, content_type: str) -> None:
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Security-Policy", _PAGE_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(path.read_bytes())


class RootHandler(PageHandler):
    async def get(self) -> None:
        """The status page at /; its data comes from the (authenticated) API."""
        static = self.services.settings.static_path  # TABPY_STATIC_PATH replaces the page
        page = static / "index.html" if static else ASSET_DIR / "index.html"
        self.send_file(page, "text/html; charset=UTF-8")


class AssetHandler(PageHandler):
    async def get(self, name: str) -> None:
        """The status page's script and style sheet."""
        if name not in ASSETS:
            raise NotFound("Not found", f"No route for {self.request.method} {self.request.path}")
        self.send_file(ASSET_DIR / name, ASSETS[name])


class OpenApiHandler(BaseHandler):
    async def get(self) -> None:
        """The OpenAPI 3.1 description of this API (built by ``app.make_app``)."""
        self.add_cors_headers()
        self.write_json(self.settings["openapi"])
