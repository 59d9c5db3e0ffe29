"""``tabserve deploy-models``: deploy the bundled ttest, anova and PCA models to a server.

The models are pickled by reference to ``tabserve.models``: the server imports them from its
own tabserve, with the ``models`` extra (scipy, scikit-learn) that running them needs anyway.
Like every deploy from the tabserve client, the command must run on the server's Python
minor version, which the server checks.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError, load_settings
from ..errors import TabserveError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TabPy-format config file of the server")
    parser.add_argument("--url", help="server URL (default: from the config, on this machine)")
    parser.add_argument("--user", help="user name, when the server requires authentication")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (never prompts)",
    )


def _default_url(config: str | None) -> str:
    settings = load_settings(config, os.environ)
    scheme = "https" if settings.tls_enabled else "http"
    host = settings.bind_address
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.port}/"


def run(args: argparse.Namespace) -> int:
    from ..client import Client
    from ..models import MODELS

    try:
        url = args.url or _default_url(args.config)
    except ConfigError as exc:
        print(f"tabserve deploy-models: {exc}", file=sys.stderr)
        return 2
    client = Client(url)
    if args.user:
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else ""
        client.set_credentials(args.user, password)
    failures = 0
    for name, (function, description) in MODELS.items():
        try:
            client.deploy(name, function, description, override=True)
        except (TabserveError, OSError) as exc:
            failures += 1
            print(f"{name}: failed: {exc}", file=sys.stderr)
            continue
        print(f"{name}: deployed")
    return 1 if failures else 0
