"""llama_ref's server under load: 32 clients for 30 s, valid requests (the official openai SDK, streamed and
not) mixed with broken ones (raw sockets) and clients that go away mid-answer. Every valid request is
answered, every broken one gets its 4xx, the server stays up and its memory stays bounded. The test prints
the requests per second it saw. Then 8 clients among 64 slow sockets: every request of theirs is answered.
"""

import collections
import http.client
import json
import random
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
from test_serve_limits import KEY, drop, post

from llama_ref.serve import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS

pytestmark = pytest.mark.slow

DURATION_S = 30.0  # clients start requests until then; the ones under way finish
CLIENTS = 32
STALLERS = 4  # of the clients, those that also send half a body and wait out the server's body deadline
# how long the server waits on a silent socket: longer than the keep-alive expiry of httpx (the SDK's HTTP
# client, 5 s), so that the SDK never sends a request on a connection the server is closing at that moment
SERVER_TIMEOUT_S = 6.0
MAX_RSS_GROWTH = 500 << 20
QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "Say hello in French.",
    "What is the capital of Italy?",
    "Write a haiku about rain.",
    "Explain recursion in one sentence.",
]


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server(
        max_seq_len=256,
        max_batch_size=8,
        api_key=KEY,
        timeout=SERVER_TIMEOUT_S,
        header_timeout=SERVER_TIMEOUT_S,
        body_timeout=SERVER_TIMEOUT_S,
    )


# ------------------------------------------------------------------------- valid requests: the SDK


def sampling(rng: random.Random) -> dict:
    max_tokens = rng.randint(8, 16)
    if rng.random() < 0.5:
        return {"max_tokens": max_tokens, "temperature": 0}
    return {"max_tokens": max_tokens, "temperature": 0.8, "seed": rng.randrange(1000)}


def check_ending(finish_reason: str, completion_tokens: int, max_tokens: int) -> None:
    assert finish_reason in ("stop", "length"), finish_reason
    assert completion_tokens == max_tokens if finish_reason == "length" else completion_tokens < max_tokens


def chat(server, sdk, rng):
    options = sampling(rng)
    answer = sdk.chat.completions.create(
        model=server.model_name, **options, messages=[{"role": "user", "content": rng.choice(QUESTIONS)}]
    )
    assert answer.object == "chat.completion" and isinstance(answer.choices[0].message.content, str)
    check_ending(answer.choices[0].finish_reason, answer.usage.completion_tokens, options["max_tokens"])


def chat_streamed(server, sdk, rng):
    options = sampling(rng)
    chunks = list(
        sdk.chat.completions.create(
            model=server.model_name,
            **options,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": rng.choice(QUESTIONS)}],
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finish_reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert set(finish_reasons[:-1]) == {None}
    assert all(isinstance(chunk.choices[0].delta.content, str) for chunk in chunks[1:-2])
    check_ending(finish_reasons[-1], chunks[-1].usage.completion_tokens, options["max_tokens"])


def completion(server, sdk, rng):
    options = sampling(rng)
    answer = sdk.completions.create(model=server.model_name, prompt=rng.choice(QUESTIONS), **options)
    assert answer.object == "text_completion" and isinstance(answer.choices[0].text, str)
    check_ending(answer.choices[0].finish_reason, answer.usage.completion_tokens, options["max_tokens"])


# ---------------------------------------------------------- broken requests: raw sockets, and the SDK


def body(server, rng) -> bytes:
    return json.dumps(
        {"model": server.model_name, "max_tokens": 8, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
    ).encode()


def busy(status: int, headers, code: str | None) -> bool:
    """A 503 for a full server (too many connections or waiting requests): allowed, and counted apart."""
    return status == 503 and bool(headers.get("Retry-After")) and code == "server_busy"


def refused(expected: int, response: tuple[int, dict, dict]) -> str:
    status, headers, answer = response
    if busy(status, headers, answer["error"]["code"]):
        return "busy"
    assert status == expected and answer["error"]["message"], (status, answer)
    return "refused"


def invalid_json(server, sdk, rng):
    return refused(400, post(server, b'{"model": "smollm2-135m", "messages": ['))


def wrong_content_type(server, sdk, rng):
    return refused(415, post(server, body(server, rng), content_type="text/plain"))


def too_long(server, sdk, rng):  # claims more than the limit and sends the first KiB
    return refused(413, post(server, b"x" * 1024, length=str(DEFAULT_MAX_BODY_BYTES + 1)))


def bad_content_length(server, sdk, rng):
    length, expected = rng.choice([("ten", 400), ("-5", 400), ("", 411)])
    return refused(expected, post(server, body(server, rng), length=length))


def stalled(server, sdk, rng):  # half the body, then nothing: 408 once the body's deadline has passed
    whole = body(server, rng)
    return refused(408, post(server, whole[: len(whole) // 2], length=str(len(whole))))


# (pytest.raises is not for threads: its "did not raise" is a BaseException that would end the client)
def unknown_model(server, sdk, rng):
    try:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    except openai.NotFoundError as exc:
        assert "is not served here" in exc.message
        return "refused"
    raise AssertionError("an unknown model was answered")


def wrong_key(server, sdk, rng):
    try:
        sdk.with_options(api_key="not-the-key").models.list()
    except openai.AuthenticationError:
        return "refused"
    raise AssertionError("a wrong key was let in")


def gone_mid_answer(server, sdk, rng):
    """A streamed answer the client stops reading after two pieces, closing its socket abruptly."""
    request = json.dumps(
        {
            "model": server.model_name,
            "max_tokens": 200,
            "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        }
    ).encode()
    port = server.server_address[1]
    sock = socket.create_connection(server.server_address[:2], timeout=60)
    try:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        if response.status == 503:
            assert busy(response.status, dict(response.getheaders()), json.loads(response.read())["error"]["code"])
            return "busy"
        assert response.status == 200
        events = 0
        while events < 3:  # the role, then two pieces
            line = response.readline()
            assert line, "the stream ended before two pieces"
            events += line.startswith(b"data: ")
        response.close()
    finally:
        drop(sock)
    return "dropped"


VALID = {"chat": chat, "chat_streamed": chat_streamed, "completion": completion}
CYCLE = [
    "chat",
    "invalid_json",
    "chat_streamed",
    "wrong_content_type",
    "completion",
    "too_long",
    "chat_streamed",
    "bad_content_length",
    "chat",
    "unknown_model",
    "completion",
    "wrong_key",
    "gone_mid_answer",
]
STALLER_CYCLE = ["stalled", "invalid_json", "stalled", "bad_content_length", "wrong_content_type"]
REQUESTS = {
    **VALID,
    "invalid_json": invalid_json,
    "wrong_content_type": wrong_content_type,
    "too_long": too_long,
    "bad_content_length": bad_content_length,
    "stalled": stalled,
    "unknown_model": unknown_model,
    "wrong_key": wrong_key,
    "gone_mid_answer": gone_mid_answer,
}


# ------------------------------------------------------------------------------------- the test


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def run_client(
    server, index: int, deadline: float, outcomes: collections.Counter, failures: list, lock: threading.Lock
) -> None:
    rng = random.Random(index)
    cycle = STALLER_CYCLE if index < STALLERS else CYCLE
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as sdk:
        turn = index
        while time.monotonic() < deadline:
            kind = cycle[turn % len(cycle)]
            turn += 1
            outcome, failure = None, None
            try:
                outcome = REQUESTS[kind](server, sdk, rng) or "answered"
            except openai.APIStatusError as exc:
                if busy(exc.status_code, exc.response.headers, exc.code):
                    outcome = "busy"
                else:
                    failure = f"{kind}: {type(exc).__name__}: {exc}"
            except Exception as exc:  # every failure is reported at the end, not just the first
                cause = f" ({exc.__cause__!r})" if exc.__cause__ else ""  # what the SDK's "Connection error." hides
                failure = f"{kind}: {type(exc).__name__}: {exc}{cause}"
            with lock:
                if failure is not None:
                    failures.append(failure)
                else:
                    outcomes[outcome] += 1
                    outcomes[f"{kind}/{outcome}"] += 1


def test_32_clients_for_30_s_get_every_answer_and_every_refusal(server, capsys):
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as sdk:
        chat(server, sdk, random.Random(0))  # warm: the first request pays for lazy set-up, not the load
    rss_before, threads_before = rss_bytes(), threading.active_count()
    stats_before = dict(server.engine.stats)
    outcomes, failures, lock = collections.Counter(), [], threading.Lock()
    start = time.monotonic()
    clients = [
        threading.Thread(target=run_client, args=(server, i, start + DURATION_S, outcomes, failures, lock))
        for i in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    elapsed = time.monotonic() - start

    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as sdk:
        chat(server, sdk, random.Random(1))  # the server is still up
    rss_growth = rss_bytes() - rss_before
    total = outcomes["answered"] + outcomes["refused"] + outcomes["busy"] + outcomes["dropped"]
    generated = server.engine.stats["generated_tokens"] - stats_before["generated_tokens"]
    with capsys.disabled():
        print(
            f"\nserve load: {total} requests from {CLIENTS} clients in {elapsed:.1f} s = "
            f"{total / elapsed:.1f} requests/s ({outcomes['answered']} answered = "
            f"{outcomes['answered'] / elapsed:.1f}/s, {outcomes['refused']} refused with 4xx, "
            f"{outcomes['dropped']} dropped mid-answer, {outcomes['busy']} busy 503s); "
            f"{generated / elapsed:.1f} tokens/s; RSS grew {rss_growth / 2**20:.0f} MiB"
        )
    assert failures == []
    assert all(outcomes[f"{kind}/answered"] > 0 for kind in VALID)
    assert all(outcomes[f"{kind}/refused"] > 0 for kind in REQUESTS if kind not in VALID and kind != "gone_mid_answer")
    assert outcomes["gone_mid_answer/dropped"] > 0
    # each client that went away had its job cancelled, and no other job was
    assert server.engine.stats["cancelled"] - stats_before["cancelled"] == outcomes["dropped"]
    assert rss_growth < MAX_RSS_GROWTH
    assert threading.active_count() <= threads_before + DEFAULT_MAX_CONNECTIONS


SLOW_SOCKETS = 64
NORMAL_CLIENTS = 8


def test_8_clients_among_64_slow_sockets_get_every_answer(server):
    """Slowloris in the mix: 64 sockets that start a request and never finish its headers (no key either)
    hold up none of 8 clients' requests; the server closes them at the header deadline."""
    from test_serve_limits import closed_by_server, slow_sockets

    slow = slow_sockets(server, SLOW_SOCKETS)
    answers, failures, lock = [], [], threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(index)
        with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as sdk:
            for kind in ("chat", "chat_streamed"):
                try:
                    VALID[kind](server, sdk, rng)
                    outcome, entry = answers, kind
                except Exception as exc:
                    outcome, entry = failures, f"{kind}: {type(exc).__name__}: {exc}"
                with lock:
                    outcome.append(entry)

    try:
        clients = [threading.Thread(target=client, args=(index,)) for index in range(NORMAL_CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        assert failures == [] and len(answers) == 2 * NORMAL_CLIENTS
        assert all(closed_by_server(sock) for sock in slow)
    finally:
        for sock in slow:
            sock.close()
