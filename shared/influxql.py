"""InfluxQL statements senseflow runs on InfluxDB 1.x, shared by the user-events sink
(workers/writer/sinks/influx.py) and the queue-metrics writer (senseflow/influxstats.py).

As Butler SOS does, a database senseflow creates gets the configured retention policy as
its *default*, so queries that name no policy (Grafana's "default", `influx -database
senseops -execute 'SELECT ... FROM user_events'`) see the points. A database that already
existed keeps its default: other data and dashboards may rely on it (issue 12).
"""

from __future__ import annotations

from shared.config import RetentionPolicy


def identifier(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def names_a_policy(policy: RetentionPolicy) -> bool:
    """False for autogen (created with every database) and for none configured."""
    return bool(policy.name) and policy.name != "autogen"


def create_database(database: str) -> str:
    return f"CREATE DATABASE {identifier(database)}"


def create_policy(database: str, policy: RetentionPolicy, *, default: bool) -> str:
    duration = policy.duration or "INF"
    statement = (
        f"CREATE RETENTION POLICY {identifier(policy.name)} ON {identifier(database)} "
        f"DURATION {duration} REPLICATION 1"
    )
    return statement + (" DEFAULT" if default else "")


def make_default(database: str, policy: RetentionPolicy) -> str:
    """What an operator runs to make queries without a policy see senseflow's points."""
    return f"ALTER RETENTION POLICY {identifier(policy.name)} ON {identifier(database)} DEFAULT"
