"""One small interface over every model that can write an explanation.

A backend answers a list of chat requests, in order. How it gets there (concurrent HTTP
requests, one batched generate call) is its own business; callers go through
`explainer.cache.complete_cached`, which skips everything already answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from explainer.errors import UserError


@dataclass(frozen=True)
class Request:
    messages: tuple  # ({"role": ..., "content": ...}, ...), hashable so it can key the cache
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.9
    seed: int = 0


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
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.requests} requests, {self.tokens_in} tokens in, {self.tokens_out} tokens out, "
                f"{self.cache_hits} cache hits")


class UnusableAnswer(UserError):
    """The model answered, but the answer can't be used: cut off at max_tokens, or empty.

    Callers that can recover (the translator retries smaller pieces) catch this one; an
    unreachable server or a bad key stays a plain UserError."""


class Backend(Protocol):
    name: str  # "openai" or "local": part of the cache key
    model: str  # model name or file: part of the cache key

    def complete(self, requests: list[Request],
                 on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Answer every request, in order. Call on_done(index, completion) as each one finishes
        so the caller can cache it at once. Raise explainer.errors.UserError on failure."""
        ...
