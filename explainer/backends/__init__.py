"""One small interface over every model that can write an explanation, and the registry of backends.

A backend answers a list of chat requests, in order. How it gets there (concurrent HTTP
requests, one batched generate call) is its own business; callers go through
`explainer.cache.complete_cached`, which skips everything already answered.

Adding a backend is one module with a `from_settings(BackendSettings)` factory, plus one
`register(BackendKind(...))` entry below: the CLI's --backend choices, explainer.toml's
[backend] name, the default rule and the capability checks all read BACKENDS.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from explainer.errors import UserError
from llama_ref.constrain import JsonFields

# An answer that is one JSON object of one-line strings with these keys, each holding its markers exactly
# once: llama_ref.constrain's shape (it imports no torch). A backend enforces what it can: the local one
# all of it (constrained decoding), the openai one the object and its keys (a JSON schema, where the
# server takes one). Callers check the answer anyway.
JsonAnswer = JsonFields


@dataclass(frozen=True)
class Request:
    messages: tuple  # ({"role": ..., "content": ...}, ...), hashable so it can key the cache
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    seed: int = 0
    json_answer: JsonAnswer | None = None  # the answer's shape, where the caller parses one


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop"; a backend raises instead of returning "length"
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass
class Usage:
    requests: int = 0  # calls that reached the model
    cache_hits: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    retried: int = 0  # translated segments asked again because an answer failed a check
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.tokens_in} tokens in, {self.tokens_out} tokens out, "
            f"{self.cache_hits} cache hits" + (f", {self.retried} segment(s) asked again" if self.retried else "")
        )


class UnusableAnswer(UserError):
    """The model answered, but the answer can't be used: cut off (at max_tokens or where the model's
    context ends), empty, or a request too long for the model's context to leave room for one.

    Callers that can recover (the translator retries smaller pieces) catch this one; an
    unreachable server or a bad key stays a plain UserError. `reasons` maps the index of each
    unusable request of the call to what was wrong with its answer (the message names the first)."""

    def __init__(self, message: str, reasons: dict[int, str] | None = None):
        super().__init__(message)
        self.reasons = dict(reasons or {})


class Backend(Protocol):
    name: str  # "openai" or "local": part of the cache key
    model: str  # model name or file: part of the cache key

    def complete(
        self, requests: list[Request], on_done: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]:
        """Answer every request, in order. Call on_done(index, completion) as each one finishes
        so the caller can cache it at once.

        The error contract, the same for every backend: an answer the model got wrong (cut off, empty,
        or no room in the context for one) raises UnusableAnswer, and only after every other request
        has been answered and has reached on_done, so the caller can retry that one smaller or
        firmer. max_tokens is a ceiling: a backend that knows its context may answer in fewer. Any
        other failure (unreachable, bad key, broken model file) is a plain UserError and may stop
        the requests not yet started."""
        ...


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class BackendSettings:
    """What a user chooses for a backend, by flags or in explainer.toml's [backend]; None: the default."""

    name: str | None = None  # None: default_backend_name()
    model: str | None = None
    base_url: str | None = None
    concurrency: int | None = None  # requests in flight per call, for backends that send them out
    batch_size: int | None = None  # prompts run together, for backends that run the model here


@dataclass(frozen=True)
class BackendKind:
    """One registered backend: its name, how to make it, what it takes and what it can do."""

    name: str
    summary: str  # one line, for --help
    factory: str  # "module:function", function(BackendSettings) -> Backend; imported only when chosen
    settings: frozenset[str] = frozenset({"model"})  # the BackendSettings fields it takes, besides name
    batches_locally: bool = False  # runs the model in this process: one call at a time, batched inside
    model_files: bool = False  # its model may be a file here: explainer.toml's model path is relative to the file


BACKENDS: dict[str, BackendKind] = {}


def register(kind: BackendKind) -> BackendKind:
    BACKENDS[kind.name] = kind
    return kind


register(
    BackendKind(
        "openai",
        "any OpenAI-compatible API",
        "explainer.backends.openai:from_settings",
        frozenset({"model", "base_url", "concurrency"}),
    )
)
register(
    BackendKind(
        "local",
        "the bundled llama_ref model, on this machine",
        "explainer.backends.local:from_settings",
        frozenset({"model", "batch_size"}),
        batches_locally=True,
        model_files=True,
    )
)

_FLAGS = {"base_url": "--base-url / base_url", "concurrency": "concurrency", "batch_size": "batch_size"}


def backend_help() -> str:
    """The backends and the default rule, for --help."""
    listed = "; ".join(f"{kind.name}: {kind.summary}" for kind in BACKENDS.values())
    return f"{listed} [default: openai if OPENAI_API_KEY or a server is set, else local]."


def default_backend_name(base_url: str | None = None) -> str:
    """openai when a key or a server is configured (flag or environment), else the local model."""
    if base_url or os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        return "openai"
    return "local"


def backend_kind(name: str, where: str = "--backend") -> BackendKind:
    """The registered backend called `name`; an unknown name is a UserError listing the known ones."""
    if name not in BACKENDS:
        raise UserError(f"{where}: unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def capabilities(backend: Backend) -> BackendKind | None:
    """What the backend object can do (None for one that is not registered, e.g. a test's stand-in)."""
    return BACKENDS.get(backend.name)


def make_backend(settings: BackendSettings, where: str = "--backend") -> Backend:
    """The backend `settings` ask for. Nothing loads a model or connects before the first request."""
    kind = backend_kind(settings.name or default_backend_name(settings.base_url), where)
    for name, flag in _FLAGS.items():
        if getattr(settings, name) is not None and name not in kind.settings:
            users = [k.name for k in BACKENDS.values() if name in k.settings]
            raise UserError(
                f"{flag} is for the {' and '.join(users)} backend; leave it out with the {kind.name} backend"
            )
    module, function = kind.factory.split(":")
    return getattr(importlib.import_module(module), function)(settings)
