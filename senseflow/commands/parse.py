"""`senseflow parse`: the operator's dry run of the worker pipeline, one line out per line in."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import BinaryIO

import msgspec

from shared import exitcodes
from shared.config import Config
from shared.counternames import EXCLUDED
from workers.pipeline import EventPipeline


class Outcome(msgspec.Struct):
    outcome: str
    reason: str | None
    event: msgspec.Raw | None


def dry_run(
    source: BinaryIO,
    sink: BinaryIO,
    config: Config,
    app_names: Mapping[str, str],
    output_format: str,
) -> int:
    pipeline = EventPipeline(config, app_names)
    encode = msgspec.json.Encoder().encode
    last_ns = 0
    for raw_line in source:
        datagram = raw_line.removesuffix(b"\n").removesuffix(b"\r")
        last_ns = max(time.time_ns(), last_ns + 1)
        result = pipeline.event_or_reason(datagram, last_ns)
        if output_format == "line-protocol":
            if isinstance(result, str):
                text = "# excluded\n" if result == EXCLUDED else f"# invalid: {result}\n"
                sink.write(text.encode())
            else:
                sink.write(pipeline.encoder.line(result).encode())
            continue
        if isinstance(result, str):
            outcome = (
                Outcome("excluded", None, None)
                if result == EXCLUDED
                else Outcome("invalid", result, None)
            )
        else:
            outcome = Outcome("event", None, msgspec.Raw(pipeline.encoder.mqtt(result)))
        sink.write(encode(outcome) + b"\n")
    sink.flush()
    return exitcodes.OK
