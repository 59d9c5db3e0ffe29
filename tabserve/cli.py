"""Command line: ``tabserve [serve] [--config FILE]`` and the subcommands. Never prompts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__, logs
from .commands import check
from .config import ConfigError, Settings, declared_settings, load_settings


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
    check_parser = commands.add_parser(
        "check", help="replay Tableau's requests against any Analytics Extensions server"
    )
    check.add_arguments(check_parser)
    return parser


def _setup_logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format, settings.log_file)
    # Tornado's access log is replaced by tabserve.access (handlers.log_request).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def run_server(config: str | None) -> int:
    try:
        settings = load_settings(config, os.environ)
    except ConfigError as exc:
        print(f"tabserve: {exc}", file=sys.stderr)
        return 2
    try:
        _setup_logging(settings)
    except OSError as exc:
        print(f"tabserve: cannot open the log file {settings.log_file}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(settings))
    except OSError as exc:
        print(f"tabserve: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(settings: Settings) -> None:
    from .app import serve  # tornado and the pool load only when serving

    await serve(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "serve"):
        return run_server(args.config)
    if args.command == "check":
        return check.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
