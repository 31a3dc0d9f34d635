"""InfluxDB destination: our own batcher, ordered delivery, retries that never give up on
transient errors, and bad lines isolated by splitting (SPEC 3, 4).

1.x is written through its HTTP `/write` API; 2.x and 3.x through influxdb-client's
async write API (3.x takes the database as the bucket). Every version gets the same
line protocol. Re-sending a batch is harmless: a point with the same series and
timestamp overwrites itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from shared import counternames as names
from shared import influxql
from shared.backoff import Backoff
from shared.config import Config, InfluxdbConfig, InfluxTls
from shared.counters import Counting
from shared.events import EncodedBatch
from shared.tasks import cancel_all, spawn
from shared.tls import client_context, scheme
from workers.writer.sinks.base import (
    Ack,
    Acknowledge,
    ChunkQueue,
    DestinationUnreachable,
    counting_acks,
    share_failures,
)

log = logging.getLogger("senseflow.influxdb")

NAME = "influxdb"


class WriteRejected(Exception):
    """A 4xx answer: the batch (or part of it) can never be written as it is."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status
        self.text = text


class WriteFailed(Exception):
    """A transient failure: 5xx, timeout, connection error. Retried."""


@dataclass
class Chunk:
    lines: list[bytes] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    seq_events: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.received_ns)


def basic_auth(username: str, password: str) -> str:
    """An `Authorization` value. UTF-8, as InfluxDB compares the bytes (aiohttp's BasicAuth
    defaults to Latin-1, which fails any non-ASCII password, and is deprecated)."""
    credentials = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {credentials}"


def load_context(tls: InfluxTls, where: str) -> ssl.SSLContext | None:
    try:
        return client_context(tls)
    except OSError as exc:  # ssl.SSLError is one
        raise DestinationUnreachable(f"InfluxDB at {where}: cannot load TLS files: {exc}") from exc


class Transport(Protocol):
    async def open(self) -> None: ...

    async def send(self, body: bytes) -> None:
        """Write the lines; raises WriteFailed (transient) or WriteRejected."""

    async def close(self) -> None: ...


class V1Transport:
    def __init__(self, cfg: InfluxdbConfig, timeout: float, tls: InfluxTls) -> None:
        v1 = cfg.v1_config
        self.tls = tls
        self.base = f"{scheme(tls)}://{cfg.host}:{cfg.port}"
        self.params = {"db": v1.db_name, "precision": "ns"}
        if v1.retention_policy.name:
            self.params["rp"] = v1.retention_policy.name
        self.headers: dict[str, str] = {}
        if v1.auth.enable:
            self.headers["Authorization"] = basic_auth(v1.auth.username, v1.auth.password)
        self.rp = v1.retention_policy
        self.db = v1.db_name
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        context = load_context(self.tls, self.base)
        self.session = aiohttp.ClientSession(
            timeout=self.timeout,
            headers=self.headers,
            connector=aiohttp.TCPConnector(ssl=context if context is not None else True),
        )
        try:
            await self._create()
        except BaseException:
            await self.close()  # start() may be retried (onUnreachable: wait): do not leak sessions
            raise

    async def _create(self) -> None:
        """Create the database and retention policy unless they exist. As with Butler SOS,
        a user with only WRITE on an existing database (no admin privilege) can start, and
        the policy becomes the database's default only when we create the database."""
        exists = self.db in await self._databases()
        if not exists:
            await self._query(influxql.create_database(self.db))
            log.info("InfluxDB: created the database %s", self.db)
        if not influxql.names_a_policy(self.rp):
            return
        statement = influxql.create_policy(self.db, self.rp, default=not exists)
        await self._query(statement, forbidden_ok=exists)
        if not exists:
            log.info("InfluxDB: created the retention policy %s as its default", self.rp.name)
        else:
            await self._warn_unless_default()

    async def _warn_unless_default(self) -> None:
        """Points go to the configured policy; queries that name none read the default."""
        try:
            text = await self._query(f"SHOW RETENTION POLICIES ON {influxql.identifier(self.db)}")
            rows = json.loads(text)["results"][0]["series"][0]["values"]
            default = next((row[0] for row in rows if row[4] is True), None)
        except (DestinationUnreachable, ValueError, LookupError, TypeError):
            return  # no privilege to look: nothing to say
        if default != self.rp.name:
            log.warning(
                "InfluxDB: the database %s existed, its default retention policy is %s, not "
                "%s: queries that name no policy (Grafana, influx -database %s) do not see "
                "the user events; to change that: %s",
                self.db,
                default,
                self.rp.name,
                self.db,
                influxql.make_default(self.db, self.rp),
            )

    async def _databases(self) -> set[str]:
        text = await self._query("SHOW DATABASES")
        try:
            series = json.loads(text)["results"][0].get("series", [])
            return {row[0] for each in series for row in each.get("values") or []}
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise DestinationUnreachable(
                f"InfluxDB at {self.base}: not an InfluxDB answer: {text[:200]}"
            ) from exc

    async def _query(self, statement: str, *, forbidden_ok: bool = False) -> str:
        assert self.session is not None
        try:
            async with self.session.post(f"{self.base}/query", data={"q": statement}) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DestinationUnreachable(
                f"InfluxDB at {self.base}: {exc or type(exc).__name__}"
            ) from exc
        if response.status == 403 and forbidden_ok:
            log.info("InfluxDB: this user may not run %s; assuming it exists", statement)
        elif response.status >= 300 or ('"error"' in text and "already exists" not in text):
            raise DestinationUnreachable(f"InfluxDB at {self.base}: {statement}: {text[:200]}")
        return text

    async def send(self, body: bytes) -> None:
        assert self.session is not None
        try:
            async with self.session.post(
                f"{self.base}/write", params=self.params, data=body
            ) as response:
                if response.status < 300:
                    return
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WriteFailed(str(exc) or type(exc).__name__) from exc
        if response.status >= 500 or response.status in (401, 403, 404, 408, 429):
            raise WriteFailed(f"HTTP {response.status}: {text[:200]}")
        raise WriteRejected(response.status, text)

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()


class ClientTransport:
    """InfluxDB 2.x (org, bucket, token) and 3.x (database, token) via influxdb-client."""

    def __init__(self, cfg: InfluxdbConfig, timeout: float, tls: InfluxTls) -> None:
        self.tls = tls
        self.url = f"{scheme(tls)}://{cfg.host}:{cfg.port}"
        if cfg.version == 2:
            self.token, self.org, self.bucket = (
                cfg.v2_config.token,
                cfg.v2_config.org,
                cfg.v2_config.bucket,
            )
        else:
            self.token, self.org, self.bucket = cfg.v3_config.token, "", cfg.v3_config.database
        self.timeout_ms = int(timeout * 1000)
        self.client: Any = None
        self.write_api: Any = None

    async def open(self) -> None:
        # Built here, not in __init__: the client's aiohttp session needs the running loop
        # (InfluxDBClientAsync raises otherwise), and the writer builds its sinks before it.
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        context = load_context(self.tls, self.url)
        extra = {} if context is None else {"ssl_context": context}
        self.client = InfluxDBClientAsync(
            url=self.url, token=self.token, org=self.org, timeout=self.timeout_ms, **extra
        )
        self.write_api = self.client.write_api()
        try:
            await self.client.ping()
        except Exception as exc:  # influxdb-client raises several unrelated types here
            await self.close()  # start() may be retried (onUnreachable: wait): do not leak sessions
            raise DestinationUnreachable(f"InfluxDB at {self.url}: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def send(self, body: bytes) -> None:
        from influxdb_client.rest import ApiException

        assert self.write_api is not None
        try:
            await self.write_api.write(bucket=self.bucket, org=self.org, record=body)
        except ApiException as exc:
            status = int(exc.status or 0)
            text = str(exc.body or exc.reason or "")
            if status >= 500 or status in (0, 401, 403, 404, 408, 429):
                raise WriteFailed(f"HTTP {status}: {text[:200]}") from exc
            raise WriteRejected(status, text) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise WriteFailed(str(exc) or type(exc).__name__) from exc

    async def close(self) -> None:
        client, self.client, self.write_api = self.client, None, None
        if client is not None:
            await client.close()


class InfluxSink:
    name = NAME

    def __init__(
        self,
        config: Config,
        counters: Counting,
        on_ack: Acknowledge | None = None,
    ) -> None:
        cfg = config.butler.influxdb_config
        pipe = config.pipeline
        timeout = cfg.v3_config.write_timeout / 1000 if cfg.version == 3 else 10.0
        self.transport: Transport = (
            V1Transport(cfg, timeout, pipe.influx_tls)
            if cfg.version == 1
            else ClientTransport(cfg, timeout, pipe.influx_tls)
        )
        self.counters = counters
        self.on_ack: Acknowledge = on_ack or counting_acks(counters, NAME)
        self.batch_size = pipe.batch_size
        self.max_pending = max(pipe.pending_events, self.batch_size * 2)
        self.inflight = pipe.influx_inflight
        self.write_gap = min(pipe.influx_min_write_interval, pipe.flush_interval) / 1000
        self.chunks = ChunkQueue(Chunk)
        # The first chunk alone; after a failure, what waits behind it goes one at a time
        # in order (InfluxDB may be struggling), then two at a time again.
        self.chunks.serial_through = 1
        self.backoff = Backoff()
        self.room = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.transport.open()
        self.tasks = [
            spawn(self._send_loop(), name=f"writer.influx.send{slot}")
            for slot in range(self.inflight)
        ]

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        if not batch.received_ns:
            self.on_ack([Ack(seq, 0, 0)])
            return
        while self.chunks.pending >= self.max_pending:
            self.room.clear()
            await self.room.wait()
        self._add(batch, seq)

    def offer(self, batch: EncodedBatch, seq: int = -1) -> bool:
        """`write_batch` if it would not wait (the writer's hand-over as it spools)."""
        if batch.received_ns and self.chunks.pending >= self.max_pending:
            return False
        if not batch.received_ns:
            self.on_ack([Ack(seq, 0, 0)])
        else:
            self._add(batch, seq)
        return True

    def _add(self, batch: EncodedBatch, seq: int) -> None:
        chunks = self.chunks
        current = chunks.current
        if not current.count:
            chunks.wake.set()  # a free sender takes it at once (it holds what follows too)
        current.lines.append(batch.lines)
        current.received_ns.extend(batch.received_ns)
        current.seqs.append(seq)
        current.seq_events.append(len(batch.received_ns))
        chunks.pending += len(batch.received_ns)
        if current.count >= self.batch_size:
            chunks.cut()

    async def _send_loop(self) -> None:
        """One write slot. A partial chunk goes out as soon as a slot is free, but not
        sooner than `write_gap` after the previous write began, so no timer runs without
        traffic; while every slot is busy, what arrives gathers into the next chunk (up
        to `batchSize`). Acknowledgements leave in the order the chunks were taken."""
        chunks = self.chunks
        while True:
            chunk = await chunks.take(self.write_gap)
            failed = await self._deliver(chunk.lines)
            finished = chunks.finish(chunk, failed)
            if finished:
                self.room.set()
            for each, rejected in finished:
                self.on_ack(share_failures(each.seqs, each.seq_events, rejected, each.received_ns))

    async def _deliver(self, lines: list[bytes]) -> int:
        """Write until acknowledged; a rejected batch is split to isolate its bad lines.
        Returns how many lines InfluxDB rejected."""
        body = b"".join(lines)
        while True:
            try:
                await self.transport.send(body)
            except WriteFailed as exc:
                self.chunks.one_at_a_time()
                delay = self.backoff.next_delay()
                self.counters.add(names.retries(NAME))
                log.warning("InfluxDB write failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            except WriteRejected as exc:
                return await self._isolate(body, exc)
            self.backoff.reset()
            return 0

    async def _isolate(self, body: bytes, rejection: WriteRejected) -> int:
        lines = body.splitlines(keepends=True)
        if len(lines) == 1:
            log.warning("InfluxDB rejected a line (%s): %.300r", rejection, lines[0])
            return 1
        middle = len(lines) // 2
        failed = 0
        for half in (lines[:middle], lines[middle:]):
            failed += await self._deliver(half)
        return failed

    async def flush(self) -> None:
        await self.chunks.flush()

    async def close(self) -> None:
        await self.flush()
        await cancel_all(self.tasks)
        await self.transport.close()
