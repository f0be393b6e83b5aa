"""OpenAIBackend through the real openai SDK against a scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import email.utils
import socket
import threading
import time

import pytest
from scripted_server import Reply, user_text

from explainer.backends import JsonAnswer, Request, UnusableAnswer
from explainer.backends.openai import DEFAULT_MODEL, OpenAIBackend, retry_delay
from explainer.errors import UserError

KEY = "sk-test-not-a-real-key"  # what the openai_env fixture exports


def chunk_requests(count: int) -> list[Request]:
    return [
        Request(
            messages=({"role": "system", "content": "You explain code."}, {"role": "user", "content": f"chunk {i}"})
        )
        for i in range(count)
    ]


def backend_for(server, **settings) -> OpenAIBackend:
    settings.setdefault("backoff", 0.001)
    return OpenAIBackend(model="test-model", base_url=server.base_url, **settings)


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_each_request_is_sent_once_with_its_settings_and_answered_in_order(scripted_server, openai_env):
    server = scripted_server(lambda body: f"answer to {user_text(body)}")
    requests = chunk_requests(5)
    requests[3] = Request(messages=requests[3].messages, max_tokens=77, temperature=0.7, top_p=0.5, seed=42)

    completions = backend_for(server).complete(requests)

    assert [c.text for c in completions] == [f"answer to chunk {i}" for i in range(5)]
    assert [(c.tokens_in, c.tokens_out) for c in completions] == [(10, 4)] * 5
    assert len(server.requests) == 5
    sent = {user_text(body): body for body in server.requests}
    assert sent["chunk 3"]["model"] == "test-model"
    assert sent["chunk 3"]["messages"] == list(requests[3].messages)
    assert (
        sent["chunk 3"]["max_tokens"],
        sent["chunk 3"]["temperature"],
        sent["chunk 3"]["top_p"],
        sent["chunk 3"]["seed"],
    ) == (77, 0.7, 0.5, 42)


def test_answers_stay_with_their_requests_when_the_server_answers_in_reverse(scripted_server, openai_env):
    count = 4
    answered = [threading.Event() for _ in range(count)]

    def script(body):
        i = int(user_text(body).split()[-1])
        # Hold each answer until the client has received the next request's answer.
        if i + 1 < count and not answered[i + 1].wait(timeout=10):
            return Reply("request was never answered", status=400)
        return f"answer to chunk {i}"

    server = scripted_server(script)
    arrival_order = []

    def on_done(index, completion):
        arrival_order.append(index)
        answered[index].set()

    completions = backend_for(server, concurrency=count).complete(chunk_requests(count), on_done=on_done)

    assert arrival_order == [3, 2, 1, 0]
    assert [c.text for c in completions] == [f"answer to chunk {i}" for i in range(count)]


def test_never_more_requests_in_flight_than_the_concurrency_allows(scripted_server, openai_env):
    limit = 3
    # Each request waits for two others to arrive, so a serial client fails the test (the barrier
    # breaks) and an unlimited one shows more than `limit` in flight.
    barrier = threading.Barrier(limit, timeout=10)
    lock = threading.Lock()
    in_flight, most = 0, 0

    def script(body):
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            barrier.wait()
            return "ok"
        except threading.BrokenBarrierError:
            return Reply("fewer requests in flight than expected", status=400)
        finally:
            with lock:
                in_flight -= 1

    server = scripted_server(script)
    completions = backend_for(server, concurrency=limit).complete(chunk_requests(3 * limit))

    assert [c.text for c in completions] == ["ok"] * (3 * limit)
    assert most == limit
    assert len(server.requests) == 3 * limit


def fail_first_then_answer(first: Reply):
    """A script that answers each distinct request with `first` once, then normally."""
    seen = set()
    lock = threading.Lock()

    def script(body):
        with lock:
            fresh = user_text(body) not in seen
            seen.add(user_text(body))
        return first if fresh else f"answer to {user_text(body)}"

    return script


@pytest.mark.parametrize(
    "headers, logged_wait", [({"Retry-After": "0"}, "in 0 s"), ({"retry-after-ms": "5"}, "in 0.005 s")]
)
def test_rate_limit_is_retried_after_the_wait_the_server_asks_for(
    scripted_server, openai_env, caplog, headers, logged_wait
):
    server = scripted_server(fail_first_then_answer(Reply("slow down", status=429, headers=headers)))
    # A backoff of a minute: only honouring the server's header makes the retry come at once.
    completions = backend_for(server, backoff=60.0).complete(chunk_requests(1))

    assert [c.text for c in completions] == ["answer to chunk 0"]
    assert len(server.requests) == 2
    assert any("HTTP 429" in r.message and f"retry 1 of 5 {logged_wait}" in r.message for r in caplog.records)


def test_server_error_is_retried_with_backoff(scripted_server, openai_env):
    server = scripted_server(fail_first_then_answer(Reply("overloaded", status=500)))

    completions = backend_for(server).complete(chunk_requests(2))

    assert [c.text for c in completions] == ["answer to chunk 0", "answer to chunk 1"]
    assert len(server.requests) == 4


def test_gives_up_with_one_line_after_the_last_retry(scripted_server, openai_env):
    server = scripted_server(lambda body: Reply("try again later", status=503, headers={"Retry-After": "0"}))

    with pytest.raises(UserError) as error:
        backend_for(server, max_retries=2).complete(chunk_requests(1))

    message = assert_one_line(error)
    assert len(server.requests) == 3
    assert server.base_url in message and "HTTP 503" in message and "try again later" in message


def test_a_wait_longer_than_two_minutes_is_reported_not_slept(scripted_server, openai_env):
    server = scripted_server(lambda body: Reply("quota exceeded", status=429, headers={"Retry-After": "3600"}))

    with pytest.raises(UserError) as error:
        backend_for(server).complete(chunk_requests(1))

    assert "3600 s" in assert_one_line(error)
    assert len(server.requests) == 1


def test_an_answer_cut_off_at_max_tokens_is_an_error(scripted_server, openai_env):
    server = scripted_server(lambda body: Reply("The loop starts by", finish_reason="length"))

    with pytest.raises(UnusableAnswer) as error:
        backend_for(server).complete(chunk_requests(2))

    message = assert_one_line(error)
    assert "request 1 of 2" in message and "max_tokens=512" in message and "1 other request" in message
    assert sorted(error.value.reasons) == [0, 1]  # each request's own reason, for a caller that retries it
    assert "request 2 of 2" in error.value.reasons[1] and "max_tokens=512" in error.value.reasons[1]


def test_one_unusable_answer_does_not_stop_the_other_requests(scripted_server, openai_env):
    """As with the local backend: a cut-off answer is raised only once every other request is answered,
    so the caller asks again for that one only."""
    server = scripted_server(
        lambda body: (
            Reply("The loop starts by", finish_reason="length")
            if user_text(body) == "chunk 0"
            else f"answer to {user_text(body)}"
        )
    )
    arrived = {}

    with pytest.raises(UnusableAnswer, match="request 1 of 6"):
        backend_for(server, concurrency=2).complete(
            chunk_requests(6), on_done=lambda i, c: arrived.__setitem__(i, c.text)
        )

    assert arrived == {i: f"answer to chunk {i}" for i in range(1, 6)}
    assert len(server.requests) == 6


def test_a_request_too_long_for_the_servers_context_is_an_unusable_answer(scripted_server, openai_env):
    """vLLM, llama.cpp's server and OpenAI word it differently; each says "context length" (OpenAI and our
    serve also send code context_length_exceeded). It is the request's size, not the server: the caller
    may split it."""
    server = scripted_server(
        lambda body: (
            Reply("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.", status=400)
            if user_text(body) == "chunk 1"
            else f"answer to {user_text(body)}"
        )
    )

    with pytest.raises(UnusableAnswer) as error:
        backend_for(server).complete(chunk_requests(3))

    message = assert_one_line(error)
    assert "request 2 of 3" in message and "too long" in message
    assert len(server.requests) == 3  # the others were answered; a 400 is not retried


def test_an_empty_answer_is_an_error(scripted_server, openai_env):
    server = scripted_server(lambda body: Reply("  \n"))

    with pytest.raises(UserError) as error:
        backend_for(server).complete(chunk_requests(1))

    assert "empty answer" in assert_one_line(error)


def test_a_rejected_key_is_reported_without_the_key(scripted_server, openai_env):
    server = scripted_server(lambda body: Reply(f"Incorrect API key provided: {KEY}", status=401))

    with pytest.raises(UserError) as error:
        backend_for(server).complete(chunk_requests(1))

    message = assert_one_line(error)
    assert "401" in message and "OPENAI_API_KEY" in message
    assert KEY not in message and KEY[:8] not in message
    assert len(server.requests) == 1  # a wrong key does not get better by retrying


def test_an_unknown_model_is_reported_with_its_name(scripted_server, openai_env):
    server = scripted_server(lambda body: Reply("The model `test-model` does not exist", status=404))

    with pytest.raises(UserError) as error:
        backend_for(server).complete(chunk_requests(1))

    message = assert_one_line(error)
    assert "'test-model'" in message and "--model" in message


def test_a_server_that_is_down_is_reported_with_its_url(openai_env):
    with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"

    with pytest.raises(UserError) as error:
        OpenAIBackend(base_url=base_url, max_retries=1, backoff=0.001).complete(chunk_requests(1))

    message = assert_one_line(error)
    assert f"cannot reach {base_url}" in message and "--base-url" in message


def test_a_request_that_takes_too_long_times_out(scripted_server, openai_env):
    release = threading.Event()
    server = scripted_server(lambda body: "late" if release.wait(timeout=10) else "never released")
    try:
        with pytest.raises(UserError) as error:
            backend_for(server, timeout=0.2, max_retries=0).complete(chunk_requests(1))
    finally:
        release.set()

    assert "timed out after 0.2 s" in assert_one_line(error)


def test_a_missing_key_is_a_user_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    with pytest.raises(UserError) as error:
        OpenAIBackend()

    assert "OPENAI_API_KEY is not set" in assert_one_line(error)


def test_a_server_given_by_url_needs_no_key(scripted_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = scripted_server(lambda body: "fine")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)

    backend = OpenAIBackend()

    assert backend.model == DEFAULT_MODEL
    assert [c.text for c in backend.complete(chunk_requests(1))] == ["fine"]


def shaped_requests(count: int, keys: tuple[str, ...] = ("1", "2")) -> list[Request]:
    """Requests whose answer is one JSON object with `keys`, as the translator asks."""
    shape = JsonAnswer(keys=keys, markers=tuple(() for _ in keys))
    return [Request(messages=request.messages, json_answer=shape) for request in chunk_requests(count)]


PLAIN_FIELDS = {"model", "messages", "max_tokens", "temperature", "top_p", "seed"}  # what every request sends


def schema_refused(body):
    """A server without structured outputs that says so, as vLLM-likes and older OpenAI models do."""
    if "response_format" in body:
        return Reply("response_format is not supported", status=400)
    return f'{{"1": "answer to {user_text(body)}", "2": "more"}}'


def test_a_shaped_answer_asks_for_its_json_schema_and_a_plain_one_asks_for_nothing_new(scripted_server, openai_env):
    server = scripted_server(lambda body: f"answer to {user_text(body)}")
    requests = chunk_requests(2) + shaped_requests(1, keys=("2", "1", "title"))

    completions = backend_for(server).complete(requests)

    assert [c.text for c in completions] == ["answer to chunk 0", "answer to chunk 1", "answer to chunk 0"]
    plain = [body for body in server.requests if "response_format" not in body]
    shaped = [body for body in server.requests if "response_format" in body]
    assert len(plain) == 2 and all(set(body) == PLAIN_FIELDS for body in plain)
    assert len(shaped) == 1 and set(shaped[0]) == PLAIN_FIELDS | {"response_format"}
    assert shaped[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"2": {"type": "string"}, "1": {"type": "string"}, "title": {"type": "string"}},
                "required": ["2", "1", "title"],
                "additionalProperties": False,
            },
        },
    }
    assert list(shaped[0]["response_format"]["json_schema"]["schema"]["properties"]) == ["2", "1", "title"]


def test_a_server_that_refuses_the_schema_is_asked_again_without_it_once_and_for_all(
    scripted_server, openai_env, caplog
):
    server = scripted_server(schema_refused)
    backend = backend_for(server)

    first = backend.complete(shaped_requests(1))
    second = backend.complete(shaped_requests(2))

    assert [c.text for c in first + second] == [f'{{"1": "answer to chunk {i}", "2": "more"}}' for i in (0, 0, 1)]
    assert ["response_format" in body for body in server.requests] == [True, False, False, False]
    assert server.requests[1] == {
        name: value for name, value in server.requests[0].items() if name != "response_format"
    }
    warnings = [r.message for r in caplog.records if "JSON schema" in r.message]
    assert len(warnings) == 1 and "response_format is not supported" in warnings[0]


def test_requests_in_flight_when_the_schema_is_refused_all_get_answers_and_one_warning(
    scripted_server, openai_env, caplog
):
    count = 4
    barrier = threading.Barrier(count, timeout=10)  # all four are sent with the schema before any refusal

    def script(body):
        if "response_format" in body:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return Reply("fewer requests in flight than expected", status=500)
        return schema_refused(body)

    server = scripted_server(script)
    backend = backend_for(server, concurrency=count, max_retries=0)

    completions = backend.complete(shaped_requests(count))
    backend.complete(shaped_requests(1))

    assert [c.text for c in completions] == [f'{{"1": "answer to chunk {i}", "2": "more"}}' for i in range(count)]
    assert sum("response_format" in body for body in server.requests) == count
    assert len(server.requests) == 2 * count + 1
    assert len([r for r in caplog.records if "JSON schema" in r.message]) == 1


def test_a_422_for_the_schema_falls_back_too(scripted_server, openai_env):
    server = scripted_server(
        lambda body: Reply("Unprocessable Entity", status=422) if "response_format" in body else "fine"
    )

    assert [c.text for c in backend_for(server).complete(shaped_requests(1))] == ["fine"]
    assert ["response_format" in body for body in server.requests] == [True, False]


@pytest.mark.parametrize(
    "reply, error",
    [
        (
            Reply(
                "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
                status=400,
                code="context_length_exceeded",
            ),
            UnusableAnswer,
        ),
        (Reply("Invalid value for 'temperature': must be at most 2", status=400), UserError),
    ],
)
def test_another_400_for_a_shaped_answer_keeps_its_meaning_and_is_not_sent_again(
    scripted_server, openai_env, caplog, reply, error
):
    server = scripted_server(lambda body: reply)
    backend = backend_for(server)

    with pytest.raises(error) as raised:
        backend.complete(shaped_requests(1))
    with pytest.raises(error):  # and the next request still asks for the schema
        backend.complete(shaped_requests(1))

    if error is UnusableAnswer:
        assert "too long" in assert_one_line(raised)
    else:
        assert type(raised.value) is UserError and "refused request 1 of 1" in assert_one_line(raised)
    assert ["response_format" in body for body in server.requests] == [True, True]
    assert not [r for r in caplog.records if "JSON schema" in r.message]


def test_retry_delay_follows_the_server_then_backs_off_exponentially():
    in_ten_seconds = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= retry_delay(0, {"Retry-After": in_ten_seconds}, backoff=1.0) <= 10
    assert retry_delay(4, {"retry-after-ms": "250", "Retry-After": "7"}, backoff=1.0) == 0.25
    assert retry_delay(4, {"Retry-After": "7"}, backoff=1.0) == 7.0
    for retry in range(4):  # jitter takes off at most a quarter of the doubling delay
        assert 0.75 * 2**retry <= retry_delay(retry, {}, backoff=1.0) <= 2**retry
    assert retry_delay(20, {}, backoff=1.0) <= 30.0
