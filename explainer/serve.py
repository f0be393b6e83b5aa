"""`explainer serve`: an OpenAI-compatible HTTP API over the bundled llama_ref model.

Any OpenAI client (our openai backend, the official SDK, curl) can then use the local model:
GET /v1/models, POST /v1/chat/completions and POST /v1/completions, whole or streamed as
server-sent events. Bodies, chunks and error objects follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat). The standard library's
ThreadingHTTPServer is enough for one local model, so the server adds no dependency.

Concurrency: every connection gets a thread that validates and tokenizes its request and submits
it to llama_ref's Engine, whose one worker thread owns the model. The engine batches continuously:
a request joins the running batch as soon as a row is free, each row stops at its own max_tokens or
stop token, and prompts sharing a start with an earlier one reuse its keys and values. Each
request's tokens reach its connection as they are produced; a streaming client that goes away
frees its row at the next step.

torch is imported only when a model is loaded (open_server), never by importing this module.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

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
    except ValueError as exc:  # chat.ChatTemplateError: its message starts with "chat template"
        raise ApiError(f"the model's {exc}", "messages") from None
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
    """The HTTP server: one model, one worker thread stepping the engine, a thread per connection.

    Use it as a context manager or call server_close() to stop the worker."""

    def __init__(self, address: tuple[str, int], llama, model_name: str):
        from llama_ref.engine import Engine

        super().__init__(address, _Handler)
        self.llama = llama
        self.engine = Engine(llama.model, llama.tokenizer)  # the model's KV cache is this engine's alone
        self.model_name = model_name
        self.created = int(time.time())
        self._worker = threading.Thread(target=self.engine.serve_forever, name="explainer-serve-generate")
        self._worker.start()

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
        super().server_close()
        self.engine.close()
        self._worker.join()


def open_server(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000, *,
                max_seq_len: int | None = None, max_batch_size: int | None = None,
                dtype: str | None = None) -> ModelServer:
    """Load the model (a catalog name or a checkpoint path; default: the catalog's default) and listen
    on host:port. Port 0 picks a free port; the server's base_url tells which. Call serve_forever() next."""
    backend = LocalBackend(model, dtype=dtype, max_seq_len=max_seq_len or DEFAULT_MAX_SEQ_LEN,
                           max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE)
    llama = backend.llama  # loads the model now, with the local backend's one-line errors
    llama.model.setup_caches(backend.max_batch_size, min(backend.max_seq_len, llama.model.params.context_length))
    try:
        return ModelServer((host, port), llama, _served_name(backend))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                        f"pick another --port, or stop what is using it") from None


def _served_name(backend: LocalBackend) -> str:
    """The catalog name, or the checkpoint's file name without its extension."""
    from llama_ref.catalog import CATALOG

    if backend.model in CATALOG:
        return backend.model
    path = backend.model_path
    return path.stem if path.is_file() else path.name


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses its connections
    server: ModelServer

    def handle(self):
        try:
            super().handle()
        except ConnectionError:  # the client went away mid-answer; a streamed job is cancelled in _stream
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
            text = "".join(_pieces(job))
        except ApiError as exc:
            return self._send_json(exc.status, exc.body())
        choice = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send_json(200, {**self._envelope(kind, streaming=False), "choices": [choice], "usage": _usage(job)})

    def _job(self, kind: str, body: dict):
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
        from llama_ref.engine import EngineStopped, Job

        temperature, top_p, seed = sampling
        try:
            return self.server.engine.submit(Job(prompt, max_tokens, temperature=temperature, top_p=top_p,
                                                 seed=seed))
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


def _pieces(job) -> Iterator[str]:
    from llama_ref.engine import EngineError, EngineStopped

    try:
        yield from job.pieces()
    except EngineStopped:
        raise ApiError("the server is stopping", status=503) from None
    except EngineError as exc:
        raise ApiError(str(exc), status=500) from None


def _usage(job) -> dict:
    prompt = len(job.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": len(job.tokens), "total_tokens": prompt + len(job.tokens)}
