"""`explainer build --no-demos` of a site someone else made: its explainer.toml reads and writes only inside
its own folder and never sends the user's API key to a server it names, unless --trust-config says the
config is the user's. The review's attack: root = "../secret", output = "../outside" and a base_url of
the attacker's, built with OPENAI_API_KEY=sk-victim-123, sent the key and a secret file to that server and
wrote the posts outside the site; a _posts symlink out of the site was written through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from site_support import site_script, to_toml

VICTIM_KEY = "sk-victim-123"
CODE = "def add(a, b):\n    return a + b\n"


@pytest.fixture
def server(scripted_server):
    return scripted_server(site_script)


def make_site(tmp_path: Path, server, **site) -> Path:
    """A site in tmp_path/site that explains its own code.py in English; `site` overrides [site] keys.
    Beside it: secret/ (a file the user keeps) and outside/ (an empty folder of the user's)."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "code.py").write_text("API_TOKEN = 'the-users-secret'\n")
    (tmp_path / "outside").mkdir()
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "code.py").write_text(CODE)
    config = {
        "site": {"languages": ["en"], **site},
        "backend": {"name": "openai", "base_url": server.base_url},
        "posts": [{"slug": "add", "date": "2024-05-01", "file": "code.py"}],
    }
    (folder / "explainer.toml").write_text(to_toml(config))
    return folder


def build(folder: Path, *args: str, environment: dict | None = None) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OPENAI_BASE_URL", "EXPLAINER_CACHE_DIR", "OPENAI_API_KEY")
    }
    env.update({"OPENAI_API_KEY": VICTIM_KEY, **(environment or {})})
    return subprocess.run(
        [sys.executable, "-m", "explainer", "build", "--no-demos", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: ")
    return line


def keys_sent(server) -> list[str]:
    return [headers.get("authorization", "") for headers in server.headers]


@pytest.mark.parametrize(
    "key, value", [("root", "../secret"), ("output", "../outside"), ("cache_dir", "../outside/cache")]
)
def test_a_path_out_of_the_sites_folder_is_refused_before_anything_is_read_or_written(tmp_path, server, key, value):
    folder = make_site(tmp_path, server, **{key: value})
    if key == "root":
        (tmp_path / "secret" / "code.py").write_text(CODE)  # what the attack reads: a file the site names
    line = one_error_line(build(folder, "--base-url", server.base_url))
    assert f"[site] {key} = {value!r}" in line and "--trust-config" in line
    assert server.requests == [] and list((tmp_path / "outside").iterdir()) == []


def test_a_symlink_that_leads_out_is_a_path_out_too(tmp_path, server):
    folder = make_site(tmp_path, server, root="project")
    (folder / "project").symlink_to(tmp_path / "secret")
    line = one_error_line(build(folder, "--base-url", server.base_url))
    assert "[site] root = 'project'" in line and str(tmp_path / "secret") in line
    assert server.requests == []


def test_the_key_goes_only_to_a_server_the_user_named(tmp_path, server):
    folder = make_site(tmp_path, server)

    named_by_the_file = build(folder)
    line = one_error_line(named_by_the_file)
    assert "base_url" in line and "OPENAI_API_KEY" in line and "--trust-config" in line and VICTIM_KEY not in line
    assert server.requests == []

    for how in (["--base-url", server.base_url], ["--trust-config"]):
        result = build(folder, *how)
        assert result.returncode == 0, result.stderr
    assert set(keys_sent(server)) == {f"Bearer {VICTIM_KEY}"}  # sent where the user said so, and only then
    by_environment = build(
        folder, "--cache-dir", str(tmp_path / "cache2"), environment={"OPENAI_BASE_URL": server.base_url}
    )
    assert by_environment.returncode == 0, by_environment.stderr


def test_no_write_goes_through_a_symlink_out_of_the_site(tmp_path, server):
    folder = make_site(tmp_path, server)
    (folder / "_posts").symlink_to(tmp_path / "outside")
    line = one_error_line(build(folder, "--base-url", server.base_url))
    assert "_posts" in line and "symlink" in line and "--trust-config" in line
    assert list((tmp_path / "outside").iterdir()) == [] and server.requests == []


def test_the_cache_is_not_written_through_a_symlink_out_of_the_site(tmp_path, server):
    folder = make_site(tmp_path, server)
    victim = tmp_path / "outside" / "notes.txt"
    victim.write_text("the user's notes\n")
    (folder / ".explainer-cache").mkdir()
    (folder / ".explainer-cache" / "answers.sqlite").symlink_to(victim)
    line = one_error_line(build(folder, "--base-url", server.base_url))
    assert "answers.sqlite" in line and "symlink" in line
    assert victim.read_text() == "the user's notes\n"


def test_with_everything_inside_an_untrusted_site_builds_and_writes_only_inside(tmp_path, server):
    folder = make_site(tmp_path, server)
    result = build(folder, "--base-url", server.base_url)
    assert result.returncode == 0, result.stderr
    written = [Path(line) for line in result.stdout.split()]
    assert written and all(folder in path.resolve().parents for path in written)
    assert list((tmp_path / "outside").iterdir()) == []
    assert "the-users-secret" not in json.dumps(server.requests)


def test_trust_config_lets_the_config_reach_out_of_its_folder(tmp_path, server):
    folder = make_site(tmp_path, server, output="../outside")
    result = build(folder, "--trust-config")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "outside" / "_posts" / "en").iterdir())
