"""The `senseflow` command: argparse in, a validated Config out, then one subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from shared import exitcodes
from shared.config import Config, ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"senseflow: config: {problem}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="senseflow",
        description="Qlik Sense user events over UDP to InfluxDB, MQTT and New Relic.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    add_parse_command(commands)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="FILE", help="Butler SOS YAML config file (default: built-in defaults)"
    )


def add_parse_command(commands: Any) -> None:
    parser = commands.add_parser(
        "parse",
        help="dry-run: parse raw datagrams (one per line) and print what would be written",
        description="Read raw datagrams, one per line, from FILE or stdin; print one line per input.",
    )
    add_config_argument(parser)
    parser.add_argument("--format", choices=("json", "line-protocol"), default="json")
    parser.add_argument("file", nargs="?", metavar="FILE", help="input file (default: stdin)")
    parser.set_defaults(command=run_parse)


def run_parse(args: argparse.Namespace) -> int:
    from workers.dryrun import dry_run

    config = load_config(args.config)
    app_names = _app_names(config)
    if args.file:
        try:
            with open(args.file, "rb") as source:
                return dry_run(source, sys.stdout.buffer, config, app_names, args.format)
        except FileNotFoundError:
            print(f"senseflow: parse: no such file: {args.file}", file=sys.stderr)
            return exitcodes.FAILURE
    return dry_run(sys.stdin.buffer, sys.stdout.buffer, config, app_names, args.format)


def _app_names(config: Config) -> dict[str, str]:
    from workers.enrich import load_app_names

    path = config.pipeline.app_names_file
    if not path:
        return {}
    try:
        return load_app_names(path)
    except (OSError, ValueError, KeyError, msgspec.ValidationError) as exc:
        raise ConfigError([f"senseflow.appNamesFile: cannot load {path}: {exc}"]) from exc


if __name__ == "__main__":
    sys.exit(main())
