"""`senseflow run` whose workers discard: the readers measured with consumers that cost
(almost) nothing (benchmarks/suite.py, "receiver alone"; endtoend.py mode `discard`).

    python -m benchmarks.discard run --config FILE [senseflow run flags]

Every worker decodes each raw batch, counts its datagrams as `events` and
`written.discard`, and drops it: no parsing, no destinations. Benchmarks only: events
are counted as written and are not. The production worker knows nothing of this: this
module replaces the worker's entry point before the supervisor starts its children
(spawned children import it by name, so it must be importable from their sys.path).
"""

from __future__ import annotations

import sys

from shared import counternames as names
from shared.config import Config
from shared.counters import SharedCounters
from shared.events import RAW_DECODER
from shared.ipc import Channels
from shared.logs import setup_logging
from workers import process
from workers.process import Worker

DISCARD = "discard"


class DiscardingWorker(Worker):
    def process(self, item: bytes) -> None:
        count = len(RAW_DECODER.decode(item).datagrams)
        self.counters.commit(
            {names.EVENTS: count, names.written(DISCARD): count}, {names.WORKER_HELD: 0}
        )


def run(config: Config, channels: Channels, index: int, parent_pid: int, block: object) -> int:
    """The worker entry point the supervisor spawns instead of `workers.process.run`."""
    setup_logging(config.pipeline.log_level, config.pipeline.log_format, f"worker-{index}")
    return process.start(
        DiscardingWorker(config, channels, index, SharedCounters(block)), parent_pid
    )


def main(argv: list[str] | None = None) -> int:
    from benchmarks import discard  # this module by its importable name, also under -m
    from senseflow import cli

    process.run = discard.run  # the supervisor reads it when it makes the worker slots
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
