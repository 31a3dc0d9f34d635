"""The supervisor's HTTP server: `/metrics`, `/healthz`, and whatever routes come next.

One asyncio loop on one thread serves every connection, so a client that opens a
connection and sends half a request costs a socket and a small buffer, never a thread.
Limits, all enforced here for every route:

- at most `maxConnections` connections at once; one more is closed at once (counted);
- a request head (request line + headers) must arrive whole within `requestTimeout`
  seconds and fit in `MAX_HEAD_BYTES`; a body (Content-Length) in `MAX_BODY_BYTES`;
- one request per connection (`Connection: close`), so nothing idles between requests;
- with a token or a user/password configured, every route but the public ones
  (`/healthz`) needs `Authorization: Bearer <token>` or `Basic <user:password>`.

Handlers are plain functions `(Request) -> Response`, run on the loop's thread: they must
be quick (a scrape is), or hand their work elsewhere; one that waits on the network
returns an awaitable instead, which the loop awaits (`/api/sessions` asking its peers).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger("senseflow.http")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response | Awaitable[Response]]


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 64
    request_timeout: float = 10.0
    token: str = ""
    username: str = ""
    password: str = ""

    @property
    def auth_required(self) -> bool:
        return bool(self.token or self.username)


class HttpError(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class HttpServer:
    """Routes by exact path; `start()` binds and serves on a thread, `stop()` ends both."""

    def __init__(self, host: str, port: int, limits: HttpLimits | None = None) -> None:
        self.limits = limits or HttpLimits()
        self.routes: dict[str, tuple[Handler, bool]] = {}
        self.connections = 0
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(self._bind(host, port))
        self.address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        self._thread = threading.Thread(target=self._loop.run_forever, name="http")

    async def _bind(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)

    @property
    def port(self) -> int:
        return self.address[1]

    def route(self, path: str, handler: Handler, *, public: bool = False) -> None:
        """`public`: answered without credentials (health checks from load balancers)."""
        self.routes[path] = (handler, public)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        self.connections += 1
        try:
            response = await self._answer(reader)
            writer.write(encode_response(response))
            await asyncio.wait_for(writer.drain(), self.limits.request_timeout)
            # drain() returns below the high-water mark; abort() below would drop the rest
            # of a large body: close() flushes first
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), self.limits.request_timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: nothing to answer
        finally:
            self.connections -= 1
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> Response:
        try:
            request = await asyncio.wait_for(read_request(reader), self.limits.request_timeout)
        except HttpError as exc:
            return text_response(exc.status)
        response = self.dispatch(request)
        return await response if inspect.isawaitable(response) else response

    def dispatch(self, request: Request) -> Response | Awaitable[Response]:
        handler, public = self.routes.get(request.path, (None, True))
        if handler is None:
            known = " ".join(sorted(self.routes))
            return Response(404, "text/plain", f"not found: try {known}\n".encode())
        if not public and not self.authorized(request):
            response = text_response(HTTPStatus.UNAUTHORIZED)
            response.headers["WWW-Authenticate"] = self.challenge()
            return response
        if request.method != "GET":
            return text_response(HTTPStatus.METHOD_NOT_ALLOWED)
        return handler(request)

    def challenge(self) -> str:
        """Basic only when a user is configured: a browser answers a Basic challenge with
        a password prompt, which a token-only server (the live page's fetches) must not
        cause."""
        if self.limits.username:
            return 'Basic realm="senseflow", charset="UTF-8"'
        return 'Bearer realm="senseflow"'

    def authorized(self, request: Request) -> bool:
        limits = self.limits
        if not limits.auth_required:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and limits.token:
            return hmac.compare_digest(credentials.encode(), limits.token.encode())
        if scheme == "basic" and limits.username:
            expected = f"{limits.username}:{limits.password}".encode()
            return hmac.compare_digest(decode_basic(credentials), expected)
        return False


def decode_basic(credentials: str) -> bytes:
    try:
        return base64.b64decode(credentials, validate=True)
    except (binascii.Error, ValueError):
        return b""


async def read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from exc
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HttpError(HTTPStatus.BAD_REQUEST)
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    path, _, query = parts[1].partition("?")
    body = await read_body(reader, headers.get("content-length", "0"))
    return Request(parts[0].upper(), path, query, headers, body)


async def read_body(reader: asyncio.StreamReader, length_text: str) -> bytes:
    if not length_text.isdigit():
        raise HttpError(HTTPStatus.BAD_REQUEST)
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return await reader.readexactly(length) if length else b""


def text_response(status: HTTPStatus) -> Response:
    return Response(status.value, "text/plain", f"{status.phrase}\n".encode())


def encode_response(response: Response) -> bytes:
    phrase = HTTPStatus(response.status).phrase
    head = [
        f"HTTP/1.1 {response.status} {phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body
