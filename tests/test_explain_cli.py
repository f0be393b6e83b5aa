"""`explainer explain` as a user runs it: a subprocess, the real openai SDK, a scripted server on
127.0.0.1; every mistake is one `Error:` line and exit code 1, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from scripted_server import interrupt_when, user_text
from test_explain import MAX_LINES, SAMPLE, echo_script, fences_and_following_code, first_code_line

from explainer.chunking import chunk_file


def run(
    *args: str,
    env: dict | None = None,
    cwd: Path | None = None,
    program: tuple[str, ...] = (sys.executable, "-m", "explainer", "explain"),
) -> subprocess.CompletedProcess:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "EXPLAINER_CACHE_DIR")
    }
    environment.update(env or {})
    return subprocess.run([*program, *args], capture_output=True, text=True, env=environment, cwd=cwd, timeout=120)


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sampler.py"
    path.write_text(SAMPLE, encoding="utf-8")
    return path


@pytest.fixture
def server(scripted_server, sample):
    return scripted_server(echo_script(sample))


def explain(server, *args: str, **options) -> subprocess.CompletedProcess:
    return run(
        *args,
        "--base-url",
        server.base_url,
        "--max-lines",
        str(MAX_LINES),
        env={"OPENAI_API_KEY": "sk-test-not-a-real-key"},
        **options,
    )


def test_the_post_goes_to_stdout_and_the_usage_to_stderr_and_a_rerun_is_free(server, sample, tmp_path):
    chunks = chunk_file(sample, max_lines=MAX_LINES).chunks
    cache = str(tmp_path / "cache")

    first = explain(server, str(sample), "--cache-dir", cache)

    assert first.returncode == 0, first.stderr
    assert len(server.requests) == len(chunks) + 1
    assert f"{len(chunks) + 1} requests," in first.stderr and "0 cache hits" in first.stderr
    blocks = fences_and_following_code(first.stdout)
    assert [spans for _, spans in blocks] == [[first_code_line(c.code)] for c in chunks]
    assert first.stdout.startswith("---\nlayout: post\n")

    again = explain(server, str(sample), "--cache-dir", cache)

    assert again.returncode == 0, again.stderr
    assert len(server.requests) == len(chunks) + 1  # nothing new was sent
    assert "0 requests," in again.stderr and f"{len(chunks) + 1} cache hits" in again.stderr
    assert again.stdout == first.stdout


def test_output_file_is_written_and_stdout_stays_empty(server, sample, tmp_path):
    out = tmp_path / "posts" / "2024-05-01-sampler.md"
    result = explain(server, str(sample), "--symbol", "softmax", "-o", str(out), "--no-cache")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    tokens = MarkdownIt("commonmark").parse(out.read_text(encoding="utf-8"))
    assert sum(token.type == "fence" for token in tokens) == len(chunk_file(sample, "softmax", MAX_LINES).chunks)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_json_format_lists_invented_names(scripted_server, sample):
    invented = "Like `torch.empty`."
    server = scripted_server(echo_script(sample, {"return best": invented}))
    result = explain(server, str(sample), "--symbol", "pick", "--format", "json", "--no-cache")

    assert result.returncode == 0, result.stderr
    post = json.loads(result.stdout)
    assert post["sections"][-1]["code"] == "    return best\n"
    assert [s["ungrounded"] for s in post["sections"]] == [[]] * (len(post["sections"]) - 1) + [["torch.empty"]]
    assert "line 22: the explanation mentions `torch.empty`" in result.stderr


def test_the_explain_script_and_openai_base_url_from_the_environment(server, sample):
    # No key and no --base-url: OPENAI_BASE_URL alone picks the openai backend.
    result = run(
        str(sample),
        "--symbol",
        "softmax",
        "--no-cache",
        "--max-lines",
        str(MAX_LINES),
        env={"OPENAI_BASE_URL": server.base_url},
        program=(str(Path(sys.executable).parent / "explain"),),
    )

    assert result.returncode == 0, result.stderr
    assert server.requests and "```python" in result.stdout


def test_syntax_errors_are_a_warning_naming_the_lines(scripted_server, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def ok():\n    return 1\n\n\ndef bad(:\n    return 2\n", encoding="utf-8")
    result = explain(scripted_server(lambda body: "# Title\n\nFine."), str(broken), "--no-cache")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert any(line.startswith("Warning:") and "line 5" in line for line in result.stderr.splitlines())


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    binary = tmp_path / "blob.py"
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("x = 'café'\n".encode("latin-1"))
    empty = tmp_path / "empty.py"
    empty.write_text("\n  \n", encoding="utf-8")
    sample = tmp_path / "sampler.py"
    return {
        "binary": ([str(binary)], "binary"),
        "not utf-8": ([str(latin1)], "UTF-8"),
        "empty": ([str(empty)], "empty"),
        "missing": ([str(tmp_path / "nope.py")], "no such file"),
        "unsupported": ([str(tmp_path)], "unsupported file type"),
        "unknown symbol": ([str(sample), "--symbol", "sotfmax"], "softmax"),  # lists what exists
        "unknown language": ([str(sample), "--lang", "xx"], "unknown language 'xx'"),
    }


@pytest.mark.parametrize(
    "case", ["binary", "not utf-8", "empty", "missing", "unsupported", "unknown symbol", "unknown language"]
)
def test_bad_input_is_one_error_line_and_exit_code_1(server, sample, tmp_path, case):
    args, expected = bad_inputs(tmp_path)[case]
    result = explain(server, *args, "--no-cache")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert result.stdout == ""
    assert server.requests == []


def test_ctrl_c_while_requests_are_in_flight_exits_at_once_and_the_rerun_finishes(scripted_server, sample, tmp_path):
    """A Ctrl-C must not wait for requests the server is still holding (a normal exit would join
    the request threads first), and must not print a traceback."""
    answer, held, release = echo_script(sample), threading.Event(), threading.Event()

    def script(body):
        if "title" not in user_text(body):  # the chunk requests hang until the test ends
            held.set()
            release.wait()
        return answer(body)

    server = scripted_server(script)
    environment = {key: value for key, value in os.environ.items() if key not in ("OPENAI_BASE_URL",)}
    environment.update(OPENAI_API_KEY="sk-test-not-a-real-key", EXPLAINER_CACHE_DIR=str(tmp_path / "cache"))
    output = tmp_path / "post.md"
    command = [
        sys.executable,
        "-m",
        "explainer",
        "explain",
        str(sample),
        "--base-url",
        server.base_url,
        "--max-lines",
        str(MAX_LINES),
        "--output",
        str(output),
    ]
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as log:
        returncode, messages = interrupt_when(command, environment, held, release, signal.SIGINT, log)

    assert returncode == 130, messages
    assert "Interrupted: the files written are whole" in messages and "Traceback" not in messages
    assert not output.exists()
    rerun = run(*command[4:], env=environment)
    assert rerun.returncode == 0, rerun.stderr
    assert output.read_text(encoding="utf-8").startswith("---")


class PageText(HTMLParser):
    """The text a reader sees of rendered HTML, and the elements it has."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.text, self.elements = "", set()
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.elements.add(tag)

    def handle_data(self, data):
        self.text += data


def test_a_file_name_and_a_model_name_reach_the_page_as_text_not_html(scripted_server, tmp_path):
    """The review's attack: the caption and the "... explained this code" line carried these names as raw
    HTML, outside any code block."""
    sample = tmp_path / "x<img src=x onerror=alert(7)>.py"
    sample.write_text(SAMPLE, encoding="utf-8")
    server = scripted_server(echo_script(sample))
    model = "gpt<svg onload=alert(8)>"

    result = run(
        sample.name,
        "--model",
        model,
        "--base-url",
        server.base_url,
        "--max-lines",
        str(MAX_LINES),
        "--no-cache",
        env={"OPENAI_API_KEY": "sk-test-not-a-real-key"},
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    page = PageText(MarkdownIt("commonmark", {"html": True}).render(result.stdout.split("---\n", 2)[2]))
    assert not page.elements & {"img", "svg"}
    assert f"{model} explained this code" in page.text
    assert f"{sample.name}, lines 1–" in page.text


UNREADABLE = ">1. <!--\n>"  # 9 bytes on which markdown-it-py 4.3.0 raises IndexError


def test_an_answer_markdown_it_cannot_read_is_asked_again_and_never_cached(scripted_server, sample, tmp_path):
    """The review's finding: this answer made explain crash with a traceback, and a rerun crashed again from
    the cache with 0 requests."""
    answer = echo_script(sample)
    firmer = "Your answer must be short"  # what explain adds when it asks again
    server = scripted_server(lambda body: answer(body) if firmer in user_text(body) else UNREADABLE)
    cache = str(tmp_path / "cache")

    first = explain(server, str(sample), "--cache-dir", cache)

    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr and "unreadable as Markdown" in first.stderr
    chunks = len(chunk_file(sample, max_lines=MAX_LINES).chunks)
    assert len(server.requests) == 2 * (chunks + 1)  # every answer once, unreadable; then once more, firmer
    again = explain(server, str(sample), "--cache-dir", cache)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "0 requests," in again.stderr  # the readable answers were cached under the first requests' keys


def test_an_answer_that_stays_unreadable_is_one_error_line_and_is_not_cached(scripted_server, sample, tmp_path):
    server = scripted_server(lambda body: UNREADABLE)
    cache = str(tmp_path / "cache")

    for run_number in (1, 2):
        result = explain(server, str(sample), "--cache-dir", cache)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "markdown-it-py" in errors[0] and "cannot read" in errors[0], result.stderr
        chunks = len(chunk_file(sample, max_lines=MAX_LINES).chunks)
        assert len(server.requests) == run_number * 2 * (chunks + 1)  # nothing came from the cache
