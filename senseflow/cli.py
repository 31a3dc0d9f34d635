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
    add_run_command(commands)
    add_send_command(commands)
    add_operator_commands(commands)
    add_who_command(commands)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value}")
    return value


def add_run_command(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run the service: UDP in, InfluxDB / MQTT / New Relic out",
        description="Run senseflow. Flags override the config file.",
    )
    add_config_argument(parser)
    parser.add_argument("--host", help="UDP address to listen on (serverHost)")
    parser.add_argument("--port", type=int, help="UDP port (portUserActivityEvents)")
    parser.add_argument("--readers", type=positive_int, help="receiver processes sharing the port")
    parser.add_argument("--workers", type=positive_int, help="parse/enrich/encode processes")
    parser.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        help="children forked from one preloaded server (default; shares ua-parser's rules"
        " and the code) or each a fresh interpreter (startMethod)",
    )
    parser.add_argument("--batch-size", type=positive_int, help="InfluxDB lines per write")
    parser.add_argument(
        "--flush-interval",
        type=positive_int,
        metavar="MS",
        help="longest wait before a partial InfluxDB batch is written",
    )
    parser.add_argument(
        "--queue-size", type=positive_int, help="batches each inter-process channel holds"
    )
    parser.add_argument(
        "--summary-interval",
        type=int,
        metavar="S",
        help="log a counters line every S seconds (0: only at exit)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("text", "json"))
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on PORT (0: off)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /api/sessions on PORT (--metrics-port's new name)",
    )
    parser.add_argument(
        "--spool-discard-mismatch",
        action="store_true",
        default=None,
        help="skip spooled records written for a different destination instead of refusing",
    )
    parser.set_defaults(command=run_service)


def apply_run_flags(config: Config, args: argparse.Namespace) -> Config:
    """CLI flags override the config file."""
    pipeline_flags = {
        "readers": args.readers,
        "workers": args.workers,
        "start_method": args.start_method,
        "batch_size": args.batch_size,
        "flush_interval": args.flush_interval,
        "queue_size": args.queue_size,
        "summary_interval": args.summary_interval,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "metrics_port": args.metrics_port,
        "http_port": args.http_port,
    }
    pipeline = msgspec.structs.replace(
        config.pipeline, **{k: v for k, v in pipeline_flags.items() if v is not None}
    )
    udp = config.butler.user_events.udp_server_config
    udp = msgspec.structs.replace(
        udp,
        server_host=args.host if args.host is not None else udp.server_host,
        port_user_activity_events=args.port
        if args.port is not None
        else udp.port_user_activity_events,
    )
    if args.spool_discard_mismatch:
        spool = msgspec.structs.replace(pipeline.spool, discard_mismatch=True)
        pipeline = msgspec.structs.replace(pipeline, spool=spool)
    user_events = msgspec.structs.replace(config.butler.user_events, udp_server_config=udp)
    butler = msgspec.structs.replace(config.butler, user_events=user_events)
    return msgspec.structs.replace(config, butler=butler, pipeline=pipeline)


def run_service(args: argparse.Namespace) -> int:
    from senseflow.supervisor import Supervisor
    from shared.config import check_semantics
    from shared.logs import setup_logging

    config = apply_run_flags(load_config(args.config), args)
    problems = check_semantics(config)
    if problems:
        raise ConfigError(problems)
    from workers.enrich import configured_app_names

    configured_app_names(config)  # fail now, not in every worker, if the mapping file is bad
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, "supervisor")
    return Supervisor(config).run()


def add_operator_commands(commands: Any) -> None:
    from senseflow.commands.tools import add_appender_xml_command, add_check_config_command

    add_appender_xml_command(commands)
    add_check_config_command(commands)


def add_who_command(commands: Any) -> None:
    from senseflow.commands.who import add_who_command as add

    add(commands)


def add_send_command(commands: Any) -> None:
    from senseflow.commands.send import add_send_command as add

    add(commands)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="Butler SOS YAML config file (default: built-in defaults)",
    )


def add_parse_command(commands: Any) -> None:
    parser = commands.add_parser(
        "parse",
        help="dry-run: parse raw datagrams (one per line) and print what would be written",
        description="Read raw datagrams, one per line, from FILE or stdin; "
        "print one line per input.",
    )
    add_config_argument(parser)
    parser.add_argument("--format", choices=("json", "line-protocol"), default="json")
    parser.add_argument("file", nargs="?", metavar="FILE", help="input file (default: stdin)")
    parser.set_defaults(command=run_parse)


def run_parse(args: argparse.Namespace) -> int:
    from senseflow.commands.parse import dry_run

    config = load_config(args.config)
    from workers.enrich import configured_app_names

    app_names = configured_app_names(config)
    if args.file:
        try:
            with open(args.file, "rb") as source:
                return dry_run(source, sys.stdout.buffer, config, app_names, args.format)
        except FileNotFoundError:
            print(f"senseflow: parse: no such file: {args.file}", file=sys.stderr)
            return exitcodes.FAILURE
    return dry_run(sys.stdin.buffer, sys.stdout.buffer, config, app_names, args.format)


if __name__ == "__main__":
    sys.exit(main())
