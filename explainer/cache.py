"""Content-addressed answers in SQLite, so a rerun pays only for what changed.

The key is a hash of everything that changes an answer (backend, model and, for a local one, its
content, dtype and kernels; prompt template, messages, sampling settings) and of nothing else: never
the API key. Each answer is committed the moment it arrives, so an interrupted or failed run keeps
every answer it paid for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from explainer.backends import Backend, Completion, Request, UnusableAnswer, Usage
from explainer.errors import UserError
from explainer.fileio import check_inside

KEY_VERSION = 1  # bump when the key's recipe changes, so old answers are not mistaken for new ones
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")  # files SQLite writes beside a database


def default_cache_dir() -> Path:
    """EXPLAINER_CACHE_DIR, else llama-explainer/ under XDG_CACHE_HOME, else under ~/.cache."""
    if os.environ.get("EXPLAINER_CACHE_DIR"):
        return Path(os.environ["EXPLAINER_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG Base Directory spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "llama-explainer"


class Cache:
    """answers.sqlite in `directory` (default_cache_dir() when None). Safe to share between
    threads (one connection behind a lock) and between processes (WAL mode, busy timeout).
    `inside`: a folder the database and SQLite's files beside it must not lead out of through a
    symlink (fileio.check_inside), for a cache in a folder someone else made."""

    def __init__(self, directory: Path | str | None = None, *, inside: Path | None = None):
        self.path = Path(directory or default_cache_dir()).expanduser() / "answers.sqlite"
        self._lock = threading.Lock()
        if inside is not None:
            for path in (self.path, *(self.path.with_name(self.path.name + end) for end in SQLITE_COMPANIONS)):
                check_inside(path, inside)
        with self._database_errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit (isolation_level=None): every put is its own committed transaction.
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                "finish_reason TEXT NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL)"
            )

    def get(self, key: str) -> Completion | None:
        with self._lock, self._database_errors():
            row = self._db.execute(
                "SELECT text, finish_reason, tokens_in, tokens_out FROM answers WHERE key = ?", (key,)
            ).fetchone()
        return Completion(*row) if row else None

    def put(self, key: str, completion: Completion) -> None:
        with self._lock, self._database_errors():
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                (key, completion.text, completion.finish_reason, completion.tokens_in, completion.tokens_out),
            )

    @contextlib.contextmanager
    def _database_errors(self):
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise UserError(
                f"cannot use the answer cache {self.path}: {exc}; "
                f"fix --cache-dir or EXPLAINER_CACHE_DIR, or run with --no-cache"
            ) from None


def request_key(
    backend_name: str,
    model: str,
    request: Request,
    template_text: str = "",
    endpoint: str | None = None,
    identity: str | None = None,
) -> str:
    """sha256 of a canonical JSON of everything that changes the answer to `request`.

    Every field of Request takes part, so a sampling setting added later cannot be forgotten here; a
    field left at None (at any depth) is left out, so adding an optional field keeps the keys of answers
    cached before.
    `endpoint` is the server a remote backend asks (its base URL): two servers may serve different
    models under one name. The local backend has none, and its keys leave it out.
    `identity` is what a backend that runs the model here knows of it beyond its name: its content, and
    the settings that change its numbers (LocalBackend.cache_identity).
    """
    recipe = {
        "version": KEY_VERSION,
        "backend": backend_name,
        "model": model,
        "template": template_text,
        "request": _without_none(dataclasses.asdict(request)),
    }
    if endpoint is not None:
        recipe["endpoint"] = endpoint
    if identity is not None:
        recipe["identity"] = identity
    canonical = json.dumps(recipe, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _without_none(value):
    """`value` with every dict entry that is None left out, at any depth (Request.json_answer is a dict too)."""
    if isinstance(value, dict):
        return {name: _without_none(item) for name, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(item) for item in value]
    return value


def key_for(backend: Backend, request: Request, template_text: str = "") -> str:
    """The cache key of `request` sent to `backend` (its name, model and, if remote, its base URL; if local,
    its model's content identity)."""
    return request_key(
        backend.name,
        backend.model,
        request,
        template_text,
        getattr(backend, "base_url", None),
        getattr(backend, "cache_identity", None),
    )


def complete_cached(
    backend: Backend,
    requests: list[Request],
    cache: Cache | None,
    usage: Usage,
    template_texts: list[str] | None = None,
    on_done: Callable[[int, Completion], None] | None = None,
    unusable: Callable[[Completion], str | None] | None = None,
) -> list[Completion]:
    """Answer `requests` in order, asking `backend` only for answers not in `cache`.

    All misses go to the backend in one call, so it can batch or parallelise them; identical
    requests are sent once. Each answer is stored as it arrives. `cache=None` (--no-cache) reads
    and writes nothing. `usage` counts requests sent, cache hits and tokens spent in this run.
    on_done(index, completion) is called once per request, hits included, never two at a time.

    unusable(completion): why the caller cannot use an answer (None: it can). Such an answer is
    neither cached nor delivered; a cached one is asked again. Once every other answer has arrived,
    UnusableAnswer names them, as the backends' error contract does for a cut-off answer.
    """
    if template_texts is None:
        template_texts = [""] * len(requests)
    if len(template_texts) != len(requests):
        raise ValueError(f"{len(template_texts)} template texts for {len(requests)} requests")
    keys = [key_for(backend, request, template) for request, template in zip(requests, template_texts)]
    results: list[Completion | None] = [None] * len(requests)
    lock = threading.Lock()  # backends may call back from worker threads

    def deliver(index: int, completion: Completion) -> None:
        results[index] = completion
        if on_done is not None:
            on_done(index, completion)

    misses: dict[str, list[int]] = {}  # key -> indices of the requests that share it
    for index, key in enumerate(keys):
        hit = cache.get(key) if cache is not None and key not in misses else None
        if hit is not None and (unusable is None or unusable(hit) is None):
            usage.cache_hits += 1
            deliver(index, hit)
        else:
            misses.setdefault(key, []).append(index)
    if not misses:
        return results
    miss_keys = list(misses)
    refused: dict[int, str] = {}  # request index -> why its answer is unusable

    def arrived(miss_index: int, completion: Completion) -> None:
        key = miss_keys[miss_index]
        why = unusable(completion) if unusable is not None else None
        if why is None and cache is not None:
            cache.put(key, completion)
        with lock:
            usage.requests += 1
            usage.tokens_in += completion.tokens_in
            usage.tokens_out += completion.tokens_out
            for index in misses[key]:
                if why is None:
                    deliver(index, completion)
                else:
                    refused[index] = why

    try:
        answers = backend.complete([requests[misses[key][0]] for key in miss_keys], on_done=arrived)
    except UnusableAnswer as error:
        # the backend's reasons are by its own request list, the misses
        by_request = {
            index: why for miss_index, why in error.reasons.items() for index in misses[miss_keys[miss_index]]
        }
        refused.update(by_request or {index: str(error) for index, result in enumerate(results) if result is None})
    else:
        for key, answer in zip(miss_keys, answers):  # the returned list is authoritative
            for index in misses[key]:
                if index not in refused:
                    results[index] = answer
    if refused:
        first = min(refused)
        others = f" (and {len(refused) - 1} other request(s) of this call)" if len(refused) > 1 else ""
        raise UnusableAnswer(refused[first] + others, refused)
    return results
