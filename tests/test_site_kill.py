"""A build killed part-way (SIGKILL, or Ctrl-C) leaves only whole files, and the next build resumes
from the cache and writes exactly what an uninterrupted build writes."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest
from scripted_server import interrupt_when, user_text
from site_support import EXPLANATION, is_translation, make_site, run_build, site_script

from explainer.fileio import TEMP_PREFIX

LANGUAGES = ["en", "zh", "ar"]


def posts(site) -> dict[str, bytes]:
    """The published files; a leftover temp file of an interrupted write is allowed (Jekyll
    ignores dot files) and nothing else."""
    files = {}
    for path in sorted((site / "_posts").rglob("*")):
        if path.is_file():
            if path.name.startswith(TEMP_PREFIX):
                continue
            files[path.relative_to(site).as_posix()] = path.read_bytes()
    return files


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_an_interrupted_build_leaves_whole_files_and_the_next_build_finishes_it(tmp_path, scripted_server, how):
    reference_server = scripted_server(site_script)
    reference = make_site(tmp_path / "reference", reference_server.base_url, LANGUAGES)
    assert run_build(reference).returncode == 0
    explain_requests = sum(not is_translation(body) for body in reference_server.requests)
    assert explain_requests > 0
    expected = posts(reference.parent)

    # Explanations are answered; translations wait until released. Once the explained post's
    # translation arrives, its explanations are all answered and cached: kill the build then.
    explained_post_translating, release = threading.Event(), threading.Event()

    def script(body):
        if is_translation(body):
            if EXPLANATION in user_text(body):
                explained_post_translating.set()
            release.wait()
        return site_script(body)

    server = scripted_server(script)
    config = make_site(tmp_path / "interrupted", server.base_url, LANGUAGES)
    environment = dict(os.environ, OPENAI_API_KEY="sk-test-not-a-real-key")
    environment.pop("OPENAI_BASE_URL", None)
    environment.pop("EXPLAINER_CACHE_DIR", None)
    command = [sys.executable, "-m", "explainer", "build", "--config", str(config), "--trust-config"]
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as log:
        returncode, messages = interrupt_when(command, environment, explained_post_translating, release, how, log)

    if how == signal.SIGINT:
        assert returncode == 130 and "Interrupted: the files written are whole" in messages
        assert "Traceback" not in messages
    else:
        assert returncode == -signal.SIGKILL
    interrupted = posts(config.parent)
    assert len(interrupted) < len(expected)  # it really stopped part-way
    for name, data in interrupted.items():
        assert data == expected[name], f"{name} is not whole"

    sent_before = len(server.requests)
    resumed = run_build(config)

    assert resumed.returncode == 0, resumed.stderr
    assert not any(not is_translation(body) for body in server.requests[sent_before:])  # explanations: cached
    assert "0 demo run(s), 2 from cache" in resumed.stderr
    assert posts(config.parent) == expected
