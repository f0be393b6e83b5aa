import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import scripted_server and other helpers

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
