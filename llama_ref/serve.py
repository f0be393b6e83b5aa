"""`python -m llama_ref serve` (and `explainer serve`): an OpenAI-compatible HTTP API over the engine.

Any OpenAI client (the explainer's openai backend, the official SDK, curl) can then use the local model:
GET /v1/models, POST /v1/chat/completions and POST /v1/completions, whole or streamed as
server-sent events. Bodies, chunks and error objects follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat); protocol.py reads and checks requests, apart
from HTTP. The standard library's http.server is enough for one local model, so the server adds no
dependency.

Concurrency: every request, once read whole (see "Slow clients"), gets a thread that validates and
tokenizes it (protocol.read_request) and submits it to the Engine, whose one worker thread owns the
model. The engine batches continuously: a request joins the running batch as soon as a row is free, each row stops at
its own max_tokens or stop token, and prompts sharing a start with an earlier one reuse its keys and
values. Each request's tokens reach its connection as they are produced. A client that goes away,
streamed or not, frees its row (or its place in the queue) at the engine's next step: before every
step the engine asks each job's socket whether its client closed or reset it. Rows are shared fairly
between clients, a client being the address it connects from (every local process on 127.0.0.1 is
one): while another address waits, none keeps more than half the rows (the engine pauses one and
resumes it later), so a client with many long requests cannot hold every row.

Slow clients: one thread (_Intake) reads every connection's request whole, all of them at once, before
a thread answers it; a connection still sending costs a file descriptor and its bytes, never a thread.
A request's line and headers must arrive within header_timeout seconds and its body within
body_timeout (else 408), however slowly they trickle in; a kept-alive connection that sends nothing
for `timeout` seconds is closed. Each header line is checked as it arrives (Host, Origin, the API key),
so a wrong key is refused at once. Past max_connections_per_peer open connections of one address, or
max_open_connections of all, the oldest that is still being read is closed, those without the key
first. So 64 sockets that never finish their headers hold up nobody.

Limits, as llama.cpp's server and vLLM keep them: a body over max_body_bytes gets 413 before it is
read, a POST without a valid Content-Length 411 or 400, headers over MAX_HEADER_BYTES 431, and past
max_connections requests being answered or max_queue waiting ones a client gets 503 with Retry-After.
Every failure is a JSON error body; nothing a client sends reaches a traceback.

Access: with an API key (--api-key or EXPLAINER_API_KEY), every request needs `Authorization: Bearer
KEY` (compared in constant time); without one the server listens on loopback only. POSTs must be
`Content-Type: application/json`, so a web page cannot send one without a CORS preflight, which this
server never grants. While bound to loopback, the Host header must name loopback and an Origin
header, if any, must be a loopback origin: a page on another site (or a DNS-rebinding name that
points at 127.0.0.1) is refused with 403.

Structured outputs: see protocol.py.

torch is imported only when a model is loaded (open_server), never by importing this module.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import os
import select
import selectors
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from llama_ref.errors import LlamaRefError
from llama_ref.protocol import ENDPOINTS, ApiError, CompletionRequest, parse_json, read_request, usage

DEFAULT_MAX_SEQ_LEN = 4096  # prompt + answer per row; requests need far less than the models' trained context
DEFAULT_MAX_BATCH_SIZE = 8  # rows generating at once; the KV cache grows with it
# The model is built with a cache this small; the engine then plans the real one (Engine.plan).
BUILD_SEQ_LEN = 256
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_CONNECTIONS = 64  # requests being answered at once (a thread each); more get 503
DEFAULT_MAX_QUEUE = 64  # requests waiting for a row; more get 503 at once rather than wait for minutes
DEFAULT_TIMEOUT_S = 60.0  # a kept-alive connection that sends nothing for this long is closed
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request's line and headers must all arrive within this
DEFAULT_BODY_TIMEOUT_S = 60.0  # and its body within this, from the end of its headers
# Open connections, being read or answered: of one address, and of all (each costs a file descriptor).
# Past either, the oldest connection of that address (or of any) that is still being read is closed.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 128
DEFAULT_MAX_OPEN_CONNECTIONS = 512
MAX_HEADER_BYTES = 64 << 10  # a request line and headers longer than this get 431
API_KEY_ENV = "EXPLAINER_API_KEY"

log = logging.getLogger(__name__)


class ServeError(LlamaRefError):
    """The server cannot start: an address it must not or cannot listen on."""


# ------------------------------------------------------------------------------------ the server


class ModelServer(HTTPServer):
    """The HTTP server: one model, one worker thread stepping the engine, one thread reading requests
    (_Intake), and a thread per request being answered.

    Use it as a context manager or call server_close() to stop the threads."""

    # socketserver's backlog is 5: a burst of clients overflowed it, and each connection the kernel dropped
    # waited a second for its retry. Waiting in the kernel's queue costs nothing.
    request_queue_size = socket.SOMAXCONN
    # after bind, getsockname() of the IPv4 or IPv6 socket: the host is always a str (typeshed allows bytes)
    server_address: tuple[str, int] | tuple[str, int, int, int]

    def __init__(
        self,
        address: tuple[str, int],
        llama,
        model_name: str,
        *,
        api_key: str | None = None,
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        timeout: float = DEFAULT_TIMEOUT_S,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        max_open_connections: int = DEFAULT_MAX_OPEN_CONNECTIONS,
    ):
        from llama_ref.engine import Engine

        check_exposure(address[0], api_key)
        super().__init__(address, _Handler)
        self.on_loopback = _is_loopback(self.server_address[0])  # where the Host and Origin checks apply
        self.llama = llama
        # the model's KV cache is this engine's alone, planned for the limits (default: the cache as it is)
        if max_seq_len is not None:
            max_seq_len = min(max_seq_len, llama.model.params.context_length)
        self.engine = Engine(llama.model, llama.tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self.engine.plan()
        self.model_name = model_name
        self.created = int(time.time())
        self.api_key = api_key
        self.max_body_bytes, self.max_queue, self.socket_timeout = max_body_bytes, max_queue, timeout
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.max_connections_per_peer, self.max_open_connections = max_connections_per_peer, max_open_connections
        self.answering = threading.BoundedSemaphore(max_connections)
        self._intake = _Intake(self)
        self._worker = threading.Thread(target=self.engine.serve_forever, name="llama-ref-serve-generate")
        self._worker.start()

    def process_request(self, request, client_address):
        """A new connection: its request is read by the intake thread, whole, before a thread answers it."""
        self._intake.accept(request, client_address)

    def header_error(self, name: str, value: str) -> ApiError | None:
        """What makes one header line (its name in lower case) a refusal, known as soon as it arrives: a Host
        or an Origin other than this machine's while on loopback, or a wrong API key."""
        if name == "host" and self.on_loopback:
            host = urlsplit(f"//{value}").hostname
            if host is None or not _is_loopback(host):
                return ApiError(
                    f"Host {value!r} is not this machine; this server answers requests for 127.0.0.1, "
                    f"::1 or localhost only",
                    status=403,
                    code="forbidden",
                )
        if name == "origin" and self.on_loopback and not _is_loopback_origin(value):
            return ApiError(f"requests from web pages of {value} are not allowed", status=403, code="forbidden")
        if name == "authorization" and self.api_key is not None:
            if not hmac.compare_digest(value.encode("utf-8", "replace"), f"Bearer {self.api_key}".encode()):
                return self._key_required()
        return None

    def missing_header_error(self, names: set[str]) -> ApiError | None:
        """What a request whose headers are complete lacks: a Host on loopback, the API key."""
        if self.on_loopback and "host" not in names:
            return ApiError(
                "no Host header; this server answers requests for 127.0.0.1, ::1 or localhost only",
                status=403,
                code="forbidden",
            )
        if self.api_key is not None and "authorization" not in names:
            return self._key_required()
        return None

    @staticmethod
    def _key_required() -> ApiError:
        return ApiError(
            "a valid API key is required: send Authorization: Bearer KEY",
            status=401,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def max_seq_len(self) -> int:
        return self.llama.model.max_seq_len

    def server_close(self) -> None:
        """Stop listening and stop the worker, within one generation step. The worker is joined, not
        left as a daemon, because torch aborts the process if the interpreter exits while a daemon
        thread is still inside its C++ code."""
        self._intake.close()
        super().server_close()
        self.engine.close()
        self._worker.join()


def open_server(
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_seq_len: int | None = None,
    max_batch_size: int | None = None,
    dtype: str | None = None,
    api_key: str | None = None,
    **limits,
) -> ModelServer:
    """Load the model (a catalog name or a checkpoint path; default: the catalog's default) and listen
    on host:port. Port 0 picks a free port; the server's base_url tells which. Call serve_forever() next.
    api_key: required of every client (default: EXPLAINER_API_KEY, else none; an address other than
    loopback refuses to start without one); `limits`: ModelServer's. Raises a LlamaRefError."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(host, api_key)  # before the model is loaded: a refusal costs nothing
    from llama_ref.loading import load_llama

    llama = load_llama(model, max_seq_len=BUILD_SEQ_LEN, max_batch_size=1, dtype=dtype)
    try:
        return ModelServer(
            (host, port),
            llama,
            served_name(model),
            api_key=api_key,
            max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE,
            max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN,
            **limits,
        )
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port, or stop what is using it"
        ) from None


def serve(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """open_server(...), then answer requests until Ctrl-C, saying on stderr where it listens and when it
    stops. Raises a LlamaRefError if the server cannot start."""
    try:
        with open_server(model, host, port, **options) as server:
            print(f"serving {server.model_name} on {server.base_url}", file=sys.stderr, flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key: anyone who can reach the address could
    use the model, and the Host and Origin checks that keep web pages out hold only on loopback."""
    if api_key is None and not _is_loopback(host):
        where = f"--host {host}" if host else "an empty --host (every address)"
        raise ServeError(
            f"{where} is not a loopback address, so anyone who can reach it could use the model; "
            f"set --api-key or {API_KEY_ENV} to require a key, or bind to 127.0.0.1"
        )


def served_name(model: str | Path | None) -> str:
    """What clients call the model: its catalog name, or the checkpoint's file name without its extension."""
    from llama_ref.catalog import CATALOG, DEFAULT_MODEL

    model = DEFAULT_MODEL if model is None else model
    if isinstance(model, str) and model in CATALOG:
        return model
    path = Path(model).expanduser()
    return path.stem if path.is_file() else path.name


@dataclass(eq=False)
class _Connection:
    """A connection the intake is reading a request from."""

    sock: socket.socket
    address: tuple
    deadline: float  # closed then (idle, headers), or answered 408 (body)
    since: float  # when it came (or came back): the oldest is closed first past a limit
    data: bytearray = field(default_factory=bytearray)
    reading: str = "headers"  # "idle" (kept alive, nothing of the next request yet), "headers", "body"
    checked: int = 0  # bytes of data whose lines have been checked
    method: bytes | None = None  # from the request line, once it is there
    names: set = field(default_factory=set)  # header names seen, in lower case
    content_length: str | None = None
    expect_continue: bool = False
    head: int = 0  # bytes of the request line and headers, once complete
    length: int = 0  # bytes of body to read
    has_key: bool = False  # sent the right API key

    @property
    def peer(self) -> str:
        return self.address[0]


class _Intake:
    """One thread that reads every connection's request, whole, with a selector, and hands each complete
    request to a thread that answers it (ModelServer.answering bounds how many); a kept-alive connection
    comes back here for its next request. See the module docstring's "Slow clients"."""

    def __init__(self, server: ModelServer):
        self.server = server
        self._selector = selectors.DefaultSelector()
        self._wake_up, self._waker = socket.socketpair()
        for end in (self._wake_up, self._waker):
            end.setblocking(False)
        self._selector.register(self._wake_up, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._arriving: list[tuple[_Connection, bool]] = []  # (connection, new): from other threads
        self._reading: dict[socket.socket, _Connection] = {}  # this thread's alone
        self._open: dict[str, int] = {}  # address -> connections open, read here or being answered
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llama-ref-serve-read", daemon=True)
        self._thread.start()

    def accept(self, sock: socket.socket, address: tuple) -> None:
        """A new connection (from the accepting thread)."""
        now = time.monotonic()
        self._arrive(_Connection(sock, address, deadline=now + self.server.header_timeout, since=now), new=True)

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join()

    def _arrive(self, connection: _Connection, new: bool) -> None:
        with self._lock:
            closing = self._closing
            if not closing:
                self._arriving.append((connection, new))
        if closing:
            self._shut(connection, counted=not new)
        else:
            self._wake()

    def _wake(self) -> None:
        try:
            self._waker.send(b"\0")
        except BlockingIOError:  # its buffer is full of wake-ups already
            pass

    def _run(self) -> None:
        while True:
            deadline = min((c.deadline for c in self._reading.values()), default=None)
            events = self._selector.select(None if deadline is None else max(0.0, deadline - time.monotonic()))
            with self._lock:
                closing, arriving, self._arriving = self._closing, self._arriving, []
            if closing:
                break
            for key, _ in events:
                if key.fileobj is self._wake_up:
                    while True:
                        try:
                            self._wake_up.recv(4096)
                        except BlockingIOError:
                            break
                elif key.fileobj in self._reading:  # not closed meanwhile to make room
                    self._guarded(self._read, key.data)
            for connection, new in arriving:
                self._guarded(self._take, connection, new)
            now = time.monotonic()
            for connection in [c for c in self._reading.values() if c.deadline <= now]:
                self._guarded(self._expire, connection)
        for connection in self._reading.values():
            self._shut(connection)
        for connection, new in arriving:
            self._shut(connection, counted=not new)
        self._reading.clear()
        self._selector.close()
        self._wake_up.close()
        self._waker.close()

    def _guarded(self, step, connection: _Connection, *args) -> None:
        """step(connection, *args); a bug of ours closes that connection, not the thread every request needs."""
        try:
            step(connection, *args)
        except Exception as exc:
            log.error("reading a request from %s failed: %s: %s", connection.peer, type(exc).__name__, exc)
            self._close(connection)

    def _take(self, connection: _Connection, new: bool) -> None:
        if new:  # counted from here until it is closed, whichever thread closes it
            with self._lock:
                self._open[connection.peer] = self._open.get(connection.peer, 0) + 1
        if new and not self._make_room(connection.peer):
            return self._refuse(
                connection,
                ApiError(
                    "too many connections; retry in a moment",
                    status=503,
                    code="server_busy",
                    headers={"Retry-After": "1"},
                ),
            )
        connection.sock.setblocking(False)
        self._selector.register(connection.sock, selectors.EVENT_READ, connection)
        self._reading[connection.sock] = connection
        if connection.data:  # a pipelined next request came with the last one
            self._advance(connection)

    def _make_room(self, peer: str) -> bool:
        """Within the limits on open connections, by closing the oldest being read of this address (past its
        limit) or of all, those without the key first; False if none can be closed."""
        with self._lock:
            over_peer = self._open[peer] > self.server.max_connections_per_peer
            over_all = sum(self._open.values()) > self.server.max_open_connections
        if not (over_peer or over_all):
            return True
        candidates = [c for c in self._reading.values() if c.peer == peer or not over_peer]
        if not candidates:
            return False
        self._close(min(candidates, key=lambda c: (c.has_key, c.since)))
        return True

    def _read(self, connection: _Connection) -> None:
        try:
            chunk = connection.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed (or reset) its connection
            return self._close(connection)
        connection.data += chunk
        self._advance(connection)

    def _advance(self, connection: _Connection) -> None:
        server = self.server
        if connection.reading == "idle":
            connection.reading, connection.deadline = "headers", time.monotonic() + server.header_timeout
        if connection.reading == "headers":
            while (newline := connection.data.find(b"\n", connection.checked)) != -1:
                line = bytes(connection.data[connection.checked : newline]).rstrip(b"\r")
                connection.checked = newline + 1
                if connection.method is None:  # the request line; blank lines before it are skipped
                    if line:
                        connection.method = line.split(b" ", 1)[0]
                    else:
                        del connection.data[: connection.checked]
                        connection.checked = 0
                    continue
                if not line:  # the end of the headers
                    return self._headers_done(connection)
                name, _, value = line.decode("latin-1").partition(":")
                name, value = name.strip().lower(), value.strip()
                connection.names.add(name)
                if name == "content-length" and connection.content_length is None:
                    connection.content_length = value
                connection.expect_continue |= name == "expect" and value.lower() == "100-continue"
                if (error := server.header_error(name, value)) is not None:
                    return self._refuse(connection, error)
                connection.has_key |= name == "authorization" and server.api_key is not None
            if len(connection.data) > MAX_HEADER_BYTES:
                self._refuse(
                    connection,
                    ApiError(
                        f"the request line and headers exceed {MAX_HEADER_BYTES} bytes; send fewer or shorter headers",
                        status=431,
                        code="request_header_fields_too_large",
                    ),
                )
        elif len(connection.data) >= connection.head + connection.length:
            self._hand_off(connection)

    def _headers_done(self, connection: _Connection) -> None:
        server = self.server
        if (error := server.missing_header_error(connection.names)) is not None:
            return self._refuse(connection, error)
        connection.head = connection.checked
        try:
            length = int(connection.content_length or "")
        except ValueError:
            length = -1
        if connection.method != b"POST" or not 0 <= length <= server.max_body_bytes:
            return self._hand_off(connection)  # no body to read: the handler refuses what it must
        connection.reading, connection.length = "body", length
        connection.deadline = time.monotonic() + server.body_timeout
        if connection.expect_continue and len(connection.data) == connection.head:
            self._send(connection, b"HTTP/1.1 100 Continue\r\n\r\n")
        self._advance(connection)

    def _hand_off(self, connection: _Connection) -> None:
        end = connection.head + connection.length
        request, rest = bytes(connection.data[:end]), connection.data[end:]
        if not self.server.answering.acquire(blocking=False):
            return self._refuse(
                connection,
                ApiError(
                    "too many requests are being answered; retry in a moment",
                    status=503,
                    code="server_busy",
                    headers={"Retry-After": "1"},
                ),
            )
        self._forget(connection)
        connection.sock.setblocking(True)
        connection.sock.settimeout(self.server.socket_timeout)  # for the answer's writes
        threading.Thread(
            target=self._answer, args=(connection, request, rest), daemon=True, name="llama-ref-serve-answer"
        ).start()

    def _answer(self, connection: _Connection, request: bytes, rest: bytearray) -> None:
        """In a thread of its own: answer the request, then give the connection back, or close it."""
        keep = False
        try:
            keep = not _Handler((request, connection.sock), connection.address, self.server).close_connection
        except OSError:  # the client went away while the answer was written
            pass
        except Exception as exc:  # a bug of ours: the connection is closed, the log says one line
            log.error("answering %s failed: %s: %s", connection.peer, type(exc).__name__, exc)
        finally:
            self.server.answering.release()
        if not keep:
            return self._shut(connection)
        now = time.monotonic()
        self._arrive(
            _Connection(
                connection.sock,
                connection.address,
                deadline=now + self.server.socket_timeout,
                since=now,
                data=rest,
                reading="idle",
            ),
            new=False,
        )

    def _expire(self, connection: _Connection) -> None:
        if connection.reading == "body":
            self._refuse(
                connection,
                ApiError(
                    f"the body did not arrive within {self.server.body_timeout:g} s; send "
                    f"all {connection.length} bytes the Content-Length promises at once",
                    status=408,
                    code="request_timeout",
                ),
            )
        else:  # a request line and headers that never came whole, or a kept-alive connection left idle
            self._close(connection)

    def _refuse(self, connection: _Connection, error: ApiError) -> None:
        self._send(connection, _error_response(error))
        self._close(connection)

    @staticmethod
    def _send(connection: _Connection, data: bytes) -> None:
        try:  # a short answer into an empty send buffer: it does not block
            connection.sock.send(data)
        except OSError:
            pass

    def _forget(self, connection: _Connection) -> None:
        if self._reading.pop(connection.sock, None) is not None:
            self._selector.unregister(connection.sock)

    def _close(self, connection: _Connection) -> None:
        self._forget(connection)
        self._shut(connection)

    def _shut(self, connection: _Connection, counted: bool = True) -> None:
        """Close a connection this thread is not reading (any thread may)."""
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        connection.sock.close()
        if counted:
            with self._lock:
                self._open[connection.peer] -= 1
                if not self._open[connection.peer]:
                    del self._open[connection.peer]


def _error_response(error: ApiError) -> bytes:
    """A whole HTTP response for `error`, after which the connection closes."""
    data = json.dumps(error.body()).encode()
    lines = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in error.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class _Handler(BaseHTTPRequestHandler):
    """Answers one request, read whole by the intake: `request` is (the request's bytes, socket), the shape of
    socketserver's datagram requests. Afterwards close_connection says whether the connection goes back to the
    intake for the next one."""

    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses its connections
    server: ModelServer

    def setup(self):
        data, self.connection = self.request
        self.request = self.connection
        self.rfile = io.BytesIO(data)
        self.wfile = self.connection.makefile("wb")

    def handle(self):
        self.close_connection = True  # unless the request asks to keep it alive (parse_request)
        try:
            self.handle_one_request()
        except (ConnectionError, TimeoutError):  # the client went away or stalled; its job is cancelled
            self.close_connection = True

    def handle_expect_100(self):
        return True  # the intake said 100 Continue before it read the body

    def do_GET(self):
        try:
            if self._route() != "/v1/models":
                return self._send_json(*self._no_route())
            card = {
                "id": self.server.model_name,
                "object": "model",
                "created": self.server.created,
                "owned_by": "llama-explainer",
            }
            self._send_json(200, {"object": "list", "data": [card]})
        except ApiError as exc:
            self._send_error(exc)

    def do_POST(self):
        try:
            self._answer_post()
        except ApiError as exc:
            self._send_error(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a bug of ours: the client still gets an answer, the log one line
            log.error("%s %s failed: %s: %s", self.command, self._route(), type(exc).__name__, exc)
            self.close_connection = True
            self._send_error(ApiError(f"internal error ({type(exc).__name__}); see the server's log", status=500))

    def _answer_post(self):
        raw = self._read_body()
        kind = ENDPOINTS.get(self._route())
        if kind is None:
            return self._send_json(*self._no_route())
        if self.headers.get_content_type() != "application/json":
            raise ApiError(
                f"the body must be sent as Content-Type: application/json, not {self.headers.get_content_type()}",
                status=415,
                code="unsupported_media_type",
            )
        request = read_request(kind, parse_json(raw), self.server.llama, self.server.model_name)
        job = self._submit(request)
        if request.stream:
            return self._stream(kind, job, include_usage=request.include_usage)
        text = "".join(_pieces(job))
        if job.finish_reason == "cancelled":  # the client went away: nobody to answer
            self.close_connection = True
            return
        choice = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send_json(200, {**self._envelope(kind, streaming=False), "choices": [choice], "usage": _usage(job)})

    def _submit(self, request: CompletionRequest):
        """Queue a valid request as the engine's Job, unless too many wait already."""
        from llama_ref.engine import EngineStopped, Job

        if self.server.engine.queued >= self.server.max_queue:
            raise ApiError(
                f"{self.server.max_queue} requests are already waiting; retry in a moment",
                status=503,
                code="server_busy",
                headers={"Retry-After": "2"},
            )
        try:
            return self.server.engine.submit(
                Job(
                    request.prompt,
                    request.max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=request.seed,
                    abandoned=lambda: _client_gone(self.connection),
                    constraint=request.constraint,
                    client=self.client_address[0],
                )
            )
        except EngineStopped:
            raise ApiError("the server is stopping", status=503) from None

    def _stream(self, kind: str, job, include_usage: bool) -> None:
        """Server-sent events: one `data: {chunk}` per piece of text, then the finish reason, the
        usage if asked for (stream_options.include_usage), and `data: [DONE]`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end: no length needed
        self.end_headers()
        self.close_connection = True
        envelope = self._envelope(kind, streaming=True)
        if include_usage:
            envelope["usage"] = None  # as the API does: null on every chunk but the last

        def send(data) -> None:
            self.wfile.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return {**envelope, "choices": [{**choice, "finish_reason": finish_reason, "logprobs": None}]}

        try:
            if kind == "chat":
                send(chunk("", role=True))
            for text in _pieces(job):
                send(chunk(text))
        except ApiError as exc:
            return send(exc.body())  # the SDK raises an APIError on a chunk with an "error" key
        except OSError:  # the client went away: free its row instead of generating for nobody
            job.cancel()
            raise
        if job.finish_reason == "cancelled":  # the engine found the client gone before a write did
            return
        send(chunk(None, job.finish_reason))
        if include_usage:
            send({**envelope, "choices": [], "usage": _usage(job)})
        send("[DONE]")

    def _envelope(self, kind: str, streaming: bool) -> dict:
        if kind == "chat":
            ident, obj = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk" if streaming else "chat.completion"
        else:
            ident, obj = f"cmpl-{uuid.uuid4().hex}", "text_completion"
        return {"id": ident, "object": obj, "created": int(time.time()), "model": self.server.model_name}

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _no_route(self) -> tuple[int, dict]:
        return 404, ApiError(
            f"no endpoint {self.command} {self._route()}; this server has GET /v1/models, "
            f"POST /v1/chat/completions and POST /v1/completions",
            status=404,
            code="not_found",
        ).body()

    def _read_body(self) -> bytes:
        """The body, if Content-Length is there, valid and within the limit; nothing is read otherwise."""
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise ApiError("a POST needs a Content-Length header", status=411, code="length_required")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True  # the body's end is unknown: this connection can't go on
            raise ApiError(f"the Content-Length header must be a byte count; got {value!r}")
        if length > self.server.max_body_bytes:
            self.close_connection = True
            raise ApiError(
                f"the body is {length} bytes; this server takes at most {self.server.max_body_bytes} "
                f"(the server's --max-body-bytes)",
                status=413,
                code="request_too_large",
            )
        return self.rfile.read(length)  # all there: the intake read it

    def _send_error(self, error: ApiError) -> None:
        try:
            self._send_json(error.status, error.body(), error.headers)
        except OSError:
            self.close_connection = True

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


# Linux reports a peer that closed its end (sent FIN) with POLLRDHUP even while bytes it sent are unread
_PEER_CLOSED = getattr(select, "POLLRDHUP", 0)


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client closed or reset its connection, answered at once. A client that sent a byte more
    after its body and then closed is gone too, though the byte waits unread (POLLRDHUP). Where poll has no
    POLLRDHUP, a readable socket with nothing to read has reached its end, and one with data holds a
    pipelined next request."""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN | _PEER_CLOSED)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (_PEER_CLOSED | select.POLLHUP | select.POLLERR):
            return True
        return not connection.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):  # reset by the client, or already closed by its handler
        return True


def _is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 in brackets or not) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and _is_loopback(parts.hostname or "")


def _pieces(job) -> Iterator[str]:
    from llama_ref.engine import EngineError, EngineStopped

    try:
        yield from job.pieces()
    except EngineStopped:
        raise ApiError("the server is stopping", status=503) from None
    except EngineError as exc:
        raise ApiError(str(exc), status=500) from None


def _usage(job) -> dict:
    return usage(len(job.prompt_tokens), len(job.tokens))
