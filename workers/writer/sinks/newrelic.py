"""New Relic destination: the Event API, one ordered queue per destination account (SPEC 3, 4).

The workers already encoded every event as one JSON object; here they are only joined into
a JSON array (`[a,b,c]`, never parsed again), gzipped, and POSTed to
`<url>/v1/accounts/<accountId>/events` with that account's `Api-Key`.

- Every account in `sendToNewRelic.destinationAccount` gets every event. Per account, events
  wait in order in chunks of at most MAX_EVENTS events and MAX_RAW_BYTES bytes, cut early
  by the pipeline's `flushInterval`; one request per account is in flight at a time.
- A gzipped body must stay within the API's 1 MB (10^6 bytes) per request: a larger one is
  split in halves before it is sent, and so is a batch the API answers 413 to.
- 5xx, 408, 429 and network errors are retried until the API accepts the batch (its
  `Retry-After` honoured, else capped exponential backoff with full jitter), in order:
  nothing is dropped. Other 4xx answers cannot succeed by retrying: their events are
  counted as failed and a sample is logged.
- Pending events are bounded per account by `pendingEvents`; the writer waits at the bound.
- Counters: each event counts once for the destination (SPEC 4): `failed.newrelic` if an
  account rejected it, else `written.newrelic` once every account has it (when accounts
  reject different events of one batch, the batch counts the larger number as failed);
  `newrelic.written.<account>` and `newrelic.failed.<account>` per account;
  `retries.newrelic`; `newrelic.splits`.
- API keys and custom headers are never logged; answers are redacted before logging.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from shared import counternames as names
from shared.backoff import Backoff
from shared.config import Config, redact
from shared.counters import Counting
from shared.events import EncodedBatch
from shared.logs import RateLimitedLog
from shared.tasks import cancel_all, spawn
from workers.writer.sinks.base import (
    Ack,
    Acknowledge,
    ChunkQueue,
    DestinationUnreachable,
    counting_acks,
)

log = logging.getLogger("senseflow.newrelic")

NAME = "newrelic"
MAX_BODY_BYTES = 1_000_000
"""The Event API's limit per request, of the (compressed) body."""
MAX_EVENTS = 5_000
MAX_RAW_BYTES = 4_000_000
"""Uncompressed bytes per chunk: our events gzip 10-20x, so one chunk is rarely split."""
REQUEST_TIMEOUT = 30.0
MAX_RETRY_AFTER = 300.0
RETRIED_STATUSES = frozenset({408, 429})
_OWN_HEADERS = frozenset({"api-key", "content-type", "content-encoding", "content-length"})

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class Chunk:
    events: list[bytes] = field(default_factory=list)
    received_ns: list[int] = field(default_factory=list)
    size: int = 0
    batches: list[int] = field(default_factory=list)
    """Keys of the batches whose last event is in this chunk: complete once it is delivered."""

    @property
    def count(self) -> int:
        return len(self.events)

    def has_room(self, events: int, size: int) -> bool:
        return self.count + events <= MAX_EVENTS and self.size + size <= MAX_RAW_BYTES


@dataclass(slots=True)
class Awaiting:
    """A batch some account has not finished yet; `failed`: the most any account rejected."""

    seq: int
    accounts: int
    events: int
    received_ns: list[int]
    failed: int = 0


@dataclass(slots=True)
class Answer:
    status: int  # 0: no answer (network error, timeout)
    text: str = ""
    retry_after: float | None = None


class Account:
    """One destination account: where its events go, and the events waiting for it."""

    def __init__(self, name: str, url: str, headers: dict[str, str]) -> None:
        self.name = name
        self.url = url
        self.headers = headers
        self.chunks = ChunkQueue(Chunk)
        self.backoff = Backoff(base=0.1, cap=30.0)
        self.failed_open = 0  # rejected events of batches whose last chunk is still to come

    def add(self, events: list[bytes], received_ns: list[int], key: int) -> None:
        chunks = self.chunks
        size = sum(map(len, events))
        if chunks.current.has_room(len(events), size):
            chunks.current.events.extend(events)
            chunks.current.received_ns.extend(received_ns)
            chunks.current.size += size
        else:
            for event, ns in zip(events, received_ns, strict=True):
                if not chunks.current.has_room(1, len(event)):
                    chunks.cut()
                chunks.current.events.append(event)
                chunks.current.received_ns.append(ns)
                chunks.current.size += len(event)
        chunks.pending += len(events)
        chunks.current.batches.append(key)
        if not chunks.current.has_room(1, 0):
            chunks.cut()


def request_headers(config: Config) -> dict[str, str]:
    """The configured custom headers; ours (key, content type, encoding) always win."""
    headers = {
        h.name: h.value
        for h in config.butler.new_relic.event.header or []
        if h.name.lower() not in _OWN_HEADERS
    }
    headers["Content-Type"] = "application/json"
    headers["Content-Encoding"] = "gzip"
    return headers


def make_accounts(config: Config) -> list[Account]:
    butler = config.butler
    base = butler.new_relic.event.url.rstrip("/")
    credentials = {a.account_name: a for a in butler.third_party_tools_credentials.new_relic or []}
    common = request_headers(config)
    accounts = []
    for name in butler.user_events.send_to_new_relic.destination_account or []:
        account = credentials[name]  # check_semantics guarantees it exists
        headers = {**common, "Api-Key": account.insert_api_key}
        accounts.append(Account(name, f"{base}/v1/accounts/{account.account_id}/events", headers))
    return accounts


def tls_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def gzip_array(events: list[bytes]) -> bytes:
    """The events as one JSON array, gzipped."""
    return gzip.compress(b"[" + b",".join(events) + b"]", compresslevel=6, mtime=0)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now, capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), MAX_RETRY_AFTER)


class NewRelicSink:
    name = NAME

    def __init__(
        self,
        config: Config,
        counters: Counting,
        on_ack: Acknowledge | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.counters = counters
        self.on_ack: Acknowledge = on_ack or counting_acks(counters, NAME)
        self.awaiting: dict[int, Awaiting] = {}  # batches some account has not finished
        self.next_key = 0
        self.sleep = sleep
        self.base_url = config.butler.new_relic.event.url.rstrip("/")
        self.accounts = make_accounts(config)
        self.flush_interval = config.pipeline.flush_interval / 1000
        self.max_pending = max(config.pipeline.pending_events, MAX_EVENTS * 2)
        self.session: aiohttp.ClientSession | None = None
        self.room = asyncio.Event()
        self.filled = asyncio.Event()  # events arrived since the timer last cut
        self.rejected_log = RateLimitedLog(log)
        self.retry_log = RateLimitedLog(log, interval=5.0)
        self.tasks: list[asyncio.Task[None]] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the session and check that the API host answers over HTTPS (any status)."""
        ca_file = self.config.pipeline.new_relic_ca_file
        try:
            context = tls_context(ca_file)
        except OSError as exc:  # ssl.SSLError is one
            raise DestinationUnreachable(f"New Relic: cannot load {ca_file}: {exc}") from exc
        if self.session is not None:  # a start that timed out before (onUnreachable: wait)
            await self.session.close()
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            connector=aiohttp.TCPConnector(ssl=context),
            trust_env=True,  # HTTPS_PROXY / NO_PROXY, as Butler SOS's axios honours them
        )
        try:
            async with self.session.get(self.base_url + "/") as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self.session.close()
            self.session = None
            detail = redact(str(exc) or type(exc).__name__, self.config)
            raise DestinationUnreachable(f"New Relic at {self.base_url}: {detail}") from exc
        self.tasks = [
            spawn(self._send_loop(a), name=f"writer.newrelic.{i}")
            for i, a in enumerate(self.accounts)
        ]
        self.tasks.append(spawn(self._timer_loop(), name="writer.newrelic.timer"))

    async def write_batch(self, batch: EncodedBatch, seq: int = -1) -> None:
        events = batch.newrelic
        if not events or not self.accounts:
            self.on_ack([Ack(seq, 0, 0)])
            return
        while any(a.chunks.pending >= self.max_pending for a in self.accounts):
            self.room.clear()
            await self.room.wait()
        key = self.next_key
        self.next_key += 1
        self.awaiting[key] = Awaiting(seq, len(self.accounts), len(events), batch.received_ns)
        for account in self.accounts:
            account.add(events, batch.received_ns, key)
        self.filled.set()

    def _chunk_done(self, account: Account, chunk: Chunk, failed: int) -> None:
        """A batch is done once every account has delivered its last chunk. An event
        counts as failed if any account rejected it, else as written."""
        account.failed_open += failed
        complete = []
        for key in chunk.batches:
            state = self.awaiting[key]
            rejected = min(account.failed_open, state.events)
            account.failed_open -= rejected
            state.failed = max(state.failed, rejected)
            state.accounts -= 1
            if not state.accounts:
                del self.awaiting[key]
                measured = state.received_ns if not state.failed else ()
                written = state.events - state.failed
                complete.append(Ack(state.seq, written, state.failed, measured))
        if complete:
            self.on_ack(complete)

    async def flush(self) -> None:
        for account in self.accounts:
            await account.chunks.flush()

    async def close(self) -> None:
        await self.flush()
        await cancel_all(self.tasks)
        if self.session is not None:
            await self.session.close()

    # -- sending ----------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        """Cuts partial chunks `flushInterval` after events arrive; asleep without traffic."""
        while True:
            await self.filled.wait()
            self.filled.clear()
            await asyncio.sleep(self.flush_interval)
            for account in self.accounts:
                account.chunks.cut()

    async def _send_loop(self, account: Account) -> None:
        while True:
            chunk = await account.chunks.next()
            failed = await self._deliver(account, chunk.events, chunk.received_ns)
            account.chunks.done()
            self.room.set()
            self._chunk_done(account, chunk, failed)

    async def _deliver(self, account: Account, events: list[bytes], received_ns: list[int]) -> int:
        """Send until the API takes it; too large is split, rejected is counted as failed.
        Returns how many events the account rejected."""
        body = await asyncio.get_running_loop().run_in_executor(None, gzip_array, events)
        if len(body) > MAX_BODY_BYTES:
            return await self._split(account, events, received_ns, f"{len(body)} bytes gzipped")
        while True:
            answer = await self._post(account, body)
            if 200 <= answer.status < 300:
                account.backoff.reset()
                self._written(account, received_ns)
                return 0
            if answer.status == 413:
                why = f"HTTP 413 {answer.text[:200]}"
                return await self._split(account, events, received_ns, why)
            if answer.status and answer.status < 500 and answer.status not in RETRIED_STATUSES:
                self._failed(account, events, f"HTTP {answer.status} {answer.text}")
                return len(events)
            await self._wait_to_retry(account, answer)

    async def _post(self, account: Account, body: bytes) -> Answer:
        assert self.session is not None
        try:
            async with self.session.post(
                account.url, data=body, headers=account.headers
            ) as response:
                text = await response.text(errors="replace")
                return Answer(
                    response.status, text, retry_after_seconds(response.headers.get("Retry-After"))
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Answer(0, str(exc) or type(exc).__name__)

    async def _wait_to_retry(self, account: Account, answer: Answer) -> None:
        delay = account.backoff.next_delay() if answer.retry_after is None else answer.retry_after
        self.counters.add(names.retries(NAME))
        reason = f"HTTP {answer.status}" if answer.status else "no answer"
        self.retry_log.warning(
            "New Relic account %r: %s (%s); retrying in %.2fs",
            account.name,
            reason,
            self._safe(answer.text[:200]),
            delay,
        )
        await self.sleep(delay)

    async def _split(
        self, account: Account, events: list[bytes], received_ns: list[int], why: str
    ) -> int:
        if len(events) == 1:
            self._failed(account, events, f"a single event is too large ({why})")
            return 1
        self.counters.add(names.NEWRELIC_SPLITS)
        middle = len(events) // 2
        failed = await self._deliver(account, events[:middle], received_ns[:middle])
        return failed + await self._deliver(account, events[middle:], received_ns[middle:])

    def _written(self, account: Account, received_ns: list[int]) -> None:
        self.counters.add(names.newrelic_written(account.name), len(received_ns))

    def _failed(self, account: Account, events: list[bytes], reason: str) -> None:
        self.counters.add(names.newrelic_failed(account.name), len(events))
        self.rejected_log.warning(
            "New Relic account %r rejected %d event(s): %s; first event: %.300s",
            account.name,
            len(events),
            self._safe(reason[:300]),
            self._safe(events[0].decode("utf-8", "replace")),
        )

    def _safe(self, text: str) -> str:
        return redact(text, self.config)
