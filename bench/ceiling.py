"""The ceiling: a bare Tornado server, one process, answering every POST with ``3``.

No authentication, no logging, no worker: what one Tornado event loop costs per request on
this machine. tabserve's small-call throughput is reported as a share of it (issue 10).

Usage: python -m bench.ceiling PORT
"""

from __future__ import annotations

import asyncio
import sys

from tornado.web import Application, RequestHandler


class Three(RequestHandler):
    def post(self, *args: str) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(b"3")

    def get(self, *args: str) -> None:  # the harness's readiness probe (GET /info)
        self.write(b"{}")


async def main(port: int) -> None:
    app = Application([(r"/.*", Three)])
    app.listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
