import os
import signal
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import scripted_server and other helpers

# A shell without job control starts a background command with Ctrl-C ignored, and every process it starts
# inherits that: the Ctrl-C tests would then send SIGINT to children that cannot take it. Users press Ctrl-C
# in a foreground terminal, so the tests run as that does, wherever make test was started.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# pytest-xdist's workers share the cores: torch gives each process a thread per core, so with two workers on two
# cores four threads contend for two, and a model test's matmuls wait on each other's spinning threads. Each
# worker (and the CLIs it starts, which inherit the variable) gets its share of the cores instead: on 2 cores,
# test_generation.py and test_engine.py in two workers took 147 s with torch's default and 69 s with this.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

from scripted_server import ScriptedServer  # noqa: E402


@pytest.fixture
def scripted_server():
    """Factory: `server = scripted_server(script)` starts a ScriptedServer that stops after the test."""
    servers = []

    def start(script):
        server = ScriptedServer(script).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def openai_env(monkeypatch):
    """A fake key so the SDK is willing to talk; no real service is ever reached."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


class SmolLM2Servers:
    """Starts llama_ref.serve servers of SmolLM2-135M-Instruct (the small catalog model) on a free port of
    127.0.0.1, each answering in a thread of its own; `stop(server)` stops one, and the fixture stops the rest.

    fp32: a 135M model's greedy answers in bf16 depend on how requests happen to be batched."""

    def __init__(self):
        self._running = []

    def __call__(self, **options):
        from llama_ref.serve import open_server

        server = open_server("smollm2-135m", "127.0.0.1", 0, dtype="fp32", **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self._running.append(server)
        return server

    def stop(self, server) -> None:
        self._running.remove(server)
        server.shutdown()
        server.server_close()

    def stop_all(self) -> None:
        while self._running:
            self.stop(self._running[-1])


@pytest.fixture(scope="module")
def smollm2_server():
    """Factory: `server = smollm2_server(max_seq_len=..., **limits)`, as SmolLM2Servers starts it."""
    servers = SmolLM2Servers()
    yield servers
    servers.stop_all()
