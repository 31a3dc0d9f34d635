"""The writer process: spool, feeds (one per destination) and the sinks that deliver."""
