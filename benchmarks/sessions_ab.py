"""In-process A/B of the writer's session share (decode, reorder, apply: `SessionKeeper.add`
over 50,000 corpus events, then `flush`): an old tree's shared/sessions.py, keeper and
worker pipeline against this tree's, alternating in one process so both see the same load.

    PYTHONPATH=NEW_TREE python -m benchmarks.sessions_ab OLD_TREE [ROUNDS]
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
import types
from typing import Any

from senseflow.commands.corpus import app_names, make_corpus
from shared.config import SessionOptions, config_from_document
from shared.events import EncodedBatch, RawBatch
from workers.writer.spool import Spool


def load(name: str, path: str, replace: tuple[tuple[str, str], ...] = ()) -> Any:
    """The module at `path` under `name` (its imports edited by `replace`)."""
    with open(path) as source:
        text = source.read()
    for old, new in replace:
        text = text.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    exec(compile(text, path, "exec"), module.__dict__)
    return module


def batches(pipeline_module: Any, spacing_ns: int, count: int = 50_000) -> list[EncodedBatch]:
    pipeline = pipeline_module.EventPipeline(config_from_document({}, {}), app_names())
    datagrams = make_corpus(count, seed=1)
    start = time.time_ns()
    return [
        pipeline.process_batch(
            RawBatch(datagrams[i : i + 500], [start + (i + j) * spacing_ns for j in range(500)])
        )
        for i in range(0, count, 500)
    ]


def writer_ns(keeper_module: Any, batches: list[EncodedBatch]) -> float:
    events = sum(len(b.received_ns) for b in batches)
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory, [keeper_module.CONSUMER])
        keeper = keeper_module.SessionKeeper(SessionOptions(), spool, sync=False)
        gc.collect()
        started = time.thread_time_ns()
        for seq, batch in enumerate(batches):
            keeper.add(seq, batch)
        keeper.flush()
        spent = time.thread_time_ns() - started
        spool.close()
    return spent / events


def main() -> None:
    old_tree, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
    load("old_shared_sessions", f"{old_tree}/shared/sessions.py")
    imports = (("from shared.sessions import", "from old_shared_sessions import"),)
    trees = {
        "old": (
            load("old_keeper", f"{old_tree}/workers/writer/sessions.py", imports),
            load("old_pipeline", f"{old_tree}/workers/pipeline.py"),
        ),
        "new": (
            __import__("workers.writer.sessions", fromlist=["x"]),
            __import__("workers.pipeline", fromlist=["x"]),
        ),
    }
    for spacing_ns, rate in ((1_000_000, "1,000"), (20_000, "50,000")):
        inputs = {name: batches(pipeline, spacing_ns) for name, (_, pipeline) in trees.items()}
        spent: dict[str, list[float]] = {"old": [], "new": []}
        for round_ in range(rounds):
            for name in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                spent[name].append(writer_ns(trees[name][0], inputs[name]))
        old, new = (statistics.median(spent[name]) for name in ("old", "new"))
        print(
            f"{rate} events/s: old median {old:.0f} ns (min {min(spent['old']):.0f}), "
            f"new median {new:.0f} ns (min {min(spent['new']):.0f}), new/old {new / old:.2f}"
        )


if __name__ == "__main__":
    main()
