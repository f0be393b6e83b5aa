"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose answers a test scripts.

The official openai SDK talks to it over loopback exactly as it would talk to a vLLM or
llama.cpp server, so tests exercise the real client: retries, timeouts, headers, parsing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    content: str = ""
    finish_reason: str = "stop"
    status: int = 200  # non-200 sends an OpenAI-style error body instead of a completion
    headers: dict = field(default_factory=dict)  # e.g. {"Retry-After": "0"}
    prompt_tokens: int = 10
    completion_tokens: int | None = None  # default: number of words in content
    code: str | None = None  # the error body's code, e.g. "context_length_exceeded"; default: the status


Script = Callable[[dict], "Reply | str"]


def user_text(body: dict) -> str:
    """The content of the last user message of a chat request."""
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a client pool of 8 connecting at once overflows it, and
    # each dropped connection waits out TCP's one-second SYN retry (llama_ref.serve sizes it the same way)
    request_queue_size = socket.SOMAXCONN


class ScriptedServer:
    """Start with `with ScriptedServer(script) as server:`; point the SDK at server.base_url.

    `script(body)` gets each chat-completions request body (a dict) and returns a Reply or a
    plain string (a normal answer). Every body is kept in `server.requests`, in arrival order, and its
    headers in `server.headers` (names in lower case).
    """

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def handle(self):
                try:
                    super().handle()
                except ConnectionError:  # the client gave up (a timeout test): nobody to answer
                    pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                with server._lock:
                    server.requests.append(body)
                    server.headers.append({name.lower(): value for name, value in self.headers.items()})
                reply = server.script(body)
                if isinstance(reply, str):
                    reply = Reply(reply)
                if reply.status != 200:
                    return self._send(
                        reply.status,
                        {
                            "error": {
                                "message": reply.content or "scripted error",
                                "type": "scripted",
                                "code": reply.code or reply.status,
                            }
                        },
                        reply.headers,
                    )
                completion_tokens = reply.completion_tokens
                if completion_tokens is None:
                    completion_tokens = len(reply.content.split())
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "scripted"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": reply.finish_reason,
                                "message": {"role": "assistant", "content": reply.content},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": reply.prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": reply.prompt_tokens + completion_tokens,
                        },
                    },
                    reply.headers,
                )

            def _send(self, status: int, payload: dict, headers: dict | None = None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        # A short poll interval lets shutdown() return at once instead of after up to half a second.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def interrupt_when(
    command: list[str], environment: dict, ready: threading.Event, release: threading.Event, how: int, log
) -> tuple[int, str]:
    """Run `command`, send it signal `how` once `ready` is set (by a script holding a request), and
    return its exit code and stderr. `release` lets the held requests go once it has exited (or
    after 60 s, when it is killed). `log` is an open text file for its stderr."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=environment)
    try:
        while not ready.wait(timeout=0.05):
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"exited before it was interrupted: {log.read()}")
        process.send_signal(how)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        release.set()
    log.seek(0)
    return returncode, log.read()
