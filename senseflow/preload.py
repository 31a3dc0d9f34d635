"""What the fork server loads once, before it forks any child (senseflow/supervisor.py).

Every reader, worker and writer is forked from the fork server, so the modules imported
here and ua-parser's compiled rules (the bulk of a worker's memory) are shared between
them copy-on-write instead of being loaded again by each child, as a spawned child does.
"""

from __future__ import annotations

import receiver.process
import workers.process
import workers.writer.process
from workers.enrich import builtin_resolver

PRELOADED = (receiver.process, workers.process, workers.writer.process)

builtin_resolver()
