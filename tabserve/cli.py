"""Command line: ``tabserve [serve] [--config FILE]`` and the subcommands. Never prompts."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__, logs
from .config import ConfigError, Settings, declared_settings, key_findings, load_settings


def _add_config_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config", metavar="FILE", default=default, help="TabPy-format config file"
    )
    parser.add_argument(
        "--disable-auth-warning",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="accepted for TabPy compatibility; tabserve never prompts",
    )


def build_parser() -> argparse.ArgumentParser:
    settings_help = "\n".join(f"  {s.key}: {s.help}" for s in declared_settings())
    parser = argparse.ArgumentParser(
        prog="tabserve",
        description="A TabPy-compatible server for Tableau Analytics Extensions.",
        epilog="settings (config file [TabPy] section or environment):\n" + settings_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tabserve {__version__}")
    _add_config_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server (the default)")
    _add_config_options(serve, suppress=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub)
    return parser


# Subcommands other than serve: each module has add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "user": (
        "tabserve.commands.user",
        "add, update or delete a user in a password file (TABPY_PWD_FILE) or a store",
    ),
    "key": (
        "tabserve.commands.key",
        "create, list or revoke API keys (a user's, or one endpoint's) in the store",
    ),
    "store": (
        "tabserve.commands.store",
        "migrate the store's schema; import a TabPy state directory into a store; export",
    ),
    "doctor": (
        "tabserve.commands.doctor",
        "check the configuration against what a Tableau connection needs; never prompts",
    ),
    "check": (
        "tabserve.commands.check",
        "replay Tableau's requests against any Analytics Extensions server; a pass/fail table",
    ),
    "deploy-models": (
        "tabserve.commands.deploy_models",
        "deploy the bundled ttest, anova and PCA models to a running server",
    ),
}


def run_server(config: str | None) -> int:
    try:
        settings = load_settings(config, os.environ)
    except ConfigError as exc:
        print(f"tabserve: {exc}", file=sys.stderr)
        return 2
    try:
        logs.configure(settings.log_level, settings.log_format, settings.log_file)
    except OSError as exc:
        print(
            f"tabserve: cannot open the log file {settings.log_file}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    for finding in key_findings(config, os.environ):
        # Not refused (load_settings stopped on those): named, with the nearest known key.
        logging.getLogger("tabserve.config").warning("%s", finding.message)
    from .errors import StoreUnavailable
    from .server.flight import FlightStartError
    from .server.frontends import FrontEndFailed
    from .server.oauth import OAuthConfigError
    from .server.tls import TLSConfigError
    from .store.database import StoreError
    from .store.passwords import PasswordFileError
    from .store.state_dir import StateError

    try:
        asyncio.run(_serve(settings))
    except ConfigError as exc:  # found only when resolved, e.g. an unknown worker user
        print(f"tabserve: {exc}", file=sys.stderr)
        return 2
    except (
        OSError,
        PasswordFileError,
        TLSConfigError,
        StateError,
        FlightStartError,
        StoreError,
        OAuthConfigError,
        FrontEndFailed,
    ) as exc:
        print(f"tabserve: cannot start: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:  # a replica with nothing to serve: the orchestrator retries
        print(f"tabserve: cannot start: {exc.message}: {exc.info}", file=sys.stderr)
        return 1
    return 0


async def _serve(settings: Settings) -> None:
    from .server.app import serve  # tornado and the pool load only when serving

    await serve(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "serve"):
        return run_server(args.config)
    result: int = importlib.import_module(COMMANDS[args.command][0]).run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
