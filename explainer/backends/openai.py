"""Any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp, `explainer serve`) through the official SDK.

Requests run concurrently on a thread pool, up to `concurrency` at a time; the SDK's client is
thread-safe and shares one connection pool. Retries are ours, not the SDK's (the client gets
max_retries=0): the SDK ignores `Retry-After: 0` and falls back to its own backoff, and gives up
silently on long waits, whereas a batch job wants to do what the server says and to tell the
user on stderr why it is waiting.

A request that names its answer's shape (Request.json_answer, as the translator's do) asks for
structured outputs: a strict JSON schema with exactly those string keys. A server that refuses the
schema gets the request again without it, and no later request sends one (one warning says so).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import openai

from explainer.backends import Completion, JsonAnswer, Request, UnusableAnswer
from explainer.errors import UserError
from explainer.waiting import wait_interruptibly

DEFAULT_MODEL = "gpt-4o-mini"  # cheap and good at explaining code; override with --model
MAX_BACKOFF = 30.0  # seconds; exponential backoff stops growing here
MAX_RETRY_AFTER = 120.0  # seconds; a server asking for longer is a quota problem, not a blip

log = logging.getLogger(__name__)


def retry_delay(retry: int, headers: Mapping[str, str], backoff: float) -> float:
    """Seconds to wait before retry number `retry` (0-based).

    The server's word wins: `retry-after-ms` (an OpenAI extension, milliseconds), then
    `Retry-After` as seconds or as an HTTP date (RFC 9110, section 10.2.3). Otherwise
    exponential backoff with jitter, so that many workers hit by one rate limit do not all
    come back in the same instant.
    """
    headers = {name.lower(): value for name, value in headers.items()}
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[header]) * scale)
        except (KeyError, ValueError):
            pass
    if "retry-after" in headers:
        try:
            when = email.utils.parsedate_to_datetime(headers["retry-after"])
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return min(backoff * 2**retry, MAX_BACKOFF) * random.uniform(0.75, 1.0)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


DEFAULT_CONCURRENCY = 8  # requests in flight per call


def from_settings(settings) -> OpenAIBackend:
    """The registry's factory (explainer.backends.BACKENDS)."""
    return OpenAIBackend(
        model=settings.model,
        base_url=settings.base_url,
        concurrency=DEFAULT_CONCURRENCY if settings.concurrency is None else settings.concurrency,
    )


class OpenAIBackend:
    """Backend for any OpenAI-compatible server.

    The key comes from `api_key` or OPENAI_API_KEY, the server from `base_url` or OPENAI_BASE_URL
    (the SDK's default, api.openai.com, otherwise). A server given explicitly (a local vLLM or
    `explainer serve`) may be used without a key. `model` defaults to DEFAULT_MODEL.
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
    ):
        self.model = model or DEFAULT_MODEL
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if base_url is None:
                raise UserError(
                    "OPENAI_API_KEY is not set; export it, or use --backend local "
                    "(a server given with --base-url needs no key)"
                )
            api_key = "unused"  # servers without auth ignore it, but the SDK insists on one
        if concurrency < 1:
            raise UserError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self._api_key = api_key  # kept only to scrub it from error messages
        try:
            self._client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        except openai.OpenAIError as exc:
            raise UserError(f"cannot set up the OpenAI client: {self._scrub(exc)}") from None
        self.base_url = str(self._client.base_url).rstrip("/")
        self.timeout = timeout
        self._schemas = True  # False once the server refused a response_format: never sent again
        self._schemas_lock = threading.Lock()

    def complete(
        self, requests: list[Request], on_done: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]:
        """Answer every request, in order. on_done(index, completion) runs on a worker thread as
        each answer arrives. An unusable answer (cut off, empty) does not stop the others: every
        request is answered before UnusableAnswer is raised, as with the local backend. On any other
        failure no new request starts; those already running finish (and reach on_done, so their
        answers are kept) before the error is raised."""
        if not requests:
            return []
        results: list[Completion | None] = [None] * len(requests)
        failed = threading.Event()  # once set, queued requests are skipped instead of sent

        def run(index: int) -> None:
            if failed.is_set():
                return
            try:
                results[index] = self._complete_one(index, len(requests), requests[index])
                if on_done is not None:
                    on_done(index, results[index])
            except UnusableAnswer:
                raise  # the model's answer to this one request: the others go on
            except BaseException:
                failed.set()
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)), thread_name_prefix="openai-request")
        try:
            futures = [pool.submit(run, index) for index in range(len(requests))]
            wait_interruptibly(futures)  # after a failure that stops the run, queued requests return at once
            pool.shutdown(wait=True)
        except BaseException:  # Ctrl-C: drop queued requests, do not wait for running ones
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:  # one that stopped the run before an unusable answer; else the earliest in request order
            first = min(errors, key=lambda error: isinstance(error, UnusableAnswer))
            if isinstance(first, UnusableAnswer):
                unusable = {
                    index: str(future.exception())
                    for index, future in enumerate(futures)
                    if isinstance(future.exception(), UnusableAnswer)
                }
                others = f" (and {len(unusable) - 1} other request(s) of this call)" if len(unusable) > 1 else ""
                raise UnusableAnswer(str(first) + others, unusable) from None
            raise first
        return results

    def _complete_one(self, index: int, total: int, request: Request) -> Completion:
        which = f"request {index + 1} of {total}"
        for retry in range(self.max_retries + 1):
            try:
                return self._completion(which, request, self._create(request))
            except (openai.APIConnectionError, openai.APIStatusError) as exc:
                status = getattr(exc, "status_code", None)
                transient = status is None or status in (408, 409, 429) or status >= 500
                if not transient:
                    raise self._error(which, exc) from None
                headers = exc.response.headers if status is not None else {}
                delay = retry_delay(retry, headers, self.backoff)
                if delay > MAX_RETRY_AFTER:
                    raise UserError(
                        f"{self.base_url} asks to wait {delay:.0f} s before retrying {which} "
                        f"({self._status(exc)}); rerun later (finished answers are cached)"
                    ) from None
                if retry == self.max_retries:
                    raise self._error(which, exc, gave_up_after=retry) from None
                reason = f"HTTP {status}" if status is not None else type(exc).__name__
                log.warning("%s: %s, retry %d of %d in %.3g s", which, reason, retry + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _create(self, request: Request):
        """One chat completion, held to the answer's JSON schema while the server takes one. A refusal
        of the schema is not an attempt: the same request goes again at once, without it."""
        settings = {
            "model": self.model,
            "messages": list(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
        }
        if request.json_answer is None or not self._schemas:
            return self._client.chat.completions.create(**settings)
        try:
            return self._client.chat.completions.create(
                **settings, response_format=response_format(request.json_answer)
            )
        except openai.APIStatusError as exc:
            if not _refuses_schema(exc):
                raise
            self._stop_sending_schemas(exc)
        return self._client.chat.completions.create(**settings)

    def _stop_sending_schemas(self, exc: openai.APIStatusError) -> None:
        # Requests already in flight may each be refused once; the warning is said once.
        with self._schemas_lock:
            if not self._schemas:
                return
            self._schemas = False
        log.warning(
            "%s refused a JSON schema for the answer (%s); requests go without one "
            "from now on, and answers are still checked",
            self.base_url,
            self._status(exc),
        )

    def _completion(self, which: str, request: Request, response) -> Completion:
        # A server that is not an OpenAI-compatible API may answer 200 with HTML or other JSON;
        # the SDK then hands back a string or a half-filled object.
        choices = getattr(response, "choices", None)
        if not choices:
            raise UserError(
                f"{self.base_url} did not answer {which} like an OpenAI chat-completions API; "
                f"fix --base-url (it usually ends in /v1)"
            )
        choice = choices[0]
        if choice.finish_reason == "length":
            raise UnusableAnswer(
                f"the answer to {which} was cut off at max_tokens={request.max_tokens} "
                f"(finish_reason=length); allow more tokens or split the code into smaller pieces"
            )
        if not (choice.message.content or "").strip():
            raise UnusableAnswer(
                f"{self.base_url} returned an empty answer for {which} "
                f"(finish_reason={choice.finish_reason}); try again or pick another --model"
            )
        usage = response.usage
        return Completion(
            text=choice.message.content,
            finish_reason=choice.finish_reason or "stop",
            tokens_in=usage.prompt_tokens if usage else 0,
            tokens_out=usage.completion_tokens if usage else 0,
        )

    def _error(self, which: str, exc: openai.APIError, gave_up_after: int = 0) -> UserError:
        """One line that says what went wrong with which request and what to do about it."""
        tries = f" after {gave_up_after + 1} attempts" if gave_up_after else ""
        if isinstance(exc, openai.APITimeoutError):
            return UserError(
                f"{which} to {self.base_url} timed out after {self.timeout:g} s{tries}; "
                f"allow a longer timeout or check the server's load"
            )
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return UserError(
                f"cannot reach {self.base_url}: {self._scrub(cause) or type(cause).__name__}{tries}; "
                f"start the server or fix --base-url"
            )
        status, said = exc.status_code, self._status(exc)
        if status == 401:  # the server's message may quote part of the key; say nothing of it
            return UserError(f"{self.base_url} rejected the API key (HTTP 401); check OPENAI_API_KEY")
        if status == 404:
            return UserError(
                f"{self.base_url} has no model {self.model!r} or no chat-completions endpoint "
                f"({said}); pick another --model or fix --base-url (it usually ends in /v1)"
            )
        if status == 429:
            return UserError(
                f"{self.base_url} is still rate-limiting {which}{tries} ({said}); "
                f"wait and rerun (finished answers are cached) or lower the concurrency"
            )
        if status >= 500:
            return UserError(
                f"{self.base_url} failed on {which}{tries} ({said}); rerun later (finished answers are cached)"
            )
        if status == 400 and _context_exceeded(exc):  # OpenAI's, vLLM's, llama.cpp's and our serve's code
            return UnusableAnswer(
                f"{which} is too long for {self.model}'s context at {self.base_url} ({said}); "
                "send less text per request"
            )
        return UserError(f"{self.base_url} refused {which} ({said}); check --model and the request settings")

    def _status(self, exc: openai.APIStatusError) -> str:
        """The status and the server's own message, key scrubbed, e.g. 'HTTP 429: slow down'."""
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else body
        if isinstance(message, str) and message.strip():
            return f"HTTP {exc.status_code}: {self._scrub(message)}"
        return f"HTTP {exc.status_code}"

    def _scrub(self, text: object) -> str:
        """A single line of `text` with the API key masked, for servers that echo it back."""
        return _one_line(str(text).replace(self._api_key, "***"))


def response_format(shape: JsonAnswer) -> dict:
    """Structured outputs for `shape`: one object with exactly its keys, in order, each a string. Strict
    mode (OpenAI's) takes only schemas whose every property is required and that forbid others."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {key: {"type": "string"} for key in shape.keys},
                "required": list(shape.keys),
                "additionalProperties": False,
            },
        },
    }


def _refuses_schema(exc: openai.APIStatusError) -> bool:
    """Whether the server refused a request because of its response_format: a 422 (servers that validate
    the body against a model without the field), or a 400 that says so. A context overflow is never one."""
    if exc.status_code == 422:
        return True
    if exc.status_code != 400 or _context_exceeded(exc):
        return False
    said = str(exc).lower()
    return any(
        words in said
        for words in (
            "response_format",
            "response format",
            "json_schema",
            "json schema",
            "structured output",
            "not supported",
        )
    )


def _context_exceeded(exc: openai.APIStatusError) -> bool:
    """Whether a 400 says the prompt plus max_tokens is more than the model's context."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    code = error.get("code") if isinstance(error, dict) else None
    return code == "context_length_exceeded" or "context length" in str(exc).lower()
