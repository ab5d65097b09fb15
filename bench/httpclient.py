"""HTTP/1.1 clients for the load generator: keep-alive connections replaying pre-built requests.

Two clients with one interface, ``await client.request(i, j, timeout) -> (status, json_length,
body)`` for pool entry ``i`` with header variant ``j`` (token, routing key):

- ``H1Client`` (default): a minimal HTTP/1.1 client on asyncio's Protocol API. Each request's
  bytes (request line, headers, body) are joined once per send and written in one call; the
  response parser reads the status line, ``Content-Length`` or chunked framing and the two
  headers the bench needs. About a quarter of aiohttp's client CPU per request, so the client
  leaves more of a small machine to the servers it compares.
- ``AiohttpClient`` (``--http-client aiohttp``): aiohttp's ``ClientSession``, the mature client,
  as a cross-check of the first.

HTTP/1.1 carries one request at a time per connection, so both keep a pool of idle keep-alive
connections and open another whenever every one is busy: a closed loop of N users settles on N
connections, an open loop on as many as it has requests in flight. A connection whose exchange
did not finish (timeout, cancel, broken framing) is closed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import tempfile

from bench.inputs import HttpRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
_VERSION = re.compile(rb'"model_version"\s*:\s*"((?:[^"\\]|\\.)*)"')


class ResponseError(ConnectionError):
    """The connection closed, or sent something that is not an HTTP/1.1 response."""


def response_version(body: bytes, json_length: int | None) -> bytes:
    """``model_version`` of a KServe V2 REST inference response, without parsing its JSON.

    Searches the JSON part only (before any binary data); servers write ``model_version`` near
    the front (after ``model_name``), so the search stops early even for long JSON outputs.
    """
    m = _VERSION.search(body, 0, len(body) if json_length is None else json_length)
    return m.group(1) if m else b""


def ssl_context(tls) -> ssl.SSLContext:
    """A client SSLContext from gateway.tls.ClientTLS PEM bytes (CA: the system's when None)."""
    ctx = ssl.create_default_context(
        cadata=tls.root_certificates.decode() if tls.root_certificates else None)
    if tls.certificate_chain is not None:
        with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files only
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            with open(cert, "wb") as f:
                f.write(tls.certificate_chain)
            with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(tls.private_key)
            ctx.load_cert_chain(cert, key)
    return ctx


def header_variants(token: str | None, routing_keys: tuple[str, ...]) -> list[dict[str, str]]:
    """Per-request extra headers: the bearer token, and one variant per sticky routing key."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return [{**auth, "x-routing-key": key} for key in routing_keys] or [auth]


# ---- the minimal client ------------------------------------------------------------------------

def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case, with its ``\\r\\n`` before and ``:`` after) in a
    lower-cased response head, or None."""
    i = head.find(name)
    if i < 0:
        return None
    i += len(name)
    end = head.find(b"\r\n", i)
    return head[i:end if end >= 0 else len(head)].strip()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` writes a request and waits for its response."""

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.head_end = -1  # where the body starts, once the head is in
        self.status = 0
        self.length: int | None = None  # Content-Length
        self.chunked = False
        self.keep = True
        self.json_length: int | None = None

    # protocol callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # one write per request already; no Nagle delay on any of them
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            try:
                self._parse()
            except (ResponseError, ValueError) as exc:  # ValueError: a number that is not one
                self._fail(ResponseError(f"unreadable response: {exc}"))

    def eof_received(self):
        return False  # close the transport: HTTP/1.1 has no half-closed exchanges

    def connection_lost(self, exc) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.head_end >= 0 and self.length is None and not self.chunked:
                self._done(bytes(self.buf[self.head_end:]))  # a body delimited by the close
            else:
                waiter.set_exception(ResponseError(
                    "the server closed the connection before the response was complete"))

    # the exchange

    def exchange(self, data: bytes) -> asyncio.Future:
        self.waiter = fut = asyncio.get_running_loop().create_future()
        if self.buf:  # bytes that arrived unasked cannot be the response to this request
            self._fail(ResponseError("the server sent data between responses"))
        else:
            self.transport.write(data)
        return fut

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _done(self, body: bytes) -> None:
        waiter, self.waiter = self.waiter, None
        result = (self.status, self.json_length, body, self.keep)
        self._reset()
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _parse(self) -> None:
        buf = self.buf
        while self.head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise ResponseError("response head over 64 KiB")
                return
            head = bytes(buf[:end]).lower()
            if not head.startswith(b"http/1.") or len(head) < 12:
                raise ResponseError(f"not an HTTP/1.x response: {bytes(buf[:40])!r}")
            status = int(head[9:12])
            if 100 <= status < 200:  # informational (100 Continue): the response follows
                del buf[:end + 4]
                continue
            self.status, self.head_end = status, end + 4
            length = _header(head, b"\r\ncontent-length:")
            self.length = int(length) if length is not None else None
            encoding = _header(head, b"\r\ntransfer-encoding:")
            self.chunked = encoding is not None and encoding.endswith(b"chunked")
            connection = _header(head, b"\r\nconnection:")
            self.keep = head.startswith(b"http/1.1") and connection != b"close"
            json_length = _header(head, b"\r\ninference-header-content-length:")
            self.json_length = int(json_length) if json_length is not None else None
            if self.length is None and not self.chunked and status in (204, 304):
                self.length = 0
        start = self.head_end
        if self.length is not None:
            stop = start + self.length
            if len(buf) >= stop:
                body = bytes(buf[start:stop])
                del buf[:stop]
                self._done(body)
        elif self.chunked:
            self._parse_chunks(start)
        # else: the body runs to the connection's close (connection_lost)

    def _parse_chunks(self, start: int) -> None:
        buf, parts, i = self.buf, [], start
        while True:
            line_end = buf.find(b"\r\n", i)
            if line_end < 0:
                return
            size = int(bytes(buf[i:line_end]).split(b";")[0], 16)
            if size == 0:  # the last chunk, then trailers up to an empty line
                end = buf.find(b"\r\n\r\n", line_end)
                if end < 0:
                    return
                del buf[:end + 4]
                self._done(b"".join(parts))
                return
            stop = line_end + 2 + size
            if len(buf) < stop + 2:
                return
            parts.append(bytes(buf[line_end + 2:stop]))
            i = stop + 2


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class H1Client:
    """Keep-alive HTTP/1.1 to one ``host:port``, replaying pre-built requests."""

    def __init__(self, url: str, requests: list[HttpRequest], headers: list[dict[str, str]],
                 tls=None):
        self.host, _, port = url.rpartition(":")
        self.port = int(port)
        self.ssl = ssl_context(tls) if tls is not None else None
        self.idle: list[_Connection] = []
        self.opened = 0
        # Per pool entry: the request line and its own headers; per variant: the extra headers.
        self.heads = [
            (f"POST {r.path} HTTP/1.1\r\nHost: {url}\r\nContent-Type: {r.content_type}\r\n"
             f"Content-Length: {len(r.body)}\r\n"
             + (f"{HEADER_LENGTH}: {r.json_length}\r\n" if r.json_length is not None else "")
             ).encode("latin-1") for r in requests]
        self.bodies = [r.body for r in requests]
        self.extras = ["".join(f"{k}: {v}\r\n" for k, v in h.items()).encode("latin-1") + b"\r\n"
                       for h in headers]

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            _Connection, self.host.strip("[]"), self.port, ssl=self.ssl,
            server_hostname=self.host.strip("[]") if self.ssl is not None else None)
        self.opened += 1
        return conn

    async def warm(self, count: int) -> None:
        """Open ``count`` idle connections ahead of the load."""
        self.idle += await asyncio.gather(*(self.connect() for _ in range(count)))

    async def request(self, i: int, j: int, timeout: float) -> tuple[int, int | None, bytes]:
        idle = self.idle
        conn = None
        while idle:
            conn = idle.pop()
            if not conn.closed:
                break
            conn = None
        if conn is None:
            conn = await self.connect()
        fut = conn.exchange(b"".join((self.heads[i], self.extras[j], self.bodies[i])))
        timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
        try:
            status, json_length, body, keep = await fut
        except BaseException:  # timeout, cancel, a broken response: the connection is spent
            conn.abort()
            raise
        finally:
            timer.cancel()
        if keep and not conn.closed:
            idle.append(conn)
        else:
            conn.abort()
        return status, json_length, body

    async def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


# ---- aiohttp ----------------------------------------------------------------------------------

class AiohttpClient:
    """The same requests through aiohttp's ClientSession (keep-alive pool, no limit)."""

    def __init__(self, url: str, requests: list[HttpRequest], headers: list[dict[str, str]],
                 tls=None):
        import aiohttp
        import yarl

        self.aiohttp = aiohttp
        scheme = "https" if tls is not None else "http"
        self.urls = [yarl.URL(f"{scheme}://{url}{r.path}", encoded=True) for r in requests]
        self.bodies = [r.body for r in requests]
        self.heads = [{"Content-Type": r.content_type,
                       **({HEADER_LENGTH: str(r.json_length)} if r.json_length is not None
                          else {})} for r in requests]
        self.extras = headers
        self.ssl = ssl_context(tls) if tls is not None else False
        self.session = None
        self.timeouts: dict[float, object] = {}

    def _session(self):
        if self.session is None:
            aiohttp = self.aiohttp
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self.ssl),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        return self.session

    async def warm(self, count: int) -> None:
        """``count`` keep-alive connections in the pool: that many health calls at once (any
        answer will do: the bare floor answers nothing but inference)."""
        url = self.urls[0].with_path("/v2/health/live")

        async def touch():
            async with self._session().get(url) as response:
                await response.read()

        await asyncio.gather(*(touch() for _ in range(count)))

    async def request(self, i: int, j: int, timeout: float) -> tuple[int, int | None, bytes]:
        limit = self.timeouts.get(timeout)
        if limit is None:
            limit = self.timeouts[timeout] = self.aiohttp.ClientTimeout(total=timeout)
        headers = {**self.heads[i], **self.extras[j]} if self.extras[j] else self.heads[i]
        async with self._session().post(self.urls[i], data=self.bodies[i], headers=headers,
                                        timeout=limit) as response:
            body = await response.read()
            json_length = response.headers.get(HEADER_LENGTH)
            return response.status, int(json_length) if json_length else None, body

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


CLIENTS = {"h1": H1Client, "aiohttp": AiohttpClient}
