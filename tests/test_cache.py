"""The answer cache, driven through the real OpenAIBackend against a scripted server."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from scripted_server import Reply, user_text

from explainer.backends import Completion, Request, Usage
from explainer.backends.openai import OpenAIBackend
from explainer.cache import Cache, complete_cached, key_for, request_key
from explainer.errors import UserError

TEMPLATE = "Explain this {{ code_language }} code:\n{{ code }}"


def chunk_requests(count: int) -> list[Request]:
    return [
        Request(
            messages=({"role": "system", "content": "You explain code."}, {"role": "user", "content": f"chunk {i}"})
        )
        for i in range(count)
    ]


def answer(body) -> str:
    return f"answer to {user_text(body)}"


def backend_for(server, **settings) -> OpenAIBackend:
    return OpenAIBackend(model="test-model", base_url=server.base_url, backoff=0.001, **settings)


def test_a_second_identical_run_sends_nothing(scripted_server, openai_env, tmp_path):
    server = scripted_server(answer)
    backend, requests = backend_for(server), chunk_requests(4)

    first_usage, second_usage = Usage(), Usage()
    first = complete_cached(backend, requests, Cache(tmp_path), first_usage, [TEMPLATE] * 4)
    second = complete_cached(backend, requests, Cache(tmp_path), second_usage, [TEMPLATE] * 4)

    assert len(server.requests) == 4
    assert [c.text for c in first] == [c.text for c in second] == [f"answer to chunk {i}" for i in range(4)]
    assert (first_usage.requests, first_usage.cache_hits, first_usage.tokens_in, first_usage.tokens_out) == (
        4,
        0,
        40,
        16,
    )
    assert (second_usage.requests, second_usage.cache_hits, second_usage.tokens_in, second_usage.tokens_out) == (
        0,
        4,
        0,
        0,
    )


def test_no_cache_reads_and_writes_nothing(scripted_server, openai_env, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLAINER_CACHE_DIR", str(tmp_path / "default"))
    server = scripted_server(answer)
    backend, requests = backend_for(server), chunk_requests(2)

    for _ in range(2):
        usage = Usage()
        complete_cached(backend, requests, None, usage)
        assert (usage.requests, usage.cache_hits) == (2, 0)

    assert len(server.requests) == 4
    assert not (tmp_path / "default").exists()


def test_only_requests_not_yet_answered_are_sent(scripted_server, openai_env, tmp_path):
    server = scripted_server(answer)
    backend = backend_for(server)
    complete_cached(backend, chunk_requests(2), Cache(tmp_path), Usage())

    usage = Usage()
    completions = complete_cached(backend, chunk_requests(5), Cache(tmp_path), usage)

    assert sorted(user_text(body) for body in server.requests[2:]) == ["chunk 2", "chunk 3", "chunk 4"]
    assert [c.text for c in completions] == [f"answer to chunk {i}" for i in range(5)]
    assert (usage.requests, usage.cache_hits) == (3, 2)


def test_identical_requests_in_one_run_are_sent_once(scripted_server, openai_env):
    server = scripted_server(answer)
    requests = chunk_requests(1) * 3
    delivered = []

    usage = Usage()
    completions = complete_cached(
        backend_for(server), requests, None, usage, on_done=lambda index, completion: delivered.append(index)
    )

    assert len(server.requests) == 1 and usage.requests == 1
    assert [c.text for c in completions] == ["answer to chunk 0"] * 3
    assert sorted(delivered) == [0, 1, 2]


def test_on_done_reports_every_request_once_hits_included(scripted_server, openai_env, tmp_path):
    server = scripted_server(answer)
    backend = backend_for(server)
    complete_cached(backend, chunk_requests(2), Cache(tmp_path), Usage())
    delivered = {}

    complete_cached(
        backend,
        chunk_requests(4),
        Cache(tmp_path),
        Usage(),
        on_done=lambda index, completion: delivered.setdefault(index, completion.text),
    )

    assert delivered == {i: f"answer to chunk {i}" for i in range(4)}


def test_key_changes_with_everything_that_changes_the_answer():
    request = chunk_requests(1)[0]
    base = request_key("openai", "gpt-4o-mini", request, TEMPLATE)
    other_messages = (request.messages[0], {"role": "user", "content": "chunk 1"})
    variants = [
        request_key("local", "gpt-4o-mini", request, TEMPLATE),
        request_key("openai", "gpt-4o", request, TEMPLATE),
        request_key("openai", "gpt-4o-mini", request, TEMPLATE + " Be brief."),
        request_key("openai", "gpt-4o-mini", Request(messages=other_messages), TEMPLATE),
        request_key("openai", "gpt-4o-mini", Request(request.messages, temperature=0.9), TEMPLATE),
        request_key("openai", "gpt-4o-mini", Request(request.messages, max_tokens=1024), TEMPLATE),
        request_key("openai", "gpt-4o-mini", Request(request.messages, top_p=1.0), TEMPLATE),
        request_key("openai", "gpt-4o-mini", Request(request.messages, seed=1), TEMPLATE),
        # another server may serve another model under the same name
        request_key("openai", "gpt-4o-mini", request, TEMPLATE, endpoint="http://127.0.0.1:8000/v1"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    # Equal content, built separately, gives the same key: the key is content, not identity.
    rebuilt = Request(messages=tuple(dict(m) for m in request.messages))
    assert request_key("openai", "gpt-4o-mini", rebuilt, TEMPLATE) == base


def test_the_api_key_is_never_written_to_the_cache(scripted_server, tmp_path):
    server = scripted_server(answer)
    secret = "sk-live-0123456789abcdef"
    backend = OpenAIBackend(model="test-model", base_url=server.base_url, api_key=secret)

    complete_cached(backend, chunk_requests(3), Cache(tmp_path), Usage())

    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert b"answer to chunk 2" in stored  # the answers are there, so these are the right files
    assert secret.encode() not in stored and b"0123456789abcdef" not in stored


def test_the_cache_uses_write_ahead_logging(tmp_path):
    Cache(tmp_path).put("k", Completion("text", "stop", 1, 2))

    with sqlite3.connect(tmp_path / "answers.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Cache(tmp_path).get("k") == Completion("text", "stop", 1, 2)
    assert Cache(tmp_path).get("other") is None


def test_each_answer_is_committed_before_the_next_request_and_survives_a_failure(scripted_server, openai_env, tmp_path):
    requests = chunk_requests(5)
    committed_before = {}
    failing = threading.Event()
    failing.set()

    def script(body):
        i = int(user_text(body).split()[-1])
        if i > 0:  # look through a connection of our own: only committed rows are visible there
            committed_before[i] = Cache(tmp_path).get(keys[i - 1]) is not None
        if i == 2 and failing.is_set():
            return Reply("this chunk is not welcome", status=400)
        return answer(body)

    server = scripted_server(script)
    backend = backend_for(server, concurrency=1)
    keys = [key_for(backend, request) for request in requests]

    with pytest.raises(UserError):
        complete_cached(backend, requests, Cache(tmp_path), Usage())

    assert committed_before == {1: True, 2: True}
    saved = Cache(tmp_path)
    assert [saved.get(key) is not None for key in keys] == [True, True, False, False, False]

    failing.clear()
    sent_before = len(server.requests)
    usage = Usage()
    completions = complete_cached(backend, requests, Cache(tmp_path), usage)

    assert [user_text(body) for body in server.requests[sent_before:]] == ["chunk 2", "chunk 3", "chunk 4"]
    assert (usage.requests, usage.cache_hits) == (3, 2)
    assert [c.text for c in completions] == [f"answer to chunk {i}" for i in range(5)]


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EXPLAINER_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert Cache().path == tmp_path / "home" / ".cache" / "llama-explainer" / "answers.sqlite"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    assert Cache().path == tmp_path / "home" / ".cache" / "llama-explainer" / "answers.sqlite"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Cache().path == tmp_path / "xdg" / "llama-explainer" / "answers.sqlite"

    monkeypatch.setenv("EXPLAINER_CACHE_DIR", str(tmp_path / "chosen"))
    assert Cache().path == tmp_path / "chosen" / "answers.sqlite"
    assert Cache(tmp_path / "flag").path == tmp_path / "flag" / "answers.sqlite"


def test_an_unusable_cache_directory_is_one_clear_line(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    with pytest.raises(UserError) as error:
        Cache(not_a_directory)

    message = str(error.value)
    assert "\n" not in message and str(not_a_directory) in message and "--no-cache" in message


def test_a_cache_file_that_is_not_a_database_is_one_clear_line(tmp_path):
    (tmp_path / "answers.sqlite").write_bytes(b"this is not sqlite " * 100)

    with pytest.raises(UserError) as error:
        Cache(tmp_path)

    assert "answers.sqlite" in str(error.value) and "\n" not in str(error.value)


def test_concurrent_answers_are_all_stored(scripted_server, openai_env, tmp_path):
    server = scripted_server(answer)
    requests = chunk_requests(16)

    backend = backend_for(server, concurrency=8)
    complete_cached(backend, requests, Cache(tmp_path), Usage())

    saved = Cache(tmp_path)
    assert [saved.get(key_for(backend, r)).text for r in requests] == [f"answer to chunk {i}" for i in range(16)]
